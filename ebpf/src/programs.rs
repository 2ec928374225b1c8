//! The kernel programs and their maps (built for `bpfel-unknown-none` only).
//!
//! Each charged socket has an entry in `RL_SOCK_OWNER` (socket cookie -> UID). Inserting it
//! with BPF_NOEXIST is the claim: exactly one connect() on a socket wins it, however often
//! or concurrently connect() is called on that socket. Deleting it at release is the
//! uncharge, and only the caller whose delete succeeds uncharges, so two generations of
//! programs attached side by side (during an agent restart) still count each socket once.
//! (Socket-local storage was measured first: creating it costs ~700 ns per connect().)

use core::intrinsics;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{Array, HashMap},
    helpers::{
        bpf_get_current_uid_gid,
        generated::{bpf_get_socket_cookie, bpf_set_retval},
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use rlagent_common::{
    HostConns, Settings, UidConns, DEFAULT_MAX_TRACKED_SOCKETS, FLAG_COUNT_UDP, FLAG_ENFORCE,
    MAX_UID_CAPS, MAX_UID_CONNS, UNLIMITED,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const EPERM: u64 = 1;

#[btf_map]
static RL_SETTINGS: Array<Settings, 1> = Array::new();

#[btf_map]
static RL_UID_CAPS: HashMap<u32, u64, { MAX_UID_CAPS as usize }> = HashMap::new();

#[btf_map]
static RL_UID_CONNS: HashMap<u32, UidConns, { MAX_UID_CONNS as usize }> = HashMap::new();

#[btf_map]
static RL_HOST_CONNS: Array<HostConns, 1> = Array::new();

/// Socket cookie -> charged UID.
#[btf_map]
static RL_SOCK_OWNER: HashMap<u64, u64, { DEFAULT_MAX_TRACKED_SOCKETS as usize }> = HashMap::new();

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
    uncharge(&ctx);
    ALLOW
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
fn try_charge(ctx: &SockAddrContext) -> Result<i32, i32> {
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
    // SAFETY: the helper accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };

    // The claim. EEXIST: this socket is already charged (a repeated connect()).
    // Anything else: the map is full, let the socket through uncounted.
    match RL_SOCK_OWNER.insert(&cookie, &u64::from(uid), u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(err) if err == -17 => return Ok(ALLOW),
        Err(_) => {
            // SAFETY: `host` points at the array's single element.
            fetch_add(unsafe { &raw mut (*host).untracked }, 1);
            return Ok(ALLOW);
        }
    }
    let Some(conns) = uid_conns(uid) else {
        let _ = RL_SOCK_OWNER.remove(&cookie);
        // SAFETY: as above.
        fetch_add(unsafe { &raw mut (*host).untracked }, 1);
        return Ok(ALLOW);
    };
    let cap = cap_for(uid, settings);
    // SAFETY: `conns` points at this UID's counters in RL_UID_CONNS, `host` at the array
    // element; the kernel side never deletes UID entries.
    unsafe {
        let live = &raw mut (*conns).live;
        // Add first, then compare the value displaced: racing connect() calls each see a
        // distinct old value, so no more than `cap` can be admitted.
        if fetch_add(live, 1) >= cap {
            fetch_sub(live, 1);
            fetch_add(&raw mut (*conns).denied_cap, 1);
            let _ = RL_SOCK_OWNER.remove(&cookie);
            return Err(deny(settings));
        }
        let host_live = &raw mut (*host).live;
        if fetch_add(host_live, 1) >= settings.host_cap && uid != 0 {
            fetch_sub(host_live, 1);
            fetch_sub(live, 1);
            fetch_add(&raw mut (*conns).denied_host, 1);
            let _ = RL_SOCK_OWNER.remove(&cookie);
            return Err(deny(settings));
        }
        fetch_add(&raw mut (*conns).admitted, 1);
    }
    Ok(ALLOW)
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
fn uid_conns(uid: u32) -> Option<*mut UidConns> {
    if let Some(conns) = RL_UID_CONNS.get_ptr_mut(&uid) {
        return Some(conns);
    }
    // First connection of this UID: create its zeroed counters. BPF_NOEXIST keeps a
    // racing creator's entry; either way the lookup below finds the one entry.
    let _ = RL_UID_CONNS.insert(&uid, &UidConns::default(), u64::from(BPF_NOEXIST));
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

#[inline(always)]
fn uncharge(ctx: &SockContext) {
    // SAFETY: the helper accepts the sock context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is deleted.
    let Some(uid) = (unsafe { RL_SOCK_OWNER.get(&cookie) }).copied() else {
        return;
    };
    // Only the program whose delete succeeds uncharges (two program generations may run).
    if RL_SOCK_OWNER.remove(&cookie).is_err() {
        return;
    }
    let uid = uid as u32;
    if let Some(conns) = RL_UID_CONNS.get_ptr_mut(&uid) {
        // SAFETY: pointer from a successful lookup.
        fetch_sub(unsafe { &raw mut (*conns).live }, 1);
    }
    if let Some(host) = RL_HOST_CONNS.get_ptr_mut(0) {
        // SAFETY: as above.
        fetch_sub(unsafe { &raw mut (*host).live }, 1);
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
