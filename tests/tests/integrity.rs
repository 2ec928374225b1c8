//! Kernel accounting against a hostile tenant: charges that are always released, caps that
//! hold however full the maps are, denials counted once. The real agent and programs, on
//! a child cgroup of this host's cgroup2 mount; needs root (skips otherwise, fails under
//! RLAGENT_REQUIRE_PRIVILEGED=1).

use std::time::Instant;

use aya::maps::{HashMap, MapData};
use aya::programs::links::PinnedLink;
use rlagent::kernel::bpf::PinLayout;
use rlagent_common::{names, reason, Conns, RETIRED};
use rlagent_tests::{free_port, privileged, Agent, Connect, Helper, Listener, Scratch, TestCgroup};

const EPERM: i32 = libc::EPERM;
// UIDs of this binary (tests in one binary run in parallel).
const MPTCP_USER: u32 = 61101;
const CHURNER: u32 = 61102;
const BYSTANDER: u32 = 61103;
const GEN_USER: u32 = 61104;
const EXEMPT: u32 = 61105;
const LATECOMER: u32 = 61106;
const LATE_AFTER_MANY: u32 = 61107;
const NO_COUNTERS_LEFT: u32 = 61111;
const REUSED: u32 = 61112;
const OTHER_OWNER: u32 = 61113;

fn quota(target: &str, conns: &str) -> String {
    format!("[[quota]]\ntarget = \"{target}\"\nconns = {conns}\n")
}

/// `ok <admitted> <errno>` of the helper's `cycles`.
fn cycles(h: &mut Helper, kind: &str, port: u16, n: u32) -> (u32, i32) {
    let reply = h.cmd(&format!("cycles {kind} {port} {n}"));
    let words: Vec<&str> = reply.split_whitespace().collect();
    assert_eq!(words[0], "ok", "{reply}");
    (words[1].parse().unwrap(), words[2].parse().unwrap())
}

/// `ok <succeeded> <failed>` of the helper's `hold`.
fn hold(h: &mut Helper, kind: &str, port: u16, n: u32) -> (u32, u32) {
    let reply = h.cmd(&format!("hold {kind} {port} {n}"));
    let words: Vec<&str> = reply.split_whitespace().collect();
    assert_eq!(words[0], "ok", "{reply}");
    (words[1].parse().unwrap(), words[2].parse().unwrap())
}

#[test]
fn mptcp_connections_release_their_charge_when_closed() {
    if !privileged("mptcp_connections_release_their_charge_when_closed") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(&cgroup, "", &quota(&format!("user:{MPTCP_USER}"), "3"));
    let agent = Agent::start(&scratch);
    let plain = Listener::dropping();
    let mptcp = Listener::mptcp();
    let mut h = Helper::spawn(&cgroup.path, MPTCP_USER);
    // connect+close cycles, to an MPTCP listener and to a plain TCP one (MPTCP falls back
    // to TCP): with a leaked charge per cycle, the fourth would be denied.
    for (kind, port) in [
        ("mptcp4", mptcp.port4),
        ("mptcp6", mptcp.port6),
        ("mptcp4", plain.port4),
        ("mptcp6", plain.port6),
    ] {
        let (admitted, errno) = cycles(&mut h, kind, port, 250);
        assert_eq!(admitted, 250, "{kind} to port {port}: last errno {errno}");
        scratch.wait_live(MPTCP_USER, 0);
    }
    // MPTCP connections held open count against the cap like TCP ones, and free their
    // slots when closed.
    for _ in 0..3 {
        assert!(h.connect("mptcp4", mptcp.port4).is_ok());
    }
    assert_eq!(scratch.live(MPTCP_USER), 3);
    assert!(matches!(
        h.connect("mptcp4", mptcp.port4),
        Connect::Err(EPERM, _)
    ));
    assert!(matches!(
        h.connect("tcp4", plain.port4),
        Connect::Err(EPERM, _)
    ));
    // Across a restart: the new programs release what the old ones charged.
    agent.stop();
    let _agent = Agent::start(&scratch);
    assert_eq!(scratch.live(MPTCP_USER), 3);
    h.close_all();
    scratch.wait_live(MPTCP_USER, 0);
    h.exit();
    assert_eq!(scratch.stats().host.live, 0, "host count back to zero");
}

