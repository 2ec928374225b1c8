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
    fn groups_of(&self, uid: u32) -> std::io::Result<Vec<u32>> {
        Ok(if uid == 1001 {
            vec![1001, 990]
        } else {
            Vec::new()
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

/// Fakes of the kernel adapters, recording what the agent asked of them.
pub mod kernel {
    use std::{
        path::PathBuf,
        sync::{mpsc, Arc, Mutex},
    };

    use crate::{
        desired::{
            cgroups::{Before, CgroupPlan},
            conns::{ConnLimits, GroupUnenforced},
        },
        kernel::{
            cgroup::CgroupError, CgroupReport, ConnUsage, Enforcer, KernelError, Observer,
            UnenforcedGroups,
        },
        model::usage::{CgroupStats, Detail, ProgramStats},
    };

    /// What the fake enforcer saw, and how it should misbehave.
    #[derive(Debug, Default)]
    pub struct Record {
        /// Every limits write, in order.
        pub conns: Vec<ConnLimits>,
        /// Each plan written, with the one before it and whether that write completed.
        pub cgroups: Vec<(CgroupPlan, Option<(CgroupPlan, bool)>)>,
        /// Fail the next cgroup write(s): each `true` is one failure.
        pub fail_cgroups: Vec<bool>,
        /// Panic in the next limits write.
        pub panic_conns: bool,
        /// Hold the next cgroup write: it says so on the first channel, then waits for a
        /// message (or a hang-up) on the second, without holding this record.
        pub hold_cgroups: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
        /// Every move: the cgroup and the PIDs.
        pub moved: Vec<(PathBuf, Vec<u32>)>,
        /// `cgroup:<path>` targets that do not exist.
        pub missing: Vec<PathBuf>,
        /// What the next cgroup writes report, in order (then an empty report).
        pub reports: Vec<CgroupReport>,
    }

    /// An [`Enforcer`] that records instead of writing; share its record to inspect it.
    #[derive(Clone, Default)]
    pub struct FakeEnforcer(pub Arc<Mutex<Record>>);

    impl FakeEnforcer {
        pub fn record(&self) -> std::sync::MutexGuard<'_, Record> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl Enforcer for FakeEnforcer {
        fn missing_cgroups(&self, plan: &CgroupPlan) -> Vec<PathBuf> {
            let record = self.record();
            plan.cgroups
                .keys()
                .filter(|p| record.missing.contains(p))
                .cloned()
                .collect()
        }

        fn groups_moved(&self, _conns: &ConnLimits) -> bool {
            false
        }

        fn retire_idle(&mut self, _conns: &ConnLimits) -> Result<usize, KernelError> {
            Ok(0)
        }

        fn apply_conns(&mut self, conns: &ConnLimits) -> Result<UnenforcedGroups, KernelError> {
            let mut record = self.record();
            if std::mem::take(&mut record.panic_conns) {
                drop(record);
                panic!("the fake kernel panics");
            }
            record.conns.push(conns.clone());
            // A group's cgroup exists once the cgroups were applied with it.
            let pending = conns
                .groups
                .keys()
                .filter(|g| {
                    !record
                        .cgroups
                        .last()
                        .is_some_and(|(p, _)| p.groups.contains_key(*g))
                })
                .map(|g| (g.clone(), GroupUnenforced::CgroupMissing))
                .collect();
            Ok(pending)
        }

        fn apply_cgroups(
            &mut self,
            plan: &CgroupPlan,
            before: Before,
        ) -> Result<CgroupReport, KernelError> {
            let previous = before
                .plan()
                .map(|p| (p.clone(), before.complete().is_some()));
            let hold = self.record().hold_cgroups.take();
            if let Some((entered, release)) = hold {
                let _ = entered.send(());
                let _ = release.recv();
            }
            let mut record = self.record();
            record.cgroups.push((plan.clone(), previous));
            if !record.fail_cgroups.is_empty() && record.fail_cgroups.remove(0) {
                return Err(KernelError::Cgroup(CgroupError::Write {
                    path: PathBuf::from("/fake/cpu.max"),
                    value: "50000 100000".into(),
                    source: std::io::Error::from_raw_os_error(libc::EACCES),
                }));
            }
            if record.reports.is_empty() {
                return Ok(CgroupReport::default());
            }
            Ok(record.reports.remove(0))
        }

        fn move_pids(
            &self,
            plan: &CgroupPlan,
            group: &str,
            pids: &[u32],
        ) -> Result<std::path::PathBuf, KernelError> {
            let cgroup = plan.group_cgroup(group);
            self.record().moved.push((cgroup.clone(), pids.to_vec()));
            Ok(cgroup)
        }
    }

    /// An [`Observer`] with no cgroups and no programs.
    pub struct FakeObserver;

    impl Observer for FakeObserver {
        fn cgroup_stats(
            &self,
            _: &CgroupPlan,
            _: Detail,
        ) -> Result<Vec<(String, CgroupStats)>, KernelError> {
            Ok(Vec::new())
        }
        fn conn_usage(&self) -> Result<Option<ConnUsage>, KernelError> {
            Ok(None)
        }
        fn program_stats(&self) -> Vec<ProgramStats> {
            Vec::new()
        }
        fn placement_moves(&self) -> u64 {
            0
        }
        fn pins_missing(&self) -> Vec<PathBuf> {
            Vec::new()
        }
        fn cgroup2(&self) -> (PathBuf, Vec<String>) {
            (
                PathBuf::from("/sys/fs/cgroup"),
                vec!["cpu".into(), "memory".into()],
            )
        }
        fn kernel_features(&self) -> Vec<crate::model::feature::KernelFeature> {
            use crate::model::feature::{FeatureState, KernelFeature};
            vec![KernelFeature {
                name: "psi_triggers".into(),
                state: FeatureState::Missing,
                required: false,
                without: "nothing yet".into(),
                detail: None,
            }]
        }
        fn host_pressure(&self) -> crate::model::adapt::HostPressure {
            Default::default()
        }
        fn user_usage(
            &self,
            _: &crate::model::layout::Layout,
            _: &[crate::model::adapt::UserSignal],
        ) -> std::collections::BTreeMap<u32, crate::model::adapt::UserSample> {
            Default::default()
        }
    }
}

/// An agent on the fake kernel, with its config file and state file in a tempdir.
pub struct FakeAgent {
    pub dir: tempfile::TempDir,
    pub kernel: kernel::FakeEnforcer,
}

impl FakeAgent {
    /// The config path and state path for `text` (`state_path` is set to the tempdir).
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            kernel: kernel::FakeEnforcer::default(),
        }
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("rlagent.toml")
    }

    pub fn state_path(&self) -> std::path::PathBuf {
        self.dir.path().join("state.json")
    }

    /// Writes `text` (with this agent's state path) as the config file.
    pub fn write_config(&self, text: &str) {
        let full = format!("state_path = {:?}\n{text}", self.state_path());
        std::fs::write(self.config_path(), full).unwrap();
    }

    /// Starts an agent on `text`.
    pub fn agent(&self, text: &str) -> crate::agent::Agent {
        self.write_config(text);
        let config = Config::load(Some(&self.config_path()), &Users).unwrap();
        let runtime = RuntimeState::default();
        let desired = Desired::build(&config, &runtime, &Users).unwrap();
        crate::agent::Agent::start(
            config,
            runtime,
            desired,
            Box::new(self.kernel.clone()),
            std::sync::Arc::new(Users),
        )
        .unwrap()
    }

    /// An app around an agent started on `text`.
    pub fn app(&self, text: &str) -> std::sync::Arc<crate::agent::App> {
        crate::agent::App::new(
            self.agent(text),
            std::sync::Arc::new(kernel::FakeObserver),
            Some(self.config_path()),
            std::sync::Arc::new(Users),
        )
    }

    /// [`FakeAgent::app`] with the agent's process and PID 1 in the cgroups `own`.
    pub fn app_in(&self, text: &str, own: &[&str]) -> std::sync::Arc<crate::agent::App> {
        crate::agent::App::with_own_cgroups(
            self.agent(text),
            std::sync::Arc::new(kernel::FakeObserver),
            Some(self.config_path()),
            std::sync::Arc::new(Users),
            own.iter().map(std::path::PathBuf::from).collect(),
        )
    }
}

/// A group target's stats with `cpu` and `memory` (the other controllers off).
pub fn group_stats(
    name: &str,
    procs: usize,
    cpu: crate::model::usage::CpuStats,
    memory: crate::model::usage::MemoryStats,
) -> crate::observe::stats::TargetStats {
    crate::observe::stats::TargetStats {
        target: format!("group:{name}"),
        cgroup: crate::model::usage::CgroupStats {
            cgroup: format!("rlagent.slice/{name}").into(),
            procs,
            cpu: Some(cpu),
            cpu_max: None,
            memory: Some(memory),
            pids: None,
            cpu_pressure: None,
            memory_pressure: None,
        },
    }
}

/// One UID's connection counters (no host-cap denials).
pub fn uid_stats(
    uid: u32,
    live: u64,
    cap: Option<u64>,
    admitted: u64,
    denied_cap: u64,
) -> crate::model::usage::UidConnStats {
    crate::model::usage::UidConnStats {
        uid,
        live,
        cap,
        rate: None,
        monitor: false,
        admitted,
        denied: crate::model::usage::ByReason {
            cap: denied_cap,
            ..Default::default()
        },
        would_deny: Default::default(),
        events_dropped: 0,
    }
}
