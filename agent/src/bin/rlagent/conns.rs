//! `rlagent conns`: live connections, denials and caps per UID, from the pinned maps.

use std::path::Path;

use anyhow::Context;
use rlagent::{
    agent::cap_text,
    config::Config,
    kernel::{bpf::PinnedMaps, nss::SystemUsers},
};

pub fn conns(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path, &SystemUsers)?;
    let maps = PinnedMaps::open(&config.bpf.pin_path).with_context(|| {
        format!(
            "is the agent installed? no maps pinned under {}",
            config.bpf.pin_path.display()
        )
    })?;
    let (host, per_uid) = maps.usage()?;
    println!(
        "{:>10} {:>8} {:>8} {:>10} {:>11} {:>11}",
        "UID", "LIVE", "CAP", "ADMITTED", "DENIED_CAP", "DENIED_HOST"
    );
    for c in &per_uid {
        println!(
            "{:>10} {:>8} {:>8} {:>10} {:>11} {:>11}",
            c.uid,
            c.live,
            c.cap
                .map_or_else(|| cap_text(rlagent_common::UNLIMITED), cap_text),
            c.admitted,
            c.denied_cap,
            c.denied_host
        );
    }
    println!(
        "host: {} live, {} let through untracked (map full)",
        host.live, host.untracked
    );
    Ok(())
}
