//! Types shared by the rlagent eBPF programs (`ebpf/`) and the agent (`agent/`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side reads and updates these
//! structs in BPF maps, userspace reads them through aya. Layout changes must bump
//! [`MAPS_LAYOUT_VERSION`], because maps are pinned and outlive the agent that made them.
#![no_std]

/// Version of the map layout below. Pinned maps live in a directory named after it, so an
/// agent with a different layout never reinterprets another layout's bytes.
pub const MAPS_LAYOUT_VERSION: u32 = 5;

/// A cap that never denies.
pub const UNLIMITED: u64 = u64::MAX;

/// Set by the agent once it has written real settings. A zeroed `RL_SETTINGS` element
/// (a new array map) lacks it, and the programs then allow everything without counting.
pub const FLAG_ENFORCE: u64 = 1 << 0;
/// Count connected UDP sockets as connections (TCP is always counted).
pub const FLAG_COUNT_UDP: u64 = 1 << 1;
/// When a map is full and a capped UID connects, allow it uncounted (`[bpf] on_full =
/// "allow"`) instead of denying it (the default).
pub const FLAG_ON_FULL_ALLOW: u64 = 1 << 2;

/// Set while connections that predate the agent's first start are still open: the
/// programs then add `RL_UID_SEEDED` to the UIDs' live counts.
pub const FLAG_SEEDED: u64 = 1 << 3;

/// The host cap (`[bpf] mode`) is in monitor mode: a connect() it would deny is let
/// through and counted as a would-deny.
pub const FLAG_MONITOR_HOST: u64 = 1 << 4;

/// In a [`Policy`]: the policy is in monitor mode (violations are counted and reported as
/// would-deny, never denied).
pub const POLICY_MONITOR: u64 = 1 << 0;

/// Why a connect() was (or, in monitor mode, would have been) denied: indexes of
/// [`Conns::denied`] and [`Conns::would_deny`], and [`DenyEvent::reason`].
pub mod reason {
    /// The UID's own cap, or the `user:*` default.
    pub const CAP: usize = 0;
    /// The host-wide cap.
    pub const HOST_CAP: usize = 1;
    /// The UID's connection rate (its token bucket was empty).
    pub const RATE: usize = 2;
    /// The cap of the group whose cgroup the process is in.
    pub const GROUP: usize = 3;
    /// The connection rate of that group.
    pub const GROUP_RATE: usize = 4;
    /// A kernel map had no room to count the connection (`[bpf] on_full = "deny"`).
    pub const FULL: usize = 5;
    /// How many reasons there are.
    pub const COUNT: usize = 6;
    /// Names, as metrics labels and events carry them.
    pub const NAMES: [&str; COUNT] = ["cap", "host_cap", "rate", "group", "group_rate", "full"];
}

/// Set in an `RL_SOCK_OWNER` value (above the UID in the low 32 bits) when no
/// enforce-mode cap (the UID's or its group's) bounded the charge when it was taken: it
/// counts against the budget of such charges ([`Settings::uncapped_socket_budget`]).
pub const OWNER_UNCAPPED: u64 = 1 << 32;
/// Set in an `RL_SOCK_OWNER` value for a connection the agent found open at its first
/// start: its release decrements `RL_UID_SEEDED` and `HostConns::seeded` instead of `live`.
pub const OWNER_SEEDED: u64 = 1 << 33;
/// Set in an `RL_SOCK_OWNER` value whose charge is already given back (a connect() that
/// was refused, or a release, that could not delete the record): a release that finds it
/// deletes the record and uncharges nothing.
pub const OWNER_VOID: u64 = 1 << 34;

