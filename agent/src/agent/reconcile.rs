// Why this file is long: start, reload and runtime changes are one apply sequence with its
// roll-back, kept in one place so the order of writes and undos reads top to bottom.
//! The reconcile loop: one desired state in, one apply path for start, reload and runtime
//! changes, with roll-back when an apply fails part-way.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use crate::{
    config::Config,
    desired::{
        cgroups::{Before, CgroupPlan},
        conns::GroupUnenforced,
        state::{RuntimeState, StateError},
        Desired, DesiredError,
    },
    kernel::{cgroup::driver::Skipped, Enforcer, KernelError, UnenforcedGroups},
    model::{adapt::Step, layout::Driver, quota::Field, target::Target, users::UserDb},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Desired(#[from] DesiredError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no group named {group:?} (groups come from [[group]] rules and group quotas)")]
    UnknownGroup { group: String },
    #[error("cannot move pid {pid}: {reason}")]
    NotMovable { pid: u32, reason: String },
    #[error("target {target}: the cgroup does not exist (a cgroup:<path> target names an existing cgroup, relative to the cgroup2 mount)")]
    NoSuchCgroup { target: String },
}

/// How much of the cgroup plan an apply writes.
enum Write {
    /// Every cgroup, and /proc rescanned (a reload).
    All,
    /// What differs from the plan written before (after a complete write).
    Changes,
}

/// What an apply does with a `cgroup:<path>` target of the config whose cgroup is missing.
enum Vanished {
    Refuse,
    Skip,
}

/// Limits set but not in force, by target and field, with the reason.
pub type NotEnforced = BTreeMap<(Target, Field), Unenforced>;

/// Why a limit that is set is not in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unenforced {
    /// A connection field of a `cgroup:<path>` target: the programs count by UID and group.
    ConnsOnCgroupTarget,
    /// A group's connection limits the programs cannot apply.
    Group(GroupUnenforced),
    /// A `cgroup:<path>` target's interface file is missing (its controller is not enabled
    /// for that cgroup).
    Skipped(Skipped),
    /// A runtime `cgroup:<path>` target whose cgroup is gone.
    CgroupGone,
    /// The field's controller is not available where the driver makes its cgroups.
    NoController {
        controller: &'static str,
        driver: Driver,
        /// The agent's subtree (cgroupfs driver), relative to the cgroup2 mount.
        root: PathBuf,
    },
}

impl std::fmt::Display for Unenforced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConnsOnCgroupTarget => {
                f.write_str("a cgroup:<path> target carries no connection limits")
            }
            Self::Group(reason) if reason.pending() => {
                write!(f, "{reason}; applied when it appears")
            }
            Self::Group(reason) => reason.fmt(f),
            Self::Skipped(skipped) => skipped.fmt(f),
            Self::CgroupGone => f.write_str("the cgroup no longer exists"),
            Self::NoController {
                controller,
                driver: Driver::Cgroupfs,
                root,
            } => write!(
                f,
                "the {controller} controller is not available to the agent's subtree /{} (on a hybrid host it is bound to cgroup v1)",
                root.display()
            ),
            Self::NoController {
                controller,
                driver: Driver::Systemd,
                ..
            } => write!(
                f,
                "the {controller} controller is not available at the cgroup2 root (disabled on the kernel command line, or bound to cgroup v1): systemd cannot enforce it"
            ),
        }
    }
}

/// Of the `missing` cgroup targets, the ones to skip (set at runtime, their cgroup gone
/// since); a missing one that the config file names refuses the apply.
pub fn skip_vanished(config: &Config, missing: Vec<PathBuf>) -> Result<Vec<Target>, AgentError> {
    let mut skipped = Vec::new();
    for path in missing {
        let target = Target::Cgroup(path);
        if config.quotas.contains_key(&target) {
            return Err(AgentError::NoSuchCgroup {
                target: target.to_string(),
            });
        }
        skipped.push(target);
    }
    Ok(skipped)
}

