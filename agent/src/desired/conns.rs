//! The connection-limit part of the desired state: what the kernel programs must enforce,
//! derived from the validated quotas. One function builds it, whatever the quotas' source.

use std::collections::BTreeMap;

use rlagent_common::{
    Settings, FLAG_COUNT_UDP, FLAG_ENFORCE, FLAG_ON_FULL_ALLOW, MAX_UID_CONNS, UNLIMITED,
};

use crate::{
    config::BpfConfig,
    model::{
        quota::{unsupported_fields, Field, Limit, OnFull, Quota},
        target::{Target, UserRef},
    },
};

/// Caps the kernel enforces. `u64::MAX` ([`UNLIMITED`]) means no cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnLimits {
    /// UIDs with a `conns` of their own (`max` is stored as [`UNLIMITED`], which exempts
    /// the UID from the `user:*` default).
    pub per_uid: BTreeMap<u32, u64>,
    /// `user:*` conns: applies to UIDs >= `uid_min` without their own.
    pub default_cap: u64,
    pub uid_min: u32,
    pub host_cap: u64,
    pub count_udp: bool,
    pub deny_errno: i32,
    pub on_full: OnFull,
}

impl ConnLimits {
    /// The limits for the effective `quotas` under the `[bpf]` settings.
    pub fn new(bpf: &BpfConfig, quotas: &BTreeMap<Target, Quota>) -> Self {
        let mut per_uid = BTreeMap::new();
        let mut default_cap = UNLIMITED;
        for (target, quota) in quotas {
            let Some(conns) = quota.conns else { continue };
            let cap = match conns {
                Limit::Max => UNLIMITED,
                Limit::Value(n) => n,
            };
            match target {
                Target::User(UserRef::Uid(uid)) => {
                    per_uid.insert(*uid, cap);
                }
                Target::AllUsers => default_cap = cap,
                // Names are resolved to UIDs when the config is validated; group and
                // cgroup connection caps are reported by `unenforced_fields`.
                Target::User(UserRef::Name(_)) | Target::Group(_) | Target::Cgroup(_) => {}
            }
        }
        Self {
            per_uid,
            default_cap,
            uid_min: bpf.uid_min,
            host_cap: bpf.host_conns.unwrap_or(UNLIMITED),
            count_udp: bpf.count_udp,
            deny_errno: bpf.deny_errno,
            on_full: bpf.on_full,
        }
    }

    /// The cap of `uid`: its own, else the `user:*` default from `uid_min` up.
    pub fn cap_for(&self, uid: u32) -> u64 {
        match self.per_uid.get(&uid) {
            Some(cap) => *cap,
            None if uid >= self.uid_min => self.default_cap,
            None => UNLIMITED,
        }
    }

    /// The `RL_SETTINGS` element for these limits, with a charged-socket map of
    /// `socket_capacity` entries: UIDs without a cap get half of it, and half of the UID
    /// counters, so they can never take the capacity capped UIDs need.
    pub fn settings(&self, socket_capacity: u32) -> Settings {
        let mut flags = FLAG_ENFORCE;
        if self.count_udp {
            flags |= FLAG_COUNT_UDP;
        }
        if self.on_full == OnFull::Allow {
            flags |= FLAG_ON_FULL_ALLOW;
        }
        Settings {
            default_cap: self.default_cap,
            default_uid_min: u64::from(self.uid_min),
            host_cap: self.host_cap,
            flags,
            deny_errno: self.deny_errno as u64,
            uncapped_socket_budget: u64::from(socket_capacity / 2),
            uncapped_uid_budget: u64::from(MAX_UID_CONNS / 2),
            // Kernel state, not desired state: the limiter keeps it.
            seeded_gone: 0,
        }
    }
}

/// Quota fields no code enforces yet, per target (see [`unsupported_fields`]): the config
/// and rlctl refuse them; a state file from an older agent may still hold some.
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
[[quota]]
target = "user:3000"
conns = 2
[[quota]]
target = "user:3001"
conns = "max"
[[quota]]
target = "user:3002"
cpu = "50%"
[[quota]]
target = "batch"
memory = "1G"
"#,
        );
        let limits = ConnLimits::new(&config.bpf, &config.quotas);
        assert_eq!(
            limits.per_uid,
            BTreeMap::from([(3000, 2), (3001, UNLIMITED)])
        );
        assert_eq!(limits.default_cap, 8);
        assert_eq!(limits.host_cap, 500);
        let s = limits.settings(1024);
        assert_eq!(s.flags, FLAG_ENFORCE | FLAG_COUNT_UDP);
        assert_eq!(s.default_uid_min, 2000);
        assert_eq!(s.deny_errno, libc::ECONNREFUSED as u64);
        // UIDs without a cap get half of each map.
        assert_eq!(s.uncapped_socket_budget, 512);
        assert_eq!(s.uncapped_uid_budget, u64::from(MAX_UID_CONNS / 2));

        assert!(unenforced_fields(&config.quotas).is_empty());
        // A state file from an older agent can still carry them.
        let mut old = config.quotas.clone();
        let batch = Target::Group("batch".into());
        old.get_mut(&batch).unwrap().set(Field::Conns, "5").unwrap();
        assert_eq!(unenforced_fields(&old), vec![(batch, vec![Field::Conns])]);
    }

    #[test]
    fn no_quotas_means_nothing_is_capped() {
        let c = Config::embedded_default().unwrap();
        let limits = ConnLimits::new(&c.bpf, &c.quotas);
        assert!(limits.per_uid.is_empty());
        assert_eq!(
            (limits.default_cap, limits.host_cap),
            (UNLIMITED, UNLIMITED)
        );
        assert_eq!(limits.settings(1024).flags, FLAG_ENFORCE);
        let mut allow = c.bpf.clone();
        allow.on_full = OnFull::Allow;
        assert_eq!(
            ConnLimits::new(&allow, &c.quotas).settings(1024).flags,
            FLAG_ENFORCE | FLAG_ON_FULL_ALLOW
        );
    }
}
