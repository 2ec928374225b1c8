//! The cgroupfs driver: the agent owns a subtree of the cgroup2 hierarchy and applies a
//! [`CgroupPlan`] by writing its files; placement moves a process with one `cgroup.procs`
//! write ([`CgroupfsMover`]).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    cpu,
    driver::{interface_file, ApplyReport, CgroupDriver, DriverError, Skipped},
    memory,
    mover::{Decision, MoveError, Moved, Mover},
    pids, CgroupError, CgroupFs, Controller,
};
use crate::{
    desired::cgroups::{Before, CgroupPlan, CgroupQuota},
    kernel::proc::ProcInfo,
    model::quota::Field,
};

/// The cgroupfs driver over one cgroup2 hierarchy (the real mount, or a fake tree in
/// tests).
pub struct CgroupfsDriver {
    fs: CgroupFs,
}

impl CgroupfsDriver {
    pub fn new(fs: CgroupFs) -> Self {
        Self { fs }
    }

    /// Everything that can be checked before writing: `cgroup:<path>` targets exist.
    pub fn check(&self, plan: &CgroupPlan) -> Result<(), CgroupError> {
        match self.missing(plan).into_iter().next() {
            None => Ok(()),
            Some(path) => Err(CgroupError::NoSuchCgroup {
                target: format!("cgroup:{}", path.display()),
                path: self.fs.path(&path),
            }),
        }
    }

    /// Creates `user-<uid>` with its quota (placement calls this on a UID's first process).
    pub fn ensure_user(
        &self,
        plan: &CgroupPlan,
        uid: u32,
        quota: &CgroupQuota,
    ) -> Result<PathBuf, CgroupError> {
        let dir = plan.user_cgroup(uid);
        if !self.fs.path(&dir).exists() {
            self.fs.ensure(&dir, &Controller::ALL)?;
            self.write_quota(&dir, quota, &mut ApplyReport::default())?;
        }
        Ok(dir)
    }

