//! The running agent: one validated config in, one apply path for start and reload.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use crate::{
    bpf::{BpfError, ConnLimiter, LinkAction},
    cgroup::{driver::CgroupDriver, plan::CgroupPlan, CgroupError, CgroupFs},
    cgroup2::{self, Cgroup2Error},
    config::Config,
    conn_limits::{unenforced_fields, ConnLimits},
    placement::{self, PlacementError, Placer},
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
    #[error("attach cgroup {path} does not exist; create it or fix [bpf] attach_cgroup")]
    NoAttachCgroup { path: PathBuf },
    #[error("{count} UIDs have their own connection cap; the kernel map holds at most {max}")]
    TooManyUidCaps { count: usize, max: u32 },
}

pub struct Agent {
    config: Config,
    limiter: ConnLimiter,
    attach_cgroup: PathBuf,
    mount: PathBuf,
    placer: Option<Arc<RwLock<Placer>>>,
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
    /// Loads the programs, writes the limits, then attaches (or adopts pinned links), so
    /// the programs never run with settings from before this config.
    pub fn start(config: Config) -> Result<Self, DaemonError> {
        let limits = checked_limits(&config)?;
        warn_unenforced(&config);
        let mount = cgroup2::find_mount()?;
        let attach_cgroup = mount.join(&config.bpf.attach_cgroup);
        if !attach_cgroup.join("cgroup.procs").exists() {
            return Err(DaemonError::NoAttachCgroup {
                path: attach_cgroup,
            });
        }
        let plan = CgroupPlan::from_config(&config);
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
        tracing::info!(
            config = %config.source.display(),
            uid_caps = limits.per_uid.len(),
            default_cap = %cap_text(limits.default_cap),
            host_cap = %cap_text(limits.host_cap),
            "enforcing connection limits"
        );
        let placer = if wants_cgroups(&plan) {
            apply_cgroups(&mount, &plan)?;
            let placer = Arc::new(RwLock::new(Placer::new(plan, driver(&mount))));
            let report = placer.read().expect("placer lock").scan();
            tracing::info!(
                seen = report.seen,
                moved = report.moved,
                failed = report.failed,
                "placed existing processes"
            );
            placement::watch(placer.clone())?;
            Some(placer)
        } else {
            None
        };
        Ok(Self {
            config,
            limiter,
            attach_cgroup,
            mount,
            placer,
        })
    }

    /// Applies a new, already validated config. Settings that need a restart (attach
    /// point, pin path) are reported and left as they are.
    pub fn reload(&mut self, config: Config) -> Result<(), DaemonError> {
        let limits = checked_limits(&config)?;
        if config.bpf.attach_cgroup != self.config.bpf.attach_cgroup
            || config.bpf.pin_path != self.config.bpf.pin_path
            || config.bpf.max_tracked_sockets != self.config.bpf.max_tracked_sockets
        {
            tracing::warn!(
                "[bpf] attach_cgroup, pin_path and max_tracked_sockets take effect at the next start; keeping {}",
                self.attach_cgroup.display()
            );
        }
        warn_unenforced(&config);
        let plan = CgroupPlan::from_config(&config);
        if wants_cgroups(&plan) {
            driver(&self.mount).check(&plan)?;
        }
        self.limiter.apply(&limits)?;
        if wants_cgroups(&plan) || self.placer.is_some() {
            apply_cgroups(&self.mount, &plan)?;
            match &self.placer {
                Some(placer) => placer.write().expect("placer lock").set_plan(plan),
                None => {
                    let placer = Arc::new(RwLock::new(Placer::new(plan, driver(&self.mount))));
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
                moved = report.moved,
                failed = report.failed,
                "re-placed processes"
            );
        }
        tracing::info!(
            config = %config.source.display(),
            uid_caps = limits.per_uid.len(),
            default_cap = %cap_text(limits.default_cap),
            host_cap = %cap_text(limits.host_cap),
            "reloaded"
        );
        self.config = config;
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn limiter(&self) -> &ConnLimiter {
        &self.limiter
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
