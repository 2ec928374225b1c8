//! Fixtures shared by the unit tests: a fixed user database, configs and desired states
//! from TOML text, and fake cgroup2 trees in a tempdir.

use std::{io, path::Path};

use crate::{
    config::Config,
    desired::{cgroups::CgroupPlan, state::RuntimeState, Desired},
    model::users::UserDb,
};

/// A user database with root (0), daemon (1), alice (1001) and nobody (65534), and
/// groups root (0) and rlagent (990).
pub struct Users;

impl UserDb for Users {
    fn uid(&self, name: &str) -> io::Result<Option<u32>> {
        Ok(match name {
            "root" => Some(0),
            "daemon" => Some(1),
            "alice" => Some(1001),
            "nobody" => Some(65534),
            _ => None,
        })
    }

    fn gid(&self, name: &str) -> io::Result<Option<u32>> {
        Ok(match name {
            "root" => Some(0),
            "rlagent" => Some(990),
            _ => None,
        })
    }
}

/// A valid config from `text` (panics on an invalid one).
pub fn config(text: &str) -> Config {
    Config::parse(text, Path::new("t.toml"), &Users)
        .unwrap_or_else(|e| panic!("{}", crate::model::error_chain(&e)))
}

/// The desired state of `text` with no runtime overrides.
pub fn desired(text: &str) -> Desired {
    Desired::build(&config(text), &RuntimeState::default(), &Users).expect("desired state")
}

/// The cgroup plan of `text`.
pub fn plan(text: &str) -> CgroupPlan {
    desired(text).cgroups
}

/// Fake cgroup2 trees: directories with the interface files the kernel would create, so
/// drivers can be tested without root.
pub mod cgroupfs {
    use std::path::Path;

    /// The core files of a cgroup with `controllers` available in it.
    pub fn cgroup(dir: &Path, controllers: &str) {
        std::fs::create_dir_all(dir).unwrap();
        for (file, content) in [
            ("cgroup.controllers", controllers),
            ("cgroup.subtree_control", ""),
            ("cgroup.procs", ""),
        ] {
            let path = dir.join(file);
            if !path.exists() {
                std::fs::write(path, content).unwrap();
            }
        }
    }

    /// A cgroup with cpu, memory and pids enabled: the core files plus each limit file at
    /// `max`, as the kernel creates them.
    pub fn limited(dir: &Path) {
        cgroup(dir, "cpu memory pids");
        for f in ["cpu.max", "memory.max", "memory.high", "pids.max"] {
            std::fs::write(dir.join(f), "max").unwrap();
        }
    }
}

/// True when the test may run privileged steps (root). Otherwise it says it skips and
/// returns false, or fails under `RLAGENT_REQUIRE_PRIVILEGED=1` (as in CI), like the
/// privileged tests' harness.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("RLAGENT_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") {
        panic!("{test}: needs root, and RLAGENT_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("SKIP {test}: needs root");
    false
}
