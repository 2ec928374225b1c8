//! Harness for rlagent's privileged tests and benchmarks: a child cgroup of this host's
//! cgroup2 mount (never the root), a private bpffs for pins, the real `rlagent` binary,
//! loopback listeners and `conn-helper` processes running as test UIDs.
//!
//! Everything created here is removed on drop; only processes started here are killed,
//! by PID.
mod agent;
mod cgroups;
mod http;
mod net;
pub mod queries;

pub use agent::*;
pub use cgroups::*;
pub use http::*;
pub use net::*;

/// True when this process may run privileged tests (root, cgroup2 mounted). Otherwise
/// prints why and returns false, or panics when `RLAGENT_REQUIRE_PRIVILEGED=1` (CI), where
/// a skip is a failure.
pub fn privileged(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("needs root".to_string())
    } else {
        rlagent::kernel::cgroup::mount::find()
            .err()
            .map(|e| e.to_string())
    };
    let Some(why) = why else { return true };
    skip(test, &why);
    false
}

/// Says that `test` skips because of `why`, or panics when `RLAGENT_REQUIRE_PRIVILEGED=1`
/// (CI), where a skip is a failure.
pub fn skip(test: &str, why: &str) {
    if std::env::var("RLAGENT_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: {why}, and RLAGENT_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("SKIP {test}: {why}");
}
