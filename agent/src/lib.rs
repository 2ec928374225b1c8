//! rlagent: host-level resource enforcement (cgroup v2 quotas, per-UID connection caps in
//! eBPF). docs/architecture.md shows the data flow.
//!
//! Layers, each a folder, in the order the data flows:
//!
//! - `model`: vocabulary (quotas and units, targets, durations, alert rules, measured
//!   usage); no I/O, imports no other layer.
//! - `config`: TOML → validated `Config`; imports `model`.
//! - `desired`: `Config` + runtime overrides → `Desired` (cgroup plan, connection limits,
//!   alert rules), and the runtime state file; imports `model`, `config`.
//! - `kernel`: adapters (BPF, cgroups, placement, NSS) that take `Desired` and never see
//!   `Config`; imports `model`, `desired`.
//! - `observe`: the Stats model, tables, /metrics, the alert engine; imports `model`,
//!   `desired`.
//! - `agent`: reconcile and the composition root (`App`); imports everything above.
//! - `control`: the socket protocol, access, transport and handlers; imports `agent`,
//!   `observe` and the layers below them, never `kernel`.
//!
//! Nothing imports a layer that is not listed for it, and no two modules of one layer import
//! each other around a circle: a unit test (layering.rs) resolves every `crate::`, `super::`
//! and `self::` path of the non-test code and checks it.

pub mod agent;
pub mod config;
pub mod control;
pub mod desired;
pub mod kernel;
pub mod manpage;
pub mod model;
pub mod observe;

#[cfg(test)]
mod testing;

#[cfg(test)]
mod layering;