    fn children(&self, relative: &Path) -> Result<Vec<PathBuf>, CgroupError> {
        let dir = self.fs.path(relative);
        let entries = std::fs::read_dir(&dir).map_err(|source| CgroupError::Read {
            path: dir.clone(),
            source,
        })?;
        Ok(entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| PathBuf::from(e.file_name()))
            .collect())
    }

    /// Creates `relative` with every controller it can have; the controllers it cannot
    /// have are reported once each (and as missing from the subtree when `relative` is
    /// its root).
    fn ensure(
        &self,
        plan: &CgroupPlan,
        relative: &Path,
        report: &mut ApplyReport,
        seen_unavailable: &mut BTreeSet<Controller>,
    ) -> Result<(), CgroupError> {
        for e in self.fs.ensure(relative, &Controller::ALL)? {
            if let CgroupError::Unavailable { controller, .. } = &e {
                if relative == plan.root() {
                    report.subtree_missing.insert(*controller);
                }
                if seen_unavailable.insert(*controller) {
                    report.unavailable.push(e.to_string());
                }
            }
        }
        Ok(())
    }

    /// After a complete write of `previous` (same subtree and `uid_min`): writes the
    /// cgroups whose quota differs, the new ones, and lifts what `plan` drops. Every other
    /// cgroup holds what `plan` says as far as the agent's writes go (a reload writes them
    /// all again), so a change of one group's quota writes one cgroup, whatever the number
    /// of cgroups managed. The subtree's root is checked every time, for the controllers
    /// it lacks.
    fn apply_changes(
        &self,
        plan: &CgroupPlan,
        previous: &CgroupPlan,
    ) -> Result<ApplyReport, CgroupError> {
        let mut report = ApplyReport::default();
        let mut unavailable = BTreeSet::new();
        let mut written = BTreeSet::new();
        self.ensure(plan, plan.root(), &mut report, &mut unavailable)?;
        let mut write =
            |this: &Self, dir: PathBuf, quota: &CgroupQuota, report: &mut ApplyReport| {
                this.write_quota(&dir, quota, report)?;
                written.insert(dir);
                Ok::<(), CgroupError>(())
            };
        for (name, quota) in &plan.groups {
            if previous.groups.get(name) != Some(quota) {
                let dir = plan.group_cgroup(name);
                self.ensure(plan, &dir, &mut report, &mut unavailable)?;
                write(self, dir, quota, &mut report)?;
            }
        }
        for name in previous
            .groups
            .keys()
            .filter(|g| !plan.groups.contains_key(*g))
        {
            let dir = plan.group_cgroup(name);
            if self.fs.path(&dir).exists() {
                write(self, dir, &CgroupQuota::NONE, &mut report)?;
            }
        }
        for (uid, quota) in &plan.users {
            if previous.users.get(uid) != Some(quota) {
                let dir = plan.user_cgroup(*uid);
                self.ensure(plan, &dir, &mut report, &mut unavailable)?;
                write(self, dir, quota, &mut report)?;
            }
        }
        // Users without cgroup fields of their own: every one made on demand when the
        // default changed, else those that just lost their own.
        let on_demand: Vec<u32> = if plan.user_default != previous.user_default {
            self.children(plan.root())?
                .iter()
                .filter_map(|c| c.to_str()?.strip_prefix("user-")?.parse().ok())
                .filter(|uid| !plan.users.contains_key(uid))
                .collect()
        } else {
            previous
                .users
                .keys()
                .filter(|uid| !plan.users.contains_key(*uid))
                .copied()
                .collect()
        };
        for uid in on_demand {
            let dir = plan.user_cgroup(uid);
            if self.fs.path(&dir).exists() {
                let quota = plan.user_quota(uid).unwrap_or(CgroupQuota::NONE);
                write(self, dir, &quota, &mut report)?;
            }
        }
        for (path, quota) in &plan.cgroups {
            if previous.cgroups.get(path) != Some(quota) {
                write(self, path.clone(), quota, &mut report)?;
            }
        }
        written.extend(self.lift_dropped_targets(plan, previous, &mut report)?);
        report.rewritten = Some(written);
        Ok(report)
    }

    /// Resets the `cgroup:<path>` targets of `previous` that `plan` drops (those whose
    /// cgroup still exists: a stopped service's has nothing left to reset); returns them.
    fn lift_dropped_targets(
        &self,
        plan: &CgroupPlan,
        previous: &CgroupPlan,
        report: &mut ApplyReport,
    ) -> Result<Vec<PathBuf>, CgroupError> {
        let mut lifted = Vec::new();
        for path in previous.cgroups.keys() {
            if !plan.cgroups.contains_key(path) && self.fs.path(path).join("cgroup.procs").exists()
            {
                self.write_quota(path, &CgroupQuota::NONE, report)?;
                lifted.push(path.clone());
            }
        }
        Ok(lifted)
    }

    /// Writes each field whose controller is enabled for the cgroup (its interface file
    /// exists). A limit on an unavailable controller is reported, never silently dropped.
    fn write_quota(
        &self,
        relative: &Path,
        quota: &CgroupQuota,
        report: &mut ApplyReport,
    ) -> Result<(), CgroupError> {
        let dir = self.fs.path(relative);
        let mut field = |name: Field, write: &dyn Fn(&Path) -> Result<(), CgroupError>| {
            let file = interface_file(name);
            if dir.join(file).exists() {
                write(&dir)
            } else {
                if quota.limits(name) {
                    report.skipped.push(Skipped {
                        cgroup: relative.to_path_buf(),
                        field: name,
                        file,
                    });
                }
                Ok(())
            }
        };
        field(Field::Cpu, &|d| cpu::apply(d, quota.cpu))?;
        // memory.high first when lowering both, so the throttle point never sits above max.
        field(Field::MemoryHigh, &|d| {
            memory::apply_high(d, quota.memory_high)
        })?;
        field(Field::Memory, &|d| memory::apply_max(d, quota.memory))?;
        field(Field::Pids, &|d| pids::apply(d, quota.pids))?;
        Ok(())
    }
}

impl CgroupDriver for CgroupfsDriver {
    fn fs(&self) -> &CgroupFs {
        &self.fs
    }

    /// Only when a plan has cgroups or had them: otherwise the agent's subtree is not
    /// created at all.
    fn needs_apply(&self, plan: &CgroupPlan, before: Before) -> bool {
        plan.wants_cgroups() || before.plan().is_some_and(CgroupPlan::wants_cgroups)
    }

