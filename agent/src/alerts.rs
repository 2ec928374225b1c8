//! The alert engine: rules evaluated against the Stats model at a fixed interval.
//!
//! A rule names a stat, a comparison, a threshold, a `for` duration, a severity and a
//! summary template. Each (rule, target) pair is an alert: inactive → pending (condition
//! true) → firing (true for at least `for`) → resolved (false again; reported once).
//! Counter stats use the increase over a window, kept from earlier evaluations, so "any
//! denial in the last minute" and "any OOM kill" mean what they say. Time is passed in
//! (`now`), so the engine is tested with a fake clock.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::stats::Stats;

/// What a rule measures, per target (cgroup targets) or per UID (connection stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    /// memory.current / memory.max (targets with a memory limit).
    MemoryUsageRatio,
    /// Live connections / cap (UIDs with a cap).
    ConnsRatio,
    /// Connections denied (cap or host cap) over the window.
    ConnDenials,
    /// Throttled CPU periods / periods over the window (targets with CPU activity).
    CpuThrottledRatio,
    /// OOM kills over the window.
    OomKills,
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
    fn holds(self, value: f64, threshold: f64) -> bool {
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
        f.write_str(match self {
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

/// Counter samples of one series, oldest first.
#[derive(Default)]
struct History(VecDeque<(Duration, f64)>);

impl History {
    /// Records `value` at `now` and returns the increase over `window` (a counter reset,
    /// such as a recreated cgroup, counts from zero).
    /// `new_from_zero`: a series first seen now counts from zero (it appeared since the
    /// last evaluation), rather than from its current value.
    fn increase(
        &mut self,
        now: Duration,
        value: f64,
        window: Duration,
        keep: Duration,
        new_from_zero: bool,
    ) -> f64 {
        if self.0.is_empty() && new_from_zero {
            self.0.push_back((now, 0.0));
        }
        self.0.push_back((now, value));
        while self
            .0
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > keep)
        {
            self.0.pop_front();
        }
        let base = self
            .0
            .iter()
            .find(|(t, _)| now.saturating_sub(*t) <= window)
            .map_or(value, |(_, v)| *v);
        if value >= base {
            value - base
        } else {
            value
        }
    }
}

pub struct Engine {
    rules: Vec<Rule>,
    /// Evaluations so far: series that appear after the first one are new and count from
    /// zero; at the first, counters may predate the agent (pinned maps survive restarts).
    evaluations: u64,
    /// (rule, target) → (state, since, last value).
    active: BTreeMap<(String, String), (State, Duration, f64)>,
    history: BTreeMap<String, History>,
}

impl Engine {
    pub fn new(rules: Vec<Rule>) -> Self {
        Self {
            rules,
            evaluations: 0,
            active: BTreeMap::new(),
            history: BTreeMap::new(),
        }
    }

    /// Values of `stat` per target at `now`.
    fn measure(
        &mut self,
        stat: Stat,
        window: Duration,
        stats: &Stats,
        now: Duration,
    ) -> Vec<(String, f64)> {
        let keep = Duration::from_secs(900);
        let fresh = self.evaluations > 0;
        let mut out = Vec::new();
        match stat {
            Stat::MemoryUsageRatio => {
                for t in &stats.targets {
                    if let Some(m) = t.cgroup.memory {
                        if let Some(max) = m.max.filter(|m| *m > 0) {
                            out.push((t.target.clone(), m.current as f64 / max as f64));
                        }
                    }
                }
            }
            Stat::ConnsRatio => {
                for c in &stats.conns {
                    if let Some(cap) = c.cap.filter(|c| *c > 0) {
                        out.push((format!("user:{}", c.uid), c.live as f64 / cap as f64));
                    }
                }
            }
            Stat::ConnDenials => {
                for c in &stats.conns {
                    let key = format!("denials/{}/{}", c.uid, window.as_secs());
                    let total = (c.denied_cap + c.denied_host) as f64;
                    let inc = self
                        .history
                        .entry(key)
                        .or_default()
                        .increase(now, total, window, keep, fresh);
                    out.push((format!("user:{}", c.uid), inc));
                }
            }
            Stat::CpuThrottledRatio => {
                for t in &stats.targets {
                    let Some(cpu) = t.cgroup.cpu else { continue };
                    let throttled = self
                        .history
                        .entry(format!("throttled/{}/{}", t.target, window.as_secs()))
                        .or_default()
                        .increase(now, cpu.nr_throttled as f64, window, keep, fresh);
                    let periods = self
                        .history
                        .entry(format!("periods/{}/{}", t.target, window.as_secs()))
                        .or_default()
                        .increase(now, cpu.nr_periods as f64, window, keep, fresh);
                    if periods > 0.0 {
                        out.push((t.target.clone(), throttled / periods));
                    }
                }
            }
            Stat::OomKills => {
                for t in &stats.targets {
                    let Some(m) = t.cgroup.memory else { continue };
                    let inc = self
                        .history
                        .entry(format!("oom/{}/{}", t.target, window.as_secs()))
                        .or_default()
                        .increase(now, m.events_oom_kill as f64, window, keep, fresh);
                    out.push((t.target.clone(), inc));
                }
            }
        }
        out
    }

    /// Evaluates every rule; returns the transitions (to pending, firing, resolved).
    pub fn evaluate(&mut self, stats: &Stats, now: Duration) -> Vec<Alert> {
        let mut transitions = Vec::new();
        let rules = self.rules.clone();
        for rule in &rules {
            let values = self.measure(rule.stat, rule.window, stats, now);
            let mut seen = Vec::new();
            for (target, value) in values {
                let key = (rule.name.clone(), target.clone());
                seen.push(key.clone());
                let holds = rule.op.holds(value, rule.threshold);
                let current = self.active.get(&key).copied();
                let next = match (current, holds) {
                    (None | Some((State::Resolved, ..)), true) if rule.for_duration.is_zero() => {
                        Some((State::Firing, now))
                    }
                    (None | Some((State::Resolved, ..)), true) => Some((State::Pending, now)),
                    (Some((State::Pending, since, _)), true)
                        if now.saturating_sub(since) >= rule.for_duration =>
                    {
                        Some((State::Firing, since))
                    }
                    (Some((state, since, _)), true) => {
                        self.active.insert(key.clone(), (state, since, value));
                        None
                    }
                    (Some((State::Firing, since, _)), false) => Some((State::Resolved, since)),
                    (Some((State::Pending, ..)), false) => {
                        self.active.remove(&key);
                        None
                    }
                    (Some((State::Resolved, ..)), false) => {
                        self.active.remove(&key);
                        None
                    }
                    (None, false) => None,
                };
                if let Some((state, since)) = next {
                    self.active.insert(key, (state, since, value));
                    transitions.push(self.alert(rule, &target, state, since, value));
                }
            }
            // A target that disappeared while firing resolves.
            let gone: Vec<(String, String)> = self
                .active
                .keys()
                .filter(|k| k.0 == rule.name && !seen.contains(k))
                .cloned()
                .collect();
            for key in gone {
                if let Some((State::Firing, since, value)) = self.active.remove(&key) {
                    transitions.push(self.alert(rule, &key.1, State::Resolved, since, value));
                }
            }
        }
        self.evaluations += 1;
        transitions
    }

    fn alert(&self, rule: &Rule, target: &str, state: State, since: Duration, value: f64) -> Alert {
        let shown = if matches!(
            rule.stat,
            Stat::MemoryUsageRatio | Stat::ConnsRatio | Stat::CpuThrottledRatio
        ) {
            format!("{:.0}%", value * 100.0)
        } else {
            format!("{value}")
        };
        Alert {
            rule: rule.name.clone(),
            target: target.to_string(),
            severity: rule.severity.clone(),
            state,
            value,
            summary: rule
                .summary
                .replace("{target}", target)
                .replace("{value}", &shown),
            active_since_seconds: since.as_secs_f64(),
        }
    }

    /// Replaces the rules (after a reload), keeping the state of alerts whose rule still
    /// exists unchanged.
    pub fn set_rules(&mut self, rules: Vec<Rule>) {
        self.active.retain(|(name, _), _| {
            let old = self.rules.iter().find(|r| &r.name == name);
            old.is_some() && rules.iter().any(|r| Some(r) == old)
        });
        self.rules = rules;
    }

    /// Logs each transition once: firing as a warning, the others as info.
    pub fn log(transitions: &[Alert]) {
        for a in transitions {
            match a.state {
                State::Firing => {
                    tracing::warn!(alert = %a.rule, target = %a.target, severity = %a.severity, "firing: {}", a.summary)
                }
                State::Pending => {
                    tracing::info!(alert = %a.rule, target = %a.target, "pending: {}", a.summary)
                }
                State::Resolved => {
                    tracing::info!(alert = %a.rule, target = %a.target, "resolved: {}", a.summary)
                }
            }
        }
    }

    /// Alerts that are pending or firing now.
    pub fn current(&self) -> Vec<Alert> {
        self.active
            .iter()
            .filter(|(_, (state, ..))| *state != State::Resolved)
            .filter_map(|((name, target), (state, since, value))| {
                let rule = self.rules.iter().find(|r| &r.name == name)?;
                Some(self.alert(rule, target, *state, *since, *value))
            })
            .collect()
    }

    pub fn firing(&self) -> usize {
        self.active
            .values()
            .filter(|(s, ..)| *s == State::Firing)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cgroup::{cpu::CpuStats, driver::CgroupStats, memory::MemoryStats},
        stats::{TargetStats, UidConnStats},
    };

    fn stats(memory_current: u64, oom: u64, denied: u64, throttled: u64, periods: u64) -> Stats {
        Stats {
            targets: vec![TargetStats {
                target: "group:batch".into(),
                cgroup: CgroupStats {
                    cgroup: "rlagent.slice/batch".into(),
                    procs: 1,
                    cpu: Some(CpuStats {
                        nr_throttled: throttled,
                        nr_periods: periods,
                        ..CpuStats::default()
                    }),
                    cpu_max: None,
                    memory: Some(MemoryStats {
                        current: memory_current,
                        max: Some(100),
                        events_oom_kill: oom,
                        ..MemoryStats::default()
                    }),
                    pids: None,
                    cpu_pressure: None,
                    memory_pressure: None,
                },
            }],
            conns: vec![UidConnStats {
                uid: 1000,
                live: 1,
                cap: Some(10),
                admitted: 1,
                denied_cap: denied,
                denied_host: 0,
            }],
            host: None,
            placement_moves: 0,
            alerts_firing: 0,
            programs: vec![],
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn names(alerts: &[Alert]) -> Vec<(String, State)> {
        alerts.iter().map(|a| (a.rule.clone(), a.state)).collect()
    }

    #[test]
    fn memory_goes_pending_then_fires_after_for_then_resolves() {
        let mut e = Engine::new(default_rules());
        assert!(e.evaluate(&stats(50, 0, 0, 0, 0), s(0)).is_empty());
        let t = e.evaluate(&stats(90, 0, 0, 0, 0), s(10));
        assert_eq!(
            names(&t),
            vec![("RlagentMemoryNearLimit".into(), State::Pending)]
        );
        assert_eq!(t[0].summary, "group:batch uses 90% of its memory limit");
        assert!(
            e.evaluate(&stats(90, 0, 0, 0, 0), s(309)).is_empty(),
            "not yet 5 minutes"
        );
        let t = e.evaluate(&stats(91, 0, 0, 0, 0), s(310));
        assert_eq!(
            names(&t),
            vec![("RlagentMemoryNearLimit".into(), State::Firing)]
        );
        assert_eq!(e.firing(), 1);
        let t = e.evaluate(&stats(10, 0, 0, 0, 0), s(320));
        assert_eq!(
            names(&t),
            vec![("RlagentMemoryNearLimit".into(), State::Resolved)]
        );
        assert_eq!(e.firing(), 0);
        assert!(
            e.evaluate(&stats(10, 0, 0, 0, 0), s(330)).is_empty(),
            "resolved is reported once"
        );
        assert!(e.current().is_empty());
    }

    #[test]
    fn a_pending_alert_that_clears_before_for_never_fires() {
        let mut e = Engine::new(default_rules());
        e.evaluate(&stats(90, 0, 0, 0, 0), s(0));
        assert!(e.evaluate(&stats(10, 0, 0, 0, 0), s(100)).is_empty());
        assert!(e
            .evaluate(&stats(90, 0, 0, 0, 0), s(200))
            .iter()
            .all(|a| a.state == State::Pending));
    }

    #[test]
    fn counter_rules_use_the_increase_over_their_window() {
        let mut e = Engine::new(default_rules());
        e.evaluate(&stats(0, 0, 5, 0, 0), s(0));
        let t = e.evaluate(&stats(0, 1, 7, 0, 0), s(10));
        let got = names(&t);
        assert!(
            got.contains(&("RlagentConnectionsDenied".into(), State::Firing)),
            "{got:?}"
        );
        assert!(
            got.contains(&("RlagentOomKill".into(), State::Firing)),
            "{got:?}"
        );
        let denied = t
            .iter()
            .find(|a| a.rule == "RlagentConnectionsDenied")
            .unwrap();
        assert_eq!((denied.target.as_str(), denied.value), ("user:1000", 2.0));
        // No new denials for over a minute: resolved; the OOM kill stays for its 5 minutes.
        let t = e.evaluate(&stats(0, 1, 7, 0, 0), s(80));
        assert_eq!(
            names(&t),
            vec![("RlagentConnectionsDenied".into(), State::Resolved)]
        );
        let t = e.evaluate(&stats(0, 1, 7, 0, 0), s(320));
        assert_eq!(names(&t), vec![("RlagentOomKill".into(), State::Resolved)]);
    }

    #[test]
    fn a_series_that_appears_later_counts_from_zero_but_not_at_the_first_evaluation() {
        let mut e = Engine::new(default_rules());
        let mut at_start = stats(0, 0, 9, 0, 0);
        assert!(
            e.evaluate(&at_start, s(0)).is_empty(),
            "counts from before the agent started"
        );
        at_start.conns.push(UidConnStats {
            uid: 2000,
            live: 0,
            cap: None,
            admitted: 0,
            denied_cap: 1,
            denied_host: 0,
        });
        let t = e.evaluate(&at_start, s(5));
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(
            (t[0].rule.as_str(), t[0].target.as_str(), t[0].value),
            ("RlagentConnectionsDenied", "user:2000", 1.0)
        );
    }

    #[test]
    fn cpu_throttling_is_a_ratio_of_periods_in_the_window() {
        let mut e = Engine::new(default_rules());
        e.evaluate(&stats(0, 0, 0, 0, 0), s(0));
        let t = e.evaluate(&stats(0, 0, 0, 60, 100), s(30));
        assert_eq!(
            names(&t),
            vec![("RlagentCpuThrottled".into(), State::Pending)]
        );
        assert!((t[0].value - 0.6).abs() < 1e-9);
    }
}

/// Delivery to an Alertmanager (`POST /api/v2/alerts`). Runs in its own task fed by a
/// bounded queue: a slow or absent Alertmanager delays only this task, never evaluation
/// or enforcement. Each batch is retried 3 times with backoff; when the queue is full a
/// batch is dropped and counted in the log.
pub mod alertmanager {
    use std::time::{Duration, SystemTime};

    use serde_json::json;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        sync::mpsc,
    };

    use super::{Alert, State};

    /// `http://host:port[/prefix]` (plain HTTP, as Alertmanager listens by default).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Target {
        pub host_port: String,
        pub path: String,
    }

    pub fn parse_url(url: &str) -> Option<Target> {
        let rest = url.strip_prefix("http://")?;
        let (host_port, prefix) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        if host_port.is_empty() || !host_port.contains(':') {
            return None;
        }
        let prefix = prefix.trim_end_matches('/');
        let path = if prefix.is_empty() {
            "/api/v2/alerts".to_string()
        } else {
            format!("/{prefix}/api/v2/alerts")
        };
        Some(Target {
            host_port: host_port.to_string(),
            path,
        })
    }

    fn rfc3339(at: SystemTime) -> String {
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }

    /// The Alertmanager v2 body for `alerts` (resolved ones carry `endsAt` = now).
    pub fn body(alerts: &[Alert], started: SystemTime, now: SystemTime) -> String {
        let items: Vec<serde_json::Value> = alerts
            .iter()
            .filter(|a| a.state != State::Pending)
            .map(|a| {
                let starts = started + Duration::from_secs_f64(a.active_since_seconds);
                let mut item = json!({
                    "labels": { "alertname": a.rule, "target": a.target, "severity": a.severity, "source": "rlagent" },
                    "annotations": { "summary": a.summary },
                    "startsAt": rfc3339(starts),
                });
                if a.state == State::Resolved {
                    item["endsAt"] = json!(rfc3339(now));
                }
                item
            })
            .collect();
        serde_json::Value::Array(items).to_string()
    }

    async fn post(target: &Target, body: &str) -> Result<(), String> {
        let mut stream = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(&target.host_port),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            target.path,
            target.host_port,
            body.len()
        );
        let exchange = async {
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let status = String::from_utf8_lossy(&response)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        if status
            .split_whitespace()
            .nth(1)
            .is_some_and(|code| code.starts_with('2'))
        {
            Ok(())
        } else {
            Err(format!("answered {status:?}"))
        }
    }

    /// Starts the delivery task; send batches of alerts with [`Sender::send`].
    pub fn start(target: Target) -> Sender {
        let (tx, mut rx) = mpsc::channel::<String>(64);
        tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                let mut delay = Duration::from_secs(1);
                for attempt in 1..=3 {
                    match post(&target, &body).await {
                        Ok(()) => break,
                        Err(e) if attempt == 3 => {
                            tracing::warn!(alertmanager = %target.host_port, "dropping alerts after 3 attempts: {e}")
                        }
                        Err(_) => {
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                    }
                }
            }
        });
        Sender {
            tx,
            started: SystemTime::now(),
        }
    }

    #[derive(Clone)]
    pub struct Sender {
        tx: mpsc::Sender<String>,
        started: SystemTime,
    }

    impl Sender {
        /// Queues firing and resolved alerts; never waits.
        pub fn send(&self, alerts: &[Alert]) {
            if alerts.iter().all(|a| a.state == State::Pending) {
                return;
            }
            let body = body(alerts, self.started, SystemTime::now());
            if self.tx.try_send(body).is_err() {
                tracing::warn!("Alertmanager queue full; a batch of alerts was dropped");
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn urls_and_bodies() {
            assert_eq!(
                parse_url("http://127.0.0.1:9093"),
                Some(Target {
                    host_port: "127.0.0.1:9093".into(),
                    path: "/api/v2/alerts".into()
                })
            );
            assert_eq!(
                parse_url("http://am:9093/prefix/").unwrap().path,
                "/prefix/api/v2/alerts"
            );
            assert_eq!(parse_url("https://am:9093"), None);
            assert_eq!(parse_url("http://am"), None);
            assert_eq!(
                rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_779_571_096)),
                "2026-05-23T21:18:16Z"
            );
            assert_eq!(
                rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
                "2000-02-29T00:00:00Z"
            );
            let alert = |state| Alert {
                rule: "R".into(),
                target: "user:1".into(),
                severity: "info".into(),
                state,
                value: 1.0,
                summary: "s".into(),
                active_since_seconds: 10.0,
            };
            let t0 = SystemTime::UNIX_EPOCH;
            let b: serde_json::Value = serde_json::from_str(&body(
                &[
                    alert(State::Firing),
                    alert(State::Pending),
                    alert(State::Resolved),
                ],
                t0,
                t0 + Duration::from_secs(60),
            ))
            .unwrap();
            let items = b.as_array().unwrap();
            assert_eq!(items.len(), 2, "pending alerts are not sent");
            assert_eq!(items[0]["labels"]["alertname"], "R");
            assert_eq!(items[0]["startsAt"], "1970-01-01T00:00:10Z");
            assert!(items[0].get("endsAt").is_none());
            assert_eq!(items[1]["endsAt"], "1970-01-01T00:01:00Z");
        }
    }
}
