//! The human-readable form of the Stats model (`rlagent stats`, `rlctl stats`).

use std::fmt::Write;

use super::stats::Stats;

/// The human-readable form of [`Stats`] (rlagent stats, rlctl stats).
pub fn table(stats: &Stats) -> String {
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
    // Memory and pids columns of a controller that is not enabled for the cgroup show
    // "-", never "max": the limit is not in force, which is not the same as no limit.
    // (CPU usage comes from the core and is always there.)
    let dash = || "-".to_string();
    for t in &stats.targets {
        let c = &t.cgroup;
        let cpu = c.cpu.unwrap_or_default();
        let (mem, pids) = (c.memory.as_ref(), c.pids.as_ref());
        let _ = writeln!(
            out,
            "{:<22} {:>5} {:>9.2} {:>9} {:>9} {:>9} {:>8} {:>5} {:>5} {:>6}",
            t.target,
            c.procs,
            cpu.usage_usec as f64 / 1e6,
            cpu.nr_throttled,
            mem.map_or_else(dash, |m| mib(m.current)),
            mem.map_or_else(dash, |m| m.max.map_or("max".to_string(), mib)),
            mem.map_or_else(dash, |m| m.events_oom_kill.to_string()),
            pids.map_or_else(dash, |p| p.current.to_string()),
            pids.map_or_else(dash, |p| p.max.map_or("max".to_string(), |m| m.to_string())),
            pids.map_or_else(dash, |p| p.events_max.to_string())
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
