//! The interface of a cgroup driver, [`CgroupDriver`], and what both drivers (cgroupfs,
//! systemd) report about an apply. The agent chooses one driver at start
//! (`cgroup_driver`) and talks to it only through this trait.

use std::{collections::BTreeSet, path::PathBuf, sync::Arc};

use super::{mover::Mover, stats, systemd::SystemdError, CgroupError, CgroupFs, Controller};
use crate::{
    desired::cgroups::{Before, CgroupPlan},
    model::{
        quota::Field,
        usage::{CgroupStats, Detail},
    },
};

/// A driver's failure: a cgroup file it read or wrote, or a call to systemd.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Systemd(#[from] SystemdError),
}

/// What writes the cgroup tree: [`super::cgroupfs::CgroupfsDriver`] (the agent's own
/// subtree, files written directly) or [`super::systemd::SystemdDriver`] (unit properties
/// and transient scopes over D-Bus). Both read the same cgroup2 files for what exists and
/// for stats, through [`Self::fs`].
pub trait CgroupDriver: Send + Sync {
    /// The cgroup2 hierarchy the driver's cgroups are in.
    fn fs(&self) -> &CgroupFs;

    /// Whether [`Self::apply`] has anything to write for `plan` after `before` (what was
    /// applied before); when it has not and placement is not running, the driver is not
    /// called.
    fn needs_apply(&self, plan: &CgroupPlan, before: Before) -> bool;

    /// Writes the limits of `plan` (after a complete write of another plan, only what
    /// differs from it) and lifts those of the plan before (or of an earlier run) that
    /// `plan` drops; says what could not be enforced.
    fn apply(&self, plan: &CgroupPlan, before: Before) -> Result<ApplyReport, DriverError>;

    /// Whether placement runs under `plan` (watches process events and scans /proc).
    fn places(&self, plan: &CgroupPlan) -> bool;

    /// How placement moves processes under this driver.
    fn mover(self: Arc<Self>) -> Box<dyn Mover>;

    /// Moves `pids` into `group` (`rlctl run`, `rlctl move`); returns the cgroup they are
    /// in now (relative to the mount).
    fn move_pids(
        &self,
        plan: &CgroupPlan,
        group: &str,
        pids: &[u32],
    ) -> Result<PathBuf, DriverError>;

    /// The `cgroup:<path>` targets of `plan` that do not exist (a stopped service's cgroup
    /// is gone).
    fn missing(&self, plan: &CgroupPlan) -> Vec<PathBuf> {
        plan.cgroups
            .keys()
            .filter(|path| !self.fs().path(path).join("cgroup.procs").exists())
            .cloned()
            .collect()
    }

    /// Usage of every cgroup `plan` manages that exists, labelled with its target.
    fn stats(
        &self,
        plan: &CgroupPlan,
        detail: Detail,
    ) -> Result<Vec<(String, CgroupStats)>, DriverError> {
        Ok(stats::plan_stats(self.fs(), plan, detail)?)
    }
}

/// What one apply did: what could not be enforced, and why.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Controllers that cannot be used (each message names the controller and the path).
    pub unavailable: Vec<String>,
    /// Controllers not available to the agent's subtree: no group or user limit of theirs
    /// is in force.
    pub subtree_missing: BTreeSet<Controller>,
    /// Limits that could not be set because their interface file does not exist.
    pub skipped: Vec<Skipped>,
    /// The cgroups written (relative to the mount), when only what changed was: `skipped`
    /// is about these, and what was skipped elsewhere before still is. `None`: all.
    pub rewritten: Option<BTreeSet<PathBuf>>,
}

/// A limit that was not set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The cgroup, relative to the mount.
    pub cgroup: PathBuf,
    pub field: Field,
    pub file: &'static str,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} not set in /{} ({} does not exist: its controller is not enabled there)",
            self.field,
            self.cgroup.display(),
            self.file
        )
    }
}

/// The interface file that carries a cgroup field (whose existence says its controller is
/// enabled for the cgroup); none for the connection fields, which no cgroup file carries.
pub fn interface_file(field: Field) -> &'static str {
    match field {
        Field::Cpu => "cpu.max",
        Field::Memory => "memory.max",
        Field::MemoryHigh => "memory.high",
        Field::Pids => "pids.max",
        Field::Conns | Field::ConnRate | Field::ConnBurst | Field::Mode => "",
    }
}
