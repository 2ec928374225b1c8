// Why this file is long: the maps, the claim/charge/release helpers and the programs that share
// them are one protocol, checked against the verifier and the claim rule below as a whole.
//! The kernel programs and their maps (built for `bpfel-unknown-none` only).
//!
//! Each charged socket has an entry in `RL_SOCK_OWNER` (socket cookie -> UID and group).
//! Inserting it with BPF_NOEXIST is the claim: exactly one connect() on a socket wins it,
//! however often or concurrently connect() is called on that socket. Deleting it at
//! release is the uncharge, and only the caller whose delete succeeds uncharges, so two
//! generations of programs attached side by side (during an agent restart) still count
//! each socket once. A connect() on a socket already charged (a TCP socket disconnected
//! with AF_UNSPEC and connected again makes a new handshake) holds no second charge but
//! takes its rate tokens like any other. (Socket-local storage was measured first:
//! creating it costs ~700 ns per connect().) Charges are released at sock_release; an
//! MPTCP connection's charge (taken on its first subflow, a kernel socket that never
//! passes sock_release) at its MPTCP socket's.
//!
//! try_charge runs in four steps: the claim (or a reconnect, or an uncharged connect()
//! past the budget), the caps (`Charge::caps`), the rates (`Charge::rates`), the commit.