#[test]
fn mptcp_churn_under_a_host_cap_locks_nobody_out() {
    if !privileged("mptcp_churn_under_a_host_cap_locks_nobody_out") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(&cgroup, "host_conns = 100\n", "");
    let _agent = Agent::start(&scratch);
    let listener = Listener::dropping();
    let mut churner = Helper::spawn(&cgroup.path, CHURNER);
    let (admitted, errno) = cycles(&mut churner, "mptcp4", listener.port4, 150);
    assert_eq!(admitted, 150, "last errno {errno}");
    churner.exit();
    let mut bystander = Helper::spawn(&cgroup.path, BYSTANDER);
    assert!(
        bystander.connect("tcp4", listener.port4).is_ok(),
        "another UID is locked out after MPTCP churn"
    );
    bystander.close_all();
    scratch.wait_live(BYSTANDER, 0);
    scratch.wait_live(CHURNER, 0);
}

#[test]
fn denials_are_counted_once_while_two_program_generations_run() {
    if !privileged("denials_are_counted_once_while_two_program_generations_run") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(&cgroup, "", &quota(&format!("user:{GEN_USER}"), "1"));
    let first = Agent::start(&scratch);
    // Hold the first generation's links, so they stay attached when the second agent
    // replaces their pins: the two generations then run side by side, as they do for a
    // moment during every restart.
    let pins = PinLayout::new(&scratch.pin_path());
    let held: Vec<PinnedLink> = [names::PROG_CONNECT4, names::PROG_CONNECT6]
        .iter()
        .map(|n| PinnedLink::from_pin(pins.link(n)).expect("opening a pinned link"))
        .collect();
    first.stop();
    let _second = Agent::start(&scratch);
    let listener = Listener::new();
    let mut h = Helper::spawn(&cgroup.path, GEN_USER);
    assert!(h.connect("tcp4", listener.port4).is_ok());
    for _ in 0..3 {
        assert!(matches!(
            h.connect("tcp4", listener.port4),
            Connect::Err(EPERM, _)
        ));
    }
    let counters = scratch.stats().per_uid[&GEN_USER];
    assert_eq!(counters.denied[reason::CAP], 3, "{counters:?}");
    assert_eq!(counters.live, 1, "{counters:?}");
    drop(held);
    h.close_all();
    scratch.wait_live(GEN_USER, 0);
}

#[test]
fn an_exempt_uid_filling_the_socket_map_lifts_no_cap() {
    if !privileged("an_exempt_uid_filling_the_socket_map_lifts_no_cap") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(
        &cgroup,
        "max_tracked_sockets = 1024\ncount_udp = true\n",
        &format!(
            "{}{}",
            quota("user:*", "2"),
            quota(&format!("user:{EXEMPT}"), "\"max\"")
        ),
    );
    let _agent = Agent::start(&scratch);
    let listener = Listener::new();
    let mut exempt = Helper::spawn(&cgroup.path, EXEMPT);
    // As many connections as the map holds, and as many sockets whose connect() the peer
    // refused (kept open).
    let (ok, failed) = hold(&mut exempt, "udp4", listener.port4, 1024);
    assert_eq!((ok, failed), (1024, 0));
    let closed = free_port();
    let (ok, failed) = hold(&mut exempt, "tcp4", closed, 1024);
    assert_eq!(
        (ok, failed),
        (0, 1024),
        "connects to a closed port are refused"
    );
    let stats = scratch.stats();
    assert!(
        stats.host.uncapped_sockets <= 512,
        "an uncapped UID used {} of 1024 entries",
        stats.host.uncapped_sockets
    );
    // A capped UID's first connections are still counted and capped.
    let mut late = Helper::spawn(&cgroup.path, LATECOMER);
    assert!(late.connect("tcp4", listener.port4).is_ok());
    assert!(late.connect("tcp4", listener.port4).is_ok());
    assert!(
        matches!(late.connect("tcp4", listener.port4), Connect::Err(EPERM, _)),
        "a capped UID failed open with the socket map full of an exempt UID's sockets"
    );
    assert_eq!(scratch.live(LATECOMER), 2);
    exempt.close_all();
    late.close_all();
    scratch.wait_live(LATECOMER, 0);
}

