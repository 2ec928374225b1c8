//! How a driver moves a process where placement decided it belongs: the cgroupfs driver
//! writes `cgroup.procs`, the systemd driver starts a transient scope. Each driver gives
//! its own [`Mover`] (`CgroupDriver::mover`); placement decides, the mover moves.

use std::path::{Path, PathBuf};

use super::{systemd::SystemdError, CgroupError};
use crate::{desired::cgroups::CgroupPlan, kernel::proc::ProcInfo};

/// Where a process belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Group(String),
    User(u32),
    Leave,
}

/// Moves processes for placement under one driver.
pub trait Mover: Send + Sync {
    /// Whether placement may take a process out of `cgroup` at all.
    fn eligible(&self, plan: &CgroupPlan, cgroup: &Path) -> bool;
    /// Moves `info` where `decision` sends it; `None` when it is already there or the
    /// driver leaves it.
    fn place(
        &self,
        plan: &CgroupPlan,
        info: &ProcInfo,
        decision: &Decision,
    ) -> Result<Option<Moved>, MoveError>;
}

/// Where a process went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub to: PathBuf,
    /// The children it had went along (the systemd driver moves a whole tree at once).
    pub with_children: bool,
}

/// Why a process could not be moved (placement adds which process it was).
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("moving into {}", cgroup.display())]
    Cgroup {
        /// The cgroup it was to go to (absolute).
        cgroup: PathBuf,
        #[source]
        source: CgroupError,
    },
    #[error("starting a scope in group {group}")]
    Scope {
        group: String,
        #[source]
        source: SystemdError,
    },
}
