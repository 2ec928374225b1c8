// Why this file is long: `App` is the one entry for every caller, a method per operation; the
// background loops live in tasks.rs.
//! The composition root: the agent behind one lock, a snapshot of what it enforces for
//! readers, the kernel observer, the alert engine and its event stream. Every caller
//! (SIGHUP, the control socket, /metrics, the alert loop) goes through [`App`], so there is
//! one reload and one stats path.
//!
//! Locking: the agent's lock is only ever taken on the blocking pool ([`App::blocking`]),
//! because an apply can take long (a cgroup rewrite with a /proc rescan). Readers never
//! take it: they read the snapshot, which a change replaces whole after it is applied.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use super::{
    error::{panic_message, AppError},
    reconcile::{Agent, AgentError},
    status::{HostStatus, Status},
};
use crate::{
    config::Config,
    desired::{state::RuntimeState, Desired},
    kernel::{self, cgroup::driver::CgroupDriver, Enforcer, KernelError, Observer},
    model::{
        alert::Alert,
        event::DenialEvent,
        quota::Field,
        target::{Target, TargetError},
        usage::Detail,
        users::UserDb,
    },
    observe::{
        alerts::Engine,
        budget::Budgets,
        events::EventLog,
        stats::{AdaptState, PenaltyCount, Stats, TargetStats},
    },
};

/// The GID of the control group (`[control] group`), `None` when there is none or the
/// look-up fails (logged). The socket's group (at bind) and the operator check ask through
/// here, so both treat a failed look-up alike.
pub fn control_gid(users: &dyn UserDb, group: &str) -> Option<u32> {
    match users.gid(group) {
        Ok(gid) => gid,
        Err(e) => {
            tracing::warn!(%group, "cannot look up the control group: {e}");
            None
        }
    }
}

/// The Stats model of what `desired` manages, read through `observer` (also used by
/// `rlagent stats` outside the agent).
pub fn collect_stats(
    observer: &dyn Observer,
    desired: &Desired,
    detail: Detail,
) -> Result<Stats, KernelError> {
    let conns = observer.conn_usage()?.unwrap_or_default();
    let names = kernel::group_ids(&observer.cgroup2().0, &desired.conns);
    let groups = conns
        .groups
        .into_iter()
        .map(|(id, mut g)| {
            // A group whose limits were removed while connections charged to it are open
            // has no name any more: its cgroup id stands in.
            g.group = names
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("cgroup-id:{id}"));
            g
        })
        .collect();
    Ok(Stats {
        groups,
        events_received: Default::default(),
        targets: observer
            .cgroup_stats(&desired.cgroups, detail)?
            .into_iter()
            .map(|(target, cgroup)| TargetStats { target, cgroup })
            .collect(),
        conns: conns.per_uid,
        host: conns.host,
        placement_moves: observer.placement_moves(),
        alerts_firing: 0,
        skipped_targets: 0,
        pins_missing: None,
        budget_exhausted: Default::default(),
        programs: observer.program_stats(),
        penalties: Vec::new(),
        penalties_entered: Vec::new(),
        adapt: Vec::new(),
        webhook_refused: Default::default(),
    })
}

/// What the agent enforces now, as readers see it.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub desired: Desired,
    /// Runtime `cgroup:<path>` targets skipped because their cgroup is gone.
    pub skipped: Vec<Target>,
    /// Limits set but not in force, and why.
    pub not_enforced: super::reconcile::NotEnforced,
}

impl Snapshot {
    fn of(agent: &Agent) -> Self {
        Self {
            config: agent.config().clone(),
            desired: agent.desired().clone(),
            skipped: agent.skipped().to_vec(),
            not_enforced: agent.not_enforced(),
        }
    }
}

