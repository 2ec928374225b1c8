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
    desired::cgroups::{CgroupPlan, CgroupQuota},
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
    fn needs_apply(&self, plan: &CgroupPlan, previous: Option<&CgroupPlan>) -> bool {
        plan.wants_cgroups() || previous.is_some_and(CgroupPlan::wants_cgroups)
    }

    /// Creates the subtree and the cgroups of `plan`, and writes every quota. Cgroups under
    /// the subtree that the plan no longer limits are reset to `max`, and so are the
    /// `cgroup:<path>` targets of `previous` (the plan applied before) that `plan` drops.
    fn apply(
        &self,
        plan: &CgroupPlan,
        previous: Option<&CgroupPlan>,
    ) -> Result<ApplyReport, DriverError> {
        self.check(plan)?;
        let mut report = ApplyReport::default();
        let mut seen_unavailable = BTreeSet::new();
        let mut ensure = |relative: &Path, report: &mut ApplyReport| -> Result<(), CgroupError> {
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
        };
        ensure(plan.root(), &mut report)?;
        for (name, quota) in &plan.groups {
            let dir = plan.group_cgroup(name);
            ensure(&dir, &mut report)?;
            self.write_quota(&dir, quota, &mut report)?;
        }
        for (uid, quota) in &plan.users {
            let dir = plan.user_cgroup(*uid);
            ensure(&dir, &mut report)?;
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
        let dropped = previous
            .into_iter()
            .flat_map(|p| p.cgroups.keys())
            .filter(|path| !plan.cgroups.contains_key(*path));
        for path in dropped {
            // A cgroup that went away (its service stopped) has nothing left to reset.
            if self.fs.path(path).join("cgroup.procs").exists() {
                self.write_quota(path, &CgroupQuota::NONE, &mut report)?;
            }
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

    #[test]
    fn applies_group_quotas_and_resets_removed_fields() {
        let (tmp, driver) = tree();
        let p = plan("[[quota]]\ntarget = \"batch\"\ncpu = \"50%\"\npids = 10\n");
        // What the kernel would have made when the agent created the directories.
        add_files(&tmp.path().join("rlagent.slice"));
        add_files(&tmp.path().join("rlagent.slice/batch"));
        let report = driver.apply(&p, None).unwrap();
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
            .apply(&plan("[[group]]\nname = \"batch\"\n"), Some(&p))
            .unwrap();
        assert_eq!(read("cpu.max"), "max 100000", "a removed quota is reset");
        assert_eq!(read("pids.max"), "max");
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
                None,
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
        let err = driver.apply(&p, None).unwrap_err().to_string();
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
        let (tmp, driver) = tree();
        let p = plan("[[quota]]\ntarget = \"user:*\"\npids = 100\n");
        add_files(&tmp.path().join("rlagent.slice"));
        add_files(&tmp.path().join("rlagent.slice/user-2000"));
        driver.apply(&p, None).unwrap();
        let pids_max = || {
            std::fs::read_to_string(tmp.path().join("rlagent.slice/user-2000/pids.max")).unwrap()
        };
        assert_eq!(pids_max(), "100");
        driver
            .apply(&plan("[[quota]]\ntarget = \"user:*\"\npids = 50\n"), None)
            .unwrap();
        assert_eq!(pids_max(), "50");
        driver.apply(&plan(""), None).unwrap();
        assert_eq!(pids_max(), "max");
    }

    #[test]
    fn a_cgroup_target_removed_from_the_plan_is_reset_to_max() {
        let (tmp, driver) = tree();
        add_files(&tmp.path().join("rlagent.slice"));
        add_files(&tmp.path().join("system.slice/db.service"));
        let with = plan("[[quota]]\ntarget = \"cgroup:system.slice/db.service\"\nmemory = \"1G\"\ncpu = \"20%\"\n");
        driver.apply(&with, None).unwrap();
        let read = |f: &str| {
            std::fs::read_to_string(tmp.path().join("system.slice/db.service").join(f)).unwrap()
        };
        assert_eq!(read("memory.max"), (1u64 << 30).to_string());
        assert_eq!(read("cpu.max"), "20000 100000");
        driver
            .apply(&plan("[[group]]\nname = \"batch\"\n"), Some(&with))
            .unwrap();
        assert_eq!(
            read("memory.max"),
            "max",
            "the removed target's limit is lifted"
        );
        assert_eq!(read("cpu.max"), "max 100000");
    }
}
