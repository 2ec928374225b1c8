//! The PromQL queries the project ships: every target of the Grafana dashboard and every
//! rule of the two rules files, embedded at build time so the guest tests have them too.

/// The Grafana dashboard, as shipped.
pub const DASHBOARD: &str = include_str!("../../deploy/grafana/rlagent.json");
/// The per-host rules file, as shipped.
pub const HOST_RULES: &str = include_str!("../../deploy/prometheus/rlagent.rules.yml");
/// The fleet rules file, as shipped.
pub const FLEET_RULES: &str = include_str!("../../deploy/prometheus/rlagent-fleet.rules.yml");

pub fn dashboard() -> serde_json::Value {
    serde_json::from_str(DASHBOARD).expect("the dashboard is JSON")
}

/// The `expr` of every dashboard target, with the dashboard's variables ($instance,
/// $target, $uid) at "All".
pub fn dashboard_queries() -> Vec<String> {
    dashboard()["panels"]
        .as_array()
        .expect("the dashboard has panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            let mut q = t["expr"]
                .as_str()
                .expect("a target has an expr")
                .to_string();
            for var in ["$instance", "$target", "$uid"] {
                q = q.replace(var, ".*");
            }
            q
        })
        .collect()
}

/// The `expr` of every rule of a rules file's text (single-line or a folded `>` block).
pub fn rule_queries(text: &str) -> Vec<String> {
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

/// Every query shipped: the dashboard's, then the host rules', then the fleet rules'.
pub fn all_queries() -> Vec<String> {
    dashboard_queries()
        .into_iter()
        .chain(rule_queries(HOST_RULES))
        .chain(rule_queries(FLEET_RULES))
        .collect()
}

/// The agent's metric names a query reads (words starting `rlagent_` outside quoted
/// strings; recording rules' `rlagent:...` names are not the agent's), in order of first use.
pub fn metric_names(query: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in query.chars().chain([' ']) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("rlagent_") && !word.contains(':') && !names.contains(&word) {
            names.push(word.clone());
        }
        word.clear();
    }
    names
}

/// True for a metric of a cgroup controller (cpu, memory, pids): series that exist only
/// where the controller is on the cgroup2 mount.
pub fn is_cgroup_controller_metric(name: &str) -> bool {
    ["rlagent_cpu_", "rlagent_memory_", "rlagent_pids_"]
        .iter()
        .any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_whole_words() {
        assert_eq!(
            metric_names(
                "sum by (uid) (rate(rlagent_connections_denied_total{x=\"rlagent_y\"}[5m])) / rlagent:ratio + rlagent_connections_cap"
            ),
            ["rlagent_connections_denied_total", "rlagent_connections_cap"]
        );
    }

    #[test]
    fn every_shipped_query_reads_an_agent_metric_alerts_or_up() {
        let queries = all_queries();
        assert!(queries.len() >= 25, "{queries:?}");
        for q in &queries {
            assert!(
                !metric_names(q).is_empty() || q.starts_with("ALERTS{") || q.starts_with("up{"),
                "{q}"
            );
        }
    }
}