/// Deepest cgroup level at which a group's cgroup can sit (levels count from the cgroup2
/// root, which is level 0); [`Settings::group_levels`] is a bit mask of levels below this.
pub const MAX_GROUP_LEVEL: u32 = 16;
/// Maximum number of groups (cgroups) with connection limits.
pub const MAX_GROUPS: u32 = 4096;
/// Size of the denial event ring buffer in bytes (a power of two, a multiple of the page
/// size): room for about 3,000 events.
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Names of the pinned maps and programs, shared so both sides agree.
pub mod names {
    pub const SETTINGS: &str = "RL_SETTINGS";
    pub const UID_CAPS: &str = "RL_UID_CAPS";
    pub const UID_CONNS: &str = "RL_UID_CONNS";
    pub const HOST_CONNS: &str = "RL_HOST_CONNS";
    pub const SOCK_OWNER: &str = "RL_SOCK_OWNER";
    pub const GENERATION: &str = "RL_GENERATION";
    pub const UID_SEEDED: &str = "RL_UID_SEEDED";
    pub const UID_SEEDED_GONE: &str = "RL_UID_SEEDED_GONE";
    pub const MPTCP: &str = "RL_MPTCP";
    pub const GROUP_POLICY: &str = "RL_GROUP_POLICY";
    pub const GROUP_CONNS: &str = "RL_GROUP_CONNS";
    pub const EVENTS: &str = "RL_EVENTS";
    pub const SUBUID: &str = "RL_SUBUID";

    pub const PROG_CONNECT4: &str = "rl_connect4";
    pub const PROG_CONNECT6: &str = "rl_connect6";
    pub const PROG_SOCK_RELEASE: &str = "rl_sock_release";
    /// Not attached: the agent runs it (BPF_PROG_TEST_RUN) to retire idle UID counters.
    pub const PROG_RETIRE: &str = "rl_retire";

    /// The programs' global holding their generation (set at load time).
    pub const GLOBAL_GENERATION: &str = "RL_PROGRAM_GENERATION";
}

/// Maximum number of UIDs that can hold their own cap.
pub const MAX_UID_CAPS: u32 = 65_536;
/// Maximum number of UIDs with counters. The agent retires idle ones (see [`RETIRED`]);
/// half of them are reserved for UIDs that have a limit.
pub const MAX_UID_CONNS: u32 = 262_144;
/// Default size of `RL_SOCK_OWNER` (socket cookie -> charged UID): how many charged sockets
/// can be live at once before new ones are let through uncounted. Preallocated, about
/// 64 bytes an entry. `[bpf] max_tracked_sockets` overrides it.
pub const DEFAULT_MAX_TRACKED_SOCKETS: u32 = 131_072;

/// Entries of `RL_SUBUID`: aligned UID prefixes of the subordinate ranges (a range of
/// 65,536 UIDs takes at most 17, any range at most 62).
pub const MAX_SUBUID_PREFIXES: u32 = 65_536;

/// Host-wide settings, the single element of the `RL_SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// UIDs below this get no default policy (system users), like `UID_MIN` in login.defs.
    pub default_uid_min: u64,
    /// Cap on live connections of all UIDs together; [`UNLIMITED`] for none. UID 0 is
    /// charged only when it has a policy of its own, and never denied by this cap, so the
    /// host stays administrable.
    pub host_cap: u64,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// errno a denied connect() fails with (positive, e.g. 1 for EPERM).
    pub deny_errno: u64,
    /// Charges that no enforce-mode cap bounds (no cap, a monitor-mode cap, only a rate)
    /// may take at most this many `RL_SOCK_OWNER` entries; the rest of the map is kept for
    /// capped UIDs. Past it a connect() is not charged, but still meets the host cap and
    /// the rates.
    pub uncapped_socket_budget: u64,
    /// UIDs without a cap may create at most this many `RL_UID_CONNS` entries.
    pub uncapped_uid_budget: u64,
    /// Seeded connections the agent found closed without a release (written by the agent
    /// only; the programs subtract it from `HostConns::seeded`).
    pub seeded_gone: u64,
    /// The `user:*` policy: applies to UIDs at or above `default_uid_min` that have no
    /// policy of their own in `RL_UID_CAPS`.
    pub default_policy: Policy,
    /// Denial events per UID: one every `event_interval_ns` (0: no limit), at most
    /// `event_window_ns / event_interval_ns` at once; denials beyond that are counted in
    /// [`Conns::events_dropped`].
    pub event_interval_ns: u64,
    pub event_window_ns: u64,
    /// Bit L set: some group's cgroup sits at level L of the cgroup2 hierarchy.
    pub group_levels: u64,
    /// Seeded charges no cap bounds that the agent found closed without a release
    /// (written by the agent only; the programs subtract it from
    /// `HostConns::uncapped_sockets`).
    pub uncapped_sockets_gone: u64,
    /// Counters of UIDs without a limit ([`CONNS_UNLIMITED`]) the agent has removed
    /// (written by the agent only; the programs subtract it from `HostConns::uncapped_uids`).
    pub uncapped_uids_gone: u64,
    /// The lowest and highest subordinate UID (`RL_SUBUID` holds their owners): a UID
    /// outside them needs no lookup. None when `subuid_first > subuid_last`.
    pub subuid_first: u64,
    pub subuid_last: u64,
}

