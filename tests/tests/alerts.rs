//! The agent's own alert engine with the real agent: rules from the config, pending →
//! firing → resolved, shown by `rlctl alerts` and `rlagent_alerts_firing`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use rlagent_tests::{
    http_get, privileged, sample, Agent, Connect, Helper, Listener, Scratch, ServerProcess,
    TestCgroup,
};

const UID: u32 = 61301;

fn alerts(scratch: &Scratch) -> serde_json::Value {
    let out = scratch.rlctl(&["alerts", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn state_of(scratch: &Scratch, rule: &str) -> Option<String> {
    alerts(scratch)["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["rule"] == rule && a["target"] == format!("user:{UID}"))
        .map(|a| a["state"].as_str().unwrap().to_string())
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

#[test]
fn connection_alerts_go_pending_fire_and_resolve() {
    if !privileged("alerts_end_to_end") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(
        &cgroup,
        "",
        &format!(
            "[alerts]\ndefaults = false\ninterval = \"1s\"\n\
             [[alert]]\nname = \"AtCap\"\nstat = \"conns_ratio\"\nop = \">=\"\nthreshold = 1.0\nfor = \"2s\"\nseverity = \"warning\"\nsummary = \"{{target}} at {{value}} of its cap\"\n\
             [[alert]]\nname = \"Denied\"\nstat = \"conn_denials\"\nop = \">\"\nthreshold = 0\nwindow = \"3s\"\nseverity = \"info\"\nsummary = \"{{target}}: {{value}} denied\"\n\
             [[quota]]\ntarget = \"user:{UID}\"\nconns = 2\n"
        ),
    );
    let agent = Agent::start(&scratch);
    // A watcher from the start: the snapshot, then every transition, as JSON lines.
    let mut watcher = rlagent_tests::rlctl(&scratch.socket_path())
        .args(["alerts", "--watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let watched = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let watched = watched.clone();
        let stdout = watcher.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                watched.lock().unwrap().push(line);
            }
        })
    };
    let listener = Listener::new();
    let mut h = Helper::spawn(&cgroup.path, UID);
    assert!(h.connect("tcp4", listener.port4).is_ok());
    assert!(h.connect("tcp4", listener.port4).is_ok());
    wait_for("AtCap pending", || {
        state_of(&scratch, "AtCap").as_deref() == Some("pending")
    });
    let fired_after = wait_for("AtCap firing", || {
        state_of(&scratch, "AtCap").as_deref() == Some("firing")
    });
    assert!(
        fired_after >= Duration::from_millis(500),
        "fires only after `for`"
    );

    assert!(matches!(
        h.connect("tcp4", listener.port4),
        Connect::Err(libc::EPERM, _)
    ));
    wait_for("Denied firing", || {
        state_of(&scratch, "Denied").as_deref() == Some("firing")
    });
    let (_, body) = http_get(scratch.metrics_port(), "/metrics");
    assert_eq!(sample(&body, "rlagent_alerts_firing"), Some(2.0), "{body}");
    let table = scratch.rlctl(&["alerts"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains(&format!("user:{UID} at 100% of its cap")),
        "{table}"
    );

    h.close_all();
    scratch.wait_live(UID, 0);
    wait_for("both resolved", || {
        state_of(&scratch, "AtCap").is_none() && state_of(&scratch, "Denied").is_none()
    });
    wait_for("the watcher to see both resolutions", || {
        watched
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("\"resolved\""))
            .count()
            == 2
    });
    watcher.kill().unwrap();
    watcher.wait().unwrap();
    reader.join().unwrap();
    let events: Vec<(String, String)> = watched
        .lock()
        .unwrap()
        .iter()
        .skip(1) // the snapshot
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let e = &v["result"]["event"];
            (
                e["rule"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let pos = |rule: &str, state: &str| {
        events
            .iter()
            .position(|e| e.0 == rule && e.1 == state)
            .unwrap_or_else(|| panic!("{rule} {state} not in {events:?}"))
    };
    assert!(
        pos("AtCap", "pending") < pos("AtCap", "firing")
            && pos("AtCap", "firing") < pos("AtCap", "resolved")
    );
    assert!(pos("Denied", "firing") < pos("Denied", "resolved"));
    assert_eq!(events.len(), 5, "{events:?}");
    let log = agent.log_text();
    for line in [
        "pending: user:61301 at 100% of its cap",
        "firing: user:61301 at 100% of its cap",
        "resolved: user:61301 at 0% of its cap",
        "firing: user:61301: 1 denied",
        "resolved: user:61301: 0 denied",
    ] {
        assert_eq!(log.matches(line).count(), 1, "{line:?} logged once:\n{log}");
    }
}

/// A real Alertmanager (from Debian's package, path in RLAGENT_ALERTMANAGER) on loopback.
fn alertmanager() -> Option<ServerProcess> {
    let bin = rlagent_tests::external_tool("RLAGENT_ALERTMANAGER", "alertmanager_end_to_end")?;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("am.yml"),
        "route:\n  receiver: 'null'\nreceivers:\n  - name: 'null'\n",
    )
    .unwrap();
    let port = rlagent_tests::free_port();
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.path().join("am.yml").display()
        ))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting Alertmanager");
    let am = ServerProcess { child, port, dir };
    wait_for("Alertmanager ready", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && http_get(port, "/-/ready").0.starts_with("HTTP/1.1 200")
    });
    Some(am)
}

/// Active alerts named `name` in Alertmanager, as JSON. Anything but a 200 with a JSON
/// array fails the test: an error page must not read as "no alerts".
fn am_alerts(port: u16, name: &str) -> Vec<serde_json::Value> {
    let (head, body) = http_get(port, "/api/v2/alerts");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "Alertmanager answered {head:?}: {body}"
    );
    let all: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("Alertmanager's alerts are not JSON ({e}): {body:?}"));
    let Some(all) = all.as_array() else {
        panic!("Alertmanager's alerts are not a JSON array: {body}");
    };
    all.iter()
        .filter(|x| x["labels"]["alertname"] == name)
        .cloned()
        .collect()
}

