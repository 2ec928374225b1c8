// Why this file is long: the whole driver (apply, reset to the unit's own values, stats, moves)
// over the `Bus` trait; D-Bus proxies (dbus.rs) and the scope mover (mover.rs) are apart.
//! The systemd cgroup driver: on a systemd host systemd is the single writer of the cgroup
//! tree, so every limit is a unit property set over D-Bus and every process the agent
//! places joins a unit systemd knows.
//!
//! - `user:<uid>` (and `user:*`, field by field) → `user-<uid>.slice`; users' processes are
//!   never moved, they stay in their session scopes and `user@<uid>.service`.
//! - a named group → `rlagent-<group>.slice` (systemd nests it under `rlagent.slice`);
//!   processes join it in a transient scope per placed process tree.
//! - `cgroup:<path>` → the unit whose cgroup that is (`GetUnitByControlGroup`).
//!
//! Properties are set with `runtime = true` (drop-ins under /run/systemd/system.control, gone
//! at reboot), so a restarted agent re-applies them and `rlagent uninstall` resets them. The
//! driver records which fields it set on which unit in a file beside the control socket, so
//! a field that a later config drops is reset even across agent restarts, and fields the
//! agent never set (an operator's own `systemctl set-property`) are left alone.

pub mod dbus;
pub mod mover;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    desired::cgroups::{Before, CgroupPlan, CgroupQuota},
    kernel::cgroup::{
        driver::{interface_file, ApplyReport, CgroupDriver, DriverError, Skipped},
        mover::Mover,
        CgroupFs, Controller,
    },
    model::{
        layout::{group_slice, user_slice},
        quota::{Field, Limit},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("connecting to systemd on the system bus (is dbus running?)")]
    Connect {
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("D-Bus {call} for {unit}")]
    Call {
        call: &'static str,
        unit: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error(
        "target cgroup:{}: no systemd unit owns this cgroup{}",
        path.display(),
        owner.as_ref().map(|u| format!(" (it lies inside {u}; target that unit's cgroup instead)")).unwrap_or_default()
    )]
    NotAUnit {
        path: PathBuf,
        owner: Option<String>,
    },
    #[error("pid {pid} was not in {scope} {waited_ms} ms after systemd started it")]
    ScopeTimeout {
        pid: u32,
        scope: String,
        waited_ms: u128,
    },
    #[error("writing {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A cgroup property of a unit, as systemd's D-Bus API names it (all of type `t`; `u64::MAX`
/// is infinity, which for the CPU period means the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    CpuQuotaPerSec(u64),
    CpuQuotaPeriod(u64),
    MemoryMax(u64),
    MemoryHigh(u64),
    TasksMax(u64),
}

pub const INFINITY: u64 = u64::MAX;

impl SystemdError {
    /// True when systemd answered that the unit does not exist (any more).
    pub fn no_such_unit(&self) -> bool {
        matches!(self, Self::Call { source, .. } if matches!(
            source.as_ref(),
            zbus::Error::MethodError(name, _, _)
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit"
                    || name.as_str() == "org.freedesktop.systemd1.LoadFailed"
        ))
    }
}

impl Property {
    pub fn name(self) -> &'static str {
        match self {
            Self::CpuQuotaPerSec(_) => "CPUQuotaPerSecUSec",
            Self::CpuQuotaPeriod(_) => "CPUQuotaPeriodUSec",
            Self::MemoryMax(_) => "MemoryMax",
            Self::MemoryHigh(_) => "MemoryHigh",
            Self::TasksMax(_) => "TasksMax",
        }
    }

    pub fn value(self) -> u64 {
        match self {
            Self::CpuQuotaPerSec(v)
            | Self::CpuQuotaPeriod(v)
            | Self::MemoryMax(v)
            | Self::MemoryHigh(v)
            | Self::TasksMax(v) => v,
        }
    }
}

/// The cgroup fields, which unit properties carry: those a controller enforces. The unit
/// test `every_cgroup_field_has_properties_and_no_other_has` holds [`with_values`] to it.
fn cgroup_fields() -> impl Iterator<Item = Field> {
    Field::ALL.into_iter().filter(|f| f.controller().is_some())
}

