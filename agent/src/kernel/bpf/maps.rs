//! Reading the maps: the counters, and the cap in force per UID, from the pinned maps (a
//! read-only view that does not need the programs loaded by this process).

use std::{borrow::Borrow, collections::BTreeMap, path::Path};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError},
    sys::SyscallError,
    Pod,
};
use rlagent_common::{
    names, Conns, HostConns, Policy, Settings, FLAG_MONITOR_HOST, LIVE_COUNT_SHIFT, MAX_GROUPS,
    MAX_UID_CAPS, MAX_UID_CONNS, POLICY_MONITOR, RETIRED, UNLIMITED,
};

use super::{map_error, pins::PinLayout, BpfError};
use crate::model::usage::{
    ByReason, HostConnStats, MapFill, ProgramStats, RateStats, UidConnStats,
};

fn fill(map: &str, entries: u64, capacity: u64) -> MapFill {
    MapFill {
        map: map.to_string(),
        entries,
        capacity,
    }
}

/// Counters read from the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub host: HostConns,
    /// Each UID's counters, `live` holding the count alone (see `live_count`); counters
    /// being retired are left out.
    pub per_uid: BTreeMap<u32, Conns>,
    /// Entries in `RL_UID_CONNS`.
    pub uid_entries: usize,
}

/// A group's counters with its policy, by the group's cgroup id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCounters {
    pub policy: Option<Policy>,
    /// `live` holding the count alone (see `live_count`).
    pub conns: Conns,
}

/// The capacity of the charged-socket map `owner` (fixed when it was created: a pinned
/// map keeps its size until uninstall, whatever the config says now).
pub(super) fn socket_capacity(owner: &MapData) -> Result<u32, BpfError> {
    Ok(owner
        .info()
        .map_err(map_error(names::SOCK_OWNER))?
        .max_entries())
}

/// Every entry of the hash map `map` (named `name` in errors): a batch read where the
/// kernel has one, else key by key.
fn entries<T, K, V>(map: &HashMap<T, K, V>, name: &'static str) -> Result<Vec<(K, V)>, BpfError>
where
    T: Borrow<MapData>,
    K: Pod,
    V: Pod,
{
    match super::batch::read_all(map) {
        Ok(Some(entries)) => Ok(entries),
        Ok(None) => map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(name)),
        Err(errno) => Err(map_error(name)(MapError::SyscallError(SyscallError {
            call: "bpf_map_lookup_batch",
            io_error: errno.into(),
        }))),
    }
}

pub(super) fn read_stats<H, U>(
    host: &Array<H, HostConns>,
    per_uid: &HashMap<U, u32, Conns>,
) -> Result<ConnStats, BpfError>
where
    H: Borrow<MapData>,
    U: Borrow<MapData>,
{
    let host = host.get(&0, 0).map_err(map_error(names::HOST_CONNS))?;
    let mut uids = BTreeMap::new();
    for (uid, mut conns) in entries(per_uid, names::UID_CONNS)? {
        // Counters being retired are gone a moment later.
        if let Some(live) = live_count(uid, &conns) {
            conns.live = live;
            uids.insert(uid, conns);
        }
    }
    Ok(ConnStats {
        host,
        uid_entries: uids.len(),
        per_uid: uids,
    })
}

/// The live count of counters tagged `tag` (see `LIVE_COUNT_SHIFT`): `None` while they
/// are being retired. A count taken below zero (a release without its charge, a defect)
/// shows as the wrapped difference, near 2^64; counters tagged otherwise (a defect too)
/// show their whole word.
fn live_count(tag: u32, conns: &Conns) -> Option<u64> {
    if conns.live as u32 != tag {
        return Some(conns.live);
    }
    let count = (conns.live >> LIVE_COUNT_SHIFT) as u32;
    (u64::from(count) != RETIRED).then_some(count as i32 as i64 as u64)
}

/// CLOCK_MONOTONIC in ns, the programs' `bpf_ktime_get_ns`.
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The token bucket of `policy` whose arrival time is `tat`, at `now` (`None`: no rate).
pub fn rate_stats(policy: &Policy, tat: u64, now: u64) -> Option<RateStats> {
    if policy.rate_interval_ns == 0 {
        return None;
    }
    // Tokens left: how far the arrival time may still move before it passes the window.
    let ahead = tat.saturating_sub(now);
    let tokens = policy.rate_window_ns.saturating_sub(ahead) / policy.rate_interval_ns;
    Some(RateStats {
        interval_ns: policy.rate_interval_ns,
        burst: policy.burst,
        tokens: tokens.min(policy.burst),
    })
}

