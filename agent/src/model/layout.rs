//! Which program owns the cgroup tree, and where each target's cgroup lies in it.
//!
//! On a systemd host systemd is the single writer of the cgroup tree: the agent's groups are
//! slices it owns (`rlagent-<group>.slice`, which systemd nests under `rlagent.slice`),
//! users are logind's `user-<uid>.slice`, and limits are unit properties. Elsewhere the
//! agent writes cgroupfs itself, under its own subtree (`cgroup_root`).

use std::path::{Path, PathBuf};

/// The `cgroup_driver` setting as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverSetting {
    /// systemd when PID 1 is systemd and cgroup2 is unified, cgroupfs otherwise (the way
    /// kubelet and containerd choose).
    Auto,
    Systemd,
    Cgroupfs,
}

/// The driver in use: decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

impl DriverSetting {
    /// The driver this setting means on a host where systemd can drive cgroups
    /// (`systemd_host`) or cannot.
    pub fn resolve(self, systemd_host: bool) -> Driver {
        match self {
            Self::Systemd => Driver::Systemd,
            Self::Cgroupfs => Driver::Cgroupfs,
            Self::Auto if systemd_host => Driver::Systemd,
            Self::Auto => Driver::Cgroupfs,
        }
    }
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Systemd => "systemd",
            Self::Cgroupfs => "cgroupfs",
        })
    }
}

/// The slice under which systemd nests the agent's group slices.
pub const SYSTEMD_ROOT_SLICE: &str = "rlagent.slice";

/// Escapes one component of a unit name the way `systemd-escape` does: letters, digits,
/// ':', '_' and (not leading) '.' stay; everything else becomes `\xNN`. A '-' must be
/// escaped because in a slice name it means nesting.
pub fn escape_unit_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, b) in text.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b':' || b == b'_' || (b == b'.' && i > 0);
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The slice unit of a named group.
pub fn group_slice(group: &str) -> String {
    format!("rlagent-{}.slice", escape_unit_component(group))
}

/// logind's slice of a user.
pub fn user_slice(uid: u32) -> String {
    format!("user-{uid}.slice")
}

/// Where one driver puts the agent's cgroups (paths relative to the cgroup2 mount).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub driver: Driver,
    /// The agent's subtree: `cgroup_root` (cgroupfs) or `rlagent.slice` (systemd).
    pub root: PathBuf,
}

impl Layout {
    pub fn new(driver: Driver, cgroup_root: &Path) -> Self {
        let root = match driver {
            Driver::Cgroupfs => cgroup_root.to_path_buf(),
            Driver::Systemd => PathBuf::from(SYSTEMD_ROOT_SLICE),
        };
        Self { driver, root }
    }

    pub fn group_cgroup(&self, name: &str) -> PathBuf {
        match self.driver {
            Driver::Cgroupfs => self.root.join(name),
            Driver::Systemd => self.root.join(group_slice(name)),
        }
    }

    pub fn user_cgroup(&self, uid: u32) -> PathBuf {
        self.users_dir().join(self.user_dir_name(uid))
    }

    /// The cgroup whose children are the users' cgroups.
    pub fn users_dir(&self) -> PathBuf {
        match self.driver {
            Driver::Cgroupfs => self.root.clone(),
            Driver::Systemd => PathBuf::from("user.slice"),
        }
    }

    fn user_dir_name(&self, uid: u32) -> String {
        match self.driver {
            Driver::Cgroupfs => format!("user-{uid}"),
            Driver::Systemd => user_slice(uid),
        }
    }

    /// The UID of a child of [`Self::users_dir`] by its name (`user-1000` or
    /// `user-1000.slice`).
    pub fn uid_of(&self, name: &str) -> Option<u32> {
        let rest = name.strip_prefix("user-")?;
        let number = match self.driver {
            Driver::Cgroupfs => rest,
            Driver::Systemd => rest.strip_suffix(".slice")?,
        };
        // Canonical digits only: "user-01" is not a user's cgroup.
        let uid: u32 = number.parse().ok()?;
        (uid.to_string() == number).then_some(uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_matches_systemd_escape() {
        // `systemd-escape 'my-group'` → my\x2dgroup; `systemd-escape a.b_c:d` → a.b_c:d
        assert_eq!(escape_unit_component("my-group"), "my\\x2dgroup");
        assert_eq!(escape_unit_component("a.b_c:d"), "a.b_c:d");
        assert_eq!(escape_unit_component(".x"), "\\x2ex");
        assert_eq!(group_slice("batch"), "rlagent-batch.slice");
        assert_eq!(group_slice("ci-jobs"), "rlagent-ci\\x2djobs.slice");
    }

    #[test]
    fn each_driver_has_its_paths() {
        let fs = Layout::new(Driver::Cgroupfs, Path::new("x/rlagent.slice"));
        assert_eq!(fs.group_cgroup("batch"), Path::new("x/rlagent.slice/batch"));
        assert_eq!(fs.user_cgroup(1001), Path::new("x/rlagent.slice/user-1001"));
        assert_eq!(fs.uid_of("user-1001"), Some(1001));
        assert_eq!(fs.uid_of("user-1001.slice"), None);

        let sd = Layout::new(Driver::Systemd, Path::new("ignored"));
        assert_eq!(
            sd.group_cgroup("ci-jobs"),
            Path::new("rlagent.slice/rlagent-ci\\x2djobs.slice")
        );
        assert_eq!(
            sd.user_cgroup(1001),
            Path::new("user.slice/user-1001.slice")
        );
        assert_eq!(sd.uid_of("user-1001.slice"), Some(1001));
        assert_eq!(sd.uid_of("user-01.slice"), None);
        assert_eq!(sd.uid_of("user-1001"), None);
    }

    #[test]
    fn auto_follows_the_host() {
        assert_eq!(DriverSetting::Auto.resolve(true), Driver::Systemd);
        assert_eq!(DriverSetting::Auto.resolve(false), Driver::Cgroupfs);
        assert_eq!(DriverSetting::Cgroupfs.resolve(true), Driver::Cgroupfs);
        assert_eq!(DriverSetting::Systemd.resolve(false), Driver::Systemd);
    }
}