/// The properties that set `field` of `quota` (its `max` is infinity).
pub fn properties(field: Field, quota: &CgroupQuota) -> Vec<Property> {
    let bytes = |l: Limit<u64>| match l {
        Limit::Value(v) => v,
        Limit::Max => INFINITY,
    };
    let values = match field {
        Field::Cpu => match quota.cpu {
            // cpu.max = CPUQuotaPerSecUSec × period / 1 s: the same quota and period.
            Limit::Value(c) => vec![c.quota_us * 1_000_000 / c.period_us, c.period_us],
            Limit::Max => vec![INFINITY, INFINITY],
        },
        Field::Memory => vec![bytes(quota.memory)],
        Field::MemoryHigh => vec![bytes(quota.memory_high)],
        Field::Pids => vec![bytes(quota.pids)],
        Field::Conns | Field::ConnRate | Field::ConnBurst | Field::Mode => return Vec::new(),
    };
    with_values(field, &values)
}

/// The D-Bus properties that carry `field`, in the order [`with_values`] takes values.
fn property_names(field: Field) -> Vec<&'static str> {
    with_values(field, &[])
        .into_iter()
        .map(Property::name)
        .collect()
}

/// The properties that set `field` to `values` (as [`property_names`] lists them; a
/// missing one is infinity).
fn with_values(field: Field, values: &[u64]) -> Vec<Property> {
    let at = |i: usize| values.get(i).copied().unwrap_or(INFINITY);
    match field {
        Field::Cpu => vec![
            Property::CpuQuotaPerSec(at(0)),
            Property::CpuQuotaPeriod(at(1)),
        ],
        Field::Memory => vec![Property::MemoryMax(at(0))],
        Field::MemoryHigh => vec![Property::MemoryHigh(at(0))],
        Field::Pids => vec![Property::TasksMax(at(0))],
        Field::Conns | Field::ConnRate | Field::ConnBurst | Field::Mode => Vec::new(),
    }
}

/// What the driver asks of systemd; [`dbus::SystemBus`] is the real one, unit tests use a
/// fake that records the calls.
pub trait Bus: Send + Sync {
    /// `SetUnitProperties(unit, runtime = true, properties)`.
    fn set_properties(&self, unit: &str, properties: &[Property]) -> Result<(), SystemdError>;
    /// `StartUnit(unit, "replace")`.
    fn start_unit(&self, unit: &str) -> Result<(), SystemdError>;
    /// The current values of `unit`'s properties `names` (all of type `t`).
    fn get_properties(&self, unit: &str, names: &[&str]) -> Result<Vec<u64>, SystemdError>;
    /// The unit owning `cgroup` (an absolute cgroup path) or the nearest cgroup above it;
    /// `None` when no unit does.
    fn unit_of_cgroup(&self, cgroup: &str) -> Result<Option<String>, SystemdError>;
    /// `StartTransientUnit` of scope `name` in `slice` holding `pids`.
    fn start_scope(
        &self,
        name: &str,
        slice: &str,
        description: &str,
        pids: &[u32],
    ) -> Result<(), SystemdError>;
}

/// True when systemd can drive this host's cgroups: PID 1 is systemd (sd_booted(3):
/// /run/systemd/system exists) and cgroup2 is the unified hierarchy at /sys/fs/cgroup.
pub fn systemd_host(mount: &Path) -> bool {
    Path::new("/run/systemd/system").is_dir() && mount == Path::new("/sys/fs/cgroup")
}

/// The fields the agent has set on each unit (and so must reset when they are dropped).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
/// Per unit, each field the agent set and the values its properties had before (what a
/// reset restores: a distribution's `TasksMax=33%` on user slices, an operator's
/// `systemctl set-property --runtime`).
struct Record(BTreeMap<String, BTreeMap<Field, Vec<u64>>>);

