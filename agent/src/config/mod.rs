// Why this file is long: `Config` and its cross-section checks, drop-in merging and the error
// texts that name file and line; sections validate in their own modules.
//! The agent's TOML config (the README's "Using it"): TOML → validated [`Config`].
//! Unknown keys are errors that name the line; a config with any invalid entry is refused
//! whole. `raw` is what serde reads; each section has its own validator module.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::model::{
    adapt::{AdaptRule, PenaltyRule},
    alert::{AlertmanagerUrl, Rule},
    layout::{Driver, DriverSetting, Layout},
    quota::{ConnRate, Mode, OnFull, Quota, QuotaError},
    subuid::{self, SubordinateRange, SubordinateUids, SubuidError},
    target::{Target, TargetError},
    users::UserDb,
};

mod adapt;
mod alerts;
mod bpf;
mod control;
mod quotas;
mod raw;
pub mod webhook;

/// Where the agent looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rlagent/rlagent.toml";

/// Drop-ins: `*.toml` files in this directory beside the config file, merged over it in
/// name order (`[[quota]]`, `[[group]]` and `[[alert]]` only).
pub const DROP_IN_DIR: &str = "rlagent.d";

/// The largest drop-in read (a drop-in holds a few quotas, groups and rules).
pub const MAX_DROP_IN_BYTES: u64 = 1 << 20;

/// The config used when there is no file at [`DEFAULT_CONFIG_PATH`]: host-wide attach,
/// default socket and metrics address, no quotas.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-config.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse. `message` names the line and column, never quotes the
    /// text (a drop-in could be a link to a secret; the message reaches operators).
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A drop-in that is not read at all, and why: only root's own regular files, reached
    /// directly or through links that stay in the drop-in directory, are read.
    #[error("drop-in {path} refused: {reason}")]
    DropIn { path: PathBuf, reason: String },
    #[error("config {path}, line {line}: quota for {target:?}")]
    Quota {
        path: PathBuf,
        line: usize,
        target: String,
        #[source]
        source: QuotaError,
    },
    #[error("config {path}, line {line}")]
    Target {
        path: PathBuf,
        line: usize,
        #[source]
        source: TargetError,
    },
    #[error("subuid file {path}")]
    Subuid {
        path: PathBuf,
        #[source]
        source: SubuidError,
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
    /// What a capped UID's connect() gets when a map is full.
    pub on_full: OnFull,
    /// The host cap's mode, and the default of every quota's `mode`.
    pub mode: Mode,
    /// Denial events per UID the programs send (more are counted as dropped).
    pub event_rate: ConnRate,
    pub event_burst: u64,
    /// How often the counters of idle UIDs are retired (two rounds make one retirement).
    pub uid_retire_interval: std::time::Duration,
    /// Whom connections under a subordinate UID are charged to.
    pub subordinate_uids: SubordinateUids,
    /// subuid(5) file the ranges come from.
    pub subuid_file: PathBuf,
    /// The ranges read from it (sorted; empty with `separate`, or without the file).
    pub subordinate: Vec<SubordinateRange>,
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
    /// The agent's subtree under the cgroupfs driver (the systemd driver uses
    /// `rlagent.slice`).
    pub cgroup_root: PathBuf,
    /// `cgroup_driver` as written.
    pub cgroup_driver: DriverSetting,
    /// The driver in use: `cgroup_driver` resolved against the host by
    /// [`Config::resolve_driver`] (until then `auto` means cgroupfs).
    pub driver: Driver,
    pub state_path: PathBuf,
    pub bpf: BpfConfig,
    pub control_socket: PathBuf,
    /// Permission bits of the socket file (who may connect at all).
    pub control_mode: u32,
    /// Members of this group are operators: they may change quotas within the limits of
    /// the README's "Security model".
    pub control_group: String,
    /// `cgroup:<path>` targets operators may change (each path and the cgroups below it).
    pub operator_cgroups: Vec<std::path::PathBuf>,
    pub metrics_listen: SocketAddr,
    pub groups: Vec<GroupRule>,
    pub quotas: BTreeMap<Target, Quota>,
    /// The alert engine's rules (the defaults unless `[alerts] defaults = false`, then
    /// every `[[alert]]`).
    pub alert_rules: Vec<Rule>,
    pub alert_interval: std::time::Duration,
    /// Where firing and resolved alerts are POSTed, if anywhere.
    pub alertmanager: Option<AlertmanagerUrl>,
    /// The `instance` label of the alerts sent there (`None`: the host name).
    pub alert_instance: Option<String>,
    /// More labels every alert sent there carries (a fleet's team, site, role...).
    pub alert_labels: BTreeMap<String, String>,
    /// `[[adapt]]`: steps that tighten a target's quota while host pressure holds.
    pub adapt_rules: Vec<AdaptRule>,
    /// `[[penalty]]`: tiers for users whose own usage crosses a threshold.
    pub penalty_rules: Vec<PenaltyRule>,
    /// `[penalty_webhook]`: the fleet's penalty decisions from Alertmanager.
    pub penalty_webhook: Option<webhook::WebhookConfig>,
}

