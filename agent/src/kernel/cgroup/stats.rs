//! Reads a plan's cgroups back: the same cgroup2 files under either driver.

use std::path::Path;

use super::{cpu, memory, pids, psi, CgroupError, CgroupFs};
use crate::{
    desired::cgroups::CgroupPlan,
    model::{layout::Driver, usage::CgroupStats},
};

/// Stats of every cgroup `plan` manages that exists, labelled with its target: groups,
/// the user cgroups present under the subtree, `cgroup:<path>` targets.
pub fn plan_stats(
    fs: &CgroupFs,
    plan: &CgroupPlan,
) -> Result<Vec<(String, CgroupStats)>, CgroupError> {
    let mut out = Vec::new();
    let mut add = |target: String, relative: &Path| -> Result<(), CgroupError> {
        if fs.path(relative).join("cgroup.procs").exists() {
            out.push((target, cgroup_stats(fs, relative)?));
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

/// Stats of one cgroup (relative path); controllers that are not enabled are `None`.
pub fn cgroup_stats(fs: &CgroupFs, relative: &Path) -> Result<CgroupStats, CgroupError> {
    let dir = fs.path(relative);
    let has = |file: &str| dir.join(file).exists();
    Ok(CgroupStats {
        cgroup: relative.to_path_buf(),
        procs: fs.pids(relative)?.len(),
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