impl Record {
    /// Lines of `unit<TAB>field=value,value;field=value`; anything else is skipped.
    fn parse(text: &str) -> Self {
        let mut record = Self::default();
        for line in text.lines() {
            let Some((unit, fields)) = line.split_once('\t') else {
                continue;
            };
            let fields: BTreeMap<Field, Vec<u64>> = fields
                .split(';')
                .filter_map(|f| {
                    let (name, values) = f.split_once('=')?;
                    let field = cgroup_fields().find(|x| x.name() == name)?;
                    let values: Vec<u64> = values
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .ok()?;
                    (values.len() == property_names(field).len()).then_some((field, values))
                })
                .collect();
            if !fields.is_empty() {
                record.0.insert(unit.to_string(), fields);
            }
        }
        record
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (unit, fields) in &self.0 {
            let fields: Vec<String> = fields
                .iter()
                .map(|(field, values)| {
                    let values: Vec<String> = values.iter().map(u64::to_string).collect();
                    format!("{}={}", field.name(), values.join(","))
                })
                .collect();
            out.push_str(&format!("{unit}\t{}\n", fields.join(";")));
        }
        out
    }
}

/// One unit the plan limits.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UnitTarget {
    /// Its cgroup, relative to the mount.
    cgroup: PathBuf,
    quota: CgroupQuota,
    /// A `cgroup:<path>` target (its skipped limits are reported per cgroup).
    adjusted: bool,
}

struct State {
    record: Record,
    /// The quota last written per unit: unchanged units are not written again.
    written: BTreeMap<String, CgroupQuota>,
    /// The plan in force, for users that log in later.
    plan: Option<CgroupPlan>,
}

pub struct SystemdDriver {
    bus: Arc<dyn Bus>,
    fs: CgroupFs,
    record_path: Option<PathBuf>,
    state: Mutex<State>,
}

impl SystemdDriver {
    /// A driver over `bus`, with the record of earlier runs read from `record_path`.
    pub fn new(bus: Arc<dyn Bus>, mount: &Path, record_path: Option<PathBuf>) -> Self {
        let record = record_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| Record::parse(&t))
            .unwrap_or_default();
        Self {
            bus,
            fs: CgroupFs::new(mount),
            record_path,
            state: Mutex::new(State {
                record,
                written: BTreeMap::new(),
                plan: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every unit `plan` limits, by name. Resolves `cgroup:<path>` targets to their units
    /// first, so a plan with a path no unit owns is refused before anything is written.
    fn units(
        &self,
        plan: &CgroupPlan,
        record: &Record,
    ) -> Result<BTreeMap<String, UnitTarget>, SystemdError> {
        let mut units = BTreeMap::new();
        for (path, quota) in &plan.cgroups {
            let absolute = format!("/{}", path.display());
            let owner = self.bus.unit_of_cgroup(&absolute)?;
            let name = path.file_name().and_then(|n| n.to_str());
            match owner {
                Some(unit) if Some(unit.as_str()) == name => {
                    units.insert(
                        unit,
                        UnitTarget {
                            cgroup: path.clone(),
                            quota: *quota,
                            adjusted: true,
                        },
                    );
                }
                owner => {
                    return Err(SystemdError::NotAUnit {
                        path: path.clone(),
                        owner,
                    })
                }
            }
        }
        for (name, quota) in &plan.groups {
            units.insert(
                group_slice(name),
                UnitTarget {
                    cgroup: plan.group_cgroup(name),
                    quota: *quota,
                    adjusted: false,
                },
            );
        }
        let mut uids: BTreeSet<u32> = plan.users.keys().copied().collect();
        if plan.user_default.is_some() {
            uids.extend(self.fs.user_cgroups(&plan.layout));
            // Users limited before who are logged out now: the default's changes reach
            // their slices too (the runtime drop-ins outlive the session).
            uids.extend(record.0.keys().filter_map(|u| plan.layout.uid_of(u)));
        }
        for uid in uids {
            if let Some(quota) = plan.user_quota(uid) {
                units.insert(
                    user_slice(uid),
                    UnitTarget {
                        cgroup: plan.user_cgroup(uid),
                        quota,
                        adjusted: false,
                    },
                );
            }
        }
        Ok(units)
    }

    /// Controllers missing at the cgroup2 root: no unit can have their limits.
    fn missing_controllers(&self) -> BTreeSet<Controller> {
        // Unreadable: none is available.
        let available = self.fs.controllers(Path::new("")).unwrap_or_default();
        Controller::ALL
            .into_iter()
            .filter(|c| !available.contains(c.name()))
            .collect()
    }

    /// Writes the fields of `quota` that limit, and resets those the agent set before
    /// that `quota` leaves unlimited.
    fn write(
        &self,
        state: &mut State,
        unit: &str,
        quota: &CgroupQuota,
    ) -> Result<(), SystemdError> {
        if state.written.get(unit) == Some(quota) {
            return Ok(());
        }
        let before = state.record.0.get(unit).cloned().unwrap_or_default();
        let mut props = Vec::new();
        let mut now = BTreeMap::new();
        for field in cgroup_fields() {
            match (quota.limits(field), before.get(&field)) {
                (true, Some(original)) => {
                    now.insert(field, original.clone());
                    props.extend(properties(field, quota));
                }
                (true, None) => {
                    // First time: remember what the unit had, for the reset.
                    let original = self.bus.get_properties(unit, &property_names(field))?;
                    now.insert(field, original);
                    props.extend(properties(field, quota));
                }
                (false, Some(original)) => props.extend(with_values(field, original)),
                (false, None) => {}
            }
        }
        if !props.is_empty() {
            self.bus.set_properties(unit, &props)?;
        }
        if now.is_empty() {
            state.record.0.remove(unit);
        } else {
            state.record.0.insert(unit.to_string(), now);
        }
        state.written.insert(unit.to_string(), *quota);
        Ok(())
    }

    fn save(&self, record: &Record) -> Result<(), SystemdError> {
        let Some(path) = &self.record_path else {
            return Ok(());
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, record.render())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| SystemdError::Record {
                path: path.clone(),
                source,
            })
    }

    /// A user logind just started: their slice gets the plan's quota for them (`user:*`),
    /// if any.
    pub fn user_appeared(&self, uid: u32) {
        let mut state = self.lock();
        let Some(quota) = state.plan.as_ref().and_then(|p| p.user_quota(uid)) else {
            return;
        };
        let unit = user_slice(uid);
        match self.write(&mut state, &unit, &quota) {
            Ok(()) => tracing::info!(uid, unit, "applied the user quota to a new user's slice"),
            Err(e) => tracing::error!(uid, "{}", crate::model::error_chain(&e)),
        }
        if let Err(e) = self.save(&state.record) {
            tracing::error!("{}", crate::model::error_chain(&e));
        }
    }

    /// Lifts the fields the agent set on `unit`. A unit that no longer exists has nothing
    /// left to reset and leaves the record; any other failure keeps it there, so the next
    /// apply tries again. Returns whether the fields were reset.
    fn reset(&self, state: &mut State, unit: &str) -> bool {
        state.written.remove(unit);
        match self.write(state, unit, &CgroupQuota::NONE) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("resetting {unit}: {}", crate::model::error_chain(&e));
                if e.no_such_unit() {
                    state.record.0.remove(unit);
                }
                false
            }
        }
    }

