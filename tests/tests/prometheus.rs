//! A real Prometheus scrapes a live agent (programs on a child cgroup) and evaluates the
//! shipped rules; every query of the Grafana dashboard and of the rules files is run
//! through its HTTP API. Each must parse and return data, and the denial alert must fire
//! in Prometheus. The one exception is a query on a cgroup controller's series (cpu,
//! memory, pids): this hybrid host has no controller on its cgroup2 mount, so the agent
//! has no such series here. The guest test
//! `every_cgroup_series_the_dashboard_and_rules_read_is_exported` checks those names and
//! labels on a real cgroup v2 kernel.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use rlagent_tests::{
    http_get, privileged, queries, Agent, Connect, Helper, Listener, Scratch, TestCgroup,
};

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

#[test]
fn every_dashboard_panel_says_what_it_shows_and_filters_by_host() {
    let dash = queries::dashboard();
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
        // A group with a cap, so the group panels have series too; in monitor mode, so
        // the would-deny series exist (they do only where some limit is in monitor mode).
        // A penalty for any denial, with a tier as loose as the cap: the denial below puts
        // the user in it, so the penalty series exist, and nothing else changes; an
        // adaptive rule that never holds (pressure is at most 100%), for its series.
        scratch.write_config_with_groups(
            &cgroup,
            "",
            &format!("[[quota]]\ntarget = \"user:{uid}\"\nconns = 2\nconn_rate = \"100/s\"\nconn_burst = 50\n[[quota]]\ntarget = \"batch\"\nconns = 5\nmode = \"monitor\"\n[[penalty]]\nname = \"any-denial\"\nwhen = \"denials_per_min > 0\"\nwindow = \"1s\"\n[[penalty.tier]]\nconns = 2\nduration = \"10m\"\n[[adapt]]\nname = \"never\"\nwhen = \"host.cpu.some_avg10 > 100\"\nfor = \"0\"\nrelease_after = \"1s\"\ntarget = \"user:*\"\nconns = 1\n"),
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

    let queries = queries::all_queries();
    assert_eq!(
        queries::rule_queries(queries::HOST_RULES).len(),
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
    let mut empty = Vec::new();
    let mut cgroup_only = 0;
    for q in &queries {
        let answer = query(prometheus.port, q);
        assert_eq!(answer["status"], "success", "{q}: {answer}");
        // A rule's comparison may rightly hold for none (nothing here is untracked or
        // down): what must return data is the expression it compares.
        let series = [" > ", " == "]
            .iter()
            .filter_map(|op| q.rsplit_once(op))
            .max_by_key(|(left, _)| left.len())
            .map_or_else(|| q.clone(), |(left, _)| left.to_string());
        let has_data = |q: &str| {
            let answer = query(prometheus.port, q);
            assert_eq!(answer["status"], "success", "{q}: {answer}");
            !answer["data"]["result"].as_array().unwrap().is_empty()
        };
        if reads_cgroup_controller_series(&series) {
            // cpu.stat is there without the controller; the rest is not.
            if !has_data(&series) {
                cgroup_only += 1;
            }
            continue;
        }
        // A rate needs two scrapes of a series that began at the denial: a few seconds.
        let start = Instant::now();
        while !has_data(&series) {
            if start.elapsed() > Duration::from_secs(10) {
                empty.push(series);
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    assert!(empty.is_empty(), "no data for:\n{}", empty.join("\n"));
    println!(
        "{} queries ran against Prometheus; all returned data but {cgroup_only} on cgroup controller series, for which this host has no controller",
        queries.len()
    );
}

/// True when every metric `query` reads is one of a cgroup controller's (cpu, memory,
/// pids), which only a host with that controller on cgroup2 has.
fn reads_cgroup_controller_series(query: &str) -> bool {
    let names = queries::metric_names(query);
    !names.is_empty()
        && names
            .iter()
            .all(|n| queries::is_cgroup_controller_metric(n))
}
