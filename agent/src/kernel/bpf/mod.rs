//! The connection limiter: loads the kernel programs, keeps their maps and links pinned,
//! writes the limits, reads the counters.
//!
//! Pins live under `<pin_path>/v<layout>/` (`maps/`, `links/`). Because links are pinned,
//! enforcement continues while the agent is stopped or restarting. A new agent reuses the
//! pinned maps (live counts survive), attaches its freshly loaded programs beside the old
//! ones and only then renames its link pins over the old pins, which detaches the old
//! programs: there is never a moment without a program. While both run, a socket is still
//! charged once and uncharged once, because its charge record is an entry of the pinned
//! `RL_SOCK_OWNER` map, claimed by an exclusive insert and released by a successful delete.
//! Pins of other layout versions (an older agent's) are removed once the new programs run,
//! so their links stop enforcing stale caps.
//!
//! (BPF_LINK_UPDATE would swap programs in place, but it fails with EINVAL for cgroup links
//! on the 6.18 kernel we run on, even with the link's own program.)

pub mod bpffs;

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError},
    programs::{links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError},
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use rlagent_common::{names, HostConns, Settings, UidConns, MAPS_LAYOUT_VERSION, UNLIMITED};

use crate::{
    desired::conns::ConnLimits,
    model::usage::{HostConnStats, ProgramStats, UidConnStats},
};

/// The eBPF object built by build.rs from `ebpf/`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rlagent-ebpf.o"));

/// Oldest kernel with everything the programs use: cgroup bpf_link (5.7), sock_release
/// (5.9), bpf_get_socket_cookie in cgroup/sock (5.11), bpf_set_retval (5.18).
const MIN_KERNEL: (u32, u32) = (5, 18);

const MAPS: [&str; 5] = [
    names::SETTINGS,
    names::UID_CAPS,
    names::UID_CONNS,
    names::HOST_CONNS,
    names::SOCK_OWNER,
];

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel {found} is too old: rlagent's programs need Linux {}.{} or later", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
    #[error("loading the eBPF object (maps pinned under {pin_dir})")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {name} to cgroup {cgroup}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("link {name} pinned at {path}: {message}")]
    Link {
        name: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
}

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

/// Counters read from the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub host: HostConns,
    pub per_uid: BTreeMap<u32, UidConns>,
}

pub struct ConnLimiter {
    ebpf: Ebpf,
    pins: PinLayout,
}

fn check_kernel() -> Result<(), BpfError> {
    let Ok(version) = KernelVersion::current() else {
        // Unknown version strings (custom kernels): let the verifier decide.
        return Ok(());
    };
    if version < KernelVersion::new(MIN_KERNEL.0 as u8, MIN_KERNEL.1 as u8, 0) {
        return Err(BpfError::KernelTooOld {
            found: version.to_string(),
        });
    }
    Ok(())
}

