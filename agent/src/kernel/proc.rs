//! Processes as /proc shows them: what placement decides on, and the process trees that
//! placement and the systemd driver move. Reading only; nothing here moves a process.

use std::path::{Path, PathBuf};

/// What placement needs to know about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    /// Real UID (the user who owns the process, also after setuid binaries).
    pub uid: u32,
    /// Real GID and supplementary groups.
    pub gids: Vec<u32>,
    pub comm: String,
    pub exe: Option<PathBuf>,
    /// Its cgroup v2 path relative to the mount (from `/proc/<pid>/cgroup`, `0::/path`).
    pub cgroup: PathBuf,
    pub kernel_thread: bool,
}

const PF_KTHREAD: u32 = 0x0020_0000;

/// How many processes of one tree are followed at most, so a fork bomb cannot keep a
/// walk of its tree going.
pub const MAX_FOLLOWED: usize = 4096;

/// Reads a process from /proc; `None` if it vanished or is unreadable (a race with exit).
pub fn read_proc(pid: u32) -> Option<ProcInfo> {
    let process = procfs::process::Process::new(pid as i32).ok()?;
    let stat = process.stat().ok()?;
    let status = process.status().ok()?;
    let cgroup = process
        .cgroups()
        .ok()?
        .into_iter()
        .find(|c| c.hierarchy == 0)
        .map(|c| PathBuf::from(c.pathname.trim_start_matches('/')))?;
    let mut gids = vec![status.rgid];
    gids.extend(status.groups.iter().copied());
    Some(ProcInfo {
        pid,
        uid: status.ruid,
        gids,
        comm: stat.comm,
        exe: process.exe().ok(),
        cgroup,
        kernel_thread: stat.flags & PF_KTHREAD != 0 || pid == 2 || stat.ppid == 2,
    })
}

/// The children of every thread of `pid` (empty if it is gone).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = procfs::process::Process::new(pid as i32).and_then(|p| p.tasks()) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| task.children().ok())
        .flatten()
        .collect()
}

/// The descendants of `pid` that are still in `cgroup` (at most [`MAX_FOLLOWED`]).
pub fn descendants_in(pid: u32, cgroup: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut pending = vec![pid];
    while let Some(parent) = pending.pop() {
        for child in children(parent) {
            if out.len() == MAX_FOLLOWED {
                return out;
            }
            if read_proc(child).is_some_and(|c| c.cgroup == cgroup) {
                out.push(child);
                pending.push(child);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = read_proc(std::process::id()).unwrap();
        assert!(!me.kernel_thread);
        assert_eq!(me.uid, nix::unistd::getuid().as_raw());
        assert!(me.exe.is_some());
    }
}
