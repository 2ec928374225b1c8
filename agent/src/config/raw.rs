//! The config file as serde reads it: every key, with its default and its span (for line
//! numbers in errors). Validation is in the section modules beside this one.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::model::{
    alert::{Op, Stat},
    layout::DriverSetting,
    quota::IntOrString,
    quota::OnFull,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default = "default_cgroup_root")]
    pub(super) cgroup_root: Spanned<String>,
    #[serde(default = "default_cgroup_driver")]
    pub(super) cgroup_driver: DriverSetting,
    #[serde(default = "default_state_path")]
    pub(super) state_path: PathBuf,
    #[serde(default)]
    pub(super) bpf: RawBpf,
    #[serde(default)]
    pub(super) control: RawControl,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default, rename = "group")]
    pub(super) groups: Vec<Spanned<RawGroup>>,
    #[serde(default, rename = "quota")]
    pub(super) quotas: Vec<Spanned<RawQuotaEntry>>,
    #[serde(default)]
    pub(super) alerts: RawAlerts,
    #[serde(default, rename = "alert")]
    pub(super) alert_rules: Vec<Spanned<RawAlertRule>>,
    #[serde(default, rename = "adapt")]
    pub(super) adapt_rules: Vec<Spanned<RawAdaptRule>>,
    #[serde(default, rename = "penalty")]
    pub(super) penalty_rules: Vec<Spanned<RawPenaltyRule>>,
    #[serde(default)]
    pub(super) penalty_webhook: Option<Spanned<RawWebhook>>,
}

/// `[penalty_webhook]`: where Alertmanager delivers the fleet's penalty decisions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) listen: Spanned<String>,
    pub(super) token_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub(super) max_duration: Option<Spanned<String>>,
}

/// A drop-in (`rlagent.d/*.toml`): only what a fleet layers over the main file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDropIn {
    #[serde(default, rename = "group")]
    pub(super) groups: Vec<Spanned<RawGroup>>,
    #[serde(default, rename = "quota")]
    pub(super) quotas: Vec<Spanned<RawQuotaEntry>>,
    #[serde(default, rename = "alert")]
    pub(super) alert_rules: Vec<Spanned<RawAlertRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlerts {
    #[serde(default = "default_true")]
    pub(super) defaults: bool,
    #[serde(default = "default_alert_interval")]
    pub(super) interval: Spanned<String>,
    #[serde(default)]
    pub(super) alertmanager_url: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) instance: Option<Spanned<String>>,
    #[serde(default = "default_labels")]
    pub(super) labels: Spanned<std::collections::BTreeMap<String, String>>,
}
impl Default for RawAlerts {
    fn default() -> Self {
        Self {
            defaults: true,
            interval: default_alert_interval(),
            alertmanager_url: None,
            instance: None,
            labels: default_labels(),
        }
    }
}
fn default_labels() -> Spanned<std::collections::BTreeMap<String, String>> {
    Spanned::new(0..0, Default::default())
}
fn default_true() -> bool {
    true
}
fn default_alert_interval() -> Spanned<String> {
    Spanned::new(0..0, "15s".to_string())
}

/// `[[alert]]`: a rule of the alert engine.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlertRule {
    pub(super) name: String,
    pub(super) stat: Stat,
    pub(super) op: Op,
    pub(super) threshold: f64,
    #[serde(default, rename = "for")]
    pub(super) for_duration: Option<String>,
    #[serde(default)]
    pub(super) window: Option<String>,
    #[serde(default = "default_severity")]
    pub(super) severity: String,
    pub(super) summary: String,
}
fn default_severity() -> String {
    "warning".to_string()
}

fn default_cgroup_driver() -> DriverSetting {
    DriverSetting::Auto
}
fn default_cgroup_root() -> Spanned<String> {
    Spanned::new(0..0, "rlagent.slice".to_string())
}
fn default_state_path() -> PathBuf {
    PathBuf::from("/var/lib/rlagent/state.json")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBpf {
    #[serde(default = "default_attach")]
    pub(super) attach_cgroup: Spanned<String>,
    #[serde(default = "default_pin_path")]
    pub(super) pin_path: PathBuf,
    #[serde(default)]
    pub(super) count_udp: bool,
    #[serde(default)]
    pub(super) host_conns: Option<Spanned<IntOrString>>,
    #[serde(default = "default_uid_min")]
    pub(super) uid_min: u32,
    #[serde(default = "default_deny_errno")]
    pub(super) deny_errno: Spanned<String>,
    #[serde(default = "default_max_tracked_sockets")]
    pub(super) max_tracked_sockets: Spanned<i64>,
    #[serde(default)]
    pub(super) on_full: OnFull,
    #[serde(default)]
    pub(super) mode: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) event_rate: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) event_burst: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) subordinate_uids: Option<Spanned<String>>,
    #[serde(default = "default_subuid_file")]
    pub(super) subuid_file: PathBuf,
    #[serde(default)]
    pub(super) uid_retire_interval: Option<Spanned<String>>,
}

impl Default for RawBpf {
    fn default() -> Self {
        Self {
            attach_cgroup: default_attach(),
            pin_path: default_pin_path(),
            count_udp: false,
            host_conns: None,
            uid_min: default_uid_min(),
            deny_errno: default_deny_errno(),
            max_tracked_sockets: default_max_tracked_sockets(),
            on_full: OnFull::Deny,
            mode: None,
            event_rate: None,
            event_burst: None,
            subordinate_uids: None,
            subuid_file: default_subuid_file(),
            uid_retire_interval: None,
        }
    }
}

