// Why this file is long: `System` composes every adapter and owns the start sequence (mount,
// driver, programs, seeding, old versions), which must stay in one order.
//! Adapters to the kernel: they take the desired state (`desired`) and never see the
//! config. Two traits are the boundary the agent reconciles through, so the reconcile and
//! roll-back logic is tested against fakes: [`Enforcer`] writes, [`Observer`] reads (and is
//! shared with stats, /metrics and alerts without the agent's lock). [`System`] and
//! [`SystemObserver`] are the real ones: BPF maps and links, the cgroup driver chosen at
//! start (cgroupfs, or systemd over D-Bus: [`cgroup::driver::CgroupDriver`]) and
//! placement.

pub mod bpf;
pub mod cgroup;
pub mod features;
pub mod heap;
pub mod nss;
pub mod placement;
pub mod proc;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{atomic::AtomicU64, Arc, RwLock},
};

use crate::{
    desired::{
        cgroups::{Before, CgroupPlan},
        conns::{ConnLimits, GroupUnenforced},
        Desired,
    },
    model::{
        adapt::{HostPressure, UserSample, UserSignal},
        feature::{FeatureState, KernelFeature},
        layout::{Driver, Layout},
        usage::{CgroupStats, Detail, GroupConnStats, HostConnStats, ProgramStats, UidConnStats},
    },
};
use bpf::{BpfError, ConnLimiter, LinkAction, PinnedMaps};
use cgroup::{
    cgroupfs::CgroupfsDriver,
    driver::{CgroupDriver, DriverError, Skipped},
    mount::MountError,
    systemd::{self, SystemdDriver, SystemdError},
    CgroupError, CgroupFs, Controller,
};
use placement::{PlacementError, Placer, ScanReport};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Mount(#[from] MountError),
    /// Boxed: aya's errors are large, and this one travels up through every layer.
    #[error(transparent)]
    Bpf(Box<BpfError>),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Boxed, like `Bpf`: it carries a process's name, cgroup and the cgroup error.
    #[error(transparent)]
    Placement(Box<PlacementError>),
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    #[error("attach cgroup {path} does not exist; create it or fix [bpf] attach_cgroup")]
    NoAttachCgroup { path: PathBuf },
    #[error(
        "the kernel lacks {name} (or refuses it to this process: some helpers need CAP_PERFMON or CAP_SYS_ADMIN); the programs cannot load without it: {without}"
    )]
    MissingFeature { name: String, without: String },
}

impl From<BpfError> for KernelError {
    fn from(e: BpfError) -> Self {
        Self::Bpf(Box::new(e))
    }
}

impl From<DriverError> for KernelError {
    fn from(e: DriverError) -> Self {
        match e {
            DriverError::Cgroup(e) => Self::Cgroup(e),
            DriverError::Systemd(e) => Self::Systemd(e),
        }
    }
}

impl From<PlacementError> for KernelError {
    fn from(e: PlacementError) -> Self {
        Self::Placement(Box::new(e))
    }
}

/// Where the programs attach and pin: fixed for the agent's lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The cgroup2 mount.
    pub mount: PathBuf,
    /// Relative to the cgroup2 mount; empty = the root (host-wide).
    pub attach_cgroup: PathBuf,
    pub pin_path: PathBuf,
    /// Size of the charged-socket map when it is created.
    pub max_tracked_sockets: u32,
    /// Who writes the cgroup tree.
    pub driver: Driver,
    /// Where the systemd driver records the unit properties it set (beside the control
    /// socket, so it is gone at reboot like the properties themselves).
    pub systemd_record: Option<PathBuf>,
}

/// What applying a cgroup plan did.
#[derive(Debug, Default)]
pub struct CgroupReport {
    /// Controllers that cannot be used (each message names the controller and the path).
    pub unavailable: Vec<String>,
    /// Controllers the agent's subtree lacks, so no group or user limit of theirs holds.
    pub subtree_missing: BTreeSet<Controller>,
    /// Limits of `cgroup:<path>` targets (or any cgroup) that could not be set.
    pub skipped: Vec<Skipped>,
    /// As [`cgroup::driver::ApplyReport::rewritten`].
    pub rewritten: Option<BTreeSet<PathBuf>>,
    /// The /proc scan that followed, when placement runs and where processes belong may
    /// have changed.
    pub placed: Option<ScanReport>,
}