pub struct App {
    agent: Mutex<Agent>,
    current: RwLock<Arc<Snapshot>>,
    pub(super) observer: Arc<dyn Observer>,
    alerts: Mutex<Engine>,
    alert_events: tokio::sync::broadcast::Sender<Alert>,
    /// The config file the agent was started with (`None`: the default location).
    config_path: Option<PathBuf>,
    pub(super) users: Arc<dyn UserDb>,
    control_gid: Option<u32>,
    /// Cgroups operators may never limit (relative to the mount): the attach cgroup, the
    /// agent's own, PID 1's.
    protected: Vec<PathBuf>,
    budgets: Arc<Budgets>,
    /// Denial events from the programs.
    events: EventLog,
    /// Group names by cgroup id, for events (refreshed when an id is not found).
    group_names: Mutex<BTreeMap<u64, String>>,
    /// Missing pins at the last evaluation, to log each change once.
    pins_missing: std::sync::atomic::AtomicUsize,
    pub(super) started: Instant,
    /// The adaptive rules' and penalties' state.
    pub(super) adapt: Mutex<crate::observe::adapt::Run>,
    /// Requests to the penalty webhook refused, by reason; when one was last logged.
    pub(super) webhook_refusals: Mutex<(BTreeMap<String, u64>, Option<Instant>)>,
    /// Steps or fleet penalties are held (kept beside `adapt`, so the once-a-second check
    /// on the runtime's thread never waits for that lock).
    pub(super) adapt_held: std::sync::atomic::AtomicBool,
}

/// Finds the cgroup2 mount and decides `config`'s `cgroup_driver = "auto"` for this host,
/// as every entry point that acts on cgroups must before it builds the desired state.
/// Returns the mount.
pub fn resolve_driver(config: &mut Config) -> Result<PathBuf, KernelError> {
    let mount = kernel::cgroup::mount::find()?;
    config.resolve_driver(kernel::cgroup::systemd::systemd_host(&mount));
    Ok(mount)
}

impl App {
    /// Starts enforcement for `config`: the runtime overrides from its state file, the
    /// desired state, the kernel (programs, maps, cgroups, placement).
    pub fn start(
        mut config: Config,
        config_path: Option<PathBuf>,
        users: Arc<dyn UserDb>,
    ) -> Result<Arc<Self>, AppError> {
        let mount = resolve_driver(&mut config)?;
        tracing::info!(driver = %config.driver, "cgroup driver");
        let runtime = RuntimeState::load(&config.state_path)?;
        let desired = Desired::build(&config, &runtime, users.as_ref())?;
        // A cgroup target of the config that is missing refuses the start before anything
        // is loaded; runtime ones that vanished are skipped by the agent.
        let driver =
            kernel::cgroup::cgroupfs::CgroupfsDriver::new(kernel::cgroup::CgroupFs::new(&mount));
        super::reconcile::skip_vanished(&config, driver.missing(&desired.cgroups))?;
        let settings = kernel::Settings {
            mount,
            attach_cgroup: config.bpf.attach_cgroup.clone(),
            pin_path: config.bpf.pin_path.clone(),
            max_tracked_sockets: config.bpf.max_tracked_sockets,
            driver: config.driver,
            systemd_record: config.systemd_record(),
        };
        let (system, observer) = kernel::System::start(&settings, &desired)?;
        let agent = Agent::start(
            config,
            runtime,
            desired,
            Box::new(system) as Box<dyn Enforcer>,
            users.clone(),
        )?;
        Ok(Self::new(agent, Arc::new(observer), config_path, users))
    }

    /// An app around an agent that is already enforcing (tests pass fakes here).
    pub fn new(
        agent: Agent,
        observer: Arc<dyn Observer>,
        config_path: Option<PathBuf>,
        users: Arc<dyn UserDb>,
    ) -> Arc<Self> {
        let own = [std::process::id(), 1]
            .into_iter()
            .filter_map(|pid| kernel::proc::read_proc(pid).map(|p| p.cgroup))
            .collect();
        Self::with_own_cgroups(agent, observer, config_path, users, own)
    }

    /// [`App::new`] with the cgroups of the agent's process and of PID 1 given instead of
    /// read from /proc (tests put the agent where they need it).
    pub fn with_own_cgroups(
        agent: Agent,
        observer: Arc<dyn Observer>,
        config_path: Option<PathBuf>,
        users: Arc<dyn UserDb>,
        own: Vec<PathBuf>,
    ) -> Arc<Self> {
        let snapshot = Snapshot::of(&agent);
        let control_gid = control_gid(users.as_ref(), &snapshot.config.control_group);
        let mut protected = vec![snapshot.config.bpf.attach_cgroup.clone()];
        protected.extend(own);
        Arc::new(Self {
            protected,
            budgets: Arc::default(),
            events: EventLog::default(),
            group_names: Mutex::default(),
            pins_missing: Default::default(),
            alerts: Mutex::new(Engine::new(snapshot.desired.alert_rules.clone())),
            alert_events: tokio::sync::broadcast::channel(256).0,
            current: RwLock::new(Arc::new(snapshot)),
            agent: Mutex::new(agent),
            observer,
            config_path,
            users,
            control_gid,
            started: Instant::now(),
            adapt: Mutex::default(),
            webhook_refusals: Mutex::default(),
            adapt_held: Default::default(),
        })
    }