/// Connection limits of one UID (`RL_UID_CAPS`) or one group (`RL_GROUP_POLICY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Live connections allowed; [`UNLIMITED`] for no cap.
    pub cap: u64,
    /// The token bucket: one new connection every `rate_interval_ns` (0: no rate limit),
    /// at most `burst` at once; `rate_window_ns` is `burst * rate_interval_ns` (saturating),
    /// computed by the agent because BPF has no overflow-checked multiply.
    pub rate_interval_ns: u64,
    pub rate_window_ns: u64,
    pub burst: u64,
    /// `POLICY_*` bits.
    pub flags: u64,
}

impl Policy {
    /// No cap, no rate, enforcing.
    pub const NONE: Self = Self {
        cap: UNLIMITED,
        rate_interval_ns: 0,
        rate_window_ns: 0,
        burst: 0,
        flags: 0,
    };

    /// True when the policy limits anything.
    pub fn limits(&self) -> bool {
        self.cap != UNLIMITED || self.rate_interval_ns != 0
    }

    /// True when an enforce-mode cap bounds the connections this policy charges.
    pub fn bounds(&self) -> bool {
        self.cap != UNLIMITED && self.flags & POLICY_MONITOR == 0
    }
}

/// Connection counters of one UID (`RL_UID_CONNS`, key: UID as `u32`) or one group
/// (`RL_GROUP_CONNS`, key: the group's cgroup id). Updated by the programs with atomic
/// operations; the agent creates fresh entries ([`Conns::new`]) and otherwise only reads
/// them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conns {
    /// In the high 32 bits the sockets charged and not yet released (or [`RETIRED`]), in
    /// the low 32 the owner's tag: the UID for per-UID counters, 0 for a group's. Read it
    /// without the tag; see [`LIVE_COUNT_SHIFT`] for why the tag is there.
    pub live: u64,
    /// connect() calls admitted and charged, and reconnects of a charged socket admitted
    /// (a counter).
    pub admitted: u64,
    /// The token bucket's theoretical arrival time (GCRA): the bucket is full when this is
    /// at or before now, and each admitted connect() moves it one interval later. Changed
    /// only by compare-and-swap.
    pub rate_tat: u64,
    /// The same for denial events of a UID (unused for groups).
    pub event_tat: u64,
    /// Denials and would-denies whose event was not sent: over the per-UID event rate, or
    /// the ring buffer was full.
    pub events_dropped: u64,
    /// connect() calls denied, by `reason::*`.
    pub denied: [u64; reason::COUNT],
    /// connect() calls a monitor-mode limit would have denied, by `reason::*`.
    pub would_deny: [u64; reason::COUNT],
    /// `CONNS_*` bits, set when the entry is made.
    pub flags: u64,
}

