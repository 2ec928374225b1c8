//! The agent's TOML config (design.md, "Interface"). Unknown keys are errors that name the
//! line; a config with any invalid entry is refused whole.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    quota::{IntOrString, Quota, QuotaError, RawQuota},
    target::{Target, TargetError},
};

/// Where the agent looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rlagent/rlagent.toml";

/// The config used when there is no file at [`DEFAULT_CONFIG_PATH`]: host-wide attach,
/// default socket and metrics address, no quotas.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-config.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}, line {line}: quota for {target:?}: {source}")]
    Quota {
        path: PathBuf,
        line: usize,
        target: String,
        #[source]
        source: QuotaError,
    },
    #[error("config {path}, line {line}: {source}")]
    Target {
        path: PathBuf,
        line: usize,
        #[source]
        source: TargetError,
    },
    #[error("config {path}, line {line}: {field} = {value:?}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        field: &'static str,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_cgroup_root")]
    cgroup_root: Spanned<String>,
    #[serde(default = "default_state_path")]
    state_path: PathBuf,
    #[serde(default)]
    bpf: RawBpf,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default, rename = "group")]
    groups: Vec<Spanned<RawGroup>>,
    #[serde(default, rename = "quota")]
    quotas: Vec<Spanned<RawQuotaEntry>>,
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default, rename = "alert")]
    alert_rules: Vec<Spanned<RawAlertRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    #[serde(default = "default_true")]
    defaults: bool,
    #[serde(default = "default_alert_interval")]
    interval: Spanned<String>,
    #[serde(default)]
    alertmanager_url: Option<Spanned<String>>,
}
impl Default for RawAlerts {
    fn default() -> Self {
        Self {
            defaults: true,
            interval: default_alert_interval(),
            alertmanager_url: None,
        }
    }
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
struct RawAlertRule {
    name: String,
    stat: crate::alerts::Stat,
    op: crate::alerts::Op,
    threshold: f64,
    #[serde(default, rename = "for")]
    for_duration: Option<String>,
    #[serde(default)]
    window: Option<String>,
    #[serde(default = "default_severity")]
    severity: String,
    summary: String,
}
fn default_severity() -> String {
    "warning".to_string()
}

/// `30s`, `5m`, `1h`, or `0`.
fn parse_duration(text: &str) -> Option<std::time::Duration> {
    if text == "0" {
        return Some(std::time::Duration::ZERO);
    }
    let (number, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = number.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(secs))
}

fn default_cgroup_root() -> Spanned<String> {
    Spanned::new(0..0, "rlagent.slice".to_string())
}
fn default_state_path() -> PathBuf {
    PathBuf::from("/var/lib/rlagent/state.json")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBpf {
    #[serde(default = "default_attach")]
    attach_cgroup: Spanned<String>,
    #[serde(default = "default_pin_path")]
    pin_path: PathBuf,
    #[serde(default)]
    count_udp: bool,
    #[serde(default)]
    host_conns: Option<Spanned<IntOrString>>,
    #[serde(default = "default_uid_min")]
    uid_min: u32,
    #[serde(default = "default_deny_errno")]
    deny_errno: Spanned<String>,
    #[serde(default = "default_max_tracked_sockets")]
    max_tracked_sockets: Spanned<i64>,
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
        }
    }
}

fn default_attach() -> Spanned<String> {
    Spanned::new(0..0, "/".to_string())
}
fn default_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/rlagent")
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
struct RawControl {
    #[serde(default = "default_socket")]
    socket: PathBuf,
    #[serde(default = "default_socket_mode")]
    mode: Spanned<String>,
    #[serde(default = "default_admin_group")]
    group: String,
}
impl Default for RawControl {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            mode: default_socket_mode(),
            group: default_admin_group(),
        }
    }
}
fn default_socket_mode() -> Spanned<String> {
    Spanned::new(0..0, "0660".to_string())
}
fn default_admin_group() -> String {
    "rlagent".to_string()
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/rlagent/rlagent.sock")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(default = "default_listen")]
    listen: Spanned<String>,
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
struct RawGroup {
    name: String,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    #[serde(default)]
    comms: Vec<String>,
    #[serde(default)]
    exes: Vec<PathBuf>,
}

/// `[[quota]]`: a target and the quota fields (spelled out, since serde's `flatten` cannot
/// be combined with `deny_unknown_fields`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotaEntry {
    target: String,
    cpu: Option<IntOrString>,
    memory: Option<IntOrString>,
    memory_high: Option<IntOrString>,
    pids: Option<IntOrString>,
    conns: Option<IntOrString>,
    conn_rate: Option<IntOrString>,
    conn_burst: Option<IntOrString>,
}