/// Connection counters as the kernel maps hold them.
#[derive(Debug, Clone, Default)]
pub struct ConnUsage {
    pub host: Option<HostConnStats>,
    pub per_uid: Vec<UidConnStats>,
    /// By the group's cgroup id (`group` is named by the caller, see [`group_ids`]).
    pub groups: BTreeMap<u64, GroupConnStats>,
}

/// The cgroup ids of the groups `conns` limits whose cgroups exist under `mount`, with
/// the group's name: how the programs' group ids read as names.
pub fn group_ids(mount: &Path, conns: &ConnLimits) -> BTreeMap<u64, String> {
    let ids = CgroupFs::new(mount).ids(conns.groups.values().map(|g| g.cgroup.as_path()));
    conns
        .groups
        .iter()
        .filter_map(|(name, g)| Some((*ids.get(g.cgroup.as_path())?, name.clone())))
        .collect()
}

/// Groups whose connection limits the programs cannot apply, by name, and why.
pub type UnenforcedGroups = BTreeMap<String, GroupUnenforced>;

/// Writes to the kernel: the only way the agent changes enforcement.
pub trait Enforcer: Send {
    /// The `cgroup:<path>` targets of `plan` that do not exist (a stopped service's
    /// cgroup is gone).
    fn missing_cgroups(&self, plan: &CgroupPlan) -> Vec<PathBuf>;
    /// Writes the connection limits into the maps the programs read. Returns the groups
    /// whose limits the programs cannot apply, with the reason (a cgroup that does not
    /// exist yet, [`GroupUnenforced::CgroupMissing`], is applied by a later call once it
    /// does).
    fn apply_conns(&mut self, conns: &ConnLimits) -> Result<UnenforcedGroups, KernelError>;
    /// True when a group's cgroup was made again since the last write (a new cgroup id),
    /// so the limits must be written again.
    fn groups_moved(&self, conns: &ConnLimits) -> bool;
    /// One round of retiring idle per-UID counters (see
    /// [`bpf::ConnLimiter::retire_idle`]); returns how many were retired.
    fn retire_idle(&mut self, conns: &ConnLimits) -> Result<usize, KernelError>;
    /// Writes the cgroup plan (after a complete write of another, only what differs;
    /// resetting what the plan before had and `plan` drops) and places processes by it
    /// (scanning /proc only when where processes belong may have changed).
    fn apply_cgroups(
        &mut self,
        plan: &CgroupPlan,
        before: Before,
    ) -> Result<CgroupReport, KernelError>;
    /// Moves processes into `group`; returns the cgroup they are in now (relative to the
    /// mount).
    fn move_pids(
        &self,
        plan: &CgroupPlan,
        group: &str,
        pids: &[u32],
    ) -> Result<PathBuf, KernelError>;
}

/// Reads from the kernel.
pub trait Observer: Send + Sync {
    /// Usage of every cgroup `plan` manages that exists, labelled with its target.
    fn cgroup_stats(
        &self,
        plan: &CgroupPlan,
        detail: Detail,
    ) -> Result<Vec<(String, CgroupStats)>, KernelError>;
    /// Connection counters; `None` when no programs are installed.
    fn conn_usage(&self) -> Result<Option<ConnUsage>, KernelError>;
    /// Run counts of the programs (while `kernel.bpf_stats_enabled`).
    fn program_stats(&self) -> Vec<ProgramStats>;
    /// Processes placed since the agent started.
    fn placement_moves(&self) -> u64;
    /// The cgroup2 mount and the controllers available at its root.
    fn cgroup2(&self) -> (PathBuf, Vec<String>);
    /// Pins of the programs' links and maps that are gone (someone removed them, or ran
    /// `rlagent uninstall` under the agent): empty while all is in place.
    fn pins_missing(&self) -> Vec<PathBuf>;
    /// The kernel features probed at the agent's start (empty outside the agent).
    fn kernel_features(&self) -> Vec<KernelFeature>;
    /// The host's pressure, `/proc/pressure/*` (`None` per resource without PSI).
    fn host_pressure(&self) -> HostPressure;
    /// Each user's usage, from the users' cgroups under `layout`: only `signals`' files.
    fn user_usage(&self, layout: &Layout, signals: &[UserSignal]) -> BTreeMap<u32, UserSample>;
}

