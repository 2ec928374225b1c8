//! What deploy/ ships for Prometheus: valid rules, their promtool unit tests, and the same
//! alerts (names and severities) as the agent's built-in defaults.

use std::{path::PathBuf, process::Command};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn run(tool: &std::ffi::OsStr, args: &[&str]) {
    let out = Command::new(tool)
        .current_dir(deploy("prometheus"))
        .args(args)
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_rules_are_valid_and_pass_their_unit_tests() {
    let Some(tool) = rlagent_tests::external_tool("RLAGENT_PROMTOOL", "promtool rules") else {
        return;
    };
    run(&tool, &["check", "rules", "rlagent.rules.yml"]);
    run(&tool, &["test", "rules", "rlagent.rules.test.yml"]);
}

#[test]
fn shipped_rules_match_the_agents_default_alerts() {
    let text = std::fs::read_to_string(deploy("prometheus/rlagent.rules.yml")).unwrap();
    let mut shipped = Vec::new();
    let mut name = None;
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("- alert: ") {
            name = Some(n.to_string());
        } else if let Some(sev) = line.strip_prefix("severity: ") {
            let n = name
                .take()
                .expect("a severity belongs to the alert above it");
            shipped.push((n, sev.to_string()));
        }
    }
    let defaults: Vec<(String, String)> = rlagent::model::alert::default_rules()
        .into_iter()
        .map(|r| (r.name, r.severity))
        .collect();
    assert_eq!(shipped, defaults);
}
