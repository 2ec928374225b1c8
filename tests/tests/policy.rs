//! The connection policy beyond caps, enforced by the real agent and kernel programs in a
//! child cgroup of this host's cgroup2 mount: per-UID rate limits (token buckets), group
//! caps, monitor mode, and the denial event log. Needs root (skips otherwise, fails under
//! RLAGENT_REQUIRE_PRIVILEGED=1).

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use rlagent_common::reason;
use rlagent_tests::{privileged, rlctl, Agent, Connect, Helper, Listener, Scratch, TestCgroup};

const EPERM: i32 = libc::EPERM;

struct Setup {
    cgroup: TestCgroup,
    scratch: Scratch,
    listener: Listener,
}

impl Setup {
    /// An agent config attached to a new test cgroup, its groups under `<cgroup>/slice`.
    fn new(bpf: &str, quotas: &str) -> Self {
        let cgroup = TestCgroup::new();
        let scratch = Scratch::new();
        scratch.write_config_with_groups(&cgroup, bpf, quotas);
        Self {
            cgroup,
            scratch,
            listener: Listener::new(),
        }
    }

    /// A group's cgroup (made by the agent at start).
    fn group(&self, name: &str) -> PathBuf {
        self.cgroup.path.join("slice").join(name)
    }
}

fn quota(target: &str, fields: &str) -> String {
    format!("[[quota]]\ntarget = \"{target}\"\n{fields}\n")
}

/// `for` on a helper: (admitted, attempts).
fn parse_for(reply: &str) -> (u64, u64) {
    let words: Vec<&str> = reply.split_whitespace().collect();
    match words.as_slice() {
        ["ok", admitted, attempts] => (admitted.parse().unwrap(), attempts.parse().unwrap()),
        _ => panic!("unexpected helper reply {reply:?}"),
    }
}

/// `hold` on a helper: (connected, failed).
fn hold(h: &mut Helper, port: u16, n: u32) -> (u64, u64) {
    let reply = h.cmd(&format!("hold tcp4 {port} {n}"));
    let words: Vec<&str> = reply.split_whitespace().collect();
    match words.as_slice() {
        ["ok", ok, failed] => (ok.parse().unwrap(), failed.parse().unwrap()),
        _ => panic!("unexpected helper reply {reply:?}"),
    }
}

#[test]
fn a_rate_admits_the_burst_then_the_rate_and_a_change_applies_on_the_next_connect() {
    if !privileged("rate_admits_burst_then_rate") {
        return;
    }
    const UID: u32 = 62001;
    let s = Setup::new(
        "",
        &quota(
            &format!("user:{UID}"),
            "conn_rate = \"10/s\"\nconn_burst = 5",
        ),
    );
    let _agent = Agent::start(&s.scratch);
    let mut h = Helper::spawn(&s.cgroup.path, UID);
    let (admitted, attempts) = parse_for(&h.cmd(&format!("for tcp4 {} 3000", s.listener.port4)));
    // 5 at once, then one every 100 ms for 3 s.
    assert!(
        (33..=37).contains(&admitted),
        "{admitted} of {attempts} admitted in 3 s at 10/s burst 5"
    );
    let c = s.scratch.conns(UID);
    assert_eq!(c.admitted, admitted);
    assert_eq!(c.denied[reason::RATE], attempts - admitted, "{c:?}");
    assert_eq!(c.live, 0, "every socket was closed");

    // The bucket is empty (at most the one token of the last 100 ms is back)...
    let (ok, failed) = hold(&mut h, s.listener.port4, 3);
    assert!(
        ok <= 1 && failed >= 2,
        "{ok} of 3 admitted right after the loop"
    );
    h.close_all();
    // ...until the rate is raised, which the very next connect sees.
    s.scratch.rlctl_ok(&[
        "set-quota",
        &format!("user:{UID}"),
        "--conn-rate",
        "1000/s",
        "--conn-burst",
        "1000",
    ]);
    assert!(h.connect("tcp4", s.listener.port4).is_ok());
    let stats = s
        .scratch
        .rlctl_ok(&["--json", "stats", &format!("user:{UID}")]);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let rate = &stats["conns"][0]["rate"];
    assert_eq!(rate["interval_ns"], 1_000_000, "{stats}");
    assert_eq!(rate["burst"], 1000, "{stats}");
}

