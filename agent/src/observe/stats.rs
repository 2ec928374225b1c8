//! The one stats model: every target's cgroup usage and every UID's connection counters,
//! served as JSON over the control socket, as Prometheus text on /metrics, as a table by
//! rlctl and `rlagent stats`, and evaluated by the alert engine.

use serde::{Deserialize, Serialize};

use crate::model::usage::{CgroupStats, HostConnStats, ProgramStats, UidConnStats};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetStats {
    /// `group:<name>`, `user:<uid>` or `cgroup:<path>`.
    pub target: String,
    #[serde(flatten)]
    pub cgroup: CgroupStats,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// Runtime `cgroup:<path>` targets skipped because their cgroup is gone.
    #[serde(default)]
    pub skipped_targets: usize,
    /// Pins of the agent's programs and maps that are gone (`None` outside the agent).
    #[serde(default)]
    pub pins_missing: Option<usize>,
    /// Connections refused because a budget was exhausted, by budget (see
    /// `observe::budget`); empty outside the agent.
    #[serde(default)]
    pub budget_exhausted: std::collections::BTreeMap<String, u64>,
    /// Run counts of the kernel programs, when the kernel keeps them
    /// (`kernel.bpf_stats_enabled`); empty otherwise.
    #[serde(default)]
    pub programs: Vec<ProgramStats>,
}

impl Stats {
    /// Keeps only what `keep` accepts, by target name (`user:<uid>` for connections).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.targets.retain(|t| keep(&t.target));
        self.conns.retain(|c| keep(&format!("user:{}", c.uid)));
    }
}
