//! The cgroup part of the desired state: which cgroups the agent owns or adjusts, and the
//! effective quota of each, derived from the validated config in one place.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{
    config::{Config, GroupRule},
    model::{
        layout::Layout,
        quota::{CpuMax, Field, Limit, Quota},
        target::{Target, UserRef},
    },
};

/// Every cgroup field resolved: unset means no limit (`max`), so applying a quota also
/// resets the fields that were removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupQuota {
    pub cpu: Limit<CpuMax>,
    pub memory: Limit<u64>,
    pub memory_high: Limit<u64>,
    pub pids: Limit<u64>,
}

impl CgroupQuota {
    pub const NONE: Self = Self {
        cpu: Limit::Max,
        memory: Limit::Max,
        memory_high: Limit::Max,
        pids: Limit::Max,
    };

    /// True when `field` holds a limit (false for `max` and for fields no cgroup carries).
    pub fn limits(&self, field: Field) -> bool {
        match field {
            Field::Cpu => matches!(self.cpu, Limit::Value(_)),
            Field::Memory => matches!(self.memory, Limit::Value(_)),
            Field::MemoryHigh => matches!(self.memory_high, Limit::Value(_)),
            Field::Pids => matches!(self.pids, Limit::Value(_)),
            Field::Conns | Field::ConnRate | Field::ConnBurst | Field::Mode => false,
        }
    }