    /// Resets every field the agent has set on any unit (`rlagent uninstall`); returns how
    /// many units were reset.
    pub fn reset_all(&self) -> Result<usize, SystemdError> {
        let mut state = self.lock();
        let units: Vec<String> = state.record.0.keys().cloned().collect();
        let reset = units.iter().filter(|u| self.reset(&mut state, u)).count();
        self.save(&state.record)?;
        Ok(reset)
    }

    /// Puts `pids` (a process and its children) into a new transient scope in `group`'s
    /// slice, and waits until the kernel shows them there.
    pub fn start_scope(
        &self,
        plan: &CgroupPlan,
        group: &str,
        pids: &[u32],
    ) -> Result<PathBuf, SystemdError> {
        let Some(&first) = pids.first() else {
            return Ok(plan.group_cgroup(group));
        };
        static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Unique across agent restarts, so a scope of a process still alive never clashes.
        let scope = format!("rlagent-{first}-{started}-{n}.scope");
        let slice = group_slice(group);
        let description = format!("rlagent group {group}: pid {first} and its children");
        let mut pids = pids.to_vec();
        if let Err(e) = self.bus.start_scope(&scope, &slice, &description, &pids) {
            // systemd refuses the whole scope if one PID is gone: a child that exited since
            // the tree was read. Once more with the live ones.
            let before = pids.len();
            pids.retain(|p| crate::kernel::proc::read_proc(*p).is_some());
            if pids.is_empty() || pids.len() == before {
                return Err(e);
            }
            self.bus.start_scope(&scope, &slice, &description, &pids)?;
        }
        let cgroup = plan.group_cgroup(group).join(&scope);
        let deadline = Instant::now() + Duration::from_secs(5);
        let begun = Instant::now();
        for &pid in &pids {
            loop {
                match crate::kernel::proc::read_proc(pid) {
                    None => break,
                    Some(p) if p.cgroup == cgroup => break,
                    Some(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Some(_) => {
                        return Err(SystemdError::ScopeTimeout {
                            pid,
                            scope,
                            waited_ms: begun.elapsed().as_millis(),
                        })
                    }
                }
            }
        }
        Ok(cgroup)
    }
}

impl CgroupDriver for SystemdDriver {
    fn fs(&self) -> &CgroupFs {
        &self.fs
    }