fn cap(policy: &Policy) -> Option<u64> {
    Some(policy.cap).filter(|c| *c != UNLIMITED)
}

/// Read-only view of the pinned maps: the agent's stats reader (opened once, on the pins the
/// agent itself uses), `rlagent stats`/`conns`, and the tests.
pub struct PinnedMaps {
    /// Capacity of `RL_SOCK_OWNER` (fixed when it was created).
    socket_capacity: u64,
    host: Array<MapData, HostConns>,
    uid_conns: HashMap<MapData, u32, Conns>,
    uid_caps: HashMap<MapData, u32, Policy>,
    uid_seeded: HashMap<MapData, u32, u64>,
    uid_seeded_gone: HashMap<MapData, u32, u64>,
    settings: Array<MapData, Settings>,
    group_policy: HashMap<MapData, u64, Policy>,
    group_conns: HashMap<MapData, u64, Conns>,
}

impl PinnedMaps {
    pub fn open(pin_path: &Path) -> Result<Self, BpfError> {
        let pins = PinLayout::new(pin_path);
        fn open<T: TryFrom<Map, Error = MapError>>(
            pins: &PinLayout,
            name: &'static str,
        ) -> Result<T, BpfError> {
            let data = MapData::from_pin(pins.map(name)).map_err(map_error(name))?;
            let map = Map::from_map_data(data).map_err(map_error(name))?;
            T::try_from(map).map_err(map_error(name))
        }
        let owner = names::SOCK_OWNER;
        let socket_capacity =
            socket_capacity(&MapData::from_pin(pins.map(owner)).map_err(map_error(owner))?)?;
        Ok(Self {
            socket_capacity: u64::from(socket_capacity),
            host: open(&pins, names::HOST_CONNS)?,
            uid_conns: open(&pins, names::UID_CONNS)?,
            uid_caps: open(&pins, names::UID_CAPS)?,
            uid_seeded: open(&pins, names::UID_SEEDED)?,
            uid_seeded_gone: open(&pins, names::UID_SEEDED_GONE)?,
            settings: open(&pins, names::SETTINGS)?,
            group_policy: open(&pins, names::GROUP_POLICY)?,
            group_conns: open(&pins, names::GROUP_CONNS)?,
        })
    }

    /// The counters, with the connections found open at the first start (and not closed
    /// since) counted in `live`, and the counters of UIDs without a limit that are still
    /// there in `uncapped_uids`, as the programs count them against the caps and budgets.
    pub fn stats(&self) -> Result<ConnStats, BpfError> {
        let mut stats = read_stats(&self.host, &self.uid_conns)?;
        let settings = self.settings()?;
        stats.host.live += stats.host.seeded.saturating_sub(settings.seeded_gone);
        stats.host.uncapped_uids = stats
            .host
            .uncapped_uids
            .saturating_sub(settings.uncapped_uids_gone);
        stats.host.uncapped_sockets = stats
            .host
            .uncapped_sockets
            .saturating_sub(settings.uncapped_sockets_gone);
        let seeded = entries(&self.uid_seeded, names::UID_SEEDED)?;
        let gone: std::collections::HashMap<u32, u64> = if seeded.is_empty() {
            std::collections::HashMap::new()
        } else {
            entries(&self.uid_seeded_gone, names::UID_SEEDED_GONE)?
                .into_iter()
                .collect()
        };
        for (uid, seeded) in seeded {
            let gone = gone.get(&uid).copied().unwrap_or(0);
            stats.per_uid.entry(uid).or_default().live += seeded.saturating_sub(gone);
        }
        Ok(stats)
    }

    pub fn settings(&self) -> Result<Settings, BpfError> {
        self.settings.get(&0, 0).map_err(map_error(names::SETTINGS))
    }

    /// Every group's counters (also of groups whose policy is gone while connections
    /// charged to them are open), by cgroup id.
    pub fn groups(&self) -> Result<BTreeMap<u64, GroupCounters>, BpfError> {
        // The counters first: a group made between the two reads then shows with its policy.
        let conns = entries(&self.group_conns, names::GROUP_CONNS)?;
        let policies: std::collections::HashMap<u64, Policy> =
            entries(&self.group_policy, names::GROUP_POLICY)?
                .into_iter()
                .collect();
        Ok(conns
            .into_iter()
            .map(|(id, mut conns)| {
                // Groups' counters are never retired.
                conns.live = live_count(0, &conns).unwrap_or(0);
                let policy = policies.get(&id).copied();
                (id, GroupCounters { policy, conns })
            })
            .collect())
    }

