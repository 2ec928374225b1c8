//! Who may do what on the control socket, from the peer's credentials as the kernel
//! recorded them at connect time: SO_PEERCRED (uid, gid, pid) and SO_PEERGROUPS
//! (supplementary groups). Nothing is read from /proc after the fact, so a PID reused by
//! another process cannot lend its groups. Writes need UID 0 or membership in the admin
//! group (default `rlagent`); everyone else may read only their own UID's stats.

use std::{io, os::fd::AsRawFd};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Admin,
    /// May read only the stats of this UID.
    Reader {
        uid: u32,
    },
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

    pub fn access(&self, admin_gid: Option<u32>) -> Access {
        if self.uid == 0 {
            return Access::Admin;
        }
        if let Some(admin) = admin_gid {
            if self.gid == admin || self.groups.contains(&admin) {
                return Access::Admin;
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
    fn root_and_admin_group_members_write_others_read_their_own() {
        assert_eq!(peer(0, 0, &[]).access(None), Access::Admin);
        assert_eq!(
            peer(1000, 1000, &[]).access(Some(990)),
            Access::Reader { uid: 1000 }
        );
        assert_eq!(peer(1000, 990, &[]).access(Some(990)), Access::Admin);
        assert_eq!(peer(1000, 1000, &[4, 990]).access(Some(990)), Access::Admin);
        assert_eq!(
            peer(1000, 1000, &[4]).access(None),
            Access::Reader { uid: 1000 }
        );
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
