//! Who may do what on the control socket, from the peer's credentials (SO_PEERCRED).
//! Writes need UID 0 or membership in the admin group (default `rlagent`); everyone else
//! may read only their own UID's stats.

use std::{ffi::CString, mem::MaybeUninit, ptr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Admin,
    /// May read only the stats of this UID.
    Reader {
        uid: u32,
    },
}

/// The GID of group `name`, `None` if there is no such group.
pub fn group_gid(name: &str) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut grp = MaybeUninit::<libc::group>::uninit();
    let mut result: *mut libc::group = ptr::null_mut();
    // SAFETY: valid pointers for the call; `buf` outlives it.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            grp.as_mut_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    // SAFETY: on success with a non-null result, `grp` was filled.
    (rc == 0 && !result.is_null()).then(|| unsafe { grp.assume_init() }.gr_gid)
}

/// The peer process's groups (effective GID and supplementary groups) from /proc, as the
/// kernel saw them when it connected.
fn process_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    let mut groups = Vec::new();
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("Groups:") {
            groups.extend(
                rest.split_whitespace()
                    .filter_map(|g| g.parse::<u32>().ok()),
            );
        } else if let Some(rest) = line.strip_prefix("Gid:") {
            // real, effective, saved, fs: the effective one counts.
            groups.extend(
                rest.split_whitespace()
                    .nth(1)
                    .and_then(|g| g.parse::<u32>().ok()),
            );
        }
    }
    groups
}

pub fn access(uid: u32, gid: u32, pid: Option<i32>, admin_gid: Option<u32>) -> Access {
    if uid == 0 {
        return Access::Admin;
    }
    if let Some(admin) = admin_gid {
        if gid == admin || pid.is_some_and(|p| process_groups(p).contains(&admin)) {
            return Access::Admin;
        }
    }
    Access::Reader { uid }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_admin_group_members_write_others_read_their_own() {
        assert_eq!(access(0, 0, None, None), Access::Admin);
        assert_eq!(
            access(1000, 1000, None, Some(990)),
            Access::Reader { uid: 1000 }
        );
        assert_eq!(access(1000, 990, None, Some(990)), Access::Admin);
        // This process's own supplementary groups are read from /proc.
        let me = std::process::id() as i32;
        let groups = process_groups(me);
        assert!(!groups.is_empty());
        assert_eq!(access(1000, 1000, Some(me), Some(groups[0])), Access::Admin);
        assert_eq!(group_gid("root"), Some(0));
        assert_eq!(group_gid("no-such-group-rlagent"), None);
    }
}
