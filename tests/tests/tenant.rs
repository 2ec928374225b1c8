//! Connection accounting a tenant cannot bend: each case here is a way a hostile (or
//! merely unlucky) tenant got past a limit, tried against the real agent and kernel
//! programs in a child cgroup of this host's cgroup2 mount. Needs root (skips otherwise,
//! fails under RLAGENT_REQUIRE_PRIVILEGED=1).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rlagent_common::reason;
use rlagent_tests::{privileged, Agent, Connect, Helper, Listener, Scratch, TestCgroup};

const EPERM: i32 = libc::EPERM;

struct Setup {
    cgroup: TestCgroup,
    scratch: Scratch,
}

impl Setup {
    /// An agent config attached to a new test cgroup, its groups under `<cgroup>/slice`.
    fn new(bpf: &str, quotas: &str) -> Self {
        let cgroup = TestCgroup::new();
        let scratch = Scratch::new();
        scratch.write_config_with_groups(&cgroup, bpf, quotas);
        Self { cgroup, scratch }
    }

    fn group(&self, name: &str) -> PathBuf {
        self.cgroup.path.join("slice").join(name)
    }
}

fn quota(target: &str, fields: &str) -> String {
    format!("[[quota]]\ntarget = \"{target}\"\n{fields}\n")
}

/// The two numbers of a helper's `ok <a> <b>` reply.
fn pair(reply: &str) -> (u64, u64) {
    match reply.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["ok", a, b] => (a.parse().unwrap(), b.parse().unwrap()),
        _ => panic!("unexpected helper reply {reply:?}"),
    }
}

fn hold(h: &mut Helper, kind: &str, port: u16, n: u32) -> (u64, u64) {
    pair(&h.cmd(&format!("hold {kind} {port} {n}")))
}

/// Moves a helper (by PID) into the cgroup at `path`; its next connect() is made there.
fn move_to(path: &Path, h: &Helper) {
    std::fs::write(path.join("cgroup.procs"), h.pid().to_string())
        .unwrap_or_else(|e| panic!("moving {} to {}: {e}", h.pid(), path.display()));
}

#[test]
fn a_socket_disconnected_with_af_unspec_takes_a_rate_token_at_every_connect() {
    if !privileged("af_unspec_reconnects_take_tokens") {
        return;
    }
    const RATE: f64 = 20.0;
    const BURST: f64 = 5.0;
    let rate = "conn_rate = \"20/s\"\nconn_burst = 5";
    let s = Setup::new(
        "count_udp = true",
        &[
            quota("user:63001", rate),
            quota("user:63002", rate),
            quota("paced", rate),
        ]
        .concat(),
    );
    let _agent = Agent::start(&s.scratch);
    let listener = Listener::dropping();
    let (root, paced) = (s.cgroup.path.clone(), s.group("paced"));
    // The UID's own rate for TCP and UDP; the group's rate for a UID with none of its own.
    for (uid, kind, port, at, why) in [
        (63001, "tcp4", listener.port4, &root, reason::RATE),
        (63002, "udp4", 9, &root, reason::RATE),
        (63003, "tcp4", listener.port4, &paced, reason::GROUP_RATE),
    ] {
        let mut h = Helper::spawn(at, uid);
        let start = Instant::now();
        let (admitted, attempts) = pair(&h.cmd(&format!("unspec-for {kind} {port} 1500")));
        let elapsed = start.elapsed().as_secs_f64();
        let bound = BURST + RATE * elapsed;
        assert!(
            admitted as f64 <= bound,
            "{kind}: {admitted} of {attempts} reconnects of one socket admitted in {elapsed:.2} s, \
             more than burst + rate x elapsed = {bound:.1}"
        );
        assert!(
            admitted as f64 >= BURST + RATE * 1.3,
            "{kind}: only {admitted} of {attempts} admitted"
        );
        assert!(
            attempts > admitted * 2,
            "{kind}: the loop pressed the limit"
        );
        let c = s.scratch.conns(uid);
        assert_eq!(c.admitted, admitted, "{kind}: {c:?}");
        assert_eq!(c.denied[why], attempts - admitted, "{kind}: {c:?}");
        s.scratch.wait_live(uid, 0);
    }
}

