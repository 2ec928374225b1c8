//! Quotas set at runtime (through the control socket), kept in a state file.
//!
//! Precedence: the config file is the base; each field set at runtime overrides the
//! config's value for that target and field, and a field cleared at runtime is removed
//! even if the config sets it. Reloading the config keeps the runtime overrides;
//! `rlctl clear-quota` is how to drop them. The file is written atomically (temp file,
//! fsync, rename, fsync of the directory), so a crash at any moment leaves either the old
//! or the new state, never a torn one.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    model::{
        quota::{Field, Quota, QuotaError},
        target::{Target, TargetError},
        users::UserDb,
    },
};

const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {path} is not valid ({message}); move it away to start from the config alone"
    )]
    Parse { path: PathBuf, message: String },
    #[error("writing state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory {path} is writable by others (mode {mode:o}); the agent writes its state only where no one else can")]
    UnsafeDir { path: PathBuf, mode: u32 },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("quota for {target}")]
    Quota {
        target: String,
        #[source]
        source: QuotaError,
    },
}

/// Per target (canonical string), per field: `Some(value)` set, `None` cleared.
pub type Overrides = BTreeMap<String, BTreeMap<Field, Option<String>>>;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeState {
    pub version: u32,
    pub quotas: Overrides,
}

/// Where a field's effective value comes from: `config`, `runtime`, or the step of an
/// adaptive rule or penalty in force (`adapt:<rule>`, `penalty:<rule>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Source {
    Config,
    Runtime,
    Step(String),
}

impl From<Source> for String {
    fn from(s: Source) -> Self {
        match s {
            Source::Config => "config".to_string(),
            Source::Runtime => "runtime".to_string(),
            Source::Step(name) => name,
        }
    }
}

impl From<String> for Source {
    fn from(s: String) -> Self {
        match s.as_str() {
            "config" => Self::Config,
            "runtime" => Self::Runtime,
            _ => Self::Step(s),
        }
    }
}

/// Where each field of each target's effective quota comes from.
pub type Sources = BTreeMap<(Target, Field), Source>;

/// The merge of config and runtime state: the quotas the agent enforces, per target.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub quotas: BTreeMap<Target, Quota>,
    pub sources: Sources,
}

