//! Per-UID connection caps enforced by the real agent and kernel programs, attached to a
//! child cgroup of this host's cgroup2 mount. Needs root (skips otherwise, fails under
//! RLAGENT_REQUIRE_PRIVILEGED=1).

use rlagent_common::reason;
use rlagent_tests::{free_port, privileged, Agent, Connect, Helper, Listener, Scratch, TestCgroup};

const EPERM: i32 = libc::EPERM;
const CAPPED: u32 = 61001;
const OTHER: u32 = 61002;

struct Setup {
    cgroup: TestCgroup,
    scratch: Scratch,
    listener: Listener,
}

fn setup(extra_bpf: &str, quotas: &str) -> Setup {
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(&cgroup, extra_bpf, quotas);
    Setup {
        cgroup,
        scratch,
        listener: Listener::new(),
    }
}

fn quota(target: &str, conns: &str) -> String {
    format!("[[quota]]\ntarget = \"{target}\"\nconns = {conns}\n")
}

#[test]
fn cap_denies_the_excess_on_ipv4_and_ipv6_and_a_close_frees_a_slot() {
    if !privileged("cap_denies_the_excess") {
        return;
    }
    let s = setup("", &quota(&format!("user:{CAPPED}"), "3"));
    let _agent = Agent::start(&s.scratch);
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    let (p4, p6) = (s.listener.port4, s.listener.port6);

    let first = h.connect("tcp4", p4);
    assert!(first.is_ok());
    assert!(h.connect("tcp6", p6).is_ok());
    assert!(h.connect("tcp4", p4).is_ok());
    assert_eq!(s.scratch.live(CAPPED), 3);
    assert!(
        matches!(h.connect("tcp4", p4), Connect::Err(EPERM, _)),
        "4th IPv4 must be denied"
    );
    assert!(
        matches!(h.connect("tcp6", p6), Connect::Err(EPERM, _)),
        "4th IPv6 must be denied"
    );
    assert_eq!(s.scratch.live(CAPPED), 3);

    h.close(first.id());
    s.scratch.wait_live(CAPPED, 2);
    assert!(
        h.connect("tcp6", p6).is_ok(),
        "a closed connection frees a slot"
    );
    assert!(matches!(h.connect("tcp4", p4), Connect::Err(EPERM, _)));

    let c = s.scratch.stats().per_uid[&CAPPED];
    assert_eq!(
        (
            c.live,
            c.admitted,
            c.denied[reason::CAP],
            c.denied[reason::HOST_CAP]
        ),
        (3, 4, 3, 0)
    );
}

#[test]
fn uids_without_a_cap_are_untouched() {
    if !privileged("uids_without_a_cap_are_untouched") {
        return;
    }
    let s = setup("", &quota(&format!("user:{CAPPED}"), "1"));
    let _agent = Agent::start(&s.scratch);
    let mut h = Helper::spawn(&s.cgroup.path, OTHER);
    for _ in 0..40 {
        assert!(h.connect("tcp4", s.listener.port4).is_ok());
    }
    assert_eq!(s.scratch.live(OTHER), 40, "counted, never denied");
}

#[test]
fn default_cap_applies_to_uids_without_their_own() {
    if !privileged("default_cap_applies") {
        return;
    }
    let quotas = [
        quota("user:*", "2"),
        quota("user:61010", "4"),
        quota("user:61011", "\"max\""),
    ]
    .concat();
    let s = setup("uid_min = 1000", &quotas);
    let _agent = Agent::start(&s.scratch);
    let port = s.listener.port4;
    let admitted = |uid: u32, tries: usize| {
        let mut h = Helper::spawn(&s.cgroup.path, uid);
        let ok = (0..tries)
            .filter(|_| h.connect("tcp4", port).is_ok())
            .count();
        (h, ok)
    };
    let (_a, ok) = admitted(61012, 5);
    assert_eq!(ok, 2, "default cap");
    let (_b, ok) = admitted(61010, 6);
    assert_eq!(ok, 4, "own cap wins over the default");
    let (_c, ok) = admitted(61011, 8);
    assert_eq!(ok, 8, "own conns = max exempts from the default");
    let (_d, ok) = admitted(999, 8);
    assert_eq!(ok, 8, "system UIDs below uid_min get no default");
}