fn default_attach() -> Spanned<String> {
    Spanned::new(0..0, "/".to_string())
}
fn default_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/rlagent")
}
fn default_subuid_file() -> PathBuf {
    PathBuf::from("/etc/subuid")
}
fn default_uid_min() -> u32 {
    1000
}
fn default_max_tracked_sockets() -> Spanned<i64> {
    Spanned::new(0..0, i64::from(rlagent_common::DEFAULT_MAX_TRACKED_SOCKETS))
}
fn default_deny_errno() -> Spanned<String> {
    Spanned::new(0..0, "EPERM".to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    #[serde(default = "default_socket")]
    pub(super) socket: PathBuf,
    #[serde(default = "default_socket_mode")]
    pub(super) mode: Spanned<String>,
    #[serde(default = "default_control_group")]
    pub(super) group: String,
    #[serde(default)]
    pub(super) operator_cgroups: Vec<Spanned<String>>,
}
impl Default for RawControl {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            mode: default_socket_mode(),
            group: default_control_group(),
            operator_cgroups: Vec::new(),
        }
    }
}
fn default_socket_mode() -> Spanned<String> {
    Spanned::new(0..0, "0660".to_string())
}
fn default_control_group() -> String {
    "rlagent".to_string()
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/rlagent/rlagent.sock")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    #[serde(default = "default_listen")]
    pub(super) listen: Spanned<String>,
}
impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}
fn default_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:9464".to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    pub(super) name: String,
    #[serde(default)]
    pub(super) uids: Vec<u32>,
    #[serde(default)]
    pub(super) gids: Vec<u32>,
    #[serde(default)]
    pub(super) comms: Vec<String>,
    #[serde(default)]
    pub(super) exes: Vec<PathBuf>,
}

/// `[[adapt]]`: a step that tightens a target's quota while host pressure holds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdaptRule {
    pub(super) name: Spanned<String>,
    pub(super) when: Spanned<String>,
    #[serde(rename = "for")]
    pub(super) hold: Spanned<String>,
    pub(super) release_after: Spanned<String>,
    pub(super) target: Spanned<String>,
    #[serde(default)]
    pub(super) mode: Option<Spanned<String>>,
    pub(super) cpu: Option<IntOrString>,
    pub(super) memory: Option<IntOrString>,
    pub(super) memory_high: Option<IntOrString>,
    pub(super) pids: Option<IntOrString>,
    pub(super) conns: Option<IntOrString>,
    pub(super) conn_rate: Option<IntOrString>,
    pub(super) conn_burst: Option<IntOrString>,
}

/// `[[penalty]]` with its `[[penalty.tier]]`s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPenaltyRule {
    pub(super) name: Spanned<String>,
    pub(super) when: Spanned<String>,
    pub(super) window: Spanned<String>,
    #[serde(default = "no_exemptions")]
    pub(super) exempt: Spanned<Vec<String>>,
    #[serde(default)]
    pub(super) mode: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) forgive_after: Option<Spanned<String>>,
    #[serde(default, rename = "tier")]
    pub(super) tiers: Vec<Spanned<RawTier>>,
}

fn no_exemptions() -> Spanned<Vec<String>> {
    Spanned::new(0..0, Vec::new())
}

/// `[[penalty.tier]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTier {
    pub(super) duration: Spanned<String>,
    pub(super) cpu: Option<IntOrString>,
    pub(super) memory: Option<IntOrString>,
    pub(super) memory_high: Option<IntOrString>,
    pub(super) pids: Option<IntOrString>,
    pub(super) conns: Option<IntOrString>,
    pub(super) conn_rate: Option<IntOrString>,
    pub(super) conn_burst: Option<IntOrString>,
}

/// The limits of a step (`[[adapt]]`) or a tier, as the quota parser takes them (no
/// `mode`: the rule says it).
macro_rules! step_limits {
    ($($raw:ty),*) => {$(
        impl $raw {
            pub(super) fn limits(&self) -> crate::model::quota::RawQuota {
                crate::model::quota::RawQuota {
                    cpu: self.cpu.clone(),
                    memory: self.memory.clone(),
                    memory_high: self.memory_high.clone(),
                    pids: self.pids.clone(),
                    conns: self.conns.clone(),
                    conn_rate: self.conn_rate.clone(),
                    conn_burst: self.conn_burst.clone(),
                    mode: None,
                }
            }
        }
    )*};
}
step_limits!(RawAdaptRule, RawTier);

/// `[[quota]]`: a target and the quota fields (spelled out, since serde's `flatten` cannot
/// be combined with `deny_unknown_fields`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuotaEntry {
    pub(super) target: String,
    pub(super) cpu: Option<IntOrString>,
    pub(super) memory: Option<IntOrString>,
    pub(super) memory_high: Option<IntOrString>,
    pub(super) pids: Option<IntOrString>,
    pub(super) conns: Option<IntOrString>,
    pub(super) conn_rate: Option<IntOrString>,
    pub(super) conn_burst: Option<IntOrString>,
    pub(super) mode: Option<IntOrString>,
}
