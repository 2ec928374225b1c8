//! `rlagent check-config`: validates the config file on its own (without the runtime
//! overrides in the state file) and prints the connection limits it would enforce.

use std::path::Path;

use rlagent::{
    agent::cap_text,
    config::Config,
    desired::{state::RuntimeState, Desired},
    kernel::nss::SystemUsers,
};

pub fn check_config(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path, &SystemUsers)?;
    let desired = Desired::build(&config, &RuntimeState::default(), &SystemUsers)?;
    let limits = &desired.conns;
    println!("config {}: valid", config.source.display());
    if config.source.is_file() {
        for drop_in in Config::drop_ins(&config.source)? {
            println!("  with drop-in {}", drop_in.display());
        }
    }
    println!("attach cgroup: /{}", config.bpf.attach_cgroup.display());
    println!(
        "default cap (user:*, UID >= {}): {}",
        limits.uid_min,
        cap_text(limits.default_cap)
    );
    println!("host-wide cap: {}", cap_text(limits.host_cap));
    for (uid, cap) in &limits.per_uid {
        println!("user:{uid}: {}", cap_text(*cap));
    }
    Ok(())
}
