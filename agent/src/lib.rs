//! rlagent: host-level resource enforcement. See design.md in the repository's shared notes
//! and the README for the architecture.

pub mod config;
pub mod quota;
pub mod target;
pub mod users;