/// Reads `/proc/pressure/{cpu,memory,io}` under `proc`; a resource whose file cannot be
/// read is `None` (logged at debug level: a kernel without PSI has none of them).
pub fn host_pressure(proc: &Path) -> HostPressure {
    let read = |name: &str| match cgroup::psi::read_file(&proc.join("pressure").join(name)) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!("host pressure: {e}");
            None
        }
    };
    HostPressure {
        cpu: read("cpu"),
        memory: read("memory"),
        io: read("io"),
    }
}

/// The real enforcer: BPF programs and maps, the cgroup driver, placement.
pub struct System {
    mount: PathBuf,
    /// The attach cgroup, relative to the mount.
    attach: PathBuf,
    limiter: ConnLimiter,
    /// The cgroup driver `Settings::driver` chose.
    cgroups: Arc<dyn CgroupDriver>,
    placer: Option<Arc<RwLock<Placer>>>,
    moves: Arc<AtomicU64>,
}

impl System {
    /// Loads the programs (adopting pinned maps), writes `desired`'s connection limits,
    /// then attaches, so the programs never run on settings from before; then removes
    /// other layout versions' pins. Returns the enforcer and its observer.
    pub fn start(
        settings: &Settings,
        desired: &Desired,
    ) -> Result<(Self, SystemObserver), KernelError> {
        let mount = settings.mount.clone();
        let attach_cgroup = mount.join(&settings.attach_cgroup);
        if !attach_cgroup.join("cgroup.procs").exists() {
            return Err(KernelError::NoAttachCgroup {
                path: attach_cgroup,
            });
        }
        // The version first: on a kernel too old for the programs that says it all.
        bpf::check_kernel()?;
        let features = features::probe();
        if let Some(missing) = KernelFeature::first_missing_required(&features) {
            return Err(KernelError::MissingFeature {
                name: missing.name.clone(),
                without: missing.without.clone(),
            });
        }
        for f in &features {
            match f.state {
                FeatureState::Available => {}
                FeatureState::Missing => {
                    tracing::info!(feature = %f.name, "kernel feature missing; off: {}", f.without);
                }
                FeatureState::Unknown if f.required => tracing::warn!(
                    feature = %f.name,
                    why = f.detail.as_deref().unwrap_or(""),
                    "kernel feature not probed; loading the programs will tell"
                ),
                FeatureState::Unknown => tracing::info!(
                    feature = %f.name,
                    why = f.detail.as_deref().unwrap_or(""),
                    "kernel feature not probed"
                ),
            }
        }
        let cgroups = start_driver(settings)?;
        let mut system = Self {
            mount: mount.clone(),
            attach: settings.attach_cgroup.clone(),
            limiter: ConnLimiter::load(&settings.pin_path, settings.max_tracked_sockets)?,
            cgroups,
            placer: None,
            moves: Arc::new(AtomicU64::new(0)),
        };
        system
            .limiter
            .apply(&desired.conns, &mount, &settings.attach_cgroup)?;
        let host_wide = settings.attach_cgroup.as_os_str().is_empty();
        seeding(
            system
                .limiter
                .seed(&attach_cgroup, host_wide, &desired.conns),
            "counted the connections open before the first start",
            "connections open before the first start are not counted",
        )?;
        for (program, action) in system.limiter.attach(&attach_cgroup)? {
            let what = match action {
                LinkAction::Attached => "attached",
                LinkAction::Replaced => "attached, replacing the pinned link of an earlier run",
            };
            tracing::info!(program, cgroup = %attach_cgroup.display(), "{what}");
        }
        seeding(
            system.limiter.settle_seeded(desired.conns.count_udp),
            "seeded connections that closed before the programs were attached",
            "seeded connections that closed before the programs were attached stay counted until rlagent uninstall",
        )?;
        for old in system.limiter.remove_other_versions()? {
            if old.held.is_empty() {
                tracing::warn!(pins = %old.dir.display(), "removed the pins of another map layout version and detached its programs");
            }
            for link in &old.held {
                tracing::error!(
                    pin = %link.path.display(),
                    link_id = link.id,
                    "the pin of another map layout version's link is removed, but another process holds the link open: its program still runs, on that version's stale maps, until that process closes it (bpftool link list shows it); that version's sock_release stays pinned so what it charges is released, and the next start removes it"
                );
            }
        }
        let observer = SystemObserver {
            mount,
            cgroups: system.cgroups.clone(),
            maps: Some(PinnedMaps::open(&settings.pin_path)?),
            pins: Some(bpf::PinLayout::new(&settings.pin_path)),
            moves: system.moves.clone(),
            features,
        };
        Ok((system, observer))
    }
}

