//! One stats model for every target, read from the cgroup files and the pinned BPF maps.
//! `rlagent stats` prints it today; the control socket and /metrics will serve the same
//! type.

use std::path::Path;

use serde::Serialize;

use crate::{
    bpf::PinnedMaps,
    cgroup::{
        driver::{CgroupDriver, CgroupStats},
        plan::CgroupPlan,
        CgroupError, CgroupFs,
    },
    config::Config,
};

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TargetStats {
    /// `group:<name>`, `user:<uid>` or `cgroup:<path>`.
    pub target: String,
    #[serde(flatten)]
    pub cgroup: CgroupStats,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct UidConnStats {
    pub uid: u32,
    pub live: u64,
    /// `None` = no cap.
    pub cap: Option<u64>,
    pub admitted: u64,
    pub denied_cap: u64,
    pub denied_host: u64,
}

/// Host-wide connection counters.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct HostConnStats {
    pub live: u64,
    /// Sockets let through uncounted because a map was full.
    pub untracked: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Stats {
    pub targets: Vec<TargetStats>,
    /// Per-UID connection counters; empty when the programs are not installed.
    pub conns: Vec<UidConnStats>,
    /// `None` when the programs are not installed.
    #[serde(default)]
    pub host: Option<HostConnStats>,
    /// Processes the agent placed since it started (0 outside the agent).
    #[serde(default)]
    pub placement_moves: u64,
    /// Alerts firing now (0 outside the agent).
    #[serde(default)]
    pub alerts_firing: usize,
    /// Run counts of the kernel programs, when the kernel keeps them
    /// (`kernel.bpf_stats_enabled`); empty otherwise.
    #[serde(default)]
    pub programs: Vec<ProgramStats>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ProgramStats {
    pub program: String,
    pub runs: u64,
    pub run_seconds: f64,
}

/// rlagent's programs with a run count (the kernel counts only while BPF stats are on).
fn program_stats() -> Vec<ProgramStats> {
    let mut by_name: std::collections::BTreeMap<String, (u64, f64)> =
        std::collections::BTreeMap::new();
    for info in aya::programs::loaded_programs().flatten() {
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if !name.starts_with("rl_") || info.run_count() == 0 {
            continue;
        }
        let entry = by_name.entry(name.to_string()).or_default();
        entry.0 += info.run_count();
        entry.1 += info.run_time().as_secs_f64();
    }
    by_name
        .into_iter()
        .map(|(program, (runs, run_seconds))| ProgramStats {
            program,
            runs,
            run_seconds,
        })
        .collect()
}

/// Collects stats for every cgroup the config manages (groups, user cgroups that exist,
/// cgroup targets) and every UID the connection maps know.
pub fn collect(config: &Config, mount: &Path) -> Result<Stats, CgroupError> {
    let plan = CgroupPlan::from_config(config);
    let driver = CgroupDriver::new(CgroupFs::new(mount));
    let mut targets = Vec::new();
    let mut add = |target: String, relative: &Path| -> Result<(), CgroupError> {
        if mount.join(relative).join("cgroup.procs").exists() {
            targets.push(TargetStats {
                target,
                cgroup: driver.stats(relative)?,
            });
        }
        Ok(())
    };
    for name in plan.groups.keys() {
        add(format!("group:{name}"), &plan.group_cgroup(name))?;
    }
    let root = mount.join(&plan.root);
    let mut uids: Vec<u32> = std::fs::read_dir(&root)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("user-")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    uids.sort_unstable();
    for uid in uids {
        add(format!("user:{uid}"), &plan.user_cgroup(uid))?;
    }
    for path in plan.cgroups.keys() {
        add(format!("cgroup:{}", path.display()), path)?;
    }

    let mut conns = Vec::new();
    let mut host = None;
    if let Ok(maps) = PinnedMaps::open(&config.bpf.pin_path) {
        if let Ok(counters) = maps.stats() {
            host = Some(HostConnStats {
                live: counters.host.live,
                untracked: counters.host.untracked,
            });
            for (uid, c) in counters.per_uid {
                let cap = maps
                    .cap_for(uid)
                    .ok()
                    .filter(|c| *c != rlagent_common::UNLIMITED);
                conns.push(UidConnStats {
                    uid,
                    live: c.live,
                    cap,
                    admitted: c.admitted,
                    denied_cap: c.denied_cap,
                    denied_host: c.denied_host,
                });
            }
        }
    }
    Ok(Stats {
        targets,
        conns,
        host,
        placement_moves: 0,
        alerts_firing: 0,
        programs: program_stats(),
    })
}

/// The human-readable form of [`Stats`] (rlagent stats, rlctl stats).
pub fn table(stats: &Stats) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mib = |b: u64| format!("{:.1}", b as f64 / (1 << 20) as f64);
    if !stats.targets.is_empty() {
        let _ = writeln!(
            out,
            "{:<22} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>5} {:>5} {:>6}",
            "TARGET",
            "PROCS",
            "CPU_S",
            "THROTTLED",
            "MEM_MIB",
            "MEM_MAX",
            "OOM_KILL",
            "PIDS",
            "PMAX",
            "PFAIL"
        );
    }
    for t in &stats.targets {
        let c = &t.cgroup;
        let cpu = c.cpu.unwrap_or_default();
        let mem = c.memory.unwrap_or_default();
        let pids = c.pids.unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<22} {:>5} {:>9.2} {:>9} {:>9} {:>9} {:>8} {:>5} {:>5} {:>6}",
            t.target,
            c.procs,
            cpu.usage_usec as f64 / 1e6,
            cpu.nr_throttled,
            mib(mem.current),
            mem.max.map_or("max".to_string(), mib),
            mem.events_oom_kill,
            pids.current,
            pids.max.map_or("max".to_string(), |m| m.to_string()),
            pids.events_max
        );
    }
    if !stats.conns.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "{:>10} {:>8} {:>8} {:>10} {:>11} {:>11}",
            "UID", "LIVE", "CAP", "ADMITTED", "DENIED_CAP", "DENIED_HOST"
        );
        for c in &stats.conns {
            let _ = writeln!(
                out,
                "{:>10} {:>8} {:>8} {:>10} {:>11} {:>11}",
                c.uid,
                c.live,
                c.cap.map_or("none".to_string(), |v| v.to_string()),
                c.admitted,
                c.denied_cap,
                c.denied_host
            );
        }
    }
    if out.is_empty() {
        out.push_str("no targets with stats\n");
    }
    out
}
