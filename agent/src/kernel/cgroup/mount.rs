//! Finding the cgroup2 mount and naming cgroups. Never hard-code /sys/fs/cgroup: hybrid
//! hosts mount cgroup2 at /sys/fs/cgroup/unified.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup2 filesystem is mounted (looked in {path}); rlagent needs cgroup v2")]
    NotMounted { path: PathBuf },
}

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The mount point of the (first) cgroup2 filesystem in this mount namespace.
pub fn find() -> Result<PathBuf, MountError> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|source| MountError::Read {
        path: MOUNTINFO.into(),
        source,
    })?;
    mount_in(&text).ok_or_else(|| MountError::NotMounted {
        path: MOUNTINFO.into(),
    })
}

/// The cgroup2 mount point named in mountinfo `text`.
pub fn mount_in(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fs_type = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fs_type == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (three octal digits).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match escaped {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        assert_eq!(
            mount_in(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "25 1 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(mount_in(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(mount_in("22 1 0:5 / /proc rw - proc proc rw\n"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        let line = "41 31 0:38 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(mount_in(line), Some(PathBuf::from("/mnt/my cg")));
    }
}