#[test]
fn a_socket_charged_outside_a_full_group_is_refused_when_reconnected_inside_it() {
    if !privileged("reconnect_inside_a_full_group") {
        return;
    }
    let s = Setup::new("", &quota("full", "conns = 3"));
    let _agent = Agent::start(&s.scratch);
    let listener = Listener::new();
    let port = listener.port4;
    let full = s.group("full");
    let mut member = Helper::spawn(&full, 63010);
    assert_eq!(hold(&mut member, "tcp4", port, 3), (3, 0));
    let mut outsider = Helper::spawn(&s.cgroup.path, 63011);
    let id = outsider.connect("tcp4", port).id();
    move_to(&full, &outsider);
    assert_eq!(outsider.cmd(&format!("disconnect {id}")), "ok");
    assert_eq!(
        outsider.reconnect(id, port),
        Err(EPERM),
        "a reconnect inside a full group is a new connection of the group"
    );
    assert_eq!(s.scratch.group_conns(&full).live, 3);
    assert_eq!(s.scratch.group_conns(&full).denied[reason::GROUP], 1);
    // With room in the group the reconnect is admitted and charged to the group, and its
    // close gives the group its slot back.
    member.cmd("close 1");
    s.scratch.wait_group_live(&full, 2);
    assert_eq!(outsider.reconnect(id, port), Ok(()));
    assert_eq!(s.scratch.group_conns(&full).live, 3);
    assert!(matches!(
        member.connect("tcp4", port),
        Connect::Err(EPERM, _)
    ));
    outsider.close(id);
    s.scratch.wait_group_live(&full, 2);
    assert_eq!(s.scratch.live(63011), 0);
}

#[test]
fn a_changed_rate_or_burst_takes_effect_at_the_next_connect() {
    if !privileged("changed_rate_takes_effect") {
        return;
    }
    const SLOW: u32 = 63020;
    const BURSTY: u32 = 63021;
    let s = Setup::new(
        "",
        &[
            quota(
                &format!("user:{SLOW}"),
                "conn_rate = \"1/min\"\nconn_burst = 10",
            ),
            quota(
                &format!("user:{BURSTY}"),
                "conn_rate = \"10/s\"\nconn_burst = 20",
            ),
        ]
        .concat(),
    );
    let _agent = Agent::start(&s.scratch);
    let listener = Listener::dropping();
    let port = listener.port4;

    // A slow bucket used up (its next token 10 minutes away), then raised.
    let mut h = Helper::spawn(&s.cgroup.path, SLOW);
    assert_eq!(pair(&h.cmd(&format!("cycles tcp4 {port} 10"))).0, 10);
    assert_eq!(pair(&h.cmd(&format!("cycles tcp4 {port} 3"))).0, 0);
    let target = format!("user:{SLOW}");
    s.scratch.rlctl_ok(&[
        "set-quota",
        &target,
        "--conn-rate",
        "1000/s",
        "--conn-burst",
        "1000",
    ]);
    // The bucket stays empty but refills at the new rate from now: about 200 in 200 ms.
    let (admitted, attempts) = pair(&h.cmd(&format!("for tcp4 {port} 200")));
    assert!(
        admitted >= 100,
        "{admitted} of {attempts} admitted in 200 ms after the rate was raised to 1000/s"
    );
    // And back to a slow one: its burst of 2 holds (no clamp is needed here: the fast
    // bucket's state lies within the slow one's window).
    s.scratch.rlctl_ok(&[
        "set-quota",
        &target,
        "--conn-rate",
        "1/min",
        "--conn-burst",
        "2",
    ]);
    let (admitted, _) = pair(&h.cmd(&format!("cycles tcp4 {port} 5")));
    assert!(admitted <= 2, "{admitted} of 5 admitted at 1/min burst 2");

    // A burst lowered: 20 used up at 10/s (2 s until the bucket is full again); with a
    // burst of 2 the next token is 100 ms away, not 1.9 s.
    let mut h = Helper::spawn(&s.cgroup.path, BURSTY);
    assert_eq!(pair(&h.cmd(&format!("cycles tcp4 {port} 20"))).0, 20);
    s.scratch.rlctl_ok(&[
        "set-quota",
        &format!("user:{BURSTY}"),
        "--conn-rate",
        "10/s",
        "--conn-burst",
        "2",
    ]);
    let start = Instant::now();
    let (admitted, attempts) = pair(&h.cmd(&format!("for tcp4 {port} 700")));
    assert!(
        admitted >= 3,
        "{admitted} of {attempts} admitted in 700 ms at 10/s after the burst was lowered \
         (took {:?})",
        start.elapsed()
    );
}