/// The cgroup driver `settings` chose; under systemd it also starts watching logind for
/// new users, whose slices get the `user:*` quota.
fn start_driver(settings: &Settings) -> Result<Arc<dyn CgroupDriver>, KernelError> {
    Ok(match settings.driver {
        Driver::Cgroupfs => Arc::new(CgroupfsDriver::new(CgroupFs::new(&settings.mount))),
        Driver::Systemd => {
            let bus = systemd::dbus::SystemBus::connect()?;
            let driver = Arc::new(SystemdDriver::new(
                bus.clone() as Arc<dyn systemd::Bus>,
                &settings.mount,
                settings.systemd_record.clone(),
            ));
            systemd::watch_new_users(bus, driver.clone());
            driver
        }
    })
}

impl Enforcer for System {
    fn missing_cgroups(&self, plan: &CgroupPlan) -> Vec<PathBuf> {
        self.cgroups.missing(plan)
    }

    fn apply_conns(&mut self, conns: &ConnLimits) -> Result<UnenforcedGroups, KernelError> {
        Ok(self.limiter.apply(conns, &self.mount, &self.attach)?)
    }

    fn groups_moved(&self, conns: &ConnLimits) -> bool {
        self.limiter.groups_moved(conns, &self.mount)
    }

    fn retire_idle(&mut self, conns: &ConnLimits) -> Result<usize, KernelError> {
        Ok(self.limiter.retire_idle(conns)?)
    }

    fn apply_cgroups(
        &mut self,
        plan: &CgroupPlan,
        before: Before,
    ) -> Result<CgroupReport, KernelError> {
        if self.placer.is_none() && !self.cgroups.needs_apply(plan, before) {
            return Ok(CgroupReport::default());
        }
        let applied = self.cgroups.apply(plan, before)?;
        let placing = self.cgroups.places(plan);
        // Quota values changed only: every process is where it belongs already.
        let rescan = self.placer.is_none() || !before.complete().is_some_and(|p| plan.places_as(p));
        match &self.placer {
            Some(placer) => placer
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .set_plan(plan.clone()),
            None if placing => {
                let placer = Arc::new(RwLock::new(Placer::new(
                    plan.clone(),
                    self.cgroups.clone().mover(),
                    self.moves.clone(),
                )));
                placement::watch(placer.clone())?;
                self.placer = Some(placer);
            }
            None => {}
        }
        let placed = self
            .placer
            .as_ref()
            .filter(|_| rescan)
            .map(|p| p.read().unwrap_or_else(|p| p.into_inner()).scan());
        Ok(CgroupReport {
            unavailable: applied.unavailable,
            subtree_missing: applied.subtree_missing,
            skipped: applied.skipped,
            rewritten: applied.rewritten,
            placed,
        })
    }