/// In [`Conns::flags`]: the programs made these counters for a UID without a limit, and
/// counted them in `HostConns::uncapped_uids`.
pub const CONNS_UNLIMITED: u64 = 1 << 0;

/// Where the count sits in [`Conns::live`]: the high 32 bits, above the owner's tag.
///
/// The kernel reuses a deleted hash-map element's memory for the next insert at once
/// (since Linux 6.1 hash maps, preallocated or not, do not wait for an RCU grace period),
/// so a connect() that looked up a UID's counters just before the retiring program
/// deleted them may hold a pointer to memory that has become another UID's counters. It
/// charges them only when the word its atomic add displaced names its own UID and a live
/// count: add and check are one operation, so a charge never stays on another owner's
/// counters. The tag is in the low bytes and [`RETIRED`] in the highest, so a copy of a
/// new value into reused memory that writes the word whole, or from its low bytes up,
/// never shows the old owner's tag with a live count half-way (one that wrote the high
/// bytes first could: docs/architecture.md). A count taken below zero wraps within the
/// count and leaves the tag as it was. (Per-group counters are removed by the agent
/// alone, two writes after their policy went, long after any program that found the
/// policy has finished: their tag is 0.)
pub const LIVE_COUNT_SHIFT: u32 = 32;
/// One charge in [`Conns::live`].
pub const LIVE_ONE: u64 = 1 << LIVE_COUNT_SHIFT;
/// The count of counters being retired. The retiring program swaps it from 0 to this
/// (compare-and-swap on the whole word, so with the owner's tag) and then deletes the
/// entry; a connect() that finds it charges nothing there and looks the counters up
/// again. Counts stay far below it: at most `max_tracked_sockets` (2^24) sockets are
/// charged at once.
pub const RETIRED: u64 = 1 << 31;

impl Conns {
    /// Fresh counters of the owner with `tag`, with `CONNS_*` `flags`.
    pub const fn new(tag: u32, flags: u64) -> Self {
        Self {
            live: Self::live_word(tag, 0),
            admitted: 0,
            rate_tat: 0,
            event_tat: 0,
            events_dropped: 0,
            denied: [0; reason::COUNT],
            would_deny: [0; reason::COUNT],
            flags,
        }
    }

    /// The [`Conns::live`] word of the owner with `tag` holding `count`.
    pub const fn live_word(tag: u32, count: u64) -> u64 {
        count << LIVE_COUNT_SHIFT | tag as u64
    }

    /// True when the `live` word `word` belongs to the owner with `tag` and holds a count
    /// (not [`RETIRED`]): counters a connect() may charge.
    pub const fn owned(word: u64, tag: u32) -> bool {
        word as u32 == tag && Self::counting(word)
    }

    /// True when the `live` word `word` holds a count (of whichever owner).
    pub const fn counting(word: u64) -> bool {
        word >> LIVE_COUNT_SHIFT < RETIRED
    }

    /// True when the `live` word `word` belongs to the owner with `tag` and is
    /// [`RETIRED`] (adds a connect() left on it included): counters the retiring program
    /// deletes.
    pub const fn retiring(word: u64, tag: u32) -> bool {
        word as u32 == tag && !Self::counting(word)
    }
}

/// A charged socket's record in `RL_SOCK_OWNER` (key: socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOwner {
    /// The UID (low 32 bits) with `OWNER_*` bits.
    pub owner: u64,
    /// The group charged too (its cgroup id), 0 for none: the release goes to the group
    /// charged, wherever the process is by then.
    pub group: u64,
}

/// One denial (or would-deny) as the programs report it on the `RL_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// The group's cgroup id (0: none).
    pub group: u64,
    /// The limit in force: the cap, or for a rate the burst.
    pub limit: u64,
    pub uid: u32,
    /// The calling process (thread group id).
    pub pid: u32,
    /// errno the connect() failed with (0 for a would-deny).
    pub errno: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// `reason::*`.
    pub reason: u32,
    /// 1: monitor mode (would deny), 0: denied.
    pub monitor: u32,
    pub comm: [u8; 16],
    /// The address as the socket address holds it: IPv4 in the first word, or IPv6 in
    /// four, each word in network byte order.
    pub addr: [u32; 4],
}

