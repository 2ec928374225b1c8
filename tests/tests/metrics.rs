//! /metrics of the real agent: the series a workload creates, and the exposition checked
//! by Prometheus's own `promtool check metrics`.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use rlagent_tests::{
    external_tool, http_get as scrape, privileged, Agent, Connect, Helper, Listener, Scratch,
    TestCgroup,
};

const UID: u32 = 61201;

#[test]
fn metrics_show_live_connections_caps_and_denials_and_pass_promtool() {
    if !privileged("metrics_scrape") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    // UID: a cap; UID + 1: a rate of 1 a minute, burst 1, in monitor mode, in group batch
    // with a cap of 2 in monitor mode: its second connect() would be denied by the rate,
    // its third by the group's cap (a connect() counts once, at its first excess).
    scratch.write_config_with_groups(
        &cgroup,
        "",
        &format!("[[quota]]\ntarget = \"user:{UID}\"\nconns = 2\n[[quota]]\ntarget = \"user:{}\"\nconn_rate = \"1/min\"\nconn_burst = 1\nmode = \"monitor\"\n[[quota]]\ntarget = \"batch\"\nconns = 2\nmode = \"monitor\"\n", UID + 1),
    );
    let _agent = Agent::start(&scratch);
    let listener = Listener::new();
    let mut h = Helper::spawn(&cgroup.path, UID);
    assert!(h.connect("tcp4", listener.port4).is_ok());
    assert!(h.connect("tcp6", listener.port6).is_ok());
    assert!(matches!(
        h.connect("tcp4", listener.port4),
        Connect::Err(libc::EPERM, _)
    ));

    let mut m = Helper::spawn(&cgroup.path.join("slice/batch"), UID + 1);
    for _ in 0..3 {
        assert!(m.connect("tcp4", listener.port4).is_ok(), "monitor mode");
    }
    // The agent counts the events it received as they arrive.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let body = loop {
        let (_, body) = scrape(scratch.metrics_port(), "/metrics");
        if body.contains(&format!(
            "rlagent_connection_events_total{{uid=\"{}\",reason=\"rate\",mode=\"monitor\"}} 1",
            UID + 1
        )) {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no rate event counted:\n{body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let other = UID + 1;
    for line in [
        format!("rlagent_connections_would_deny_total{{uid=\"{other}\",reason=\"rate\"}} 1"),
        format!("rlagent_connections_would_deny_total{{uid=\"{other}\",reason=\"group\"}} 1"),
        format!("rlagent_connections_denied_total{{uid=\"{other}\",reason=\"rate\"}} 0"),
        format!("rlagent_connection_rate_per_second{{uid=\"{other}\"}} 0.016666666666666666"),
        format!("rlagent_connection_rate_burst{{uid=\"{other}\"}} 1"),
        format!("rlagent_connection_rate_tokens{{uid=\"{other}\"}} 0"),
        format!("rlagent_connection_events_dropped_total{{uid=\"{other}\"}} 0"),
        format!(
            "rlagent_connection_events_total{{uid=\"{UID}\",reason=\"cap\",mode=\"enforce\"}} 1"
        ),
        "rlagent_group_connections_live{group=\"batch\"} 3".to_string(),
        "rlagent_group_connections_cap{group=\"batch\"} 2".to_string(),
        "rlagent_group_connections_would_deny_total{group=\"batch\",reason=\"group\"} 1"
            .to_string(),
        "rlagent_connection_events_lost_total 0".to_string(),
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        );
    }
    let (head, body) = scrape(scratch.metrics_port(), "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for line in [
        format!("rlagent_connections_live{{uid=\"{UID}\"}} 2"),
        format!("rlagent_connections_cap{{uid=\"{UID}\"}} 2"),
        format!("rlagent_connections_admitted_total{{uid=\"{UID}\"}} 2"),
        format!("rlagent_connections_denied_total{{uid=\"{UID}\",reason=\"cap\"}} 1"),
        "rlagent_host_connections_live 5".to_string(),
        "# TYPE rlagent_connections_denied_total counter".to_string(),
        // How full each kernel map is: five charged sockets, two UIDs' counters and
        // policies, one group's.
        "rlagent_bpf_map_entries{map=\"RL_SOCK_OWNER\"} 5".to_string(),
        "rlagent_bpf_map_capacity{map=\"RL_SOCK_OWNER\"} 131072".to_string(),
        "rlagent_bpf_map_entries{map=\"RL_UID_CONNS\"} 2".to_string(),
        "rlagent_bpf_map_capacity{map=\"RL_UID_CONNS\"} 262144".to_string(),
        "rlagent_bpf_map_entries{map=\"RL_UID_CAPS\"} 2".to_string(),
        "rlagent_bpf_map_entries{map=\"RL_GROUP_POLICY\"} 1".to_string(),
        "rlagent_connections_denied_full_total 0".to_string(),
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        );
    }
    // No host cap: no UID has a host_cap series.
    assert!(!body.contains("reason=\"host_cap\""), "{body}");
    let (head, _) = scrape(scratch.metrics_port(), "/nope");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    if let Some(promtool) = external_tool("RLAGENT_PROMTOOL", "promtool check metrics") {
        let mut check = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running promtool");
        check
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
