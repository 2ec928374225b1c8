//! What deploy/ ships for Prometheus: valid rules, their promtool unit tests, and the same
//! alerts (names and severities) as the agent's built-in defaults.

use std::{path::PathBuf, process::Command};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Runs an external checker in `dir` (under deploy/); its output is the failure message.
fn run(tool: &std::ffi::OsStr, dir: &str, args: &[&str]) {
    let out = Command::new(tool)
        .current_dir(deploy(dir))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {tool:?}: {e}"));
    assert!(
        out.status.success(),
        "{tool:?} {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_rules_are_valid_and_pass_their_unit_tests() {
    let Some(tool) = rlagent_tests::external_tool("RLAGENT_PROMTOOL", "promtool rules") else {
        return;
    };
    for rules in [
        "rlagent.rules",
        "rlagent-fleet.rules",
        "rlagent-fleet-penalties.rules",
    ] {
        run(
            &tool,
            "prometheus",
            &["check", "rules", &format!("{rules}.yml")],
        );
        run(
            &tool,
            "prometheus",
            &["test", "rules", &format!("{rules}.test.yml")],
        );
    }
}

#[test]
fn the_alertmanager_penalty_receiver_example_is_valid() {
    let Some(alertmanager) =
        rlagent_tests::external_tool("RLAGENT_ALERTMANAGER", "amtool check-config")
    else {
        return;
    };
    // amtool is installed beside the alertmanager binary.
    let amtool = std::path::Path::new(&alertmanager).with_file_name("amtool");
    run(
        amtool.as_os_str(),
        "alertmanager",
        &["check-config", "rlagent-penalties.yml"],
    );
}

/// One alert of the shipped rules file, read line by line: enough of YAML for this file.
#[derive(Debug, PartialEq)]
struct ShippedRule {
    name: String,
    severity: String,
    /// The number after the expression's last `>`.
    threshold: f64,
    /// `for:`, 0 when absent.
    for_secs: u64,
    /// The range of the expression's `increase(...[w])`, if any.
    window_secs: Option<u64>,
}

fn duration_secs(text: &str) -> u64 {
    let (number, unit) = text.split_at(text.len() - 1);
    let n: u64 = number.parse().unwrap();
    match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => panic!("duration {text:?}"),
    }
}

fn shipped_rules(text: &str) -> Vec<ShippedRule> {
    let mut rules: Vec<ShippedRule> = Vec::new();
    let mut expr: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix("- alert: ") {
            rules.push(ShippedRule {
                name: name.to_string(),
                severity: String::new(),
                threshold: f64::NAN,
                for_secs: 0,
                window_secs: None,
            });
            expr = None;
            continue;
        }
        let Some(rule) = rules.last_mut() else {
            continue; // the header before the first alert
        };
        if let Some(e) = trimmed.strip_prefix("expr:") {
            expr = Some(e.trim().trim_start_matches('>').to_string());
        } else if let Some(e) = expr.as_mut().filter(|_| line.starts_with("          ")) {
            e.push(' ');
            e.push_str(trimmed);
        } else {
            if let Some(e) = expr.take() {
                let (_, threshold) = e.rsplit_once('>').expect("a comparison");
                rule.threshold = threshold.trim().parse().unwrap();
                rule.window_secs = e
                    .split_once('[')
                    .map(|(_, rest)| duration_secs(rest.split_once(']').unwrap().0));
            }
            if let Some(f) = trimmed.strip_prefix("for: ") {
                rule.for_secs = duration_secs(f);
            } else if let Some(sev) = trimmed.strip_prefix("severity: ") {
                rule.severity = sev.to_string();
            }
        }
    }
    rules
}

