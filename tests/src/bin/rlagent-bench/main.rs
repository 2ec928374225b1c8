// Why this file is long: six benchmarks, each one function with its setup and report, in one
// binary so `cargo xtask bench` builds one target.
//! `rlagent-bench connect [--blocks N] [--iters M]`, `rlagent-bench control [--requests N]
//! [--targets N]`, `rlagent-bench metrics [--uids N]`, `rlagent-bench integrity
//! [--cycles N]`, `rlagent-bench events [--seconds N]` and `rlagent-bench churn
//! [--millions N]`, `rlagent-bench compare [--blocks N] [--iters M] [--live N]` and
//! `rlagent-bench idle [--seconds N]` (run through `cargo xtask bench <name>`; `compare`
//! and `idle` are in files of their own).
//!
//! Paired measurement of connect()+close() on loopback: helper processes with the same
//! work, one in a sibling cgroup without rlagent's programs, one under the programs with a
//! cap only (the path before rates and groups existed), one with a cap, a rate and a group
//! cap and rate (every check runs). Blocks rotate the order so drift on a noisy machine
//! hits all; the report gives medians per side and the median of the per-block
//! differences, which are the figures quoted in docs/benchmarks.md.
mod compare;
mod idle;

use std::{path::PathBuf, time::Instant};

use rlagent_tests::{privileged, Agent, Helper, Listener, Scratch, TestCgroup};

const BENCH_UID: u32 = 61900;
/// The UID of the connect benchmarks' side with every limit (see [`policy_sides`]).
const POLICY_UID: u32 = BENCH_UID + 1;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first().cloned() else {
        eprintln!("usage: rlagent-bench connect [--blocks N] [--iters M] | control [--requests N] [--targets N] | metrics [--uids N] | integrity [--cycles N] | events [--seconds N] | churn [--millions N] | compare [--blocks N] [--iters M] [--live N] | idle [--seconds N]");
        std::process::exit(2);
    };
    if ![
        "connect",
        "control",
        "metrics",
        "integrity",
        "events",
        "churn",
        "compare",
        "idle",
    ]
    .contains(&name.as_str())
    {
        eprintln!(
            "rlagent-bench: unknown benchmark {name:?} (known: connect, control, metrics, integrity, events, churn, compare, idle)"
        );
        std::process::exit(2);
    }
    let flag = |flag: &str, default: u32| -> u32 {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{flag} takes a whole number"))
            })
            .unwrap_or(default)
    };
    let blocks = flag("--blocks", 30);
    let iters = flag("--iters", 2000);
    if !privileged("bench") {
        std::process::exit(1);
    }
    if name == "idle" {
        idle::idle(flag("--seconds", 60));
    } else if name == "compare" {
        compare::compare(blocks, iters, flag("--live", 10_000));
    } else if name == "events" {
        events(flag("--seconds", 5));
    } else if name == "churn" {
        churn(flag("--millions", 36));
    } else if name == "integrity" {
        integrity(flag("--cycles", 1_000_000));
    } else if name == "metrics" {
        metrics(flag("--uids", 10_000));
    } else if name == "control" {
        control(flag("--requests", 500), flag("--targets", 1000));
    } else {
        connect(blocks, iters);
    }
}

