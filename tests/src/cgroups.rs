//! Test cgroups: children of the cgroup2 mount (never the root), removed on drop.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

/// Waits until `pid` is in cgroup `want` (relative to the mount), up to 5 s; how long it
/// took.
pub fn wait_placed(pid: u32, want: &str) -> Duration {
    let start = Instant::now();
    while cgroup_of(pid) != want {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "pid {pid} not placed in {want}: it is in {}",
            cgroup_of(pid)
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    start.elapsed()
}

/// The cgroup v2 path of `pid` relative to the mount (`""` for the root, or when it exited).
pub fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::/"))
        .unwrap_or("")
        .to_string()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name no other test of this run uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A child cgroup of the cgroup2 mount, removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    /// Relative to the cgroup2 mount, as the config's `attach_cgroup` wants it.
    pub relative: String,
}

impl TestCgroup {
    pub fn new() -> Self {
        let mount = rlagent::kernel::cgroup::mount::find().expect("cgroup2 mount");
        let relative = unique("rlagent-test");
        let path = mount.join(&relative);
        assert_ne!(path, mount, "never the root cgroup");
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path, relative }
    }

    /// A sibling cgroup without programs (for A/B runs), removed on drop.
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        p
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// Removes a cgroup and its descendants, deepest first. Processes in them were started by
/// the test and are gone by now, but rmdir can briefly see them (EBUSY) while they exit.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
