//! The kernel programs and their maps (built for `bpfel-unknown-none` only).

use core::{ffi::c_void, intrinsics, ptr};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{Array, HashMap, SkStorage},
    helpers::{
        bpf_get_current_uid_gid,
        generated::{bpf_set_retval, bpf_sk_storage_get},
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use rlagent_common::{
    HostConns, Settings, SockCharge, UidConns, FLAG_COUNT_UDP, FLAG_ENFORCE, MAX_UID_CAPS,
    MAX_UID_CONNS, UNLIMITED,
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

#[btf_map]
static RL_SOCK_CHARGE: SkStorage<SockCharge> = SkStorage::new();

#[cgroup_sock_addr(connect4)]
pub fn rl_connect4(ctx: SockAddrContext) -> i32 {
    charge_or_deny(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn rl_connect6(ctx: SockAddrContext) -> i32 {
    charge_or_deny(&ctx)
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
fn charge_or_deny(ctx: &SockAddrContext) -> i32 {
    match try_charge(ctx) {
        Ok(verdict) | Err(verdict) => verdict,
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

    // Claim the socket. A socket whose claim is already taken has been (or is being)
    // charged: a repeated connect() is not a new connection.
    let charge = sock_charge(ctx);
    if charge.is_null() {
        // SAFETY: `host` points into the array's single element.
        fetch_add(unsafe { ptr::addr_of_mut!((*host).untracked) }, 1);
        return Ok(ALLOW);
    }
    // SAFETY: non-null pointers from bpf_sk_storage_get point at the socket's SockCharge.
    let claimed = unsafe { ptr::addr_of_mut!((*charge).claimed) };
    if fetch_add(claimed, 1) != 0 {
        fetch_sub(claimed, 1);
        return Ok(ALLOW);
    }

    let uid = bpf_get_current_uid_gid() as u32;
    let cap = cap_for(uid, settings);
    let Some(conns) = uid_conns(uid) else {
        fetch_sub(claimed, 1);
        // SAFETY: as above.
        fetch_add(unsafe { ptr::addr_of_mut!((*host).untracked) }, 1);
        return Ok(ALLOW);
    };
    // SAFETY: `conns` points at this UID's counters in RL_UID_CONNS, `host` at the array
    // element; both stay valid for the program's run (entries are never deleted by the
    // kernel side, and userspace deletes only entries with no live sockets).
    unsafe {
        let live = ptr::addr_of_mut!((*conns).live);
        // Add first, then compare the value we displaced: racing connect() calls each
        // see a distinct old value, so no more than `cap` can be admitted.
        if fetch_add(live, 1) >= cap {
            fetch_sub(live, 1);
            fetch_add(ptr::addr_of_mut!((*conns).denied_cap), 1);
            fetch_sub(claimed, 1);
            return Err(deny(settings));
        }
        let host_live = ptr::addr_of_mut!((*host).live);
        if fetch_add(host_live, 1) >= settings.host_cap && uid != 0 {
            fetch_sub(host_live, 1);
            fetch_sub(live, 1);
            fetch_add(ptr::addr_of_mut!((*conns).denied_host), 1);
            fetch_sub(claimed, 1);
            return Err(deny(settings));
        }
        fetch_add(ptr::addr_of_mut!((*conns).admitted), 1);
        (*charge).uid = u64::from(uid);
        // Published last: sock_release only uncharges a complete charge.
        (*charge).charged = 1;
    }
    Ok(ALLOW)
}

/// The socket's charge record, created zeroed on first use.
#[inline(always)]
fn sock_charge(ctx: &SockAddrContext) -> *mut SockCharge {
    // SAFETY: `get_or_insert_ptr_mut` reads the context's socket pointer, which the
    // kernel provides for connect hooks.
    let charge = unsafe { RL_SOCK_CHARGE.get_or_insert_ptr_mut(ctx, None) };
    if !charge.is_null() {
        return charge;
    }
    // Two threads racing to create the storage: the loser gets NULL, the record exists.
    // SAFETY: as above.
    unsafe { RL_SOCK_CHARGE.get_ptr_mut(ctx) }
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
        // SAFETY: bpf_set_retval is available to cgroup programs (Linux >= 5.18); the
        // agent only sets a non-EPERM errno after checking the kernel has it.
        unsafe { bpf_set_retval(-(settings.deny_errno as i32)) };
    }
    DENY
}

#[inline(always)]
fn uncharge(ctx: &SockContext) {
    let map = ptr::addr_of!(RL_SOCK_CHARGE).cast_mut().cast::<c_void>();
    // SAFETY: for cgroup/sock programs the context is the socket itself.
    let charge = unsafe { bpf_sk_storage_get(map, ctx.sock.cast::<c_void>(), ptr::null_mut(), 0) }
        .cast::<SockCharge>();
    if charge.is_null() {
        return;
    }
    // SAFETY: non-null storage pointer; release runs once per socket, after every
    // connect() on it has returned.
    unsafe {
        if (*charge).charged == 0 {
            return;
        }
        (*charge).charged = 0;
        let uid = (*charge).uid as u32;
        if let Some(conns) = RL_UID_CONNS.get_ptr_mut(&uid) {
            fetch_sub(ptr::addr_of_mut!((*conns).live), 1);
        }
        if let Some(host) = RL_HOST_CONNS.get_ptr_mut(0) {
            fetch_sub(ptr::addr_of_mut!((*host).live), 1);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
