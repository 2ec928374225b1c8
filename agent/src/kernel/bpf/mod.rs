// Why this file is long: `ConnLimiter` is the one owner of the loaded object, its maps and
// links (load, attach, write limits, read counters, retire, old versions); the rest is apart.
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

mod batch;
pub mod bpffs;
pub mod events;
mod maps;
mod pins;
pub mod seed;
#[cfg(test)]
mod tests;

pub use maps::{
    group_stats, now_ns, program_stats, uid_stats, ConnStats, GroupCounters, PinnedMaps,
};
pub use pins::HeldLink;
use pins::{attach_staged, Staged};
pub use pins::{uninstall, LinkAction, PinLayout};

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, Map, MapData, MapError,
    },
    programs::{
        links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SocketFilter,
        TestRun, TestRunOptions,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use rlagent_common::{
    names, Conns, HostConns, Policy, Settings, SockOwner, FLAG_SEEDED, MAX_GROUP_LEVEL,
    OWNER_SEEDED, OWNER_UNCAPPED,
};

use crate::{
    desired::conns::{ConnLimits, GroupUnenforced},
    model::subuid::SubordinateRange,
};

/// The eBPF object built by build.rs from `ebpf/`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rlagent-ebpf.o"));

/// The groups of a [`ConnLimits`] as the programs see them: by cgroup id, with the
/// levels their cgroups sit at, and the groups the programs cannot see, with the reason.
struct SeenGroups {
    policies: BTreeMap<u64, Policy>,
    ids: BTreeMap<String, u64>,
    /// Bit n: a group's cgroup is at level n.
    levels: u64,
    unenforced: BTreeMap<String, GroupUnenforced>,
}

impl SeenGroups {
    /// A group's cgroup is found under `mount` (its id is what the programs see); one
    /// outside `attach` (the attach cgroup, relative to the mount), too deep, or not there
    /// yet is left out.
    fn resolve(limits: &ConnLimits, mount: &Path, attach: &Path) -> Self {
        let fs = crate::kernel::cgroup::CgroupFs::new(mount);
        let ids = fs.ids(limits.groups.values().map(|g| g.cgroup.as_path()));
        let mut seen = Self {
            policies: BTreeMap::new(),
            ids: BTreeMap::new(),
            levels: 0,
            unenforced: BTreeMap::new(),
        };
        for (name, group) in &limits.groups {
            let level = group.cgroup.components().count() as u32;
            let found = if !group.cgroup.starts_with(attach) {
                Err(GroupUnenforced::OutsideAttach {
                    cgroup: group.cgroup.clone(),
                    attach: attach.to_path_buf(),
                })
            } else if level >= MAX_GROUP_LEVEL {
                Err(GroupUnenforced::TooDeep {
                    cgroup: group.cgroup.clone(),
                    deepest: MAX_GROUP_LEVEL - 1,
                })
            } else {
                ids.get(group.cgroup.as_path())
                    .copied()
                    .ok_or(GroupUnenforced::CgroupMissing)
            };
            match found {
                Ok(id) => {
                    seen.levels |= 1 << level;
                    seen.policies.insert(id, group.policy);
                    seen.ids.insert(name.clone(), id);
                }
                Err(reason) => {
                    seen.unenforced.insert(name.clone(), reason);
                }
            }
        }
        seen
    }
}

/// Oldest kernel with everything the programs use: cgroup bpf_link (5.7), sock_release
/// (5.9), bpf_get_socket_cookie in cgroup/sock (5.11), bpf_set_retval (5.18),
/// bpf_skc_to_mptcp_sock (5.19), and the calling task's pid and comm in cgroup programs
/// for denial events (6.1). Tested on 6.1 (the guests) and 6.18.
const MIN_KERNEL: (u32, u32) = (6, 1);

/// `BPF_NOEXIST` of linux/bpf.h: create only.
const BPF_NOEXIST: u64 = 1;

/// Every map is pinned, so all program generations share it (RL_MPTCP too: a charge kept
/// on an MPTCP socket by one generation is released by the next).
pub(super) const MAPS: [&str; 13] = [
    names::SETTINGS,
    names::MPTCP,
    names::GENERATION,
    names::UID_SEEDED,
    names::UID_SEEDED_GONE,
    names::UID_CAPS,
    names::UID_CONNS,
    names::HOST_CONNS,
    names::SOCK_OWNER,
    names::GROUP_POLICY,
    names::GROUP_CONNS,
    names::EVENTS,
    names::SUBUID,
];

/// How the agent uses one program of the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProgramKind {
    /// A `cgroup/connect4` or `cgroup/connect6` program: attached, its link pinned.
    SockAddr,
    /// The `cgroup/sock_release` program: attached, its link pinned.
    Sock,
    /// A socket filter that is never attached: the agent runs it (BPF_PROG_TEST_RUN).
    TestRun,
}

