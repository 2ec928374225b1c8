//! The agent: the reconcile loop ([`reconcile::Agent`]) and the composition root
//! ([`app::App`]) that every entry point goes through.

pub mod adapt;
pub mod app;
pub mod error;
pub mod reconcile;
pub mod status;
pub mod tasks;

pub use app::{collect_stats, resolve_driver, App, Snapshot};
pub use error::{AppError, Refusal};
pub use reconcile::{cap_text, policy_text, Agent, AgentError};
pub use status::{HostStatus, Status};