/// Every per-UID counter taken: UIDs under a capped `user:*` make their counters without a
/// budget, so a root helper switching its real UID per socket takes all 262,144 of them,
/// and the UIDs after that find none. Retirement is put off so that none comes back.
#[test]
fn a_capped_uid_is_held_with_every_uid_counter_taken() {
    if !privileged("a_capped_uid_is_held_with_every_uid_counter_taken") {
        return;
    }
    const EXTRA: u32 = 1000;
    let capacity = rlagent_common::MAX_UID_CONNS;
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(
        &cgroup,
        "count_udp = true\nuid_retire_interval = \"24h\"\n",
        &format!(
            "{}{}",
            quota("user:*", "2"),
            quota(&format!("user:{LATE_AFTER_MANY}"), "2")
        ),
    );
    let _agent = Agent::start(&scratch);
    let listener = Listener::new();
    let before = scratch.stats();
    assert!(
        before.per_uid.contains_key(&LATE_AFTER_MANY),
        "a UID with a limit of its own has its counters from the start"
    );
    let room = capacity - before.uid_entries as u32;
    let mut root = Helper::spawn(&cgroup.path, 0);
    let started = Instant::now();
    let reply = root.cmd(&format!(
        "multi-uid-once 300000 {} {}",
        room + EXTRA,
        listener.port4
    ));
    assert_eq!(
        reply,
        format!("ok {room}"),
        "the UIDs past the capacity are denied"
    );
    let stats = scratch.stats();
    println!("{} UIDs connected in {:?}", room + EXTRA, started.elapsed());
    assert_eq!(stats.uid_entries, capacity as usize, "every counter taken");
    assert_eq!(stats.host.denied_full, u64::from(EXTRA), "{:?}", stats.host);
    assert_eq!((stats.host.live, stats.host.untracked), (0, 0));
    // The UID with a limit of its own is held at its cap by its own counters...
    let mut late = Helper::spawn(&cgroup.path, LATE_AFTER_MANY);
    assert!(late.connect("tcp4", listener.port4).is_ok());
    assert!(late.connect("tcp4", listener.port4).is_ok());
    assert!(
        matches!(late.connect("tcp4", listener.port4), Connect::Err(EPERM, _)),
        "a capped UID failed open with every UID counter taken"
    );
    // ...and a capped UID without counters is denied and counted, never let through.
    let mut without = Helper::spawn(&cgroup.path, NO_COUNTERS_LEFT);
    assert!(matches!(
        without.connect("tcp4", listener.port4),
        Connect::Err(EPERM, _)
    ));
    let stats = scratch.stats();
    assert_eq!(stats.host.denied_full, u64::from(EXTRA) + 1);
    assert_eq!(stats.per_uid[&LATE_AFTER_MANY].live, 2);
    assert!(!stats.per_uid.contains_key(&NO_COUNTERS_LEFT));
    root.close_all();
    late.close_all();
    scratch.wait_live(LATE_AFTER_MANY, 0);
}

/// A capped UID holding as many sockets as the socket map has room for: the next one is
/// decided by `on_full`, and counted.
#[test]
fn a_full_socket_map_denies_capped_uids_or_lets_them_through_as_on_full_says() {
    if !privileged("a_full_socket_map_denies_capped_uids") {
        return;
    }
    const BIG_CAP: u32 = 61108;
    for (on_full, admitted) in [("deny", 1024), ("allow", 1030)] {
        let cgroup = TestCgroup::new();
        let scratch = Scratch::new();
        scratch.write_config(
            &cgroup,
            &format!("max_tracked_sockets = 1024\ncount_udp = true\non_full = \"{on_full}\"\n"),
            &quota(&format!("user:{BIG_CAP}"), "5000"),
        );
        let agent = Agent::start(&scratch);
        let listener = Listener::new();
        let mut h = Helper::spawn(&cgroup.path, BIG_CAP);
        let (ok, failed) = hold(&mut h, "udp4", listener.port4, 1030);
        assert_eq!((ok, 1030 - ok), (admitted, failed), "on_full = {on_full}");
        let host = scratch.stats().host;
        match on_full {
            "deny" => assert_eq!((host.denied_full, host.untracked), (6, 0), "{host:?}"),
            _ => assert_eq!((host.denied_full, host.untracked), (0, 6), "{host:?}"),
        }
        h.close_all();
        scratch.wait_live(BIG_CAP, 0);
        drop(agent);
        scratch.uninstall();
    }
}

#[test]
fn connections_open_before_the_first_start_count_against_the_cap() {
    if !privileged("connections_open_before_the_first_start_count_against_the_cap") {
        return;
    }
    const SEEDER: u32 = 61109;
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(&cgroup, "", &quota(&format!("user:{SEEDER}"), "2"));
    let listener = Listener::new();
    let mut h = Helper::spawn(&cgroup.path, SEEDER);
    let ids: Vec<u64> = (0..5)
        .map(|_| h.connect("tcp4", listener.port4).id())
        .collect();
    let agent = Agent::start(&scratch);
    assert_eq!(
        scratch.live(SEEDER),
        5,
        "the 5 open connections are counted"
    );
    assert!(matches!(
        h.connect("tcp6", listener.port6),
        Connect::Err(EPERM, _)
    ));
    for id in &ids[..4] {
        h.close(*id);
    }
    scratch.wait_live(SEEDER, 1);
    assert!(h.connect("tcp4", listener.port4).is_ok());
    assert!(matches!(
        h.connect("tcp4", listener.port4),
        Connect::Err(EPERM, _)
    ));
    // A restart adopts the counts; it does not count the open connections again.
    agent.stop();
    let _agent = Agent::start(&scratch);
    assert_eq!(scratch.live(SEEDER), 2);
    assert!(matches!(
        h.connect("tcp4", listener.port4),
        Connect::Err(EPERM, _)
    ));
    h.close_all();
    scratch.wait_live(SEEDER, 0);
    assert_eq!(scratch.stats().host.live, 0);
}