#[test]
fn tenants_in_monitor_mode_or_with_only_a_rate_cannot_fill_the_socket_map() {
    if !privileged("monitor_or_rate_only_tenants_cannot_fill_the_map") {
        return;
    }
    const FILLER: u32 = 63030;
    const VICTIM: u32 = 63031;
    let huge_rate = "conn_rate = \"1000000/s\"\nconn_burst = 100000";
    let tenants = [
        (
            "monitor",
            quota(&format!("user:{FILLER}"), "conns = 1\nmode = \"monitor\""),
            None,
        ),
        (
            "rate only",
            quota(&format!("user:{FILLER}"), huge_rate),
            None,
        ),
        ("group rate only", quota("flood", huge_rate), Some("flood")),
    ];
    for (tenant, filler_quota, group) in &tenants {
        for on_full in ["deny", "allow"] {
            let s = Setup::new(
                &format!("max_tracked_sockets = 1024\ncount_udp = true\non_full = \"{on_full}\""),
                &[
                    filler_quota.clone(),
                    quota(&format!("user:{VICTIM}"), "conns = 5"),
                ]
                .concat(),
            );
            let agent = Agent::start(&s.scratch);
            let at = group.map_or(s.cgroup.path.clone(), |g| s.group(g));
            let mut filler = Helper::spawn(&at, FILLER);
            let (ok, failed) = hold(&mut filler, "udp4", 9, 1100);
            assert_eq!(
                (ok, failed),
                (1100, 0),
                "{tenant}: nothing enforces on the filler"
            );
            let host = s.scratch.stats().host;
            assert!(
                host.uncapped_sockets <= 512,
                "{tenant}, on_full = {on_full}: the filler took {} of 1024 entries",
                host.uncapped_sockets
            );
            let mut victim = Helper::spawn(&s.cgroup.path, VICTIM);
            assert_eq!(
                hold(&mut victim, "udp4", 9, 8),
                (5, 3),
                "{tenant}, on_full = {on_full}: the victim's cap of 5"
            );
            assert_eq!(s.scratch.conns(VICTIM).denied[reason::CAP], 3);
            drop((filler, victim));
            s.scratch.wait_live(VICTIM, 0);
            drop(agent);
            s.scratch.uninstall();
        }
    }
}

#[test]
fn monitor_mode_would_deny_as_many_connects_as_enforce_mode_denies() {
    if !privileged("monitor_counts_exactly") {
        return;
    }
    // Every combination of a cap, a rate, a group cap and a group rate; each once in
    // enforce mode and once in monitor mode, for a UID (and group) of its own. Monitor mode
    // counts a connect() once, at its first excess, and takes no token after it.
    const PARTS: [&str; 4] = [
        "conns = 5",
        "conn_rate = \"1/min\"\nconn_burst = 3",
        "conns = 4",
        "conn_rate = \"1/min\"\nconn_burst = 6",
    ];
    let monitor = "mode = \"monitor\"\n";
    let combos: Vec<u32> = (1..16).collect();
    let mut quotas = String::new();
    for &combo in &combos {
        for (m, mode) in [(0, ""), (1, monitor)] {
            let uid = 63100 + combo * 2 + m;
            let own: Vec<&str> = (0..2)
                .filter(|i| combo & (1 << i) != 0)
                .map(|i| PARTS[i])
                .collect();
            let grouped: Vec<&str> = (2..4)
                .filter(|i| combo & (1 << i) != 0)
                .map(|i| PARTS[i])
                .collect();
            if !own.is_empty() {
                quotas += &quota(
                    &format!("user:{uid}"),
                    &format!("{}\n{mode}", own.join("\n")),
                );
            }
            if !grouped.is_empty() {
                quotas += &quota(
                    &format!("g{uid}"),
                    &format!("{}\n{mode}", grouped.join("\n")),
                );
            }
        }
    }
    let s = Setup::new("", &quotas);
    let _agent = Agent::start(&s.scratch);
    let listener = Listener::new();
    let mut helpers = Vec::new();
    for &combo in &combos {
        let mut totals = Vec::new();
        for m in [0, 1] {
            let uid = 63100 + combo * 2 + m;
            let grouped = combo & 0b1100 != 0;
            let at = if grouped {
                s.group(&format!("g{uid}"))
            } else {
                s.cgroup.path.clone()
            };
            let mut h = Helper::spawn(&at, uid);
            let (ok, failed) = hold(&mut h, "tcp4", listener.port4, 8);
            helpers.push(h);
            let c = s.scratch.conns(uid);
            let (denied, would): (u64, u64) = (c.denied.iter().sum(), c.would_deny.iter().sum());
            if m == 0 {
                assert_eq!(
                    (would, denied),
                    (0, failed),
                    "combo {combo:04b} enforce: {c:?}"
                );
            } else {
                assert_eq!((ok, denied), (8, 0), "combo {combo:04b} monitor: {c:?}");
            }
            totals.push(denied + would);
        }
        // The same number of connect() calls; the reason can differ, where a connection
        // monitor mode let in fills a cap enforce mode never reached.
        assert!(totals[0] > 0, "combo {combo:04b}: nothing was denied");
        assert_eq!(
            totals[0], totals[1],
            "combo {combo:04b}: denied in enforce mode vs would-deny in monitor mode"
        );
    }
}