impl ConnLimiter {
    /// Loads the programs into the kernel, reusing the maps pinned under `pin_path` (or
    /// creating and pinning them). Nothing is attached yet. `max_tracked_sockets` sizes the
    /// charged-socket map when it is created; a pinned map keeps its size until uninstall.
    pub fn load(pin_path: &Path, max_tracked_sockets: u32) -> Result<Self, BpfError> {
        check_kernel()?;
        bpffs::ensure_pin_dir(pin_path)?;
        let pins = PinLayout::new(pin_path);
        for dir in ["maps", "links"] {
            let path = pins.version_dir().join(dir);
            std::fs::create_dir_all(&path).map_err(|source| BpfError::Io {
                what: "creating pin directory",
                path,
                source,
            })?;
        }
        let map_paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|n| (*n, pins.map(n))).collect();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::SOCK_OWNER, max_tracked_sockets);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| BpfError::Load {
            pin_dir: pins.version_dir(),
            source: Box::new(source),
        })?;
        for name in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
            sock_addr_program(&mut ebpf, name)?
                .load()
                .map_err(|source| BpfError::Program { name, source })?;
        }
        sock_program(&mut ebpf, names::PROG_SOCK_RELEASE)?
            .load()
            .map_err(|source| BpfError::Program {
                name: names::PROG_SOCK_RELEASE,
                source,
            })?;
        Ok(Self { ebpf, pins })
    }

    /// Attaches the programs to `cgroup` (absolute path), adopting pinned links.
    /// sock_release goes first, so no socket is charged without a program to uncharge it.
    pub fn attach(&mut self, cgroup: &Path) -> Result<Vec<(&'static str, LinkAction)>, BpfError> {
        let cgroup_dir = File::open(cgroup).map_err(|source| BpfError::Io {
            what: "opening the attach cgroup",
            path: cgroup.to_path_buf(),
            source,
        })?;
        let attach_err = |name| {
            let cgroup = cgroup.to_path_buf();
            move |source| BpfError::Attach {
                name,
                cgroup,
                source,
            }
        };
        let mut actions = Vec::new();

        let name = names::PROG_SOCK_RELEASE;
        let prog = sock_program(&mut self.ebpf, name)?;
        let action = attach_and_pin(name, &self.pins.link(name), || {
            let id = prog
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(attach_err(name))?;
            let link = prog.take_link(id).map_err(attach_err(name))?;
            FdLink::try_from(link).map_err(|e| link_error(name, cgroup, e))
        })?;
        actions.push((name, action));

        for name in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
            let prog = sock_addr_program(&mut self.ebpf, name)?;
            let action = attach_and_pin(name, &self.pins.link(name), || {
                let id = prog
                    .attach(&cgroup_dir, CgroupAttachMode::Single)
                    .map_err(attach_err(name))?;
                let link = prog.take_link(id).map_err(attach_err(name))?;
                FdLink::try_from(link).map_err(|e| link_error(name, cgroup, e))
            })?;
            actions.push((name, action));
        }
        Ok(actions)
    }

    /// Writes `limits` into the maps: settings first, then per-UID caps (added or changed,
    /// then removed). Each map write is atomic per entry.
    pub fn apply(&mut self, limits: &ConnLimits) -> Result<(), BpfError> {
        let settings = limits.settings();
        let mut settings_map: Array<&mut MapData, Settings> =
            typed_map_mut(&mut self.ebpf, names::SETTINGS)?;
        settings_map
            .set(0, settings, 0)
            .map_err(map_error(names::SETTINGS))?;

        let mut caps: HashMap<&mut MapData, u32, u64> =
            typed_map_mut(&mut self.ebpf, names::UID_CAPS)?;
        let stale: Vec<u32> = caps
            .keys()
            .filter_map(Result::ok)
            .filter(|uid| !limits.per_uid.contains_key(uid))
            .collect();
        for (uid, cap) in &limits.per_uid {
            if caps.get(uid, 0).ok() != Some(*cap) {
                caps.insert(uid, cap, 0)
                    .map_err(map_error(names::UID_CAPS))?;
            }
        }
        for uid in stale {
            match caps.remove(&uid) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(map_error(names::UID_CAPS)(source)),
            }
        }
        Ok(())
    }

    /// Removes the pins of every other map-layout version under the pin path (an older
    /// agent's): unpinning their links detaches their programs, which would otherwise go
    /// on enforcing the caps in their own, stale maps. Called once this version's
    /// programs are attached, so there is no moment without enforcement.
    pub fn remove_other_versions(&self) -> Result<Vec<PathBuf>, BpfError> {
        let current = self.pins.version_dir();
        let entries = std::fs::read_dir(&self.pins.root).map_err(|source| BpfError::Io {
            what: "reading the pin directory",
            path: self.pins.root.clone(),
            source,
        })?;
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let is_version = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if is_version && path != current {
                bpffs::remove_pins(&path)?;
                removed.push(path);
            }
        }
        Ok(removed)
    }
}

fn link_error(name: &'static str, cgroup: &Path, e: impl std::fmt::Display) -> BpfError {
    BpfError::Link {
        name,
        path: cgroup.to_path_buf(),
        message: e.to_string(),
    }
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

/// A loaded program of type `T` (CgroupSockAddr, CgroupSock) by name.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(BpfError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into()
        .map_err(|source| BpfError::Program { name, source })
}

fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, BpfError> {
    program(ebpf, name)
}

fn sock_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSock, BpfError> {
    program(ebpf, name)
}

