//! The running agent: one validated config in, one apply path for start and reload.

use std::path::PathBuf;

use crate::{
    bpf::{BpfError, ConnLimiter, LinkAction},
    cgroup2::{self, Cgroup2Error},
    config::Config,
    conn_limits::{unenforced_fields, ConnLimits},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cgroup2(#[from] Cgroup2Error),
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("attach cgroup {path} does not exist; create it or fix [bpf] attach_cgroup")]
    NoAttachCgroup { path: PathBuf },
    #[error("{count} UIDs have their own connection cap; the kernel map holds at most {max}")]
    TooManyUidCaps { count: usize, max: u32 },
}

pub struct Agent {
    config: Config,
    limiter: ConnLimiter,
    attach_cgroup: PathBuf,
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
        Ok(Self {
            config,
            limiter,
            attach_cgroup,
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
        self.limiter.apply(&limits)?;
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
            "quota fields accepted but not enforced by this build yet (cgroup quotas, rate limits and group connection caps come later)"
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
