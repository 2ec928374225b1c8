//! A real Prometheus scrapes a live agent (programs on a child cgroup) and evaluates the
//! shipped rules; every query of the Grafana dashboard and of the rules file is run
//! through its HTTP API. Each must parse; those on connection series (the series this
//! workload creates) must return data, and the denial alert must fire in Prometheus.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use rlagent_tests::{http_get, privileged, Agent, Connect, Helper, Listener, Scratch, TestCgroup};

const UID: u32 = 61401;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(port: u16, q: &str) -> serde_json::Value {
    let (_, body) = http_get(port, &format!("/api/v1/query?query={}", encode(q)));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{q}: not JSON ({e}): {body}"))
}

/// The `expr` of every dashboard target.
fn dashboard_queries() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/rlagent.json")).unwrap())
            .unwrap();
    dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect()
}

/// The `expr` of every rule (single-line or a folded `>` block).
fn rule_queries() -> Vec<String> {
    let text = std::fs::read_to_string(deploy("prometheus/rlagent.rules.yml")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(expr) = line.trim().strip_prefix("expr: ") else {
            continue;
        };
        if expr == ">" {
            let mut folded = Vec::new();
            while let Some(next) = lines.peek() {
                if next.trim().is_empty()
                    || next.trim().contains(": ") && !next.trim().starts_with('/')
                {
                    break;
                }
                folded.push(lines.next().unwrap().trim().to_string());
            }
            out.push(folded.join(" "));
        } else {
            out.push(expr.to_string());
        }
    }
    out
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn every_dashboard_and_rule_query_runs_against_a_real_prometheus() {
    if !privileged("prometheus_end_to_end") {
        return;
    }
    let Some(bin) = rlagent_tests::external_tool("RLAGENT_PROMETHEUS", "prometheus_end_to_end")
    else {
        return;
    };
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

    let dir = tempfile::tempdir().unwrap();
    let port = rlagent_tests::free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: rlagent\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
            deploy("prometheus/rlagent.rules.yml").display(),
            scratch.metrics_port
        ),
    )
    .unwrap();
    let prometheus = rlagent_tests::ServerProcess {
        child: Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting Prometheus"),
        port,
        dir,
    };
    let live = format!("rlagent_connections_live{{uid=\"{UID}\"}}");
    wait_for("Prometheus to scrape the agent", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && query(port, &live)["data"]["result"][0]["value"][1] == "2"
    });
    // A denial after scraping began, so rates and the denial rule see an increase.
    std::thread::sleep(Duration::from_secs(2));
    assert!(matches!(
        h.connect("tcp4", listener.port4),
        Connect::Err(libc::EPERM, _)
    ));
    wait_for("the denial alert to fire in Prometheus", || {
        !query(
            port,
            "ALERTS{alertname=\"RlagentConnectionsDenied\", alertstate=\"firing\"}",
        )["data"]["result"]
            .as_array()
            .unwrap()
            .is_empty()
    });

    let queries: Vec<String> = dashboard_queries()
        .into_iter()
        .chain(rule_queries())
        .collect();
    assert_eq!(
        rule_queries().len(),
        rlagent::model::alert::default_rules().len()
    );
    assert!(queries.len() >= 25, "{queries:?}");
    for q in &queries {
        let answer = query(prometheus.port, q);
        assert_eq!(answer["status"], "success", "{q}: {answer}");
        let connection_series = q.contains("connections") || q.contains("ALERTS");
        if connection_series {
            assert!(
                !answer["data"]["result"].as_array().unwrap().is_empty(),
                "{q} returned no data"
            );
        }
    }
    println!("{} queries ran against Prometheus", queries.len());
}
