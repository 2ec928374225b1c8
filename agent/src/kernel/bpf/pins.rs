//! Where the pins live, and pinning links so that a restart never leaves a gap.

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};
use rlagent_common::MAPS_LAYOUT_VERSION;

use super::{bpffs, BpfError};

/// Where the pins of this map layout live.
#[derive(Debug, Clone)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    pub fn version_dir(&self) -> PathBuf {
        self.root.join(format!("v{MAPS_LAYOUT_VERSION}"))
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.version_dir().join("maps").join(name)
    }
    pub fn link(&self, name: &str) -> PathBuf {
        self.version_dir().join("links").join(name)
    }

    /// Every pin the agent keeps: the links of the attached programs and the maps.
    pub fn all(&self) -> Vec<PathBuf> {
        let links = super::attached_programs().map(|n| self.link(n));
        let maps = super::MAPS.map(|n| self.map(n));
        links.chain(maps).collect()
    }
}

/// What happened to one program's link at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkAction {
    /// No pinned link: attached and pinned a new one.
    Attached,
    /// A pinned link from an earlier run: attached the new program, then replaced the old
    /// pin (detaching the old program).
    Replaced,
}

/// A new link pinned beside the old one (`<pin>_new`): both programs run until
/// [`Staged::commit`] moves the new pin over the old, which detaches the old program.
pub(super) struct Staged {
    name: &'static str,
    staging: PathBuf,
    link_pin: PathBuf,
    existed: bool,
}

/// Attaches a new link and pins it beside any old pin (a stale staging pin of an agent
/// that died between the two steps is removed, which detaches its link).
pub(super) fn attach_staged(
    name: &'static str,
    link_pin: &Path,
    attach: impl FnOnce() -> Result<FdLink, BpfError>,
) -> Result<Staged, BpfError> {
    let existed = link_pin.exists();
    // bpffs refuses names with a '.'.
    let mut staging = link_pin.as_os_str().to_owned();
    staging.push("_new");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let link = attach()?;
    link.pin(&staging).map_err(|e| BpfError::Link {
        name,
        path: staging.clone(),
        message: format!("cannot pin: {e}"),
    })?;
    Ok(Staged {
        name,
        staging,
        link_pin: link_pin.to_path_buf(),
        existed,
    })
}

impl Staged {
    /// Moves the new pin in place of the old one. The old link detaches a moment later
    /// (see [`unpin_link`]); until then both generations run, which counts each connect()
    /// once.
    pub(super) fn commit(self) -> Result<(&'static str, LinkAction), BpfError> {
        std::fs::rename(&self.staging, &self.link_pin).map_err(|e| BpfError::Link {
            name: self.name,
            path: self.link_pin.clone(),
            message: format!("cannot move the new pin in place: {e}"),
        })?;
        let action = if self.existed {
            LinkAction::Replaced
        } else {
            LinkAction::Attached
        };
        Ok((self.name, action))
    }
}

/// Detaches the programs and removes all pins (and the bpffs mount the agent made there).
/// In the reverse of the attach order, each link gone before the next is unpinned: connect
/// hooks first, sock_release last, so no charged socket loses its uncharge.
pub fn uninstall(pin_path: &Path) -> Result<(), BpfError> {
    let pins = PinLayout::new(pin_path);
    for name in super::attached_programs().rev() {
        unpin_link(&pins.link(name))?;
    }
    bpffs::remove_pins(pin_path)
}

/// Removes the pins of another map layout version under `dir`: its links first, each
/// waited for (see [`unpin_link`]), then everything else. A link another process holds
/// open stays attached; that is logged, and the rest is removed all the same.
pub(super) fn remove_version(dir: &Path) -> Result<(), BpfError> {
    let links = dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            match unpin_link(&path) {
                Ok(()) => {}
                Err(e @ BpfError::LinkNotReleased { .. }) => tracing::warn!("{e}"),
                Err(e) => return Err(e),
            }
        }
    }
    bpffs::remove_pins(dir)
}

/// How long a link may stay attached after its last pin went. The kernel releases it after
/// an RCU grace period and a work item: milliseconds, more under a loaded or emulated CPU.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The id of the link pinned at `path`; `None` when nothing is pinned there, or when
/// `path` is not on a bpffs (a plain file holds no link; the unit tests use those).
fn pinned_link_id(path: &Path) -> Result<Option<u32>, BpfError> {
    if !path.exists() || !bpffs::is_bpffs(path) {
        return Ok(None);
    }
    let read = |source| BpfError::PinnedLink {
        path: path.to_path_buf(),
        source,
    };
    let link = FdLink::from(PinnedLink::from_pin(path).map_err(read)?);
    Ok(Some(link.info().map_err(read)?.id()))
}

/// Removes the link pin at `path` and returns once the kernel has released the link, so
/// its program is detached when this returns. Unpinning alone detaches later: bpffs frees
/// the inode after an RCU grace period and the link is put from a work item, and until
/// then the program still runs.
fn unpin_link(path: &Path) -> Result<(), BpfError> {
    let id = pinned_link_id(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(BpfError::Io {
                what: "removing link pin",
                path: path.to_path_buf(),
                source,
            })
        }
    }
    match id {
        Some(id) => wait_released(path, id),
        None => Ok(()),
    }
}