impl Config {
    /// Loads `path`; with `None`, [`DEFAULT_CONFIG_PATH`] or, when that file does not
    /// exist, the embedded default. User names in targets are resolved through `users`.
    pub fn load(path: Option<&Path>, users: &dyn UserDb) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => {
                let mut config = Self::embedded_default()?;
                config.load_subordinate(users)?;
                return Ok(config);
            }
        };
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let mut config = Self::parse(&read(&path)?, &path, users)?;
        for drop_in in Self::drop_ins(&path)? {
            config.merge_drop_in(&read_drop_in(&drop_in)?, &drop_in, users)?;
        }
        config.load_subordinate(users)?;
        Ok(config)
    }

    /// [`Self::load`], but a drop-in that is refused (unreadable, not root's, invalid) is
    /// left out and its error returned beside the config, for the offline commands that
    /// show what is enforced: the running agent refused the same drop-in and kept going.
    pub fn load_skipping_bad_drop_ins(
        path: Option<&Path>,
        users: &dyn UserDb,
    ) -> Result<(Self, Vec<ConfigError>), ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => return Ok((Self::embedded_default()?, Vec::new())),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let mut config = Self::parse(&text, &path, users)?;
        let mut skipped = Vec::new();
        let drop_ins = match Self::drop_ins(&path) {
            Ok(files) => files,
            Err(e) => {
                skipped.push(e);
                Vec::new()
            }
        };
        for drop_in in drop_ins {
            // merge_drop_in changes nothing unless the whole drop-in is valid.
            if let Err(e) =
                read_drop_in(&drop_in).and_then(|text| config.merge_drop_in(&text, &drop_in, users))
            {
                skipped.push(e);
            }
        }
        if let Err(e) = config.load_subordinate(users) {
            skipped.push(e);
        }
        Ok((config, skipped))
    }

    /// Reads the subordinate UID ranges (`[bpf] subuid_file`) when they are charged to
    /// their owners. A missing file means no ranges; an unreadable or malformed one refuses
    /// the config (a reload keeps the ranges it had).
    fn load_subordinate(&mut self, users: &dyn UserDb) -> Result<(), ConfigError> {
        let bpf = &mut self.bpf;
        if bpf.subordinate_uids != SubordinateUids::Owner {
            return Ok(());
        }
        let text = match std::fs::read_to_string(&bpf.subuid_file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::info!(
                        path = %crate::model::text::escaped_path(&bpf.subuid_file),
                        "no subuid file: no subordinate UID ranges"
                    );
                });
                return Ok(());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: bpf.subuid_file.clone(),
                    source,
                })
            }
        };
        let file = subuid::parse(&text, users).map_err(|source| ConfigError::Subuid {
            path: bpf.subuid_file.clone(),
            source,
        })?;
        let path = crate::model::text::escaped_path(&bpf.subuid_file);
        for (line, name, why) in &file.unresolved {
            tracing::warn!(
                %path,
                line,
                user = %crate::model::text::escaped(name),
                "subordinate UID range left out: {why}"
            );
        }
        // Ranges of root and of system users (rootful container engines, LXD, docker's
        // userns-remap) stay separate UIDs: charged to their owner they would escape
        // every limit, since root is charged only with a quota of its own and system
        // users get no `user:*` default.
        let (owned, system): (Vec<_>, Vec<_>) = file
            .ranges
            .into_iter()
            .partition(|r| r.owner != 0 && r.owner >= bpf.uid_min);
        for range in &system {
            tracing::warn!(
                %path,
                %range,
                "a range of root or a system user (below uid_min): its UIDs are charged as themselves"
            );
        }
        bpf.subordinate = owned;
        Ok(())
    }

    /// The drop-in directory of the config file at `path`.
    pub fn drop_in_dir(path: &Path) -> PathBuf {
        path.parent().unwrap_or(Path::new(".")).join(DROP_IN_DIR)
    }

    /// The drop-ins of the config file at `path`, in the order they apply (by name).
    pub fn drop_ins(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
        let dir = Self::drop_in_dir(path);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(ConfigError::Read { path: dir, source }),
        };
        // Directories and dangling links (an editor's lock file) are not drop-ins; anything
        // else named *.toml is, and read_drop_in refuses what is not root's regular file.
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "toml")
                    && std::fs::metadata(p).is_ok_and(|m| !m.is_dir())
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Layers one drop-in over this config: its quotas field by field over the same
    /// targets', its groups beside the others (a name already defined is refused), its
    /// alert rules beside the others (replacing an earlier rule of the same name). Errors
    /// name the drop-in and the line.
    pub fn merge_drop_in(
        &mut self,
        text: &str,
        path: &Path,
        users: &dyn UserDb,
    ) -> Result<(), ConfigError> {
        let raw: raw::RawDropIn = toml::from_str(text).map_err(|e| {
            parse_error(
                path,
                text,
                &e,
                " (a drop-in holds only [[quota]], [[group]] and [[alert]])",
            )
        })?;
        let at = Source { text, path };
        let groups = quotas::groups(&at, &raw.groups)?;
        for (group, raw_group) in groups.iter().zip(&raw.groups) {
            if self.groups.iter().any(|g| g.name == group.name) {
                return Err(at.invalid(
                    at.line(raw_group.span()),
                    "name",
                    &group.name,
                    "this group is already defined by the main file or an earlier drop-in",
                ));
            }
        }
        let quotas = quotas::quotas(&at, &raw.quotas, users)?;
        let mut rules = self.alert_rules.clone();
        alerts::add_rules(&at, &raw.alert_rules, &mut rules, true)?;
        // Everything checked: apply.
        self.groups.extend(groups);
        for (target, quota) in quotas {
            self.quotas.entry(target).or_default().overlay(&quota);
        }
        self.alert_rules = rules;
        Ok(())
    }

    pub fn embedded_default() -> Result<Self, ConfigError> {
        // The embedded default names no users, so no look-up can happen.
        struct NoUsers;
        impl UserDb for NoUsers {
            fn uid(&self, _: &str) -> std::io::Result<Option<u32>> {
                Ok(None)
            }
            fn gid(&self, _: &str) -> std::io::Result<Option<u32>> {
                Ok(None)
            }
            fn groups_of(&self, _: u32) -> std::io::Result<Vec<u32>> {
                Ok(Vec::new())
            }
        }
        Self::parse(EMBEDDED_DEFAULT, Path::new("<embedded default>"), &NoUsers)
    }

    /// Parses and validates a whole config; the first error refuses it.
    pub fn parse(text: &str, path: &Path, users: &dyn UserDb) -> Result<Self, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| parse_error(path, text, &e, ""))?;
        let at = Source { text, path };
        let cgroup_root = at.cgroup_path(&raw.cgroup_root, "cgroup_root", false)?;
        let control = control::validate(&at, &raw.control, &raw.metrics)?;
        let alerts = alerts::validate(&at, &raw.alerts, &raw.alert_rules)?;
        Ok(Self {
            source: path.to_path_buf(),
            cgroup_root,
            cgroup_driver: raw.cgroup_driver,
            driver: raw.cgroup_driver.resolve(false),
            state_path: raw.state_path,
            bpf: bpf::validate(&at, &raw.bpf)?,
            control_socket: control.socket,
            control_mode: control.mode,
            control_group: control.group,
            operator_cgroups: control.operator_cgroups,
            metrics_listen: control.metrics_listen,
            groups: quotas::groups(&at, &raw.groups)?,
            quotas: quotas::quotas(&at, &raw.quotas, users)?,
            alert_rules: alerts.rules,
            alert_interval: alerts.interval,
            alertmanager: alerts.alertmanager,
            alert_instance: alerts.instance,
            alert_labels: alerts.labels,
            adapt_rules: adapt::adapt_rules(&at, &raw.adapt_rules, users)?,
            penalty_rules: adapt::penalty_rules(&at, &raw.penalty_rules, users)?,
            penalty_webhook: webhook::validate(&at, &raw.penalty_webhook)?,
        })
    }
}