    /// Creates the subtree and the cgroups of `plan`, and writes every quota. Cgroups under
    /// the subtree that the plan no longer limits are reset to `max`, and so are the
    /// `cgroup:<path>` targets of the plan before that `plan` drops. After a complete
    /// write of a plan that wanted cgroups, in the same subtree and with the same
    /// `uid_min` (which decides who gets the user default), only the cgroups whose quota
    /// differs are written (see [`Self::apply_changes`]); otherwise every cgroup is, as
    /// what an earlier run left in the subtree is then not known to match.
    fn apply(&self, plan: &CgroupPlan, before: Before) -> Result<ApplyReport, DriverError> {
        self.check(plan)?;
        let diffable = |p: &&CgroupPlan| {
            p.wants_cgroups() && p.layout == plan.layout && p.uid_min == plan.uid_min
        };
        if let Some(previous) = before.complete().filter(diffable) {
            return Ok(self.apply_changes(plan, previous)?);
        }
        let mut report = ApplyReport::default();
        let mut unavailable = BTreeSet::new();
        self.ensure(plan, plan.root(), &mut report, &mut unavailable)?;
        for (name, quota) in &plan.groups {
            let dir = plan.group_cgroup(name);
            self.ensure(plan, &dir, &mut report, &mut unavailable)?;
            self.write_quota(&dir, quota, &mut report)?;
        }
        for (uid, quota) in &plan.users {
            let dir = plan.user_cgroup(*uid);
            self.ensure(plan, &dir, &mut report, &mut unavailable)?;
            self.write_quota(&dir, quota, &mut report)?;
        }
        // Existing children of the subtree that the plan does not name explicitly: user
        // cgroups made on demand (default quota, or none now) and removed groups.
        for child in self.children(plan.root())? {
            let name = child.to_string_lossy().into_owned();
            let quota = match name
                .strip_prefix("user-")
                .and_then(|u| u.parse::<u32>().ok())
            {
                Some(uid) if plan.users.contains_key(&uid) => continue,
                Some(uid) => plan.user_quota(uid).unwrap_or(CgroupQuota::NONE),
                None if plan.groups.contains_key(&name) => continue,
                None => CgroupQuota::NONE,
            };
            self.write_quota(&plan.root().join(&child), &quota, &mut report)?;
        }
        for (path, quota) in &plan.cgroups {
            self.write_quota(path, quota, &mut report)?;
        }
        if let Some(previous) = before.plan() {
            self.lift_dropped_targets(plan, previous, &mut report)?;
        }
        Ok(report)
    }

    /// Always: every process a quota covers is placed into its cgroup.
    fn places(&self, _: &CgroupPlan) -> bool {
        true
    }

    fn mover(self: Arc<Self>) -> Box<dyn Mover> {
        Box::new(CgroupfsMover {
            driver: CgroupfsDriver::new(self.fs.clone()),
        })
    }

    fn move_pids(
        &self,
        plan: &CgroupPlan,
        group: &str,
        pids: &[u32],
    ) -> Result<PathBuf, DriverError> {
        let cgroup = plan.group_cgroup(group);
        for pid in pids {
            // A process that exited since it was checked has nothing left to move.
            self.fs.move_pid(&cgroup, *pid)?;
        }
        Ok(cgroup)
    }
}

/// The cgroupfs driver's mover: one `cgroup.procs` write per process; a user's cgroup is
/// created on their first process.
pub struct CgroupfsMover {
    pub driver: CgroupfsDriver,
}

impl Mover for CgroupfsMover {
    fn eligible(&self, _: &CgroupPlan, _: &Path) -> bool {
        true
    }

