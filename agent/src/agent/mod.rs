//! The agent: the reconcile loop ([`reconcile::Agent`]) and the composition root
//! ([`app::App`]) that every entry point goes through.

pub mod app;
pub mod reconcile;

pub use app::{collect_stats, App, AppError, HostStatus, Refusal, Snapshot, Status};
pub use reconcile::{cap_text, Agent, AgentError};