/// /metrics scrape time and size with `uids` UIDs each holding a live connection (one
/// connected UDP socket per UID, counted with count_udp).
fn metrics(uids: u32) {
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    let text = format!(
        "{}[bpf]\nattach_cgroup = \"{}\"\npin_path = \"{}\"\ncount_udp = true\nmax_tracked_sockets = {}\n[[quota]]\ntarget = \"user:*\"\nconns = 100\n",
        scratch.private_paths(),
        cgroup.relative,
        scratch.pin_path().display(),
        // Room for a socket per UID with the map no more than half full.
        (2 * uids)
            .next_power_of_two()
            .max(rlagent_common::DEFAULT_MAX_TRACKED_SOCKETS)
    );
    std::fs::write(scratch.config_path(), text).unwrap();
    let agent = Agent::start(&scratch);
    // One helper per PER_HELPER UIDs: each holds a socket per UID, and a process may hold
    // at most RLIMIT_NOFILE's hard limit of descriptors (20,000 on some hosts).
    const PER_HELPER: u32 = 15_000;
    let t = Instant::now();
    let mut holders = Vec::new();
    for first in (0..uids).step_by(PER_HELPER as usize) {
        let count = PER_HELPER.min(uids - first);
        let mut holder = Helper::spawn(&cgroup.path, 0);
        let reply = holder.cmd(&format!("multi-uid {} {count} 9", 100_000 + first));
        assert_eq!(reply, format!("ok {count}"), "every UID holds a connection");
        holders.push(holder);
    }
    println!(
        "{uids} UIDs each holding a connection, set up in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut times = Vec::new();
    let mut size = 0;
    let mut series = 0;
    let (rss_before, _) = idle::memory_mib(agent.pid());
    for _ in 0..20 {
        let t = Instant::now();
        let (head, body) = rlagent_tests::http_get(scratch.metrics_port(), "/metrics");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        size = body.len();
        series = body
            .lines()
            .filter(|l| l.starts_with("rlagent_connections_live{"))
            .count();
    }
    assert_eq!(series, uids as usize, "one live series per UID");
    let (rss_after, peak) = idle::settled_memory_mib(agent.pid());
    let (_, body) = rlagent_tests::http_get(scratch.metrics_port(), "/metrics");
    assert_eq!(
        rlagent_tests::sample(&body, "rlagent_host_connections_live"),
        Some(f64::from(uids)),
        "every UID's socket is charged"
    );
    times.sort_by(f64::total_cmp);
    println!(
        "/metrics with {uids} UIDs: p50 {:.0} ms, p99 {:.0} ms, {:.1} MiB, {series} rlagent_connections_live series; agent RSS {rss_before:.1} MiB before the 20 scrapes, {rss_after:.1} MiB after (peak {peak:.1})",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        size as f64 / (1 << 20) as f64
    );
    // Eight scrapes at once (Prometheus pairs, a dashboard, a user's loop), ten rounds: the
    // time until the last answer, and the agent's CPU per round.
    const AT_ONCE: usize = 8;
    let port = scratch.metrics_port();
    let mut rounds = Vec::new();
    let cpu_before = cpu_seconds(agent.pid());
    for _ in 0..10 {
        let t = Instant::now();
        let scrapes: Vec<_> = (0..AT_ONCE)
            .map(|_| std::thread::spawn(move || rlagent_tests::http_get(port, "/metrics")))
            .collect();
        for s in scrapes {
            let (head, body) = s.join().expect("a scrape");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(
                rlagent_tests::sample(&body, "rlagent_host_connections_live"),
                Some(f64::from(uids)),
                "every scrape gets the whole text"
            );
        }
        rounds.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_ms = (cpu_seconds(agent.pid()) - cpu_before) * 1e3 / rounds.len() as f64;
    rounds.sort_by(f64::total_cmp);
    println!(
        "{AT_ONCE} scrapes at once, 10 rounds: p50 {:.0} ms until the last answer, the agent's CPU {cpu_ms:.0} ms per round",
        percentile(&rounds, 0.5)
    );
    drop(holders);
    assert_all_released(&scratch, "metrics");
}

/// `cycles` mixed connect() cycles by four capped UIDs: TCP and MPTCP connect+close,
/// connects refused by the peer, connected UDP, and processes that exit or are SIGKILLed
/// while holding sockets (some over their cap). Prints the rate and the final counts,
/// which must be exactly zero once nothing is open.
fn integrity(cycles: u32) {
    // The last two are subordinate UIDs of the first (a range in the agent's subuid file):
    // they are charged to it, so it holds the cap of 4 together with them.
    const UIDS: [u32; 6] = [61910, 61911, 61912, 61913, 461_910, 461_911];
    const SUBORDINATE_FIRST: u32 = 461_900;
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    let subuid = scratch.dir.path().join("subuid");
    std::fs::write(&subuid, format!("{}:{SUBORDINATE_FIRST}:100\n", UIDS[0]))
        .expect("writing the subuid file");
    scratch.write_config(
        &cgroup,
        &format!("count_udp = true\nsubuid_file = \"{}\"\n", subuid.display()),
        "[[quota]]\ntarget = \"user:*\"\nconns = 4\n",
    );
    let _agent = Agent::start(&scratch);
    let tcp = Listener::dropping();
    let mptcp = Listener::mptcp();
    let closed = rlagent_tests::free_port();
    let mut workers: Vec<Helper> = UIDS
        .iter()
        .map(|u| Helper::spawn(&cgroup.path, *u))
        .collect();
    let kinds = [
        ("tcp4", tcp.port4),
        ("tcp6", tcp.port6),
        ("mptcp4", mptcp.port4),
        ("mptcp6", tcp.port6), // MPTCP falling back to TCP
        ("tcp4", closed),
        ("udp4", tcp.port4),
    ];
    const BATCH: u32 = 500;
    let (mut done, mut admitted, mut exits, mut kills) = (0u64, 0u64, 0u32, 0u32);
    let start = Instant::now();
    let mut round = 0usize;
    while done < u64::from(cycles) {
        for (i, worker) in workers.iter_mut().enumerate() {
            // One round in seven: one socket connected, disconnected with AF_UNSPEC and
            // connected again for 20 ms (each time a new TCP handshake, never a second
            // charge).
            if (round + i) % 7 == 6 {
                let reply = worker.cmd(&format!("unspec-for tcp4 {} 20", tcp.port4));
                let words: Vec<u64> = reply
                    .split_whitespace()
                    .skip(1)
                    .map(|w| w.parse().unwrap())
                    .collect();
                admitted += words[0];
                done += words[1];
                continue;
            }
            let (kind, port) = kinds[(round + i) % kinds.len()];
            let reply = worker.cmd(&format!("cycles {kind} {port} {BATCH}"));
            let n: u64 = reply.split_whitespace().nth(1).unwrap().parse().unwrap();
            admitted += n;
            done += u64::from(BATCH);
        }
        // Every 20 rounds, each UID's process ends holding sockets (6 tries against a
        // cap of 4): half exit, half are SIGKILLed; a fresh one takes its place.
        if round % 20 == 19 {
            for (i, uid) in UIDS.iter().enumerate() {
                let mut holder = Helper::spawn(&cgroup.path, *uid);
                holder.cmd(&format!("hold tcp4 {} 6", tcp.port4));
                done += 6;
                if i % 2 == 0 {
                    holder.exit();
                    exits += 1;
                } else {
                    holder.kill9();
                    kills += 1;
                }
            }
        }
        round += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    for w in workers.drain(..) {
        w.exit();
    }
    // Releases run as the sockets are freed: give them a moment, then read.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let stats = loop {
        let stats = scratch.stats();
        let live: u64 = stats.per_uid.values().map(|c| c.live).sum();
        if (live == 0 && stats.host.live == 0) || Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    println!(
        "{done} cycles in {elapsed:.1} s ({:.0} per second): {admitted} admitted, {exits} exits and {kills} SIGKILLs holding sockets",
        done as f64 / elapsed
    );
    for uid in UIDS {
        let c = stats.per_uid.get(&uid).copied().unwrap_or_default();
        println!(
            "uid {uid}: live {} admitted {} denied_cap {}",
            c.live,
            c.admitted,
            c.denied[rlagent_common::reason::CAP]
        );
    }
    println!(
        "host: live {}, untracked {}, denied_full {}, uncapped_sockets {}",
        stats.host.live, stats.host.untracked, stats.host.denied_full, stats.host.uncapped_sockets
    );
    let leaked: u64 = stats.per_uid.values().map(|c| c.live).sum::<u64>() + stats.host.live;
    if leaked != 0 {
        eprintln!("FAILED: {leaked} charges left with nothing open");
        std::process::exit(1);
    }
    if let Some(uid) = UIDS[4..].iter().find(|u| stats.per_uid.contains_key(u)) {
        eprintln!("FAILED: subordinate uid {uid} was charged as itself");
        std::process::exit(1);
    }
    println!("all counts are back to 0");
}

/// The connect benchmark's cap-only arm, again and again, looking for a charge that is
/// never released: 2,000-connect blocks (socket, connect to 127.0.0.1, SO_LINGER {1, 0},
/// close) as one UID, from one process at a time as the connect benchmark runs them (two
/// at once overflow the loopback listener's accept queue on 2 cores, and their SYNs then
/// wait out retransmission back-off), each agent started afresh (new maps, so it seeds
/// the connections in flight) while the first one churns. With every client gone, each
/// agent's counts must be 0. Runs `millions` million connects (the run that saw one
/// charge left made 3.56 million), or stops at the first charge left.
fn churn(millions: u32) {
    const UID: u32 = 61950;
    const BLOCK: u64 = 2000;
    const BLOCKS_PER_AGENT: u64 = 200;
    let listener = Listener::dropping();
    let target = u64::from(millions) * 1_000_000;
    let (mut done, mut agents) = (0u64, 0u32);
    let start = Instant::now();
    while done < target {
        let cgroup = TestCgroup::new();
        let scratch = Scratch::new();
        scratch.write_config(
            &cgroup,
            "",
            &format!("[[quota]]\ntarget = \"user:{UID}\"\nconns = 1000\n"),
        );
        let mut clients: Vec<Helper> = (0..2).map(|_| Helper::spawn(&cgroup.path, UID)).collect();
        let work = format!("bench tcp4 {} {BLOCK}", listener.port4);
        // Started while the first client connects and closes.
        clients[0].send(&work);
        let agent = Agent::start(&scratch);
        assert!(clients[0].reply().starts_with("ok"));
        done += BLOCK;
        for block in 0..BLOCKS_PER_AGENT {
            for c in &mut clients {
                assert!(c.cmd(&work).starts_with("ok"), "block {block}");
                done += BLOCK;
            }
        }
        for c in clients {
            c.exit();
        }
        agents += 1;
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let stats = loop {
            let stats = scratch.stats();
            let live = stats.per_uid.get(&UID).map_or(0, |c| c.live);
            if (live == 0 && stats.host.live == 0) || Instant::now() > deadline {
                break stats;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let live = stats.per_uid.get(&UID).map_or(0, |c| c.live);
        if live != 0 || stats.host.live != 0 {
            eprintln!(
                "FAILED: agent {agents}, after {done} connects: uid {UID} live {live}, host {:?}, settings {:?}",
                stats.host,
                scratch.maps().settings()
            );
            std::process::exit(1);
        }
        drop(agent);
        scratch.uninstall();
        println!(
            "{done} connects, {agents} agents started during the churn, {:.0} s: every charge released",
            start.elapsed().as_secs_f64()
        );
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One request over the control socket; returns the response line.
fn request(socket: &std::path::Path, request: &rlagent::control::protocol::Request) -> String {
    use std::io::{BufRead, Write};
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).expect("connecting to the agent");
    stream
        .write_all(rlagent::control::protocol::request_line(request).as_bytes())
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut line)
        .unwrap();
    line
}

/// set-quota round trip (the response comes after the state file is durable and the
/// quota is in the kernel map), then stats with `targets` group cgroups.
fn control(requests: u32, targets: u32) {
    use rlagent::{control::protocol::Request, model::quota::Field};
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    let groups: String = (0..targets)
        .map(|i| format!("[[group]]\nname = \"g{i:05}\"\n"))
        .collect();
    scratch.write_config_with_groups(&cgroup, "", &groups);
    let _agent = Agent::start(&scratch);
    let socket = scratch.socket_path();
    let maps = scratch.maps();

    let mut round_trips = Vec::new();
    for i in 0..requests {
        let cap = u64::from(i % 50 + 1);
        let set = Request::SetQuota {
            target: format!("user:{BENCH_UID}"),
            quota: std::collections::BTreeMap::from([(Field::Conns, cap.to_string())]),
        };
        let t = Instant::now();
        let reply = request(&socket, &set);
        round_trips.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(reply.contains("\"ok\":true"), "{reply}");
        assert_eq!(
            maps.policy_for(BENCH_UID).unwrap().cap,
            cap,
            "in the kernel map when the reply arrives"
        );
    }
    round_trips.sort_by(f64::total_cmp);
    println!(
        "set-quota round trip (request -> state file fsynced -> BPF map written -> reply), {requests} requests: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&round_trips, 0.5),
        percentile(&round_trips, 0.99),
        round_trips.last().unwrap()
    );

    // A cgroup field changes the cgroup plan: after a complete write, only the changed
    // group's cgroup is written, and /proc is not rescanned (nobody moves).
    let mut plan_changes = Vec::new();
    for i in 0..50u32 {
        let set = Request::SetQuota {
            target: "g00000".to_string(),
            quota: std::collections::BTreeMap::from([(Field::Pids, (100 + i).to_string())]),
        };
        let t = Instant::now();
        let reply = request(&socket, &set);
        plan_changes.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(reply.contains("\"ok\":true"), "{reply}");
    }
    plan_changes.sort_by(f64::total_cmp);
    println!(
        "set-quota of a cgroup field with {targets} managed cgroups (the changed one written), 50 requests: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&plan_changes, 0.5),
        percentile(&plan_changes, 0.99)
    );

    let mut stats_ms = Vec::new();
    let mut size = 0;
    for _ in 0..20 {
        let t = Instant::now();
        let reply = request(&socket, &Request::Stats { target: None });
        stats_ms.push(t.elapsed().as_secs_f64() * 1e3);
        size = reply.len();
        assert!(reply.contains("\"ok\":true"));
    }
    stats_ms.sort_by(f64::total_cmp);
    println!(
        "stats of all {targets} group targets: p50 {:.1} ms, p99 {:.1} ms, {size} bytes of JSON",
        percentile(&stats_ms, 0.5),
        percentile(&stats_ms, 0.99)
    );
    assert_all_released(&scratch, "control");
}

/// Run count and total run time of this agent's programs, by name.
fn program_stats() -> std::collections::BTreeMap<String, (u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            let name = p.name_as_str()?.to_string();
            name.starts_with("rl_")
                .then(|| (name, (p.run_count(), p.run_time().as_nanos() as u64)))
        })
        .fold(Default::default(), |mut m, (name, (c, t))| {
            let e: &mut (u64, u64) = m.entry(name).or_default();
            e.0 += c;
            e.1 += t;
            m
        })
}

/// Every benchmark ends with this once its clients are gone: the agent must count 0 live
/// connections for every UID and for the host (a charge left behind is a bug the
/// benchmark found, and it fails).
fn assert_all_released(scratch: &Scratch, what: &str) {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let stats = scratch.stats();
        let left: Vec<(u32, u64)> = stats
            .per_uid
            .iter()
            .filter(|(_, c)| c.live != 0)
            .map(|(uid, c)| (*uid, c.live))
            .collect();
        if left.is_empty() && stats.host.live == 0 {
            println!("{what}: 0 live for every UID and the host once the clients were gone");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: charges left 30 s after every client closed: host live {}, by UID {left:?}",
            stats.host.live
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The cgroups of the connect benchmarks' sides, and their config in `scratch`: the
/// programs on `<cgroup>/enforced`, where `BENCH_UID` has a cap; `POLICY_UID` with a cap
/// and a rate in group `bench` (`<cgroup>/enforced/slice/bench`), which has a cap and a
/// rate too; `<cgroup>/plain` outside the programs. Caps are `cap` and rates `rate`/s with
/// a burst of `rate`, far above what a benchmark reaches, so every connect() runs every
/// check and is admitted. Returns (enforced, plain, group).
fn policy_sides(
    cgroup: &TestCgroup,
    scratch: &Scratch,
    extra_bpf: &str,
    cap: u32,
    rate: u32,
) -> (PathBuf, PathBuf, PathBuf) {
    let enforced = cgroup.child("enforced");
    let plain = cgroup.child("plain");
    let text = format!(
        "cgroup_root = \"{rel}/enforced/slice\"\n{}[bpf]\nattach_cgroup = \"{rel}/enforced\"\npin_path = \"{}\"\n{extra_bpf}[[quota]]\ntarget = \"user:{BENCH_UID}\"\nconns = {cap}\n[[quota]]\ntarget = \"user:{POLICY_UID}\"\nconns = {cap}\nconn_rate = \"{rate}/s\"\nconn_burst = {rate}\n[[quota]]\ntarget = \"bench\"\nconns = {cap}\nconn_rate = \"{rate}/s\"\nconn_burst = {rate}\n",
        scratch.private_paths(),
        scratch.pin_path().display(),
        rel = cgroup.relative,
    );
    std::fs::write(scratch.config_path(), text).unwrap();
    let group = enforced.join("slice/bench");
    (enforced, plain, group)
}

fn connect(blocks: u32, iters: u32) {
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    let (enforced, plain, group) =
        policy_sides(&cgroup, &scratch, "count_udp = true\n", 100_000, 1_000_000);
    let _agent = Agent::start(&scratch);
    let listener = Listener::dropping();
    let mut sides = [
        ("no programs", Helper::spawn(&plain, BENCH_UID)),
        ("cap only", Helper::spawn(&enforced, BENCH_UID)),
        ("cap+rate+group", Helper::spawn(&group, POLICY_UID)),
    ];

    println!("connect()+close() on loopback, {blocks} blocks x {iters} per side, order rotating");
    println!(
        "{:<5} {:>12} {:>12} {:>16} {:>14} {:>14} {:>14}",
        "proto",
        "none ns/op",
        "cap only",
        "cap+rate+group",
        "cap added",
        "policy added",
        "policy vs cap"
    );
    let started = Instant::now();
    let protocols = [("tcp4", listener.port4), ("udp4", 9)];
    for (proto, port) in protocols {
        let run = |h: &mut Helper| -> f64 {
            let reply = h.cmd(&format!("bench {proto} {port} {iters}"));
            let ns: f64 = reply
                .strip_prefix("ok ")
                .expect("bench reply")
                .parse()
                .unwrap();
            ns / f64::from(iters)
        };
        // Warm-up, discarded.
        for (_, h) in &mut sides {
            run(h);
        }
        let mut per_side: [Vec<f64>; 3] = Default::default();
        let (mut cap_added, mut policy_added, mut policy_vs_cap) =
            (Vec::new(), Vec::new(), Vec::new());
        for block in 0..blocks as usize {
            let mut t = [0.0; 3];
            for k in 0..3 {
                let i = (block + k) % 3;
                t[i] = run(&mut sides[i].1);
            }
            for i in 0..3 {
                per_side[i].push(t[i]);
            }
            cap_added.push(t[1] - t[0]);
            policy_added.push(t[2] - t[0]);
            policy_vs_cap.push(t[2] - t[1]);
        }
        let m: Vec<f64> = per_side.iter_mut().map(|v| median(v)).collect();
        println!(
            "{proto:<5} {:>12.0} {:>12.0} {:>16.0} {:>14.0} {:>14.0} {:>14.0}",
            m[0],
            m[1],
            m[2],
            median(&mut cap_added),
            median(&mut policy_added),
            median(&mut policy_vs_cap)
        );
    }

    // A separate pass with the kernel's per-program run time switched on (it adds its own
    // overhead, so the figures above are taken without it), one side at a time. On only
    // while this fd is open.
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let mut in_kernel = Vec::new();
    for (proto, port) in protocols {
        for (side, h) in sides.iter_mut().skip(1) {
            let before = program_stats();
            for _ in 0..(blocks / 2).max(1) {
                h.cmd(&format!("bench {proto} {port} {iters}"));
            }
            for (name, (count, ns)) in program_stats() {
                let (c0, n0) = before.get(&name).copied().unwrap_or_default();
                if count > c0 {
                    in_kernel.push(format!(
                        "{proto} {side} {name} {:.0}",
                        (ns - n0) as f64 / (count - c0) as f64
                    ));
                }
            }
        }
    }
    drop(stats_fd);
    println!(
        "ns per program run (kernel BPF stats, includes their own overhead): {}",
        in_kernel.join(", ")
    );
    let stats = scratch.stats();
    for uid in [BENCH_UID, POLICY_UID] {
        let c = stats.per_uid.get(&uid).copied().unwrap_or_default();
        println!(
            "uid {uid}: charged {} connections, {} denied, {} live at the end",
            c.admitted,
            c.denied.iter().sum::<u64>(),
            c.live
        );
        assert_eq!(c.denied.iter().sum::<u64>(), 0, "nothing was denied");
    }
    assert_all_released(&scratch, "connect");
    println!("{:.1} s", started.elapsed().as_secs_f64());
}

/// User and system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command (which may hold spaces) : state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .expect("sysconf(_SC_CLK_TCK)");
    ticks / hz as f64
}

/// Denial events per second the agent takes in (logs, counts, keeps) before the kernel's
/// ring buffer overflows, and the agent's CPU at that rate: processes whose every
/// connect() is denied (cap 0, no per-UID event limit) for `seconds`, at 1, 2 and 4
/// processes.
fn events(seconds: u32) {
    const UID: u32 = 61920;
    println!("denial events: processes connect()ing in a loop against a cap of 0, every denial an event (event_rate unlimited), {seconds} s per step");
    println!(
        "{:>6} {:>12} {:>14} {:>12} {:>12} {:>10}",
        "procs", "denials/s", "events in/s", "lost", "lost share", "agent CPU"
    );
    for procs in [1usize, 2, 4] {
        let cgroup = TestCgroup::new();
        let scratch = Scratch::new();
        scratch.write_config(
            &cgroup,
            "event_rate = \"1000000/s\"\nevent_burst = 1000000\n",
            &format!("[[quota]]\ntarget = \"user:{UID}\"\nconns = 0\n"),
        );
        let agent = Agent::start(&scratch);
        let listener = Listener::dropping();
        let mut helpers: Vec<Helper> = (0..procs)
            .map(|_| Helper::spawn(&cgroup.path, UID))
            .collect();
        let cpu0 = cpu_seconds(agent.pid());
        let t = Instant::now();
        for h in &mut helpers {
            h.send(&format!("for tcp4 {} {}", listener.port4, seconds * 1000));
        }
        for h in &mut helpers {
            h.reply();
        }
        // Let the agent drain what is in the ring.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let elapsed = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds(agent.pid()) - cpu0;
        let stats = scratch.stats();
        let c = stats.per_uid.get(&UID).copied().unwrap_or_default();
        let denials = c.denied[rlagent_common::reason::CAP];
        let lost = stats.host.events_lost;
        // What the agent took in: its own count of the events it logged.
        let (_, body) = rlagent_tests::http_get(scratch.metrics_port(), "/metrics");
        let received = rlagent_tests::sample(
            &body,
            &format!(
                "rlagent_connection_events_total{{uid=\"{UID}\",reason=\"cap\",mode=\"enforce\"}}"
            ),
        )
        .unwrap_or(0.0) as u64;
        assert_eq!(
            received + c.events_dropped,
            denials,
            "every denial an event or counted as dropped"
        );
        println!(
            "{procs:>6} {:>12.0} {:>14.0} {:>12} {:>11.1}% {:>9.0}%",
            denials as f64 / (elapsed - 0.5),
            received as f64 / (elapsed - 0.5),
            lost,
            100.0 * lost as f64 / denials.max(1) as f64,
            100.0 * cpu / elapsed
        );
        drop(helpers);
        assert_all_released(&scratch, &format!("events, {procs} processes"));
        drop(agent);
    }
}