    fn place(
        &self,
        plan: &CgroupPlan,
        info: &ProcInfo,
        decision: &Decision,
    ) -> Result<Option<Moved>, MoveError> {
        let fs = &self.driver.fs;
        let move_error = |target: &Path, source| MoveError::Cgroup {
            cgroup: fs.path(target),
            source,
        };
        let target = match decision {
            Decision::Leave => return Ok(None),
            Decision::Group(name) => plan.group_cgroup(name),
            Decision::User(uid) => {
                let quota = plan.user_quota(*uid).expect("decided on a user quota");
                self.driver
                    .ensure_user(plan, *uid, &quota)
                    .map_err(|source| move_error(&plan.user_cgroup(*uid), source))?
            }
        };
        if info.cgroup == target {
            return Ok(None);
        }
        match fs.move_pid(&target, info.pid) {
            Ok(true) => Ok(Some(Moved {
                to: target,
                with_children: false,
            })),
            // Exited between the read and the move.
            Ok(false) => Ok(None),
            Err(source) => Err(move_error(&target, source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        cgroupfs::{self as fake, limited as add_files},
        plan,
    };

    fn tree() -> (tempfile::TempDir, CgroupfsDriver) {
        let tmp = tempfile::tempdir().unwrap();
        fake::cgroup(tmp.path(), "cpu memory pids");
        let driver = CgroupfsDriver::new(CgroupFs::new(tmp.path()));
        (tmp, driver)
    }

    /// The plan written before: completely (only the difference is written) or not.
    fn before(p: &CgroupPlan, complete: bool) -> Before<'_> {
        if complete {
            Before::Complete(p)
        } else {
            Before::Partial(p)
        }
    }

    #[test]
    fn applies_group_quotas_and_resets_removed_fields() {
        for complete in [false, true] {
            let (tmp, driver) = tree();
            let p = plan("[[quota]]\ntarget = \"batch\"\ncpu = \"50%\"\npids = 10\n");
            // What the kernel would have made when the agent created the directories.
            add_files(&tmp.path().join("rlagent.slice"));
            add_files(&tmp.path().join("rlagent.slice/batch"));
            let report = driver.apply(&p, Before::Nothing).unwrap();
            assert!(
                report.skipped.is_empty() && report.unavailable.is_empty(),
                "{report:?}"
            );
            let read = |f: &str| {
                std::fs::read_to_string(tmp.path().join("rlagent.slice/batch").join(f)).unwrap()
            };
            assert_eq!(read("cpu.max"), "50000 100000");
            assert_eq!(read("pids.max"), "10");
            assert_eq!(read("memory.max"), "max");

            driver
                .apply(&plan("[[group]]\nname = \"batch\"\n"), before(&p, complete))
                .unwrap();
            assert_eq!(read("cpu.max"), "max 100000", "a removed quota is reset");
            assert_eq!(read("pids.max"), "max");
        }
    }

    #[test]
    fn after_a_complete_write_only_the_cgroups_whose_quota_changed_are_written() {
        let (tmp, driver) = tree();
        let text = |a: u32| {
            format!(
                "[[quota]]\ntarget = \"a\"\npids = {a}\n[[quota]]\ntarget = \"b\"\npids = 20\n[[quota]]\ntarget = \"gone\"\npids = 30\n"
            )
        };
        let p = plan(&text(10));
        for dir in ["", "/a", "/b", "/gone"] {
            add_files(&tmp.path().join(format!("rlagent.slice{dir}")));
        }
        driver.apply(&p, Before::Nothing).unwrap();
        let pids = |g: &str| {
            std::fs::read_to_string(tmp.path().join("rlagent.slice").join(g).join("pids.max"))
                .unwrap()
        };
        assert_eq!(
            (pids("a"), pids("b"), pids("gone")),
            ("10".into(), "20".into(), "30".into())
        );
        // Written by someone else since: an unchanged cgroup is not written again.
        std::fs::write(tmp.path().join("rlagent.slice/b/pids.max"), "untouched").unwrap();
        let next = plan(&text(11).replace("[[quota]]\ntarget = \"gone\"\npids = 30\n", ""));
        let report = driver.apply(&next, Before::Complete(&p)).unwrap();
        assert_eq!(pids("a"), "11");
        assert_eq!(pids("b"), "untouched", "b's quota did not change");
        assert_eq!(pids("gone"), "max", "a removed group's limits are lifted");
        assert_eq!(
            report.rewritten,
            Some(BTreeSet::from([
                PathBuf::from("rlagent.slice/a"),
                PathBuf::from("rlagent.slice/gone")
            ]))
        );
        // After a write that did not complete, everything is written again.
        let report = driver.apply(&next, Before::Partial(&p)).unwrap();
        assert_eq!(pids("b"), "20");
        assert_eq!(report.rewritten, None);
    }

    #[test]
    fn unavailable_controllers_are_reported_and_limits_skipped_not_dropped_silently() {
        let tmp = tempfile::tempdir().unwrap();
        fake::cgroup(tmp.path(), "");
        fake::cgroup(&tmp.path().join("rlagent.slice"), "");
        fake::cgroup(&tmp.path().join("rlagent.slice/batch"), "");
        let driver = CgroupfsDriver::new(CgroupFs::new(tmp.path()));
        let report = driver
            .apply(
                &plan("[[quota]]\ntarget = \"batch\"\nmemory = \"1G\"\n"),
                Before::Nothing,
            )
            .unwrap();
        assert_eq!(report.unavailable.len(), 3, "{report:?}");
        assert!(report.unavailable[0].contains("not available"));
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].field, Field::Memory);
        assert!(
            report.skipped[0].to_string().contains("memory.max"),
            "{report:?}"
        );
        assert_eq!(report.subtree_missing, BTreeSet::from(Controller::ALL));
    }

