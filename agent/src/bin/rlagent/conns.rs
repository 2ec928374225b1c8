//! `rlagent conns`: live connections, limits, denials and would-denies per UID, from the
//! pinned maps (the table `rlctl stats` prints, without the agent). Only the main file's
//! `[bpf] pin_path` matters here, so a bad drop-in is left out with a warning.

use std::path::Path;

use anyhow::Context;
use rlagent::{
    config::Config,
    kernel::{bpf::PinnedMaps, nss::SystemUsers},
    observe::{stats::Stats, table},
};

pub fn conns(config_path: Option<&Path>) -> anyhow::Result<()> {
    let (config, skipped) = Config::load_skipping_bad_drop_ins(config_path, &SystemUsers)?;
    crate::warn_skipped(&skipped);
    let maps = PinnedMaps::open(&config.bpf.pin_path).with_context(|| {
        format!(
            "is the agent installed? no maps pinned under {}",
            config.bpf.pin_path.display()
        )
    })?;
    let (host, per_uid) = maps.usage()?;
    let untracked = host.untracked;
    let live = host.live;
    let stats = Stats {
        conns: per_uid,
        host: Some(host),
        ..Stats::default()
    };
    print!("{}", table::table(&stats));
    println!("host: {live} live, {untracked} let through untracked (map full)");
    Ok(())
}
