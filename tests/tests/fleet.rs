//! Fleet-wide penalties end to end: two agents (two hosts), a real Prometheus scraping
//! both with a rule over every instance, and a real Alertmanager delivering the decision
//! to both agents' `[penalty_webhook]`. A user refused on one host is put in the tier on
//! both, the kernel enforcing it on the host where the user did nothing; the resolution
//! lifts it on both. Requests without the token or naming nothing here are refused and
//! counted. Needs root and the tools `cargo xtask test` installs.

use std::{
    io::{Read, Write},
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use rlagent_tests::{
    free_port, http_get, privileged, sample, Agent, Connect, Helper, Listener, Scratch,
    ServerProcess, TestCgroup,
};

const UID: u32 = 63301;
const TOKEN: &str = "fleet-test-token-7f3a";

fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
    start.elapsed()
}

/// POSTs `body` to the webhook at `port` with `token`; the status line.
fn post(port: u16, token: Option<&str>, body: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response.lines().next().unwrap_or_default().to_string()
}

/// `rlctl --json penalties` of one host.
fn penalties(s: &Scratch) -> Vec<serde_json::Value> {
    let out = s.rlctl_ok(&["--json", "penalties"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("penalties JSON");
    v["penalties"].as_array().cloned().unwrap_or_default()
}

/// The user's cap as the host's agent reads it from the kernel map.
fn kernel_cap(s: &Scratch) -> Option<u64> {
    let out = s.rlctl_ok(&["--json", "stats", &format!("user:{UID}")]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
    v["conns"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["uid"] == UID).cloned())
        .and_then(|c| c["cap"].as_u64())
}

fn spawn(bin: &std::ffi::OsStr, args: &[String]) -> std::process::Child {
    Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {bin:?}: {e}"))
}

#[test]
fn alertmanager_delivers_a_fleet_decision_to_every_agent_and_its_resolution_lifts_it() {
    if !privileged("fleet_penalties") {
        return;
    }
    let Some(prom_bin) = rlagent_tests::external_tool("RLAGENT_PROMETHEUS", "fleet_penalties")
    else {
        return;
    };
    let Some(am_bin) = rlagent_tests::external_tool("RLAGENT_ALERTMANAGER", "fleet_penalties")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Two hosts: the user has a cap of 3 on each; the rule's only tier caps them at 1.
    let listener = Listener::new();
    let mut hosts = Vec::new();
    for _ in 0..2 {
        let cgroup = TestCgroup::new();
        let scratch = Scratch::new();
        let webhook = free_port();
        scratch.write_config(
            &cgroup,
            "",
            &format!(
                "[[quota]]\ntarget = \"user:{UID}\"\nconns = 3\n\
                 [[penalty]]\nname = \"fleet-conns\"\nwhen = \"denials_per_min > 1000000\"\nwindow = \"1m\"\n\
                 [[penalty.tier]]\nconns = 1\nduration = \"10m\"\n\
                 [penalty_webhook]\nlisten = \"127.0.0.1:{webhook}\"\ntoken_file = {:?}\nmax_duration = \"10m\"\n",
                token_file.display().to_string()
            ),
        );
        let agent = Agent::start(&scratch);
        hosts.push((agent, scratch, cgroup, webhook));
    }

    // Refusals, before any decision: no token, a wrong one, a rule no host has.
    let (_, a, _, port_a) = &hosts[0];
    let alert = |rule: &str| {
        format!(
            r#"{{"version":"4","status":"firing","alerts":[{{"status":"firing","labels":{{"alertname":"X","target":"user:{UID}","rule":"{rule}","tier":"1"}}}}]}}"#
        )
    };
    assert!(post(*port_a, None, &alert("fleet-conns")).contains(" 401 "));
    assert!(post(*port_a, Some("wrong"), &alert("fleet-conns")).contains(" 401 "));
    assert!(post(*port_a, Some(TOKEN), &alert("nope")).contains(" 400 "));
    assert!(post(*port_a, Some(TOKEN), &"x".repeat(70_000)).contains(" 413 "));
    // Root is below uid_min: skipped (the fleet cannot penalise whom the node never would).
    let root = alert("fleet-conns").replace(&format!("user:{UID}"), "user:root");
    assert!(post(*port_a, Some(TOKEN), &root).contains(" 200 "));
    assert!(
        penalties(a).is_empty(),
        "nothing applied from a refused request"
    );
    let (_, body) = http_get(a.metrics_port(), "/metrics");
    for (reason, n) in [
        ("token", 2.0),
        ("unknown_rule", 1.0),
        ("size", 1.0),
        ("exempt", 1.0),
    ] {
        assert_eq!(
            sample(
                &body,
                &format!("rlagent_penalty_webhook_refused_total{{reason=\"{reason}\"}}")
            ),
            Some(n),
            "{reason}: {body}"
        );
    }

    // Alertmanager, sending to both agents with the token.
    let am_port = free_port();
    let urls: String = hosts
        .iter()
        .map(|(.., port)| {
            format!(
                "      - url: http://127.0.0.1:{port}/\n        send_resolved: true\n        http_config:\n          authorization:\n            credentials_file: {}\n",
                token_file.display()
            )
        })
        .collect();
    std::fs::write(
        dir.path().join("am.yml"),
        format!(
            "route:\n  receiver: rlagents\n  group_by: [alertname, target]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1m\n\
             receivers:\n  - name: rlagents\n    webhook_configs:\n{urls}"
        ),
    )
    .unwrap();
    let _am = ServerProcess {
        child: spawn(
            &am_bin,
            &[
                format!("--config.file={}", dir.path().join("am.yml").display()),
                format!("--storage.path={}", dir.path().join("am").display()),
                format!("--web.listen-address=127.0.0.1:{am_port}"),
                "--cluster.listen-address=".to_string(),
            ],
        ),
        port: am_port,
        dir: tempfile::tempdir().unwrap(),
    };
    // Prometheus: both agents, and a rule over every instance in the shipped shape
    // (labels target, rule, tier), firing at the first refusal anywhere.
    let targets: Vec<String> = hosts
        .iter()
        .map(|(_, s, ..)| format!("\"127.0.0.1:{}\"", s.metrics_port()))
        .collect();
    std::fs::write(
        dir.path().join("fleet.rules.yml"),
        "groups:\n  - name: fleet\n    rules:\n      - alert: FleetConnectionFlood\n        expr: >\n          label_replace(sum by (uid) (increase(rlagent_connections_denied_total[10s])), \"target\", \"user:$1\", \"uid\", \"(.*)\") > 0\n        labels:\n          rule: fleet-conns\n          tier: \"1\"\n",
    )
    .unwrap();
    let prom_port = free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\n\
             scrape_configs:\n  - job_name: rlagent\n    static_configs:\n      - targets: [{}]\n",
            dir.path().join("fleet.rules.yml").display(),
            targets.join(", ")
        ),
    )
    .unwrap();
    let _prometheus = ServerProcess {
        child: spawn(
            &prom_bin,
            &[
                format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ),
                format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                format!("--web.listen-address=127.0.0.1:{prom_port}"),
            ],
        ),
        port: prom_port,
        dir: tempfile::tempdir().unwrap(),
    };
    wait_for(
        "Prometheus to scrape both agents",
        Duration::from_secs(30),
        || {
            std::net::TcpStream::connect(("127.0.0.1", prom_port)).is_ok()
                && http_get(prom_port, "/api/v1/query?query=count(up%3D%3D1)")
                    .1
                    .contains(r#","2"]"#)
        },
    );

    // The user is refused once on host A only.
    let (_, a, cgroup_a, _) = &hosts[0];
    let mut h = Helper::spawn(&cgroup_a.path, UID);
    for _ in 0..3 {
        assert!(h.connect("tcp4", listener.port4).is_ok());
    }
    assert!(matches!(
        h.connect("tcp4", listener.port4),
        Connect::Err(libc::EPERM, _)
    ));
    let refused_at = Instant::now();
    let b = &hosts[1].1;
    wait_for(
        "the fleet's decision on host B",
        Duration::from_secs(40),
        || {
            penalties(b)
                .iter()
                .any(|p| p["target"] == format!("user:{UID}").as_str())
        },
    );
    println!(
        "the decision reached the other host {:.1} s after the refusal",
        refused_at.elapsed().as_secs_f64()
    );
    for s in [a, b] {
        let list = penalties(s);
        assert_eq!(list.len(), 1, "{list:?}");
        let p = &list[0];
        assert_eq!(
            (p["rule"].as_str(), p["tier"].as_u64()),
            (Some("fleet-conns"), Some(1))
        );
        assert_eq!(
            p["reason"],
            "fleet: alert FleetConnectionFlood from Alertmanager"
        );
        assert_eq!(
            p["until"].as_u64().unwrap() - p["since"].as_u64().unwrap(),
            600
        );
        wait_for(
            "the tier's cap in the kernel",
            Duration::from_secs(5),
            || kernel_cap(s) == Some(1),
        );
    }
    // Enforced on host B, where the user did nothing.
    let (_, _, cgroup_b, _) = &hosts[1];
    let mut hb = Helper::spawn(&cgroup_b.path, UID);
    assert!(hb.connect("tcp4", listener.port4).is_ok());
    assert!(matches!(
        hb.connect("tcp4", listener.port4),
        Connect::Err(libc::EPERM, _)
    ));
    hb.close_all();

    // No refusal for 10 s: the alert resolves, and Alertmanager's resolution lifts the
    // tier on both hosts (host A refused one more connect above, host B one: each counts).
    let resolved = wait_for(
        "the resolution on both hosts",
        Duration::from_secs(60),
        || hosts.iter().all(|(_, s, ..)| penalties(s).is_empty()),
    );
    println!("lifted on both hosts {:.1} s later", resolved.as_secs_f64());
    for (_, s, ..) in &hosts {
        assert_eq!(kernel_cap(s), Some(3));
    }
    drop(h);
}