#[test]
fn shipped_rules_match_the_agents_default_alerts() {
    let text = std::fs::read_to_string(deploy("prometheus/rlagent.rules.yml")).unwrap();
    let shipped = shipped_rules(&text);
    let defaults: Vec<ShippedRule> = rlagent::model::alert::default_rules()
        .into_iter()
        .map(|r| {
            let counter = matches!(
                r.stat,
                rlagent::model::alert::Stat::ConnDenials
                    | rlagent::model::alert::Stat::RateDenials
                    | rlagent::model::alert::Stat::WouldDeny
                    | rlagent::model::alert::Stat::EventsLost
                    | rlagent::model::alert::Stat::CpuThrottledRatio
                    | rlagent::model::alert::Stat::OomKills
            );
            ShippedRule {
                name: r.name,
                severity: r.severity,
                threshold: r.threshold,
                for_secs: r.for_duration.as_secs(),
                window_secs: counter.then_some(r.window.as_secs()),
            }
        })
        .collect();
    assert_eq!(shipped, defaults);
}

#[test]
fn the_rules_reader_sees_a_changed_threshold() {
    let text = std::fs::read_to_string(deploy("prometheus/rlagent.rules.yml")).unwrap();
    let changed = text
        .replace("> 0.85", "> 0.8")
        .replace("for: 1m", "for: 2m");
    let rules = shipped_rules(&changed);
    assert_eq!(rules[0].threshold, 0.8);
    assert_eq!(rules[1].for_secs, 120);
}

/// The example config is valid as shipped, and names every section and every quota field
/// (a key the parser gained but the example lacks fails here).
#[test]
fn the_example_config_is_valid_and_shows_every_key() {
    let path = deploy("rlagent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = rlagent::config::Config::parse(&text, &path, &rlagent::kernel::nss::SystemUsers)
        .unwrap_or_else(|e| panic!("{}", rlagent::model::error_chain(&e)));
    assert!(!config.quotas.is_empty() && !config.groups.is_empty());
    for key in [
        "cgroup_driver",
        "cgroup_root",
        "state_path",
        "[bpf]",
        "attach_cgroup",
        "pin_path",
        "count_udp",
        "uid_min",
        "deny_errno",
        "max_tracked_sockets",
        "on_full",
        "host_conns",
        "mode = \"enforce\"",
        "event_rate",
        "event_burst",
        "subordinate_uids",
        "subuid_file",
        "uid_retire_interval",
        "conn_rate",
        "conn_burst",
        "mode = \"monitor\"",
        "[control]",
        "socket",
        "mode",
        "group =",
        "operator_cgroups",
        "[metrics]",
        "listen",
        "[alerts]",
        "defaults",
        "interval",
        "alertmanager_url",
        "instance =",
        "labels",
        "[[alert]]",
        "stat",
        "op",
        "threshold",
        "for =",
        "window",
        "severity",
        "summary",
        "[[group]]",
        "uids",
        "gids",
        "comms",
        "exes",
        "[[quota]]",
    ] {
        assert!(
            text.contains(key),
            "deploy/rlagent.toml does not show {key}"
        );
    }
    for field in rlagent::model::quota::Field::ALL {
        assert!(
            text.contains(&format!("{} ", field.name()))
                || text.contains(&format!("{},", field.name())),
            "deploy/rlagent.toml does not show the quota field {}",
            field.name()
        );
    }
}

/// Every Kubernetes manifest is valid against the Kubernetes schemas (kubernetes-validate,
/// strict: unknown fields are errors). The ServiceMonitor is a CRD the validator does not
/// know; it is not checked.
#[test]
fn kubernetes_manifests_are_valid() {
    let Some(validate) =
        rlagent_tests::external_tool("RLAGENT_KUBERNETES_VALIDATE", "kubernetes manifests")
    else {
        return;
    };
    let mut manifests: Vec<String> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "servicemonitor.yaml")
        .collect();
    manifests.sort();
    assert_eq!(manifests.len(), 5, "{manifests:?}");
    let mut args = vec!["--strict"];
    args.extend(manifests.iter().map(String::as_str));
    run(&validate, "kubernetes", &args);
}

