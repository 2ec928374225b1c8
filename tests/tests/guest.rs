//! Tests that only make sense on a pure cgroup v2 kernel: they run inside the qemu guest
//! that `cargo xtask vm-test` boots (never in a host `cargo test`; this target has
//! `test = false`). The guest is throw-away, so here the agent may attach at the root
//! cgroup and place processes host-wide.

use rlagent_tests::{cgroup_of, queries, Agent, Connect, Helper, Listener, Scratch};

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

// ---- claims of the capability table, each on the real kernel ---------------------------

/// `rlctl --json stats` from the running agent: the target named `target`.
fn agent_stats(scratch: &Scratch, target: &str) -> serde_json::Value {
    let out = rlctl(scratch, &["--json", "stats"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    stats["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .unwrap_or_else(|| panic!("no {target} in {stats}"))
        .clone()
}

/// A `key value` line of a flat-keyed cgroup file (memory.events, cpu.stat).
fn keyed(path: &str, key: &str) -> u64 {
    let text = read(path);
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {path}: {text}"))
}

/// `total=` of the `some` line of a PSI file.
fn psi_some_total(path: &str) -> u64 {
    let text = read(path);
    text.lines()
        .find(|l| l.starts_with("some "))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("total=")))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no some total in {path}: {text}"))
}

/// Waits for `child` to exit, failing after `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "pid {} still running after {} s",
            child.id(),
            limit.as_secs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn memory_high_holds_an_allocating_process_at_the_mark_and_psi_shows_the_stall() {
    in_guest();
    let scratch = Scratch::new();
    config_with_root(
        &scratch,
        "rl-high",
        "[[group]]\nname = \"soft\"\nuids = [2030]\n[[quota]]\ntarget = \"soft\"\nmemory_high = \"32M\"\n",
    );
    let _agent = Agent::start(&scratch);
    let high = 32u64 << 20;
    assert_eq!(read("rl-high/soft/memory.high"), high.to_string());
    assert_eq!(
        read("rl-high/soft/memory.max"),
        "max",
        "only the soft limit"
    );
    let mut p = load(2030, "wait touch 64");
    wait_placed(p.id(), "rl-high/soft");
    let (events0, stall0) = (
        keyed("rl-high/soft/memory.events", "high"),
        psi_some_total("rl-high/soft/memory.pressure"),
    );
    go(&mut p);
    // The guest has no swap, so past the mark the kernel can only throttle the process
    // (memory.high never kills). Watch it for 3 s: it keeps asking for memory, is not
    // done, and its usage stays near the mark, far from the 64 MiB it wants.
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < Duration::from_secs(3) {
        peak = peak.max(read("rl-high/soft/memory.current").parse::<u64>().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    let events1 = keyed("rl-high/soft/memory.events", "high");
    println!(
        "memory.high 32M, a process touching 64 MiB: after 3 s memory.current peaked at {:.1} MiB, memory.events high {events0} -> {events1}",
        peak as f64 / (1 << 20) as f64
    );
    assert!(
        p.try_wait().unwrap().is_none(),
        "touching 64 MiB finished within 3 s under memory.high 32M"
    );
    assert!(
        peak > high - (4 << 20) && peak < high + (8 << 20),
        "memory.current peaked at {peak}, memory.high is {high}"
    );
    assert!(events1 > events0, "memory.events high did not rise");
    // Still throttled: the count keeps rising while the process keeps asking.
    let deadline = Instant::now() + Duration::from_secs(5);
    while keyed("rl-high/soft/memory.events", "high") <= events1 {
        assert!(
            Instant::now() < deadline,
            "memory.events high stopped at {events1}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // PSI from the real kernel: the throttling is memory stall time. The agent's figure
    // lies between two reads of the kernel's file around the request, and is seconds.
    let before = psi_some_total("rl-high/soft/memory.pressure");
    let stats = agent_stats(&scratch, "group:soft");
    let (_, body) = rlagent_tests::http_get(scratch.metrics_port(), "/metrics");
    let after = psi_some_total("rl-high/soft/memory.pressure");
    let reported = stats["memory_pressure"]["some_total_usec"]
        .as_u64()
        .unwrap_or_else(|| panic!("no memory PSI in {stats}"));
    println!(
        "memory PSI some total of the throttled group: {} ms (kernel {} ms before, {} ms after; {} ms before the process started)",
        reported / 1000,
        before / 1000,
        after / 1000,
        stall0 / 1000
    );
    assert!(
        (before..=after).contains(&reported),
        "{reported} not within the kernel's {before}..={after}"
    );
    assert!(reported > stall0 + 1_000_000, "{stats}");
    let series = "rlagent_pressure_stall_seconds_total{target=\"group:soft\",resource=\"memory\",kind=\"some\"}";
    let scraped =
        rlagent_tests::sample(&body, series).unwrap_or_else(|| panic!("no {series} in\n{body}"));
    assert!(
        scraped * 1e6 >= before as f64 - 1.0 && scraped * 1e6 <= after as f64 + 1.0,
        "{series} = {scraped}, kernel {before}..={after} us"
    );
    assert!(
        rlagent_tests::sample(
            &body,
            "rlagent_pressure_stall_seconds_total{target=\"group:soft\",resource=\"memory\",kind=\"full\"}"
        )
        .is_some(),
        "{body}"
    );
    assert_eq!(stats["memory"]["high"], high, "{stats}");
    assert!(
        stats["memory"]["events_high"].as_u64().unwrap() > events1,
        "{stats}"
    );

    // What held it was memory.high: cleared, the mark goes back to max and the process
    // finishes its 64 MiB at once.
    rlctl(&scratch, &["clear-quota", "soft", "--memory-high"]);
    assert_eq!(read("rl-high/soft/memory.high"), "max");
    let released = Instant::now();
    assert!(wait_exit(&mut p, Duration::from_secs(10)).success());
    println!(
        "after clearing memory.high the process finished in {} ms",
        released.elapsed().as_millis()
    );
}

#[test]
fn a_quota_on_an_existing_cgroup_is_written_there_and_holds() {
    in_guest();
    // An existing cgroup the agent does not own, made as a container runtime or an
    // operator would: controllers enabled on the way down, a process inside.
    let ext = format!("{MOUNT}/rl-ext/svc");
    std::fs::create_dir_all(&ext).unwrap();
    for parent in [MOUNT.to_string(), format!("{MOUNT}/rl-ext")] {
        std::fs::write(format!("{parent}/cgroup.subtree_control"), "+cpu +pids").unwrap();
    }
    let mut spin = load(2040, "wait spin 3");
    std::fs::write(format!("{ext}/cgroup.procs"), spin.id().to_string()).unwrap();
    let scratch = Scratch::new();
    config_with_root(&scratch, "rl-extagent", "");
    let agent = Agent::start(&scratch);
    rlctl(
        &scratch,
        &[
            "set-quota",
            "cgroup:rl-ext/svc",
            "--cpu",
            "30%",
            "--pids",
            "4",
        ],
    );
    assert_eq!(read("rl-ext/svc/cpu.max"), "30000 100000");
    assert_eq!(read("rl-ext/svc/pids.max"), "4");
    assert_eq!(
        cgroup_of(spin.id()),
        "rl-ext/svc",
        "quotas in place, no placement"
    );
    let (u0, t0) = (usage_usec("rl-ext/svc"), Instant::now());
    go(&mut spin);
    assert!(spin.wait().unwrap().success());
    let ratio = (usage_usec("rl-ext/svc") - u0) as f64 / t0.elapsed().as_micros() as f64;
    println!("cgroup:rl-ext/svc at cpu = 30%: cpu usage / wall time {ratio:.3}");
    assert!((0.25..=0.35).contains(&ratio), "ratio {ratio:.3}");
    let stats = agent_stats(&scratch, "cgroup:rl-ext/svc");
    assert!(
        stats["cpu"]["nr_throttled"].as_u64().unwrap() > 10,
        "{stats}"
    );
    assert_eq!(stats["pids"]["max"], 4, "{stats}");

    // pids.max 4 with the fork bomb alone in the cgroup: 3 children, then EAGAIN.
    let mut bomb = load(2040, "wait forkbomb 50 1");
    std::fs::write(format!("{ext}/cgroup.procs"), bomb.id().to_string()).unwrap();
    go(&mut bomb);
    assert_eq!(
        read_line(&mut bomb),
        format!("forked 3 errno {}", libc::EAGAIN)
    );
    assert!(bomb.wait().unwrap().success());
    assert!(keyed("rl-ext/svc/pids.events", "max") >= 1);

    // The quota removed: the cgroup is given back unlimited, and stays.
    rlctl(&scratch, &["clear-quota", "cgroup:rl-ext/svc", "--all"]);
    assert_eq!(read("rl-ext/svc/cpu.max"), "max 100000");
    assert_eq!(read("rl-ext/svc/pids.max"), "max");
    drop(agent);
    std::fs::remove_dir(&ext).unwrap();
    std::fs::remove_dir(format!("{MOUNT}/rl-ext")).unwrap();
}

#[test]
fn user_star_gives_each_uid_its_own_cgroup_with_the_default() {
    in_guest();
    let scratch = Scratch::new();
    config_with_root(
        &scratch,
        "rl-star",
        "[[quota]]\ntarget = \"user:*\"\ncpu = \"20%\"\npids = 6\n",
    );
    let _agent = Agent::start(&scratch);
    let mut a = load(2050, "wait forkbomb 50 2");
    let mut b = load(2051, "wait forkbomb 50 2");
    wait_placed(a.id(), "rl-star/user-2050");
    wait_placed(b.id(), "rl-star/user-2051");
    for uid in [2050, 2051] {
        assert_eq!(read(&format!("rl-star/user-{uid}/cpu.max")), "20000 100000");
        assert_eq!(read(&format!("rl-star/user-{uid}/pids.max")), "6");
    }
    // Both fork at once and hold their children for 2 s: each UID gets the default's 6
    // tasks to itself (5 children), where one shared cgroup would give both 4 in all.
    go(&mut a);
    go(&mut b);
    let eagain = format!("forked 5 errno {}", libc::EAGAIN);
    assert_eq!(read_line(&mut a), eagain, "uid 2050");
    assert_eq!(read_line(&mut b), eagain, "uid 2051");
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    for uid in [2050, 2051] {
        let stats = agent_stats(&scratch, &format!("user:{uid}"));
        assert_eq!(stats["pids"]["max"], 6, "{stats}");
        assert!(
            stats["pids"]["events_max"].as_u64().unwrap() >= 1,
            "{stats}"
        );
    }
}

#[test]
fn running_processes_are_placed_by_the_scan_at_start_and_at_reload() {
    in_guest();
    // Started before the agent: no exec or setuid event will ever name them.
    let mut user = load(2060, "sleep 30");
    let mut grouped = load(2061, "sleep 30");
    let mut later = load(2062, "sleep 30");
    let mut runtime = load(2063, "sleep 30");
    let scratch = Scratch::new();
    let config =
        "[[group]]\nname = \"batch\"\nuids = [2061]\n[[quota]]\ntarget = \"batch\"\npids = 20\n\
                  [[quota]]\ntarget = \"user:2060\"\npids = 30\n";
    config_with_root(&scratch, "rl-scan", config);
    let mut agent = Agent::start(&scratch);
    // The scan runs before READY=1: no waiting.
    assert_eq!(cgroup_of(user.id()), "rl-scan/user-2060");
    assert_eq!(cgroup_of(grouped.id()), "rl-scan/batch");
    assert_eq!(read("rl-scan/user-2060/pids.max"), "30");
    assert_eq!(cgroup_of(later.id()), "", "a UID without a quota stays");
    // SIGHUP with a quota for 2062: the reload's scan moves its running process before
    // the READY=1 that ends the reload.
    config_with_root(
        &scratch,
        "rl-scan",
        &format!("{config}[[quota]]\ntarget = \"user:2062\"\npids = 40\n"),
    );
    agent.reload();
    assert_eq!(cgroup_of(later.id()), "rl-scan/user-2062");
    assert_eq!(read("rl-scan/user-2062/pids.max"), "40");
    assert_eq!(cgroup_of(runtime.id()), "", "2063 has no quota yet");
    // rlctl set-quota: moved by the time rlctl returns.
    rlctl(&scratch, &["set-quota", "user:2063", "--pids", "50"]);
    assert_eq!(cgroup_of(runtime.id()), "rl-scan/user-2063");
    assert_eq!(read("rl-scan/user-2063/pids.max"), "50");
    for p in [&mut user, &mut grouped, &mut later, &mut runtime] {
        p.kill().unwrap();
        p.wait().unwrap();
    }
}

#[test]
fn every_cgroup_series_the_dashboard_and_rules_read_is_exported() {
    in_guest();
    // The host's Prometheus test runs every shipped query and requires data from all but
    // those on cgroup controller series, which a hybrid host cannot have. Here, on a real
    // cgroup v2 kernel, a group with every cgroup field set must export each of those
    // series, with the `target` label the dashboard filters on.
    let scratch = Scratch::new();
    config_with_root(
        &scratch,
        "rl-series",
        "[[group]]\nname = \"all\"\nuids = [2070]\n[[quota]]\ntarget = \"all\"\ncpu = \"50%\"\nmemory = \"256M\"\nmemory_high = \"200M\"\npids = 50\n",
    );
    let _agent = Agent::start(&scratch);
    let mut p = load(2070, "sleep 30");
    wait_placed(p.id(), "rl-series/all");
    let (_, body) = rlagent_tests::http_get(scratch.metrics_port(), "/metrics");
    let mut checked = std::collections::BTreeSet::new();
    for query in queries::all_queries() {
        for name in queries::metric_names(&query) {
            if !queries::is_cgroup_controller_metric(&name) {
                continue;
            }
            let series = format!("{name}{{target=\"group:all\"}}");
            assert!(
                rlagent_tests::sample(&body, &series).is_some(),
                "{query} reads {name}, which the agent does not export as {series}:\n{body}"
            );
            checked.insert(name);
        }
    }
    println!(
        "{} cgroup series the shipped queries read, each exported: {checked:?}",
        checked.len()
    );
    assert!(checked.len() >= 10, "{checked:?}");
    p.kill().unwrap();
    p.wait().unwrap();
}
