//! The connection-limit part of the desired state: what the kernel programs must enforce,
//! derived from the validated quotas. One function builds it, whatever the quotas' source.

use std::{collections::BTreeMap, path::PathBuf};

use rlagent_common::{
    Policy, Settings, FLAG_COUNT_UDP, FLAG_ENFORCE, FLAG_MONITOR_HOST, FLAG_ON_FULL_ALLOW,
    MAX_UID_CONNS, POLICY_MONITOR, UNLIMITED,
};

use crate::{
    config::BpfConfig,
    model::{
        layout::Layout,
        quota::{unsupported_fields, ConnRate, Field, Limit, Mode, OnFull, Quota},
        subuid::{self, SubordinateRange},
        target::{Target, UserRef},
    },
};

/// A group's connection limits and the cgroup they apply to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLimits {
    /// The group's cgroup, relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    pub policy: Policy,
}

/// Why a group's connection limits are not in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupUnenforced {
    /// The group's cgroup is not below the cgroup the programs attach to.
    OutsideAttach { cgroup: PathBuf, attach: PathBuf },
    /// The group's cgroup is deeper than the programs look for groups.
    TooDeep { cgroup: PathBuf, deepest: u32 },
    /// The group's cgroup does not exist yet: its limits apply once it does.
    CgroupMissing,
}

impl GroupUnenforced {
    /// True when the limits apply by themselves once the cgroup appears.
    pub fn pending(&self) -> bool {
        matches!(self, Self::CgroupMissing)
    }
}

impl std::fmt::Display for GroupUnenforced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OutsideAttach { cgroup, attach } => write!(
                f,
                "the group's cgroup /{} is outside [bpf] attach_cgroup /{}: the programs do not see its processes",
                cgroup.display(),
                attach.display()
            ),
            Self::TooDeep { cgroup, deepest } => write!(
                f,
                "the group's cgroup /{} is deeper than level {deepest}",
                cgroup.display()
            ),
            Self::CgroupMissing => f.write_str("the group's cgroup does not exist yet"),
        }
    }
}

/// What the kernel programs enforce. In a [`Policy`], [`UNLIMITED`] means no cap and a
/// zero interval no rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// UIDs with a connection field of their own, each with the `user:*` fields merged in
    /// field by field (from `uid_min` up). A cap of `max` is stored as [`UNLIMITED`],
    /// which exempts the UID from the default's cap.
    pub per_uid: BTreeMap<u32, Policy>,
    /// `user:*`: applies to UIDs >= `uid_min` without their own.
    pub default_policy: Policy,
    pub uid_min: u32,
    pub host_cap: u64,
    /// `[bpf] mode`: the host cap's mode, and every quota's without a mode of its own.
    pub host_mode: Mode,
    /// Groups with `conns` or `conn_rate`, by name.
    pub groups: BTreeMap<String, GroupLimits>,
    pub count_udp: bool,
    pub deny_errno: i32,
    pub on_full: OnFull,
    /// Denial events per UID: (interval between events in ns, burst).
    pub events: (u64, u64),
    /// Subordinate UID ranges whose connections are charged to their owners (sorted).
    pub subordinate: Vec<SubordinateRange>,
}

/// The policy `own`'s connection fields make, falling back to `default`'s field by field,
/// then to `mode` for the mode.
fn policy(own: Option<&Quota>, default: Option<&Quota>, mode: Mode) -> Policy {
    fn pick<T>(
        own: Option<&Quota>,
        default: Option<&Quota>,
        f: fn(&Quota) -> Option<T>,
    ) -> Option<T> {
        own.and_then(f).or_else(|| default.and_then(f))
    }
    let cap = match pick(own, default, |q| q.conns) {
        Some(Limit::Value(n)) => n,
        Some(Limit::Max) | None => UNLIMITED,
    };
    let mode = pick(own, default, |q| q.mode).unwrap_or(mode);
    let mut policy = Policy {
        cap,
        flags: if mode == Mode::Monitor {
            POLICY_MONITOR
        } else {
            0
        },
        ..Policy::NONE
    };
    if let Some(Limit::Value(rate)) = pick(own, default, |q| q.conn_rate) {
        let burst = pick(own, default, |q| q.conn_burst).unwrap_or(rate.count);
        set_rate(&mut policy, rate, burst);
    }
    policy
}

/// Sets the token bucket of `policy`: one token per `rate` interval, `burst` at most.
fn set_rate(policy: &mut Policy, rate: ConnRate, burst: u64) {
    policy.rate_interval_ns = rate.interval_ns();
    policy.burst = burst;
    policy.rate_window_ns = policy.rate_interval_ns.saturating_mul(burst);
}

