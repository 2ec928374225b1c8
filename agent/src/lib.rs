//! rlagent: host-level resource enforcement. See design.md in the repository's shared notes
//! and the README for the architecture.

pub mod alerts;
pub mod bpf;
pub mod cgroup;
pub mod cgroup2;
pub mod config;
pub mod conn_limits;
pub mod control;
pub mod daemon;
pub mod metrics;
pub mod placement;
pub mod proc_events;
pub mod quota;
pub mod state;
pub mod stats;
pub mod target;
pub mod users;
