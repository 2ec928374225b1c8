//! The agent's own alert engine with the real agent: rules from the config, pending →
//! firing → resolved, shown by `rlctl alerts` and `rlagent_alerts_firing`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use rlagent_tests::{
    http_get, privileged, sample, target_bin, Agent, Connect, Helper, Listener, Scratch, TestCgroup,
};

const UID: u32 = 61301;

fn alerts(scratch: &Scratch) -> serde_json::Value {
    let out = Command::new(target_bin("rlctl"))
        .arg("--socket")
        .arg(scratch.socket_path())
        .args(["alerts", "--json"])
        .output()
        .unwrap();
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
    let (_, body) = http_get(scratch.metrics_port, "/metrics");
    assert_eq!(sample(&body, "rlagent_alerts_firing"), Some(2.0), "{body}");
    let table = Command::new(target_bin("rlctl"))
        .arg("--socket")
        .arg(scratch.socket_path())
        .arg("alerts")
        .output()
        .unwrap();
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
