//! Measured usage and limits: what the kernel adapters read and the Stats model carries.
//! Plain data, no I/O.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::reason::Reason;

/// From `cpu.stat`. Usage fields come from the core (always present); throttling fields
/// only when the cpu controller is enabled for the cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuStats {
    pub usage_usec: u64,
    pub user_usec: u64,
    pub system_usec: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_usec: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    pub current: u64,
    /// `memory.peak` (Linux >= 5.19), `None` where absent.
    pub peak: Option<u64>,
    /// `None` = no limit.
    pub max: Option<u64>,
    pub high: Option<u64>,
    /// `memory.events`.
    pub events_high: u64,
    pub events_max: u64,
    pub events_oom: u64,
    pub events_oom_kill: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidsStats {
    pub current: u64,
    /// `None` = no limit.
    pub max: Option<u64>,
    /// Forks refused because of pids.max (`pids.events` max).
    pub events_max: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    /// Share of time some task stalled, over 10 s, 60 s and 300 s (percent).
    pub some_avg10: f64,
    pub some_avg60: f64,
    pub some_avg300: f64,
    /// Total stall time (µs).
    pub some_total_usec: u64,
    /// The same for all non-idle tasks stalled at once (`full`); absent for cpu on old kernels.
    pub full_total_usec: Option<u64>,
    /// `full`'s averages over 10 s, 60 s and 300 s (percent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_avg: Option<[f64; 3]>,
}

/// How much of each cgroup's stats to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Everything (`rlctl stats`, /metrics).
    All,
    /// CPU, memory and pids, what the alert rules read: no pressure and no process count
    /// (`procs` is 0). With 1,000 groups, reading their PSI and process lists in each alert
    /// round (every 15 s) was 35% of an idle agent's CPU samples (`perf`).
    Limits,
}

/// Usage and limits of one cgroup, as the agent reports them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CgroupStats {
    pub cgroup: PathBuf,
    /// Processes in the cgroup (0 when read with [`Detail::Limits`]).
    pub procs: usize,
    pub cpu: Option<CpuStats>,
    /// (quota_us, period_us); `None` = no CPU limit.
    pub cpu_max: Option<(u64, u64)>,
    pub memory: Option<MemoryStats>,
    pub pids: Option<PidsStats>,
    pub cpu_pressure: Option<Pressure>,
    pub memory_pressure: Option<Pressure>,
}

/// connect() calls by the reason a limit gave (the programs' `reason::*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByReason {
    /// The UID's own cap or the `user:*` default.
    pub cap: u64,
    pub host_cap: u64,
    /// The UID's connection rate.
    pub rate: u64,
    /// The group's cap.
    pub group: u64,
    pub group_rate: u64,
    /// A kernel map was full.
    pub full: u64,
}

impl ByReason {
    /// From the programs' counters, indexed by `reason::*`.
    pub fn from_counters(c: [u64; rlagent_common::reason::COUNT]) -> Self {
        let [cap, host_cap, rate, group, group_rate, full] = c;
        Self {
            cap,
            host_cap,
            rate,
            group,
            group_rate,
            full,
        }
    }

    /// The count of one reason.
    pub fn get(&self, reason: Reason) -> u64 {
        match reason {
            Reason::Cap => self.cap,
            Reason::HostCap => self.host_cap,
            Reason::Rate => self.rate,
            Reason::Group => self.group,
            Reason::GroupRate => self.group_rate,
            Reason::Full => self.full,
        }
    }

    /// (reason, count), in the programs' order.
    pub fn iter(&self) -> [(Reason, u64); rlagent_common::reason::COUNT] {
        Reason::ALL.map(|r| (r, self.get(r)))
    }

    pub fn total(&self) -> u64 {
        self.iter().iter().map(|(_, n)| n).sum()
    }
}

/// A token bucket as the programs hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateStats {
    /// Nanoseconds per token.
    pub interval_ns: u64,
    pub burst: u64,
    /// Tokens in the bucket now.
    pub tokens: u64,
}

/// Connection limits and counters of one UID.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UidConnStats {
    pub uid: u32,
    pub live: u64,
    /// `None` = no cap.
    pub cap: Option<u64>,
    /// `None` = no rate limit.
    #[serde(default)]
    pub rate: Option<RateStats>,
    /// The UID's limits only report (monitor mode).
    #[serde(default)]
    pub monitor: bool,
    pub admitted: u64,
    #[serde(default)]
    pub denied: ByReason,
    #[serde(default)]
    pub would_deny: ByReason,
    /// Denials whose event was not sent (over the event rate, or the ring was full).
    #[serde(default)]
    pub events_dropped: u64,
}

/// Connection limits and counters of one group (all its processes together).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupConnStats {
    pub group: String,
    pub live: u64,
    pub cap: Option<u64>,
    pub rate: Option<RateStats>,
    pub monitor: bool,
    pub admitted: u64,
    /// Only `group` and `group_rate` are counted per group.
    pub denied: ByReason,
    pub would_deny: ByReason,
}

/// Host-wide connection counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostConnStats {
    pub live: u64,
    /// The host cap (`[bpf] host_conns`), if there is one.
    #[serde(default)]
    pub cap: Option<u64>,
    /// connect() calls let through uncounted: UIDs without a cap over their share of the
    /// maps, or capped ones when a map was full and `on_full = "allow"`.
    pub untracked: u64,
    /// connect() calls of capped UIDs denied because a map was full (`on_full = "deny"`).
    #[serde(default)]
    pub denied_full: u64,
    /// Denial events lost because the ring buffer was full.
    #[serde(default)]
    pub events_lost: u64,
    /// Map inserts and deletes the kernel refused to the programs even when tried again.
    #[serde(default)]
    pub map_errors: u64,
    /// How full each kernel map is.
    #[serde(default)]
    pub maps: Vec<MapFill>,
    /// The host cap is in monitor mode.
    #[serde(default)]
    pub monitor: bool,
    /// Some group has connection limits (the programs look for groups).
    #[serde(default)]
    pub group_limits: bool,
}

/// Entries in one kernel map against its capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapFill {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

impl MapFill {
    pub fn ratio(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            self.entries as f64 / self.capacity as f64
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramStats {
    pub program: String,
    pub runs: u64,
    pub run_seconds: f64,
}
