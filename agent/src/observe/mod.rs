//! What the agent reports: the one [`stats::Stats`] model, its table, /metrics, and the
//! alert engine with its delivery. Depends on `model` and `desired` only: the agent
//! assembles the stats from the kernel adapters and hands them in.

pub mod adapt;
pub mod alerts;
pub mod budget;
pub mod events;
pub mod metrics;
pub mod stats;
pub mod table;