impl ConnLimits {
    /// The limits for the effective `quotas` under the `[bpf]` settings, with groups'
    /// cgroups where `layout` puts them.
    pub fn new(bpf: &BpfConfig, layout: &Layout, quotas: &BTreeMap<Target, Quota>) -> Self {
        let default = quotas.get(&Target::AllUsers);
        let mut per_uid = BTreeMap::new();
        let mut groups = BTreeMap::new();
        for (target, quota) in quotas {
            if quota.conn_fields().is_empty() {
                continue;
            }
            match target {
                Target::User(UserRef::Uid(uid)) => {
                    let default = default.filter(|_| *uid >= bpf.uid_min);
                    per_uid.insert(*uid, policy(Some(quota), default, bpf.mode));
                }
                Target::Group(name) => {
                    let limits = GroupLimits {
                        cgroup: layout.group_cgroup(name),
                        policy: policy(Some(quota), None, bpf.mode),
                    };
                    groups.insert(name.clone(), limits);
                }
                // Names are resolved to UIDs when the config is validated; `user:*` is the
                // default below; cgroup targets carry no connection fields (see
                // `unenforced_fields`).
                Target::User(UserRef::Name(_)) | Target::AllUsers | Target::Cgroup(_) => {}
            }
        }
        let mut events = Policy::NONE;
        set_rate(&mut events, bpf.event_rate, bpf.event_burst);
        Self {
            per_uid,
            default_policy: policy(None, default, bpf.mode),
            uid_min: bpf.uid_min,
            host_cap: bpf.host_conns.unwrap_or(UNLIMITED),
            host_mode: bpf.mode,
            groups,
            count_udp: bpf.count_udp,
            deny_errno: bpf.deny_errno,
            on_full: bpf.on_full,
            events: (events.rate_interval_ns, events.burst),
            subordinate: bpf.subordinate.clone(),
        }
    }

    /// Who is charged for a connection of the kernel UID `uid` (as the programs decide):
    /// the owner of its subordinate range, else `uid`.
    pub fn charged_uid(&self, uid: u32) -> u32 {
        subuid::owner_of(&self.subordinate, uid).unwrap_or(uid)
    }

    /// The policy of `uid`: its own, else the `user:*` default from `uid_min` up.
    pub fn policy_for(&self, uid: u32) -> Policy {
        match self.per_uid.get(&uid) {
            Some(policy) => *policy,
            None if uid >= self.uid_min => self.default_policy,
            None => Policy::NONE,
        }
    }

    /// The `RL_SETTINGS` element for these limits, with a charged-socket map of
    /// `socket_capacity` entries: UIDs without a limit get half of it, and half of the UID
    /// counters, so they can never take the capacity limited UIDs need. `group_levels` is
    /// left for the kernel adapter, which finds the groups' cgroups.
    pub fn settings(&self, socket_capacity: u32) -> Settings {
        let mut flags = FLAG_ENFORCE;
        if self.count_udp {
            flags |= FLAG_COUNT_UDP;
        }
        if self.on_full == OnFull::Allow {
            flags |= FLAG_ON_FULL_ALLOW;
        }
        if self.host_mode == Mode::Monitor {
            flags |= FLAG_MONITOR_HOST;
        }
        let (event_interval_ns, event_burst) = self.events;
        Settings {
            default_uid_min: u64::from(self.uid_min),
            host_cap: self.host_cap,
            flags,
            deny_errno: self.deny_errno as u64,
            uncapped_socket_budget: u64::from(socket_capacity / 2),
            uncapped_uid_budget: u64::from(MAX_UID_CONNS / 2),
            // Kernel state, not desired state: the limiter keeps it.
            seeded_gone: 0,
            default_policy: self.default_policy,
            event_interval_ns,
            event_window_ns: event_interval_ns.saturating_mul(event_burst),
            group_levels: 0,
            // The agent's own state: the limiter keeps it.
            uncapped_uids_gone: 0,
            uncapped_sockets_gone: 0,
            subuid_first: self.subordinate.first().map_or(1, |r| u64::from(r.first)),
            subuid_last: self.subordinate.last().map_or(0, |r| u64::from(r.last())),
        }
    }
}

