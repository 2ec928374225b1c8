//! `rlagent uninstall`: detaches the programs, removes their pins, moves placed processes
//! back to the root cgroup and removes the agent's subtree.

use std::path::Path;

use rlagent::{
    config::Config,
    kernel::{
        bpf,
        cgroup::{mount, CgroupFs},
        nss::SystemUsers,
    },
};

pub fn uninstall(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path, &SystemUsers)?;
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
