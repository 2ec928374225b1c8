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

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(deploy("grafana/rlagent.json")).unwrap()).unwrap()
}

/// The `expr` of every dashboard target, with the dashboard's variables ($instance,
/// $target, $uid) at "All".
fn dashboard_queries() -> Vec<String> {
    dashboard()["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            let mut q = t["expr"].as_str().unwrap().to_string();
            for var in ["$instance", "$target", "$uid"] {
                q = q.replace(var, ".*");
            }
            q
        })
        .collect()
}

#[test]
fn every_dashboard_panel_says_what_it_shows_and_filters_by_host() {
    let dash = dashboard();
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "instance", "target", "uid"]);
    for panel in dash["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = &panel["title"];
        assert!(
            panel["description"].as_str().is_some_and(|d| d.len() > 20),
            "{title}: no description"
        );
        assert!(
            panel["fieldConfig"]["defaults"]["unit"].is_string(),
            "{title}: no unit"
        );
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.contains("$instance"),
                "{title}: {expr} ignores the host"
            );
        }
    }
}

/// The `expr` of every rule of a rules file (single-line or a folded `>` block).
fn rule_queries(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(deploy(&format!("prometheus/{file}"))).unwrap();
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
    // Two hosts: two agents, each with its cgroup, scraped as two instances.
    let listener = Listener::new();
    let mut hosts = Vec::new();
    for uid in [UID, UID + 1] {
        let cgroup = TestCgroup::new();
        let scratch = Scratch::new();
        // A group with a cap, so the group panels have series too.
        scratch.write_config_with_groups(
            &cgroup,
            "",
            &format!("[[quota]]\ntarget = \"user:{uid}\"\nconns = 2\n[[quota]]\ntarget = \"batch\"\nconns = 5\n"),
        );
        let agent = Agent::start(&scratch);
        let mut h = Helper::spawn(&cgroup.path, uid);
        assert!(h.connect("tcp4", listener.port4).is_ok());
        assert!(h.connect("tcp6", listener.port6).is_ok());
        // Dropped in this order: the helper and the agent leave the cgroup before it goes.
        hosts.push((h, agent, scratch, cgroup));
    }
    let targets: Vec<String> = hosts
        .iter()
        .map(|(_, _, s, _)| format!("\"127.0.0.1:{}\"", s.metrics_port()))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let port = rlagent_tests::free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n  - {}\nscrape_configs:\n  - job_name: rlagent\n    static_configs:\n      - targets: [{}]\n",
            deploy("prometheus/rlagent.rules.yml").display(),
            deploy("prometheus/rlagent-fleet.rules.yml").display(),
            targets.join(", ")
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
    wait_for("both agents scraped as two instances", || {
        query(port, "count(count by (instance) (rlagent_build_info))")["data"]["result"][0]["value"]
            [1]
            == "2"
    });
    // A denial after scraping began, so rates and the denial rule see an increase.
    std::thread::sleep(Duration::from_secs(2));
    let h = &mut hosts[0].0;
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
        .chain(rule_queries("rlagent.rules.yml"))
        .chain(rule_queries("rlagent-fleet.rules.yml"))
        .collect();
    assert_eq!(
        rule_queries("rlagent.rules.yml").len(),
        rlagent::model::alert::default_rules().len()
    );
    // The host panels show one series per instance.
    let per_host = query(
        port,
        "sum by (instance) (rlagent_host_connections_live{instance=~\".*\"})",
    );
    assert_eq!(
        per_host["data"]["result"].as_array().unwrap().len(),
        2,
        "{per_host}"
    );
    assert!(queries.len() >= 25, "{queries:?}");
    for q in &queries {
        let answer = query(prometheus.port, q);
        assert_eq!(answer["status"], "success", "{q}: {answer}");
        // The series a query reads exist (a rule's comparison may rightly hold for none:
        // nothing here is untracked or down).
        let series = [" > ", " == "]
            .iter()
            .find_map(|op| q.rsplit_once(op).map(|(left, _)| left.to_string()))
            .unwrap_or_else(|| q.clone());
        let connection_series = series.contains("connections") || series.contains("ALERTS");
        if connection_series {
            let answer = query(prometheus.port, &series);
            assert!(
                !answer["data"]["result"].as_array().unwrap().is_empty(),
                "{series} returned no data"
            );
        }
    }
    println!("{} queries ran against Prometheus", queries.len());
}