/// Every other way to open a connection meets the same cap, and gives its charge back.
#[test]
fn the_cap_holds_against_every_connect_vector() {
    if !privileged("the_cap_holds_against_every_connect_vector") {
        return;
    }
    const VECTOR_USER: u32 = 61110;
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(&cgroup, "", &quota(&format!("user:{VECTOR_USER}"), "2"));
    let _agent = Agent::start(&scratch);
    let listener = Listener::new();
    let mut h = Helper::spawn(&cgroup.path, VECTOR_USER);
    for vector in [
        "tfo-sendto",
        "tfo-connect",
        "io-uring",
        "v4-mapped",
        "nonblock",
    ] {
        for _ in 0..2 {
            let reply = h.cmd(&format!("vector {vector} {}", listener.port4));
            assert!(reply.starts_with("ok"), "{vector}: {reply}");
        }
        let reply = h.cmd(&format!("vector {vector} {}", listener.port4));
        assert!(
            reply.starts_with(&format!("err {EPERM}")),
            "{vector}: a third connection got {reply}"
        );
        assert_eq!(scratch.live(VECTOR_USER), 2, "{vector}");
        h.close_all();
        scratch.wait_live(VECTOR_USER, 0);
    }
    // Non-blocking connect storms from several processes at once: never more than the cap.
    let mut storm: Vec<Helper> = (0..4)
        .map(|_| Helper::spawn(&cgroup.path, VECTOR_USER))
        .collect();
    for round in 0..10 {
        for w in storm.iter_mut() {
            w.send(&format!("vector nonblock {}", listener.port4));
        }
        let admitted = storm
            .iter_mut()
            .map(|w| w.reply())
            .filter(|r| r.starts_with("ok"))
            .count();
        assert!(
            admitted <= 2,
            "round {round}: {admitted} admitted against cap 2"
        );
        assert!(scratch.live(VECTOR_USER) <= 2);
        for w in storm.iter_mut() {
            w.close_all();
        }
        scratch.wait_live(VECTOR_USER, 0);
    }
}

/// The kernel reuses a deleted counter entry's memory for the next insert at once, so a
/// connect() that looked up its UID's counters just before the retirement deleted them
/// may hold a pointer to memory that has become another UID's counters, or still holds
/// counters being retired. Here those words are written by hand into the UID's own entry,
/// where every connect() meets them: none is ever charged there (the UID, which has a
/// cap, is refused as with a full map, and the word is left exactly as it was), and once
/// the entry is gone the UID gets fresh counters of its own.
#[test]
fn counters_that_name_another_owner_or_are_retired_are_never_charged() {
    if !privileged("counters_that_name_another_owner_or_are_retired_are_never_charged") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(
        &cgroup,
        "count_udp = true",
        &quota(&format!("user:{REUSED}"), "3"),
    );
    let _agent = Agent::start(&scratch);
    let mut counters: HashMap<MapData, u32, Conns> = scratch.pinned_hash_map(names::UID_CONNS);
    let mut h = Helper::spawn(&cgroup.path, REUSED);
    let words = [
        Conns::live_word(OTHER_OWNER, 0),
        Conns::live_word(OTHER_OWNER, 2),
        Conns::live_word(REUSED, RETIRED),
    ];
    for (i, word) in words.into_iter().enumerate() {
        let planted = Conns {
            live: word,
            ..Conns::new(REUSED, 0)
        };
        counters
            .insert(REUSED, planted, 0)
            .expect("planting the word");
        assert!(
            matches!(h.connect("udp4", 9), Connect::Err(EPERM, _)),
            "word {word:#x}"
        );
        let after = counters.get(&REUSED, 0).expect("the planted entry");
        assert_eq!(after.live, word, "word {word:#x}: something was left on it");
        let host = scratch.stats().host;
        assert_eq!((host.live, host.denied_full), (0, i as u64 + 1), "{host:?}");
        h.close_all();
    }
    // The retirement's delete: the next connect() makes counters tagged with the UID.
    counters
        .remove(&REUSED)
        .expect("removing the planted entry");
    assert_eq!(hold(&mut h, "udp4", 9, 4), (3, 1));
    let fresh = counters.get(&REUSED, 0).expect("fresh counters");
    assert_eq!(fresh.live, Conns::live_word(REUSED, 3), "{fresh:?}");
    h.close_all();
    scratch.wait_live(REUSED, 0);
}
