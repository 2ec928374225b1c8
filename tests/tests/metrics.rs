//! /metrics of the real agent: the series a workload creates, and the exposition checked
//! by Prometheus's own `promtool check metrics`.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use rlagent_tests::{
    http_get as scrape, privileged, Agent, Connect, Helper, Listener, Scratch, TestCgroup,
};

const UID: u32 = 61201;

#[test]
fn metrics_show_live_connections_caps_and_denials_and_pass_promtool() {
    if !privileged("metrics_scrape") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(
        &cgroup,
        "",
        &format!("[[quota]]\ntarget = \"user:{UID}\"\nconns = 2\n"),
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

    let (head, body) = scrape(scratch.metrics_port, "/metrics");
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
        "rlagent_host_connections_live 2".to_string(),
        "# TYPE rlagent_connections_denied_total counter".to_string(),
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        );
    }
    let (head, _) = scrape(scratch.metrics_port, "/nope");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    match std::env::var_os("RLAGENT_PROMTOOL") {
        Some(promtool) => {
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
        None if std::env::var("RLAGENT_REQUIRE_PRIVILEGED").as_deref() == Ok("1") => {
            panic!("RLAGENT_PROMTOOL is not set (cargo xtask test sets it)")
        }
        None => eprintln!("SKIP promtool check: RLAGENT_PROMTOOL is not set"),
    }
}
