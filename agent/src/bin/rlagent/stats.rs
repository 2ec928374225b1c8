//! `rlagent stats`: the Stats model of what the agent enforces (the config with the
//! runtime overrides merged), read from the kernel without a running agent. A drop-in
//! the agent refused (bad or not root's) is left out with a warning, as the agent left it
//! out, instead of failing the command.

use std::path::Path;

use rlagent::{
    agent::{collect_stats, resolve_driver},
    config::Config,
    desired::{state::RuntimeState, Desired},
    kernel::{nss::SystemUsers, SystemObserver},
    model::usage::Detail,
    observe::table,
};

pub fn stats(config_path: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let (mut config, skipped) = Config::load_skipping_bad_drop_ins(config_path, &SystemUsers)?;
    crate::warn_skipped(&skipped);
    resolve_driver(&mut config)?;
    let runtime = RuntimeState::load(&config.state_path)?;
    let desired = Desired::build(&config, &runtime, &SystemUsers)?;
    let stats = collect_stats(
        &SystemObserver::open(&config.bpf.pin_path)?,
        &desired,
        Detail::All,
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", table::table(&stats));
    }
    Ok(())
}
