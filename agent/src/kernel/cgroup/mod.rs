//! cgroup v2: the interface of a cgroup driver ([`driver::CgroupDriver`], and
//! [`mover::Mover`] for placement), its two implementations, [`cgroupfs`] (the agent owns
//! a subtree and writes its files) and [`systemd`] (unit properties and transient scopes
//! over D-Bus), and what both build on: the hierarchy ([`CgroupFs`]: the agent's subtree,
//! controller enablement), the mount, one module per controller (cpu, memory, pids, psi)
//! that applies a quota and reads stats, and [`stats`], which reads a plan's cgroups back.
//!
//! Written directly on the filesystem rather than with cgroups-rs: cgroups-rs hard-codes
//! /sys/fs/cgroup (so neither hybrid hosts, whose cgroup2 is /sys/fs/cgroup/unified, nor
//! tempdir fixtures work), discards subtree_control errors, and does not read
//! memory.events or v2 throttling (measured against cgroups-rs 0.5.1). Everything here takes
//! the mount as a root path, so unit tests point it at a fake tree in a tempdir.

pub mod cgroupfs;
pub mod cpu;
pub mod driver;
pub mod memory;
pub mod mount;
pub mod mover;
pub mod pids;
pub mod psi;
pub mod stats;
pub mod systemd;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ffi::OsString,
    fmt, io,
    path::{Path, PathBuf},
};

use crate::model::layout::Layout;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("creating cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "controller {controller} is not available in {path} (available: {available}); \
         on a hybrid host it is bound to cgroup v1 and rlagent cannot use it"
    )]
    Unavailable {
        controller: Controller,
        path: PathBuf,
        available: String,
    },
    #[error("target {target}: cgroup {path} does not exist")]
    NoSuchCgroup { target: String, path: PathBuf },
    #[error("{path}: cannot parse {line:?}")]
    Parse { path: PathBuf, line: String },
}

/// The controllers rlagent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    Cpu,
    Memory,
    Pids,
}

impl Controller {
    pub const ALL: [Self; 3] = [Self::Cpu, Self::Memory, Self::Pids];

    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::Pids => "pids",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a file that may legitimately be absent (memory.peak before 5.19, PSI disabled).
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, CgroupError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::EOPNOTSUPP)
                || e.raw_os_error() == Some(libc::ENODEV) =>
        {
            Ok(None)
        }
        Err(source) => Err(CgroupError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// `key value` lines (cpu.stat, memory.events, pids.events) as (key, u64) pairs.
pub(crate) fn flat_keyed(path: &Path, text: &str) -> Result<Vec<(String, u64)>, CgroupError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut words = line.split_whitespace();
            match (
                words.next(),
                words.next().and_then(|v| v.parse().ok()),
                words.next(),
            ) {
                (Some(key), Some(value), None) => Ok((key.to_string(), value)),
                _ => Err(CgroupError::Parse {
                    path: path.to_path_buf(),
                    line: line.to_string(),
                }),
            }
        })
        .collect()
}

/// A single number or `max` (memory.max, pids.max); `None` for `max`.
pub(crate) fn parse_max(path: &Path, text: &str) -> Result<Option<u64>, CgroupError> {
    let t = text.trim();
    if t == "max" {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        line: t.to_string(),
    })
}

/// A cgroup2 hierarchy rooted at `mount` (the real mount, or a fake tree in tests).
#[derive(Debug, Clone)]
pub struct CgroupFs {
    mount: PathBuf,
}

impl CgroupFs {
    pub fn new(mount: impl Into<PathBuf>) -> Self {
        Self {
            mount: mount.into(),
        }
    }

    /// Absolute path of the cgroup at `relative` (relative to the mount).
    pub fn path(&self, relative: &Path) -> PathBuf {
        self.mount.join(relative)
    }

