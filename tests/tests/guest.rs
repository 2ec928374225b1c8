//! Tests that only make sense on a pure cgroup v2 kernel: they run inside the qemu guest
//! that `cargo xtask vm-test` boots (never in a host `cargo test`; this target has
//! `test = false`). The guest is throw-away, so here the agent may attach at the root
//! cgroup and place processes host-wide.

use rlagent_tests::{cgroup_of, Agent, Connect, Helper, Listener, Scratch};

fn in_guest() {
    assert_eq!(
        std::env::var("RLAGENT_GUEST").as_deref(),
        Ok("1"),
        "guest tests run only inside the qemu guest: use `cargo xtask vm-test`"
    );
}

fn write_config(scratch: &Scratch, text: &str) {
    let full = format!(
        "{}[bpf]\npin_path = \"{}\"\n{text}",
        scratch.private_paths(),
        scratch.pin_path().display()
    );
    std::fs::write(scratch.config_path(), full).unwrap();
}

#[test]
fn host_wide_connection_cap_at_the_root_cgroup() {
    in_guest();
    let scratch = Scratch::new();
    write_config(
        &scratch,
        "attach_cgroup = \"/\"\n[[quota]]\ntarget = \"user:*\"\nconns = 2\n",
    );
    let _agent = Agent::start(&scratch);
    let listener = Listener::new();
    // The helper stays in its own (root) cgroup: host-wide attach covers every cgroup.
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut h = Helper::spawn(root, 2000);
    assert!(h.connect("tcp4", listener.port4).is_ok());
    assert!(h.connect("tcp6", listener.port6).is_ok());
    assert!(matches!(
        h.connect("tcp4", listener.port4),
        Connect::Err(libc::EPERM, _)
    ));
    let mut other = Helper::spawn(root, 2001);
    assert!(
        other.connect("tcp4", listener.port4).is_ok(),
        "caps are per UID"
    );
    h.close_all();
    scratch.wait_live(2000, 0);
}

