//! The cgroupfs driver: applies a [`CgroupPlan`] to a cgroup2 hierarchy by writing its
//! files (the agent owns its subtree), and reads the stats back.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use super::{
    cpu,
    driver::{interface_file, ApplyReport, Skipped},
    memory, pids, psi, CgroupError, CgroupFs, Controller,
};
use crate::{
    desired::cgroups::{CgroupPlan, CgroupQuota},
    model::{layout::Driver, quota::Field, usage::CgroupStats},
};

pub struct CgroupfsDriver {
    fs: CgroupFs,
}

impl CgroupfsDriver {
    pub fn new(fs: CgroupFs) -> Self {
        Self { fs }
    }

    pub fn fs(&self) -> &CgroupFs {
        &self.fs
    }

    /// The `cgroup:<path>` targets of `plan` that do not exist.
    pub fn missing(&self, plan: &CgroupPlan) -> Vec<PathBuf> {
        plan.cgroups
            .keys()
            .filter(|path| !self.fs.path(path).join("cgroup.procs").exists())
            .cloned()
            .collect()
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

    /// Creates the subtree and the cgroups of `plan`, and writes every quota. Cgroups under
    /// the subtree that the plan no longer limits are reset to `max`, and so are the
    /// `cgroup:<path>` targets of `previous` (the plan applied before) that `plan` drops.
    pub fn apply(
        &self,
        plan: &CgroupPlan,
        previous: Option<&CgroupPlan>,
    ) -> Result<ApplyReport, CgroupError> {
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

    /// Stats of every cgroup `plan` manages that exists, labelled with its target: groups,
    /// the user cgroups present under the subtree, `cgroup:<path>` targets.
    pub fn plan_stats(&self, plan: &CgroupPlan) -> Result<Vec<(String, CgroupStats)>, CgroupError> {
        let mut out = Vec::new();
        let mut add = |target: String, relative: &Path| -> Result<(), CgroupError> {
            if self.fs.path(relative).join("cgroup.procs").exists() {
                out.push((target, self.stats(relative)?));
            }
            Ok(())
        };
        for name in plan.groups.keys() {
            add(format!("group:{name}"), &plan.group_cgroup(name))?;
        }
        let mut uids = self.fs.user_cgroups(&plan.layout);
        // Under systemd, user.slice holds every logged-in user: show those the plan limits.
        uids.retain(|uid| {
            plan.layout.driver == Driver::Cgroupfs || plan.user_quota(*uid).is_some()
        });
        for uid in uids {
            add(format!("user:{uid}"), &plan.user_cgroup(uid))?;
        }
        for path in plan.cgroups.keys() {
            add(format!("cgroup:{}", path.display()), path)?;
        }
        Ok(out)
    }

    /// Stats of one cgroup (relative path); controllers that are not enabled are `None`.
    pub fn stats(&self, relative: &Path) -> Result<CgroupStats, CgroupError> {
        let dir = self.fs.path(relative);
        let has = |file: &str| dir.join(file).exists();
        Ok(CgroupStats {
            cgroup: relative.to_path_buf(),
            procs: self.fs.pids(relative)?.len(),
            cpu: if has("cpu.stat") {
                Some(cpu::stats(&dir)?)
            } else {
                None
            },
            cpu_max: if has("cpu.max") {
                cpu::current(&dir)?.map(|c| (c.quota_us, c.period_us))
            } else {
                None
            },
            memory: if has("memory.current") {
                Some(memory::stats(&dir)?)
            } else {
                None
            },
            pids: if has("pids.current") {
                Some(pids::stats(&dir)?)
            } else {
                None
            },
            cpu_pressure: psi::read(&dir, "cpu")?,
            memory_pressure: psi::read(&dir, "memory")?,
        })
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