    fn move_pids(
        &self,
        plan: &CgroupPlan,
        group: &str,
        pids: &[u32],
    ) -> Result<PathBuf, KernelError> {
        Ok(self.cgroups.move_pids(plan, group, pids)?)
    }
}

/// Logs one step of counting the connections open at the first start. Without sock_diag
/// (inet_diag not loadable, as in a guest without modules) the agent still starts, and
/// says what it could not count; any other error refuses the start.
fn seeding(step: Result<usize, BpfError>, done: &str, skipped: &str) -> Result<(), KernelError> {
    match step {
        Ok(0) => Ok(()),
        Ok(sockets) => {
            tracing::info!(sockets, "{done}");
            Ok(())
        }
        Err(BpfError::Seed(e)) => {
            tracing::warn!("{skipped}: {}", crate::model::error_chain(&e));
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The real observer: cgroup files under the mount and the pinned maps.
pub struct SystemObserver {
    mount: PathBuf,
    /// The agent's cgroup driver; outside the agent, the cgroupfs driver (both read the
    /// same files for stats).
    cgroups: Arc<dyn CgroupDriver>,
    /// `None` when no programs are installed (outside the agent).
    maps: Option<PinnedMaps>,
    /// The agent's own pins, watched for removal (`None` outside the agent).
    pins: Option<bpf::PinLayout>,
    moves: Arc<AtomicU64>,
    /// Probed at the agent's start (empty outside the agent).
    features: Vec<KernelFeature>,
}

impl SystemObserver {
    /// An observer for a process other than the agent (`rlagent stats`): the maps pinned
    /// under `pin_path`, if any.
    pub fn open(pin_path: &Path) -> Result<Self, KernelError> {
        let mount = cgroup::mount::find()?;
        Ok(Self {
            cgroups: Arc::new(CgroupfsDriver::new(CgroupFs::new(&mount))),
            mount,
            maps: PinnedMaps::open(pin_path).ok(),
            pins: None,
            moves: Arc::new(AtomicU64::new(0)),
            features: Vec::new(),
        })
    }
}

impl Observer for SystemObserver {
    fn cgroup_stats(
        &self,
        plan: &CgroupPlan,
        detail: Detail,
    ) -> Result<Vec<(String, CgroupStats)>, KernelError> {
        Ok(self.cgroups.stats(plan, detail)?)
    }

    fn conn_usage(&self) -> Result<Option<ConnUsage>, KernelError> {
        let Some(maps) = &self.maps else {
            return Ok(None);
        };
        let (host, per_uid) = maps.usage()?;
        let now = bpf::now_ns();
        let groups = maps
            .groups()?
            .into_iter()
            .map(|(id, counters)| (id, bpf::group_stats("", &counters, now)))
            .collect();
        Ok(Some(ConnUsage {
            host: Some(host),
            per_uid,
            groups,
        }))
    }

    fn program_stats(&self) -> Vec<ProgramStats> {
        bpf::program_stats()
    }

    fn placement_moves(&self) -> u64 {
        self.moves.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn pins_missing(&self) -> Vec<PathBuf> {
        self.pins
            .as_ref()
            .map(|pins| pins.all().into_iter().filter(|p| !p.exists()).collect())
            .unwrap_or_default()
    }

    fn cgroup2(&self) -> (PathBuf, Vec<String>) {
        let controllers = std::fs::read_to_string(self.mount.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        (self.mount.clone(), controllers)
    }

    fn kernel_features(&self) -> Vec<KernelFeature> {
        self.features.clone()
    }

    fn host_pressure(&self) -> HostPressure {
        host_pressure(Path::new("/proc"))
    }

    fn user_usage(&self, layout: &Layout, signals: &[UserSignal]) -> BTreeMap<u32, UserSample> {
        cgroup::stats::user_samples(&CgroupFs::new(&self.mount), layout, signals)
    }
}
