//! Where the pins live, and pinning links so that a restart never leaves a gap.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::links::FdLink;
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
    /// Moves the new pin in place of the old one.
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
/// In the reverse of the attach order: connect hooks first, sock_release last, so no charged
/// socket loses its uncharge.
pub fn uninstall(pin_path: &Path) -> Result<(), BpfError> {
    let pins = PinLayout::new(pin_path);
    for name in super::attached_programs().rev() {
        let path = pins.link(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(BpfError::Io {
                    what: "removing link pin",
                    path,
                    source,
                })
            }
        }
    }
    bpffs::remove_pins(pin_path)
}
