//! `rlagent check-config`: validates the config file on its own (without the runtime
//! overrides in the state file) and prints the connection limits it would enforce, and
//! the rules that would tighten them.

use std::path::Path;

use rlagent::{
    agent::{cap_text, policy_text},
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
        "default (user:*, UID >= {}): {}",
        limits.uid_min,
        policy_text(&limits.default_policy)
    );
    println!(
        "host-wide cap: {} ({})",
        cap_text(limits.host_cap),
        limits.host_mode
    );
    for (uid, policy) in &limits.per_uid {
        println!("user:{uid}: {}", policy_text(policy));
    }
    for (group, g) in &limits.groups {
        println!(
            "group {group} (cgroup /{}): {}",
            g.cgroup.display(),
            policy_text(&g.policy)
        );
    }
    for rule in &config.penalty_rules {
        println!(
            "penalty {} ({}): when `{}` over {}s, {} tiers",
            rule.name,
            rule.mode,
            rule.when,
            rule.window.as_secs(),
            rule.tiers.len()
        );
    }
    for rule in &config.adapt_rules {
        println!(
            "adapt {} ({}): {} while `{}` for {}s",
            rule.name,
            rule.mode,
            rule.target,
            rule.when,
            rule.hold.as_secs()
        );
    }
    if let Some(w) = &config.penalty_webhook {
        println!(
            "penalty webhook on {} (decisions expire after {}s unless sent again)",
            w.listen,
            w.max_duration.as_secs()
        );
    }
    Ok(())
}