#[test]
fn host_wide_cap_holds_across_uids_but_never_denies_root() {
    if !privileged("host_wide_cap_holds") {
        return;
    }
    let s = setup("host_conns = 4", "");
    let _agent = Agent::start(&s.scratch);
    let port = s.listener.port4;
    let mut a = Helper::spawn(&s.cgroup.path, 61020);
    let mut b = Helper::spawn(&s.cgroup.path, 61021);
    for _ in 0..3 {
        assert!(a.connect("tcp4", port).is_ok());
    }
    assert!(b.connect("tcp4", port).is_ok());
    assert!(matches!(b.connect("tcp4", port), Connect::Err(EPERM, _)));
    assert!(matches!(
        a.connect("tcp6", s.listener.port6),
        Connect::Err(EPERM, _)
    ));
    let mut root = Helper::spawn(&s.cgroup.path, 0);
    assert!(root.connect("tcp4", port).is_ok(), "root keeps access");
    let stats = s.scratch.stats();
    assert_eq!(stats.host.live, 4, "root is not charged");
    assert_eq!(stats.per_uid[&61021].denied[reason::HOST_CAP], 1);
    assert_eq!(stats.per_uid[&61020].denied[reason::HOST_CAP], 1);
}

#[test]
fn counts_return_to_zero_after_failed_connects_exit_and_sigkill() {
    if !privileged("counts_return_to_zero") {
        return;
    }
    let s = setup("", &quota(&format!("user:{CAPPED}"), "5"));
    let _agent = Agent::start(&s.scratch);
    let port = s.listener.port4;
    let dead = free_port();

    // Refused connects: the socket is charged until it is closed, never twice.
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    let refused = h.connect("tcp4", dead);
    assert_eq!(refused, Connect::Err(libc::ECONNREFUSED, refused.id()));
    assert_eq!(h.reconnect(refused.id(), dead), Err(libc::ECONNREFUSED));
    assert_eq!(
        s.scratch.live(CAPPED),
        1,
        "a retried connect() on one socket is one charge"
    );
    assert!(matches!(
        h.connect("tcp6", dead),
        Connect::Err(libc::ECONNREFUSED, _)
    ));
    h.close_all();
    s.scratch.wait_live(CAPPED, 0);

    // Sockets closed by a normal exit.
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    for _ in 0..5 {
        assert!(h.connect("tcp4", port).is_ok());
    }
    h.exit();
    s.scratch.wait_live(CAPPED, 0);

    // Sockets closed by SIGKILL.
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    for _ in 0..5 {
        assert!(h.connect("tcp6", s.listener.port6).is_ok());
    }
    assert!(matches!(h.connect("tcp4", port), Connect::Err(EPERM, _)));
    h.kill9();
    s.scratch.wait_live(CAPPED, 0);
    assert_eq!(s.scratch.stats().host.live, 0);
    assert_eq!(s.scratch.stats().host.untracked, 0);
}