/// Validated `[bpf]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfConfig {
    /// Relative to the cgroup2 mount; empty = the mount's root (host-wide).
    pub attach_cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub count_udp: bool,
    /// Host-wide cap on live connections; `None` = none.
    pub host_conns: Option<u64>,
    /// UIDs below this get no `user:*` default.
    pub uid_min: u32,
    /// errno for a denied connect(), positive.
    pub deny_errno: i32,
    /// Size of the charged-socket map (fixed when the map is first created).
    pub max_tracked_sockets: u32,
}

/// A `[[group]]` placement rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRule {
    pub name: String,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub comms: Vec<String>,
    pub exes: Vec<PathBuf>,
}

/// A validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the config came from (a path, or `<embedded default>`).
    pub source: PathBuf,
    pub cgroup_root: PathBuf,
    pub state_path: PathBuf,
    pub bpf: BpfConfig,
    pub control_socket: PathBuf,
    /// Permission bits of the socket file (who may connect at all).
    pub control_mode: u32,
    /// Members of this group may change quotas through the socket, like root.
    pub control_group: String,
    pub metrics_listen: SocketAddr,
    pub groups: Vec<GroupRule>,
    pub quotas: BTreeMap<Target, Quota>,
    /// The alert engine's rules (the defaults unless `[alerts] defaults = false`, then
    /// every `[[alert]]`).
    pub alert_rules: Vec<crate::alerts::Rule>,
    pub alert_interval: std::time::Duration,
    /// Where firing and resolved alerts are POSTed, if anywhere.
    pub alertmanager: Option<crate::alerts::alertmanager::Target>,
}

/// Connect errnos an operator may choose; each makes sense to a program that connect()s.
const DENY_ERRNOS: &[(&str, i32)] = &[
    ("EPERM", libc::EPERM),
    ("EACCES", libc::EACCES),
    ("ECONNREFUSED", libc::ECONNREFUSED),
    ("EAGAIN", libc::EAGAIN),
    ("ENOBUFS", libc::ENOBUFS),
    ("ENETUNREACH", libc::ENETUNREACH),
    ("EHOSTUNREACH", libc::EHOSTUNREACH),
];