    #[test]
    fn a_missing_cgroup_target_refuses_the_plan_before_writing() {
        let (tmp, driver) = tree();
        let p = plan("[[quota]]\ntarget = \"batch\"\ncpu = \"5%\"\n[[quota]]\ntarget = \"cgroup:gone.slice\"\ncpu = \"5%\"\n");
        let err = driver.apply(&p, Before::Nothing).unwrap_err().to_string();
        assert!(
            err.contains("cgroup:gone.slice") && err.contains("does not exist"),
            "{err}"
        );
        assert!(
            !tmp.path().join("rlagent.slice").exists(),
            "nothing was created"
        );
    }

    #[test]
    fn user_cgroups_get_the_default_and_follow_its_changes() {
        for complete in [false, true] {
            let (tmp, driver) = tree();
            let p = plan("[[quota]]\ntarget = \"user:*\"\npids = 100\n");
            add_files(&tmp.path().join("rlagent.slice"));
            add_files(&tmp.path().join("rlagent.slice/user-2000"));
            add_files(&tmp.path().join("rlagent.slice/user-2001"));
            driver.apply(&p, Before::Nothing).unwrap();
            let pids_max = |uid: u32| {
                std::fs::read_to_string(
                    tmp.path()
                        .join(format!("rlagent.slice/user-{uid}/pids.max")),
                )
                .unwrap()
            };
            assert_eq!(pids_max(2000), "100");
            let own = plan("[[quota]]\ntarget = \"user:*\"\npids = 100\n[[quota]]\ntarget = \"user:2001\"\npids = 7\n");
            driver.apply(&own, before(&p, complete)).unwrap();
            assert_eq!((pids_max(2000), pids_max(2001)), ("100".into(), "7".into()));
            let lower = plan("[[quota]]\ntarget = \"user:*\"\npids = 50\n");
            driver.apply(&lower, before(&own, complete)).unwrap();
            assert_eq!((pids_max(2000), pids_max(2001)), ("50".into(), "50".into()));
            driver.apply(&plan(""), before(&lower, complete)).unwrap();
            assert_eq!(pids_max(2000), "max");
        }
    }

    #[test]
    fn a_new_uid_min_or_a_plan_before_that_wanted_no_cgroups_writes_every_cgroup() {
        let (tmp, driver) = tree();
        add_files(&tmp.path().join("rlagent.slice"));
        add_files(&tmp.path().join("rlagent.slice/user-1500"));
        let pids = || {
            std::fs::read_to_string(tmp.path().join("rlagent.slice/user-1500/pids.max")).unwrap()
        };
        let default = "[[quota]]\ntarget = \"user:*\"\npids = 100\n";
        let p = plan(default);
        driver.apply(&p, Before::Nothing).unwrap();
        assert_eq!(pids(), "100");
        // uid 1500 is below the new uid_min: its cgroup no longer gets the default.
        let raised = plan(&format!("[bpf]\nuid_min = 2000\n{default}"));
        let report = driver.apply(&raised, Before::Complete(&p)).unwrap();
        assert_eq!(pids(), "max");
        assert_eq!(report.rewritten, None, "every cgroup written");
        // Left behind by an earlier run while the plan wanted no cgroups at all.
        std::fs::write(tmp.path().join("rlagent.slice/user-1500/pids.max"), "7").unwrap();
        let none = plan("");
        let batch = plan("[[group]]\nname = \"batch\"\n");
        add_files(&tmp.path().join("rlagent.slice/batch"));
        let report = driver.apply(&batch, Before::Complete(&none)).unwrap();
        assert_eq!(pids(), "max", "the leftover is lifted");
        assert_eq!(report.rewritten, None);
    }

    #[test]
    fn a_cgroup_target_removed_from_the_plan_is_reset_to_max() {
        for complete in [false, true] {
            let (tmp, driver) = tree();
            add_files(&tmp.path().join("rlagent.slice"));
            add_files(&tmp.path().join("system.slice/db.service"));
            let with = plan("[[quota]]\ntarget = \"cgroup:system.slice/db.service\"\nmemory = \"1G\"\ncpu = \"20%\"\n");
            driver.apply(&with, Before::Nothing).unwrap();
            let read = |f: &str| {
                std::fs::read_to_string(tmp.path().join("system.slice/db.service").join(f)).unwrap()
            };
            assert_eq!(read("memory.max"), (1u64 << 30).to_string());
            assert_eq!(read("cpu.max"), "20000 100000");
            driver
                .apply(
                    &plan("[[group]]\nname = \"batch\"\n"),
                    before(&with, complete),
                )
                .unwrap();
            assert_eq!(
                read("memory.max"),
                "max",
                "the removed target's limit is lifted"
            );
            assert_eq!(read("cpu.max"), "max 100000");
        }
    }
}