/// Every program the agent loads, in the order it attaches them: sock_release before the
/// connect programs, so no socket is charged without a program to uncharge it.
pub(super) const PROGRAMS: [(&str, ProgramKind); 4] = [
    (names::PROG_SOCK_RELEASE, ProgramKind::Sock),
    (names::PROG_CONNECT4, ProgramKind::SockAddr),
    (names::PROG_CONNECT6, ProgramKind::SockAddr),
    (names::PROG_RETIRE, ProgramKind::TestRun),
];

/// The programs of [`PROGRAMS`] that are attached (each has a pinned link), in attach
/// order.
pub(super) fn attached_programs() -> impl DoubleEndedIterator<Item = &'static str> {
    PROGRAMS
        .into_iter()
        .filter(|(_, kind)| *kind != ProgramKind::TestRun)
        .map(|(name, _)| name)
}

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(transparent)]
    Seed(#[from] seed::SeedError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel {found} is too old: rlagent's programs need Linux {}.{} or later", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
    #[error("[bpf] host_conns = {cap} cannot be honoured: the pinned charged-socket map tracks connections no cap bounds up to {budget} (half its {capacity} entries, fixed until `rlagent uninstall`)")]
    HostCapOverBudget {
        cap: u64,
        budget: u64,
        capacity: u32,
    },
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
    #[error("reading the link pinned at {path}")]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("links still attached after their pins were removed, because another process holds them open (bpftool link list shows them): {}", held_list(.links))]
    LinksHeld { links: Vec<HeldLink> },
    #[error("listing the kernel's BPF links")]
    ListingLinks {
        #[source]
        source: aya::programs::links::LinkError,
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

pub struct ConnLimiter {
    ebpf: Ebpf,
    pins: PinLayout,
    /// This program set's generation: one more than the pinned maps' active one.
    generation: u64,
    /// The maps were created by this load (none were pinned): the first start.
    new_maps: bool,
    /// Entries `RL_SOCK_OWNER` holds (see [`maps::socket_capacity`]).
    socket_capacity: u32,
    /// The cgroup id written for each group at the last apply.
    group_ids: BTreeMap<String, u64>,
    /// Groups whose policy the last apply found gone (their counters go at the next).
    retired: BTreeSet<u64>,
    /// Connections found open at the first start (see [`Self::seed`]), until settled.
    seeded: Vec<seed::OpenConnection>,
    /// Of the seeded connections, those found closed without a release (kept in the
    /// settings the agent writes).
    seeded_gone: u64,
    /// UIDs whose counters were idle at the last [`Self::retire_idle`], with their
    /// admitted count then.
    idle_before: BTreeMap<u32, u64>,
    /// Counters of UIDs without a limit removed so far (kept in the settings).
    uncapped_uids_gone: u64,
    /// Seeded charges no cap bounds found closed without a release (kept in the
    /// settings).
    uncapped_sockets_gone: u64,
}

/// Refuses a kernel older than `MIN_KERNEL` by its version (an unknown version string
/// is let through: the verifier decides).
pub(super) fn check_kernel() -> Result<(), BpfError> {
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
        let generation = active_generation(&pins.map(names::GENERATION))? + 1;
        let new_maps = !pins.map(names::SOCK_OWNER).exists();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::SOCK_OWNER, max_tracked_sockets);
        loader.override_global(names::GLOBAL_GENERATION, &generation, true);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|source| BpfError::Load {
            pin_dir: pins.version_dir(),
            source: Box::new(source),
        })?;
        for (name, kind) in PROGRAMS {
            match kind {
                ProgramKind::SockAddr => sock_addr_program(&mut ebpf, name)?.load(),
                ProgramKind::Sock => sock_program(&mut ebpf, name)?.load(),
                ProgramKind::TestRun => program::<SocketFilter>(&mut ebpf, name)?.load(),
            }
            .map_err(|source| BpfError::Program { name, source })?;
        }
        // Written only by agents: an earlier run's counts carry over.
        let earlier = typed_map_mut::<Array<&mut MapData, Settings>>(&mut ebpf, names::SETTINGS)?
            .get(&0, 0)
            .ok();
        let seeded_gone = earlier.map_or(0, |s| s.seeded_gone);
        let uncapped_uids_gone = earlier.map_or(0, |s| s.uncapped_uids_gone);
        let uncapped_sockets_gone = earlier.map_or(0, |s| s.uncapped_sockets_gone);
        let socket_capacity = match ebpf.map(names::SOCK_OWNER) {
            Some(Map::HashMap(data)) => maps::socket_capacity(data)?,
            _ => {
                return Err(BpfError::Missing {
                    kind: "map",
                    name: names::SOCK_OWNER,
                })
            }
        };
        Ok(Self {
            ebpf,
            pins,
            generation,
            new_maps,
            socket_capacity,
            group_ids: BTreeMap::new(),
            retired: BTreeSet::new(),
            seeded: Vec::new(),
            seeded_gone,
            idle_before: BTreeMap::new(),
            uncapped_uids_gone,
            uncapped_sockets_gone,
        })
    }

    /// On the first start (new maps, no program attached yet), charges the connections
    /// already open in the cgroups at and below `attach_cgroup` (all of them when
    /// `host_wide`) to their owners, so a UID over its cap gets nothing new until it is
    /// back under. Every UID is seeded, whether or not a cap concerns it yet, so a cap set
    /// later counts older connections too; never root's (`seed::open_connections` leaves
    /// them out, and no subordinate range maps to root). Seeded charges no enforce-mode
    /// cap bounds take the
    /// budget of such charges, as the programs' do. A restart adopts the pinned maps and
    /// seeds nothing, also after a first start that failed half-way.
    pub fn seed(
        &mut self,
        attach_cgroup: &Path,
        host_wide: bool,
        limits: &ConnLimits,
    ) -> Result<usize, BpfError> {
        if !self.new_maps {
            return Ok(0);
        }
        let cgroups = (!host_wide).then(|| seed::cgroup_ids(attach_cgroup));
        let found = seed::open_connections(limits.count_udp, cgroups.as_ref())?;
        let budget = u64::from(self.socket_capacity / 2);
        let mut owners: HashMap<&mut MapData, u64, SockOwner> =
            typed_map_mut(&mut self.ebpf, names::SOCK_OWNER)?;
        let mut per_uid: std::collections::BTreeMap<u32, u64> = Default::default();
        let (mut unbounded, mut skipped) = (0u64, 0u64);
        for mut c in found {
            c.uid = limits.charged_uid(c.uid);
            let bounded = limits.policy_for(c.uid).bounds();
            if !bounded && unbounded >= budget {
                skipped += 1;
                continue;
            }
            // Not charged to a group: seeded connections count against UID and host caps.
            let flags = OWNER_SEEDED | if bounded { 0 } else { OWNER_UNCAPPED };
            let owner = SockOwner {
                owner: u64::from(c.uid) | flags,
                group: 0,
            };
            match owners.insert(c.cookie, owner, BPF_NOEXIST) {
                Ok(()) => {
                    *per_uid.entry(c.uid).or_default() += 1;
                    unbounded += u64::from(!bounded);
                    self.seeded.push(c);
                }
                // A full map: that connection goes uncounted, like any when full.
                Err(e) => tracing::warn!(cookie = c.cookie, uid = c.uid, "not seeded: {e}"),
            }
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                budget,
                "connections open at the first start not seeded: past the budget of charges no cap bounds"
            );
        }
        let mut seeded: HashMap<&mut MapData, u32, u64> =
            typed_map_mut(&mut self.ebpf, names::UID_SEEDED)?;
        for (uid, n) in &per_uid {
            seeded
                .insert(uid, n, 0)
                .map_err(map_error(names::UID_SEEDED))?;
        }
        let mut host: Array<&mut MapData, HostConns> =
            typed_map_mut(&mut self.ebpf, names::HOST_CONNS)?;
        let mut counters = host.get(&0, 0).map_err(map_error(names::HOST_CONNS))?;
        counters.seeded = self.seeded.len() as u64;
        counters.uncapped_sockets = unbounded;
        host.set(0, counters, 0)
            .map_err(map_error(names::HOST_CONNS))?;
        self.write_agent_settings()?;
        Ok(self.seeded.len())
    }

    /// After the programs are attached: a seeded connection that closed before
    /// sock_release was attached was never released. Such a one is claimed here (its
    /// charge record deleted) and counted as gone in maps only the agent writes, so no
    /// update races a program's.
    pub fn settle_seeded(&mut self, udp: bool) -> Result<usize, BpfError> {
        if self.seeded.is_empty() {
            return Ok(0);
        }
        let open: std::collections::HashSet<u64> = seed::open_connections(udp, None)?
            .into_iter()
            .map(|c| c.cookie)
            .collect();
        let mut owners: HashMap<&mut MapData, u64, SockOwner> =
            typed_map_mut(&mut self.ebpf, names::SOCK_OWNER)?;
        let mut gone_per_uid: std::collections::BTreeMap<u32, u64> = Default::default();
        for c in std::mem::take(&mut self.seeded) {
            if open.contains(&c.cookie) {
                continue;
            }
            let flags = owners.get(&c.cookie, 0).map_or(0, |o| o.owner);
            if owners.remove(&c.cookie).is_ok() {
                *gone_per_uid.entry(c.uid).or_default() += 1;
                if flags & OWNER_UNCAPPED != 0 {
                    self.uncapped_sockets_gone += 1;
                }
            }
        }
        let mut gone: HashMap<&mut MapData, u32, u64> =
            typed_map_mut(&mut self.ebpf, names::UID_SEEDED_GONE)?;
        let mut total = 0;
        for (uid, n) in &gone_per_uid {
            let before = gone.get(uid, 0).unwrap_or(0);
            gone.insert(uid, before + n, 0)
                .map_err(map_error(names::UID_SEEDED_GONE))?;
            total += n;
        }
        self.seeded_gone += total;
        self.write_agent_settings()?;
        Ok(total as usize)
    }

    /// Rewrites the settings element with the agent's own state (see [`Self::agent_settings`]).
    fn write_agent_settings(&mut self) -> Result<(), BpfError> {
        let map: Array<&mut MapData, Settings> = typed_map_mut(&mut self.ebpf, names::SETTINGS)?;
        let current = map.get(&0, 0).map_err(map_error(names::SETTINGS))?;
        let updated = self.agent_settings(current)?;
        let mut map: Array<&mut MapData, Settings> =
            typed_map_mut(&mut self.ebpf, names::SETTINGS)?;
        map.set(0, updated, 0).map_err(map_error(names::SETTINGS))
    }

    /// `settings` with the state only the agent keeps: the seeded connections
    /// (`FLAG_SEEDED` while some are open, so the programs read the seeded counts, and the
    /// gone counts) and the counters of UIDs without a limit retired so far.
    fn agent_settings(&mut self, mut settings: Settings) -> Result<Settings, BpfError> {
        settings.uncapped_uids_gone = self.uncapped_uids_gone;
        settings.uncapped_sockets_gone = self.uncapped_sockets_gone;
        let host: Array<&mut MapData, HostConns> =
            typed_map_mut(&mut self.ebpf, names::HOST_CONNS)?;
        let open = host
            .get(&0, 0)
            .map_err(map_error(names::HOST_CONNS))?
            .seeded
            .saturating_sub(self.seeded_gone);
        settings.seeded_gone = self.seeded_gone;
        if open > 0 {
            settings.flags |= FLAG_SEEDED;
        } else {
            settings.flags &= !FLAG_SEEDED;
        }
        Ok(settings)
    }

    /// Makes this program set's generation the one that charges and denies.
    fn activate(&mut self) -> Result<(), BpfError> {
        let mut map: Array<&mut MapData, u64> = typed_map_mut(&mut self.ebpf, names::GENERATION)?;
        map.set(0, self.generation, 0)
            .map_err(map_error(names::GENERATION))
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
        // CgroupSock and CgroupSockAddr share no trait for attach and take_link.
        macro_rules! attach {
            ($prog:expr, $name:expr) => {{
                let name = $name;
                let prog = $prog;
                attach_staged(name, &self.pins.link(name), || {
                    let id = prog
                        .attach(&cgroup_dir, CgroupAttachMode::Single)
                        .map_err(attach_err(name))?;
                    let link = prog.take_link(id).map_err(attach_err(name))?;
                    FdLink::try_from(link).map_err(|e| link_error(name, cgroup, e))
                })?
            }};
        }
        // First start (no earlier generation): enforce from the first connect program on.
        // Otherwise the earlier generation goes on enforcing while the new programs are
        // attached beside it, hands over once they all run, and only then are the old ones
        // detached (their pins replaced): there is no moment without a counting program.
        // PROGRAMS lists sock_release before the connect programs.
        let fresh = self.generation == 1;
        let mut staged = Vec::new();
        for (name, kind) in PROGRAMS {
            match kind {
                ProgramKind::Sock => {
                    staged.push(attach!(sock_program(&mut self.ebpf, name)?, name));
                    if fresh {
                        self.activate()?;
                    }
                }
                ProgramKind::SockAddr => {
                    staged.push(attach!(sock_addr_program(&mut self.ebpf, name)?, name));
                }
                ProgramKind::TestRun => {}
            }
        }
        if !fresh {
            self.activate()?;
        }
        staged.into_iter().map(Staged::commit).collect()
    }

    /// Writes `limits` into the maps: settings first, then per-UID policies (added or
    /// changed, then removed), then groups. A group's cgroup is found under `mount` (its
    /// id is what the programs see); a group the programs cannot see is left out and
    /// returned with the reason: its cgroup does not exist yet (a later call applies it
    /// once it does), it is outside `attach` (the attach cgroup, relative to the mount),
    /// or it is too deep. Each map write is atomic per entry.
    pub fn apply(
        &mut self,
        limits: &ConnLimits,
        mount: &Path,
        attach: &Path,
    ) -> Result<BTreeMap<String, GroupUnenforced>, BpfError> {
        let seen = SeenGroups::resolve(limits, mount, attach);
        let budget = u64::from(self.socket_capacity / 2);
        if limits.host_cap != rlagent_common::UNLIMITED && limits.host_cap > budget {
            return Err(BpfError::HostCapOverBudget {
                cap: limits.host_cap,
                budget,
                capacity: self.socket_capacity,
            });
        }
        let mut settings = self.agent_settings(limits.settings(self.socket_capacity))?;
        settings.group_levels = seen.levels;
        let mut settings_map: Array<&mut MapData, Settings> =
            typed_map_mut(&mut self.ebpf, names::SETTINGS)?;
        settings_map
            .set(0, settings, 0)
            .map_err(map_error(names::SETTINGS))?;
        self.write_uids(limits)?;
        self.write_groups(&seen.policies)?;
        self.group_ids = seen.ids;
        Ok(seen.unenforced)
    }

    /// The per-UID policies, the subordinate ranges, and counters for every UID with a
    /// limit of its own.
    fn write_uids(&mut self, limits: &ConnLimits) -> Result<(), BpfError> {
        sync_policies(
            typed_map_mut(&mut self.ebpf, names::UID_CAPS)?,
            names::UID_CAPS,
            &limits.per_uid,
        )?;
        sync_subordinate(
            typed_map_mut(&mut self.ebpf, names::SUBUID)?,
            &limits.subordinate,
        )?;
        // Made now: such a UID is counted however many other UIDs have connected since
        // (an error here names a full map).
        let limited: BTreeSet<u32> = limits
            .per_uid
            .iter()
            .filter(|(_, p)| p.limits())
            .map(|(uid, _)| *uid)
            .collect();
        create_counters(
            typed_map_mut(&mut self.ebpf, names::UID_CONNS)?,
            names::UID_CONNS,
            &limited,
            |uid| *uid,
        )
    }

    /// The groups' counters and policies (by cgroup id), and the counters of groups gone.
    fn write_groups(&mut self, groups: &BTreeMap<u64, Policy>) -> Result<(), BpfError> {
        // A group's counters exist before its policy, so a program that finds the policy
        // finds the counters; stale counters go once nothing is charged to them.
        let ids: BTreeSet<u64> = groups.keys().copied().collect();
        create_counters(
            typed_map_mut(&mut self.ebpf, names::GROUP_CONNS)?,
            names::GROUP_CONNS,
            &ids,
            |_| 0,
        )?;
        sync_policies(
            typed_map_mut(&mut self.ebpf, names::GROUP_POLICY)?,
            names::GROUP_POLICY,
            groups,
        )?;
        // Counters of groups gone since an earlier write, once nothing is charged to them:
        // a program that found the policy just before it went may still be adding, so
        // this write only retires them and a later one removes them.
        let mut counters: HashMap<&mut MapData, u64, Conns> =
            typed_map_mut(&mut self.ebpf, names::GROUP_CONNS)?;
        let gone: BTreeSet<u64> = counters
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !groups.contains_key(id))
            .collect();
        for id in gone.intersection(&self.retired) {
            if counters.get(id, 0).is_ok_and(|c| c.live == 0) {
                remove_entry(&mut counters, names::GROUP_CONNS, id)?;
            }
        }
        self.retired = gone;
        Ok(())
    }

    /// One round of retiring idle UID counters, so they never run out however many UIDs
    /// connect over time. Counters are idle when nothing is charged to them, their buckets
    /// are full and the UID has no policy of its own (those keep theirs). Two phases: a
    /// UID is a candidate when its counters were idle at the last round and are idle and
    /// unchanged (no connect() admitted) now; each candidate is then retired by the
    /// `rl_retire` program, which swaps its live count from 0 to `RETIRED` atomically
    /// against every connect() (one that charged it first cancels the retirement) and
    /// deletes the entry; when the kernel refuses the delete, the entry stays `RETIRED`
    /// and every later round asks again. Returns how many were retired.
    pub fn retire_idle(&mut self, limits: &ConnLimits) -> Result<usize, BpfError> {
        let now = maps::now_ns();
        let counters: HashMap<&mut MapData, u32, Conns> =
            typed_map_mut(&mut self.ebpf, names::UID_CONNS)?;
        let (mut idle_now, mut stuck) = (BTreeMap::new(), Vec::new());
        for (uid, c) in counters.iter().filter_map(Result::ok) {
            if Conns::retiring(c.live, uid) {
                // Retired, but the kernel refused the delete (see `rl_retire`): asked again
                // every round, whatever the UID's policy now, until the delete goes through.
                stuck.push(uid);
            } else if c.live == Conns::live_word(uid, 0)
                && c.rate_tat <= now
                && c.event_tat <= now
                && !limits.per_uid.contains_key(&uid)
            {
                idle_now.insert(uid, c.admitted);
            }
        }
        let candidates: Vec<u32> = idle_now
            .iter()
            .filter(|(uid, admitted)| self.idle_before.get(uid) == Some(*admitted))
            .map(|(uid, _)| *uid)
            .chain(stuck)
            .collect();
        let program: &mut SocketFilter = program(&mut self.ebpf, names::PROG_RETIRE)?;
        // The program reads the UID after the packet's Ethernet header.
        let mut packet = [0u8; 18];
        let (mut retired, mut unlimited) = (0, 0);
        let mut failed = None;
        for uid in &candidates {
            packet[14..].copy_from_slice(&uid.to_ne_bytes());
            let run = program.test_run(TestRunOptions {
                data_in: Some(&packet),
                ..TestRunOptions::default()
            });
            match run.map(|r| r.return_value) {
                Ok(1) => retired += 1,
                // Retired, not yet deleted: the next round asks again.
                Ok(3) => {}
                Ok(2) => {
                    retired += 1;
                    unlimited += 1;
                }
                Ok(_) => {}
                Err(source) => {
                    failed = Some(BpfError::Program {
                        name: names::PROG_RETIRE,
                        source,
                    });
                    break;
                }
            }
        }
        self.idle_before = idle_now;
        for uid in &candidates {
            self.idle_before.remove(uid);
        }
        // Whatever happened, the budget of the counters retired is given back.
        if unlimited > 0 {
            self.uncapped_uids_gone += unlimited;
            self.write_agent_settings()?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(retired),
        }
    }

    /// True when a group's cgroup now has another id than the one written (it was
    /// removed and made again, as a stopped and started slice is): the limits must be
    /// written again to follow it.
    pub fn groups_moved(&self, limits: &ConnLimits, mount: &Path) -> bool {
        let fs = crate::kernel::cgroup::CgroupFs::new(mount);
        let now = fs.ids(limits.groups.values().map(|g| g.cgroup.as_path()));
        limits.groups.iter().any(|(name, g)| {
            self.group_ids
                .get(name)
                .is_some_and(|id| now.get(g.cgroup.as_path()) != Some(id))
        })
    }

    /// Removes the pins of every other map-layout version under the pin path (an older
    /// agent's): unpinning their links detaches their programs, which would otherwise go
    /// on enforcing the caps in their own, stale maps, and it returns once the kernel has
    /// released them, except links another process holds open, which it reports. Called
    /// once this version's programs are attached, so there is no moment without
    /// enforcement.
    pub fn remove_other_versions(&self) -> Result<Vec<RemovedVersion>, BpfError> {
        let current = self.pins.version_dir();
        let mut removed = Vec::new();
        for dir in pins::version_dirs(&self.pins.root)? {
            if dir != current {
                let held = pins::remove_version(&dir)?;
                removed.push(RemovedVersion { dir, held });
            }
        }
        Ok(removed)
    }
}