/// The running agent's enforcement: the config, the runtime overrides, what is enforced,
/// and the kernel it is enforced through.
pub struct Agent {
    /// The config file as loaded (restart-only settings as at start).
    config: Config,
    /// Quotas set through the control socket.
    runtime: RuntimeState,
    /// What is enforced now.
    desired: Desired,
    kernel: Box<dyn Enforcer>,
    users: Arc<dyn UserDb>,
    /// Runtime `cgroup:<path>` targets whose cgroup is gone: skipped, not enforced.
    skipped: Vec<Target>,
    /// From the last cgroup write: controllers the agent's subtree lacks, and limits that
    /// could not be set.
    subtree_missing: Vec<String>,
    limits_skipped: Vec<Skipped>,
    /// Groups whose connection limits the programs cannot apply, with the reason, at the
    /// last write (a missing cgroup is retried: see [`Self::refresh_groups`]).
    unenforced_groups: UnenforcedGroups,
    /// The cgroup plan last written, and whether that write completed. A completed,
    /// unchanged plan (a change of connection caps only) skips the cgroup write, and a
    /// completed, changed one writes only the difference; after an incomplete one (a
    /// failed write, or a reload) every cgroup is written, resetting what it may have set.
    applied_plan: Option<(CgroupPlan, bool)>,
    /// The steps of adaptive rules and penalties in force, laid over config and runtime
    /// quotas by every apply (not saved: they are decided again after a restart).
    steps: Vec<Step>,
}

impl Agent {
    /// Takes over a kernel that already enforces `desired`'s connection limits (see
    /// `System::start`) and applies the rest.
    pub fn start(
        config: Config,
        runtime: RuntimeState,
        desired: Desired,
        kernel: Box<dyn Enforcer>,
        users: Arc<dyn UserDb>,
    ) -> Result<Self, AgentError> {
        let mut agent = Self {
            config,
            runtime,
            desired: desired.clone(),
            kernel,
            users,
            skipped: Vec::new(),
            subtree_missing: Vec::new(),
            limits_skipped: Vec::new(),
            unenforced_groups: UnenforcedGroups::new(),
            applied_plan: None,
            steps: Vec::new(),
        };
        let config = agent.config.clone();
        agent.desired = agent.apply_with(&config, desired, Vanished::Refuse, Write::Changes)?;
        Ok(agent)
    }

    /// Enforces `desired` under `config`: checks first, then BPF maps, cgroups and
    /// placement. Returns what is enforced: `desired` less the runtime `cgroup:<path>`
    /// targets whose cgroup is gone (skipped and reported, so a stopped service does not
    /// block every later change).
    fn apply(&mut self, config: &Config, desired: Desired) -> Result<Desired, AgentError> {
        self.apply_with(config, desired, Vanished::Skip, Write::Changes)
    }