impl Config {
    /// Decides `auto` for this host: systemd when `systemd_host` (PID 1 is systemd and
    /// cgroup2 is unified).
    pub fn resolve_driver(&mut self, systemd_host: bool) {
        self.driver = self.cgroup_driver.resolve(systemd_host);
    }

    /// Where the systemd driver records the unit properties it set: beside the control
    /// socket, in a runtime directory, so it is gone at reboot like the properties.
    pub fn systemd_record(&self) -> Option<PathBuf> {
        self.control_socket
            .parent()
            .map(|dir| dir.join("systemd-units"))
    }

    /// Where the agent's cgroups lie under the driver in use.
    pub fn layout(&self) -> Layout {
        Layout::new(self.driver, &self.cgroup_root)
    }

    /// Keeps `running`'s values of the settings that only a restart can change (where the
    /// programs attach and pin, the agent's subtree, its state file, socket and listeners,
    /// the Alertmanager), and returns the names of those that this config would change.
    pub fn keep_restart_settings(&mut self, running: &Config) -> Vec<&'static str> {
        let mut kept = Vec::new();
        macro_rules! keep {
            ($($field:ident).+, $name:literal) => {
                if self.$($field).+ != running.$($field).+ {
                    self.$($field).+ = running.$($field).+.clone();
                    kept.push($name);
                }
            };
        }
        keep!(bpf.attach_cgroup, "[bpf] attach_cgroup");
        keep!(bpf.pin_path, "[bpf] pin_path");
        keep!(bpf.max_tracked_sockets, "[bpf] max_tracked_sockets");
        // Watched for changes from the start on; so are the ranges read from it.
        if self.bpf.subuid_file != running.bpf.subuid_file {
            self.bpf.subuid_file = running.bpf.subuid_file.clone();
            self.bpf.subordinate = running.bpf.subordinate.clone();
            kept.push("[bpf] subuid_file");
        }
        keep!(cgroup_root, "cgroup_root");
        keep!(cgroup_driver, "cgroup_driver");
        // Decided once at start, never by a reload.
        self.driver = running.driver;
        keep!(state_path, "state_path");
        keep!(control_socket, "[control] socket");
        keep!(control_mode, "[control] mode");
        keep!(control_group, "[control] group");
        keep!(metrics_listen, "[metrics] listen");
        keep!(alertmanager, "[alerts] alertmanager_url");
        keep!(alert_instance, "[alerts] instance");
        keep!(alert_labels, "[alerts] labels");
        if self.penalty_webhook.as_ref().map(|w| w.listen)
            != running.penalty_webhook.as_ref().map(|w| w.listen)
        {
            // Listening is set up at start: keep the running one (a token or
            // max_duration changed with it still applies).
            // A section removed turns the webhook off (it answers 404); one added waits
            // for the next start, which binds its address.
            match (&mut self.penalty_webhook, &running.penalty_webhook) {
                (Some(new), Some(old)) => {
                    new.listen = old.listen;
                    kept.push("[penalty_webhook] listen");
                }
                (new @ Some(_), None) => {
                    *new = None;
                    kept.push("[penalty_webhook] (added)");
                }
                (None, _) => {}
            }
        }
        kept
    }
}

