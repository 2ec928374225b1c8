//! The agent's status as `rlctl status` shows it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::feature::KernelFeature;

/// The agent's status (`rlctl status`). Callers who may read only their own UID's data
/// get the first three fields; the host's layout is for root and operators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: u64,
    pub kernel: String,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostStatus>,
}

/// Where the agent attaches, pins and reads its config, and what it enforces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    /// The cgroup driver in use: `systemd` or `cgroupfs`.
    #[serde(default)]
    pub cgroup_driver: String,
    pub cgroup2_mount: PathBuf,
    pub cgroup_controllers: Vec<String>,
    pub bpf_attach_cgroup: PathBuf,
    pub bpf_pin_path: PathBuf,
    pub config: PathBuf,
    pub targets: usize,
    pub alerts_firing: usize,
    /// Runtime `cgroup:<path>` targets skipped because their cgroup is gone.
    #[serde(default)]
    pub skipped_targets: Vec<String>,
    /// Pins of the agent's programs and maps that are gone: a program whose link pin is
    /// gone is detached; a map whose pin is gone loses its counts at the next start.
    #[serde(default)]
    pub pins_missing: Vec<PathBuf>,
    /// The kernel features probed at start, and what each one's absence turns off.
    #[serde(default)]
    pub kernel_features: Vec<KernelFeature>,
    /// How the adaptive rules and penalties read their input (`None`: there are none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt_input: Option<String>,
}