#[test]
fn rate_and_group_caps_hold_host_wide_at_the_root_cgroup() {
    in_guest();
    let scratch = Scratch::new();
    // Attached at the root: a rate for UID 2020 wherever it runs, and a group cap for the
    // processes of group `pool` (placed by a rule on UID 2021), in pure cgroup v2 with
    // systemd-less placement.
    write_config(
        &scratch,
        "attach_cgroup = \"/\"\n[[quota]]\ntarget = \"user:2020\"\nconn_rate = \"1/min\"\nconn_burst = 3\n[[group]]\nname = \"pool\"\nuids = [2021, 2022]\n[[quota]]\ntarget = \"pool\"\nconns = 2\n",
    );
    let text = std::fs::read_to_string(scratch.config_path()).unwrap();
    std::fs::write(
        scratch.config_path(),
        format!("cgroup_root = \"rl-pool\"\n{text}"),
    )
    .unwrap();
    let _agent = Agent::start(&scratch);
    let listener = Listener::new();
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut rated = Helper::spawn(root, 2020);
    let admitted = (0..6)
        .filter(|_| {
            let c = rated.connect("tcp4", listener.port4);
            rated.close_all();
            c.is_ok()
        })
        .count();
    assert_eq!(admitted, 3, "the burst, then nothing for a minute");
    // The helpers start in the root cgroup; placement moves them into the group's, and
    // the socket's charge follows the caller's cgroup at connect().
    let mut a = Helper::spawn(root, 2021);
    let mut b = Helper::spawn(root, 2022);
    for h in [&a, &b] {
        wait_placed(h.pid(), "rl-pool/pool");
    }
    assert!(a.connect("tcp4", listener.port4).is_ok());
    assert!(b.connect("tcp6", listener.port6).is_ok());
    assert!(matches!(
        b.connect("tcp4", listener.port4),
        Connect::Err(libc::EPERM, _)
    ));
    a.close_all();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.connect("tcp4", listener.port4).is_ok() {
        assert!(
            Instant::now() < deadline,
            "a's close never freed the group's slot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let why = rlctl(&scratch, &["why", "user:2022"]);
    let why = String::from_utf8_lossy(&why.stdout);
    assert!(
        why.contains("by group") && why.contains("conns of group:pool = 2"),
        "{why}"
    );
}

// ---- cgroup v2 quotas and placement -------------------------------------------------

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::process::{CommandExt, ExitStatusExt},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const MOUNT: &str = "/sys/fs/cgroup";

/// Each test gets its own subtree, so tests never see each other's cgroups.
fn config_with_root(scratch: &Scratch, root: &str, rest: &str) {
    write_config(scratch, &format!("attach_cgroup = \"/\"\n{rest}"));
    let text = std::fs::read_to_string(scratch.config_path()).unwrap();
    std::fs::write(
        scratch.config_path(),
        format!("cgroup_root = \"{root}\"\n{text}"),
    )
    .unwrap();
}

/// Waits until `pid` is in cgroup `want` (relative to the mount); returns how long it took.
fn wait_placed(pid: u32, want: &str) -> Duration {
    let start = Instant::now();
    loop {
        if cgroup_of(pid) == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "pid {pid} in {:?}, expected {want}",
            cgroup_of(pid)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `guest-load <args>` as `uid`, stdin and stdout piped.
fn load(uid: u32, args: &str) -> Child {
    let mut cmd = Command::new(rlagent_tests::target_bin("guest-load"));
    cmd.args(args.split_whitespace())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if uid != 0 {
        cmd.uid(uid).gid(uid);
    }
    cmd.spawn().expect("starting guest-load")
}

fn go(child: &mut Child) {
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
}

fn read_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_string()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{MOUNT}/{path}"))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_string()
}

fn usage_usec(cgroup: &str) -> u64 {
    read(&format!("{cgroup}/cpu.stat"))
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .unwrap()
        .parse()
        .unwrap()
}

/// `rlagent stats --json` for this scratch's config, the target named `target`.
fn target_stats(scratch: &Scratch, target: &str) -> serde_json::Value {
    let out = Command::new(rlagent_tests::target_bin("rlagent"))
        .arg("--config")
        .arg(scratch.config_path())
        .args(["stats", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    stats["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .unwrap_or_else(|| panic!("no {target} in {stats}"))
        .clone()
}

#[test]
fn cpu_quota_holds_a_busy_loop_to_half_a_cpu() {
    in_guest();
    let scratch = Scratch::new();
    config_with_root(
        &scratch,
        "rl-cpu",
        "[[group]]\nname = \"batch\"\ncomms = [\"guest-load\"]\n[[quota]]\ntarget = \"batch\"\ncpu = \"50%\"\n",
    );
    let _agent = Agent::start(&scratch);
    assert_eq!(read("rl-cpu/batch/cpu.max"), "50000 100000");
    let mut spin = load(2000, "wait spin 3");
    let placed_in = wait_placed(spin.id(), "rl-cpu/batch");
    println!(
        "placement of a new process (exec event to cgroup.procs): {} ms",
        placed_in.as_millis()
    );
    let (u0, t0) = (usage_usec("rl-cpu/batch"), Instant::now());
    go(&mut spin);
    assert!(spin.wait().unwrap().success());
    let ratio = (usage_usec("rl-cpu/batch") - u0) as f64 / t0.elapsed().as_micros() as f64;
    println!("cpu usage / wall time at cpu = 50%: {ratio:.3}");
    assert!((0.45..=0.55).contains(&ratio), "ratio {ratio:.3}");
    let stats = target_stats(&scratch, "group:batch");
    assert!(
        stats["cpu"]["nr_throttled"].as_u64().unwrap() > 10,
        "{stats}"
    );
    assert!(
        stats["cpu"]["throttled_usec"].as_u64().unwrap() > 500_000,
        "{stats}"
    );
    let (_, body) = rlagent_tests::http_get(scratch.metrics_port(), "/metrics");
    let series =
        |s: &str| rlagent_tests::sample(&body, s).unwrap_or_else(|| panic!("no {s} in\n{body}"));
    assert!(series("rlagent_cpu_throttled_periods_total{target=\"group:batch\"}") > 10.0);
    assert!(series("rlagent_cpu_throttled_seconds_total{target=\"group:batch\"}") > 0.5);
    assert_eq!(
        series("rlagent_cpu_quota_cores{target=\"group:batch\"}"),
        0.5
    );
    assert!(series("rlagent_placement_moves_total") >= 1.0);
}

#[test]
fn memory_max_oom_kills_the_offender_only() {
    in_guest();
    let scratch = Scratch::new();
    config_with_root(
        &scratch,
        "rl-mem",
        "[[group]]\nname = \"hog\"\nuids = [2002]\n[[group]]\nname = \"calm\"\nuids = [2003]\n\
         [[quota]]\ntarget = \"hog\"\nmemory = \"64M\"\n[[quota]]\ntarget = \"calm\"\nmemory = \"64M\"\n",
    );
    let mut agent = Agent::start(&scratch);
    let mut calm = load(2003, "sleep 30");
    let mut hog = load(2002, "wait touch 200");
    wait_placed(hog.id(), "rl-mem/hog");
    wait_placed(calm.id(), "rl-mem/calm");
    go(&mut hog);
    let status = hog.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the 200 MB toucher is OOM-killed: {status:?}"
    );
    let stats = target_stats(&scratch, "group:hog");
    assert_eq!(stats["memory"]["events_oom_kill"], 1, "{stats}");
    assert!(stats["memory"]["max"] == 64 << 20, "{stats}");
    let (_, body) = rlagent_tests::http_get(scratch.metrics_port(), "/metrics");
    assert_eq!(
        rlagent_tests::sample(
            &body,
            "rlagent_memory_oom_kills_total{target=\"group:hog\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        rlagent_tests::sample(&body, "rlagent_memory_max_bytes{target=\"group:hog\"}"),
        Some(67108864.0)
    );
    assert!(
        calm.try_wait().unwrap().is_none(),
        "the other group is unaffected"
    );
    assert_eq!(
        target_stats(&scratch, "group:calm")["memory"]["events_oom_kill"],
        0
    );
    agent.reload(); // the agent is alive and answering
    calm.kill().unwrap();
    calm.wait().unwrap();
}

#[test]
fn pids_max_contains_a_fork_bomb() {
    in_guest();
    let scratch = Scratch::new();
    config_with_root(
        &scratch,
        "rl-pids",
        "[[group]]\nname = \"bomb\"\nuids = [2004]\n[[quota]]\ntarget = \"bomb\"\npids = 10\n",
    );
    let _agent = Agent::start(&scratch);
    let mut bomb = load(2004, "wait forkbomb 200 3");
    wait_placed(bomb.id(), "rl-pids/bomb");
    go(&mut bomb);
    let started = Instant::now();
    assert_eq!(
        read_line(&mut bomb),
        format!("forked 9 errno {}", libc::EAGAIN),
        "the 11th task fails"
    );
    println!(
        "fork bomb contained in {} ms",
        started.elapsed().as_millis()
    );
    let stats = target_stats(&scratch, "group:bomb");
    assert_eq!(stats["pids"]["max"], 10, "{stats}");
    let (_, body) = rlagent_tests::http_get(scratch.metrics_port(), "/metrics");
    assert!(
        rlagent_tests::sample(&body, "rlagent_pids_denied_total{target=\"group:bomb\"}")
            .unwrap_or(0.0)
            >= 1.0,
        "{body}"
    );
    assert_eq!(
        rlagent_tests::sample(&body, "rlagent_pids_max{target=\"group:bomb\"}"),
        Some(10.0)
    );
    assert!(
        stats["pids"]["events_max"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    // The guest stays responsive while the bomb sits at its limit.
    let t = Instant::now();
    assert!(Command::new("true").status().unwrap().success());
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(bomb.wait().unwrap().success());
}

#[test]
fn a_process_that_setuids_is_moved_into_its_user_cgroup() {
    in_guest();
    let scratch = Scratch::new();
    config_with_root(
        &scratch,
        "rl-user",
        "[[quota]]\ntarget = \"user:2005\"\ncpu = \"30%\"\npids = 50\n",
    );
    let _agent = Agent::start(&scratch);
    let mut p = load(0, "become 2005 5");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(cgroup_of(p.id()), "", "root's process is left where it is");
    go(&mut p);
    assert_eq!(read_line(&mut p), "became");
    let placed_in = wait_placed(p.id(), "rl-user/user-2005");
    println!("placement after setuid: {} ms", placed_in.as_millis());
    assert_eq!(read("rl-user/user-2005/cpu.max"), "30000 100000");
    assert_eq!(read("rl-user/user-2005/pids.max"), "50");
    p.kill().unwrap();
    p.wait().unwrap();
}

#[test]
fn sighup_changes_cpu_max_in_place_and_a_bad_config_keeps_it() {
    in_guest();
    let scratch = Scratch::new();
    let quota = |cpu: &str| {
        format!("[[group]]\nname = \"batch\"\n[[quota]]\ntarget = \"batch\"\ncpu = \"{cpu}\"\n")
    };
    config_with_root(&scratch, "rl-hup", &quota("50%"));
    let mut agent = Agent::start(&scratch);
    assert_eq!(read("rl-hup/batch/cpu.max"), "50000 100000");
    config_with_root(&scratch, "rl-hup", &quota("20%"));
    agent.reload();
    assert_eq!(read("rl-hup/batch/cpu.max"), "20000 100000");
    config_with_root(&scratch, "rl-hup", &quota("twenty"));
    agent.reload();
    assert_eq!(read("rl-hup/batch/cpu.max"), "20000 100000", "kept");
    assert!(agent.log_text().contains("reload refused") && agent.log_text().contains("twenty"));
    config_with_root(&scratch, "rl-hup", "[[group]]\nname = \"batch\"\n");
    agent.reload();
    assert_eq!(
        read("rl-hup/batch/cpu.max"),
        "max 100000",
        "a removed quota is reset to max"
    );
}

#[test]
fn limits_outlive_the_agent_and_uninstall_moves_processes_back() {
    in_guest();
    let scratch = Scratch::new();
    config_with_root(
        &scratch,
        "rl-un",
        "[[group]]\nname = \"batch\"\nuids = [2006]\n[[quota]]\ntarget = \"batch\"\npids = 20\n",
    );
    let agent = Agent::start(&scratch);
    let mut p = load(2006, "sleep 30");
    wait_placed(p.id(), "rl-un/batch");
    assert!(agent.stop().success());
    assert_eq!(
        cgroup_of(p.id()),
        "rl-un/batch",
        "placed processes stay when the agent stops"
    );
    assert_eq!(
        read("rl-un/batch/pids.max"),
        "20",
        "the kernel keeps the limits"
    );
    scratch.uninstall();
    assert_eq!(cgroup_of(p.id()), "", "moved back to the root cgroup");
    assert!(
        !std::path::Path::new("/sys/fs/cgroup/rl-un").exists(),
        "subtree removed"
    );
    p.kill().unwrap();
    p.wait().unwrap();
}

// ---- control socket and rlctl ---------------------------------------------------------

fn rlctl(scratch: &Scratch, args: &[&str]) -> std::process::Output {
    let out = scratch.rlctl(args);
    assert!(
        out.status.success(),
        "rlctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// CPU share of `cgroup` over `window`.
fn share(cgroup: &str, window: Duration) -> f64 {
    let (u0, t0) = (usage_usec(cgroup), Instant::now());
    std::thread::sleep(window);
    (usage_usec(cgroup) - u0) as f64 / t0.elapsed().as_micros() as f64
}

#[test]
fn rlctl_changes_a_running_groups_cpu_share_and_it_survives_a_restart() {
    in_guest();
    let scratch = Scratch::new();
    config_with_root(
        &scratch,
        "rl-ctl",
        "[[group]]\nname = \"batch\"\ncomms = [\"guest-load\"]\n[[quota]]\ntarget = \"batch\"\ncpu = \"50%\"\n",
    );
    let agent = Agent::start(&scratch);
    let mut spin = load(2010, "wait spin 6");
    wait_placed(spin.id(), "rl-ctl/batch");
    go(&mut spin);
    std::thread::sleep(Duration::from_millis(300));
    let before = share("rl-ctl/batch", Duration::from_secs(2));
    rlctl(&scratch, &["set-quota", "batch", "--cpu", "30%"]);
    std::thread::sleep(Duration::from_millis(200));
    let after = share("rl-ctl/batch", Duration::from_secs(2));
    println!("cpu share of a running group: {before:.3} at 50%, {after:.3} after rlctl set-quota --cpu 30%");
    assert!((0.45..=0.55).contains(&before), "{before}");
    assert!((0.25..=0.35).contains(&after), "{after}");
    assert!(spin.wait().unwrap().success());

    assert!(agent.stop().success());
    let _agent = Agent::start(&scratch);
    assert_eq!(
        read("rl-ctl/batch/cpu.max"),
        "30000 100000",
        "the runtime quota survives a restart"
    );
    let list = String::from_utf8(rlctl(&scratch, &["list"]).stdout).unwrap();
    assert!(
        list.lines().any(|l| l.starts_with("group:batch")
            && l.contains("cpu")
            && l.contains("30%")
            && l.contains(" runtime ")
            && l.ends_with(" yes")),
        "{list}"
    );
}

#[test]
fn rlctl_run_places_the_command_and_conns_take_effect_on_the_next_connect() {
    in_guest();
    let scratch = Scratch::new();
    config_with_root(&scratch, "rl-run", "[[group]]\nname = \"batch\"\n");
    let _agent = Agent::start(&scratch);
    let out = rlctl(
        &scratch,
        &["run", "batch", "--", "cat", "/proc/self/cgroup"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0::/rl-run/batch"
    );

    let listener = Listener::new();
    let mut h = Helper::spawn(std::path::Path::new(MOUNT), 2011);
    for _ in 0..3 {
        assert!(h.connect("tcp4", listener.port4).is_ok(), "no cap yet");
    }
    h.close_all();
    scratch.wait_live(2011, 0);
    rlctl(&scratch, &["set-quota", "user:2011", "--conns", "2"]);
    assert!(h.connect("tcp4", listener.port4).is_ok());
    assert!(h.connect("tcp6", listener.port6).is_ok());
    assert!(matches!(
        h.connect("tcp4", listener.port4),
        Connect::Err(libc::EPERM, _)
    ));
}

#[test]
fn the_memory_alert_fires_above_85_percent_of_memory_max() {
    in_guest();
    let scratch = Scratch::new();
    config_with_root(
        &scratch,
        "rl-alert",
        "[[group]]\nname = \"hold\"\nuids = [2012]\n[[quota]]\ntarget = \"hold\"\nmemory = \"64M\"\n\
         [alerts]\ndefaults = false\ninterval = \"1s\"\n\
         [[alert]]\nname = \"MemoryNearLimit\"\nstat = \"memory_usage_ratio\"\nop = \">\"\nthreshold = 0.85\nfor = \"2s\"\nsummary = \"{target} uses {value} of its memory limit\"\n",
    );
    let _agent = Agent::start(&scratch);
    let mut p = load(2012, "wait touch 58 20");
    wait_placed(p.id(), "rl-alert/hold");
    go(&mut p);
    assert_eq!(read_line(&mut p), "touched 58");
    let start = Instant::now();
    loop {
        let out = rlctl(&scratch, &["alerts", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let firing = v["alerts"].as_array().unwrap().iter().any(|a| {
            a["rule"] == "MemoryNearLimit" && a["target"] == "group:hold" && a["state"] == "firing"
        });
        if firing {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no firing memory alert: {v}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "memory alert fired {} ms after the process reached 58 of 64 MiB",
        start.elapsed().as_millis()
    );
    let (_, body) = rlagent_tests::http_get(scratch.metrics_port(), "/metrics");
    assert_eq!(
        rlagent_tests::sample(&body, "rlagent_alerts_firing"),
        Some(1.0),
        "{body}"
    );
    p.kill().unwrap();
    p.wait().unwrap();
}