fn typed_map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<&'a mut Map, Error = MapError>,
{
    let map = ebpf
        .map_mut(name)
        .ok_or(BpfError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(map_error(name))
}

/// Attaches a new link and pins it in place of any old pin, which detaches the old program
/// once the new one runs.
fn attach_and_pin(
    name: &'static str,
    link_pin: &Path,
    attach: impl FnOnce() -> Result<FdLink, BpfError>,
) -> Result<LinkAction, BpfError> {
    let link_err = |message: String| BpfError::Link {
        name,
        path: link_pin.to_path_buf(),
        message,
    };
    let existed = link_pin.exists();
    let link = attach()?;
    // Pin beside, then rename over the old pin (bpffs refuses names with a '.').
    let mut staging = link_pin.as_os_str().to_owned();
    staging.push("_new");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    link.pin(&staging)
        .map_err(|e| link_err(format!("cannot pin: {e}")))?;
    std::fs::rename(&staging, link_pin)
        .map_err(|e| link_err(format!("cannot move the new pin in place: {e}")))?;
    Ok(if existed {
        LinkAction::Replaced
    } else {
        LinkAction::Attached
    })
}

fn read_stats<H, U>(
    host: &Array<H, HostConns>,
    per_uid: &HashMap<U, u32, UidConns>,
) -> Result<ConnStats, BpfError>
where
    H: std::borrow::Borrow<MapData>,
    U: std::borrow::Borrow<MapData>,
{
    let host = host.get(&0, 0).map_err(map_error(names::HOST_CONNS))?;
    let mut uids = BTreeMap::new();
    for item in per_uid.iter() {
        let (uid, conns) = item.map_err(map_error(names::UID_CONNS))?;
        uids.insert(uid, conns);
    }
    Ok(ConnStats {
        host,
        per_uid: uids,
    })
}

/// Read-only view of the pinned maps: the agent's stats reader (opened once, on the pins the
/// agent itself uses), `rlagent stats`/`conns`, and the tests.
pub struct PinnedMaps {
    host: Array<MapData, HostConns>,
    uid_conns: HashMap<MapData, u32, UidConns>,
    uid_caps: HashMap<MapData, u32, u64>,
    settings: Array<MapData, Settings>,
}

impl PinnedMaps {
    pub fn open(pin_path: &Path) -> Result<Self, BpfError> {
        let pins = PinLayout::new(pin_path);
        fn open<T: TryFrom<Map, Error = MapError>>(
            pins: &PinLayout,
            name: &'static str,
        ) -> Result<T, BpfError> {
            let data = MapData::from_pin(pins.map(name)).map_err(map_error(name))?;
            let map = Map::from_map_data(data).map_err(map_error(name))?;
            T::try_from(map).map_err(map_error(name))
        }
        Ok(Self {
            host: open(&pins, names::HOST_CONNS)?,
            uid_conns: open(&pins, names::UID_CONNS)?,
            uid_caps: open(&pins, names::UID_CAPS)?,
            settings: open(&pins, names::SETTINGS)?,
        })
    }

    pub fn stats(&self) -> Result<ConnStats, BpfError> {
        read_stats(&self.host, &self.uid_conns)
    }

    /// Host counters and every UID's counters with the cap in force for it.
    pub fn usage(&self) -> Result<(HostConnStats, Vec<UidConnStats>), BpfError> {
        let counters = self.stats()?;
        let host = HostConnStats {
            live: counters.host.live,
            untracked: counters.host.untracked,
        };
        let mut per_uid = Vec::with_capacity(counters.per_uid.len());
        for (uid, c) in counters.per_uid {
            let cap = Some(self.cap_for(uid)?).filter(|c| *c != UNLIMITED);
            per_uid.push(UidConnStats {
                uid,
                live: c.live,
                cap,
                admitted: c.admitted,
                denied_cap: c.denied_cap,
                denied_host: c.denied_host,
            });
        }
        Ok((host, per_uid))
    }

    /// The cap that applies to `uid` now (own cap, else the default), [`UNLIMITED`] for none.
    pub fn cap_for(&self, uid: u32) -> Result<u64, BpfError> {
        match self.uid_caps.get(&uid, 0) {
            Ok(cap) => return Ok(cap),
            Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error(names::UID_CAPS)(source)),
        }
        let settings = self
            .settings
            .get(&0, 0)
            .map_err(map_error(names::SETTINGS))?;
        Ok(if u64::from(uid) >= settings.default_uid_min {
            settings.default_cap
        } else {
            UNLIMITED
        })
    }
}

/// rlagent's programs with a run count (the kernel counts only while BPF stats are on).
pub fn program_stats() -> Vec<ProgramStats> {
    let mut by_name: std::collections::BTreeMap<String, (u64, f64)> =
        std::collections::BTreeMap::new();
    for info in aya::programs::loaded_programs().flatten() {
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if !name.starts_with("rl_") || info.run_count() == 0 {
            continue;
        }
        let entry = by_name.entry(name.to_string()).or_default();
        entry.0 += info.run_count();
        entry.1 += info.run_time().as_secs_f64();
    }
    by_name
        .into_iter()
        .map(|(program, (runs, run_seconds))| ProgramStats {
            program,
            runs,
            run_seconds,
        })
        .collect()
}

/// Detaches the programs and removes all pins (and the bpffs mount the agent made there).
/// Connect hooks go first, sock_release last, so no charged socket loses its uncharge.
pub fn uninstall(pin_path: &Path) -> Result<(), BpfError> {
    let pins = PinLayout::new(pin_path);
    for name in [
        names::PROG_CONNECT4,
        names::PROG_CONNECT6,
        names::PROG_SOCK_RELEASE,
    ] {
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