/// Waits until no link with `id` exists (it was pinned at `path`).
fn wait_released(path: &Path, id: u32) -> Result<(), BpfError> {
    let start = Instant::now();
    loop {
        let attached = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .any(|link| link.id() == id);
        if !attached {
            return Ok(());
        }
        if start.elapsed() > RELEASE_TIMEOUT {
            return Err(BpfError::LinkNotReleased {
                path: path.to_path_buf(),
                id,
                waited: RELEASE_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use rlagent_common::MAPS_LAYOUT_VERSION;

    use super::{attach_staged, uninstall, LinkAction, PinLayout, Staged};
    use crate::kernel::bpf::BpfError;

    /// The pins a running agent leaves, relative to the pin path. Written out: an agent
    /// adopts the pins of the one before it by these paths, so moving one without bumping
    /// MAPS_LAYOUT_VERSION would lose the live counts and leave the old links attached.
    fn expected_pins() -> Vec<String> {
        let v = format!("v{MAPS_LAYOUT_VERSION}");
        let links = ["rl_sock_release", "rl_connect4", "rl_connect6"];
        let maps = [
            "RL_SETTINGS",
            "RL_MPTCP",
            "RL_GENERATION",
            "RL_UID_SEEDED",
            "RL_UID_SEEDED_GONE",
            "RL_UID_CAPS",
            "RL_UID_CONNS",
            "RL_HOST_CONNS",
            "RL_SOCK_OWNER",
            "RL_GROUP_POLICY",
            "RL_GROUP_CONNS",
            "RL_EVENTS",
            "RL_SUBUID",
        ];
        let links = links.iter().map(|l| format!("{v}/links/{l}"));
        let maps = maps.iter().map(|m| format!("{v}/maps/{m}"));
        links.chain(maps).collect()
    }

    fn relative(root: &Path, paths: &[PathBuf]) -> Vec<String> {
        paths
            .iter()
            .map(|p| {
                p.strip_prefix(root)
                    .unwrap_or_else(|_| panic!("{} is outside {}", p.display(), root.display()))
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn pins_live_in_a_directory_named_after_the_map_layout_version() {
        let root = Path::new("/sys/fs/bpf/rlagent");
        let pins = PinLayout::new(root);
        let v = root.join(format!("v{MAPS_LAYOUT_VERSION}"));
        assert_eq!(pins.version_dir(), v);
        assert_eq!(pins.map("RL_SETTINGS"), v.join("maps/RL_SETTINGS"));
        assert_eq!(pins.link("rl_connect4"), v.join("links/rl_connect4"));
    }

    #[test]
    fn every_link_and_map_pin_is_listed_once_at_its_path() {
        let root = Path::new("/pins");
        let all = PinLayout::new(root).all();
        assert_eq!(relative(root, &all), expected_pins());
    }

    #[test]
    fn uninstall_removes_every_pin_and_the_pin_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rlagent");
        let pins = PinLayout::new(&root);
        for pin in pins.all() {
            std::fs::create_dir_all(pin.parent().unwrap()).unwrap();
            std::fs::write(&pin, "").unwrap();
        }
        // An older layout's pins go too.
        let old = root.join("v1/maps/RL_SETTINGS");
        std::fs::create_dir_all(old.parent().unwrap()).unwrap();
        std::fs::write(&old, "").unwrap();
        uninstall(&root).unwrap();
        assert!(!root.exists(), "{} is left", root.display());
        // Nothing to remove is not an error.
        uninstall(&root).unwrap();
    }

    #[test]
    fn uninstall_without_link_pins_removes_the_maps() {
        let tmp = tempfile::tempdir().unwrap();
        let pins = PinLayout::new(tmp.path());
        let map = pins.map("RL_SETTINGS");
        std::fs::create_dir_all(map.parent().unwrap()).unwrap();
        std::fs::write(&map, "").unwrap();
        uninstall(tmp.path()).unwrap();
        assert!(!tmp.path().exists());
    }

    #[test]
    fn a_stale_staging_pin_is_removed_before_attaching() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("rl_connect4");
        let staging = tmp.path().join("rl_connect4_new");
        std::fs::write(&link, "old").unwrap();
        std::fs::write(&staging, "stale").unwrap();
        let result = attach_staged("rl_connect4", &link, || {
            assert!(!staging.exists(), "the stale staging pin is still there");
            Err(BpfError::Missing {
                kind: "program",
                name: "rl_connect4",
            })
        });
        assert!(matches!(result, Err(BpfError::Missing { .. })));
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "old");
    }

    fn staged(dir: &Path, existed: bool) -> Staged {
        Staged {
            name: "rl_connect6",
            staging: dir.join("rl_connect6_new"),
            link_pin: dir.join("rl_connect6"),
            existed,
        }
    }

    #[test]
    fn commit_moves_the_new_pin_over_the_old_one() {
        let tmp = tempfile::tempdir().unwrap();
        let staged = staged(tmp.path(), true);
        std::fs::write(&staged.link_pin, "old").unwrap();
        std::fs::write(&staged.staging, "new").unwrap();
        let (link, staging) = (staged.link_pin.clone(), staged.staging.clone());
        assert_eq!(
            staged.commit().unwrap(),
            ("rl_connect6", LinkAction::Replaced)
        );
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "new");
        assert!(!staging.exists());
    }

    #[test]
    fn commit_without_an_old_pin_reports_attached() {
        let tmp = tempfile::tempdir().unwrap();
        let staged = staged(tmp.path(), false);
        std::fs::write(&staged.staging, "new").unwrap();
        let link = staged.link_pin.clone();
        assert_eq!(
            staged.commit().unwrap(),
            ("rl_connect6", LinkAction::Attached)
        );
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "new");
    }

    #[test]
    fn a_failed_commit_names_the_link_pin() {
        let tmp = tempfile::tempdir().unwrap();
        let staged = staged(tmp.path(), false);
        let link = staged.link_pin.clone();
        match staged.commit() {
            Err(BpfError::Link { name, path, .. }) => {
                assert_eq!((name, path), ("rl_connect6", link));
            }
            other => panic!("expected a link error, got {other:?}"),
        }
    }
}
