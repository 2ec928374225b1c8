//! Alert vocabulary: what a rule measures and compares, the shipped default rules, and an
//! alert as reported. The engine that evaluates rules lives in `observe::alerts`.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

/// What a rule measures, per target (cgroup targets) or per UID (connection stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    /// memory.current / memory.max (targets with a memory limit).
    MemoryUsageRatio,
    /// Live connections / cap (UIDs with a cap).
    ConnsRatio,
    /// Connections denied (any reason) over the window.
    ConnDenials,
    /// Connections denied by a rate (the UID's or its group's) over the window.
    RateDenials,
    /// Connections a monitor-mode limit would have denied over the window.
    WouldDeny,
    /// Denial events lost because the ring buffer was full, over the window (target
    /// `agent`): the agent fell behind.
    EventsLost,
    /// Throttled CPU periods / periods over the window (targets with CPU activity).
    CpuThrottledRatio,
    /// OOM kills over the window.
    OomKills,
    /// Pins of the agent's programs and maps that are gone (target `agent`): with a link's
    /// pin, its program is detached; with a map's, the counts are lost at the next start.
    PinsMissing,
    /// Entries / capacity of each kernel map (target: the map's name).
    MapFillRatio,
    /// The penalty tier a user is in (`[[penalty]]` rules in enforce mode), per user and
    /// rule (target `user:<uid>`).
    PenaltyTier,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
}

impl Op {
    pub const ALL: [Self; 4] = [Self::Gt, Self::Ge, Self::Lt, Self::Le];

    /// As written in rules and conditions: `>`, `>=`, `<` or `<=`.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Gt => ">",
            Self::Ge => ">=",
            Self::Lt => "<",
            Self::Le => "<=",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.symbol() == text)
    }

    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Self::Gt => value > threshold,
            Self::Ge => value >= threshold,
            Self::Lt => value < threshold,
            Self::Le => value <= threshold,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    pub name: String,
    pub stat: Stat,
    pub op: Op,
    pub threshold: f64,
    /// How long the condition must hold before the alert fires.
    pub for_duration: Duration,
    /// For counter stats: the window the increase is taken over.
    pub window: Duration,
    pub severity: String,
    /// `{target}` and `{value}` are replaced.
    pub summary: String,
}

/// The rules shipped by default (deploy/prometheus/rlagent.rules.yml says the same in
/// PromQL).
pub fn default_rules() -> Vec<Rule> {
    let rule = |name: &str, stat, op, threshold, for_secs, severity: &str, summary: &str| Rule {
        name: name.to_string(),
        stat,
        op,
        threshold,
        for_duration: Duration::from_secs(for_secs),
        window: Duration::from_secs(60),
        severity: severity.to_string(),
        summary: summary.to_string(),
    };
    vec![
        rule(
            "RlagentMemoryNearLimit",
            Stat::MemoryUsageRatio,
            Op::Gt,
            0.85,
            300,
            "warning",
            "{target} uses {value} of its memory limit",
        ),
        rule(
            "RlagentConnectionsNearCap",
            Stat::ConnsRatio,
            Op::Gt,
            0.9,
            60,
            "warning",
            "{target} holds {value} of its connection cap",
        ),
        rule(
            "RlagentConnectionsDenied",
            Stat::ConnDenials,
            Op::Gt,
            0.0,
            0,
            "info",
            "{target} had {value} connections denied in the last minute",
        ),
        rule(
            "RlagentConnectionRateLimited",
            Stat::RateDenials,
            Op::Gt,
            0.0,
            0,
            "info",
            "{target} had {value} connections refused by a connection rate in the last minute",
        ),
        Rule {
            window: Duration::from_secs(300),
            ..rule(
                "RlagentConnectionsWouldDeny",
                Stat::WouldDeny,
                Op::Gt,
                0.0,
                0,
                "info",
                "{target} had {value} connections that monitor mode let through but enforce mode would deny, in the last 5 minutes",
            )
        },
        Rule {
            window: Duration::from_secs(300),
            ..rule(
                "RlagentDenialEventsLost",
                Stat::EventsLost,
                Op::Gt,
                0.0,
                0,
                "warning",
                "{value} denial events were lost in the last 5 minutes: the agent did not read the kernel's ring buffer fast enough (the denials themselves are counted)",
            )
        },
        rule(
            "RlagentCpuThrottled",
            Stat::CpuThrottledRatio,
            Op::Gt,
            0.5,
            300,
            "warning",
            "{target} was throttled in {value} of its CPU periods",
        ),
        Rule {
            window: Duration::from_secs(300),
            ..rule(
                "RlagentOomKill",
                Stat::OomKills,
                Op::Gt,
                0.0,
                0,
                "critical",
                "{target} had {value} OOM kills",
            )
        },
        rule(
            "RlagentPinsMissing",
            Stat::PinsMissing,
            Op::Gt,
            0.0,
            0,
            "critical",
            "{value} of the agent's pinned programs and maps are gone: connection caps may no longer be enforced (restart rlagent)",
        ),
        rule(
            "RlagentPenaltyApplied",
            Stat::PenaltyTier,
            Op::Gt,
            0.0,
            0,
            "warning",
            "{target} is in penalty tier {value}: its limits are tightened until the tier ends (rlctl penalties says why)",
        ),
        rule(
            "RlagentBpfMapFilling",
            Stat::MapFillRatio,
            Op::Gt,
            0.9,
            0,
            "warning",
            "kernel map {target} is {value} full: when it is full, capped UIDs are denied (on_full = deny) or let through uncounted",
        ),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Firing,
    Resolved,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Pending => "pending",
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        })
    }
}

/// One alert as reported (socket, log, Alertmanager).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub rule: String,
    pub target: String,
    pub severity: String,
    pub state: State,
    pub value: f64,
    pub summary: String,
    /// When the condition started holding (engine time, seconds).
    pub active_since_seconds: f64,
}

/// An Alertmanager to deliver to: `http://host:port[/prefix]` (plain HTTP, as
/// Alertmanager listens by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertmanagerUrl {
    pub host_port: String,
    /// The alerts endpoint, `[/prefix]/api/v2/alerts`.
    pub path: String,
}

impl AlertmanagerUrl {
    pub fn parse(url: &str) -> Option<Self> {
        let rest = url.strip_prefix("http://")?;
        let (host_port, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if host_port.is_empty() || !host_port.contains(':') {
            return None;
        }
        let prefix = prefix.trim_end_matches('/');
        let path = if prefix.is_empty() {
            "/api/v2/alerts".to_string()
        } else {
            format!("/{prefix}/api/v2/alerts")
        };
        Some(Self {
            host_port: host_port.to_string(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alertmanager_urls() {
        assert_eq!(
            AlertmanagerUrl::parse("http://127.0.0.1:9093"),
            Some(AlertmanagerUrl {
                host_port: "127.0.0.1:9093".into(),
                path: "/api/v2/alerts".into()
            })
        );
        assert_eq!(
            AlertmanagerUrl::parse("http://am:9093/prefix/")
                .unwrap()
                .path,
            "/prefix/api/v2/alerts"
        );
        assert_eq!(AlertmanagerUrl::parse("https://am:9093"), None);
        assert_eq!(AlertmanagerUrl::parse("http://am"), None);
    }
}