/// The text being validated, for errors that name the file and line.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Source<'_> {
    /// 1-based line of a span's start (0 when the value came from a default).
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        line_at(self.text, span.start)
    }

    fn invalid(&self, line: usize, field: &'static str, value: &str, reason: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A cgroup path relative to the mount; `"/"` (the root) only where `root_ok`.
    fn cgroup_path(
        &self,
        value: &toml::Spanned<String>,
        field: &'static str,
        root_ok: bool,
    ) -> Result<PathBuf, ConfigError> {
        let line = self.line(value.span());
        let path = relative_cgroup_path(value.get_ref()).ok_or_else(|| {
            self.invalid(
                line,
                field,
                value.get_ref(),
                "expected a path relative to the cgroup2 mount (\"/\" for the root), without '.' or '..' parts",
            )
        })?;
        if path.as_os_str().is_empty() && !root_ok {
            return Err(self.invalid(
                line,
                field,
                value.get_ref(),
                "the cgroup2 root is not allowed here; name a child cgroup",
            ));
        }
        Ok(path)
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

/// A TOML error as line, column and message: not the crate's Display, which quotes the
/// source line (a drop-in that is a link to a secret would show the secret).
fn parse_error(path: &Path, text: &str, e: &toml::de::Error, hint: &str) -> ConfigError {
    let message = e.message().trim_end();
    let message = match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let column = text[line_start..]
                .char_indices()
                .take_while(|(i, _)| line_start + i < start)
                .count()
                + 1;
            format!("line {line}, column {column}: {message}{hint}")
        }
        None => format!("{message}{hint}"),
    };
    ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    }
}