    /// [`Self::apply`], refusing a config that names a missing cgroup (`Vanished::Refuse`,
    /// for a reload: the file was just written) or skipping it like the runtime ones
    /// (`Vanished::Skip`: a service stopped since, which must not block other changes);
    /// writing every cgroup (`Write::All`, for a reload) or what changed.
    fn apply_with(
        &mut self,
        config: &Config,
        mut desired: Desired,
        vanished: Vanished,
        write: Write,
    ) -> Result<Desired, AgentError> {
        let missing = self.kernel.missing_cgroups(&desired.cgroups);
        let skipped = match vanished {
            Vanished::Refuse => skip_vanished(config, missing)?,
            Vanished::Skip => missing.into_iter().map(Target::Cgroup).collect(),
        };
        for target in &skipped {
            if let Target::Cgroup(path) = target {
                desired.cgroups.cgroups.remove(path);
            }
            if !self.skipped.contains(target) {
                tracing::warn!(%target, "skipped: the cgroup no longer exists (the quota stays as configured and applies again at the next change or reload after the cgroup is back)");
            }
        }
        self.skipped = skipped;
        let desired = desired;
        for (target, fields) in desired.unenforced() {
            let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
            tracing::warn!(
                %target,
                fields = %names.join(", "),
                "saved quota fields that this build does not enforce (clear them with rlctl clear-quota)"
            );
        }
        self.unenforced_groups = self.kernel.apply_conns(&desired.conns)?;
        if matches!(write, Write::All) {
            // From here on, the plan applied before counts as not completely written.
            if let Some((_, done)) = &mut self.applied_plan {
                *done = false;
            }
        }
        let complete = self
            .applied_plan
            .as_ref()
            .is_some_and(|(plan, done)| *done && *plan == desired.cgroups);
        if !complete {
            // Until this write completes, it is not known what was written: a roll-back
            // rewrites every cgroup and resets what the failed plan may have set. After a
            // complete write, only what differs is written.
            let previous = self.applied_plan.take();
            let before = match &previous {
                None => Before::Nothing,
                Some((plan, true)) => Before::Complete(plan),
                Some((plan, false)) => Before::Partial(plan),
            };
            self.applied_plan = Some((desired.cgroups.clone(), false));
            let report = self.kernel.apply_cgroups(&desired.cgroups, before)?;
            for message in &report.unavailable {
                tracing::warn!("{message}");
            }
            for skipped in &report.skipped {
                tracing::warn!("limit not set, its controller is unavailable: {skipped}");
            }
            self.subtree_missing = report
                .subtree_missing
                .iter()
                .map(|c| c.name().to_string())
                .collect();
            self.limits_skipped = match report.rewritten {
                None => report.skipped,
                // Only these were written: what was skipped elsewhere still is.
                Some(written) => {
                    let plan = &desired.cgroups;
                    let mut kept = std::mem::take(&mut self.limits_skipped);
                    kept.retain(|s| {
                        !written.contains(&s.cgroup)
                            && (s.cgroup.starts_with(plan.root())
                                || plan.cgroups.contains_key(&s.cgroup))
                    });
                    kept.extend(report.skipped);
                    kept
                }
            };
            if let Some(placed) = report.placed {
                tracing::info!(
                    seen = placed.seen,
                    moved = placed.moved,
                    failed = placed.failed,
                    "placed processes"
                );
            }
        }
        self.applied_plan = Some((desired.cgroups.clone(), true));
        if !self.unenforced_groups.is_empty() {
            // The cgroup write may have made the groups' cgroups.
            self.unenforced_groups = self.kernel.apply_conns(&desired.conns)?;
        }
        for (group, reason) in &self.unenforced_groups {
            tracing::warn!(%group, "connection limits not enforced: {reason}");
        }
        tracing::info!(
            uid_policies = desired.conns.per_uid.len(),
            groups = desired.conns.groups.len(),
            default_cap = %cap_text(desired.conns.default_policy.cap),
            host_cap = %cap_text(desired.conns.host_cap),
            targets = desired.quotas.len(),
            "enforcing"
        );
        Ok(desired)
    }

    /// Re-applies what was enforced before a failed change, so a failure in the middle of
    /// an apply does not leave half of it in force.
    pub fn roll_back(&mut self) {
        let previous = self.desired.clone();
        let config = self.config.clone();
        if let Err(e) = self.apply(&config, previous) {
            tracing::error!(
                "rolling back to the previous quotas failed: {}",
                crate::model::error_chain(&e)
            );
        }
    }

