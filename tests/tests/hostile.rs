//! The control plane under hostile input, as root against the real agent: users who open
//! and drop watchers or flood /metrics, a peer whose groups change after it connected, an
//! Alertmanager that answers with a gigabyte, a config that once crashed the parser. Each
//! test is one way a local user or a careless operator broke an earlier build.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rlagent_tests::{
    privileged, target_bin, wait_placed, Agent, Helper, Listener, Scratch, TestCgroup,
};

const USER: u32 = 61201;
const OTHER: u32 = 61202;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An agent whose socket everyone may reach (mode 0666; the agent checks each request).
fn open_agent(cgroup: &TestCgroup, scratch: &Scratch, control: &str, rest: &str) -> Agent {
    scratch.write_config(cgroup, "", rest);
    let text_cfg = std::fs::read_to_string(scratch.config_path()).unwrap();
    std::fs::write(
        scratch.config_path(),
        text_cfg.replace(
            "[control]\n",
            &format!("[control]\nmode = \"0666\"\n{control}"),
        ),
    )
    .unwrap();
    std::fs::set_permissions(scratch.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    Agent::start(scratch)
}

/// Runs a Python script as `uid` with `args`; its output.
fn python_as(uid: u32, script: &str, args: &[&str]) -> Output {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("python3")
}

/// Opens `n` watchers, reads each one's first line, prints how many were told `busy`, then
/// holds them for `hold` seconds and closes them all.
const WATCHERS: &str = r#"
import socket, sys, time
path, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held, busy = [], 0
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(path)
        s.sendall(b'{"version":1,"request":"watch_alerts"}\n')
        first = s.makefile().readline()
        if '"busy"' in first:
            busy += 1
    except OSError:
        busy += 1
    held.append(s)
print(busy, flush=True)
time.sleep(hold)
for s in held:
    s.close()
"#;

fn status_as_root(scratch: &Scratch) -> Duration {
    let start = Instant::now();
    let out = rlagent_tests::rlctl(&scratch.socket_path())
        .arg("status")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    start.elapsed()
}

#[test]
fn closed_watchers_free_their_slots_and_root_keeps_a_reserve() {
    if !privileged("closed_watchers_free_their_slots") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    let _agent = open_agent(&cgroup, &scratch, "", "");
    let socket = scratch.socket_path().display().to_string();
    // A user opens 520 watchers and closes them at once: every slot comes back.
    let out = python_as(USER, WATCHERS, &[&socket, "520", "0"]);
    assert!(out.status.success(), "{}", text(&out));
    let busy: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(busy >= 520 - 448, "users share 448 slots: {busy} busy");
    std::thread::sleep(Duration::from_millis(300));
    let took = status_as_root(&scratch);
    assert!(took < Duration::from_secs(1), "root waited {took:?}");
    let out = python_as(USER, WATCHERS, &[&socket, "400", "0"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "the closed watchers' slots were freed: {}",
        text(&out)
    );
    // While a user holds every slot users may take, root is still served.
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg(WATCHERS)
        .args([&socket, "500", "20"])
        .uid(USER)
        .gid(USER)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "52", "500 watchers, 448 served");
    let took = status_as_root(&scratch);
    assert!(took < Duration::from_secs(1), "root waited {took:?}");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn a_flood_of_idle_metrics_connections_leaves_control_and_placement_working() {
    if !privileged("idle_metrics_connections") {
        return;
    }
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // The agent starts under the usual soft limit of 1024 descriptors.
    setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard).unwrap();
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    let placed = 61203;
    scratch.write_config(
        &cgroup,
        "",
        &format!("[[group]]\nname = \"batch\"\nuids = [{placed}]\n"),
    );
    let text_cfg = std::fs::read_to_string(scratch.config_path()).unwrap();
    let root = format!("cgroup_root = \"{}/slice\"\n", cgroup.relative);
    std::fs::write(scratch.config_path(), format!("{root}{text_cfg}")).unwrap();
    let agent = Agent::start(&scratch);
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let mut idle = Vec::new();
    for _ in 0..2000 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", scratch.metrics_port())) {
            idle.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let took = status_as_root(&scratch);
    assert!(took < Duration::from_secs(1), "root waited {took:?}");
    let out = rlagent_tests::rlctl(&scratch.socket_path())
        .args(["set-quota", "user:61204", "--conns", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // A new process of the rule's UID is still placed.
    let mut child = Command::new(target_bin("conn-helper"))
        .arg(&cgroup.path)
        .arg(placed.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_placed(child.id(), &format!("{}/slice/batch", cgroup.relative));
    child.kill().unwrap();
    child.wait().unwrap();
    let fds = std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .unwrap()
        .count();
    assert!(fds < 200, "the agent holds {fds} descriptors");
    drop(idle);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    // Refusals are counted.
    std::thread::sleep(Duration::from_millis(200));
    let (_, body) = rlagent_tests::http_get(scratch.metrics_port(), "/metrics");
    let refused = rlagent_tests::sample(
        &body,
        "rlagent_budget_exhausted_total{budget=\"metrics_connections\"}",
    )
    .unwrap_or_default();
    assert!(refused >= 1000.0, "{refused} refusals counted");
}

#[test]
fn groups_gained_after_connecting_grant_nothing() {
    if !privileged("groups_gained_after_connecting") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    // The control group is `daemon` (GID 1), which every Debian system has.
    let agent = open_agent(&cgroup, &scratch, "group = \"daemon\"\n", "");
    // The agent is stopped, so the connection waits in its backlog until it runs again:
    // the client connects as a non-member, then joins the group; the agent then accepts.
    // The kernel recorded the credentials at connect(); /proc would show the group.
    agent.signal(nix::sys::signal::Signal::SIGSTOP);
    let script = r#"
import os, socket, sys
os.setgroups([])
os.setresgid(61201, 61201, 0)
os.setresuid(61201, 61201, 0)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
os.setresuid(0, 0, 0)
os.setgroups([1])
open(sys.argv[2], 'w').write('joined')
os.setresgid(61201, 61201, 61201)
os.setresuid(61201, 61201, 61201)
s.sendall(b'{"version":1,"request":"set_quota","target":"user:61205","quota":{"conns":"3"}}\n')
print(s.makefile().readline(), flush=True)
"#;
    let flag = scratch.dir.path().join("joined");
    let mut client = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(scratch.socket_path())
        .arg(&flag)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !flag.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the client did not connect"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    agent.signal(nix::sys::signal::Signal::SIGCONT);
    let mut answer = String::new();
    client
        .stdout
        .as_mut()
        .unwrap()
        .read_to_string(&mut answer)
        .unwrap();
    client.wait().unwrap();
    assert!(answer.contains("permission_denied"), "{answer}");
    let out = rlagent_tests::rlctl(&scratch.socket_path())
        .arg("list")
        .output()
        .unwrap();
    assert!(out.status.success(), "rlctl list: {}", text(&out));
    assert!(!text(&out).contains("61205"), "{}", text(&out));
}

#[test]
fn a_multi_byte_duration_is_refused_and_sighup_with_it_keeps_the_agent() {
    if !privileged("multi_byte_duration") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(&cgroup, "", "");
    let mut agent = Agent::start(&scratch);
    let good = std::fs::read_to_string(scratch.config_path()).unwrap();
    std::fs::write(
        scratch.config_path(),
        format!("{good}\n[alerts]\ninterval = \"1é\"\n"),
    )
    .unwrap();
    let out = Command::new(target_bin("rlagent"))
        .arg("--config")
        .arg(scratch.config_path())
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("interval"), "{}", text(&out));
    agent.reload();
    assert!(
        agent.log_text().contains("reload refused"),
        "{}",
        agent.log_text()
    );
    let took = status_as_root(&scratch);
    assert!(took < Duration::from_secs(1));
}

#[test]
fn a_gigabyte_reply_from_alertmanager_is_never_read() {
    if !privileged("gigabyte_alertmanager_reply") {
        return;
    }
    // An "Alertmanager" that answers every request with a 1 GiB body, as fast as the
    // agent will take it.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let written = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (written, requests, stop) = (written.clone(), requests.clone(), stop.clone());
        server.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = server.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                requests.fetch_add(1, Ordering::Relaxed);
                s.set_nonblocking(false).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut head = [0u8; 4096];
                let _ = s.read(&mut head);
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n",
                );
                let chunk = vec![b'x'; 1 << 16];
                for _ in 0..(1 << 14) {
                    if stop.load(Ordering::Relaxed) || s.write_all(&chunk).is_err() {
                        break;
                    }
                    written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        });
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(
        &cgroup,
        "",
        &format!(
            "[alerts]\ndefaults = false\ninterval = \"1s\"\nalertmanager_url = \"http://127.0.0.1:{port}\"\n\
             [[alert]]\nname = \"Busy\"\nstat = \"conns_ratio\"\nop = \">=\"\nthreshold = 0\nsummary = \"s\"\n\
             [[quota]]\ntarget = \"user:{OTHER}\"\nconns = 1\n"
        ),
    );
    let agent = Agent::start(&scratch);
    let listener = Listener::new();
    let mut h = Helper::spawn(&cgroup.path, OTHER);
    assert!(h.connect("tcp4", listener.port4).is_ok());
    let rss_kib = || -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    };
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < Duration::from_secs(6) {
        peak = peak.max(rss_kib());
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    assert!(
        requests.load(Ordering::Relaxed) >= 2,
        "the firing alert was sent every evaluation"
    );
    println!(
        "peak RSS {peak} KiB; the server wrote {} MiB before the agent hung up",
        written.load(Ordering::Relaxed) >> 20
    );
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    assert!(
        written.load(Ordering::Relaxed) < 256 << 20,
        "the agent kept reading the body"
    );
}

/// `"\x1b[2J\r\n<0>FAKE"`: clears a terminal, then starts a line journald would file at
/// priority 0 (emerg).
const FORGED_COMM: &[u8] = b"\x1b[2J\r\n<0>FAKE";
/// The same name as it must be shown.
const FORGED_SHOWN: &str = r"\x1b[2J\x0d\x0a<0>FAKE";

/// Output that shows the forged name escaped: no control byte but line ends, the escaped
/// form present, and no line that begins with a priority prefix.
fn assert_escaped(what: &str, output: &[u8]) {
    let text = String::from_utf8_lossy(output);
    assert!(
        !output.iter().any(|b| b.is_ascii_control() && *b != b'\n'),
        "{what}: a raw control byte in {text:?}"
    );
    assert!(text.contains(FORGED_SHOWN), "{what}: {text:?}");
    assert!(
        !text.lines().any(|l| l.starts_with("<0>")),
        "{what}: a forged line in {text:?}"
    );
}

#[test]
fn a_process_name_with_escapes_and_newlines_forges_no_log_line_or_table_row() {
    if !privileged("process_name_escaped") {
        return;
    }
    const NAMED: u32 = 61211;
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(
        &cgroup,
        "",
        &format!("[[quota]]\ntarget = \"user:{NAMED}\"\nconns = 1\n"),
    );
    let agent = Agent::start(&scratch);
    let listener = Listener::new();
    let mut follow = rlagent_tests::rlctl(&scratch.socket_path())
        .args(["events", "--follow", "--uid", &NAMED.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("rlctl events --follow");
    let mut follow_out = BufReader::new(follow.stdout.take().unwrap());
    let mut header = Vec::new();
    follow_out.read_until(b'\n', &mut header).unwrap();
    assert!(
        String::from_utf8_lossy(&header).contains("COMM"),
        "the stream started: {:?}",
        String::from_utf8_lossy(&header)
    );

    let mut h = Helper::spawn(&cgroup.path, NAMED);
    let hex: String = FORGED_COMM.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(h.cmd(&format!("comm {hex}")), "ok");
    let comm = std::fs::read(format!("/proc/{}/comm", h.pid())).unwrap();
    assert_eq!(
        comm,
        [FORGED_COMM, b"\n"].concat(),
        "the kernel kept the name"
    );
    assert!(h.connect("tcp4", listener.port4).is_ok());
    assert!(!h.connect("tcp4", listener.port4).is_ok(), "over the cap");

    // The follower's row: one line, the name escaped.
    let mut row = Vec::new();
    follow_out.read_until(b'\n', &mut row).unwrap();
    assert!(
        follow.try_wait().unwrap().is_none(),
        "rlctl events --follow ended"
    );
    assert_escaped("rlctl events --follow", &row);
    assert!(String::from_utf8_lossy(&row).contains("denied"));
    let _ = follow.kill();
    let _ = follow.wait();

    for args in [
        vec!["events".to_string(), "--uid".to_string(), NAMED.to_string()],
        vec!["why".to_string(), format!("user:{NAMED}")],
    ] {
        let out = scratch.rlctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "rlctl {args:?}: {}", text(&out));
        assert_escaped(&format!("rlctl {args:?}"), &out.stdout);
    }
    // JSON carries the name as it is (JSON escapes it).
    let out = scratch.rlctl(&["--json", "events", "--uid", &NAMED.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!out.stdout.iter().any(|b| *b == 0x1b || *b == b'\r'));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["events"][0]["comm"].as_str().unwrap().as_bytes(),
        FORGED_COMM
    );

    // The warning line, once the agent has written it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = std::fs::read(&agent.log).unwrap();
        if String::from_utf8_lossy(&log).contains("connect() denied") {
            break log;
        }
        assert!(Instant::now() < deadline, "no denial logged");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_escaped("the agent's log", &log);
    let log = String::from_utf8_lossy(&log);
    assert!(
        log.lines()
            .any(|l| l.contains("connect() denied") && l.contains(FORGED_SHOWN)),
        "{log}"
    );
}

#[test]
fn a_drop_in_linked_to_a_secret_is_refused_on_reload_without_showing_it() {
    if !privileged("drop_in_link_to_secret") {
        return;
    }
    const CAPPED: u32 = 61212;
    const SECRET: &str = "hunter2-root-only-first-line";
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(
        &cgroup,
        "",
        &format!("[[quota]]\ntarget = \"user:{CAPPED}\"\nconns = 1\n"),
    );
    let agent = Agent::start(&scratch);
    let secret = scratch.dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let drop_ins = scratch.config_path().with_file_name("rlagent.d");
    std::fs::create_dir(&drop_ins).unwrap();
    let refused = |reason: &str| {
        let out = scratch.rlctl(&["reload"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let reply = text(&out);
        assert!(
            reply.contains("50-x.toml") && reply.contains(reason),
            "{reply}"
        );
        assert!(!reply.contains(SECRET), "{reply}");
    };
    // A link out of the directory: never read.
    std::os::unix::fs::symlink(&secret, drop_ins.join("50-x.toml")).unwrap();
    refused("leads outside");
    // Root's own file that does not parse: line and column, not its text.
    std::fs::remove_file(drop_ins.join("50-x.toml")).unwrap();
    std::fs::write(drop_ins.join("50-x.toml"), format!("{SECRET}\n")).unwrap();
    refused("line 1, column");
    assert!(!agent.log_text().contains(SECRET), "{}", agent.log_text());

    // The agent runs on the config it had: the cap still holds.
    let out = scratch.rlctl(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let listener = Listener::new();
    let mut h = Helper::spawn(&cgroup.path, CAPPED);
    assert!(h.connect("tcp4", listener.port4).is_ok());
    assert!(
        !h.connect("tcp4", listener.port4).is_ok(),
        "the cap of 1 held"
    );
}
