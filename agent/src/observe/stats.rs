//! The one stats model: every target's cgroup usage and every UID's connection counters,
//! served as JSON over the control socket, as Prometheus text on /metrics, as a table by
//! rlctl and `rlagent stats`, and evaluated by the alert engine.

use serde::{Deserialize, Serialize};

use super::adapt::Penalty;
use crate::model::usage::{CgroupStats, GroupConnStats, HostConnStats, ProgramStats, UidConnStats};

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
    /// Groups with connection limits (and groups whose limits were removed while
    /// connections charged to them are open).
    #[serde(default)]
    pub groups: Vec<GroupConnStats>,
    /// `None` when the programs are not installed.
    #[serde(default)]
    pub host: Option<HostConnStats>,
    /// Denial events received by the agent, by (uid, reason, monitor); empty outside the
    /// agent.
    #[serde(default, with = "received")]
    pub events_received: crate::observe::events::Received,
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
    /// Penalised users now (with monitor-mode ones).
    #[serde(default)]
    pub penalties: Vec<Penalty>,
    /// Penalties entered since the agent started, by rule and tier.
    #[serde(default)]
    pub penalties_entered: Vec<PenaltyCount>,
    /// Every `[[adapt]]` rule, and whether its step holds.
    #[serde(default)]
    pub adapt: Vec<AdaptState>,
    /// Requests to the penalty webhook refused, by reason.
    #[serde(default)]
    pub webhook_refused: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PenaltyCount {
    pub rule: String,
    pub tier: usize,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdaptState {
    pub rule: String,
    pub holding: bool,
    /// The rule only reports (`mode = "monitor"`).
    #[serde(default)]
    pub monitor: bool,
}

impl Stats {
    /// Keeps only what `keep` accepts, by target name (`user:<uid>` for connections).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.targets.retain(|t| keep(&t.target));
        self.conns.retain(|c| keep(&format!("user:{}", c.uid)));
        self.groups.retain(|g| keep(&format!("group:{}", g.group)));
        self.events_received
            .retain(|(uid, _, _), _| keep(&format!("user:{uid}")));
        self.penalties.retain(|p| keep(&p.target));
    }
}

/// The received-events map as a list of objects (JSON object keys must be strings).
mod received {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::{model::reason::Reason, observe::events::Received};

    #[derive(Serialize, Deserialize)]
    struct Count {
        uid: u32,
        reason: Reason,
        monitor: bool,
        count: u64,
    }

    pub fn serialize<S: Serializer>(r: &Received, s: S) -> Result<S::Ok, S::Error> {
        let list: Vec<Count> = r
            .iter()
            .map(|((uid, reason, monitor), count)| Count {
                uid: *uid,
                reason: *reason,
                monitor: *monitor,
                count: *count,
            })
            .collect();
        list.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Received, D::Error> {
        let list = Vec::<Count>::deserialize(d)?;
        Ok(list
            .into_iter()
            .map(|c| ((c.uid, c.reason, c.monitor), c.count))
            .collect())
    }
}