use core::intrinsics;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, RingBuf, SkStorage},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            self, bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns,
            bpf_set_retval, bpf_sk_storage_get, bpf_skc_to_mptcp_sock,
        },
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, socket_filter},
    programs::{SkBuffContext, SockAddrContext, SockContext},
    EbpfContext,
};
use rlagent_common::{
    reason, Conns, DenyEvent, HostConns, Policy, Settings, SockOwner, CONNS_UNLIMITED,
    DEFAULT_MAX_TRACKED_SOCKETS, EVENTS_RING_BYTES, FLAG_COUNT_UDP, FLAG_ENFORCE,
    FLAG_MONITOR_HOST, FLAG_ON_FULL_ALLOW, FLAG_SEEDED, LIVE_COUNT_SHIFT, LIVE_ONE, MAX_GROUPS,
    MAX_GROUP_LEVEL, MAX_SUBUID_PREFIXES, MAX_UID_CAPS, MAX_UID_CONNS, OWNER_SEEDED,
    OWNER_UNCAPPED, OWNER_VOID, POLICY_MONITOR, RETIRED,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const EPERM: u64 = 1;
const ENOENT: i32 = -2;
const E2BIG: i32 = -7;
const ENOMEM: i32 = -12;
const EEXIST: i32 = -17;
const IPPROTO_MPTCP: u32 = 262;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// Lookups of a UID's counters that may find them being retired before a connect() gives
/// up (as if the map were full): the retirement deletes them within the same program run
/// as its swap, so a second lookup already finds them gone.
const RETIRE_TRIES: u32 = 4;
/// Compare-and-swap attempts on a token bucket before it counts as empty. Each failed
/// attempt means another caller took a token meanwhile, so only a burst of more than this
/// many racing connect() calls of one UID (or group) can see a refusal while tokens are
/// left; on 2 CPUs none was seen in the racing test.
const CAS_TRIES: u32 = 16;
/// Attempts at a map insert or delete before a program gives up on it. Since Linux 6.15
/// a hash map's bucket lock is a resilient spinlock, which can refuse (a timeout, or a
/// deadlock it suspects) where the older lock spun on, leaving the map unchanged; a
/// timeout under contention may pass by the next try. Each try may spin up to the lock's
/// timeout, so the tries are few.
const MAP_TRIES: u32 = 4;

/// This program set's generation, written by the loader. Of two generations attached side
/// by side (an agent restart attaches the new programs before it detaches the old), only
/// the one named in `RL_GENERATION` charges and denies; the other lets every connect()
/// through to it, so each denial is counted once.
#[unsafe(no_mangle)]
static RL_PROGRAM_GENERATION: u64 = 0;

#[btf_map]
static RL_SETTINGS: Array<Settings, 1> = Array::new();

// A constant the programs point at instead of building it on the stack: the kernels we
// support allow 512 bytes of stack for a program's whole call chain.
static NO_POLICY: Policy = Policy::NONE;

/// The generation that enforces (see `RL_PROGRAM_GENERATION`).
#[btf_map]
static RL_GENERATION: Array<u64, 1> = Array::new();

/// UIDs with a policy of their own (the `user:*` default merged in field by field).
#[btf_map]
static RL_UID_CAPS: HashMap<u32, Policy, { MAX_UID_CAPS as usize }> = HashMap::new();

/// A per-UID map, allocated on demand: large, so that a tenant with a range of
/// subordinate UIDs cannot fill it, while unused capacity costs nothing.
type PerUid<V> = HashMap<u32, V, { MAX_UID_CONNS as usize }, { BPF_F_NO_PREALLOC as usize }>;

#[btf_map]
static RL_UID_CONNS: PerUid<Conns> = HashMap::new();

/// Per-group maps, allocated on demand. The agent alone removes a group's counters, two
/// writes after its policy went, long after any program that found the policy has
/// finished: the memory of a deleted entry is reused at once (see `LIVE_COUNT_SHIFT`).
type PerGroup<V> = HashMap<u64, V, { MAX_GROUPS as usize }, { BPF_F_NO_PREALLOC as usize }>;

/// Groups with connection limits, by the id of the group's cgroup (written by the agent).
#[btf_map]
static RL_GROUP_POLICY: PerGroup<Policy> = HashMap::new();

/// Their counters (entries created by the agent with the policy, updated by the programs,
/// removed by the agent once idle and retired since an earlier write).
#[btf_map]
static RL_GROUP_CONNS: PerGroup<Conns> = HashMap::new();

/// Subordinate UIDs (`/etc/subuid` ranges as aligned prefixes of the UID, big-endian) ->
/// the UID of the user who owns the range, who is charged for them (written by the agent).
#[btf_map]
static RL_SUBUID: LpmTrie<[u8; 4], u32, { MAX_SUBUID_PREFIXES as usize }> = LpmTrie::new();

/// Denial events (`DenyEvent`), read by the agent.
#[btf_map]
static RL_EVENTS: RingBuf<DenyEvent, { EVENTS_RING_BYTES as usize }> = RingBuf::new();

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

/// Socket cookie -> charged UID (with `OWNER_*` bits) and group.
#[btf_map]
static RL_SOCK_OWNER: HashMap<u64, SockOwner, { DEFAULT_MAX_TRACKED_SOCKETS as usize }> =
    HashMap::new();

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
    match try_charge::<false>(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn rl_connect6(ctx: SockAddrContext) -> i32 {
    match try_charge::<true>(&ctx) {
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

/// Retires the counters of the UID in the first 4 bytes of the packet (after its
/// Ethernet header), run by the agent through BPF_PROG_TEST_RUN, never attached. The
/// agent asks only for UIDs without a policy of their own whose counters it found idle;
/// here, atomically against every connect(), the live count goes from 0 to `RETIRED`
/// (a connect() that added first makes the swap fail), then the entry is deleted. Returns
/// 0: kept, 1: retired, 2: retired, and they were counted in `uncapped_uids`, 3: retired
/// but the kernel refused the delete (the agent asks again every round: counters already
/// `RETIRED`, with any adds a connect() left on them, are deleted without the checks).
#[socket_filter]
pub fn rl_retire(ctx: SkBuffContext) -> i64 {
    let Ok(uid) = ctx.load::<u32>(0) else {
        return 0;
    };
    let Some(conns) = RL_UID_CONNS.get_ptr_mut(&uid) else {
        return 0;
    };
    // SAFETY: a BPF helper that takes no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let (idle, retired) = (Conns::live_word(uid, 0), Conns::live_word(uid, RETIRED));
    // SAFETY: a pointer from a successful lookup in this program run.
    unsafe {
        if !Conns::retiring(read(&raw const (*conns).live), uid) {
            // Buckets not full: a token was taken lately; the UID is not idle.
            if read(&raw const (*conns).rate_tat) > now || read(&raw const (*conns).event_tat) > now
            {
                return 0;
            }
            if !compare_and_swap(&raw mut (*conns).live, idle, retired) {
                return 0;
            }
        }
        let unlimited = read(&raw const (*conns).flags) & CONNS_UNLIMITED != 0;
        match retried(|| RL_UID_CONNS.remove(&uid)) {
            Ok(()) => {}
            Err(err) if err == ENOENT => {}
            Err(_) => return 3,
        }
        if unlimited {
            2
        } else {
            1
        }
    }
}

/// A map as the helpers take it (what aya-ebpf's own wrappers pass; they cover
/// sk_storage only for the sock_addr context's socket).
#[inline(always)]
fn map_ptr<T>(map: &T) -> *mut core::ffi::c_void {
    core::ptr::from_ref(map).cast_mut().cast()
}

/// `op`, a map insert or delete, again while the kernel refuses it (see `MAP_TRIES`); the
/// answers about the map itself (no such key, key exists, map full) are final. A refusal
/// it gives up on is counted in `HostConns::map_errors`.
#[inline(always)]
fn retried(mut op: impl FnMut() -> Result<(), i32>) -> Result<(), i32> {
    let mut tries = 1;
    loop {
        match op() {
            Ok(()) => return Ok(()),
            Err(err) if err == ENOENT || err == EEXIST || err == E2BIG || err == ENOMEM => {
                return Err(err);
            }
            Err(err) if tries >= MAP_TRIES => {
                if let Some(host) = RL_HOST_CONNS.get_ptr_mut(0) {
                    // SAFETY: `host` points at the array's single element.
                    fetch_add(unsafe { &raw mut (*host).map_errors }, 1);
                }
                return Err(err);
            }
            Err(_) => tries += 1,
        }
    }
}

/// Drops the claim on socket `cookie` (its charge given back, or never taken). A record
/// the kernel will not delete is marked `OWNER_VOID`, so its release uncharges nothing.
#[inline(always)]
fn drop_claim(cookie: u64) {
    if retried(|| RL_SOCK_OWNER.remove(&cookie)).is_err() {
        void_record(cookie);
    }
}

/// A record marked `OWNER_VOID` holds no charge: a connect() that meets it claims the
/// socket afresh, writing its owner over the record. True: claimed so.
#[inline(always)]
fn reclaim_void(cookie: u64, owner: &SockOwner) -> bool {
    let Some(record) = RL_SOCK_OWNER.get_ptr_mut(&cookie) else {
        return false;
    };
    // SAFETY: a pointer from a successful lookup; as in `void_record`.
    unsafe {
        if (*record).owner & OWNER_VOID == 0 {
            return false;
        }
        (*record).group = owner.group;
        (*record).owner = owner.owner;
    }
    true
}

/// Marks the record of socket `cookie` `OWNER_VOID` (see `drop_claim`).
#[inline(always)]
fn void_record(cookie: u64) {
    if let Some(record) = RL_SOCK_OWNER.get_ptr_mut(&cookie) {
        // SAFETY: a pointer from a successful lookup. Only this socket's connect() and
        // release write its record, and the socket lock keeps them apart.
        unsafe { (*record).owner |= OWNER_VOID };
    }
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

/// The limits that apply to one connect(), copied once: the agent may rewrite a policy
/// while this program runs, and the fields of one copy belong together.
struct Limits {
    uid: Policy,
    group: Policy,
    monitor: bool,
    group_monitor: bool,
}

impl Limits {
    #[inline(always)]
    fn new(uid: &Policy, group: &Policy) -> Self {
        // One copy of each: the agent may rewrite a policy while this runs.
        let (uid, group) = (*uid, *group);
        Self {
            monitor: uid.flags & POLICY_MONITOR != 0,
            group_monitor: group.flags & POLICY_MONITOR != 0,
            uid,
            group,
        }
    }

    /// No enforce-mode cap bounds this socket's charge: it counts against the budget of
    /// such charges (half the charged-socket map), so a tenant in monitor mode or with only
    /// a rate can never take the room that capped UIDs need.
    #[inline(always)]
    fn unbounded(&self, in_group: bool) -> bool {
        !self.uid.bounds() && (!in_group || !self.group.bounds())
    }

    /// Nothing here limits the UID: its counters come from the budget of such UIDs.
    #[inline(always)]
    fn unlimited(&self, in_group: bool) -> bool {
        !self.uid.limits() && !in_group
    }

    /// Nothing here would deny: a full map lets the connect() through uncounted.
    #[inline(always)]
    fn lenient(&self, in_group: bool) -> bool {
        (!self.uid.limits() || self.monitor) && (!in_group || self.group_monitor)
    }

    /// A rate applies (the UID's, or the group's when in a group).
    #[inline(always)]
    fn rated(&self) -> bool {
        self.uid.rate_interval_ns != 0 || self.group.rate_interval_ns != 0
    }
}

/// What a connect() has taken so far, so a denial can give it all back.
struct Charge {
    cookie: u64,
    /// This connect() inserted the socket's record in `RL_SOCK_OWNER`, or reclaimed a void
    /// one (a denial removes it); false for a reconnect of a socket already charged, and
    /// for one not charged.
    claimed: bool,
    uid: u32,
    host: *mut HostConns,
    conns: *mut Conns,
    /// The group's id and counters (null: not in a group with limits).
    group: u64,
    group_conns: *mut Conns,
    uid_live: bool,
    group_live: bool,
    host_live: bool,
    /// The interval of the UID token taken (0: none).
    uid_token: u64,
    /// A monitor-mode limit was exceeded already: enforce mode would have denied this
    /// connect() there, so no later monitor-mode limit counts it or takes a token, and the
    /// would-deny counts equal the denials enforce mode would make.
    noted: bool,
}

impl Charge {
    #[inline(always)]
    fn new(cookie: u64, claimed: bool, uid: u32, host: *mut HostConns, conns: *mut Conns) -> Self {
        Self {
            cookie,
            claimed,
            uid,
            host,
            conns,
            group: 0,
            group_conns: core::ptr::null_mut(),
            uid_live: false,
            group_live: false,
            host_live: false,
            uid_token: 0,
            noted: false,
        }
    }

    /// Gives back everything taken and drops the claim on the socket.
    #[inline(always)]
    fn undo(&self) {
        // SAFETY: the pointers come from successful lookups in this program run.
        unsafe {
            if self.uid_live {
                fetch_sub(&raw mut (*self.conns).live, LIVE_ONE);
            }
            if self.group_live && !self.group_conns.is_null() {
                fetch_sub(&raw mut (*self.group_conns).live, LIVE_ONE);
            }
            if self.host_live {
                fetch_sub(&raw mut (*self.host).live, 1);
            }
            if self.uid_token != 0 {
                // GCRA: moving the arrival time back one interval returns the token.
                fetch_sub(&raw mut (*self.conns).rate_tat, self.uid_token);
            }
        }
        if self.claimed {
            drop_claim(self.cookie);
        }
    }

    /// A limit was exceeded. Monitor mode counts a would-deny (the first only, see
    /// `noted`) and lets the connect() go on (`Ok`); enforce mode gives everything back,
    /// counts the denial and denies (`Err`). Either way an event reports it.
    #[inline(always)]
    fn exceeded(
        &mut self,
        dest: &Destination,
        settings: &Settings,
        reason: usize,
        monitor: bool,
        limit: u64,
    ) -> Result<(), i32> {
        if monitor && self.noted {
            return Ok(());
        }
        // Null checks where the group's counters are used: the verifier does not follow
        // that they are set whenever `group` is.
        let group_reason = (reason == reason::GROUP || reason == reason::GROUP_RATE)
            && !self.group_conns.is_null();
        // SAFETY: as in `undo`; `reason` is a constant below `reason::COUNT`.
        unsafe {
            if monitor {
                self.noted = true;
                // Enforce mode would give the UID's token back here (undo): so does
                // monitor mode, so the buckets, and the counts, stay what enforce
                // mode's would be.
                if self.uid_token != 0 {
                    fetch_sub(&raw mut (*self.conns).rate_tat, self.uid_token);
                    self.uid_token = 0;
                }
                fetch_add(&raw mut (*self.conns).would_deny[reason], 1);
                if group_reason {
                    fetch_add(&raw mut (*self.group_conns).would_deny[reason], 1);
                }
            } else {
                self.undo();
                fetch_add(&raw mut (*self.conns).denied[reason], 1);
                if group_reason {
                    fetch_add(&raw mut (*self.group_conns).denied[reason], 1);
                }
            }
        }
        let errno = if monitor { 0 } else { settings.deny_errno };
        report(
            dest,
            settings,
            self.host,
            self.conns,
            Subject {
                uid: self.uid,
                group: self.group,
                reason,
                monitor,
                limit,
                errno,
            },
        );
        if monitor {
            Ok(())
        } else {
            Err(deny(settings))
        }
    }

    /// Caps: add first, then compare the value displaced, so racing connect() calls each
    /// see a distinct old value and no more than the cap can be admitted. The UID's own
    /// cap, the group's, then the host's.
    #[inline(always)]
    /// `live_before`: the UID's live count before `charge_uid` added this connect().
    fn caps(
        &mut self,
        dest: &Destination,
        settings: &Settings,
        limits: &Limits,
        live_before: u64,
    ) -> Result<(), i32> {
        let (seeded, host_seeded) = seeded_for(self.uid, settings, self.host);
        self.uid_live = true;
        if live_before.saturating_add(seeded) >= limits.uid.cap {
            self.exceeded(dest, settings, reason::CAP, limits.monitor, limits.uid.cap)?;
        }
        self.group_cap(dest, settings, limits)?;
        self.host_live = true;
        // SAFETY: `host` points at the array element.
        if fetch_add(unsafe { &raw mut (*self.host).live }, 1).saturating_add(host_seeded)
            >= settings.host_cap
            && self.uid != 0
        {
            let host_monitor = settings.flags & FLAG_MONITOR_HOST != 0;
            self.exceeded(
                dest,
                settings,
                reason::HOST_CAP,
                host_monitor,
                settings.host_cap,
            )?;
        }
        Ok(())
    }

    /// The group's cap, when the caller is in a group: charges the group.
    #[inline(always)]
    fn group_cap(
        &mut self,
        dest: &Destination,
        settings: &Settings,
        limits: &Limits,
    ) -> Result<(), i32> {
        if self.group == 0 || self.group_conns.is_null() {
            return Ok(());
        }
        self.group_live = true;
        // SAFETY: `group_conns` points at the group's counters (set with `group`).
        let before = fetch_add(unsafe { &raw mut (*self.group_conns).live }, LIVE_ONE);
        if before >> LIVE_COUNT_SHIFT >= limits.group.cap {
            self.exceeded(
                dest,
                settings,
                reason::GROUP,
                limits.group_monitor,
                limits.group.cap,
            )?;
        }
        Ok(())
    }

    /// Rates, after the caps, so a connect() a cap refuses takes no token: one token from
    /// the UID's bucket, then one from the group's.
    #[inline(always)]
    fn rates(
        &mut self,
        dest: &Destination,
        settings: &Settings,
        limits: &Limits,
    ) -> Result<(), i32> {
        if !limits.rated() {
            return Ok(());
        }
        // SAFETY: a BPF helper that takes no arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        let uid = &limits.uid;
        if uid.rate_interval_ns != 0 && !(limits.monitor && self.noted) {
            // SAFETY: as in `caps`.
            let tat = unsafe { &raw mut (*self.conns).rate_tat };
            if take(tat, now, uid.rate_interval_ns, uid.rate_window_ns) {
                self.uid_token = uid.rate_interval_ns;
            } else {
                self.exceeded(dest, settings, reason::RATE, limits.monitor, uid.burst)?;
            }
        }
        let group = &limits.group;
        if self.group != 0
            && !self.group_conns.is_null()
            && group.rate_interval_ns != 0
            && !(limits.group_monitor && self.noted)
        {
            // SAFETY: as in `group_cap`.
            let tat = unsafe { &raw mut (*self.group_conns).rate_tat };
            if !take(tat, now, group.rate_interval_ns, group.rate_window_ns) {
                self.exceeded(
                    dest,
                    settings,
                    reason::GROUP_RATE,
                    limits.group_monitor,
                    group.burst,
                )?;
            }
        }
        Ok(())
    }

    /// The connect() is admitted: count it.
    #[inline(always)]
    fn admitted(&self) {
        // SAFETY: as in `caps` and `group_cap`.
        unsafe {
            fetch_add(&raw mut (*self.conns).admitted, 1);
            if self.group != 0 && !self.group_conns.is_null() {
                fetch_add(&raw mut (*self.group_conns).admitted, 1);
            }
        }
    }
}

#[inline(always)]
fn try_charge<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(settings) = counted_settings(ctx) else {
        return Ok(ALLOW);
    };
    let Some(host) = RL_HOST_CONNS.get_ptr_mut(0) else {
        return Ok(ALLOW);
    };
    let uid = charged_uid(bpf_get_current_uid_gid() as u32, settings);
    // SAFETY: hash map lookups return a pointer valid for this program run.
    let own = unsafe { RL_UID_CAPS.get(&uid) };
    let (group, group_policy, group_conns) = find_group(settings);
    // Root is charged only when a quota of its own asks for it, or when its process is in
    // a group with connection limits (a workload the group's cap is about): the kernel
    // sockets of NFS and SMB mounts connect as root from outside any group and never pass
    // sock_release, so charges of theirs would hold the host cap forever.
    if uid == 0 && own.is_none() && group == 0 {
        return Ok(ALLOW);
    }
    let limits = Limits::new(
        own.unwrap_or_else(|| default_policy(uid, settings)),
        group_policy,
    );
    let in_group = group != 0;
    let unbounded = limits.unbounded(in_group);
    let unlimited = limits.unlimited(in_group);
    let lenient = limits.lenient(in_group);
    // SAFETY: the helper accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let dest = destination::<V6>(ctx);
    let at = Caller {
        uid,
        group,
        group_conns,
        host,
        lenient,
        unbounded,
        unlimited,
    };
    if unbounded
        // SAFETY: `host` points at the array's single element.
        && read(unsafe { &raw const (*host).uncapped_sockets })
            .saturating_sub(settings.uncapped_sockets_gone)
            >= settings.uncapped_socket_budget
    {
        return untracked(&dest, settings, &at, &limits);
    }
    let Ok(keeper) = mptcp_keeper(ctx) else {
        return full(&dest, settings, &at, &limits);
    };
    let kept = if keeper.is_null() {
        0
    } else {
        // SAFETY: non-null storage of the MPTCP socket.
        unsafe { *keeper }
    };
    // Kept: the connection is charged already, on the subflow whose cookie is kept: a
    // user's connect() on it again (after AF_UNSPEC the MPTCP socket may make a new first
    // subflow) is a reconnect of that charge. Further subflows of one connection (joins)
    // are made by kernel threads as root, and returned above.
    let cookie = if kept != 0 { kept } else { cookie };
    claim_and_charge(&dest, settings, &at, &limits, cookie, keeper)
}

/// The settings, when the programs of this generation enforce and the socket is of a
/// counted kind (TCP, and UDP with `count_udp`); `None` lets the connect() through as it is.
#[inline(always)]
fn counted_settings(ctx: &SockAddrContext) -> Option<&'static Settings> {
    // SAFETY: a global the loader writes before the program is loaded.
    let generation = unsafe { core::ptr::read_volatile(&RL_PROGRAM_GENERATION) };
    if RL_GENERATION.get(0).copied() != Some(generation) {
        return None;
    }
    let settings = RL_SETTINGS.get(0)?;
    if settings.flags & FLAG_ENFORCE == 0 {
        return None;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    let counted = sock_type == SOCK_STREAM
        || (sock_type == SOCK_DGRAM && settings.flags & FLAG_COUNT_UDP != 0);
    counted.then_some(settings)
}

/// For an MPTCP subflow, its MPTCP socket's storage that keeps the charged subflow's
/// cookie (see `RL_MPTCP`), made when missing; null for any other socket. `Err`: the
/// storage could not be made.
#[inline(always)]
fn mptcp_keeper(ctx: &SockAddrContext) -> Result<*mut u64, ()> {
    // SAFETY: the context's socket is valid for the program's run; the helper returns the
    // subflow's MPTCP socket, or null for any other socket.
    let mptcp = unsafe { bpf_skc_to_mptcp_sock((*ctx.sock_addr).__bindgen_anon_1.sk.cast()) };
    if mptcp.is_null() {
        return Ok(core::ptr::null_mut());
    }
    // SAFETY: `mptcp` is a non-null BTF pointer to a socket.
    let keeper = unsafe {
        bpf_sk_storage_get(
            map_ptr(&RL_MPTCP),
            mptcp.cast(),
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<u64>();
    if keeper.is_null() {
        Err(())
    } else {
        Ok(keeper)
    }
}

/// The claim of socket `cookie` (see the module doc), then its charge: caps and rates
/// for a new claim, or a reconnect of the charge it holds. `keeper`: as `mptcp_keeper`.
#[inline(always)]
fn claim_and_charge(
    dest: &Destination,
    settings: &Settings,
    at: &Caller,
    limits: &Limits,
    cookie: u64,
    keeper: *mut u64,
) -> Result<i32, i32> {
    let (unbounded, unlimited) = (at.unbounded, at.unlimited);
    let owner = SockOwner {
        owner: u64::from(at.uid) | if unbounded { OWNER_UNCAPPED } else { 0 },
        group: at.group,
    };
    // The claim. EEXIST: this socket is already charged: a repeated connect() (a UDP
    // re-connect, a retry after ECONNREFUSED, a TCP connect after AF_UNSPEC), unless its
    // record is void (`reclaim_void`).
    let claimed = match retried(|| RL_SOCK_OWNER.insert(&cookie, &owner, u64::from(BPF_NOEXIST))) {
        Ok(()) => true,
        Err(err) if err == EEXIST => reclaim_void(cookie, &owner),
        Err(_) => return full(dest, settings, at, limits),
    };
    if !claimed {
        let Some(conns) = uid_conns(at.uid, unlimited, settings, at.host) else {
            return full(dest, settings, at, limits);
        };
        let mut charge = Charge::new(cookie, false, at.uid, at.host, conns);
        charge.group = at.group;
        charge.group_conns = at.group_conns;
        return reconnect(dest, settings, limits, charge);
    }
    let Some((conns, live_before)) = charge_uid(at.uid, unlimited, settings, at.host) else {
        drop_claim(cookie);
        return full(dest, settings, at, limits);
    };
    let mut charge = Charge::new(cookie, true, at.uid, at.host, conns);
    charge.group = at.group;
    charge.group_conns = at.group_conns;
    charge.caps(dest, settings, limits, live_before)?;
    charge.rates(dest, settings, limits)?;
    charge.admitted();
    // SAFETY: `host` points at the array's single element; `keeper` is null or this MPTCP
    // socket's storage.
    unsafe {
        if unbounded {
            fetch_add(&raw mut (*at.host).uncapped_sockets, 1);
        }
        if !keeper.is_null() {
            *keeper = cookie;
        }
    }
    Ok(ALLOW)
}

/// Who connects, and what bounds the charge: what the claim, the charge and the paths that
/// give up on charging need to know of the caller.
struct Caller {
    uid: u32,
    group: u64,
    group_conns: *mut Conns,
    host: *mut HostConns,
    /// Nothing would deny this caller (see `full`).
    lenient: bool,
    /// See `Limits::unbounded`.
    unbounded: bool,
    /// See `Limits::unlimited`.
    unlimited: bool,
}

/// A connect() on a socket already charged: it makes a new connection (a TCP socket
/// disconnected with AF_UNSPEC makes a new handshake) but holds no second charge. It takes
/// its rate tokens like any connect(), and a socket charged outside any group that is
/// connected again from within a group is charged to that group (or refused by its cap).
#[inline(always)]
fn reconnect(
    dest: &Destination,
    settings: &Settings,
    limits: &Limits,
    mut charge: Charge,
) -> Result<i32, i32> {
    let record = RL_SOCK_OWNER
        .get_ptr_mut(&charge.cookie)
        .unwrap_or(core::ptr::null_mut());
    // SAFETY: a pointer from a successful lookup. connect() calls on one socket are
    // serialised by the socket lock, and its release cannot run while one is under way.
    let ungrouped = !record.is_null() && unsafe { (*record).group } == 0;
    if ungrouped {
        charge.group_cap(dest, settings, limits)?;
    }
    // The caller's group's rate either way: a socket charged to the group takes the
    // group's token at every connect() too.
    charge.rates(dest, settings, limits)?;
    charge.admitted();
    if charge.group_live && !record.is_null() {
        // SAFETY: as above; the release then gives the group back what it was charged.
        unsafe { (*record).group = charge.group };
    }
    Ok(ALLOW)
}

/// A connect() not charged, because the budget of charges no cap bounds is used up: it
/// still meets the host cap and the rates.
#[inline(always)]
fn untracked(
    dest: &Destination,
    settings: &Settings,
    at: &Caller,
    limits: &Limits,
) -> Result<i32, i32> {
    if host_over(settings, at) {
        return refuse(dest, settings, at, reason::HOST_CAP, settings.host_cap);
    }
    // SAFETY: `host` points at the array's single element.
    fetch_add(unsafe { &raw mut (*at.host).untracked }, 1);
    if !limits.rated() {
        return Ok(ALLOW);
    }
    let Some(conns) = uid_conns(at.uid, at.unlimited, settings, at.host) else {
        return full(dest, settings, at, limits);
    };
    uncharged_rates(dest, settings, at, limits, conns)?;
    Ok(ALLOW)
}

/// The rates of a connect() that is let through without a charge.
#[inline(always)]
fn uncharged_rates(
    dest: &Destination,
    settings: &Settings,
    at: &Caller,
    limits: &Limits,
    conns: *mut Conns,
) -> Result<(), i32> {
    if !limits.rated() {
        return Ok(());
    }
    let mut charge = Charge::new(0, false, at.uid, at.host, conns);
    charge.group = at.group;
    charge.group_conns = at.group_conns;
    charge.rates(dest, settings, limits)
}

/// Takes one token from the bucket whose state is the arrival time at `tat` (GCRA: one
/// token every `interval` ns, at most `window / interval` (the burst) at once). Exact
/// under concurrency: the new arrival time is written by compare-and-swap against the
/// value it was computed from, so racing callers each take a distinct token, and over any
/// span of time no more than `burst + span / interval` are taken. After a few lost races
/// in a row it reports the bucket as empty: the bound holds, at the price of a rare early
/// refusal.
///
/// Taking a token never moves the arrival time past `now + window`, but a policy change
/// (a faster rate, a smaller burst) can leave it further ahead than the new window: it is
/// then clamped to `now + window` (an empty bucket that refills at the new rate from now),
/// so a changed policy takes effect on the next connect().
#[inline(always)]
fn take(tat: *mut u64, now: u64, interval: u64, window: u64) -> bool {
    if interval == 0 {
        return true;
    }
    let limit = now.saturating_add(window);
    let mut tries = 0;
    while tries < CAS_TRIES {
        let old = read(tat);
        let start = if old <= now {
            now
        } else if old > limit {
            limit
        } else {
            old
        };
        let next = start.saturating_add(interval);
        if next - now > window {
            if old > limit {
                compare_and_swap(tat, old, limit);
            }
            return false;
        }
        if compare_and_swap(tat, old, next) {
            return true;
        }
        tries += 1;
    }
    false
}

#[inline(always)]
fn compare_and_swap(counter: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: `counter` points into a map value the verifier has bounds-checked.
    unsafe {
        intrinsics::atomic_cxchg::<
            u64,
            { intrinsics::AtomicOrdering::SeqCst },
            { intrinsics::AtomicOrdering::SeqCst },
        >(counter, old, new)
        .1
    }
}

/// What a denial event reports.
struct Subject {
    uid: u32,
    group: u64,
    reason: usize,
    monitor: bool,
    limit: u64,
    errno: u64,
}

/// Sends a denial event, within the UID's event rate (`conns` null: no UID counters,
/// only the ring's room limits it). An event not sent is counted, so none is lost
/// silently.
#[inline(always)]
fn report(
    dest: &Destination,
    settings: &Settings,
    host: *mut HostConns,
    conns: *mut Conns,
    subject: Subject,
) {
    if !conns.is_null() {
        // SAFETY: a BPF helper that takes no arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: a pointer from a successful lookup in this program run.
        let tat = unsafe { &raw mut (*conns).event_tat };
        if !take(
            tat,
            now,
            settings.event_interval_ns,
            settings.event_window_ns,
        ) {
            // SAFETY: as above, `conns` is from a successful lookup in this program run.
            fetch_add(unsafe { &raw mut (*conns).events_dropped }, 1);
            return;
        }
    }
    let Some(mut entry) = RL_EVENTS.reserve(0) else {
        // SAFETY: as above; `host` points at the array's single element.
        unsafe {
            if !conns.is_null() {
                fetch_add(&raw mut (*conns).events_dropped, 1);
            }
            fetch_add(&raw mut (*host).events_lost, 1);
        }
        return;
    };
    // Field by field into the ring's memory: a record built on the stack first would cost
    // its size in stack, and the kernels we support allow 512 bytes for the whole call
    // chain.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved record, which is written whole before submit.
    unsafe {
        (*e).time_ns = bpf_ktime_get_ns();
        (*e).group = subject.group;
        (*e).limit = subject.limit;
        (*e).uid = subject.uid;
        (*e).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*e).errno = subject.errno as u32;
        (*e).port = dest.port;
        (*e).family = dest.family;
        (*e).reason = subject.reason as u32;
        (*e).monitor = u32::from(subject.monitor);
        (*e).addr = dest.addr;
        // On failure the helper zeroes the buffer itself.
        generated::bpf_get_current_comm((&raw mut (*e).comm).cast(), 16);
    }
    entry.submit(0);
}

/// Where a connect() goes, for its denial event.
struct Destination {
    family: u16,
    /// Host byte order.
    port: u16,
    /// As `DenyEvent::addr`.
    addr: [u32; 4],
}

/// The destination of this connect(): connect4's address (`V6` false) or connect6's. The
/// verifier refuses connect4 programs that read the IPv6 fields, even on a path never
/// taken, so the choice is made at compile time.
#[inline(always)]
fn destination<const V6: bool>(ctx: &SockAddrContext) -> Destination {
    // SAFETY: the context pointer is valid for the program's run; every field read is a
    // 4-byte context load, as the verifier requires.
    unsafe {
        let sa = ctx.sock_addr;
        let addr = if V6 {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        } else {
            [(*sa).user_ip4, 0, 0, 0]
        };
        Destination {
            family: if V6 { AF_INET6 } else { AF_INET },
            port: u16::from_be((*sa).user_port as u16),
            addr,
        }
    }
}

/// A map had no room: a UID nothing enforces on (no limit, or only monitor-mode ones)
/// goes through uncounted (`lenient`); a limited one as `on_full` says (deny by default),
/// so a limit never silently stops holding.
#[inline(always)]
fn full(dest: &Destination, settings: &Settings, at: &Caller, limits: &Limits) -> Result<i32, i32> {
    if at.lenient || settings.flags & FLAG_ON_FULL_ALLOW != 0 {
        // Let through uncounted, but never past the host cap, nor past a rate when the
        // UID has counters to keep it in.
        if host_over(settings, at) {
            return refuse(dest, settings, at, reason::HOST_CAP, settings.host_cap);
        }
        // SAFETY: `host` points at the array's single element.
        fetch_add(unsafe { &raw mut (*at.host).untracked }, 1);
        if let Some(conns) = RL_UID_CONNS.get_ptr_mut(&at.uid) {
            uncharged_rates(dest, settings, at, limits, conns)?;
        }
        return Ok(ALLOW);
    }
    // SAFETY: as above.
    fetch_add(unsafe { &raw mut (*at.host).denied_full }, 1);
    refuse(dest, settings, at, reason::FULL, 0)
}

/// The host cap is reached (read only: for a connect() that is not charged). Root is
/// never denied by it, so the host stays administrable; in monitor mode it denies nothing.
#[inline(always)]
fn host_over(settings: &Settings, at: &Caller) -> bool {
    if at.uid == 0 || settings.flags & FLAG_MONITOR_HOST != 0 {
        return false;
    }
    let (_, host_seeded) = seeded_for(at.uid, settings, at.host);
    // SAFETY: `host` points at the array's single element.
    read(unsafe { &raw const (*at.host).live }).saturating_add(host_seeded) >= settings.host_cap
}

/// Denies a connect() nothing was charged for: counts the denial on the UID's counters
/// (when it has some: the full map may be that one) and reports it.
#[inline(always)]
fn refuse(
    dest: &Destination,
    settings: &Settings,
    at: &Caller,
    reason: usize,
    limit: u64,
) -> Result<i32, i32> {
    let conns = RL_UID_CONNS
        .get_ptr_mut(&at.uid)
        .unwrap_or(core::ptr::null_mut());
    if !conns.is_null() {
        // SAFETY: a pointer from a successful lookup; `reason` is below `reason::COUNT`.
        fetch_add(unsafe { &raw mut (*conns).denied[reason] }, 1);
    }
    report(
        dest,
        settings,
        at.host,
        conns,
        Subject {
            uid: at.uid,
            group: at.group,
            reason,
            monitor: false,
            limit,
            errno: settings.deny_errno,
        },
    );
    Err(deny(settings))
}

/// Connections of `uid`, and of the host, found open at the agent's first start and still
/// open (none once they are all gone: `FLAG_SEEDED` is off).
#[inline(always)]
fn seeded_for(uid: u32, settings: &Settings, host: *mut HostConns) -> (u64, u64) {
    if settings.flags & FLAG_SEEDED == 0 {
        return (0, 0);
    }
    // SAFETY: lookups return pointers valid for this program run; plain loads of values
    // others update atomically.
    let seeded = unsafe { RL_UID_SEEDED.get(&uid).copied().unwrap_or(0) };
    // SAFETY: as above.
    let gone = unsafe { RL_UID_SEEDED_GONE.get(&uid).copied().unwrap_or(0) };
    // SAFETY: `host` points at the single element of RL_HOST_CONNS.
    let host_seeded = read(unsafe { &raw const (*host).seeded });
    (
        seeded.saturating_sub(gone),
        host_seeded.saturating_sub(settings.seeded_gone),
    )
}

/// Who is charged for a connect() of the kernel UID `uid`: the owner of the subordinate
/// range it lies in (a user's rootless containers), else `uid` itself.
#[inline(always)]
fn charged_uid(uid: u32, settings: &Settings) -> u32 {
    let wide = u64::from(uid);
    if wide < settings.subuid_first || wide > settings.subuid_last {
        return uid;
    }
    let key = Key::new(32, uid.to_be_bytes());
    RL_SUBUID.get(&key).copied().unwrap_or(uid)
}

/// The policy of a UID without one of its own: the `user:*` default from
/// `default_uid_min` up.
#[inline(always)]
fn default_policy(uid: u32, settings: &Settings) -> &Policy {
    if u64::from(uid) >= settings.default_uid_min {
        &settings.default_policy
    } else {
        &NO_POLICY
    }
}

/// The group of the calling process: the first of its cgroup's ancestors (from the root
/// down, at the levels where groups sit) that has a policy. Returns its id (0: none), its
/// policy and its counters. The caller's cgroup, not the socket's: connect() by a process
/// in the group is what the group's limits are about.
#[inline(always)]
fn find_group(settings: &Settings) -> (u64, &Policy, *mut Conns) {
    let none = (0, &NO_POLICY, core::ptr::null_mut());
    let levels = settings.group_levels;
    let mut level = 1;
    while level < MAX_GROUP_LEVEL {
        if levels >> level == 0 {
            return none;
        }
        if levels & (1 << level) != 0 {
            // SAFETY: the helper takes any level; it returns 0 above the caller's depth.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id == 0 {
                return none;
            }
            // SAFETY: hash map lookups return a pointer valid for this program run.
            if let Some(policy) = unsafe { RL_GROUP_POLICY.get(&id) } {
                let Some(conns) = RL_GROUP_CONNS.get_ptr_mut(&id) else {
                    return none;
                };
                return (id, policy, conns);
            }
        }
        level += 1;
    }
    none
}

/// Adds one to the live count of `uid`'s counters (made if need be): the counters and
/// the count before the add. The add counts only when the word it displaced names `uid`
/// and holds a count (see `LIVE_COUNT_SHIFT`): counters being retired (`RETIRED`), or
/// memory the map has reused for another owner's counters since the lookup, are looked up
/// again. An add to another owner's live count is taken back (it keeps their counters
/// from being retired meanwhile, so the take-back lands where the add did); one to a word
/// without a count is left (those counters are being deleted, or, when the kernel refused
/// the delete, deleted by a later round: `Conns::retiring`). `None`: no room for
/// counters, or still retiring after a few tries.
#[inline(always)]
fn charge_uid(
    uid: u32,
    unlimited: bool,
    settings: &Settings,
    host: *mut HostConns,
) -> Option<(*mut Conns, u64)> {
    let mut tries = 0;
    while tries < RETIRE_TRIES {
        let conns = uid_conns(uid, unlimited, settings, host)?;
        // SAFETY: a pointer from a successful lookup in this program run.
        let live = unsafe { &raw mut (*conns).live };
        let before = fetch_add(live, LIVE_ONE);
        if Conns::owned(before, uid) {
            return Some((conns, before >> LIVE_COUNT_SHIFT));
        }
        if Conns::counting(before) {
            fetch_sub(live, LIVE_ONE);
        }
        tries += 1;
    }
    None
}

/// `uid`'s counters, made if need be. The word read names `uid` and holds a count, or the
/// counters are looked up again (they were being retired, or their memory was reused
/// since the lookup); a pointer kept past that read is checked again by whoever charges
/// it (`charge_uid`). `None`: no room for counters, or still retiring after a few tries.
#[inline(always)]
fn uid_conns(
    uid: u32,
    unlimited: bool,
    settings: &Settings,
    host: *mut HostConns,
) -> Option<*mut Conns> {
    let mut tries = 0;
    while tries < RETIRE_TRIES {
        let conns = match RL_UID_CONNS.get_ptr_mut(&uid) {
            Some(conns) => conns,
            None => new_uid_conns(uid, unlimited, settings, host)?,
        };
        // SAFETY: a pointer from a successful lookup in this program run.
        if Conns::owned(read(unsafe { &raw const (*conns).live }), uid) {
            return Some(conns);
        }
        tries += 1;
    }
    None
}

/// First connection of `uid` (or its first since its counters were retired): makes its
/// counters, tagged with the UID. BPF_NOEXIST keeps a racing creator's entry; either way
/// the lookup finds the one entry, and only the creator counts it in `uncapped_uids`.
#[inline(always)]
fn new_uid_conns(
    uid: u32,
    unlimited: bool,
    settings: &Settings,
    host: *mut HostConns,
) -> Option<*mut Conns> {
    // SAFETY: `host` points at the array's single element.
    let uncapped_uids = unsafe { &raw mut (*host).uncapped_uids };
    if unlimited
        && read(uncapped_uids).saturating_sub(settings.uncapped_uids_gone)
            >= settings.uncapped_uid_budget
    {
        return None;
    }
    let fresh = Conns::new(uid, if unlimited { CONNS_UNLIMITED } else { 0 });
    // Not `retried`: one more retry loop here, inside the lookups' loops, takes the
    // connect programs past the verifier's million-instruction limit; a refused insert
    // is handled as a full map.
    if RL_UID_CONNS
        .insert(&uid, &fresh, u64::from(BPF_NOEXIST))
        .is_ok()
        && unlimited
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
/// delete succeeds uncharges (two program generations may run side by side), or, when
/// the kernel keeps refusing the delete, the one that finds the record not yet void.
#[inline(always)]
fn release(cookie: u64) {
    // SAFETY: the value is copied out before the entry is deleted.
    let Some(SockOwner { owner, group }) = (unsafe { RL_SOCK_OWNER.get(&cookie) }).copied() else {
        return;
    };
    let removed = retried(|| RL_SOCK_OWNER.remove(&cookie));
    if owner & OWNER_VOID != 0 {
        return;
    }
    match removed {
        Ok(()) => {}
        // Another generation's release deleted it, and uncharged.
        Err(err) if err == ENOENT => return,
        // Still refused: the socket is gone all the same, so this release uncharges, and
        // marks the record so that no other generation's release uncharges it again.
        Err(_) => void_record(cookie),
    }
    if group != 0 {
        if let Some(conns) = RL_GROUP_CONNS.get_ptr_mut(&group) {
            // SAFETY: pointer from a successful lookup.
            fetch_sub(unsafe { &raw mut (*conns).live }, LIVE_ONE);
        }
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
        fetch_sub(unsafe { &raw mut (*conns).live }, LIVE_ONE);
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
