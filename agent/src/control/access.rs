//! Who may do what on the control socket, from the peer's credentials as the kernel
//! recorded them at connect time: SO_PEERCRED (uid, gid, pid) and SO_PEERGROUPS
//! (supplementary groups). Nothing is read from /proc after the fact, so a PID reused by
//! another process cannot lend its groups.
//!
//! Roles (the README's "Security model"): root may do everything; operators (members of
//! `[control] group`, default `rlagent`) may change what concerns users and the agent's own
//! groups, but not the system; everyone else may read only what concerns their own UID.

use std::{
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::{
    config::Config,
    model::target::{Target, UserRef},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Root,
    /// A member of the control group.
    Operator,
    /// May read only what concerns this UID.
    Reader {
        uid: u32,
    },
}

impl Access {
    /// True for root and operators, who read everything.
    pub fn reads_all(self) -> bool {
        matches!(self, Self::Root | Self::Operator)
    }

    /// True when this caller may read what concerns `target`.
    pub fn sees(self, target: &Target) -> bool {
        match self {
            Self::Root | Self::Operator => true,
            Self::Reader { uid } => *target == Target::User(UserRef::Uid(uid)),
        }
    }

    /// True when this caller may read what is labelled `name` (`user:<uid>`, `group:...`).
    pub fn sees_name(self, name: &str) -> bool {
        match self {
            Self::Root | Self::Operator => true,
            Self::Reader { uid } => name == format!("user:{uid}"),
        }
    }

    /// Whether this caller may change quotas of `target`. Operators may change `user:`
    /// targets of UIDs from `uid_min` up (and `user:*`), the agent's groups, and
    /// `cgroup:<path>` targets at or below an entry of `[control] operator_cgroups`, but
    /// never a cgroup that contains a `protected` one (the attach cgroup, the agent's
    /// own, PID 1's) nor one inside the agent's subtree.
    pub fn may_change(
        self,
        target: &Target,
        config: &Config,
        protected: &[PathBuf],
    ) -> Result<(), String> {
        let denied = |why: String| Err(format!("permission denied: {why}"));
        match (self, target) {
            (Self::Root, _) => Ok(()),
            (Self::Reader { uid }, _) => denied(format!(
                "changing quotas needs root or the control group (you are uid {uid})"
            )),
            (Self::Operator, Target::User(UserRef::Uid(uid))) if *uid < config.bpf.uid_min => {
                denied(format!(
                    "operators may change user: targets only from uid_min ({}) up; {target} is a system user",
                    config.bpf.uid_min
                ))
            }
            (Self::Operator, Target::Cgroup(path)) => {
                if let Some(p) = protected.iter().find(|p| p.starts_with(path)) {
                    return denied(format!(
                        "{target} contains {}, which the agent needs (attach point, its own cgroup or PID 1's)",
                        show(p)
                    ));
                }
                if path.starts_with(config.layout().root) {
                    return denied(format!(
                        "{target} is inside the agent's subtree; change its group instead"
                    ));
                }
                if !config.operator_cgroups.iter().any(|a| path.starts_with(a)) {
                    return denied(format!(
                        "{target} is not in [control] operator_cgroups; ask root to add it"
                    ));
                }
                Ok(())
            }
            (Self::Operator, _) => Ok(()),
        }
    }
}

fn show(path: &Path) -> String {
    format!("/{}", path.display())
}

/// A connected peer's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    pub fn of(stream: &tokio::net::UnixStream) -> io::Result<Self> {
        let cred = stream.peer_cred()?;
        Ok(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups: peer_groups(stream)?,
        })
    }

    pub fn access(&self, control_gid: Option<u32>) -> Access {
        if self.uid == 0 {
            return Access::Root;
        }
        if let Some(gid) = control_gid {
            if self.gid == gid || self.groups.contains(&gid) {
                return Access::Operator;
            }
        }
        Access::Reader { uid: self.uid }
    }
}

/// SO_PEERGROUPS (Linux 4.13): the supplementary groups of the peer at connect time.
/// A raw getsockopt: nix has no wrapper for this variable-length option.
fn peer_groups(socket: &impl AsRawFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is valid for `len` bytes, and the kernel writes at most `len`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        // ERANGE: the kernel says how much room it needs (up to NGROUPS_MAX).
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65536 {
            groups.resize(count, 0);
            continue;
        }
        return Err(err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_operators_and_readers() {
        assert_eq!(peer(0, 0, &[]).access(None), Access::Root);
        assert_eq!(
            peer(1000, 1000, &[]).access(Some(990)),
            Access::Reader { uid: 1000 }
        );
        assert_eq!(peer(1000, 990, &[]).access(Some(990)), Access::Operator);
        assert_eq!(
            peer(1000, 1000, &[4, 990]).access(Some(990)),
            Access::Operator
        );
        assert_eq!(
            peer(1000, 1000, &[4]).access(None),
            Access::Reader { uid: 1000 }
        );
    }

    #[test]
    fn operators_change_users_groups_and_allowed_cgroups_only() {
        let config = crate::testing::config(
            "[bpf]\nattach_cgroup = \"ci/attach\"\n[control]\noperator_cgroups = [\"system.slice/web.service\", \"ci\"]\n",
        );
        let protected = vec![
            PathBuf::from("ci/attach"),
            PathBuf::from("system.slice/rlagent.service"),
            PathBuf::from("init.scope"),
        ];
        let may = |access: Access, target: &str| {
            access.may_change(&target.parse().unwrap(), &config, &protected)
        };
        let op = Access::Operator;
        for ok in [
            "user:1000",
            "user:*",
            "batch",
            "cgroup:system.slice/web.service",
            "cgroup:system.slice/web.service/worker",
            "cgroup:ci/jobs",
        ] {
            assert_eq!(may(op, ok), Ok(()), "{ok}");
        }
        for (no, why) in [
            ("user:0", "system user"),
            ("user:999", "system user"),
            ("cgroup:ci/attach", "which the agent needs"),
            ("cgroup:ci", "which the agent needs"),
            ("cgroup:system.slice", "which the agent needs"),
            ("cgroup:system.slice/db.service", "operator_cgroups"),
            ("cgroup:rlagent.slice/batch", "agent's subtree"),
        ] {
            let err = may(op, no).unwrap_err();
            assert!(
                err.contains(why) && err.starts_with("permission denied"),
                "{no}: {err}"
            );
        }
        assert_eq!(may(Access::Root, "cgroup:ci/attach"), Ok(()));
        assert!(may(Access::Reader { uid: 1000 }, "user:1000").is_err());
    }

    #[tokio::test]
    async fn the_kernel_reports_this_process_s_own_groups() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let me = Peer::of(&a).unwrap();
        assert_eq!(me.uid, nix::unistd::getuid().as_raw());
        let mut expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = me.groups.clone();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected);
    }
}
