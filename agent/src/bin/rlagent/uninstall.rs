//! `rlagent uninstall`: detaches the programs, removes their pins, and undoes the cgroup
//! driver's work: under cgroupfs it moves placed processes back to the root cgroup and
//! removes the agent's subtree; under systemd it resets every unit property the agent set
//! (processes stay in their scopes, now unlimited). Refused while an agent answers on the
//! control socket, unless `--force`.

use std::path::Path;

use rlagent::{
    agent::resolve_driver,
    config::Config,
    kernel::{
        bpf,
        cgroup::{systemd, CgroupFs},
        nss::SystemUsers,
    },
    model::layout::Driver,
};

pub fn uninstall(config_path: Option<&Path>, force: bool) -> anyhow::Result<()> {
    let mut config = Config::load(config_path, &SystemUsers)?;
    let socket = &config.control_socket;
    if !force && std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!(
            "an agent is running (it answers on {}): uninstalling under it would switch enforcement off while it looks healthy; stop it first (systemctl stop rlagent), or pass --force",
            socket.display()
        );
    }
    bpf::uninstall(&config.bpf.pin_path)?;
    println!(
        "removed programs and pins under {}",
        config.bpf.pin_path.display()
    );
    let mount = resolve_driver(&mut config)?;
    if config.driver == Driver::Systemd {
        let bus = systemd::dbus::SystemBus::connect()?;
        let driver = systemd::SystemdDriver::new(bus, &mount, config.systemd_record());
        let units = driver.reset_all()?;
        println!("reset the limits rlagent had set on {units} systemd units");
        return Ok(());
    }
    let fs = CgroupFs::new(&mount);
    if fs.path(&config.cgroup_root).exists() {
        let moved = fs.remove_tree(&config.cgroup_root)?;
        println!(
            "moved {moved} processes back to {} and removed {}",
            mount.display(),
            fs.path(&config.cgroup_root).display()
        );
    }
    Ok(())
}
