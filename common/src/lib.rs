//! Types shared by the rlagent eBPF programs (`ebpf/`) and the agent (`agent/`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side reads and updates these
//! structs in BPF maps, userspace reads them through aya. Layout changes must bump
//! [`MAPS_LAYOUT_VERSION`], because maps are pinned and outlive the agent that made them.
#![no_std]

/// Version of the map layout below. Pinned maps live in a directory named after it, so an
/// agent with a different layout never reinterprets another layout's bytes.
pub const MAPS_LAYOUT_VERSION: u32 = 2;

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

/// Set in an `RL_SOCK_OWNER` value (above the UID in the low 32 bits) when the socket's
/// UID had no cap when it was charged: it counts against the uncapped budget.
pub const OWNER_UNCAPPED: u64 = 1 << 32;
/// Set in an `RL_SOCK_OWNER` value for a connection the agent found open at its first
/// start: its release decrements `RL_UID_SEEDED` and `HostConns::seeded` instead of `live`.
pub const OWNER_SEEDED: u64 = 1 << 33;

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

    pub const PROG_CONNECT4: &str = "rl_connect4";
    pub const PROG_CONNECT6: &str = "rl_connect6";
    pub const PROG_SOCK_RELEASE: &str = "rl_sock_release";

    /// The programs' global holding their generation (set at load time).
    pub const GLOBAL_GENERATION: &str = "RL_PROGRAM_GENERATION";
}

/// Maximum number of UIDs that can hold their own cap.
pub const MAX_UID_CAPS: u32 = 65_536;
/// Maximum number of UIDs with counters. Entries are never removed by the programs (see
/// the README's "Connection accounting, precisely"); half of them are reserved for UIDs
/// that have a cap.
pub const MAX_UID_CONNS: u32 = 262_144;
/// Default size of `RL_SOCK_OWNER` (socket cookie -> charged UID): how many charged sockets
/// can be live at once before new ones are let through uncounted. Preallocated, about
/// 64 bytes an entry. `[bpf] max_tracked_sockets` overrides it.
pub const DEFAULT_MAX_TRACKED_SOCKETS: u32 = 131_072;

/// Host-wide settings, the single element of the `RL_SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Cap for UIDs at or above `default_uid_min` that have no cap of their own
    /// (`user:*`); [`UNLIMITED`] for none.
    pub default_cap: u64,
    /// UIDs below this get no default cap (system users), like `UID_MIN` in login.defs.
    pub default_uid_min: u64,
    /// Cap on live connections of all UIDs together; [`UNLIMITED`] for none. UID 0 is
    /// counted but never denied by it, so the host stays administrable.
    pub host_cap: u64,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// errno a denied connect() fails with (positive, e.g. 1 for EPERM).
    pub deny_errno: u64,
    /// Charged sockets of UIDs without a cap may take at most this many `RL_SOCK_OWNER`
    /// entries; the rest of the map is kept for capped UIDs.
    pub uncapped_socket_budget: u64,
    /// UIDs without a cap may create at most this many `RL_UID_CONNS` entries.
    pub uncapped_uid_budget: u64,
    /// Seeded connections the agent found closed without a release (written by the agent
    /// only; the programs subtract it from `HostConns::seeded`).
    pub seeded_gone: u64,
}

/// Per-UID connection counters, values of `RL_UID_CONNS` (key: UID as `u32`).
/// Updated by the kernel with atomic adds; userspace only reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UidConns {
    /// Sockets of this UID that are charged and not yet released.
    pub live: u64,
    /// connect() calls admitted and charged (a counter).
    pub admitted: u64,
    /// connect() calls denied by this UID's own or default cap.
    pub denied_cap: u64,
    /// connect() calls denied by the host-wide cap.
    pub denied_host: u64,
}

/// Host-wide counters, the single element of `RL_HOST_CONNS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostConns {
    /// All charged, unreleased sockets.
    pub live: u64,
    /// connect() calls let through uncounted: an uncapped UID over its budget, or a
    /// capped one when a map was full and `on_full = "allow"`.
    pub untracked: u64,
    /// connect() calls of capped UIDs denied because a map was full (`on_full = "deny"`).
    pub denied_full: u64,
    /// Charged sockets of uncapped UIDs (`RL_SOCK_OWNER` entries within their budget).
    pub uncapped_sockets: u64,
    /// `RL_UID_CONNS` entries created by the programs for UIDs without a cap.
    pub uncapped_uids: u64,
    /// Connections found open at the agent's first start and not yet released (set by the
    /// agent before any program runs, then only decremented by the programs).
    pub seeded: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are #[repr(C)] structs of u64 fields: no padding, any bit pattern valid.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::UidConns {}
    unsafe impl aya::Pod for super::HostConns {}
}