/// Quota fields the target's kind cannot carry, per target (see [`unsupported_fields`]):
/// the config and rlctl refuse them; a state file from an older agent may still hold some.
pub fn unenforced_fields(quotas: &BTreeMap<Target, Quota>) -> Vec<(Target, Vec<Field>)> {
    quotas
        .iter()
        .map(|(target, quota)| (target.clone(), unsupported_fields(target, quota)))
        .filter(|(_, fields)| !fields.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, testing::config};

    #[test]
    fn limits_follow_the_quotas() {
        let config = config(
            r#"
[bpf]
host_conns = 500
count_udp = true
uid_min = 2000
deny_errno = "ECONNREFUSED"
[[quota]]
target = "user:*"
conns = 8
conn_rate = "10/s"
[[quota]]
target = "user:3000"
conns = 2
[[quota]]
target = "user:3001"
conns = "max"
mode = "monitor"
[[quota]]
target = "user:3002"
cpu = "50%"
[[quota]]
target = "user:1500"
conn_rate = "30/min"
conn_burst = 3
[[quota]]
target = "batch"
memory = "1G"
conns = 3
conn_rate = "4/s"
"#,
        );
        let limits = ConnLimits::new(&config.bpf, &config.layout(), &config.quotas);
        // Field by field: user:3000 has its own cap and the default's rate.
        let own = limits.per_uid[&3000];
        assert_eq!(
            (own.cap, own.rate_interval_ns, own.burst),
            (2, 100_000_000, 10)
        );
        assert_eq!(own.rate_window_ns, 1_000_000_000);
        assert_eq!(own.flags, 0);
        let exempt = limits.per_uid[&3001];
        assert_eq!((exempt.cap, exempt.flags), (UNLIMITED, POLICY_MONITOR));
        // No connection field of its own: the default applies in the kernel.
        assert!(!limits.per_uid.contains_key(&3002));
        assert_eq!(limits.policy_for(3002), limits.default_policy);
        // Below uid_min the default does not apply, not even field by field.
        let low = limits.per_uid[&1500];
        assert_eq!(
            (low.cap, low.rate_interval_ns, low.burst),
            (UNLIMITED, 2_000_000_000, 3)
        );
        assert_eq!(limits.policy_for(1999), Policy::NONE);
        assert_eq!(limits.default_policy.cap, 8);
        let batch = &limits.groups["batch"];
        assert_eq!(batch.cgroup, config.layout().group_cgroup("batch"));
        assert_eq!((batch.policy.cap, batch.policy.burst), (3, 4));
        assert_eq!(limits.host_cap, 500);
        let s = limits.settings(1024);
        assert_eq!(s.flags, FLAG_ENFORCE | FLAG_COUNT_UDP);
        assert_eq!(s.default_uid_min, 2000);
        assert_eq!(s.deny_errno, libc::ECONNREFUSED as u64);
        // UIDs without a limit get half of each map.
        assert_eq!(s.uncapped_socket_budget, 512);
        assert_eq!(s.uncapped_uid_budget, u64::from(MAX_UID_CONNS / 2));
        // 20 events a second, 100 at once, per UID.
        assert_eq!(
            (s.event_interval_ns, s.event_window_ns),
            (50_000_000, 5_000_000_000)
        );

        assert!(unenforced_fields(&config.quotas).is_empty());
        // A state file from an older agent can still carry them.
        let mut old = config.quotas.clone();
        let cgroup = Target::Cgroup("system.slice/x.service".into());
        let mut q = Quota::default();
        q.set(Field::Conns, "5").unwrap();
        old.insert(cgroup.clone(), q);
        assert_eq!(unenforced_fields(&old), vec![(cgroup, vec![Field::Conns])]);
    }

    #[test]
    fn bpf_mode_is_the_default_of_every_quota_and_the_host_cap() {
        let config = config(
            "[bpf]\nmode = \"monitor\"\nhost_conns = 9\n[[quota]]\ntarget = \"user:3000\"\nconns = 2\n[[quota]]\ntarget = \"user:3001\"\nconns = 2\nmode = \"enforce\"\n",
        );
        let limits = ConnLimits::new(&config.bpf, &config.layout(), &config.quotas);
        assert_eq!(limits.per_uid[&3000].flags, POLICY_MONITOR);
        assert_eq!(limits.per_uid[&3001].flags, 0);
        assert_eq!(limits.host_mode, Mode::Monitor);
        assert_ne!(limits.settings(1024).flags & FLAG_MONITOR_HOST, 0);
    }

    #[test]
    fn no_quotas_means_nothing_is_limited() {
        let c = Config::embedded_default().unwrap();
        let limits = ConnLimits::new(&c.bpf, &c.layout(), &c.quotas);
        assert!(limits.per_uid.is_empty() && limits.groups.is_empty());
        assert_eq!(limits.default_policy, Policy::NONE);
        assert_eq!(limits.host_cap, UNLIMITED);
        assert_eq!(limits.settings(1024).flags, FLAG_ENFORCE);
        let mut allow = c.bpf.clone();
        allow.on_full = OnFull::Allow;
        assert_eq!(
            ConnLimits::new(&allow, &c.layout(), &c.quotas)
                .settings(1024)
                .flags,
            FLAG_ENFORCE | FLAG_ON_FULL_ALLOW
        );
    }
}