#[test]
fn root_connections_do_not_count_toward_the_host_cap() {
    if !privileged("root_not_charged") {
        return;
    }
    const USER: u32 = 63040;
    let s = Setup::new("host_conns = 2", &quota("rootwork", "conns = 1"));
    let _agent = Agent::start(&s.scratch);
    let listener = Listener::new();
    // Root (as the kernel sockets of an NFS or SMB mount do) holds connections open.
    let mut root = Helper::spawn(&s.cgroup.path, 0);
    assert_eq!(hold(&mut root, "tcp4", listener.port4, 3), (3, 0));
    let stats = s.scratch.stats();
    assert_eq!(stats.host.live, 0, "root is not charged: {:?}", stats.host);
    assert!(!stats.per_uid.contains_key(&0), "no counters for root");
    let mut user = Helper::spawn(&s.cgroup.path, USER);
    assert_eq!(hold(&mut user, "tcp4", listener.port4, 1), (1, 0));
    // Under a host cap, a listed UID has its host_cap series before its first denial.
    let (head, body) = rlagent_tests::http_get(s.scratch.metrics_port(), "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let series = format!("rlagent_connections_denied_total{{uid=\"{USER}\",reason=\"host_cap\"}}");
    assert_eq!(rlagent_tests::sample(&body, &series), Some(0.0), "{body}");
    assert_eq!(
        hold(&mut user, "tcp4", listener.port4, 2),
        (1, 1),
        "the host cap counts the users' connections only"
    );
    assert_eq!(s.scratch.conns(USER).denied[reason::HOST_CAP], 1);
    // A root process in a group with a cap is held to the group's cap.
    let mut in_group = Helper::spawn(&s.group("rootwork"), 0);
    assert_eq!(hold(&mut in_group, "tcp4", listener.port4, 2), (1, 1));
    assert_eq!(s.scratch.group_conns(&s.group("rootwork")).live, 1);
}

#[test]
fn the_host_cap_holds_past_the_budget_of_unbounded_charges() {
    if !privileged("host_cap_past_the_budget") {
        return;
    }
    const UNCAPPED: u32 = 63050;
    let s = Setup::new(
        "max_tracked_sockets = 1024\ncount_udp = true\nhost_conns = 512",
        "",
    );
    let _agent = Agent::start(&s.scratch);
    let mut h = Helper::spawn(&s.cgroup.path, UNCAPPED);
    assert_eq!(hold(&mut h, "udp4", 9, 600), (512, 88));
    let c = s.scratch.conns(UNCAPPED);
    assert_eq!(c.denied[reason::HOST_CAP], 88, "{c:?}");
    assert_eq!(s.scratch.stats().host.untracked, 0);
    // A reload cannot raise the map's size (a restart setting), so a host cap the pinned
    // map cannot honour is refused, and the cap in force stays.
    let text = std::fs::read_to_string(s.scratch.config_path()).unwrap();
    let raised = text
        .replace("max_tracked_sockets = 1024", "max_tracked_sockets = 4096")
        .replace("host_conns = 512", "host_conns = 2000");
    std::fs::write(s.scratch.config_path(), raised).unwrap();
    let out = s.scratch.rlctl(&["reload"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a host cap past the pinned map's half"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("host_conns = 2000 cannot be honoured"),
        "{err}"
    );
    let mut other = Helper::spawn(&s.cgroup.path, UNCAPPED + 1);
    assert_eq!(
        hold(&mut other, "udp4", 9, 1),
        (0, 1),
        "the cap of 512 holds"
    );
}

#[test]
fn a_full_map_under_on_full_allow_still_applies_rates() {
    if !privileged("on_full_allow_keeps_rates") {
        return;
    }
    const FILLER: u32 = 63080;
    const RATED: u32 = 63081;
    let s = Setup::new(
        "max_tracked_sockets = 1024\ncount_udp = true\non_full = \"allow\"",
        &[
            quota(&format!("user:{FILLER}"), "conns = 5000"),
            quota(
                &format!("user:{RATED}"),
                "conns = 100\nconn_rate = \"1/min\"\nconn_burst = 3",
            ),
        ]
        .concat(),
    );
    let _agent = Agent::start(&s.scratch);
    // A capped UID's charges fill the whole map.
    let mut filler = Helper::spawn(&s.cgroup.path, FILLER);
    assert_eq!(hold(&mut filler, "udp4", 9, 1030), (1030, 0));
    assert!(s.scratch.stats().host.untracked >= 6);
    // Past the full map a connect() goes through uncounted, but within its rate.
    let mut rated = Helper::spawn(&s.cgroup.path, RATED);
    assert_eq!(hold(&mut rated, "udp4", 9, 6), (3, 3));
    assert_eq!(s.scratch.conns(RATED).denied[reason::RATE], 3);
}

#[test]
fn a_cap_set_after_the_first_start_counts_connections_older_than_the_agent() {
    if !privileged("seeding_every_uid") {
        return;
    }
    const OLD: u32 = 63060;
    let s = Setup::new("", "");
    let listener = Listener::new();
    let mut h = Helper::spawn(&s.cgroup.path, OLD);
    assert_eq!(hold(&mut h, "tcp4", listener.port4, 3), (3, 0));
    let _agent = Agent::start(&s.scratch);
    assert_eq!(s.scratch.live(OLD), 3, "seeded without a cap");
    s.scratch
        .rlctl_ok(&["set-quota", &format!("user:{OLD}"), "--conns", "3"]);
    assert!(matches!(
        h.connect("tcp4", listener.port4),
        Connect::Err(EPERM, _)
    ));
    h.cmd("close 1");
    s.scratch.wait_live(OLD, 2);
    assert!(h.connect("tcp4", listener.port4).is_ok());
}

#[test]
fn subordinate_uids_are_charged_capped_and_reported_as_their_owner() {
    if !privileged("subordinate_uids_belong_to_their_owner") {
        return;
    }
    const OWNER: u32 = 63200;
    const FIRST: u32 = 400_000;
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    let subuid = scratch.dir.path().join("subuid");
    std::fs::write(
        &subuid,
        format!("# rootless containers\n{OWNER}:{FIRST}:65536\n"),
    )
    .unwrap();
    scratch.write_config_with_groups(
        &cgroup,
        &format!("subuid_file = \"{}\"", subuid.display()),
        &quota(&format!("user:{OWNER}"), "conns = 3"),
    );
    let s = Setup { cgroup, scratch };
    let _agent = Agent::start(&s.scratch);
    let listener = Listener::new();
    let port = listener.port4;
    let mut owner = Helper::spawn(&s.cgroup.path, OWNER);
    let mut first = Helper::spawn(&s.cgroup.path, FIRST);
    let mut last = Helper::spawn(&s.cgroup.path, FIRST + 65535);
    assert!(owner.connect("tcp4", port).is_ok());
    assert!(first.connect("tcp4", port).is_ok());
    assert!(last.connect("tcp4", port).is_ok());
    assert!(
        matches!(first.connect("tcp4", port), Connect::Err(EPERM, _)),
        "the owner's cap of 3 holds for its containers' UIDs"
    );
    let stats = s.scratch.stats();
    assert_eq!(stats.per_uid[&OWNER].live, 3);
    assert_eq!(stats.per_uid[&OWNER].denied[reason::CAP], 1);
    assert!(
        !stats.per_uid.contains_key(&FIRST),
        "no counters of its own"
    );
    // The denial is reported as the owner's (events are read from the ring as they come).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = s.scratch.rlctl_ok(&["events", "--uid", &OWNER.to_string()]);
        if out.contains(" cap ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no cap event of uid {OWNER}: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Outside the range, a UID is itself.
    let mut outside = Helper::spawn(&s.cgroup.path, FIRST + 65536);
    assert!(outside.connect("tcp4", port).is_ok());

    // A malformed file is refused on reload; the ranges stay.
    std::fs::write(&subuid, format!("{OWNER}:{FIRST}\n")).unwrap();
    let out = s.scratch.rlctl(&["reload"]);
    assert!(!out.status.success(), "a malformed subuid file is refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1"), "{err}");
    let mut next = Helper::spawn(&s.cgroup.path, FIRST + 1);
    assert!(matches!(next.connect("tcp4", port), Connect::Err(EPERM, _)));

    // The range removed (the file changes on disk: the agent reloads by itself), the same
    // UID is its own again.
    std::fs::write(&subuid, "# no ranges\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !next.connect("tcp4", port).is_ok() {
        assert!(Instant::now() < deadline, "the removed range still maps");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s.scratch.live(FIRST + 1), 1);
}

#[test]
fn idle_uid_counters_are_retired_while_connects_race_them() {
    if !privileged("idle_uid_counters_retired") {
        return;
    }
    // UIDs from 510,000 up get the default cap of 3; the 3,000 UIDs below connect once each
    // and have no limit. Rounds every second: counters idle for two rounds go.
    const CHURN: u32 = 500_000;
    const RACERS: [u32; 2] = [520_001, 520_002];
    const HOLDER: u32 = 520_003;
    let s = Setup::new(
        "count_udp = true\nuid_min = 510000\nuid_retire_interval = \"1s\"",
        &quota("user:*", "conns = 3"),
    );
    let _agent = Agent::start(&s.scratch);
    let listener = Listener::new();
    let mut root = Helper::spawn(&s.cgroup.path, 0);
    let churn = format!("multi-uid-once {CHURN} 3000 9");
    assert_eq!(root.cmd(&churn), "ok 3000");
    assert_eq!(s.scratch.stats().host.uncapped_uids, 3000);
    let mut holder = Helper::spawn(&s.cgroup.path, HOLDER);
    assert_eq!(hold(&mut holder, "tcp4", listener.port4, 2), (2, 0));
    // Racers connect and close as fast as they can while the rounds run; the churned
    // UIDs connect again every 2.2 s, so their counters are retired between passes and
    // made again, and some passes meet a round retiring them. A charge added to counters
    // that were going would be lost, and its release would take a later count below 0.
    let mut racers: Vec<Helper> = RACERS
        .iter()
        .map(|uid| Helper::spawn(&s.cgroup.path, *uid))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut next_pass = Instant::now();
    while Instant::now() < deadline {
        for h in &mut racers {
            h.send("for udp4 9 50");
        }
        for h in &mut racers {
            let (admitted, attempts) = pair(&h.reply());
            assert_eq!(
                admitted, attempts,
                "a racer was refused: nothing of it is live"
            );
        }
        if Instant::now() >= next_pass {
            assert_eq!(root.cmd(&churn), "ok 3000");
            next_pass = Instant::now() + Duration::from_millis(2200);
        }
    }
    // Every churned UID's counters go, and with them their place in the budget.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = s.scratch.stats();
        let left = stats
            .per_uid
            .keys()
            .filter(|uid| (CHURN..CHURN + 3000).contains(uid))
            .count();
        if left == 0 && stats.host.uncapped_uids == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} churned UIDs keep counters, uncapped_uids {}",
            stats.host.uncapped_uids
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let gone = s.scratch.maps().settings().unwrap().uncapped_uids_gone;
    assert!(
        gone >= 9000,
        "the churned UIDs' counters were retired {gone} times"
    );
    // No racer lost or doubled a charge: each is at 0 (an underflow would read as 2^64-1)
    // and held to its cap of 3 exactly.
    for (h, uid) in racers.iter_mut().zip(RACERS) {
        s.scratch.wait_live(uid, 0);
        assert_eq!(hold(h, "udp4", 9, 4), (3, 1), "uid {uid}");
    }
    // Counters with something charged are never retired.
    let stats = s.scratch.stats();
    assert_eq!(stats.per_uid[&HOLDER].live, 2);
    assert_eq!(hold(&mut holder, "tcp4", listener.port4, 2), (1, 1));
}

/// A network namespace made with `ip netns add`, with its loopback up, removed on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "rlagent-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        for args in [
            vec!["netns", "add", &name],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let status = std::process::Command::new("ip")
                .args(&args)
                .status()
                .expect("running ip");
            assert!(status.success(), "ip {args:?}: {status}");
        }
        Self(name)
    }

    /// The wrapper that runs a helper inside (its mounts, cgroups included, stay the host's).
    fn enter(&self) -> String {
        format!("--net=/run/netns/{}", self.0)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn connections_in_another_network_namespace_are_seeded_at_the_first_start() {
    if !privileged("seeding_every_netns") {
        return;
    }
    const NS_USER: u32 = 63070;
    let s = Setup::new(
        "count_udp = true",
        &quota(&format!("user:{NS_USER}"), "conns = 2"),
    );
    let ns = NetNs::new();
    let enter = ns.enter();
    let mut h = Helper::spawn_by(&["nsenter", &enter, "--"], &s.cgroup.path, NS_USER);
    assert_eq!(hold(&mut h, "udp4", 9, 2), (2, 0));
    let _agent = Agent::start(&s.scratch);
    assert_eq!(
        s.scratch.live(NS_USER),
        2,
        "seeded from the other namespace"
    );
    assert!(matches!(h.connect("udp4", 9), Connect::Err(EPERM, _)));
    h.cmd("close 1");
    s.scratch.wait_live(NS_USER, 1);
    assert!(h.connect("udp4", 9).is_ok());
    drop(h);
    s.scratch.wait_live(NS_USER, 0);
}

#[test]
fn monitor_mode_gives_back_the_uid_token_of_a_connect_a_group_rate_would_refuse() {
    if !privileged("monitor_token_give_back") {
        return;
    }
    // A UID rate of 1/s burst 5 in a group with a rate of 10/s burst 3: of 5 connects,
    // the group refuses 2, and those give their UID token back; 0.3 s later (3 group
    // tokens back, none of the UID's) of 3 more the UID's rate refuses 1. Monitor mode
    // must count the same 3, not 5.
    let uid_rate = "conn_rate = \"1/s\"\nconn_burst = 5";
    let group_rate = "conn_rate = \"10/s\"\nconn_burst = 3";
    let monitor = "\nmode = \"monitor\"";
    let s = Setup::new(
        "",
        &[
            quota("user:63090", uid_rate),
            quota("user:63091", &format!("{uid_rate}{monitor}")),
            quota("enforced", group_rate),
            quota("watched", &format!("{group_rate}{monitor}")),
        ]
        .concat(),
    );
    let _agent = Agent::start(&s.scratch);
    let listener = Listener::dropping();
    let port = listener.port4;
    let mut enforced = Helper::spawn(&s.group("enforced"), 63090);
    let mut watched = Helper::spawn(&s.group("watched"), 63091);
    for h in [&mut enforced, &mut watched] {
        h.send(&format!("cycles tcp4 {port} 5"));
    }
    let first = (pair(&enforced.reply()).0, pair(&watched.reply()).0);
    std::thread::sleep(Duration::from_millis(300));
    for h in [&mut enforced, &mut watched] {
        h.send(&format!("cycles tcp4 {port} 3"));
    }
    let second = (pair(&enforced.reply()).0, pair(&watched.reply()).0);
    assert_eq!((first.0, second.0), (3, 2), "enforce mode");
    assert_eq!((first.1, second.1), (5, 3), "monitor mode denies nothing");
    let (e, m) = (s.scratch.conns(63090), s.scratch.conns(63091));
    let denied: u64 = e.denied.iter().sum();
    let would: u64 = m.would_deny.iter().sum();
    assert_eq!((denied, would), (3, 3), "enforce {e:?}, monitor {m:?}");
}