#[test]
fn alertmanager_receives_the_alert_and_its_resolution() {
    if !privileged("alertmanager_end_to_end") {
        return;
    }
    let Some(am) = alertmanager() else { return };
    // Two hosts (two agents) raise the same alert for the same target: Alertmanager keeps
    // them apart by their instance label.
    let listener = Listener::new();
    let mut hosts = Vec::new();
    for instance in ["login07", "login08"] {
        let cgroup = TestCgroup::new();
        let scratch = Scratch::new();
        scratch.write_config(
            &cgroup,
            "",
            &format!(
                "[alerts]\ndefaults = false\ninterval = \"1s\"\nalertmanager_url = \"http://127.0.0.1:{}\"\n\
                 instance = \"{instance}\"\nlabels = {{ site = \"lab\" }}\n\
                 [[alert]]\nname = \"Denied\"\nstat = \"conn_denials\"\nop = \">\"\nthreshold = 0\nwindow = \"5s\"\nseverity = \"info\"\nsummary = \"{{target}}: {{value}} denied\"\n\
                 [[quota]]\ntarget = \"user:{UID}\"\nconns = 0\n",
                am.port
            ),
        );
        let agent = Agent::start(&scratch);
        let h = Helper::spawn(&cgroup.path, UID);
        // Dropped in this order: the helper and the agent leave the cgroup before it goes.
        hosts.push((h, agent, scratch, cgroup));
    }
    // The denials once both agents run: an agent's start (a few seconds on a loaded
    // machine) must not outlast the other host's window.
    for (h, ..) in &mut hosts {
        assert!(matches!(
            h.connect("tcp4", listener.port4),
            Connect::Err(libc::EPERM, _)
        ));
    }
    let took = wait_for("both hosts' alerts in Alertmanager", || {
        let alerts = am_alerts(am.port, "Denied");
        ["login07", "login08"].iter().all(|instance| {
            alerts.iter().any(|a| {
                a["labels"]["instance"] == *instance
                    && a["labels"]["site"] == "lab"
                    && a["labels"]["target"] == format!("user:{UID}")
                    && a["labels"]["severity"] == "info"
                    && a["status"]["state"] == "active"
            })
        })
    });
    println!(
        "alerts reached Alertmanager {} ms after the denials",
        took.as_millis()
    );
    let alert = am_alerts(am.port, "Denied").remove(0);
    assert_eq!(
        alert["annotations"]["summary"],
        format!("user:{UID}: 1 denied")
    );
    // No more denials: after the 5 s window the agents resolve them and tell Alertmanager.
    wait_for("the resolutions in Alertmanager", || {
        am_alerts(am.port, "Denied").is_empty()
    });
}