/// The config the DaemonSet mounts (the ConfigMap's files, laid out as its items say)
/// loads as the agent loads it.
#[test]
fn the_kubernetes_config_loads() {
    let text = std::fs::read_to_string(deploy("kubernetes/configmap.yaml")).unwrap();
    // The block scalars under `data:`: `  <key>: |` then lines indented by 4.
    let mut files: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(key) = line
            .strip_prefix("  ")
            .and_then(|l| l.strip_suffix(": |"))
            .filter(|k| !k.starts_with(' '))
        {
            files.push((key.to_string(), String::new()));
        } else if let Some((_, body)) = files.last_mut() {
            if let Some(content) = line.strip_prefix("    ") {
                body.push_str(content);
                body.push('\n');
            } else if line.is_empty() {
                body.push('\n');
            }
        }
    }
    let keys: Vec<&str> = files.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["rlagent.toml", "10-fleet.toml"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("rlagent.d")).unwrap();
    std::fs::write(dir.path().join("rlagent.toml"), &files[0].1).unwrap();
    std::fs::write(dir.path().join("rlagent.d/10-fleet.toml"), &files[1].1).unwrap();
    let daemonset = std::fs::read_to_string(deploy("kubernetes/daemonset.yaml")).unwrap();
    assert!(daemonset.contains("path: rlagent.d/10-fleet.toml"));
    let config = rlagent::config::Config::load(
        Some(&dir.path().join("rlagent.toml")),
        &rlagent::kernel::nss::SystemUsers,
    )
    .unwrap_or_else(|e| panic!("{}", rlagent::model::error_chain(&e)));
    assert!(
        config
            .quotas
            .contains_key(&rlagent::model::target::Target::AllUsers),
        "the drop-in's user:* quota"
    );
    // /metrics carries UIDs and cgroup names: the agent serves it on the node's loopback
    // only, and kube-rbac-proxy forwards authorised scrapes to that address.
    let listen = config.metrics_listen;
    assert!(listen.ip().is_loopback(), "metrics listen {listen}");
    assert!(
        daemonset.contains(&format!("--upstream=http://{listen}/")),
        "kube-rbac-proxy's upstream is not the agent's {listen}"
    );
    assert!(
        daemonset.contains(&format!(
            "host: {}\n              path: /\n              port: {}",
            listen.ip(),
            listen.port()
        )),
        "the probes do not ask the agent's {listen}"
    );
}

/// rlagent(8) and rlctl(1) have examples, every command inline, and name no manual page
/// that is not installed or part of systemd.
#[test]
fn man_pages_have_examples_and_name_only_pages_that_exist() {
    let known = [
        "rlctl(1)",
        "rlagent(8)",
        "systemd.resource-control(5)",
        "systemd-run(1)",
    ];
    for (bin, section) in [("rlctl", "1"), ("rlagent", "8")] {
        let out = Command::new(rlagent_tests::target_bin(bin))
            .arg("man")
            .output()
            .expect("running the binary");
        assert!(out.status.success());
        let page = String::from_utf8(out.stdout).unwrap();
        assert!(page.contains(&format!("\n.TH {bin} {section} ")), "{page}");
        for heading in [".SH EXAMPLES", ".SH COMMANDS", ".SH SEE ALSO"] {
            assert!(page.contains(heading), "{bin}: no {heading}");
        }
        // Every `name(section)` reference, hyphens unescaped.
        let text = page.replace("\\-", "-");
        for (i, _) in text.match_indices('(') {
            let section_ok = text[i + 1..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
                && text[i + 2..].starts_with(')');
            if !section_ok {
                continue;
            }
            let start = text[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'))
                .map_or(0, |p| p + 1);
            let reference = &text[start..i + 3];
            if start < i {
                assert!(
                    known.contains(&reference),
                    "{bin}({section}) refers to {reference}, which is not installed"
                );
            }
        }
    }
}
