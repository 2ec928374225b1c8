//! The human-readable form of the Stats model (`rlagent stats`, `rlctl stats`).

use std::fmt::Write;

use super::stats::Stats;
use crate::model::{text::escaped, usage::RateStats};

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
            escaped(&t.target),
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
    let uids = stats.conns.iter().map(|c| {
        let row = ConnRow {
            live: c.live,
            cap: c.cap,
            rate: c.rate.as_ref(),
            monitor: c.monitor,
            admitted: c.admitted,
            denied: c.denied.total(),
            would_deny: c.would_deny.total(),
        };
        (format!("{:>10}", c.uid), row)
    });
    conn_table(&mut out, &format!("{:>10}", "UID"), uids);
    let groups = stats.groups.iter().map(|g| {
        let row = ConnRow {
            live: g.live,
            cap: g.cap,
            rate: g.rate.as_ref(),
            monitor: g.monitor,
            admitted: g.admitted,
            denied: g.denied.total(),
            would_deny: g.would_deny.total(),
        };
        (format!("{:>16}", escaped(&g.group)), row)
    });
    conn_table(&mut out, &format!("{:>16}", "GROUP"), groups);
    if out.is_empty() {
        out.push_str("no targets with stats\n");
    }
    out
}
/// One row of a connection table (a UID's or a group's).
struct ConnRow<'a> {
    live: u64,
    cap: Option<u64>,
    rate: Option<&'a RateStats>,
    monitor: bool,
    admitted: u64,
    denied: u64,
    would_deny: u64,
}

/// A table of connection limits and counters, under `first` (the key column's header);
/// nothing when there are no rows.
fn conn_table<'a>(
    out: &mut String,
    first: &str,
    rows: impl Iterator<Item = (String, ConnRow<'a>)>,
) {
    let mut rows = rows.peekable();
    if rows.peek().is_none() {
        return;
    }
    if !out.is_empty() {
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{first} {:>8} {:>8} {:>18} {:>8} {:>10} {:>8} {:>10}",
        "LIVE", "CAP", "RATE", "TOKENS", "ADMITTED", "DENIED", "WOULD_DENY"
    );
    for (key, r) in rows {
        let _ = writeln!(
            out,
            "{key} {:>8} {:>8} {:>18} {:>8} {:>10} {:>8} {:>10}",
            r.live,
            r.cap.map_or("none".to_string(), |v| v.to_string()),
            rate_text(r.rate, r.monitor),
            r.rate
                .map_or_else(|| "-".to_string(), |r| r.tokens.to_string()),
            r.admitted,
            r.denied,
            r.would_deny
        );
    }
}

/// A rate as `20/s b40`, with `(mon)` in monitor mode; `-` for none.
pub fn rate_text(rate: Option<&RateStats>, monitor: bool) -> String {
    let mode = if monitor { " (mon)" } else { "" };
    match rate {
        None if monitor => "- (mon)".to_string(),
        None => "-".to_string(),
        Some(r) => format!(
            "{} b{}{mode}",
            crate::model::units::rate_text(r.interval_ns),
            r.burst
        ),
    }
}