impl RuntimeState {
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let state: Self = serde_json::from_str(&text).map_err(|e| StateError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "version {} (this agent reads version {STATE_VERSION})",
                    state.version
                ),
            });
        }
        Ok(state)
    }

    /// Writes `path.tmp`, fsyncs it and renames it over `path`.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let staged = self.stage(path)?;
        Self::commit(&staged, path)
    }

    /// First half of [`save`]: the new state is durable beside `path`, not yet in place.
    /// The temporary is created afresh (O_EXCL, O_NOFOLLOW: a planted file or symlink is
    /// removed, never written through), in a directory no one else may write to.
    pub fn stage(&self, path: &Path) -> Result<PathBuf, StateError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let err = |source| StateError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut state = self.clone();
        state.version = STATE_VERSION;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
            let mode = std::fs::metadata(dir).map_err(err)?.permissions().mode();
            if mode & 0o022 != 0 {
                return Err(StateError::UnsafeDir {
                    path: dir.to_path_buf(),
                    mode: mode & 0o7777,
                });
            }
        }
        let tmp = path.with_extension("json.tmp");
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(err(source)),
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(err)?;
        let text = serde_json::to_string_pretty(&state).expect("state serializes");
        file.write_all(text.as_bytes()).map_err(err)?;
        file.write_all(b"\n").map_err(err)?;
        file.sync_all().map_err(err)?;
        Ok(tmp)
    }

    /// Second half of [`save`]: renames the staged file into place and syncs the directory.
    pub fn commit(staged: &Path, path: &Path) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: path.to_path_buf(),
            source,
        };
        std::fs::rename(staged, path).map_err(err)?;
        // The new state is in place from here on: a failed directory sync only weakens
        // its durability across a crash, it does not undo the change.
        if let Some(dir) = path.parent() {
            if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
                tracing::warn!(path = %path.display(), "syncing the state directory: {e}");
            }
        }
        Ok(())
    }

    /// This state with `fields` of `target` set (`Some`) or cleared (`None`).
    pub fn with(&self, target: &Target, fields: &BTreeMap<Field, Option<String>>) -> Self {
        let mut next = self.clone();
        let entry = next.quotas.entry(target.to_string()).or_default();
        for (field, value) in fields {
            entry.insert(*field, value.clone());
        }
        next
    }

    /// This state without the overrides of `target` that change nothing: a clear of a
    /// field `config` does not set, and the target itself when no field is left (so
    /// set/clear pairs leave no trace). Other targets are left as they are: a clear made
    /// while the config set the field stays, whatever the config says later.
    pub fn pruned(mut self, target: &Target, config: &Config) -> Self {
        let key = target.to_string();
        let in_config = config.quotas.get(target);
        if let Some(fields) = self.quotas.get_mut(&key) {
            fields.retain(|field, value| {
                value.is_some() || in_config.is_some_and(|q| q.text(*field).is_some())
            });
            if fields.is_empty() {
                self.quotas.remove(&key);
            }
        }
        self
    }

    /// Merges over `config`. Every override goes through the same parsers as the config,
    /// and the merged quotas through the same cross-field checks.
    pub fn merge(&self, config: &Config, users: &dyn UserDb) -> Result<Merged, StateError> {
        let mut quotas = config.quotas.clone();
        let mut sources = BTreeMap::new();
        for (target, quota) in &config.quotas {
            for field in Field::ALL {
                if quota.text(field).is_some() {
                    sources.insert((target.clone(), field), Source::Config);
                }
            }
        }
        for (target_text, fields) in &self.quotas {
            let target = target_text.parse::<Target>()?.resolve_user(users)?;
            let quota = quotas.entry(target.clone()).or_default();
            for (field, value) in fields {
                match value {
                    Some(v) => {
                        quota.set(*field, v).map_err(|source| StateError::Quota {
                            target: target.to_string(),
                            source,
                        })?;
                        sources.insert((target.clone(), *field), Source::Runtime);
                    }
                    None => {
                        quota.clear(*field);
                        sources.remove(&(target.clone(), *field));
                    }
                }
            }
        }
        quotas.retain(|_, q| !q.is_empty());
        for (target, quota) in &quotas {
            quota.check().map_err(|source| StateError::Quota {
                target: target.to_string(),
                source,
            })?;
        }
        Ok(Merged { quotas, sources })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{error_chain, quota::Limit, target::UserRef},
        testing::{config, Users},
    };

    fn fields(list: &[(Field, Option<&str>)]) -> BTreeMap<Field, Option<String>> {
        list.iter()
            .map(|(f, v)| (*f, v.map(str::to_string)))
            .collect()
    }

    #[test]
    fn runtime_overrides_config_field_by_field_and_clears_remove() {
        let base = config("[[quota]]\ntarget = \"agent\"\ncpu = \"50%\"\npids = 100\n");
        let agent = Target::Group("agent".into());
        let state = RuntimeState::default()
            .with(
                &agent,
                &fields(&[(Field::Cpu, Some("30%")), (Field::Pids, None)]),
            )
            .with(
                &Target::User(UserRef::Uid(2000)),
                &fields(&[(Field::Conns, Some("2"))]),
            );
        let eff = state.merge(&base, &Users).unwrap();
        let q = &eff.quotas[&agent];
        assert_eq!(q.text(Field::Cpu).as_deref(), Some("30%"));
        assert_eq!(
            q.pids, None,
            "cleared at runtime, even though the config sets it"
        );
        assert_eq!(eff.sources[&(agent.clone(), Field::Cpu)], Source::Runtime);
        assert!(!eff.sources.contains_key(&(agent, Field::Pids)));
        let user = &eff.quotas[&Target::User(UserRef::Uid(2000))];
        assert_eq!(user.conns, Some(Limit::Value(2)));
    }

    #[test]
    fn bad_overrides_and_cross_field_conflicts_are_refused() {
        let base = config("[[quota]]\ntarget = \"agent\"\nmemory = \"1G\"\n");
        let agent = Target::Group("agent".into());
        let bad = RuntimeState::default().with(&agent, &fields(&[(Field::Cpu, Some("fast"))]));
        assert!(error_chain(&bad.merge(&base, &Users).unwrap_err()).contains("cpu \"fast\""));
        let high =
            RuntimeState::default().with(&agent, &fields(&[(Field::MemoryHigh, Some("2G"))]));
        let err = error_chain(&high.merge(&base, &Users).unwrap_err());
        assert!(
            err.contains("group:agent") && err.contains("above memory 1G"),
            "{err}"
        );
        // Clearing every field removes the target.
        let gone = RuntimeState::default().with(&agent, &fields(&[(Field::Memory, None)]));
        assert!(!gone
            .merge(&base, &Users)
            .unwrap()
            .quotas
            .contains_key(&agent));
    }

    #[test]
    fn saves_atomically_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert_eq!(RuntimeState::load(&path).unwrap(), RuntimeState::default());
        let state = RuntimeState::default().with(
            &Target::Group("a".into()),
            &fields(&[(Field::Cpu, Some("5%"))]),
        );
        state.save(&path).unwrap();
        let loaded = RuntimeState::load(&path).unwrap();
        assert_eq!(loaded.quotas, state.quotas);
        assert!(!path.with_extension("json.tmp").exists());
        std::fs::write(&path, "{\"version\":1,\"quotas\":{},\"extra\":1}").unwrap();
        let err = RuntimeState::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("state.json") && err.contains("move it away"),
            "{err}"
        );
    }

    #[test]
    fn a_planted_symlink_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, path.with_extension("json.tmp")).unwrap();
        let state = RuntimeState::default().with(
            &Target::Group("a".into()),
            &fields(&[(Field::Cpu, Some("5%"))]),
        );
        state.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(RuntimeState::load(&path).unwrap().quotas, state.quotas);
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = RuntimeState::default()
            .save(&dir.path().join("state.json"))
            .unwrap_err();
        assert!(matches!(err, StateError::UnsafeDir { .. }), "{err}");
    }

    #[test]
    fn set_and_clear_pairs_leave_nothing_behind() {
        let base = config("[[quota]]\ntarget = \"agent\"\ncpu = \"50%\"\n");
        let mut state = RuntimeState::default();
        for uid in 0..150 {
            let user = Target::User(UserRef::Uid(3000 + uid));
            state = state
                .with(&user, &fields(&[(Field::Conns, Some("2"))]))
                .pruned(&user, &base);
            state = state
                .with(&user, &fields(&[(Field::Conns, None)]))
                .pruned(&user, &base);
        }
        assert!(state.quotas.is_empty(), "{:?}", state.quotas);
        // A clear of a field the config sets is kept: it removes the config's value.
        let agent = Target::Group("agent".into());
        let cleared = state.with(&agent, &fields(&[(Field::Cpu, None), (Field::Pids, None)]));
        let cleared = cleared.pruned(&agent, &base);
        assert_eq!(
            cleared.quotas["group:agent"],
            BTreeMap::from([(Field::Cpu, None)])
        );
    }
}