    /// `own` fields, falling back to `default` field by field (LimitRange-style defaults).
    fn resolve(own: Option<&Quota>, default: Option<&Quota>) -> Self {
        let pick = |f: fn(&Quota) -> Option<Limit<u64>>| {
            own.and_then(f)
                .or_else(|| default.and_then(f))
                .unwrap_or(Limit::Max)
        };
        Self {
            cpu: own
                .and_then(|q| q.cpu)
                .or_else(|| default.and_then(|q| q.cpu))
                .unwrap_or(Limit::Max),
            memory: pick(|q| q.memory),
            memory_high: pick(|q| q.memory_high),
            pids: pick(|q| q.pids),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    /// Where the driver in use puts groups and users; `layout.root` is the agent's subtree,
    /// relative to the cgroup2 mount.
    pub layout: Layout,
    /// Named groups: every `[[group]]` and every group that has a quota.
    pub groups: BTreeMap<String, CgroupQuota>,
    /// `user:<uid>` targets with cgroup fields of their own.
    pub users: BTreeMap<u32, CgroupQuota>,
    /// What a UID >= `uid_min` without its own cgroup fields gets (`user:*`); `None` when
    /// `user:*` sets no cgroup field, and such users are then not placed.
    pub user_default: Option<CgroupQuota>,
    /// `cgroup:<path>` targets: existing cgroups adjusted in place.
    pub cgroups: BTreeMap<PathBuf, CgroupQuota>,
    pub rules: Vec<GroupRule>,
    pub uid_min: u32,
}

impl CgroupPlan {
    /// The plan for the effective `quotas` (the config's, with runtime overrides merged)
    /// under `config`'s subtree, group rules and `uid_min`.
    pub fn new(config: &Config, quotas: &BTreeMap<Target, Quota>) -> Self {
        let default = quotas
            .get(&Target::AllUsers)
            .filter(|q| q.has_cgroup_fields());
        let mut plan = Self {
            layout: config.layout(),
            groups: BTreeMap::new(),
            users: BTreeMap::new(),
            user_default: default.map(|d| CgroupQuota::resolve(None, Some(d))),
            cgroups: BTreeMap::new(),
            rules: config.groups.clone(),
            uid_min: config.bpf.uid_min,
        };
        for rule in &config.groups {
            plan.groups.insert(rule.name.clone(), CgroupQuota::NONE);
        }
        for (target, quota) in quotas {
            match target {
                Target::Group(name) => {
                    plan.groups
                        .insert(name.clone(), CgroupQuota::resolve(Some(quota), None));
                }
                Target::User(UserRef::Uid(uid)) if quota.has_cgroup_fields() => {
                    plan.users
                        .insert(*uid, CgroupQuota::resolve(Some(quota), default));
                }
                Target::Cgroup(path) if quota.has_cgroup_fields() => {
                    plan.cgroups
                        .insert(path.clone(), CgroupQuota::resolve(Some(quota), None));
                }
                _ => {}
            }
        }
        plan
    }

    /// True when the plan asks for cgroups at all (a conns-only config touches none).
    pub fn wants_cgroups(&self) -> bool {
        !self.groups.is_empty()
            || !self.users.is_empty()
            || self.user_default.is_some()
            || !self.cgroups.is_empty()
    }

    /// The agent's subtree, relative to the cgroup2 mount.
    pub fn root(&self) -> &Path {
        &self.layout.root
    }

    pub fn group_cgroup(&self, name: &str) -> PathBuf {
        self.layout.group_cgroup(name)
    }

    pub fn user_cgroup(&self, uid: u32) -> PathBuf {
        self.layout.user_cgroup(uid)
    }

    /// The quota a user cgroup gets, `None` when the UID's processes are not placed.
    pub fn user_quota(&self, uid: u32) -> Option<CgroupQuota> {
        if let Some(q) = self.users.get(&uid) {
            return Some(*q);
        }
        (uid >= self.uid_min).then_some(self.user_default).flatten()
    }

    /// True when `cgroup` (relative to the mount) lies inside a `cgroup:<path>` target,
    /// whose processes the agent leaves where they are.
    pub fn inside_cgroup_target(&self, cgroup: &Path) -> bool {
        self.cgroups.keys().any(|t| cgroup.starts_with(t))
    }

    /// True when every process belongs where it did under `other`: the same subtree, group
    /// rules, `uid_min`, groups, users with cgroups of their own, whether other users are
    /// placed, and `cgroup:<path>` targets. Only quota values differ, if anything, so no
    /// process needs to move.
    pub fn places_as(&self, other: &CgroupPlan) -> bool {
        self.layout == other.layout
            && self.rules == other.rules
            && self.uid_min == other.uid_min
            && self.groups.keys().eq(other.groups.keys())
            && self.users.keys().eq(other.users.keys())
            && self.user_default.is_some() == other.user_default.is_some()
            && self.cgroups.keys().eq(other.cgroups.keys())
    }
}

/// What was written before a plan is applied: how much of it must be written.
#[derive(Debug, Clone, Copy)]
pub enum Before<'a> {
    /// Nothing (the agent's first apply): everything is written.
    Nothing,
    /// A plan whose write did not complete: everything is written, and what that plan may
    /// have set is lifted where the new one drops it.
    Partial(&'a CgroupPlan),
    /// A plan written completely: only what differs from it is written.
    Complete(&'a CgroupPlan),
}

impl<'a> Before<'a> {
    /// The plan written before, completely or not.
    pub fn plan(self) -> Option<&'a CgroupPlan> {
        match self {
            Self::Nothing => None,
            Self::Partial(plan) | Self::Complete(plan) => Some(plan),
        }
    }

    /// The plan written before, when its write completed.
    pub fn complete(self) -> Option<&'a CgroupPlan> {
        match self {
            Self::Complete(plan) => Some(plan),
            Self::Nothing | Self::Partial(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::plan;

    #[test]
    fn fields_resolve_against_the_user_default_one_by_one() {
        let p = plan(
            r#"
[[quota]]
target = "user:*"
cpu = "100%"
memory = "1G"
conns = 10
[[quota]]
target = "user:2000"
memory = "2G"
[[quota]]
target = "user:2001"
conns = 5
"#,
        );
        let own = p.user_quota(2000).unwrap();
        assert_eq!(own.memory, Limit::Value(2 << 30));
        assert_eq!(
            own.cpu,
            Limit::Value(CpuMax {
                quota_us: 100_000,
                period_us: 100_000
            })
        );
        assert_eq!(own.pids, Limit::Max);
        // Only conns of its own: the cgroup fields all come from the default.
        assert_eq!(p.user_quota(2001), p.user_default);
        assert_eq!(p.user_quota(999), None, "system UIDs are not placed");
    }

    #[test]
    fn no_cgroup_fields_in_user_star_means_no_user_placement() {
        let p = plan("[[quota]]\ntarget = \"user:*\"\nconns = 3\n");
        assert_eq!(p.user_default, None);
        assert_eq!(p.user_quota(5000), None);
    }

    #[test]
    fn groups_come_from_rules_and_quotas_and_cgroup_targets_are_kept_apart() {
        let p = plan(
            r#"
[[group]]
name = "batch"
uids = [65534]
[[quota]]
target = "agent"
cpu = "50%"
[[quota]]
target = "cgroup:system.slice/nginx.service"
memory = "512M"
"#,
        );
        assert_eq!(p.groups["batch"], CgroupQuota::NONE);
        assert_eq!(
            p.groups["agent"].cpu,
            Limit::Value(CpuMax {
                quota_us: 50_000,
                period_us: 100_000
            })
        );
        assert_eq!(
            p.group_cgroup("agent"),
            PathBuf::from("rlagent.slice/agent")
        );
        assert_eq!(p.user_cgroup(7), PathBuf::from("rlagent.slice/user-7"));
        assert!(p.inside_cgroup_target(Path::new("system.slice/nginx.service/sub")));
        assert!(!p.inside_cgroup_target(Path::new("system.slice")));
    }

    #[test]
    fn a_change_of_quota_values_places_as_before_and_a_change_of_membership_does_not() {
        let base = "[[group]]\nname = \"batch\"\nuids = [65534]\n[[quota]]\ntarget = \"user:2000\"\ncpu = \"50%\"\n";
        let p = plan(base);
        let values = plan(&format!("{base}[[quota]]\ntarget = \"batch\"\npids = 10\n"));
        assert!(
            values.places_as(&p),
            "a group's quota changed: nobody moves"
        );
        let changed = [
            "[[group]]\nname = \"batch\"\nuids = [65533]\n[[quota]]\ntarget = \"user:2000\"\ncpu = \"50%\"\n",
            &format!("{base}[[group]]\nname = \"web\"\n"),
            &format!("{base}[[quota]]\ntarget = \"user:2001\"\npids = 10\n"),
            &format!("{base}[[quota]]\ntarget = \"user:*\"\npids = 10\n"),
            "[[group]]\nname = \"batch\"\nuids = [65534]\n",
        ];
        for text in changed {
            assert!(!plan(text).places_as(&p), "{text}");
        }
    }
}
