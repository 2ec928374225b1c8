//! The kernel programs and their maps (built for `bpfel-unknown-none` only).
//!
//! Each charged socket has an entry in `RL_SOCK_OWNER` (socket cookie -> UID). Inserting it
//! with BPF_NOEXIST is the claim: exactly one connect() on a socket wins it, however often
//! or concurrently connect() is called on that socket. Deleting it at release is the
//! uncharge, and only the caller whose delete succeeds uncharges, so two generations of
//! programs attached side by side (during an agent restart) still count each socket once.
//! (Socket-local storage was measured first: creating it costs ~700 ns per connect().)
//! Charges are released at sock_release; an MPTCP connection's charge (taken on its first
//! subflow, a kernel socket that never passes sock_release) at its MPTCP socket's.

use core::intrinsics;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::{Array, HashMap, SkStorage},
    helpers::{
        bpf_get_current_uid_gid,
        generated::{
            bpf_get_socket_cookie, bpf_set_retval, bpf_sk_storage_get, bpf_skc_to_mptcp_sock,
        },
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use rlagent_common::{
    HostConns, Settings, UidConns, DEFAULT_MAX_TRACKED_SOCKETS, FLAG_COUNT_UDP, FLAG_ENFORCE,
    FLAG_ON_FULL_ALLOW, FLAG_SEEDED, MAX_UID_CAPS, MAX_UID_CONNS, OWNER_SEEDED, OWNER_UNCAPPED,
    UNLIMITED,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const EPERM: u64 = 1;
const EEXIST: i32 = -17;
const IPPROTO_MPTCP: u32 = 262;

/// This program set's generation, written by the loader. Of two generations attached side
/// by side (an agent restart attaches the new programs before it detaches the old), only
/// the one named in `RL_GENERATION` charges and denies; the other lets every connect()
/// through to it, so each denial is counted once.
#[unsafe(no_mangle)]
static RL_PROGRAM_GENERATION: u64 = 0;

#[btf_map]
static RL_SETTINGS: Array<Settings, 1> = Array::new();

/// The generation that enforces (see `RL_PROGRAM_GENERATION`).
#[btf_map]
static RL_GENERATION: Array<u64, 1> = Array::new();

#[btf_map]
static RL_UID_CAPS: HashMap<u32, u64, { MAX_UID_CAPS as usize }> = HashMap::new();

/// A per-UID map, allocated on demand: large, so that a tenant with a range of
/// subordinate UIDs cannot fill it, while unused capacity costs nothing.
type PerUid<V> = HashMap<u32, V, { MAX_UID_CONNS as usize }, { BPF_F_NO_PREALLOC as usize }>;

#[btf_map]
static RL_UID_CONNS: PerUid<UidConns> = HashMap::new();

#[btf_map]
static RL_HOST_CONNS: Array<HostConns, 1> = Array::new();

/// Connections each UID held when the agent first started and still holds. The agent
/// writes it before any program runs; after that only the programs decrement it.
#[btf_map]
static RL_UID_SEEDED: PerUid<u64> = HashMap::new();

/// Of those, how many the agent found closed without a release (written by the agent
/// only, so no write of it races a program's).
#[btf_map]
static RL_UID_SEEDED_GONE: PerUid<u64> = HashMap::new();

/// Socket cookie -> charged UID (low 32 bits) and `OWNER_UNCAPPED`.
#[btf_map]
static RL_SOCK_OWNER: HashMap<u64, u64, { DEFAULT_MAX_TRACKED_SOCKETS as usize }> = HashMap::new();

/// On an MPTCP socket: the cookie of the subflow its connect() charged (0: none yet).
///
/// connect() on an MPTCP socket runs the connect hooks for its first subflow, a kernel
/// socket, and cgroup/sock_release never runs for kernel sockets: a charge kept on the
/// subflow would never be released. So the subflow is charged, its cookie is kept here on
/// the MPTCP socket (a user socket), and the MPTCP socket's sock_release releases it.
/// Further subflows of the same connection are not charged again: one MPTCP connection
/// is one connection, however many paths it uses. (A tracing program on the socket
/// destructor would catch every kernel socket, but loading tracing programs is refused
/// with EPERM on hosts like ours, and it would run for every socket on the host.)
#[btf_map]
static RL_MPTCP: SkStorage<u64> = SkStorage::new();

#[cgroup_sock_addr(connect4)]
pub fn rl_connect4(ctx: SockAddrContext) -> i32 {
    match try_charge(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn rl_connect6(ctx: SockAddrContext) -> i32 {
    match try_charge(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock(sock_release)]
pub fn rl_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the helper accepts the sock context.
    release(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) });
    // An MPTCP socket: release the charge of its subflow (see RL_MPTCP). Only MPTCP
    // sockets have storage there; the protocol check spares every other socket the lookup.
    // SAFETY: the context's socket is valid for the program's run.
    if unsafe { (*ctx.sock).protocol } != IPPROTO_MPTCP {
        return ALLOW;
    }
    // SAFETY: the helper accepts the context's socket; the value pointer is checked.
    let subflow = unsafe {
        bpf_sk_storage_get(
            map_ptr(&RL_MPTCP),
            ctx.sock.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<u64>();
    if !subflow.is_null() {
        // SAFETY: non-null storage of this socket.
        let cookie = unsafe { *subflow };
        if cookie != 0 {
            release(cookie);
        }
    }
    ALLOW
}

/// A map as the helpers take it (what aya-ebpf's own wrappers pass; they cover
/// sk_storage only for the sock_addr context's socket).
#[inline(always)]
fn map_ptr<T>(map: &T) -> *mut core::ffi::c_void {
    core::ptr::from_ref(map).cast_mut().cast()
}

#[inline(always)]
fn fetch_add(counter: *mut u64, n: u64) -> u64 {
    // SAFETY: `counter` points into a map value the verifier has bounds-checked.
    unsafe {
        intrinsics::atomic_xadd::<u64, u64, { intrinsics::AtomicOrdering::SeqCst }>(counter, n)
    }
}

#[inline(always)]
fn fetch_sub(counter: *mut u64, n: u64) -> u64 {
    // SAFETY: as for `fetch_add`.
    unsafe {
        intrinsics::atomic_xsub::<u64, u64, { intrinsics::AtomicOrdering::SeqCst }>(counter, n)
    }
}

#[inline(always)]
fn read(counter: *const u64) -> u64 {
    // SAFETY: as for `fetch_add`; a plain load of a value others update atomically.
    unsafe { core::ptr::read_volatile(counter) }
}

#[inline(always)]
fn try_charge(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: a global the loader writes before the program is loaded.
    let generation = unsafe { core::ptr::read_volatile(&RL_PROGRAM_GENERATION) };
    if RL_GENERATION.get(0).copied() != Some(generation) {
        return Ok(ALLOW);
    }
    let Some(settings) = RL_SETTINGS.get(0) else {
        return Ok(ALLOW);
    };
    if settings.flags & FLAG_ENFORCE == 0 {
        return Ok(ALLOW);
    }
    // SAFETY: the context pointer is valid for the program's run.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    let counted = sock_type == SOCK_STREAM
        || (sock_type == SOCK_DGRAM && settings.flags & FLAG_COUNT_UDP != 0);
    if !counted {
        return Ok(ALLOW);
    }
    let Some(host) = RL_HOST_CONNS.get_ptr_mut(0) else {
        return Ok(ALLOW);
    };
    let uid = bpf_get_current_uid_gid() as u32;
    let cap = cap_for(uid, settings);
    // Sockets of UIDs without a cap are counted (for stats and the host cap) only within
    // their budget, so they can never take the capacity capped UIDs need.
    let uncapped = cap == UNLIMITED;
    // SAFETY: `host` points at the array's single element.
    let untracked = unsafe { &raw mut (*host).untracked };
    if uncapped
        && read(unsafe { &raw const (*host).uncapped_sockets }) >= settings.uncapped_socket_budget
    {
        fetch_add(untracked, 1);
        return Ok(ALLOW);
    }
    // SAFETY: the helper accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let owner = u64::from(uid) | if uncapped { OWNER_UNCAPPED } else { 0 };

    // An MPTCP subflow: its MPTCP socket keeps the charge (see RL_MPTCP).
    // SAFETY: the context's socket is valid for the program's run; the helper returns the
    // subflow's MPTCP socket, or null for any other socket.
    let mptcp = unsafe { bpf_skc_to_mptcp_sock((*ctx.sock_addr).__bindgen_anon_1.sk.cast()) };
    let mut keeper: *mut u64 = core::ptr::null_mut();
    if !mptcp.is_null() {
        // SAFETY: `mptcp` is a non-null BTF pointer to a socket.
        keeper = unsafe {
            bpf_sk_storage_get(
                map_ptr(&RL_MPTCP),
                mptcp.cast(),
                core::ptr::null_mut(),
                u64::from(BPF_SK_STORAGE_GET_F_CREATE),
            )
        }
        .cast::<u64>();
        if keeper.is_null() {
            return full(settings, host, uncapped);
        }
        // SAFETY: non-null storage of the MPTCP socket.
        if unsafe { *keeper } != 0 {
            // A further subflow of a connection already counted.
            return Ok(ALLOW);
        }
    }

    // The claim. EEXIST: this socket is already charged (a repeated connect()).
    match RL_SOCK_OWNER.insert(&cookie, &owner, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(err) if err == EEXIST => return Ok(ALLOW),
        Err(_) => return full(settings, host, uncapped),
    }
    let Some(conns) = uid_conns(uid, uncapped, settings, host) else {
        let _ = RL_SOCK_OWNER.remove(&cookie);
        return full(settings, host, uncapped);
    };
    // SAFETY: `conns` points at this UID's counters in RL_UID_CONNS, `host` at the array
    // element; nothing deletes UID entries while programs run.
    unsafe {
        let live = &raw mut (*conns).live;
        let (seeded, host_seeded) = if settings.flags & FLAG_SEEDED != 0 {
            seeded_for(uid, settings, host)
        } else {
            (0, 0)
        };
        // Add first, then compare the value displaced: racing connect() calls each see a
        // distinct old value, so no more than `cap` can be admitted.
        if fetch_add(live, 1).saturating_add(seeded) >= cap {
            fetch_sub(live, 1);
            fetch_add(&raw mut (*conns).denied_cap, 1);
            let _ = RL_SOCK_OWNER.remove(&cookie);
            return Err(deny(settings));
        }
        let host_live = &raw mut (*host).live;
        if fetch_add(host_live, 1).saturating_add(host_seeded) >= settings.host_cap && uid != 0 {
            fetch_sub(host_live, 1);
            fetch_sub(live, 1);
            fetch_add(&raw mut (*conns).denied_host, 1);
            let _ = RL_SOCK_OWNER.remove(&cookie);
            return Err(deny(settings));
        }
        fetch_add(&raw mut (*conns).admitted, 1);
        if uncapped {
            fetch_add(&raw mut (*host).uncapped_sockets, 1);
        }
        if !keeper.is_null() {
            *keeper = cookie;
        }
    }
    Ok(ALLOW)
}

/// A map had no room: an uncapped UID goes through uncounted; a capped one as `on_full`
/// says (deny by default), so a cap never silently stops holding.
#[inline(always)]
fn full(settings: &Settings, host: *mut HostConns, uncapped: bool) -> Result<i32, i32> {
    if uncapped || settings.flags & FLAG_ON_FULL_ALLOW != 0 {
        // SAFETY: `host` points at the array's single element.
        fetch_add(unsafe { &raw mut (*host).untracked }, 1);
        return Ok(ALLOW);
    }
    // SAFETY: as above.
    fetch_add(unsafe { &raw mut (*host).denied_full }, 1);
    Err(deny(settings))
}

/// Connections of `uid`, and of the host, found open at the agent's first start and still
/// open.
#[inline(always)]
fn seeded_for(uid: u32, settings: &Settings, host: *mut HostConns) -> (u64, u64) {
    // SAFETY: lookups return pointers valid for this program run; plain loads of values
    // others update atomically.
    let seeded = unsafe { RL_UID_SEEDED.get(&uid).copied().unwrap_or(0) };
    let gone = unsafe { RL_UID_SEEDED_GONE.get(&uid).copied().unwrap_or(0) };
    let host_seeded = read(unsafe { &raw const (*host).seeded });
    (
        seeded.saturating_sub(gone),
        host_seeded.saturating_sub(settings.seeded_gone),
    )
}

#[inline(always)]
fn cap_for(uid: u32, settings: &Settings) -> u64 {
    // SAFETY: hash map lookups return a pointer valid for this program run.
    if let Some(cap) = unsafe { RL_UID_CAPS.get(&uid) } {
        return *cap;
    }
    if u64::from(uid) >= settings.default_uid_min {
        settings.default_cap
    } else {
        UNLIMITED
    }
}

#[inline(always)]
fn uid_conns(
    uid: u32,
    uncapped: bool,
    settings: &Settings,
    host: *mut HostConns,
) -> Option<*mut UidConns> {
    if let Some(conns) = RL_UID_CONNS.get_ptr_mut(&uid) {
        return Some(conns);
    }
    // SAFETY: `host` points at the array's single element.
    let uncapped_uids = unsafe { &raw mut (*host).uncapped_uids };
    if uncapped && read(uncapped_uids) >= settings.uncapped_uid_budget {
        return None;
    }
    // First connection of this UID: create its zeroed counters. BPF_NOEXIST keeps a
    // racing creator's entry; either way the lookup below finds the one entry, and only
    // the creator counts it.
    if RL_UID_CONNS
        .insert(&uid, &UidConns::default(), u64::from(BPF_NOEXIST))
        .is_ok()
        && uncapped
    {
        fetch_add(uncapped_uids, 1);
    }
    RL_UID_CONNS.get_ptr_mut(&uid)
}

#[inline(always)]
fn deny(settings: &Settings) -> i32 {
    if settings.deny_errno != EPERM && settings.deny_errno < 4096 {
        // SAFETY: bpf_set_retval is available to cgroup programs (Linux >= 5.18).
        unsafe { bpf_set_retval(-(settings.deny_errno as i32)) };
    }
    DENY
}

/// Releases the charge of the socket with `cookie`, if it has one. Only the caller whose
/// delete succeeds uncharges: two program generations may run side by side.
#[inline(always)]
fn release(cookie: u64) {
    // SAFETY: the value is copied out before the entry is deleted.
    let Some(owner) = (unsafe { RL_SOCK_OWNER.get(&cookie) }).copied() else {
        return;
    };
    if RL_SOCK_OWNER.remove(&cookie).is_err() {
        return;
    }
    let uid = owner as u32;
    let seeded = owner & OWNER_SEEDED != 0;
    if seeded {
        if let Some(count) = RL_UID_SEEDED.get_ptr_mut(&uid) {
            // SAFETY: pointer from a successful lookup.
            fetch_sub(count, 1);
        }
    } else if let Some(conns) = RL_UID_CONNS.get_ptr_mut(&uid) {
        // SAFETY: pointer from a successful lookup.
        fetch_sub(unsafe { &raw mut (*conns).live }, 1);
    }
    if let Some(host) = RL_HOST_CONNS.get_ptr_mut(0) {
        // SAFETY: as above.
        unsafe {
            if seeded {
                fetch_sub(&raw mut (*host).seeded, 1);
            } else {
                fetch_sub(&raw mut (*host).live, 1);
            }
            if owner & OWNER_UNCAPPED != 0 {
                fetch_sub(&raw mut (*host).uncapped_sockets, 1);
            }
        }
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