/// Reads one drop-in, if it is root's own regular file of at most [`MAX_DROP_IN_BYTES`],
/// reached directly or through links that stay inside its directory (a Kubernetes
/// ConfigMap links `x.toml -> ..data/x.toml` and `..data -> ..<timestamp>/`). A link that
/// leaves the directory is never followed to its content: the errors of a file that is
/// read reach operators, and a link to a secret must not show them its first line.
fn read_drop_in(path: &Path) -> Result<String, ConfigError> {
    use std::{
        io::Read,
        os::unix::fs::{MetadataExt, OpenOptionsExt},
    };
    let refuse = |reason: String| ConfigError::DropIn {
        path: path.to_path_buf(),
        reason,
    };
    let read_error = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let real_dir = std::fs::canonicalize(dir).map_err(read_error)?;
    let real = std::fs::canonicalize(path).map_err(read_error)?;
    if !real.starts_with(&real_dir) || real == real_dir {
        return Err(refuse(format!(
            "it is a link that leads outside {} (drop-ins may link only within their directory)",
            dir.display()
        )));
    }
    // `real` has no links left. O_NOFOLLOW: one swapped in since is not followed;
    // O_NONBLOCK: a FIFO does not hang the agent before its type is checked below. The
    // checks are on the open file, so they hold for what is read.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&real)
        .map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(refuse(
            "not a regular file (a directory, device, FIFO or socket)".to_string(),
        ));
    }
    // Root's in production; the test user's own files when unit tests run unprivileged.
    let owner = nix::unistd::geteuid().as_raw();
    if meta.uid() != owner {
        return Err(refuse(format!(
            "owned by UID {}, not by root (UID {owner}, the user the agent runs as): only root sets limits",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "writable by its group or by everyone (mode {:04o}): only root may change limits; chmod go-w it",
            meta.mode() & 0o7777
        )));
    }
    if meta.len() > MAX_DROP_IN_BYTES {
        return Err(refuse(format!(
            "{} bytes, more than the {MAX_DROP_IN_BYTES} a drop-in may hold",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_DROP_IN_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_DROP_IN_BYTES {
        return Err(refuse(format!(
            "it grew past the {MAX_DROP_IN_BYTES} bytes a drop-in may hold while it was read"
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        refuse(format!(
            "not UTF-8 text (an invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
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
    use crate::model::{alert::default_rules, error_chain, quota::Limit, target::UserRef};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), &crate::testing::Users)
    }

    /// A config file with drop-ins, loaded as the agent does.
    fn with_drop_ins(main: &str, drop_ins: &[(&str, &str)]) -> Result<Config, ConfigError> {
        // Drop-ins must not be group-writable, whatever umask the tests run under.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rlagent.toml");
        std::fs::write(&path, main).unwrap();
        std::fs::create_dir(dir.path().join(DROP_IN_DIR)).unwrap();
        for (name, text) in drop_ins {
            std::fs::write(dir.path().join(DROP_IN_DIR).join(name), text).unwrap();
        }
        Config::load(Some(&path), &crate::testing::Users)
    }

    #[test]
    fn subordinate_ranges_of_root_and_system_users_stay_separate_uids() {
        let dir = tempfile::tempdir().unwrap();
        let subuid = dir.path().join("subuid");
        std::fs::write(
            &subuid,
            "0:1000000:65536\n999:200000:10\n5000:300000:10\nno-such-user:400000:10\n",
        )
        .unwrap();
        let path = dir.path().join("rlagent.toml");
        std::fs::write(
            &path,
            format!("[bpf]\nsubuid_file = \"{}\"\n", subuid.display()),
        )
        .unwrap();
        let c = Config::load(Some(&path), &crate::testing::Users).unwrap();
        assert_eq!(
            c.bpf.subordinate,
            vec![SubordinateRange {
                first: 300000,
                count: 10,
                owner: 5000
            }],
            "only the range of a user at or above uid_min maps to its owner"
        );
        // "separate" reads no file at all.
        std::fs::write(
            &path,
            format!(
                "[bpf]\nsubordinate_uids = \"separate\"\nsubuid_file = \"{}\"\n",
                subuid.display()
            ),
        )
        .unwrap();
        let c = Config::load(Some(&path), &crate::testing::Users).unwrap();
        assert!(c.bpf.subordinate.is_empty());
        // A malformed file refuses the config, naming the line.
        std::fs::write(&subuid, "5000:300000:10\n5001:x:1\n").unwrap();
        std::fs::write(
            &path,
            format!("[bpf]\nsubuid_file = \"{}\"\n", subuid.display()),
        )
        .unwrap();
        let e = Config::load(Some(&path), &crate::testing::Users).unwrap_err();
        assert!(
            crate::model::error_chain(&e).contains("line 2"),
            "{}",
            crate::model::error_chain(&e)
        );
    }

    #[test]
    fn drop_ins_layer_over_the_main_file_in_name_order() {
        let c = with_drop_ins(
            "[[quota]]\ntarget = \"user:2000\"\nconns = 3\ncpu = \"50%\"\n",
            &[
                // Applied second: name order, not creation order.
                ("20-late.toml", "[[quota]]\ntarget = \"user:2000\"\nconns = 7\n"),
                (
                    "10-early.toml",
                    "[[quota]]\ntarget = \"user:2000\"\nconns = 5\n[[group]]\nname = \"batch\"\nuids = [3000]\n\
                     [[alert]]\nname = \"RlagentConnectionsDenied\"\nstat = \"conn_denials\"\nop = \">\"\nthreshold = 10\nsummary = \"x\"\n",
                ),
                ("README", "not toml, and not a .toml file: ignored"),
            ],
        )
        .unwrap();
        let q = &c.quotas[&Target::User(UserRef::Uid(2000))];
        assert_eq!(q.conns, Some(Limit::Value(7)));
        assert!(q.cpu.is_some(), "fields a drop-in does not name stay");
        assert_eq!(c.groups[0].name, "batch");
        let denied: Vec<&Rule> = c
            .alert_rules
            .iter()
            .filter(|r| r.name == "RlagentConnectionsDenied")
            .collect();
        assert_eq!(denied.len(), 1, "the drop-in's rule replaces the default");
        assert_eq!(denied[0].threshold, 10.0);
    }

    #[test]
    fn a_bad_drop_in_is_refused_with_its_file_and_line() {
        for (text, needle) in [
            ("[bpf]\ncount_udp = true\n", "only [[quota]], [[group]] and [[alert]]"),
            ("\n[[quota]]\ntarget = \"user:2000\"\nconns = \"lots\"\n", "line 2"),
            ("[[group]]\nname = \"batch\"\n", "already defined"),
            (
                "[[alert]]\nname = \"A\"\nstat = \"oom_kills\"\nop = \">\"\nthreshold = 0\nsummary = \"x\"\n\
                 [[alert]]\nname = \"A\"\nstat = \"oom_kills\"\nop = \">\"\nthreshold = 0\nsummary = \"x\"\n",
                "another alert rule has this name",
            ),
        ] {
            let e = error_chain(
                &with_drop_ins(
                    "[[group]]\nname = \"batch\"\n",
                    &[("50-bad.toml", text)],
                )
                .unwrap_err(),
            );
            assert!(e.contains("50-bad.toml") && e.contains(needle), "{text}: {e}");
        }
    }

    /// A config dir with a main file holding one quota and an empty drop-in directory.
    fn drop_in_fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("rlagent.toml");
        std::fs::write(&main, "[[quota]]\ntarget = \"user:2000\"\nconns = 3\n").unwrap();
        let drop_ins = dir.path().join(DROP_IN_DIR);
        std::fs::create_dir(&drop_ins).unwrap();
        (dir, main, drop_ins)
    }

    const RAISE: &str = "[[quota]]\ntarget = \"user:2000\"\nconns = 9\n";

    fn conns_of_2000(main: &Path) -> Result<Option<Limit<u64>>, String> {
        Config::load(Some(main), &crate::testing::Users)
            .map(|c| c.quotas[&Target::User(UserRef::Uid(2000))].conns)
            .map_err(|e| error_chain(&e))
    }

    #[test]
    fn drop_ins_may_link_within_their_directory_as_a_configmap_does() {
        use std::os::unix::fs::symlink;
        let (_dir, main, drop_ins) = drop_in_fixture();
        // A plain link to a file beside it.
        std::fs::write(drop_ins.join("raise.conf"), RAISE).unwrap();
        symlink("raise.conf", drop_ins.join("10-raise.toml")).unwrap();
        assert_eq!(conns_of_2000(&main), Ok(Some(Limit::Value(9))));
        // A Kubernetes ConfigMap volume: x.toml -> ..data/x.toml, ..data -> ..<timestamp>.
        let (_dir, main, drop_ins) = drop_in_fixture();
        let version = drop_ins.join("..2026_01_02_03_04_05.678901");
        std::fs::create_dir(&version).unwrap();
        std::fs::write(version.join("50-x.toml"), RAISE).unwrap();
        symlink("..2026_01_02_03_04_05.678901", drop_ins.join("..data")).unwrap();
        symlink("..data/50-x.toml", drop_ins.join("50-x.toml")).unwrap();
        assert_eq!(conns_of_2000(&main), Ok(Some(Limit::Value(9))));
        assert_eq!(
            Config::drop_ins(&main).unwrap(),
            [drop_ins.join("50-x.toml")]
        );
    }

    #[test]
    fn a_drop_in_link_that_leaves_the_directory_is_not_read() {
        use std::os::unix::fs::symlink;
        let (dir, main, drop_ins) = drop_in_fixture();
        std::fs::write(dir.path().join("secret"), "hunter2-first-line\n").unwrap();
        symlink("../secret", drop_ins.join("50-x.toml")).unwrap();
        let e = conns_of_2000(&main).unwrap_err();
        assert!(
            e.contains("50-x.toml") && e.contains("a link that leads outside"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        // Through a linked directory too.
        std::fs::remove_file(drop_ins.join("50-x.toml")).unwrap();
        symlink("..", drop_ins.join("..data")).unwrap();
        symlink("..data/secret", drop_ins.join("50-x.toml")).unwrap();
        let e = conns_of_2000(&main).unwrap_err();
        assert!(e.contains("leads outside") && !e.contains("hunter2"), "{e}");
        // The offline commands leave it out and say so.
        let (config, skipped) =
            Config::load_skipping_bad_drop_ins(Some(&main), &crate::testing::Users).unwrap();
        assert_eq!(
            config.quotas[&Target::User(UserRef::Uid(2000))].conns,
            Some(Limit::Value(3))
        );
        assert_eq!(skipped.len(), 1);
    }

    #[test]
    fn a_drop_in_that_is_writable_by_others_big_or_not_a_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, main, drop_ins) = drop_in_fixture();
        let file = drop_ins.join("50-x.toml");
        std::fs::write(&file, RAISE).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
        let e = conns_of_2000(&main).unwrap_err();
        assert!(e.contains("50-x.toml") && e.contains("mode 0664"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(conns_of_2000(&main), Ok(Some(Limit::Value(9))));

        let big = format!("{RAISE}{}", "#".repeat(MAX_DROP_IN_BYTES as usize));
        std::fs::write(&file, big).unwrap();
        let e = conns_of_2000(&main).unwrap_err();
        assert!(e.contains("more than the 1048576"), "{e}");
        std::fs::remove_file(&file).unwrap();

        // A FIFO is refused, not waited on.
        nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = conns_of_2000(&main).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_drop_in_not_owned_by_root_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let (_dir, main, drop_ins) = drop_in_fixture();
        let file = drop_ins.join("50-x.toml");
        std::fs::write(&file, RAISE).unwrap();
        std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
        let e = conns_of_2000(&main).unwrap_err();
        assert!(
            e.contains("50-x.toml") && e.contains("owned by UID 65534"),
            "{e}"
        );
    }

    #[test]
    fn a_parse_error_names_line_and_column_without_quoting_the_text() {
        let e = error_chain(
            &parse("# rlagent\n[[quota]]\ntarget = \"user:2000\"\nconns = hunter2-secret\n")
                .unwrap_err(),
        );
        assert!(
            e.contains("test.toml") && e.contains("line 4, column 9"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let (_dir, main, drop_ins) = drop_in_fixture();
        std::fs::write(drop_ins.join("50-x.toml"), "hunter2-secret\n").unwrap();
        let e = conns_of_2000(&main).unwrap_err();
        assert!(
            e.contains("50-x.toml") && e.contains("line 1, column"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn alert_labels_and_instance_are_checked() {
        let c = parse(
            "[alerts]\ninstance = \"login07\"\nlabels = { team = \"hpc\", site_2 = \"b\" }\n",
        )
        .unwrap();
        assert_eq!(c.alert_instance.as_deref(), Some("login07"));
        assert_eq!(c.alert_labels.len(), 2);
        assert_eq!(parse("").unwrap().alert_instance, None, "the host name");
        for (text, needle) in [
            ("labels = { alertname = \"x\" }", "alertname"),
            ("labels = { instance = \"x\" }", "instance"),
            ("labels = { \"bad-name\" = \"x\" }", "bad-name"),
            ("labels = { __meta = \"x\" }", "__meta"),
            ("labels = { team = \"\" }", "1 to 255"),
            ("instance = \"\"", "instance"),
            ("instance = \"a\\nb\"", "control"),
        ] {
            let e = error_chain(&parse(&format!("[alerts]\n{text}\n")).unwrap_err());
            assert!(e.contains("line 2") && e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn on_full_is_deny_unless_set() {
        assert_eq!(parse("").unwrap().bpf.on_full, OnFull::Deny);
        let c = parse("[bpf]\non_full = \"allow\"\n").unwrap();
        assert_eq!(c.bpf.on_full, OnFull::Allow);
        let e = error_chain(&parse("[bpf]\non_full = \"maybe\"\n").unwrap_err());
        assert!(e.contains("unknown variant") && e.contains("deny"), "{e}");
    }

    #[test]
    fn the_cgroup_driver_is_decided_once_at_start() {
        let mut running = parse("").unwrap();
        assert_eq!(running.cgroup_driver, DriverSetting::Auto);
        assert_eq!(running.driver, Driver::Cgroupfs, "auto before resolving");
        running.resolve_driver(true);
        assert_eq!(running.driver, Driver::Systemd);
        assert_eq!(running.layout().root, PathBuf::from("rlagent.slice"));
        // A reload never switches drivers: the same setting keeps the resolved driver...
        let mut same = parse("").unwrap();
        assert!(same.keep_restart_settings(&running).is_empty());
        assert_eq!(same.driver, Driver::Systemd);
        // ...and another setting is reported as needing a restart.
        let mut other = parse("cgroup_driver = \"cgroupfs\"\n").unwrap();
        assert_eq!(other.keep_restart_settings(&running), ["cgroup_driver"]);
        assert_eq!(other.driver, Driver::Systemd);
        let e = parse("cgroup_driver = \"docker\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown variant") && e.contains("systemd"),
            "{e}"
        );
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
        error_chain(&parse(text).unwrap_err())
    }

    #[test]
    fn connection_policies_parse_and_bad_ones_name_field_value_and_form() {
        let c = parse(
            "[bpf]\nmode = \"monitor\"\n[[quota]]\ntarget = \"user:7\"\nconns = 3\nconn_rate = \"20/s\"\nconn_burst = 40\nmode = \"enforce\"\n[[quota]]\ntarget = \"batch\"\nconns = 3\n",
        )
        .unwrap();
        let q = &c.quotas[&Target::User(UserRef::Uid(7))];
        assert_eq!((q.conn_burst, q.mode), (Some(40), Some(Mode::Enforce)));
        assert_eq!(c.bpf.mode, Mode::Monitor);
        for (text, needles) in [
            ("conn_rate = \"0/s\"", &["conn_rate", "\"0/s\"", "20/s"][..]),
            ("conn_rate = \"5/h\"", &["conn_rate", "\"5/h\"", "30/min"]),
            (
                "conn_rate = \"5/s\"\nconn_burst = 0",
                &["conn_burst", "\"0\"", "from 1"],
            ),
            ("conn_burst = 4", &["conn_burst 4", "without conn_rate"]),
            (
                "conns = 3\nmode = \"audit\"",
                &["mode", "\"audit\"", "enforce or monitor"],
            ),
            (
                "cpu = \"5%\"\nmode = \"monitor\"",
                &["mode monitor", "without conns"],
            ),
        ] {
            let e = err(&format!("[[quota]]\ntarget = \"user:7\"\n{text}\n"));
            assert!(e.contains("line 1"), "{e}");
            for needle in needles {
                assert!(e.contains(needle), "{needle} not in {e}");
            }
        }
        let e = err("[[quota]]\ntarget = \"cgroup:a.slice\"\nconn_rate = \"5/s\"\n");
        assert!(
            e.contains("conn_rate cannot be set on a cgroup:<path> target"),
            "{e}"
        );
        let e = err("[bpf]\nmode = \"dry-run\"\n");
        assert!(
            e.contains("mode") && e.contains("enforce or monitor"),
            "{e}"
        );
        let e = err("[bpf]\nevent_rate = \"max\"\n");
        assert!(
            e.contains("event_rate") && e.contains("max is not allowed"),
            "{e}"
        );
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
        let e = err("[bpf]\nmax_tracked_sockets = 2048\nhost_conns = 1025\n");
        assert!(
            e.contains("line 3") && e.contains("host_conns") && e.contains("at least 2050"),
            "{e}"
        );
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
        assert_eq!(c.alert_rules.len(), default_rules().len() + 1);
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
    fn a_multi_byte_duration_is_refused_with_a_message() {
        let e = err("[alerts]\ninterval = \"1é\"\n");
        assert!(e.contains("line 2") && e.contains("interval"), "{e}");
        let e = err("[[alert]]\nname = \"X\"\nstat = \"oom_kills\"\nop = \">\"\nthreshold = 1\nfor = \"5€\"\nwindow = \"é\"\nsummary = \"s\"\n");
        assert!(e.contains("for = \"5€\""), "{e}");
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