/// `path (id N)` of each link, comma-separated.
fn held_list(links: &[HeldLink]) -> String {
    links
        .iter()
        .map(|l| format!("{} (id {})", l.path.display(), l.id))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The pins of another map layout version, removed at start.
#[derive(Debug)]
pub struct RemovedVersion {
    pub dir: PathBuf,
    /// Its links that another process holds open: their programs still run, on their own
    /// stale maps. While any is a connect hook, the version's sock_release stays attached
    /// and pinned (see `pins::remove_version`).
    pub held: Vec<HeldLink>,
}

/// Makes `map` hold exactly `wanted`: changed entries written, stale ones removed.
fn sync_policies<K>(
    mut map: HashMap<&mut MapData, K, Policy>,
    name: &'static str,
    wanted: &BTreeMap<K, Policy>,
) -> Result<(), BpfError>
where
    K: aya::Pod + Ord,
{
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted.contains_key(k))
        .collect();
    for (key, policy) in wanted {
        if map.get(key, 0).ok().as_ref() != Some(policy) {
            map.insert(key, policy, 0).map_err(map_error(name))?;
        }
    }
    for key in stale {
        remove_entry(&mut map, name, &key)?;
    }
    Ok(())
}

/// Makes `RL_SUBUID` hold exactly the prefixes of `ranges`, each with its owner. New and
/// changed prefixes are written before stale ones go, so a UID that stays in a range is
/// never looked up in between and charged to itself.
fn sync_subordinate(
    mut map: LpmTrie<&mut MapData, [u8; 4], u32>,
    ranges: &[SubordinateRange],
) -> Result<(), BpfError> {
    let name = names::SUBUID;
    let wanted: BTreeMap<(u32, u32), u32> = ranges
        .iter()
        .flat_map(|r| r.prefixes().into_iter().map(move |p| (p, r.owner)))
        .collect();
    let present: Vec<(u32, u32)> = map
        .keys()
        .filter_map(Result::ok)
        .map(|k| (k.prefix_len(), u32::from_be_bytes(k.data())))
        .collect();
    for (&(len, base), owner) in &wanted {
        let key = Key::new(len, base.to_be_bytes());
        if map.get(&key, 0).ok().as_ref() != Some(owner) {
            map.insert(&key, owner, 0).map_err(map_error(name))?;
        }
    }
    for (len, base) in present {
        if !wanted.contains_key(&(len, base)) {
            match map.remove(&Key::new(len, base.to_be_bytes())) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(map_error(name)(source)),
            }
        }
    }
    Ok(())
}

/// Creates zeroed counters for each of `keys` that has none.
/// Fresh counters for each of `keys` that has none, tagged `tag(key)` (see
/// `LIVE_COUNT_SHIFT`).
fn create_counters<K: aya::Pod>(
    mut map: HashMap<&mut MapData, K, Conns>,
    name: &'static str,
    keys: &BTreeSet<K>,
    tag: impl Fn(&K) -> u32,
) -> Result<(), BpfError> {
    for key in keys {
        match map.insert(key, Conns::new(tag(key), 0), BPF_NOEXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => return Err(map_error(name)(source)),
        }
    }
    Ok(())
}

fn remove_entry<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: &'static str,
    key: &K,
) -> Result<(), BpfError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(map_error(name)(source)),
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

/// The generation that enforces in the maps pinned at `pin` (0 when there are none yet).
fn active_generation(pin: &Path) -> Result<u64, BpfError> {
    if !pin.exists() {
        return Ok(0);
    }
    let data = MapData::from_pin(pin).map_err(map_error(names::GENERATION))?;
    let map: Array<MapData, u64> =
        Array::try_from(Map::Array(data)).map_err(map_error(names::GENERATION))?;
    map.get(&0, 0).map_err(map_error(names::GENERATION))
}