    /// The id of the cgroup at `relative` (a cgroup2 directory's inode number is its id),
    /// `None` when it does not exist.
    pub fn id(&self, relative: &Path) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path(relative)).ok().map(|m| m.ino())
    }

    /// The ids of those of `cgroups` (relative to the mount) that exist as directories,
    /// read from their parents' directory entries (a directory entry carries the inode
    /// number, which is the id): one read per parent instead of one stat per cgroup. With 1,000
    /// groups in one parent, the agent's check every 2 s for groups made again took
    /// 1,000 `statx` calls, the most of what the idle agent did.
    ///
    /// A hash map: in the agent's check every 2 s, path comparisons in an ordered map were
    /// 15% of an idle agent's CPU samples with 1,000 groups (`perf`).
    pub fn ids<'a>(&self, cgroups: impl IntoIterator<Item = &'a Path>) -> HashMap<&'a Path, u64> {
        use std::os::unix::fs::DirEntryExt;
        let mut ids = HashMap::new();
        let mut by_parent: BTreeMap<&Path, Vec<&Path>> = BTreeMap::new();
        for cgroup in cgroups {
            match (cgroup.parent(), cgroup.file_name()) {
                (Some(parent), Some(_)) => by_parent.entry(parent).or_default().push(cgroup),
                // No parent to read (the mount itself, or a path ending in `..`): a stat.
                _ => ids.extend(self.id(cgroup).map(|id| (cgroup, id))),
            }
        }
        for (parent, children) in by_parent {
            let Ok(entries) = std::fs::read_dir(self.path(parent)) else {
                continue;
            };
            let found: HashMap<OsString, u64> = entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| (e.file_name(), e.ino()))
                .collect();
            for cgroup in children {
                if let Some(id) = cgroup.file_name().and_then(|name| found.get(name)) {
                    ids.insert(cgroup, *id);
                }
            }
        }
        ids
    }

    /// The UIDs that have a user cgroup where `layout` puts them (`user-<uid>` under the
    /// agent's subtree, or logind's `user-<uid>.slice`), in order.
    pub fn user_cgroups(&self, layout: &Layout) -> Vec<u32> {
        let mut uids: Vec<u32> = std::fs::read_dir(self.path(&layout.users_dir()))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| layout.uid_of(e.file_name().to_str()?))
                    .collect()
            })
            .unwrap_or_default();
        uids.sort_unstable();
        uids
    }

    /// Controllers listed in `cgroup.controllers` of `relative`.
    pub fn controllers(&self, relative: &Path) -> Result<BTreeSet<String>, CgroupError> {
        let path = self.path(relative).join("cgroup.controllers");
        Ok(read(&path)?
            .split_whitespace()
            .map(str::to_string)
            .collect())
    }

    /// Creates `relative` and its missing ancestors, enabling `wanted` controllers in
    /// `cgroup.subtree_control` on the way down. Returns the controllers that are not
    /// available there (each is an [`CgroupError::Unavailable`] for the caller to report);
    /// the cgroup is created either way.
    pub fn ensure(
        &self,
        relative: &Path,
        wanted: &[Controller],
    ) -> Result<Vec<CgroupError>, CgroupError> {
        let mut unavailable = Vec::new();
        let mut missing: BTreeSet<Controller> = BTreeSet::new();
        let mut current = PathBuf::new();
        for part in relative.components() {
            let parent = current.clone();
            current.push(part);
            let available = self.controllers(&parent)?;
            let enabled: BTreeSet<String> =
                read(&self.path(&parent).join("cgroup.subtree_control"))?
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
            for controller in wanted {
                if missing.contains(controller) || enabled.contains(controller.name()) {
                    continue;
                }
                if !available.contains(controller.name()) {
                    missing.insert(*controller);
                    unavailable.push(CgroupError::Unavailable {
                        controller: *controller,
                        path: self.path(&parent),
                        available: available.iter().cloned().collect::<Vec<_>>().join(" "),
                    });
                    continue;
                }
                write(
                    &self.path(&parent).join("cgroup.subtree_control"),
                    &format!("+{}", controller.name()),
                )?;
            }
            let dir = self.path(&current);
            if !dir.exists() {
                std::fs::create_dir(&dir).map_err(|source| CgroupError::Create {
                    path: dir.clone(),
                    source,
                })?;
            }
        }
        Ok(unavailable)
    }

    /// Moves one process (all its threads) into `relative`. Returns false when the process
    /// has exited (ESRCH): there is nothing left to move, which every caller accepts.
    pub fn move_pid(&self, relative: &Path, pid: u32) -> Result<bool, CgroupError> {
        match write(&self.path(relative).join("cgroup.procs"), &pid.to_string()) {
            Ok(()) => Ok(true),
            Err(CgroupError::Write { source, .. })
                if source.raw_os_error() == Some(libc::ESRCH) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// PIDs in `relative` (not its children).
    pub fn pids(&self, relative: &Path) -> Result<Vec<u32>, CgroupError> {
        let path = self.path(relative).join("cgroup.procs");
        read(&path)?
            .lines()
            .map(|l| {
                l.trim().parse().map_err(|_| CgroupError::Parse {
                    path: path.clone(),
                    line: l.to_string(),
                })
            })
            .collect()
    }

    /// Moves every process below `relative` to the mount's root cgroup and removes the
    /// cgroups, deepest first. Returns how many processes were moved.
    pub fn remove_tree(&self, relative: &Path) -> Result<usize, CgroupError> {
        let dir = self.path(relative);
        if !dir.exists() {
            return Ok(0);
        }
        let mut moved = 0;
        let children = std::fs::read_dir(&dir).map_err(|source| CgroupError::Read {
            path: dir.clone(),
            source,
        })?;
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                moved += self.remove_tree(&relative.join(child.file_name()))?;
            }
        }
        for pid in self.pids(relative)? {
            if self.move_pid(Path::new(""), pid)? {
                moved += 1;
            }
        }
        self.remove(relative)?;
        Ok(moved)
    }

    /// Removes an empty cgroup, retrying while the kernel still sees exiting tasks.
    pub fn remove(&self, relative: &Path) -> Result<(), CgroupError> {
        let dir = self.path(relative);
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(source) => return Err(CgroupError::Remove { path: dir, source }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cgroupfs as fake;

    #[test]
    fn ids_read_from_the_parents_entries_are_the_ids_a_stat_gives() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = CgroupFs::new(tmp.path());
        for dir in ["rlagent.slice/a", "rlagent.slice/b", "other/c"] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        }
        // A file of the same name as a group is not its cgroup.
        std::fs::write(tmp.path().join("rlagent.slice/d"), "").unwrap();
        let wanted = [
            "rlagent.slice/a",
            "rlagent.slice/b",
            "other/c",
            "rlagent.slice/d",
            "gone/e",
            "",
        ]
        .map(Path::new);
        let ids = fs.ids(wanted);
        let expected: HashMap<&Path, u64> = wanted
            .into_iter()
            .filter(|p| p.as_os_str().is_empty() || tmp.path().join(p).is_dir())
            .map(|p| (p, fs.id(p).unwrap()))
            .collect();
        assert_eq!(ids, expected);
        assert_eq!(ids.len(), 4, "{ids:?}");
    }

    #[test]
    fn ensure_enables_controllers_on_the_way_down() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = CgroupFs::new(tmp.path());
        fake::cgroup(tmp.path(), "cpuset cpu io memory pids");
        fake::cgroup(&tmp.path().join("rlagent.slice"), "cpu memory pids");
        let missing = fs
            .ensure(Path::new("rlagent.slice/batch"), &Controller::ALL)
            .unwrap();
        assert!(missing.is_empty());
        assert!(tmp.path().join("rlagent.slice/batch").is_dir());
        // A fake file keeps the last write; the kernel would accumulate. Each controller
        // is written on its own so one refusal does not block the others.
        let root_ctl = std::fs::read_to_string(tmp.path().join("cgroup.subtree_control")).unwrap();
        assert_eq!(root_ctl, "+pids");
    }

    #[test]
    fn unavailable_controllers_are_reported_by_name_and_path() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = CgroupFs::new(tmp.path());
        fake::cgroup(tmp.path(), "cpuset io");
        let missing = fs
            .ensure(Path::new("rlagent.slice"), &Controller::ALL)
            .unwrap();
        let text: Vec<String> = missing.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 3);
        assert!(
            text[0].contains("controller cpu is not available"),
            "{}",
            text[0]
        );
        assert!(text[0].contains(&tmp.path().display().to_string()));
        assert!(text[0].contains("cgroup v1"));
        assert!(tmp.path().join("rlagent.slice").is_dir(), "created anyway");
    }

    #[test]
    fn errors_carry_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = CgroupFs::new(tmp.path().join("nope"));
        let err = fs.controllers(Path::new("x")).unwrap_err().to_string();
        assert!(err.contains("nope/x/cgroup.controllers"), "{err}");
        let err = fs.move_pid(Path::new("x"), 1).unwrap_err().to_string();
        assert!(
            err.contains("writing \"1\"") && err.contains("nope/x/cgroup.procs"),
            "{err}"
        );
    }

    #[test]
    fn parsers() {
        let p = Path::new("f");
        assert_eq!(
            flat_keyed(p, "usage_usec 10\nnr_periods 3\n").unwrap(),
            vec![
                ("usage_usec".to_string(), 10),
                ("nr_periods".to_string(), 3)
            ]
        );
        assert!(flat_keyed(p, "usage_usec ten\n")
            .unwrap_err()
            .to_string()
            .contains("usage_usec ten"));
        assert_eq!(parse_max(p, "max\n").unwrap(), None);
        assert_eq!(parse_max(p, "512\n").unwrap(), Some(512));
        assert!(parse_max(p, "x").is_err());
    }
}
