//! Where the pins live, and pinning links so that a restart never leaves a gap.

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
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
    /// (see [`remove_version`]); until then both generations run, which counts each
    /// connect() once.
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

/// Detaches the programs and removes all pins (and the bpffs mount the agent made there):
/// the links of every map layout version, this one's included, each waited for (see
/// [`remove_version`]). Links another process holds open are an error naming them all:
/// their programs run on, and the pins [`remove_version`] keeps for them stay.
pub fn uninstall(pin_path: &Path) -> Result<(), BpfError> {
    let mut held = Vec::new();
    for dir in version_dirs(pin_path)? {
        held.extend(remove_version(&dir)?);
    }
    if !held.is_empty() {
        return Err(BpfError::LinksHeld { links: held });
    }
    bpffs::remove_pins(pin_path)
}

/// The map layout version directories (`v<N>`) under `pin_path`.
pub(super) fn version_dirs(pin_path: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let io_err = |source| BpfError::Io {
        what: "reading the pin directory",
        path: pin_path.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(pin_path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err)?;
        let is_version = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix('v'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_version {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// A link whose pin was removed but that another process holds open: its program runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLink {
    pub path: PathBuf,
    pub id: u32,
}

/// Removes the pins of one map layout version directory: its links first, then everything
/// else. The connect hooks' links (and any staging pin) go first and are waited for until
/// the kernel has released them, then sock_release's, so no socket one of its connect
/// hooks charged loses the release. Unpinning alone detaches later: bpffs frees the inode
/// after an RCU grace period and the link is put from a work item, and until then the
/// program still runs. Returns the links another process holds open (they stay attached).
/// While a connect hook is held, its version's sock_release link stays pinned (and the
/// directory with it), so what that hook still charges is released; the next call removes
/// it once the hook is gone.
pub(super) fn remove_version(dir: &Path) -> Result<Vec<HeldLink>, BpfError> {
    let links = dir.join("links");
    let io_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| BpfError::Io { what, path, source }
    };
    let mut paths = Vec::new();
    match std::fs::read_dir(&links) {
        Ok(entries) => {
            for entry in entries {
                paths.push(
                    entry
                        .map_err(io_err("reading the link pins", &links))?
                        .path(),
                );
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("reading the link pins", &links)(e)),
    }
    let mut held = Vec::new();
    for group in unpin_order(paths) {
        if !held.is_empty() {
            // A connect hook is held: keep sock_release, remove the maps' pins only.
            bpffs::remove_pins(&dir.join("maps"))?;
            return Ok(held);
        }
        let mut pending = Vec::new();
        for path in group {
            let id = match pinned_link_id(&path) {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!("{e}; removing the pin without waiting for its link");
                    None
                }
            };
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing link pin", &path)(e)),
            }
            if let Some(id) = id {
                pending.push(HeldLink { path, id });
            }
        }
        held.extend(wait_released(pending)?);
    }
    bpffs::remove_pins(dir)?;
    Ok(held)
}

/// Link pins in the order they are unpinned: the connect hooks' (and anything else) first,
/// then sock_release's, a staging pin (`<name>_new`) with its program.
fn unpin_order(paths: Vec<PathBuf>) -> [Vec<PathBuf>; 2] {
    let releases = |path: &PathBuf| {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let name = name.strip_suffix("_new").unwrap_or(name);
        super::PROGRAMS
            .iter()
            .any(|(n, kind)| *n == name && *kind == super::ProgramKind::Sock)
    };
    let (release, first): (Vec<PathBuf>, Vec<PathBuf>) = paths.into_iter().partition(releases);
    [first, release]
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

/// The ids of every BPF link of the kernel. A link released between being listed and
/// being opened is left out; any other error fails the listing, which then says nothing
/// about the links after it.
fn attached_link_ids() -> Result<Vec<u32>, LinkError> {
    let mut ids = Vec::new();
    for link in aya::programs::loaded_links() {
        match link {
            Ok(info) => ids.push(info.id()),
            Err(LinkError::SyscallError(e))
                if e.call == "bpf_link_get_fd_by_id"
                    && e.io_error.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(ids)
}

/// Waits until the kernel has released every link of `links`, for at most
/// [`RELEASE_TIMEOUT`]; returns those still attached then.
fn wait_released(mut links: Vec<HeldLink>) -> Result<Vec<HeldLink>, BpfError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    while !links.is_empty() {
        match attached_link_ids() {
            Ok(ids) => links.retain(|l| ids.contains(&l.id)),
            Err(source) if start.elapsed() > RELEASE_TIMEOUT => {
                return Err(BpfError::ListingLinks { source })
            }
            // Nothing is known from a listing that failed: it is read again.
            Err(_) => {}
        }
        if links.is_empty() || start.elapsed() > RELEASE_TIMEOUT {
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use rlagent_common::{names, MAPS_LAYOUT_VERSION};

    use super::{attach_staged, uninstall, unpin_order, LinkAction, PinLayout, Staged};
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
    fn sock_release_is_unpinned_after_the_connect_hooks() {
        let pins = PinLayout::new(Path::new("/sys/fs/bpf/rlagent"));
        let release = pins.link(names::PROG_SOCK_RELEASE);
        let mut staging = release.clone().into_os_string();
        staging.push("_new");
        let staging = PathBuf::from(staging);
        let connect4 = pins.link(names::PROG_CONNECT4);
        let connect6 = pins.link(names::PROG_CONNECT6);
        let [first, last] = unpin_order(vec![
            release.clone(),
            connect4.clone(),
            staging.clone(),
            connect6.clone(),
        ]);
        assert_eq!(first, [connect4, connect6]);
        assert_eq!(last, [release, staging]);
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