    /// Runs `f` on the blocking pool: the only way async code reaches the agent's lock or
    /// the kernel. A panic inside is reported as an error, and the agent keeps running.
    pub fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        what: &'static str,
        f: impl FnOnce(&App) -> T + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, AppError>> + Send + 'static {
        let app = self.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&app))
                .await
                .map_err(|e| {
                    let message = match e.try_into_panic() {
                        Ok(payload) => panic_message(payload.as_ref()),
                        Err(e) => e.to_string(),
                    };
                    tracing::error!("{what} panicked: {message}");
                    AppError::Panicked { what, message }
                })
        }
    }

    /// What the agent enforces now (never waits for a change in progress).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock_agent(&self) -> std::sync::MutexGuard<'_, Agent> {
        self.agent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, agent: &Agent) {
        let snapshot = Arc::new(Snapshot::of(agent));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = snapshot;
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.alerts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The one reload (SIGHUP and `rlctl reload`): re-reads the config file and applies it
    /// whole, or keeps everything as it is. Blocking.
    pub fn reload(&self) -> Result<(), AppError> {
        let config = Config::load(self.config_path.as_deref(), self.users.as_ref())?;
        let source = config.source.clone();
        let kept = self.with_agent("reload", |agent| agent.reload(config))?;
        if !kept.is_empty() {
            tracing::warn!(
                settings = %kept.join(", "),
                "these settings take effect at the next start; keeping the running values"
            );
        }
        // The agent's lock is released before the engine's is taken.
        let rules = self.snapshot().desired.alert_rules.clone();
        self.engine().set_rules(rules);
        tracing::info!(config = %source.display(), "reloaded");
        Ok(())
    }

    /// Sets or clears quota fields at runtime (see [`Agent::change`]). Blocking.
    pub fn change(
        &self,
        target: &Target,
        fields: &BTreeMap<Field, Option<String>>,
    ) -> Result<(), AppError> {
        self.with_agent("change", |agent| agent.change(target, fields))
    }

    /// Runs `f` on the agent under its lock and publishes what is enforced afterwards.
    /// A panic inside is caught: what was enforced before is re-applied, and the caller
    /// gets an error, so a bug cannot leave half a change in force behind an old snapshot.
    pub(super) fn with_agent<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut Agent) -> Result<T, AgentError>,
    ) -> Result<T, AppError> {
        use std::panic::{catch_unwind, AssertUnwindSafe};
        let mut agent = self.lock_agent();
        let result = match catch_unwind(AssertUnwindSafe(|| f(&mut agent))) {
            Ok(result) => result.map_err(AppError::from),
            Err(payload) => {
                let message = panic_message(payload.as_ref());
                tracing::error!("{what} panicked: {message}; re-applying what was in force");
                if catch_unwind(AssertUnwindSafe(|| agent.roll_back())).is_err() {
                    tracing::error!("re-applying after the panic panicked too");
                }
                Err(AppError::Panicked { what, message })
            }
        };
        self.publish(&agent);
        result
    }

    /// Moves processes into a group's cgroup (see [`Agent::move_to_group`]). Blocking.
    pub fn move_to_group(
        &self,
        group: &str,
        pids: &[u32],
        by_root: bool,
    ) -> Result<PathBuf, AppError> {
        self.with_agent("move", |agent| agent.move_to_group(group, pids, by_root))
    }

    /// Cgroups operators may never limit (the README's "Security model").
    pub fn protected_cgroups(&self) -> &[PathBuf] {
        &self.protected
    }

    /// A target as typed by a user, with a user name resolved to its UID.
    pub fn resolve_target(&self, text: &str) -> Result<Target, TargetError> {
        text.parse::<Target>()?.resolve_user(self.users.as_ref())
    }

    pub fn control_gid(&self) -> Option<u32> {
        self.control_gid
    }

    /// The budget counters the control socket and the metrics listener report into.
    pub fn budgets(&self) -> Arc<Budgets> {
        self.budgets.clone()
    }

    /// The one Stats model (rlctl stats, /metrics, the alert engine), read from the kernel
    /// for what the snapshot manages; the agent's lock is not taken. Blocking.
    pub fn stats(&self) -> Result<Stats, AppError> {
        self.stats_in(Detail::All)
    }

    /// [`App::stats`], with cgroup stats read in `detail`.
    fn stats_in(&self, detail: Detail) -> Result<Stats, AppError> {
        let snapshot = self.snapshot();
        let mut stats = collect_stats(self.observer.as_ref(), &snapshot.desired, detail)?;
        stats.pins_missing = Some(self.observer.pins_missing().len());
        stats.alerts_firing = self.engine().firing();
        stats.skipped_targets = snapshot.skipped.len();
        stats.budget_exhausted = self.budgets.refused();
        stats.events_received = self.events.received();
        stats.penalties = self.penalties();
        stats.webhook_refused = self
            .webhook_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone();
        let holding = self.adapt_holding();
        stats.penalties_entered = self
            .penalties_entered()
            .into_iter()
            .map(|((rule, tier), count)| PenaltyCount { rule, tier, count })
            .collect();
        stats.adapt = snapshot
            .config
            .adapt_rules
            .iter()
            .map(|r| AdaptState {
                holding: holding.iter().any(|(name, _)| *name == r.name),
                rule: r.name.clone(),
                monitor: r.mode == crate::model::quota::Mode::Monitor,
            })
            .collect();
        Ok(stats)
    }

    /// The denial event log (recent events, the stream, the counts).
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Turns the programs' records into events: wall-clock time, group names.
    pub fn record_events(&self, batch: &[rlagent_common::DenyEvent]) {
        if batch.is_empty() {
            return;
        }
        let mono_now = kernel::bpf::now_ns();
        let wall_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let wall_ms_at = |ns: u64| wall_now.saturating_sub(mono_now.saturating_sub(ns) / 1_000_000);
        let mut names = self.group_names.lock().unwrap_or_else(|p| p.into_inner());
        if batch
            .iter()
            .any(|e| e.group != 0 && !names.contains_key(&e.group))
        {
            *names = kernel::group_ids(&self.observer.cgroup2().0, &self.snapshot().desired.conns);
        }
        let now = std::time::Instant::now();
        for raw in batch {
            match DenialEvent::from_kernel(raw, wall_ms_at, |id| names.get(&id).cloned()) {
                Some(event) => self.events.record_at(event, now),
                None => tracing::error!(
                    reason = raw.reason,
                    "a denial event with a reason this build does not know; dropped"
                ),
            }
        }
    }

    /// Writes the groups' connection limits again when a group's cgroup appeared or was
    /// made again (see [`Agent::groups_need_refresh`]). Blocking.
    pub fn refresh_groups(&self) -> Result<(), AppError> {
        if !self.lock_agent().groups_need_refresh() {
            return Ok(());
        }
        let applied = self.with_agent("group limits", |agent| agent.refresh_groups())?;
        for group in applied {
            tracing::info!(%group, "the group's cgroup appeared; its connection limits are enforced");
        }
        Ok(())
    }

    /// One round of retiring idle per-UID counters (see [`Agent::retire_idle`]); returns
    /// how many were retired. Blocking.
    pub fn retire_idle(&self) -> Result<usize, AppError> {
        self.with_agent("retiring idle UID counters", |agent| agent.retire_idle())
    }

    /// The status; with `host`, also the host's layout and what is enforced.
    pub fn status(&self, host: bool) -> Status {
        let snapshot = self.snapshot();
        let host = host.then(|| {
            let (mount, controllers) = self.observer.cgroup2();
            HostStatus {
                bpf_attach_cgroup: mount.join(&snapshot.config.bpf.attach_cgroup),
                cgroup_driver: snapshot.config.driver.to_string(),
                cgroup2_mount: mount,
                cgroup_controllers: controllers,
                bpf_pin_path: snapshot.config.bpf.pin_path.clone(),
                config: snapshot.config.source.clone(),
                targets: snapshot.desired.quotas.len(),
                alerts_firing: self.engine().firing(),
                skipped_targets: snapshot.skipped.iter().map(ToString::to_string).collect(),
                pins_missing: self.observer.pins_missing(),
                kernel_features: self.observer.kernel_features(),
                adapt_input: {
                    let c = &snapshot.config;
                    let rules = c.adapt_rules.len() + c.penalty_rules.len();
                    (rules > 0).then(|| {
                        format!(
                            "{rules} rules, polled every {} s: /proc/pressure and the users' cgroup files (no PSI triggers yet)",
                            crate::model::adapt::ROUND_INTERVAL.as_secs()
                        )
                    })
                },
            }
        });
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            host,
        }
    }

    /// Alerts pending or firing now.
    pub fn alerts(&self) -> Vec<Alert> {
        self.engine().current()
    }

    /// Every alert transition from now on.
    pub fn subscribe_alerts(&self) -> tokio::sync::broadcast::Receiver<Alert> {
        self.alert_events.subscribe()
    }

    /// Evaluates the rules at `now` (engine time), logs and publishes each transition, and
    /// returns the transitions. Blocking.
    pub fn evaluate_alerts(&self, now: Duration) -> Result<Vec<Alert>, AppError> {
        let stats = self.stats_in(Detail::Limits)?;
        let missing = stats.pins_missing.unwrap_or(0);
        let before = self
            .pins_missing
            .swap(missing, std::sync::atomic::Ordering::Relaxed);
        if missing > 0 && before == 0 {
            tracing::error!(
                missing,
                paths = ?self.observer.pins_missing(),
                "pinned programs or maps of the agent are gone: connection caps may no longer be enforced; restart rlagent to attach again"
            );
        } else if missing == 0 && before > 0 {
            tracing::info!("the agent's pins are all in place again");
        }
        let transitions = self.engine().evaluate(&stats, now);
        Engine::log(&transitions);
        for alert in &transitions {
            // No watchers is fine.
            let _ = self.alert_events.send(alert.clone());
        }
        Ok(transitions)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::FakeAgent;

    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_inside_a_reload_is_an_error_and_the_agent_goes_on() {
        let fake = FakeAgent::new();
        let app = fake.app("[[quota]]\ntarget = \"user:*\"\nconns = 5\n");
        fake.write_config("[[quota]]\ntarget = \"user:*\"\nconns = 6\n");
        fake.kernel.record().panic_conns = true;
        let err = app
            .blocking("reload", |app| app.reload())
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(&err, AppError::Panicked { what: "reload", message } if message.contains("fake kernel")),
            "{err}"
        );
        // What was in force before is written again, and readers see it.
        assert_eq!(
            fake.kernel
                .record()
                .conns
                .last()
                .unwrap()
                .default_policy
                .cap,
            5
        );
        assert_eq!(app.snapshot().desired.conns.default_policy.cap, 5);
        // Still serving: stats answer and the next reload applies.
        app.blocking("stats", |app| app.stats())
            .await
            .unwrap()
            .unwrap();
        app.blocking("reload", |app| app.reload())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(app.snapshot().desired.conns.default_policy.cap, 6);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn readers_are_not_stalled_by_a_long_apply() {
        let fake = FakeAgent::new();
        let app = fake.app("[[quota]]\ntarget = \"batch\"\ncpu = \"50%\"\n");
        // The change's cgroup write says when it has started (under the agent's lock) and
        // then waits for `release`, which is sent only after the readers are done.
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        fake.kernel.record().hold_cgroups = Some((entered_tx, release_rx));
        let target = Target::Group("batch".into());
        let held = app.blocking("change", move |app| {
            app.change(
                &target,
                &BTreeMap::from([(Field::Pids, Some("10".to_string()))]),
            )
        });
        let held = tokio::spawn(held);
        tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the change reached its cgroup write");
        // A reader that took the agent's lock would wait for ever: the timeout fails it.
        let readers = async {
            app.blocking("stats", |app| app.stats())
                .await
                .unwrap()
                .unwrap();
            app.blocking("status", |app| app.status(true))
                .await
                .unwrap()
        };
        let status = tokio::time::timeout(Duration::from_secs(10), readers)
            .await
            .expect("readers waited for the change in progress");
        assert!(!held.is_finished(), "the change was still held");
        assert_eq!(status.host.unwrap().targets, 1);
        assert!(
            app.snapshot().desired.quotas[&Target::Group("batch".into())]
                .pids
                .is_none(),
            "readers saw the state before the change"
        );
        release.send(()).unwrap();
        held.await.unwrap().unwrap().unwrap();
        assert!(
            app.snapshot().desired.quotas[&Target::Group("batch".into())]
                .pids
                .is_some()
        );
    }
}
