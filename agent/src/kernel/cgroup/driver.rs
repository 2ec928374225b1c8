//! What both cgroup drivers (cgroupfs, systemd) report about an apply.

use std::{collections::BTreeSet, path::PathBuf};

use super::Controller;
use crate::model::quota::Field;

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