impl Config {
    /// Loads `path`; with `None`, [`DEFAULT_CONFIG_PATH`] or, when that file does not
    /// exist, the embedded default.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => return Self::embedded_default(),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::parse(EMBEDDED_DEFAULT, Path::new("<embedded default>"))
    }

    /// Parses and validates a whole config; the first error refuses it.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let line_of = |span: std::ops::Range<usize>| line_at(text, span.start);
        let invalid = |line, field, value: &str, reason: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        };

        let cgroup_root = relative_cgroup_path(raw.cgroup_root.get_ref()).ok_or_else(|| {
            invalid(
                line_of(raw.cgroup_root.span()),
                "cgroup_root",
                raw.cgroup_root.get_ref(),
                "expected a child path relative to the cgroup2 mount, without '.' or '..' parts",
            )
        })?;
        if cgroup_root.as_os_str().is_empty() {
            return Err(invalid(
                line_of(raw.cgroup_root.span()),
                "cgroup_root",
                raw.cgroup_root.get_ref(),
                "the agent's subtree cannot be the cgroup2 root",
            ));
        }
        let attach = &raw.bpf.attach_cgroup;
        let attach_cgroup = relative_cgroup_path(attach.get_ref()).ok_or_else(|| {
            invalid(
                line_of(attach.span()),
                "attach_cgroup",
                attach.get_ref(),
                "expected \"/\" or a path relative to the cgroup2 mount, without '.' or '..' parts",
            )
        })?;
        let host_conns = match &raw.bpf.host_conns {
            None => None,
            Some(v) => crate::quota::parse_count("host_conns", &v.get_ref().to_string(), 0)
                .map_err(|e| {
                    invalid(
                        line_of(v.span()),
                        "host_conns",
                        &v.get_ref().to_string(),
                        &e.to_string(),
                    )
                })?
                .value(),
        };
        let errno_name = raw.bpf.deny_errno.get_ref();
        let deny_errno = DENY_ERRNOS
            .iter()
            .find(|(name, _)| name == errno_name)
            .map(|(_, errno)| *errno)
            .ok_or_else(|| {
                let names: Vec<&str> = DENY_ERRNOS.iter().map(|(n, _)| *n).collect();
                invalid(
                    line_of(raw.bpf.deny_errno.span()),
                    "deny_errno",
                    errno_name,
                    &format!("expected one of {}", names.join(", ")),
                )
            })?;
        let max_sockets = &raw.bpf.max_tracked_sockets;
        let max_tracked_sockets = u32::try_from(*max_sockets.get_ref())
            .ok()
            .filter(|n| (1024..=1 << 24).contains(n))
            .ok_or_else(|| {
                invalid(
                    line_of(max_sockets.span()),
                    "max_tracked_sockets",
                    &max_sockets.get_ref().to_string(),
                    "expected a whole number from 1024 to 16777216",
                )
            })?;
        if !raw.bpf.pin_path.is_absolute() {
            return Err(invalid(
                0,
                "pin_path",
                &raw.bpf.pin_path.display().to_string(),
                "must be absolute",
            ));
        }
        let mode = &raw.control.mode;
        let control_mode = u32::from_str_radix(mode.get_ref(), 8)
            .ok()
            .filter(|m| *m <= 0o777 && mode.get_ref().len() >= 3)
            .ok_or_else(|| {
                invalid(
                    line_of(mode.span()),
                    "mode",
                    mode.get_ref(),
                    "expected octal permission bits such as \"0660\"",
                )
            })?;
        let metrics_listen = raw.metrics.listen.get_ref().parse().map_err(|_| {
            invalid(
                line_of(raw.metrics.listen.span()),
                "listen",
                raw.metrics.listen.get_ref(),
                "expected an address:port such as 127.0.0.1:9464",
            )
        })?;

        let mut groups = Vec::new();
        for group in &raw.groups {
            let line = line_of(group.span());
            let g = group.get_ref();
            match g.name.parse::<Target>() {
                Ok(Target::Group(name)) => groups.push(GroupRule {
                    name,
                    uids: g.uids.clone(),
                    gids: g.gids.clone(),
                    comms: g.comms.clone(),
                    exes: g.exes.clone(),
                }),
                Ok(_) => {
                    return Err(invalid(
                        line,
                        "name",
                        &g.name,
                        "a group name cannot have a kind prefix",
                    ))
                }
                Err(source) => {
                    return Err(ConfigError::Target {
                        path: path.to_path_buf(),
                        line,
                        source,
                    })
                }
            }
        }

        let mut quotas = BTreeMap::new();
        for entry in &raw.quotas {
            let line = line_of(entry.span());
            let e = entry.get_ref();
            let target = e
                .target
                .parse::<Target>()
                .and_then(Target::resolve_user)
                .map_err(|source| ConfigError::Target {
                    path: path.to_path_buf(),
                    line,
                    source,
                })?;
            let raw_quota = RawQuota {
                cpu: e.cpu.clone(),
                memory: e.memory.clone(),
                memory_high: e.memory_high.clone(),
                pids: e.pids.clone(),
                conns: e.conns.clone(),
                conn_rate: e.conn_rate.clone(),
                conn_burst: e.conn_burst.clone(),
            };
            let quota = raw_quota.validate().map_err(|source| ConfigError::Quota {
                path: path.to_path_buf(),
                line,
                target: e.target.clone(),
                source,
            })?;
            if quotas.insert(target.clone(), quota).is_some() {
                return Err(invalid(
                    line,
                    "target",
                    &e.target,
                    &format!("{target} already has a quota earlier in this file"),
                ));
            }
        }

        let interval = &raw.alerts.interval;
        let alert_interval = parse_duration(interval.get_ref())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                invalid(
                    line_of(interval.span()),
                    "interval",
                    interval.get_ref(),
                    "expected a duration such as 15s or 1m",
                )
            })?;
        let alertmanager = match &raw.alerts.alertmanager_url {
            None => None,
            Some(url) => Some(
                crate::alerts::alertmanager::parse_url(url.get_ref()).ok_or_else(|| {
                    invalid(
                        line_of(url.span()),
                        "alertmanager_url",
                        url.get_ref(),
                        "expected http://host:port or http://host:port/prefix",
                    )
                })?,
            ),
        };
        let mut alert_rules = if raw.alerts.defaults {
            crate::alerts::default_rules()
        } else {
            Vec::new()
        };
        for rule in &raw.alert_rules {
            let line = line_of(rule.span());
            let r = rule.get_ref();
            let duration = |field: &'static str, text: &Option<String>, default: u64| match text {
                None => Ok(std::time::Duration::from_secs(default)),
                Some(t) => parse_duration(t).ok_or_else(|| {
                    invalid(line, field, t, "expected a duration such as 30s, 5m or 1h")
                }),
            };
            if alert_rules.iter().any(|existing| existing.name == r.name) {
                return Err(invalid(
                    line,
                    "name",
                    &r.name,
                    "another alert rule has this name",
                ));
            }
            alert_rules.push(crate::alerts::Rule {
                name: r.name.clone(),
                stat: r.stat,
                op: r.op,
                threshold: r.threshold,
                for_duration: duration("for", &r.for_duration, 0)?,
                window: duration("window", &r.window, 60)?,
                severity: r.severity.clone(),
                summary: r.summary.clone(),
            });
        }

        Ok(Self {
            source: path.to_path_buf(),
            cgroup_root,
            state_path: raw.state_path,
            bpf: BpfConfig {
                attach_cgroup,
                pin_path: raw.bpf.pin_path,
                count_udp: raw.bpf.count_udp,
                host_conns,
                uid_min: raw.bpf.uid_min,
                deny_errno,
                max_tracked_sockets,
            },
            control_socket: raw.control.socket,
            control_mode,
            control_group: raw.control.group,
            metrics_listen,
            groups,
            quotas,
            alert_rules,
            alert_interval,
            alertmanager,
        })
    }
}