    /// Applies a new, already validated config file, keeping the runtime overrides and the
    /// settings that only a restart can change (their names are returned, for a warning).
    /// A reload writes every cgroup and rescans /proc, changed or not: it is also how an
    /// operator repairs what changed behind the agent's back (a `cgroup:<path>` target's
    /// cgroup made again, a group's slice stopped, a process placement missed).
    pub fn reload(&mut self, mut config: Config) -> Result<Vec<&'static str>, AgentError> {
        let kept = config.keep_restart_settings(&self.config);
        let desired =
            Desired::build_with_steps(&config, &self.runtime, &self.steps, self.users.as_ref())?;
        match self.apply_with(&config, desired, Vanished::Refuse, Write::All) {
            Ok(applied) => {
                self.config = config;
                self.desired = applied;
                Ok(kept)
            }
            Err(e) => {
                self.roll_back();
                Err(e)
            }
        }
    }

    /// Sets (`Some`) or clears (`None`) quota fields of `target` at runtime. All or
    /// nothing: the merged result is validated, the new state file is staged durably,
    /// the quotas are applied, and only then is the state file moved into place. On any
    /// failure the previous quotas are re-applied and the old state file stays.
    pub fn change(
        &mut self,
        target: &Target,
        fields: &BTreeMap<Field, Option<String>>,
    ) -> Result<(), AgentError> {
        let next = self
            .runtime
            .with(target, fields)
            .pruned(target, &self.config);
        let desired =
            Desired::build_with_steps(&self.config, &next, &self.steps, self.users.as_ref())?;
        // The target being changed must exist; other vanished ones are skipped.
        if let Target::Cgroup(path) = target {
            if fields.values().any(Option::is_some)
                && self.kernel.missing_cgroups(&desired.cgroups).contains(path)
            {
                return Err(AgentError::NoSuchCgroup {
                    target: target.to_string(),
                });
            }
        }
        let config = self.config.clone();
        let state_path = config.state_path.clone();
        let staged = next.stage(&state_path)?;
        let result = self.apply(&config, desired).and_then(|applied| {
            RuntimeState::commit(&staged, &state_path)?;
            Ok(applied)
        });
        match result {
            Ok(applied) => {
                self.runtime = next;
                self.desired = applied;
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                self.roll_back();
                Err(e)
            }
        }
    }

    /// Enforces `steps` (the adaptive rules' and penalties' in force) in place of the ones
    /// before, through the same apply as every other change; nothing happens when they are
    /// the same. On failure the steps before stay in force.
    pub fn set_steps(&mut self, steps: Vec<Step>) -> Result<bool, AgentError> {
        if steps == self.steps {
            return Ok(false);
        }
        let desired =
            Desired::build_with_steps(&self.config, &self.runtime, &steps, self.users.as_ref())?;
        let config = self.config.clone();
        match self.apply(&config, desired) {
            Ok(applied) => {
                self.desired = applied;
                self.steps = steps;
                Ok(true)
            }
            Err(e) => {
                self.roll_back();
                Err(e)
            }
        }
    }

    /// Moves processes into a group's cgroup (for `rlctl move` and `rlctl run`). Every
    /// PID is checked first, and nothing moves if one is refused: never PID 1, a kernel
    /// thread or the agent; and unless `by_root`, no process of a UID below `uid_min`,
    /// none inside a `cgroup:<path>` target (placement leaves those alone), and none that
    /// the move would take out of the cgroup the connection programs are attached to.
    pub fn move_to_group(
        &self,
        group: &str,
        pids: &[u32],
        by_root: bool,
    ) -> Result<PathBuf, AgentError> {
        let plan = &self.desired.cgroups;
        if !plan.groups.contains_key(group) {
            return Err(AgentError::UnknownGroup {
                group: group.to_string(),
            });
        }
        let cgroup = plan.group_cgroup(group);
        let attach = &self.config.bpf.attach_cgroup;
        let uid_min = self.config.bpf.uid_min;
        for &pid in pids {
            let refuse = |reason: String| AgentError::NotMovable { pid, reason };
            let process = crate::kernel::proc::read_proc(pid)
                .ok_or_else(|| refuse("no such process".into()))?;
            if crate::kernel::placement::never_moved(&process, std::process::id()) {
                return Err(refuse(
                    "PID 1, kernel threads and the agent itself stay where they are".into(),
                ));
            }
            if by_root {
                continue;
            }
            if process.uid < uid_min {
                return Err(refuse(format!(
                    "it belongs to uid {}, below uid_min ({uid_min}); only root moves system processes",
                    process.uid
                )));
            }
            if plan.inside_cgroup_target(&process.cgroup) {
                return Err(refuse(format!(
                    "it is inside a cgroup:<path> target (/{}); only root moves it out",
                    process.cgroup.display()
                )));
            }
            if process.cgroup.starts_with(attach) && !cgroup.starts_with(attach) {
                return Err(refuse(format!(
                    "the move would take it out of /{}, where connections are capped; only root may",
                    attach.display()
                )));
            }
        }
        Ok(self.kernel.move_pids(plan, group, pids)?)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// True when the groups' connection limits must be written again: a group's cgroup
    /// was missing (it may exist now), or was made again under a new id.
    pub fn groups_need_refresh(&self) -> bool {
        self.unenforced_groups
            .values()
            .any(GroupUnenforced::pending)
            || self.kernel.groups_moved(&self.desired.conns)
    }

    /// One round of retiring idle per-UID counters; returns how many were retired.
    pub fn retire_idle(&mut self) -> Result<usize, AgentError> {
        Ok(self.kernel.retire_idle(&self.desired.conns)?)
    }

    /// Writes the connection limits again (see [`Self::groups_need_refresh`]). Returns the
    /// groups that became enforced.
    pub fn refresh_groups(&mut self) -> Result<Vec<String>, AgentError> {
        let unenforced = self.kernel.apply_conns(&self.desired.conns)?;
        let applied = self
            .unenforced_groups
            .keys()
            .filter(|g| !unenforced.contains_key(*g))
            .cloned()
            .collect();
        for (group, reason) in &unenforced {
            if !self.unenforced_groups.contains_key(group) {
                tracing::warn!(%group, "connection limits not enforced: {reason}");
            }
        }
        self.unenforced_groups = unenforced;
        Ok(applied)
    }

    /// Runtime `cgroup:<path>` targets skipped because their cgroup is gone.
    pub fn skipped(&self) -> &[Target] {
        &self.skipped
    }

    /// The limits set but not in force, and why: nothing is reported as applied that the
    /// kernel does not enforce.
    pub fn not_enforced(&self) -> NotEnforced {
        let mut out = NotEnforced::new();
        for (target, fields) in self.desired.unenforced() {
            for field in fields {
                out.insert((target.clone(), field), Unenforced::ConnsOnCgroupTarget);
            }
        }
        for (group, reason) in &self.unenforced_groups {
            let target = Target::Group(group.clone());
            let Some(quota) = self.desired.quotas.get(&target) else {
                continue;
            };
            for field in [Field::Conns, Field::ConnRate] {
                if quota.limits(field) {
                    out.insert((target.clone(), field), Unenforced::Group(reason.clone()));
                }
            }
        }
        for (target, quota) in &self.desired.quotas {
            for field in Field::ALL {
                let Some(controller) = field.controller().filter(|_| quota.limits(field)) else {
                    continue;
                };
                let reason = match target {
                    Target::Cgroup(path) => self
                        .limits_skipped
                        .iter()
                        .find(|s| s.cgroup == *path && s.field == field)
                        .map(|s| Unenforced::Skipped(s.clone()))
                        .or_else(|| {
                            self.skipped
                                .contains(target)
                                .then_some(Unenforced::CgroupGone)
                        }),
                    _ => self
                        .subtree_missing
                        .iter()
                        .any(|c| c == controller)
                        .then(|| Unenforced::NoController {
                            controller,
                            driver: self.config.driver,
                            root: self.config.cgroup_root.clone(),
                        }),
                };
                if let Some(reason) = reason {
                    out.insert((target.clone(), field), reason);
                }
            }
        }
        out
    }
}

