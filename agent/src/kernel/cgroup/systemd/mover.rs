//! The systemd driver's [`Mover`]: placement's group rules under systemd.

use std::{path::Path, sync::Arc};

use super::SystemdDriver;
use crate::{
    desired::cgroups::CgroupPlan,
    kernel::{
        cgroup::mover::{Decision, MoveError, Moved, Mover},
        proc::{descendants_in, ProcInfo},
    },
};

/// The systemd driver's mover. Users are never moved (their limits are properties of
/// their slice); group rules take processes only out of login session scopes (or from one
/// of the agent's groups to another), each process tree into a transient scope of its
/// own in the group's slice, so systemd knows it and stopping the slice stops it.
pub struct SystemdMover {
    pub driver: Arc<SystemdDriver>,
}

/// True for `user.slice/user-<uid>.slice/session-<id>.scope` and below.
pub fn in_session_scope(cgroup: &Path) -> bool {
    let parts: Vec<&str> = cgroup.iter().filter_map(|c| c.to_str()).collect();
    matches!(parts.as_slice(), ["user.slice", user, session, ..]
        if user.starts_with("user-") && user.ends_with(".slice")
            && session.starts_with("session-") && session.ends_with(".scope"))
}

impl Mover for SystemdMover {
    fn eligible(&self, plan: &CgroupPlan, cgroup: &Path) -> bool {
        in_session_scope(cgroup) || cgroup.starts_with(plan.root())
    }

    fn place(
        &self,
        plan: &CgroupPlan,
        info: &ProcInfo,
        decision: &Decision,
    ) -> Result<Option<Moved>, MoveError> {
        let Decision::Group(name) = decision else {
            return Ok(None);
        };
        let slice = plan.group_cgroup(name);
        if info.cgroup.starts_with(&slice) {
            return Ok(None);
        }
        let mut pids = vec![info.pid];
        pids.extend(descendants_in(info.pid, &info.cgroup));
        let to = self
            .driver
            .start_scope(plan, name, &pids)
            .map_err(|source| MoveError::Scope {
                group: name.clone(),
                source,
            })?;
        Ok(Some(Moved {
            to,
            with_children: true,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_session_scopes_are_eligible_under_systemd() {
        for (cgroup, eligible) in [
            ("user.slice/user-1001.slice/session-3.scope", true),
            ("user.slice/user-1001.slice/session-c2.scope/sub", true),
            (
                "user.slice/user-1001.slice/user@1001.service/app.slice/x.service",
                false,
            ),
            (
                "user.slice/user-1001.slice/user-runtime-dir@1001.service",
                false,
            ),
            ("system.slice/cron.service", false),
            ("init.scope", false),
            ("user.slice", false),
        ] {
            assert_eq!(in_session_scope(Path::new(cgroup)), eligible, "{cgroup}");
        }
    }
}