/// Host-wide counters, the single element of `RL_HOST_CONNS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostConns {
    /// All charged, unreleased sockets.
    pub live: u64,
    /// connect() calls let through uncharged: past the budget of charges no cap bounds,
    /// or a capped UID's when a map was full and `on_full = "allow"`.
    pub untracked: u64,
    /// connect() calls of capped UIDs denied because a map was full (`on_full = "deny"`).
    pub denied_full: u64,
    /// Charged sockets that no enforce-mode cap bounds (`RL_SOCK_OWNER` entries within
    /// their budget).
    pub uncapped_sockets: u64,
    /// `RL_UID_CONNS` entries created by the programs for UIDs without a cap.
    pub uncapped_uids: u64,
    /// Connections found open at the agent's first start and not yet released (set by the
    /// agent before any program runs, then only decremented by the programs).
    pub seeded: u64,
    /// Events not sent because the ring buffer was full (also counted per UID).
    pub events_lost: u64,
    /// Map inserts and deletes the kernel refused to a program even when tried again (a
    /// hash map's bucket lock can give up, since Linux 6.15). The charge concerned is still
    /// released, but a socket record or retiring counters may stay behind.
    pub map_errors: u64,
}

// The layout of every struct above that a map holds (or the ring buffer carries), checked
// when this crate compiles, for the kernel side and userspace alike: a size that changes
// means a layout that changed, and pinned maps of the old layout must not be read with it.
const _: () = assert!(
    core::mem::size_of::<Settings>() == 152,
    "Settings changed size: bump MAPS_LAYOUT_VERSION (common/src/lib.rs), then update this size"
);
const _: () = assert!(
    core::mem::size_of::<Policy>() == 40,
    "Policy changed size: bump MAPS_LAYOUT_VERSION (common/src/lib.rs), then update this size"
);
const _: () = assert!(
    core::mem::size_of::<Conns>() == 144,
    "Conns changed size: bump MAPS_LAYOUT_VERSION (common/src/lib.rs), then update this size"
);
const _: () = assert!(
    core::mem::size_of::<SockOwner>() == 16,
    "SockOwner changed size: bump MAPS_LAYOUT_VERSION (common/src/lib.rs), then update this size"
);
const _: () = assert!(
    core::mem::size_of::<DenyEvent>() == 80,
    "DenyEvent changed size: bump MAPS_LAYOUT_VERSION (common/src/lib.rs), then update this size"
);
const _: () = assert!(
    core::mem::size_of::<HostConns>() == 64,
    "HostConns changed size: bump MAPS_LAYOUT_VERSION (common/src/lib.rs), then update this size"
);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], u64 fields and a Policy (u64 fields): no padding, any bit
    // pattern valid.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: #[repr(C)], u64 fields only: no padding, any bit pattern valid.
    unsafe impl aya::Pod for super::Policy {}
    // SAFETY: #[repr(C)], u64 fields and arrays of u64: no padding, any bit pattern valid.
    unsafe impl aya::Pod for super::Conns {}
    // SAFETY: #[repr(C)], u64 fields only: no padding, any bit pattern valid.
    unsafe impl aya::Pod for super::SockOwner {}
    // SAFETY: #[repr(C)], u64 fields only: no padding, any bit pattern valid.
    unsafe impl aya::Pod for super::HostConns {}
    // SAFETY: #[repr(C)], fields laid out without padding (8-byte fields first, then
    // 4-byte, 2-byte pairs, byte arrays), any bit pattern valid.
    unsafe impl aya::Pod for super::DenyEvent {}
}
