//! Reads a plan's cgroups back: the same cgroup2 files under either driver.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use super::{cpu, memory, pids, psi, read_optional, CgroupError, CgroupFs};
use crate::{
    desired::cgroups::CgroupPlan,
    model::{
        adapt::{UserSample, UserSignal},
        layout::{Driver, Layout},
        usage::{CgroupStats, Detail},
    },
};

/// Stats of every cgroup `plan` manages that exists, labelled with its target: groups,
/// the user cgroups present under the subtree, `cgroup:<path>` targets.
pub fn plan_stats(
    fs: &CgroupFs,
    plan: &CgroupPlan,
    detail: Detail,
) -> Result<Vec<(String, CgroupStats)>, CgroupError> {
    let mut out = Vec::new();
    let mut add = |target: String, relative: &Path| -> Result<(), CgroupError> {
        if fs.path(relative).join("cgroup.procs").exists() {
            out.push((target, cgroup_stats(fs, relative, detail)?));
        }
        Ok(())
    };
    for name in plan.groups.keys() {
        add(format!("group:{name}"), &plan.group_cgroup(name))?;
    }
    let mut uids = fs.user_cgroups(&plan.layout);
    // Under systemd, user.slice holds every logged-in user: show those the plan limits.
    uids.retain(|uid| plan.layout.driver == Driver::Cgroupfs || plan.user_quota(*uid).is_some());
    for uid in uids {
        add(format!("user:{uid}"), &plan.user_cgroup(uid))?;
    }
    for path in plan.cgroups.keys() {
        add(format!("cgroup:{}", path.display()), path)?;
    }
    Ok(out)
}

/// Each user's usage for the penalty box, from the users' cgroups under `layout` (every
/// `user-<uid>.slice` under systemd, the agent's `user-<uid>` cgroups under cgroupfs):
/// only the files of the signals asked for, one small read each.
pub fn user_samples(
    fs: &CgroupFs,
    layout: &Layout,
    signals: &[UserSignal],
) -> BTreeMap<u32, UserSample> {
    let want = |s| signals.contains(&s);
    let number = |path: PathBuf| -> Option<u64> { read_optional(&path).ok()??.trim().parse().ok() };
    let mut out = BTreeMap::new();
    for uid in fs.user_cgroups(layout) {
        let dir = fs.path(&layout.user_cgroup(uid));
        let sample = UserSample {
            cpu_usec: want(UserSignal::Cpu)
                .then(|| cpu::stats(&dir).ok().map(|c| c.usage_usec))
                .flatten(),
            memory: want(UserSignal::Memory)
                .then(|| number(dir.join("memory.current")))
                .flatten(),
            pids: want(UserSignal::Pids)
                .then(|| number(dir.join("pids.current")))
                .flatten(),
            denied: None,
        };
        out.insert(uid, sample);
    }
    out
}

/// Stats of one cgroup (relative path); controllers that are not enabled are `None`.
pub fn cgroup_stats(
    fs: &CgroupFs,
    relative: &Path,
    detail: Detail,
) -> Result<CgroupStats, CgroupError> {
    let dir = fs.path(relative);
    let has = |file: &str| dir.join(file).exists();
    let all = detail == Detail::All;
    let pressure = |resource| {
        if all {
            psi::read(&dir, resource)
        } else {
            Ok(None)
        }
    };
    Ok(CgroupStats {
        cgroup: relative.to_path_buf(),
        procs: if all { fs.pids(relative)?.len() } else { 0 },
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
        cpu_pressure: pressure("cpu")?,
        memory_pressure: pressure("memory")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cgroupfs;

    #[test]
    fn an_alert_round_reads_the_limits_without_pressure_or_processes() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = CgroupFs::new(tmp.path());
        let dir = tmp.path().join("g");
        cgroupfs::cgroup(&dir, "cpu");
        std::fs::write(dir.join("cgroup.procs"), "10\n11\n").unwrap();
        std::fs::write(dir.join("cpu.max"), "50000 100000\n").unwrap();
        std::fs::write(
            dir.join("cpu.stat"),
            "usage_usec 7\nnr_periods 3\nnr_throttled 1\nthrottled_usec 2\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("cpu.pressure"),
            "some avg10=1.00 avg60=0.50 avg300=0.10 total=1234\n",
        )
        .unwrap();
        let all = cgroup_stats(&fs, Path::new("g"), Detail::All).unwrap();
        assert_eq!(all.procs, 2);
        assert_eq!(all.cpu_pressure.map(|p| p.some_total_usec), Some(1234));
        let limits = cgroup_stats(&fs, Path::new("g"), Detail::Limits).unwrap();
        assert_eq!((limits.procs, limits.cpu_pressure), (0, None));
        for s in [&all, &limits] {
            assert_eq!(s.cpu.map(|c| c.nr_throttled), Some(1));
            assert_eq!(s.cpu_max, Some((50_000, 100_000)));
        }
    }
}
