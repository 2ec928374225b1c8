//! The agent's own alert engine and its delivery: rules (from `model::alert`) evaluated
//! against the Stats model, transitions to the log, the socket and an Alertmanager.

pub mod alertmanager;
pub mod engine;
mod history;

pub use engine::Engine;