/// A connection policy in words: `cap 5, 10/s burst 5, monitor`.
pub fn policy_text(policy: &rlagent_common::Policy) -> String {
    let mut parts = vec![format!("cap {}", cap_text(policy.cap))];
    if policy.rate_interval_ns != 0 {
        parts.push(format!(
            "{} burst {}",
            crate::model::units::rate_text(policy.rate_interval_ns),
            policy.burst
        ));
    }
    if policy.flags & rlagent_common::POLICY_MONITOR != 0 {
        parts.push("monitor".to_string());
    }
    parts.join(", ")
}

pub fn cap_text(cap: u64) -> String {
    if cap == rlagent_common::UNLIMITED {
        "none".to_string()
    } else {
        cap.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        model::target::UserRef,
        testing::{FakeAgent, Users},
    };

    fn set(field: Field, value: &str) -> BTreeMap<Field, Option<String>> {
        BTreeMap::from([(field, Some(value.to_string()))])
    }

    const BATCH: &str = "[[quota]]\ntarget = \"batch\"\ncpu = \"50%\"\n";

    #[test]
    fn a_change_of_connection_caps_only_skips_the_cgroup_rewrite() {
        let fake = FakeAgent::new();
        let mut agent = fake.agent(BATCH);
        assert_eq!(
            fake.kernel.record().cgroups.len(),
            1,
            "start writes the plan once"
        );
        agent
            .change(&Target::User(UserRef::Uid(2000)), &set(Field::Conns, "3"))
            .unwrap();
        let record = fake.kernel.record();
        assert_eq!(
            record.cgroups.len(),
            1,
            "no cgroup write for a conns change"
        );
        assert_eq!(
            record
                .conns
                .last()
                .unwrap()
                .per_uid
                .get(&2000)
                .map(|p| p.cap),
            Some(3)
        );
        drop(record);
        agent
            .change(&Target::Group("batch".into()), &set(Field::Pids, "10"))
            .unwrap();
        let record = fake.kernel.record();
        assert_eq!(record.cgroups.len(), 2);
        let (_, before) = record.cgroups.last().unwrap();
        assert!(
            before.as_ref().is_some_and(|(_, complete)| *complete),
            "after a complete write, only the difference is written: {before:?}"
        );
    }

    #[test]
    fn a_write_of_only_what_changed_keeps_what_was_skipped_in_the_cgroups_it_left_alone() {
        let fake = FakeAgent::new();
        let skipped = |service: &str| Skipped {
            cgroup: PathBuf::from(service),
            field: Field::Memory,
            file: "memory.max",
        };
        fake.kernel.record().reports = vec![crate::kernel::CgroupReport {
            skipped: vec![skipped("db.service"), skipped("web.service")],
            ..Default::default()
        }];
        let mut agent = fake.agent(
            "[[quota]]\ntarget = \"cgroup:db.service\"\nmemory = \"1G\"\n[[quota]]\ntarget = \"cgroup:web.service\"\nmemory = \"1G\"\n",
        );
        let not_set = |agent: &Agent| -> Vec<String> {
            agent
                .not_enforced()
                .keys()
                .map(|(target, _)| target.to_string())
                .collect()
        };
        assert_eq!(not_set(&agent), ["cgroup:db.service", "cgroup:web.service"]);
        // Only db.service is written again, and its limit is set this time.
        fake.kernel.record().reports = vec![crate::kernel::CgroupReport {
            rewritten: Some([PathBuf::from("db.service")].into()),
            ..Default::default()
        }];
        agent
            .change(
                &Target::Cgroup("db.service".into()),
                &set(Field::Memory, "2G"),
            )
            .unwrap();
        assert_eq!(not_set(&agent), ["cgroup:web.service"]);
        // A runtime target cleared again: the plan no longer names its cgroup, and what
        // was skipped there is forgotten, though that write touched no cgroup.
        let api = Target::Cgroup("api.service".into());
        fake.kernel.record().reports = vec![crate::kernel::CgroupReport {
            skipped: vec![skipped("api.service")],
            rewritten: Some([PathBuf::from("api.service")].into()),
            ..Default::default()
        }];
        agent.change(&api, &set(Field::Memory, "1G")).unwrap();
        assert!(agent.limits_skipped.contains(&skipped("api.service")));
        fake.kernel.record().reports = vec![crate::kernel::CgroupReport {
            rewritten: Some(std::collections::BTreeSet::new()),
            ..Default::default()
        }];
        agent
            .change(&api, &BTreeMap::from([(Field::Memory, None)]))
            .unwrap();
        assert_eq!(agent.limits_skipped, [skipped("web.service")]);
    }

    #[test]
    fn a_failed_apply_rolls_back_and_keeps_the_state_file() {
        let fake = FakeAgent::new();
        let mut agent = fake.agent(BATCH);
        agent
            .change(&Target::Group("batch".into()), &set(Field::Pids, "10"))
            .unwrap();
        let saved = std::fs::read(fake.state_path()).unwrap();
        let before = agent.desired().clone();
        fake.kernel.record().fail_cgroups = vec![true];
        let target = Target::Cgroup("system.slice/db.service".into());
        let err = agent
            .change(&target, &set(Field::Memory, "1G"))
            .unwrap_err();
        assert!(matches!(err, AgentError::Kernel(_)), "{err}");
        assert_eq!(agent.desired(), &before, "what is enforced is unchanged");
        assert_eq!(std::fs::read(fake.state_path()).unwrap(), saved);
        assert!(!fake.state_path().with_extension("json.tmp").exists());
        let record = fake.kernel.record();
        let (failed, _) = &record.cgroups[record.cgroups.len() - 2];
        let (rolled_back, previous) = record.cgroups.last().unwrap();
        assert!(failed
            .cgroups
            .contains_key(Path::new("system.slice/db.service")));
        assert_eq!(
            rolled_back, &before.cgroups,
            "the roll-back rewrites the old plan"
        );
        assert_eq!(
            previous.as_ref(),
            Some(&(failed.clone(), false)),
            "and resets what the failed plan may have written, writing every cgroup"
        );
        assert_eq!(record.conns.last(), Some(&before.conns));
    }

    #[test]
    fn a_removed_cgroup_target_reaches_the_kernel_as_dropped() {
        let fake = FakeAgent::new();
        let mut agent = fake.agent("[[quota]]\ntarget = \"cgroup:db.service\"\nmemory = \"1G\"\n");
        fake.write_config("");
        let config = Config::load(Some(&fake.config_path()), &Users).unwrap();
        agent.reload(config).unwrap();
        let record = fake.kernel.record();
        let (plan, previous) = record.cgroups.last().unwrap();
        assert!(plan.cgroups.is_empty());
        let (previous, _) = previous.as_ref().unwrap();
        assert!(previous.cgroups.contains_key(Path::new("db.service")));
    }

    #[test]
    fn a_reload_writes_every_cgroup_even_when_its_plan_is_unchanged() {
        let fake = FakeAgent::new();
        let mut agent = fake.agent(BATCH);
        fake.write_config(BATCH);
        let config = Config::load(Some(&fake.config_path()), &Users).unwrap();
        agent.reload(config).unwrap();
        let record = fake.kernel.record();
        assert_eq!(record.cgroups.len(), 2, "written again, though unchanged");
        let (plan, before) = record.cgroups.last().unwrap();
        assert_eq!(
            before.as_ref(),
            Some(&(plan.clone(), false)),
            "as after an incomplete write: every cgroup, and /proc rescanned"
        );
        drop(record);
        // A reload refused before anything is written writes nothing, nor does its
        // roll-back, and the next change writes only what differs.
        fake.kernel.record().missing = vec!["gone.service".into()];
        fake.write_config(&format!(
            "{BATCH}[[quota]]\ntarget = \"cgroup:gone.service\"\nmemory = \"1G\"\n"
        ));
        let config = Config::load(Some(&fake.config_path()), &Users).unwrap();
        assert!(matches!(
            agent.reload(config),
            Err(AgentError::NoSuchCgroup { .. })
        ));
        assert_eq!(fake.kernel.record().cgroups.len(), 2, "no cgroup written");
        agent
            .change(&Target::Group("batch".into()), &set(Field::Pids, "10"))
            .unwrap();
        let record = fake.kernel.record();
        let (_, before) = record.cgroups.last().unwrap();
        assert!(
            before.as_ref().is_some_and(|(_, complete)| *complete),
            "{before:?}"
        );
    }

    #[test]
    fn reload_keeps_the_settings_only_a_restart_changes() {
        let fake = FakeAgent::new();
        let mut agent = fake.agent("[bpf]\npin_path = \"/sys/fs/bpf/one\"\n");
        fake.write_config(
            "[bpf]\npin_path = \"/sys/fs/bpf/two\"\n[[quota]]\ntarget = \"user:*\"\nconns = 4\n",
        );
        let config = Config::load(Some(&fake.config_path()), &Users).unwrap();
        let kept = agent.reload(config).unwrap();
        assert_eq!(kept, vec!["[bpf] pin_path"]);
        assert_eq!(agent.config().bpf.pin_path, Path::new("/sys/fs/bpf/one"));
        assert_eq!(
            agent.desired().conns.default_policy.cap,
            4,
            "the rest is applied"
        );
    }

    #[test]
    fn a_vanished_runtime_cgroup_target_is_skipped_and_blocks_nothing() {
        let fake = FakeAgent::new();
        let mut agent = fake.agent("");
        let db = Target::Cgroup("db.service".into());
        agent.change(&db, &set(Field::Memory, "1G")).unwrap();
        fake.kernel.record().missing = vec!["db.service".into()];
        agent
            .change(&Target::Group("batch".into()), &set(Field::Cpu, "10%"))
            .unwrap();
        assert_eq!(agent.skipped(), std::slice::from_ref(&db));
        assert!(!agent
            .desired()
            .cgroups
            .cgroups
            .contains_key(Path::new("db.service")));
        let err = agent.change(&db, &set(Field::Cpu, "5%")).unwrap_err();
        assert!(matches!(err, AgentError::NoSuchCgroup { .. }), "{err}");
        agent
            .change(&db, &BTreeMap::from([(Field::Memory, None)]))
            .unwrap();
        assert!(agent.skipped().is_empty(), "clearing it ends the skip");
        let saved = std::fs::read_to_string(fake.state_path()).unwrap();
        assert!(!saved.contains("db.service"), "{saved}");
    }

    #[test]
    fn a_missing_cgroup_target_of_the_config_is_still_refused() {
        let fake = FakeAgent::new();
        let mut agent = fake.agent("");
        fake.kernel.record().missing = vec!["gone.slice".into()];
        fake.write_config("[[quota]]\ntarget = \"cgroup:gone.slice\"\ncpu = \"5%\"\n");
        let config = Config::load(Some(&fake.config_path()), &Users).unwrap();
        let err = agent.reload(config).unwrap_err();
        assert!(matches!(err, AgentError::NoSuchCgroup { .. }), "{err}");
        assert!(
            agent.desired().quotas.is_empty(),
            "the running state is kept"
        );
    }

    #[test]
    fn a_config_cgroup_target_that_vanishes_blocks_no_other_change() {
        let fake = FakeAgent::new();
        let mut agent = fake.agent("[[quota]]\ntarget = \"cgroup:web.service\"\nmemory = \"1G\"\n");
        fake.kernel.record().missing = vec!["web.service".into()];
        agent
            .change(&Target::User(UserRef::Uid(2000)), &set(Field::Conns, "3"))
            .unwrap();
        assert_eq!(agent.skipped(), [Target::Cgroup("web.service".into())]);
        assert_eq!(
            agent.desired().conns.per_uid.get(&2000).map(|p| p.cap),
            Some(3)
        );
        let not_enforced = agent.not_enforced();
        let reason = &not_enforced[&(Target::Cgroup("web.service".into()), Field::Memory)];
        assert_eq!(*reason, Unenforced::CgroupGone);
    }
}