    /// Always: the record may hold limits of an earlier run that this plan drops.
    fn needs_apply(&self, _: &CgroupPlan, _: Before) -> bool {
        true
    }

    /// Sets every unit's properties by `plan` (units whose quota was written already are
    /// not called), resets the fields the agent set before that `plan` drops, and starts
    /// the group slices (so their cgroups exist for stats; after a complete write, only
    /// the new groups'). The record, not `before`, says what the agent set: it holds
    /// earlier runs' too.
    fn apply(&self, plan: &CgroupPlan, before: Before) -> Result<ApplyReport, DriverError> {
        let mut state = self.lock();
        let units = self.units(plan, &state.record)?;
        let missing = self.missing_controllers();
        let mut report = ApplyReport {
            subtree_missing: missing.clone(),
            ..ApplyReport::default()
        };
        for controller in &missing {
            report.unavailable.push(format!(
                "controller {controller} is not available at the cgroup2 root {} (disabled on the kernel command line, or bound to cgroup v1)",
                self.fs.path(Path::new("")).display()
            ));
        }
        // The record is saved and the plan kept whatever happens half-way: what was set
        // stays known, to be lifted later.
        let outcome: Result<(), SystemdError> = (|| {
            for (unit, target) in &units {
                self.write(&mut state, unit, &target.quota)?;
                if target.adjusted {
                    for field in cgroup_fields() {
                        let unavailable =
                            missing.iter().any(|c| field.controller() == Some(c.name()));
                        if target.quota.limits(field) && unavailable {
                            report.skipped.push(Skipped {
                                cgroup: target.cgroup.clone(),
                                field,
                                file: interface_file(field),
                            });
                        }
                    }
                }
            }
            // Units limited before that the plan no longer names: lift what the agent set.
            let dropped: Vec<String> = state
                .record
                .0
                .keys()
                .filter(|u| !units.contains_key(*u))
                .cloned()
                .collect();
            for unit in dropped {
                self.reset(&mut state, &unit);
            }
            let started = before.complete().map(|p| &p.groups);
            for name in plan.groups.keys() {
                if !started.is_some_and(|g| g.contains_key(name)) {
                    self.bus.start_unit(&group_slice(name))?;
                }
            }
            Ok(())
        })();
        state.plan = Some(plan.clone());
        let saved = self.save(&state.record);
        outcome?;
        saved?;
        Ok(report)
    }

    /// Only with group rules: users' processes are never moved, so without rules nothing
    /// is watched.
    fn places(&self, plan: &CgroupPlan) -> bool {
        !plan.rules.is_empty()
    }

    fn mover(self: Arc<Self>) -> Box<dyn Mover> {
        Box::new(mover::SystemdMover { driver: self })
    }

    fn move_pids(
        &self,
        plan: &CgroupPlan,
        group: &str,
        pids: &[u32],
    ) -> Result<PathBuf, DriverError> {
        Ok(self.start_scope(plan, group, pids)?)
    }
}

/// Listens for new users on its own thread, for the life of the agent.
pub fn watch_new_users(bus: Arc<dbus::SystemBus>, driver: Arc<SystemdDriver>) {
    std::thread::Builder::new()
        .name("rlagent-logind".into())
        .spawn(move || {
            if let Err(e) = bus.watch_new_users(|uid| driver.user_appeared(uid)) {
                tracing::error!(
                    "new users' slices will get user:* quotas only at the next change: {}",
                    crate::model::error_chain(&e)
                );
            }
        })
        .map(drop)
        .unwrap_or_else(|e| tracing::error!("starting the logind watcher: {e}"));
}

#[cfg(test)]
mod tests;