#[test]
fn processes_racing_on_all_cpus_never_take_more_than_burst_plus_rate_times_elapsed() {
    if !privileged("racing_rate") {
        return;
    }
    const UID: u32 = 62002;
    const RATE: u64 = 200;
    const BURST: u64 = 20;
    let s = Setup::new(
        "",
        &quota(
            &format!("user:{UID}"),
            &format!("conn_rate = \"{RATE}/s\"\nconn_burst = {BURST}"),
        ),
    );
    let _agent = Agent::start(&s.scratch);
    let mut helpers: Vec<Helper> = (0..8).map(|_| Helper::spawn(&s.cgroup.path, UID)).collect();
    let start = Instant::now();
    for h in &mut helpers {
        h.send(&format!("for tcp4 {} 2000", s.listener.port4));
    }
    let (mut admitted, mut attempts) = (0, 0);
    for h in &mut helpers {
        let (a, n) = parse_for(&h.reply());
        admitted += a;
        attempts += n;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bound = BURST as f64 + RATE as f64 * elapsed;
    assert!(
        admitted as f64 <= bound,
        "{admitted} admitted (of {attempts}) in {elapsed:.3} s: more than burst + rate * elapsed = {bound:.1}"
    );
    // And the bucket was not starved: the racers got (nearly) all they could.
    assert!(
        admitted as f64 >= BURST as f64 + RATE as f64 * 1.9,
        "only {admitted} admitted (of {attempts}) in {elapsed:.3} s"
    );
    assert!(attempts > admitted * 2, "the racers pressed the limit");
    let c = s.scratch.conns(UID);
    assert_eq!(
        (c.admitted, c.denied[reason::RATE]),
        (admitted, attempts - admitted)
    );
}

#[test]
fn a_group_cap_is_shared_counts_sub_cgroups_and_is_released_to_the_group_charged() {
    if !privileged("group_cap") {
        return;
    }
    let s = Setup::new(
        "",
        &[
            quota("batch", "conns = 3"),
            quota("user:62011", "conns = 10"),
        ]
        .concat(),
    );
    let _agent = Agent::start(&s.scratch);
    let batch = s.group("batch");
    let sub = batch.join("sub");
    std::fs::create_dir(&sub).expect("sub-cgroup");
    let port = s.listener.port4;

    let mut a = Helper::spawn(&batch, 62011);
    let mut b = Helper::spawn(&sub, 62012);
    assert_eq!(hold(&mut a, port, 2), (2, 0));
    // The sub-cgroup's process shares the group's 3.
    assert_eq!(hold(&mut b, port, 2), (1, 1));
    assert_eq!(s.scratch.group_conns(&batch).live, 3);
    assert_eq!(s.scratch.group_conns(&batch).denied[reason::GROUP], 1);
    assert_eq!(s.scratch.conns(62012).denied[reason::GROUP], 1);
    // A UID's own cap applies as well: a connect must pass both.
    assert_eq!(s.scratch.conns(62011).live, 2);

    // b leaves the group with its connection open; closing it still releases the group.
    std::fs::write(s.cgroup.path.join("cgroup.procs"), b.pid().to_string())
        .expect("moving the helper out");
    b.close_all();
    s.scratch.wait_group_live(&batch, 2);
    // Outside the group, b's new connections are not the group's.
    assert_eq!(hold(&mut b, port, 3), (3, 0));
    assert_eq!(s.scratch.group_conns(&batch).live, 2);
    assert!(matches!(a.connect("tcp4", port), Connect::Ok(_)));
    assert!(matches!(a.connect("tcp4", port), Connect::Err(EPERM, _)));
    drop((a, b));
    s.scratch.wait_group_live(&batch, 0);
    std::fs::remove_dir(&sub).expect("removing the sub-cgroup");
}

#[test]
fn a_group_cap_follows_its_cgroup_when_it_goes_and_comes_back() {
    if !privileged("group_cap_follows_cgroup") {
        return;
    }
    // The agent makes the group's cgroup at start. Removed behind its back (as a stopped
    // slice is), the group is reported as not enforced; made again (a new cgroup id),
    // its cap applies to the new cgroup within seconds, without a reload.
    let s = Setup::new("", &quota("later", "conns = 1"));
    let agent = Agent::start(&s.scratch);
    let later = s.group("later");
    std::fs::remove_dir(&later).expect("removing the group's cgroup");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = s.scratch.rlctl_ok(&["list"]);
        if list.contains("does not exist yet") {
            break;
        }
        assert!(Instant::now() < deadline, "never reported: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::create_dir(&later).expect("the cgroup appears");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut h = Helper::spawn(&later, 62021);
        let (ok, failed) = hold(&mut h, s.listener.port4, 2);
        if (ok, failed) == (1, 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the group's cap never applied");
        drop(h);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!s.scratch.rlctl_ok(&["list"]).contains("does not exist yet"));
    drop(agent);
}

#[test]
fn monitor_mode_denies_nothing_and_would_deny_what_enforce_denies() {
    if !privileged("monitor_mode") {
        return;
    }
    // Each limit on its own (a monitored connect() stays charged, so limits checked after
    // an exceeded one would see more than enforce mode lets through), each workload once
    // per mode.
    let cap = "conns = 3";
    let rate = "conn_rate = \"1/min\"\nconn_burst = 5";
    let monitor = "\nmode = \"monitor\"";
    let s = Setup::new(
        "",
        &[
            quota("user:62031", cap),
            quota("user:62032", &format!("{cap}{monitor}")),
            quota("user:62033", rate),
            quota("user:62034", &format!("{rate}{monitor}")),
            quota("pool", "conns = 2"),
            quota("watched", &format!("conns = 2{monitor}")),
        ]
        .concat(),
    );
    let _agent = Agent::start(&s.scratch);
    let port = s.listener.port4;
    let mut helpers = Vec::new();
    let mut run = |cgroup: &Path, uid: u32, work: &str| {
        let mut h = Helper::spawn(cgroup, uid);
        let reply = h.cmd(&format!(
            "{work} tcp4 {port} {}",
            if work == "hold" { 5 } else { 8 }
        ));
        helpers.push(h);
        reply
    };
    let root = s.cgroup.path.clone();
    let (pool, watched) = (s.group("pool"), s.group("watched"));
    let runs = [
        (run(&root, 62031, "hold"), run(&root, 62032, "hold")),
        (run(&root, 62033, "cycles"), run(&root, 62034, "cycles")),
        (run(&pool, 62035, "hold"), run(&watched, 62036, "hold")),
    ];
    assert_eq!(runs[0], ("ok 3 2".to_string(), "ok 5 0".to_string()));
    assert!(runs[1].0.starts_with("ok 5 "), "{:?}", runs[1]);
    assert_eq!(runs[1].1, "ok 8 0");
    assert_eq!(runs[2], ("ok 2 3".to_string(), "ok 5 0".to_string()));
    for (enforced, monitored, r) in [
        (62031, 62032, reason::CAP),
        (62033, 62034, reason::RATE),
        (62035, 62036, reason::GROUP),
    ] {
        let (e, m) = (s.scratch.conns(enforced), s.scratch.conns(monitored));
        assert_eq!(
            m.denied,
            [0; reason::COUNT],
            "monitor mode denies nothing: {m:?}"
        );
        assert_eq!(e.would_deny, [0; reason::COUNT], "{e:?}");
        assert!(e.denied[r] > 0, "{e:?}");
        assert_eq!(
            m.would_deny,
            e.denied,
            "{}: would-deny {m:?} vs denied {e:?}",
            reason::NAMES[r]
        );
    }
    assert_eq!(
        s.scratch.group_conns(&watched).would_deny[reason::GROUP],
        s.scratch.group_conns(&pool).denied[reason::GROUP]
    );
    // Switched to enforce, the watched user (5 live against 3) is denied from the next
    // connect on.
    s.scratch
        .rlctl_ok(&["set-quota", "user:62032", "--mode", "enforce"]);
    let mut again = Helper::spawn(&root, 62032);
    assert!(matches!(
        again.connect("tcp4", port),
        Connect::Err(EPERM, _)
    ));
}

/// Events the agent kept for `uid`, through rlctl.
fn kept_events(s: &Setup, uid: u32) -> Vec<serde_json::Value> {
    let out = s
        .scratch
        .rlctl_ok(&["--json", "events", "--uid", &uid.to_string(), "-n", "1024"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["events"].as_array().unwrap().clone()
}

#[test]
fn every_denial_of_a_burst_is_an_event_or_counted_as_dropped() {
    if !privileged("events_no_silent_loss") {
        return;
    }
    for (bpf, uid) in [
        ("", 62041),
        ("event_rate = \"1000000/s\"\nevent_burst = 1000000", 62042),
    ] {
        let s = Setup::new(bpf, &quota(&format!("user:{uid}"), "conns = 0"));
        let _agent = Agent::start(&s.scratch);
        let mut h = Helper::spawn(&s.cgroup.path, uid);
        let reply = h.cmd(&format!("cycles tcp4 {} 1000", s.listener.port4));
        assert!(reply.starts_with("ok 0 "), "{reply}");
        let c = s.scratch.conns(uid);
        assert_eq!(c.denied[reason::CAP], 1000);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let kept = kept_events(&s, uid).len() as u64;
            if kept + c.events_dropped == 1000 {
                if bpf.is_empty() {
                    // The default rate: 100 at once per UID, the rest counted.
                    assert!(c.events_dropped >= 800, "{c:?}");
                } else {
                    assert_eq!(c.events_dropped, 0, "{c:?}");
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{kept} events kept + {} dropped != 1000 denials",
                c.events_dropped
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn events_follow_shows_who_where_and_why_and_why_names_the_limit() {
    if !privileged("events_follow_and_why") {
        return;
    }
    const UID: u32 = 62051;
    let s = Setup::new("", &quota(&format!("user:{UID}"), "conns = 2"));
    let agent = Agent::start(&s.scratch);
    let mut follow = rlctl(&s.scratch.socket_path())
        .args(["events", "--follow", "--uid", &UID.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("rlctl events --follow");
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    let header = lines.next().unwrap().unwrap();
    assert!(
        header.contains("REASON") && header.contains("DESTINATION"),
        "{header}"
    );
    let mut h = Helper::spawn(&s.cgroup.path, UID);
    assert_eq!(hold(&mut h, s.listener.port4, 3), (2, 1));
    let line = lines.next().unwrap().unwrap();
    let destination = format!("127.0.0.1:{}", s.listener.port4);
    for needle in [
        UID.to_string().as_str(),
        "conn-helper",
        destination.as_str(),
        "cap",
        "denied",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
    let _ = follow.kill();
    let _ = follow.wait();

    let why = s.scratch.rlctl_ok(&["why", &format!("user:{UID}")]);
    assert!(why.contains("1 denied by cap"), "{why}");
    assert!(
        why.contains(&format!("conns of user:{UID} = 2 (2 live now)")),
        "{why}"
    );
    assert!(why.contains(&destination), "{why}");
    // The agent logged it at warning level.
    let log = agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("connect() denied")
            && l.contains("reason=cap")),
        "{log}"
    );
}
