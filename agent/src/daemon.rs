//! The running agent: one validated config in, one apply path for start and reload.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Instant,
};

use crate::{
    bpf::{BpfError, ConnLimiter, LinkAction},
    cgroup::{driver::CgroupDriver, plan::CgroupPlan, CgroupError, CgroupFs},
    cgroup2::{self, Cgroup2Error},
    config::Config,
    conn_limits::{unenforced_fields, ConnLimits},
    placement::{self, PlacementError, Placer},
    quota::Field,
    state::{Effective, RuntimeState, StateError},
    target::Target,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cgroup2(#[from] Cgroup2Error),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no group named {group:?} (groups come from [[group]] rules and group quotas)")]
    UnknownGroup { group: String },
    #[error("attach cgroup {path} does not exist; create it or fix [bpf] attach_cgroup")]
    NoAttachCgroup { path: PathBuf },
    #[error("{count} UIDs have their own connection cap; the kernel map holds at most {max}")]
    TooManyUidCaps { count: usize, max: u32 },
}

pub struct Agent {
    /// The config file as loaded.
    config: Config,
    /// Quotas set through the control socket.
    runtime: RuntimeState,
    /// What is enforced: the config with the runtime overrides merged in.
    effective: Effective,
    limiter: ConnLimiter,
    attach_cgroup: PathBuf,
    mount: PathBuf,
    placer: Option<Arc<RwLock<Placer>>>,
    /// The cgroup plan last applied: an unchanged plan (a change of connection caps only)
    /// skips rewriting every cgroup and rescanning /proc.
    applied_plan: Option<CgroupPlan>,
    started: Instant,
}

/// True when the config asks for cgroups at all (a conns-only config touches none).
fn wants_cgroups(plan: &CgroupPlan) -> bool {
    !plan.groups.is_empty()
        || !plan.users.is_empty()
        || plan.user_default.is_some()
        || !plan.cgroups.is_empty()
}

fn driver(mount: &std::path::Path) -> CgroupDriver {
    CgroupDriver::new(CgroupFs::new(mount))
}

/// Applies the cgroup plan and logs what could not be enforced.
fn apply_cgroups(mount: &std::path::Path, plan: &CgroupPlan) -> Result<(), DaemonError> {
    let report = driver(mount).apply(plan)?;
    for message in &report.unavailable {
        tracing::warn!("{message}");
    }
    for message in &report.skipped {
        tracing::warn!("limit not set, its controller is unavailable: {message}");
    }
    Ok(())
}

impl Agent {
    /// Loads the runtime state and merges it over `config`, loads the programs, writes the
    /// limits, then attaches (or adopts pinned links), so the programs never run with
    /// settings from before this config.
    pub fn start(config: Config) -> Result<Self, DaemonError> {
        let runtime = RuntimeState::load(&config.state_path)?;
        let effective = runtime.merge(&config)?;
        let limits = checked_limits(&effective.config)?;
        let mount = cgroup2::find_mount()?;
        let attach_cgroup = mount.join(&config.bpf.attach_cgroup);
        if !attach_cgroup.join("cgroup.procs").exists() {
            return Err(DaemonError::NoAttachCgroup {
                path: attach_cgroup,
            });
        }
        let plan = CgroupPlan::from_config(&effective.config);
        if wants_cgroups(&plan) {
            driver(&mount).check(&plan)?;
        }
        let mut limiter = ConnLimiter::load(&config.bpf.pin_path, config.bpf.max_tracked_sockets)?;
        limiter.apply(&limits)?;
        for (program, action) in limiter.attach(&attach_cgroup)? {
            let what = match action {
                LinkAction::Attached => "attached",
                LinkAction::Replaced => "attached, replacing the pinned link of an earlier run",
            };
            tracing::info!(program, cgroup = %attach_cgroup.display(), "{what}");
        }
        let mut agent = Self {
            config,
            runtime,
            effective: effective.clone(),
            limiter,
            attach_cgroup,
            mount,
            placer: None,
            applied_plan: None,
            started: Instant::now(),
        };
        agent.apply(&effective.config)?;
        Ok(agent)
    }

    /// Enforces `effective`: the connection limits and cgroup plan are derived and checked
    /// before anything is written, then BPF maps, cgroups and placement follow.
    fn apply(&mut self, effective: &Config) -> Result<(), DaemonError> {
        let limits = checked_limits(effective)?;
        let plan = CgroupPlan::from_config(effective);
        if wants_cgroups(&plan) {
            driver(&self.mount).check(&plan)?;
        }
        warn_unenforced(effective);
        self.limiter.apply(&limits)?;
        let unchanged = self.applied_plan.as_ref() == Some(&plan);
        if !unchanged && (wants_cgroups(&plan) || self.placer.is_some()) {
            // Until this apply completes, nothing is known to be applied: a roll-back after
            // a failure part-way must rewrite every cgroup, not skip an "unchanged" plan.
            self.applied_plan = None;
            apply_cgroups(&self.mount, &plan)?;
            match &self.placer {
                Some(placer) => placer.write().expect("placer lock").set_plan(plan.clone()),
                None => {
                    let placer =
                        Arc::new(RwLock::new(Placer::new(plan.clone(), driver(&self.mount))));
                    placement::watch(placer.clone())?;
                    self.placer = Some(placer);
                }
            }
            let report = self
                .placer
                .as_ref()
                .expect("set above")
                .read()
                .expect("placer lock")
                .scan();
            tracing::info!(
                seen = report.seen,
                moved = report.moved,
                failed = report.failed,
                "placed processes"
            );
        }
        self.applied_plan = Some(plan);
        tracing::info!(
            uid_caps = limits.per_uid.len(),
            default_cap = %cap_text(limits.default_cap),
            host_cap = %cap_text(limits.host_cap),
            targets = effective.quotas.len(),
            "enforcing"
        );
        Ok(())
    }

    /// Re-applies what was enforced before a failed change, so a failure in the middle of
    /// an apply does not leave half of it in force.
    fn roll_back(&mut self) {
        let previous = self.effective.config.clone();
        if let Err(e) = self.apply(&previous) {
            tracing::error!("rolling back to the previous quotas failed: {e}");
        }
    }

    /// Applies a new, already validated config file, keeping the runtime overrides.
    /// Settings that need a restart (attach point, pin path) are reported and kept.
    pub fn reload(&mut self, config: Config) -> Result<(), DaemonError> {
        if config.bpf.attach_cgroup != self.config.bpf.attach_cgroup
            || config.bpf.pin_path != self.config.bpf.pin_path
            || config.bpf.max_tracked_sockets != self.config.bpf.max_tracked_sockets
        {
            tracing::warn!(
                "[bpf] attach_cgroup, pin_path and max_tracked_sockets take effect at the next start; keeping {}",
                self.attach_cgroup.display()
            );
        }
        let effective = self.runtime.merge(&config)?;
        if let Err(e) = self.apply(&effective.config) {
            self.roll_back();
            return Err(e);
        }
        tracing::info!(config = %config.source.display(), "reloaded");
        self.config = config;
        self.effective = effective;
        Ok(())
    }

    /// Sets (`Some`) or clears (`None`) quota fields of `target` at runtime. All or
    /// nothing: the merged result is validated, the new state file is staged durably,
    /// the quotas are applied, and only then is the state file moved into place. On any
    /// failure the previous quotas are re-applied and the old state file stays.
    pub fn change(
        &mut self,
        target: &Target,
        fields: &BTreeMap<Field, Option<String>>,
    ) -> Result<(), DaemonError> {
        let next = self.runtime.with(target, fields);
        let effective = next.merge(&self.config)?;
        let state_path = self.config.state_path.clone();
        let staged = next.stage(&state_path)?;
        let result = self
            .apply(&effective.config)
            .and_then(|()| RuntimeState::commit(&staged, &state_path).map_err(DaemonError::from));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&staged);
            self.roll_back();
            return Err(e);
        }
        self.runtime = next;
        self.effective = effective;
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn effective(&self) -> &Effective {
        &self.effective
    }

    pub fn limiter(&self) -> &ConnLimiter {
        &self.limiter
    }

    pub fn mount(&self) -> &std::path::Path {
        &self.mount
    }

    pub fn attach_cgroup(&self) -> &std::path::Path {
        &self.attach_cgroup
    }

    /// Processes placed since start.
    pub fn placement_moves(&self) -> u64 {
        self.placer
            .as_ref()
            .map_or(0, |p| p.read().expect("placer lock").moves())
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Moves processes into a group's cgroup (for `rlctl move` and `rlctl run`).
    pub fn move_to_group(&self, group: &str, pids: &[u32]) -> Result<PathBuf, DaemonError> {
        let plan = CgroupPlan::from_config(&self.effective.config);
        if !plan.groups.contains_key(group) {
            return Err(DaemonError::UnknownGroup {
                group: group.to_string(),
            });
        }
        let relative = plan.group_cgroup(group);
        let fs = CgroupFs::new(&self.mount);
        for pid in pids {
            fs.move_pid(&relative, *pid)?;
        }
        Ok(relative)
    }
}

/// Limits for `config`, refused before anything is written if the kernel maps could not
/// hold them.
fn checked_limits(config: &Config) -> Result<ConnLimits, DaemonError> {
    let limits = ConnLimits::from_config(config);
    if limits.per_uid.len() > rlagent_common::MAX_UID_CAPS as usize {
        return Err(DaemonError::TooManyUidCaps {
            count: limits.per_uid.len(),
            max: rlagent_common::MAX_UID_CAPS,
        });
    }
    Ok(limits)
}

fn warn_unenforced(config: &Config) {
    for (target, fields) in unenforced_fields(config) {
        tracing::warn!(
            %target,
            fields = %fields.join(", "),
            "quota fields accepted but not enforced by this build yet (rate limits and group connection caps come later)"
        );
    }
}

pub fn cap_text(cap: u64) -> String {
    if cap == rlagent_common::UNLIMITED {
        "none".to_string()
    } else {
        cap.to_string()
    }
}