#[test]
fn racing_processes_never_exceed_the_cap() {
    if !privileged("racing_processes_never_exceed_the_cap") {
        return;
    }
    const CAP: u64 = 5;
    const PROCS: usize = 6;
    const EACH: u32 = 4;
    const ROUNDS: usize = 30;
    let s = setup("", &quota(&format!("user:{CAPPED}"), &CAP.to_string()));
    let _agent = Agent::start(&s.scratch);
    let mut helpers: Vec<Helper> = (0..PROCS)
        .map(|_| Helper::spawn(&s.cgroup.path, CAPPED))
        .collect();
    for round in 0..ROUNDS {
        for h in &mut helpers {
            h.send(&format!("burst tcp4 {} {EACH}", s.listener.port4));
        }
        let admitted: u64 = helpers
            .iter_mut()
            .map(|h| {
                h.reply()
                    .strip_prefix("ok ")
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum();
        assert_eq!(
            admitted, CAP,
            "round {round}: {admitted} admitted with cap {CAP}"
        );
        assert_eq!(s.scratch.live(CAPPED), CAP, "round {round}");
        for h in &mut helpers {
            h.close_all();
        }
        s.scratch.wait_live(CAPPED, 0);
        s.listener.forget_accepted();
    }
    let c = s.scratch.stats().per_uid[&CAPPED];
    assert_eq!(c.admitted, CAP * ROUNDS as u64);
    assert_eq!(
        c.denied[reason::CAP],
        (PROCS as u64 * u64::from(EACH) - CAP) * ROUNDS as u64
    );
}

#[test]
fn restart_after_sigkill_keeps_counts_and_enforcement() {
    if !privileged("restart_after_sigkill") {
        return;
    }
    let s = setup("", &quota(&format!("user:{CAPPED}"), "3"));
    let agent = Agent::start(&s.scratch);
    let port = s.listener.port4;
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    let ids: Vec<u64> = (0..3).map(|_| h.connect("tcp4", port).id()).collect();
    agent.kill9();

    // The agent is gone: the pinned programs still enforce and count.
    assert!(
        matches!(h.connect("tcp4", port), Connect::Err(EPERM, _)),
        "enforced while down"
    );
    h.close(ids[0]);
    s.scratch.wait_live(CAPPED, 2);

    let _agent = Agent::start(&s.scratch);
    assert_eq!(s.scratch.live(CAPPED), 2, "counts survive the restart");
    assert!(h.connect("tcp6", s.listener.port6).is_ok());
    assert!(
        matches!(h.connect("tcp4", port), Connect::Err(EPERM, _)),
        "cap after restart"
    );
    h.close_all();
    s.scratch.wait_live(CAPPED, 0);
    assert_eq!(
        s.scratch.stats().host.live,
        0,
        "old and new programs uncharge exactly once"
    );
}

#[test]
fn sighup_applies_a_new_cap_and_keeps_state_on_a_bad_config() {
    if !privileged("sighup_reload") {
        return;
    }
    let s = setup("", &quota(&format!("user:{CAPPED}"), "2"));
    let mut agent = Agent::start(&s.scratch);
    let port = s.listener.port4;
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    assert_eq!(
        (0..4).filter(|_| h.connect("tcp4", port).is_ok()).count(),
        2
    );

    s.scratch
        .write_config(&s.cgroup, "", &quota(&format!("user:{CAPPED}"), "4"));
    agent.reload();
    assert_eq!(
        (0..4).filter(|_| h.connect("tcp4", port).is_ok()).count(),
        2,
        "cap raised to 4"
    );

    s.scratch
        .write_config(&s.cgroup, "", &quota(&format!("user:{CAPPED}"), "\"lots\""));
    agent.reload();
    assert!(
        agent.log_text().contains("reload refused"),
        "{}",
        agent.log_text()
    );
    h.close_all();
    s.scratch.wait_live(CAPPED, 0);
    assert_eq!(
        (0..6).filter(|_| h.connect("tcp4", port).is_ok()).count(),
        4,
        "old cap kept"
    );

    s.scratch.write_config(&s.cgroup, "", "");
    agent.reload();
    assert!(
        h.connect("tcp4", port).is_ok(),
        "a removed quota removes the cap"
    );
    assert!(agent.stop().success(), "SIGTERM exits cleanly");
}

#[test]
fn udp_counts_only_when_enabled_and_a_reconnect_is_not_a_new_connection() {
    if !privileged("udp_counting") {
        return;
    }
    let off = setup("", &quota(&format!("user:{CAPPED}"), "1"));
    let _agent_off = Agent::start(&off.scratch);
    let mut h = Helper::spawn(&off.cgroup.path, CAPPED);
    for _ in 0..3 {
        assert!(
            h.connect("udp4", 9).is_ok(),
            "UDP is not counted by default"
        );
    }
    assert_eq!(off.scratch.live(CAPPED), 0);

    let on = setup("count_udp = true", &quota(&format!("user:{CAPPED}"), "1"));
    let _agent_on = Agent::start(&on.scratch);
    let mut h = Helper::spawn(&on.cgroup.path, CAPPED);
    let first = h.connect("udp6", 9);
    assert!(first.is_ok());
    assert_eq!(
        h.reconnect(first.id(), 10),
        Ok(()),
        "re-connecting one socket is not a new connection"
    );
    assert!(matches!(h.connect("udp4", 9), Connect::Err(EPERM, _)));
    h.close(first.id());
    on.scratch.wait_live(CAPPED, 0);
    assert!(h.connect("udp4", 9).is_ok());
}

#[test]
fn deny_errno_is_configurable() {
    if !privileged("deny_errno_is_configurable") {
        return;
    }
    let s = setup(
        "deny_errno = \"ENOBUFS\"",
        &quota(&format!("user:{CAPPED}"), "0"),
    );
    let _agent = Agent::start(&s.scratch);
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    assert!(matches!(
        h.connect("tcp4", s.listener.port4),
        Connect::Err(libc::ENOBUFS, _)
    ));
}

#[test]
fn uninstall_detaches_and_removes_pins() {
    if !privileged("uninstall_detaches") {
        return;
    }
    let s = setup("", &quota(&format!("user:{CAPPED}"), "0"));
    let agent = Agent::start(&s.scratch);
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    assert!(matches!(
        h.connect("tcp4", s.listener.port4),
        Connect::Err(EPERM, _)
    ));
    assert!(agent.stop().success());
    assert!(
        matches!(h.connect("tcp4", s.listener.port4), Connect::Err(EPERM, _)),
        "pinned after stop"
    );
    s.scratch.uninstall();
    assert!(!s.scratch.pin_path().exists(), "pins removed");
    assert!(
        h.connect("tcp4", s.listener.port4).is_ok(),
        "programs detached"
    );
}

/// What an agent of an older map layout leaves behind: its programs attached through
/// pinned links, enforcing the caps of `s`'s config in its own maps. Returns its pin
/// directory (`v0`).
fn older_version(s: &Setup) -> std::path::PathBuf {
    Agent::start(&s.scratch).stop();
    let current = rlagent::kernel::bpf::PinLayout::new(&s.scratch.pin_path()).version_dir();
    let older = s.scratch.pin_path().join("v0");
    std::fs::rename(&current, &older).unwrap();
    older
}

#[test]
fn links_pinned_by_another_map_layout_version_are_detached_at_start() {
    if !privileged("links_pinned_by_another_map_layout_version") {
        return;
    }
    let s = setup("", &quota(&format!("user:{CAPPED}"), "1"));
    let older = older_version(&s);
    s.scratch
        .write_config(&s.cgroup, "", &quota(&format!("user:{CAPPED}"), "3"));
    let agent = Agent::start(&s.scratch);
    assert!(!older.exists(), "the older version's pins are removed");
    assert!(
        agent.log_text().contains("another map layout version"),
        "{}",
        agent.log_text()
    );
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    for i in 0..3 {
        assert!(
            h.connect("tcp4", s.listener.port4).is_ok(),
            "connect {i}: the older programs' cap of 1 must no longer apply"
        );
    }
    assert!(matches!(
        h.connect("tcp4", s.listener.port4),
        Connect::Err(EPERM, _)
    ));
}

#[test]
fn an_older_versions_link_held_open_elsewhere_is_reported_and_start_goes_on() {
    if !privileged("an_older_versions_link_held_open_elsewhere") {
        return;
    }
    let s = setup("", &quota(&format!("user:{CAPPED}"), "1"));
    let older = older_version(&s);
    // Another process (bpftool, a debugger: here this test) holds the older connect4 link
    // open, so removing its pin cannot detach it.
    let held = aya::programs::links::PinnedLink::from_pin(
        older
            .join("links")
            .join(rlagent_common::names::PROG_CONNECT4),
    )
    .expect("opening the older link");
    s.scratch
        .write_config(&s.cgroup, "", &quota(&format!("user:{CAPPED}"), "3"));
    let agent = Agent::start(&s.scratch);
    let log = agent.log_text();
    assert!(
        log.contains("another process holds the link open: its program still runs"),
        "{log}"
    );
    assert!(
        !log.contains("removed the pins of another map layout version and detached"),
        "{log}"
    );
    // Its maps' pins are gone; its sock_release stays pinned, to release what the held
    // connect4 charges.
    assert!(!older.join("maps").exists());
    let links: Vec<String> = std::fs::read_dir(older.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(links, [rlagent_common::names::PROG_SOCK_RELEASE]);
    // As the log says: the older connect4 still enforces its own cap of 1, and its
    // charges are released on close, so the UID is not locked out by them.
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    for round in 0..2 {
        assert!(h.connect("tcp4", s.listener.port4).is_ok(), "round {round}");
        assert!(matches!(
            h.connect("tcp4", s.listener.port4),
            Connect::Err(EPERM, _)
        ));
        h.close_all();
    }
    // Once the other process lets go, the next start removes the rest.
    drop(held);
    agent.stop();
    let agent = Agent::start(&s.scratch);
    assert!(!older.exists(), "{}", agent.log_text());
    let mut h = Helper::spawn(&s.cgroup.path, CAPPED);
    for i in 0..3 {
        assert!(h.connect("tcp4", s.listener.port4).is_ok(), "connect {i}");
    }
}

#[test]
fn uninstall_refuses_under_a_running_agent_which_notices_its_pins_going() {
    if !privileged("uninstall_refuses_under_a_running_agent") {
        return;
    }
    let s = setup(
        "",
        &format!(
            "{}[alerts]\ninterval = \"1s\"\n",
            quota(&format!("user:{CAPPED}"), "1")
        ),
    );
    let agent = Agent::start(&s.scratch);
    // Every link and map pin the agent keeps.
    let pins = rlagent::kernel::bpf::PinLayout::new(&s.scratch.pin_path())
        .all()
        .len();
    let uninstall = |force: bool| {
        let mut cmd = std::process::Command::new(rlagent_tests::target_bin("rlagent"));
        cmd.arg("--config")
            .arg(s.scratch.config_path())
            .arg("uninstall");
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let out = uninstall(false);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("an agent is running") && err.contains("--force"),
        "{err}"
    );
    assert!(s.scratch.pin_path().exists(), "nothing was removed");
    // Forced, the programs go; the running agent notices within its alert interval.
    assert!(uninstall(true).status.success());
    let start = std::time::Instant::now();
    let status = loop {
        let out = s.scratch.rlctl(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if status["pins_missing"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            break status;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(
        status["pins_missing"].as_array().unwrap().len(),
        pins,
        "{status}"
    );
    let start = std::time::Instant::now();
    loop {
        let alerts = String::from_utf8_lossy(&s.scratch.rlctl(&["alerts"]).stdout).into_owned();
        if alerts.contains("RlagentPinsMissing") && alerts.contains("firing") {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{alerts}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        agent
            .log_text()
            .contains("connection caps may no longer be enforced"),
        "{}",
        agent.log_text()
    );
    let (_, body) = rlagent_tests::http_get(s.scratch.metrics_port(), "/metrics");
    assert_eq!(
        rlagent_tests::sample(&body, "rlagent_pins_missing"),
        Some(pins as f64)
    );
}

/// Drop-ins beside the config file apply at start and whenever one changes on disk (no
/// signal needed); a bad one is refused whole and the running caps stay.
#[test]
fn drop_ins_apply_at_start_and_on_change_and_a_bad_one_keeps_the_running_caps() {
    if !privileged("drop_ins_apply_at_start_and_on_change") {
        return;
    }
    const FLEET_USER: u32 = 61020;
    let s = setup("", "");
    let drop_ins = s.scratch.config_path().with_file_name("rlagent.d");
    std::fs::create_dir(&drop_ins).unwrap();
    std::fs::write(
        drop_ins.join("10-cap.toml"),
        quota(&format!("user:{FLEET_USER}"), "2"),
    )
    .unwrap();
    let agent = Agent::start(&s.scratch);
    let cap = || s.scratch.maps().policy_for(FLEET_USER).unwrap().cap;
    assert_eq!(cap(), 2, "a drop-in present at start applies");
    let wait_cap = |want: u64| {
        let start = std::time::Instant::now();
        while cap() != want {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "cap {} after 5 s, expected {want}",
                cap()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // Written as config management does: a temporary file renamed into place.
    let tmp = drop_ins.join(".20-more.tmp");
    std::fs::write(&tmp, quota(&format!("user:{FLEET_USER}"), "3")).unwrap();
    std::fs::rename(&tmp, drop_ins.join("20-more.toml")).unwrap();
    wait_cap(3);
    // A bad drop-in: refused whole, the running caps stay, the log names file and line.
    std::fs::write(
        drop_ins.join("30-bad.toml"),
        format!("\n{}", quota(&format!("user:{FLEET_USER}"), "\"lots\"")),
    )
    .unwrap();
    let start = std::time::Instant::now();
    while !agent.log_text().contains("30-bad.toml") {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        agent.log_text().contains("reload refused"),
        "{}",
        agent.log_text()
    );
    assert!(agent.log_text().contains("line 2"), "{}", agent.log_text());
    assert_eq!(cap(), 3);
    // Removing a drop-in takes its quota away again.
    std::fs::remove_file(drop_ins.join("30-bad.toml")).unwrap();
    std::fs::remove_file(drop_ins.join("20-more.toml")).unwrap();
    wait_cap(2);
}
