//! The control socket and rlctl against the real agent (programs on a child cgroup of this
//! host's cgroup2 mount, socket and state file in the test's scratch dir).

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    process::{Command, Output},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use rlagent_tests::{privileged, Agent, Connect, Helper, Listener, Scratch, TestCgroup};

const UID: u32 = 61101;

fn rlctl(scratch: &Scratch, args: &[&str]) -> Output {
    scratch.rlctl(args)
}

fn rlctl_as(uid: u32, scratch: &Scratch, args: &[&str]) -> Output {
    rlagent_tests::rlctl(&scratch.socket_path())
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("running rlctl")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn setup(extra: &str) -> (TestCgroup, Scratch) {
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(
        &cgroup,
        extra,
        "[[quota]]\ntarget = \"user:*\"\nconns = 10\n",
    );
    (cgroup, scratch)
}

/// Sends raw bytes and returns the first response line (empty if the agent closed).
fn raw(scratch: &Scratch, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(scratch.socket_path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(bytes).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    line
}

#[test]
fn set_quota_takes_effect_at_once_is_listed_and_survives_a_restart() {
    if !privileged("control_set_quota") {
        return;
    }
    let (cgroup, scratch) = setup("");
    let agent = Agent::start(&scratch);
    let listener = Listener::new();
    let out = rlctl(
        &scratch,
        &["set-quota", &format!("user:{UID}"), "--conns", "2"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("user:{UID}: set conns=2")));
    let mut h = Helper::spawn(&cgroup.path, UID);
    assert!(h.connect("tcp4", listener.port4).is_ok());
    assert!(h.connect("tcp4", listener.port4).is_ok());
    assert!(
        matches!(
            h.connect("tcp4", listener.port4),
            Connect::Err(libc::EPERM, _)
        ),
        "applied at once"
    );

    let list = text(&rlctl(&scratch, &["list"]));
    assert!(
        list.lines().any(|l| l.contains(&format!("user:{UID}"))
            && l.contains("conns")
            && l.contains(" runtime ")
            && l.ends_with(" yes")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("user:*") && l.contains(" config ")),
        "{list}"
    );

    assert!(agent.stop().success());
    let _agent = Agent::start(&scratch);
    let json = text(&rlctl(&scratch, &["list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let target = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == format!("user:{UID}"))
        .unwrap();
    assert_eq!(target["fields"]["conns"]["value"], "2");
    assert_eq!(target["fields"]["conns"]["source"], "runtime");
    h.close_all();
    scratch.wait_live(UID, 0);
    let mut h = Helper::spawn(&cgroup.path, UID);
    assert_eq!(
        (0..4)
            .filter(|_| h.connect("tcp4", listener.port4).is_ok())
            .count(),
        2,
        "cap restored after restart"
    );

    // Reload through the socket (what `systemctl reload` runs) answers promptly and the
    // agent goes on serving (a held lock once deadlocked here).
    let t = Instant::now();
    let out = rlctl(&scratch, &["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "reload answers promptly"
    );
    assert!(
        rlctl(&scratch, &["list"]).status.success(),
        "and the agent still serves"
    );

    let out = rlctl(
        &scratch,
        &["clear-quota", &format!("user:{UID}"), "--conns"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        (0..10)
            .filter(|_| h.connect("tcp4", listener.port4).is_ok())
            .count(),
        8,
        "back to the user:* default of 10"
    );
}

#[test]
fn invalid_requests_are_refused_clearly_and_change_nothing() {
    if !privileged("control_invalid_requests") {
        return;
    }
    let (_cgroup, scratch) = setup("");
    let _agent = Agent::start(&scratch);
    let before = std::fs::read(scratch.state_path()).ok();
    for (args, want) in [
        (
            vec!["set-quota", "user:61101", "--conns", "lots"],
            "invalid conns \"lots\"",
        ),
        (
            vec![
                "set-quota",
                "user:61101",
                "--memory",
                "1G",
                "--memory-high",
                "2G",
            ],
            "above memory 1G",
        ),
        (
            vec!["set-quota", "user:no-such-user-x", "--conns", "1"],
            "unknown user",
        ),
        (
            vec!["set-quota", "cgroup:no/such/cgroup", "--cpu", "10%"],
            "does not exist",
        ),
        (vec!["set-quota", "a b", "--cpu", "10%"], "invalid target"),
        (vec!["move", "nogroup", "1"], "no group named \"nogroup\""),
    ] {
        let out = rlctl(&scratch, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
    }
    assert_eq!(
        std::fs::read(scratch.state_path()).ok(),
        before,
        "state file untouched"
    );
    let out = rlctl(&scratch, &["list"]);
    assert!(out.status.success(), "rlctl list: {}", text(&out));
    let list = text(&out);
    assert!(
        !list.contains("61101") && !list.contains("no/such"),
        "{list}"
    );
    assert_eq!(
        rlctl(&scratch, &["set-quota", "x"]).status.code(),
        Some(2),
        "usage error"
    );

    // Raw protocol errors, each answered on its own connection.
    assert!(raw(&scratch, b"{oops\n").contains("\"bad_request\""));
    assert!(
        raw(&scratch, b"{\"version\":1,\"request\":\"list\",\"x\":1}\n").contains("unknown field")
    );
    assert!(raw(&scratch, b"{\"version\":9,\"request\":\"list\"}\n").contains("version 9"));
    let mut big = vec![b'x'; 70 * 1024];
    big.push(b'\n');
    assert!(raw(&scratch, &big).contains("\"too_large\""));
    // Several requests on one connection.
    let mut s = UnixStream::connect(scratch.socket_path()).unwrap();
    s.write_all(b"{\"version\":1,\"request\":\"status\"}\n{\"version\":1,\"request\":\"list\"}\n")
        .unwrap();
    let mut reader = BufReader::new(&s);
    for _ in 0..2 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":true"), "{line}");
    }
}

#[test]
fn unprivileged_callers_read_only_their_own_stats() {
    if !privileged("control_authorisation") {
        return;
    }
    let (cgroup, scratch) = setup("");
    // The socket may be opened to everyone; the agent still checks every request.
    let text_cfg = std::fs::read_to_string(scratch.config_path()).unwrap();
    std::fs::write(
        scratch.config_path(),
        text_cfg.replace("[control]\n", "[control]\nmode = \"0666\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(scratch.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let _agent = Agent::start(&scratch);
    let listener = Listener::new();
    let mut h = Helper::spawn(&cgroup.path, UID);
    assert!(h.connect("tcp4", listener.port4).is_ok());

    let out = rlctl_as(UID, &scratch, &["set-quota", "user:61101", "--conns", "99"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("permission denied") && text(&out).contains("uid 61101"),
        "{}",
        text(&out)
    );
    let out = rlctl_as(UID, &scratch, &["stats", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let conns = stats["conns"].as_array().unwrap();
    assert!(
        conns.iter().all(|c| c["uid"] == UID) && conns.len() == 1,
        "own stats only: {stats}"
    );
    let out = rlctl_as(UID, &scratch, &["stats", "user:0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("permission denied"), "{}", text(&out));

    // With the default mode 0660 a non-member cannot even connect, and says so.
    std::fs::set_permissions(
        scratch.socket_path(),
        std::fs::Permissions::from_mode(0o660),
    )
    .unwrap();
    let out = rlctl_as(UID, &scratch, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("permission denied") && text(&out).contains("control group"),
        "{}",
        text(&out)
    );
}

/// `rlctl status` lists the kernel features probed at start, each with what its absence
/// turns off. The agent started, so its programs loaded: every required feature must have
/// probed as there (a probe that calls one missing would have stopped the start).
#[test]
fn status_lists_the_kernel_features_and_what_each_one_turns_off() {
    if !privileged("status_kernel_features") {
        return;
    }
    let (_cgroup, scratch) = setup("");
    let _agent = Agent::start(&scratch);
    let out = rlctl(&scratch, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let features = status["kernel_features"]
        .as_array()
        .expect("kernel_features");
    let names: Vec<&str> = features.iter().filter_map(|f| f["name"].as_str()).collect();
    for name in [
        "cgroup_sock_addr",
        "cgroup_sock",
        "ringbuf",
        "sk_storage",
        "helper:bpf_set_retval",
        "tracing",
        "kfunc:bpf_sock_destroy",
        "psi_triggers",
    ] {
        assert!(names.contains(&name), "{name} is not listed: {names:?}");
    }
    for f in features {
        assert!(
            f["without"].as_str().is_some_and(|w| !w.is_empty()),
            "says nothing of its absence: {f}"
        );
        if f["required"] == true {
            assert_eq!(f["state"], "available", "the agent runs without it? {f}");
        }
    }
    // This kernel has PSI (the cgroup stats read it), and takes triggers as root.
    let psi = features
        .iter()
        .find(|f| f["name"] == "psi_triggers")
        .unwrap();
    assert_eq!(psi["state"], "available", "{psi}");
    let table = rlctl(&scratch, &["status"]);
    assert!(table.status.success(), "{}", text(&table));
    assert!(
        text(&table)
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["kernel_feature", "cgroup_sock_addr", "yes,", "required"]),
        "{}",
        text(&table)
    );
}

#[test]
fn stuck_and_surplus_clients_are_cut_off_while_others_are_served() {
    if !privileged("control_robustness") {
        return;
    }
    let (_cgroup, scratch) = setup("");
    let _agent = Agent::start(&scratch);
    // 300 clients that connect and say nothing.
    let stuck: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(scratch.socket_path()).unwrap())
        .collect();
    let t = Instant::now();
    let out = rlctl(&scratch, &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "served promptly beside 300 stuck clients"
    );
    // Past the client limit, newcomers are told the agent is busy.
    let surplus: Vec<UnixStream> = (0..250)
        .map(|_| UnixStream::connect(scratch.socket_path()).unwrap())
        .collect();
    let mut busy = 0;
    for mut s in surplus {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut line = String::new();
        if BufReader::new(&mut s).read_line(&mut line).is_ok() && line.contains("\"busy\"") {
            busy += 1;
        }
    }
    assert!(
        busy >= 250 - (512 - 300) - 1,
        "{busy} of the surplus clients were told busy"
    );
    // Idle clients are cut off after the idle timeout, and the agent serves again.
    let mut first = stuck.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        first.read_to_end(&mut rest).unwrap(),
        0,
        "closed by the agent"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(rlctl(&scratch, &["status"]).status.success());
}

#[test]
fn kill_9_during_a_burst_of_writes_never_corrupts_the_state_file() {
    if !privileged("control_crash_safety") {
        return;
    }
    let (_cgroup, scratch) = setup("");
    for round in 0..5 {
        let agent = Agent::start(&scratch);
        let socket = scratch.socket_path();
        // Write i sets user:<62000 + i % 20> to i + 1; `acked` counts the writes the agent
        // acknowledged before it died.
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writer = {
            let progress = progress.clone();
            std::thread::spawn(move || {
                let mut acked = 0;
                for i in 0..200 {
                    let out = rlagent_tests::rlctl(&socket)
                        .args([
                            "set-quota",
                            &format!("user:{}", 62000 + i % 20),
                            "--conns",
                            &(i + 1).to_string(),
                        ])
                        .output()
                        .unwrap();
                    if !out.status.success() {
                        break; // the agent is gone
                    }
                    acked = i + 1;
                    progress.store(acked, std::sync::atomic::Ordering::SeqCst);
                }
                acked
            })
        };
        // The kill comes after a number of acknowledged writes that differs by round (not
        // after a time, which a loaded machine stretches), while the writer goes on.
        let kill_after = 1 + 7 * round;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while progress.load(std::sync::atomic::Ordering::SeqCst) < kill_after {
            assert!(
                std::time::Instant::now() < deadline && !writer.is_finished(),
                "round {round}: {kill_after} writes not acknowledged in 60 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        agent.kill9();
        let acked = writer.join().unwrap();
        assert!(
            acked > 0,
            "round {round}: no write was acknowledged before the kill"
        );
        let state = rlagent::desired::state::RuntimeState::load(&scratch.state_path())
            .expect("state file parses after kill -9");
        assert!(state.quotas.len() <= 20);
        // Every acknowledged write is in the file; the one in flight at the kill (write
        // `acked`) may or may not be.
        for uid in 0..20u32.min(acked as u32) {
            let target = format!("user:{}", 62000 + uid);
            let last_acked = (0..acked).filter(|i| i % 20 == uid as usize).max().unwrap();
            let mut allowed = vec![(last_acked + 1).to_string()];
            if acked % 20 == uid as usize {
                allowed.push((acked + 1).to_string());
            }
            let saved = state.quotas[&target][&rlagent::model::quota::Field::Conns].clone();
            assert!(
                saved.as_ref().is_some_and(|v| allowed.contains(v)),
                "round {round}: {target} saved {saved:?}, acknowledged {allowed:?}"
            );
        }
        // The restarted agent loads it.
        let _agent = Agent::start(&scratch);
        assert!(rlctl(&scratch, &["list"]).status.success());
    }
}

#[test]
fn run_and_move_place_processes_in_a_group() {
    if !privileged("control_run_and_move") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    let text_cfg = format!(
        "cgroup_root = \"{}/slice\"\n{}[bpf]\nattach_cgroup = \"{}\"\npin_path = \"{}\"\n[[group]]\nname = \"batch\"\n",
        cgroup.relative,
        scratch.private_paths(),
        cgroup.relative,
        scratch.pin_path().display()
    );
    std::fs::write(scratch.config_path(), text_cfg).unwrap();
    let _agent = Agent::start(&scratch);
    let want = format!("0::/{}/slice/batch", cgroup.relative);
    let out = rlctl(
        &scratch,
        &["run", "batch", "--", "cat", "/proc/self/cgroup"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == want),
        "{}",
        text(&out)
    );

    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(cgroup.path.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    let out = rlctl(&scratch, &["move", "batch", &sleeper.id().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let now = std::fs::read_to_string(format!("/proc/{}/cgroup", sleeper.id())).unwrap();
    assert!(now.lines().any(|l| l == want), "{now}");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn under_journald_lines_carry_priorities_and_every_change_an_audit_line() {
    if !privileged("journald_priorities_and_audit") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let (_cgroup, scratch) = setup("");
    let log_path = scratch.dir.path().join("journal.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let mut agent = Command::new(rlagent_tests::target_bin("rlagent"))
        .arg("--config")
        .arg(scratch.config_path())
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(log)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !rlctl(&scratch, &["status"]).status.success() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the agent did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        rlctl(&scratch, &["set-quota", "user:61110", "--conns", "4"])
            .status
            .success()
    );
    assert_eq!(
        rlctl(&scratch, &["set-quota", "user:61110", "--conns", "x"])
            .status
            .code(),
        Some(1),
        "refused by the agent, not a usage error or a crash"
    );
    let _ = kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM);
    agent.wait().unwrap();
    let text = std::fs::read_to_string(&log_path).unwrap();
    let year = format!("{}-", current_year());
    for line in text.lines() {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| line.starts_with(p)),
            "no priority: {line}"
        );
        assert!(
            !line.contains(&year) && !line.contains("Z "),
            "a timestamp: {line}"
        );
    }
    assert!(text.contains("<6>") && text.contains("ready"), "{text}");
    let audit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("rlagent::audit"))
        .collect();
    assert_eq!(audit.len(), 2, "{text}");
    assert!(
        audit[0].contains("uid=0")
            && audit[0].contains("SetQuota")
            && audit[0].contains("accepted"),
        "{}",
        audit[0]
    );
    assert!(audit[1].contains("refused (Invalid)"), "{}", audit[1]);
}

/// The current UTC year, as a timestamp in the log would spell it.
fn current_year() -> i64 {
    // Checked where the calendar turns, so a wrong year cannot hide a timestamp.
    for (secs, year) in [
        (0, 1970),
        (951_782_400, 2000),
        (978_307_199, 2000),
        (978_307_200, 2001),
    ] {
        assert_eq!(year_at(secs), year, "year_at({secs})");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    year_at(now.as_secs() as i64)
}

/// The UTC year `secs` after the epoch (Howard Hinnant's `civil_from_days`).
fn year_at(secs: i64) -> i64 {
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(month <= 2)
}
