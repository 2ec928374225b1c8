//! `rlagent uninstall`: detaches the programs, removes their pins, moves placed processes
//! back to the root cgroup and removes the agent's subtree. Refused while an agent
//! answers on the control socket, unless `--force`.

use std::path::Path;

use rlagent::{
    config::Config,
    kernel::{
        bpf,
        cgroup::{mount, CgroupFs},
        nss::SystemUsers,
    },
};

pub fn uninstall(config_path: Option<&Path>, force: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path, &SystemUsers)?;
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
    let mount = mount::find()?;
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