/// `"/"` → empty; `"/a/b"` or `"a/b/"` → `a/b`; `None` for `.`/`..`/empty parts.
fn relative_cgroup_path(text: &str) -> Option<PathBuf> {
    let trimmed = text.trim_matches('/');
    let mut path = PathBuf::new();
    if trimmed.is_empty() {
        return text.starts_with('/').then_some(path);
    }
    for part in trimmed.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return None;
        }
        path.push(part);
    }
    Some(path)
}

/// 1-based line of byte `offset` in `text` (0 when the value came from a default).
fn line_at(text: &str, offset: usize) -> usize {
    if offset == 0 && !text.is_empty() && text.starts_with('#') {
        return 0;
    }
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{quota::Limit, target::UserRef};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn embedded_default_is_host_wide_with_no_quotas() {
        let c = Config::embedded_default().unwrap();
        assert_eq!(c.bpf.attach_cgroup, PathBuf::new());
        assert_eq!(c.bpf.pin_path, PathBuf::from("/sys/fs/bpf/rlagent"));
        assert_eq!(c.control_socket, PathBuf::from("/run/rlagent/rlagent.sock"));
        assert_eq!(c.metrics_listen, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(c.cgroup_root, PathBuf::from("rlagent.slice"));
        assert!(c.quotas.is_empty());
        assert_eq!(c.bpf.deny_errno, libc::EPERM);
    }

    #[test]
    fn design_example_parses() {
        let c = parse(
            r#"
cgroup_root = "rlagent.slice"
state_path = "/var/lib/rlagent/state.json"
[bpf]
attach_cgroup = "/"
pin_path = "/sys/fs/bpf/rlagent"
count_udp = true
host_conns = 10000
[control]
socket = "/run/rlagent/rlagent.sock"
[metrics]
listen = "127.0.0.1:9464"
[[group]]
name = "batch"
uids = [65534]
comms = ["stress-*"]
[[quota]]
target = "user:65534"
cpu = "50%"
memory = "2G"
memory_high = "1536M"
pids = 512
conns = 64
conn_rate = "20/s"
conn_burst = 40
[[quota]]
target = "user:*"
conns = 32
[[quota]]
target = "user:root"
conns = "max"
"#,
        )
        .unwrap();
        assert!(c.bpf.count_udp);
        assert_eq!(c.bpf.host_conns, Some(10000));
        assert_eq!(c.groups[0].name, "batch");
        let q = &c.quotas[&Target::User(UserRef::Uid(65534))];
        assert_eq!(q.conns, Some(Limit::Value(64)));
        assert_eq!(q.memory, Some(Limit::Value(2 << 30)));
        assert_eq!(c.quotas[&Target::AllUsers].conns, Some(Limit::Value(32)));
        assert_eq!(
            c.quotas[&Target::User(UserRef::Uid(0))].conns,
            Some(Limit::Max)
        );
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_name_the_line() {
        let e = err("cgroup_root = \"x\"\n[bpf]\nattach = \"/\"\n");
        assert!(e.contains("line 3") && e.contains("attach"), "{e}");
        let e = err("[[quota]]\ntarget = \"user:1\"\nconns = 3\ncpus = \"5%\"\n");
        assert!(e.contains("line 4") && e.contains("cpus"), "{e}");
    }

    #[test]
    fn a_bad_quota_names_line_target_field_and_value() {
        let e = err("[[quota]]\ntarget = \"user:1\"\nconns = 3\n\n[[quota]]\ntarget = \"user:2\"\ncpu = \"fast\"\n");
        assert!(
            e.contains("line 5") && e.contains("user:2") && e.contains("cpu \"fast\""),
            "{e}"
        );
        let e = err("[[quota]]\ntarget = \"user:nobody-at-all-x\"\nconns = 3\n");
        assert!(e.contains("unknown user"), "{e}");
        let e = err("[[quota]]\ntarget = \"user:7\"\nconns = 3\n[[quota]]\ntarget = \"user:7\"\nconns = 4\n");
        assert!(
            e.contains("line 4") && e.contains("already has a quota"),
            "{e}"
        );
    }

    #[test]
    fn bad_bpf_settings_are_refused() {
        let e = err("[bpf]\nattach_cgroup = \"../x\"\n");
        assert!(e.contains("line 2") && e.contains("attach_cgroup"), "{e}");
        let e = err("[bpf]\ndeny_errno = \"ENOPE\"\n");
        assert!(
            e.contains("deny_errno") && e.contains("ECONNREFUSED"),
            "{e}"
        );
        let e = err("[control]\nmode = \"rw\"\n");
        assert!(e.contains("line 2") && e.contains("octal"), "{e}");
        let e = err("[bpf]\nmax_tracked_sockets = 10\n");
        assert!(
            e.contains("line 2") && e.contains("max_tracked_sockets"),
            "{e}"
        );
        let e = err("[bpf]\nhost_conns = -4\n");
        assert!(e.contains("host_conns"), "{e}");
        let e = err("[metrics]\nlisten = \"localhost\"\n");
        assert!(e.contains("listen"), "{e}");
        let e = err("cgroup_root = \"/\"\n");
        assert!(e.contains("cgroup2 root"), "{e}");
        let e = err("[[group]]\nname = \"user:5\"\n");
        assert!(e.contains("kind prefix"), "{e}");
        let e = err("[bpf\n");
        assert!(e.contains("test.toml"), "{e}");
    }

    #[test]
    fn alert_rules_from_the_config_join_the_defaults() {
        let c = parse(
            "[alerts]\ninterval = \"5s\"\n[[alert]]\nname = \"Busy\"\nstat = \"conns_ratio\"\nop = \">=\"\nthreshold = 0.5\nfor = \"2m\"\nsummary = \"{target} busy\"\n",
        )
        .unwrap();
        assert_eq!(c.alert_interval, std::time::Duration::from_secs(5));
        assert_eq!(c.alert_rules.len(), 6);
        let busy = c.alert_rules.last().unwrap();
        assert_eq!(
            (busy.for_duration.as_secs(), busy.severity.as_str()),
            (120, "warning")
        );
        let only = parse("[alerts]\ndefaults = false\n").unwrap();
        assert!(only.alert_rules.is_empty());
        let e = err("[[alert]]\nname = \"X\"\nstat = \"conns_ratio\"\nop = \">\"\nthreshold = 1\nfor = \"soon\"\nsummary = \"s\"\n");
        assert!(e.contains("line 1") && e.contains("for = \"soon\""), "{e}");
        let e = err("[[alert]]\nname = \"X\"\nstat = \"disk\"\nop = \">\"\nthreshold = 1\nsummary = \"s\"\n");
        assert!(
            e.contains("disk") && e.contains("memory_usage_ratio"),
            "{e}"
        );
        let e = err("[[alert]]\nname = \"RlagentOomKill\"\nstat = \"oom_kills\"\nop = \">\"\nthreshold = 1\nsummary = \"s\"\n");
        assert!(e.contains("another alert rule"), "{e}");
        assert!(err("[alerts]\ninterval = \"0\"\n").contains("interval"));
        let e = err("[alerts]\nalertmanager_url = \"am:9093\"\n");
        assert!(
            e.contains("line 2") && e.contains("http://host:port"),
            "{e}"
        );
    }

    #[test]
    fn relative_paths() {
        assert_eq!(relative_cgroup_path("/"), Some(PathBuf::new()));
        assert_eq!(relative_cgroup_path("/a/b/"), Some(PathBuf::from("a/b")));
        assert_eq!(relative_cgroup_path("a"), Some(PathBuf::from("a")));
        assert_eq!(relative_cgroup_path(""), None);
        assert_eq!(relative_cgroup_path("a/./b"), None);
    }
}