    /// Host counters and every UID's counters with the policy in force for it.
    pub fn usage(&self) -> Result<(HostConnStats, Vec<UidConnStats>), BpfError> {
        let counters = self.stats()?;
        // The UIDs' own policies and the settings are read once here, not per UID: with
        // 10,000 UIDs that was two syscalls more for each, every stats round.
        let own: std::collections::HashMap<u32, Policy> = entries(&self.uid_caps, names::UID_CAPS)?
            .into_iter()
            .collect();
        let settings = self.settings()?;
        let caps = own.len() as u64;
        let groups = entries(&self.group_policy, names::GROUP_POLICY)?.len() as u64;
        let host = HostConnStats {
            live: counters.host.live,
            cap: Some(settings.host_cap).filter(|c| *c != UNLIMITED),
            untracked: counters.host.untracked,
            denied_full: counters.host.denied_full,
            events_lost: counters.host.events_lost,
            map_errors: counters.host.map_errors,
            // Every charged socket has one RL_SOCK_OWNER entry.
            maps: vec![
                fill(names::SOCK_OWNER, counters.host.live, self.socket_capacity),
                fill(
                    names::UID_CONNS,
                    counters.uid_entries as u64,
                    u64::from(MAX_UID_CONNS),
                ),
                fill(names::UID_CAPS, caps, u64::from(MAX_UID_CAPS)),
                fill(names::GROUP_POLICY, groups, u64::from(MAX_GROUPS)),
            ],
            monitor: settings.flags & FLAG_MONITOR_HOST != 0,
            group_limits: settings.group_levels != 0,
        };
        let now = now_ns();
        let mut per_uid = Vec::with_capacity(counters.per_uid.len());
        for (uid, c) in counters.per_uid {
            let policy = own
                .get(&uid)
                .copied()
                .unwrap_or_else(|| default_for(uid, &settings));
            per_uid.push(uid_stats(uid, &policy, &c, now));
        }
        Ok((host, per_uid))
    }

    /// The policy that applies to `uid` now (own, else the default).
    pub fn policy_for(&self, uid: u32) -> Result<Policy, BpfError> {
        match self.uid_caps.get(&uid, 0) {
            Ok(policy) => return Ok(policy),
            Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error(names::UID_CAPS)(source)),
        }
        Ok(default_for(uid, &self.settings()?))
    }
}

/// The `user:*` default's policy for `uid` (none below its `uid_min`).
fn default_for(uid: u32, settings: &Settings) -> Policy {
    if u64::from(uid) >= settings.default_uid_min {
        settings.default_policy
    } else {
        Policy::NONE
    }
}

/// One UID's stats from its counters and policy, at monotonic time `now`.
pub fn uid_stats(uid: u32, policy: &Policy, c: &Conns, now: u64) -> UidConnStats {
    UidConnStats {
        uid,
        live: c.live,
        cap: cap(policy),
        rate: rate_stats(policy, c.rate_tat, now),
        monitor: policy.flags & POLICY_MONITOR != 0,
        admitted: c.admitted,
        denied: ByReason::from_counters(c.denied),
        would_deny: ByReason::from_counters(c.would_deny),
        events_dropped: c.events_dropped,
    }
}

/// A group's stats from its counters, at monotonic time `now`.
pub fn group_stats(
    group: &str,
    counters: &GroupCounters,
    now: u64,
) -> crate::model::usage::GroupConnStats {
    let policy = counters.policy.unwrap_or(Policy::NONE);
    let c = &counters.conns;
    crate::model::usage::GroupConnStats {
        group: group.to_string(),
        live: c.live,
        cap: cap(&policy),
        rate: rate_stats(&policy, c.rate_tat, now),
        monitor: policy.flags & POLICY_MONITOR != 0,
        admitted: c.admitted,
        denied: ByReason::from_counters(c.denied),
        would_deny: ByReason::from_counters(c.would_deny),
    }
}

/// rlagent's programs with a run count (the kernel counts only while BPF stats are on).
pub fn program_stats() -> Vec<ProgramStats> {
    let mut by_name: std::collections::BTreeMap<String, (u64, f64)> =
        std::collections::BTreeMap::new();
    for info in aya::programs::loaded_programs().flatten() {
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if !name.starts_with("rl_") || info.run_count() == 0 {
            continue;
        }
        let entry = by_name.entry(name.to_string()).or_default();
        entry.0 += info.run_count();
        entry.1 += info.run_time().as_secs_f64();
    }
    by_name
        .into_iter()
        .map(|(program, (runs, run_seconds))| ProgramStats {
            program,
            runs,
            run_seconds,
        })
        .collect()
}
