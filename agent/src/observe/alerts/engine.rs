//! The alert engine: rules evaluated against the Stats model at a fixed interval.
//!
//! A rule names a stat, a comparison, a threshold, a `for` duration, a severity and a
//! summary template. Each (rule, target) pair is an alert: inactive → pending (condition
//! true) → firing (true for at least `for`) → resolved (false again; reported once).
//! Counter stats use the increase over a window, kept from earlier evaluations, so "any
//! denial in the last minute" and "any OOM kill" mean what they say. Time is passed in
//! (`now`), so the engine is tested with a fake clock.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use super::history::History;
use crate::{
    model::{
        alert::{Alert, Rule, Stat, State},
        usage::UidConnStats,
    },
    observe::stats::Stats,
};

/// A counter the engine keeps the history of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Counter {
    Denials,
    RateDenials,
    WouldDeny,
    CpuThrottled,
    CpuPeriods,
    EventsLost,
    OomKills,
}

/// Whose counter: a UID's, a cgroup target's, or the agent's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Subject {
    Uid(u32),
    Target(String),
    Agent,
}

/// One counter series: the counter, whose it is, and the window a rule reads it over
/// (two rules with different windows keep two histories).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    counter: Counter,
    subject: Subject,
    window: Duration,
}

/// When an evaluation measures, and over which window a rule reads its counters.
#[derive(Debug, Clone, Copy)]
struct At {
    now: Duration,
    window: Duration,
}

pub struct Engine {
    rules: Vec<Rule>,
    /// Evaluations so far: series that appear after the first one are new and count from
    /// zero; at the first, counters may predate the agent (pinned maps survive restarts).
    evaluations: u64,
    /// (rule, target) → (state, since, last value).
    active: BTreeMap<(String, String), (State, Duration, f64)>,
    history: BTreeMap<Series, History>,
    /// Counter series measured in the current evaluation; the others are gone (a target
    /// removed, a UID no longer reported) and their history is dropped.
    touched: BTreeSet<Series>,
}

impl Engine {
    pub fn new(rules: Vec<Rule>) -> Self {
        Self {
            rules,
            evaluations: 0,
            active: BTreeMap::new(),
            history: BTreeMap::new(),
            touched: BTreeSet::new(),
        }
    }

    /// The increase of `counter` of `subject` over `window` (see [`History::increase`]).
    fn increase(
        &mut self,
        counter: Counter,
        subject: Subject,
        now: Duration,
        value: f64,
        window: Duration,
    ) -> f64 {
        let fresh = self.evaluations > 0;
        let series = Series {
            counter,
            subject,
            window,
        };
        self.touched.insert(series.clone());
        self.history
            .entry(series)
            .or_default()
            .increase(now, value, window, fresh)
    }

    /// Values of `stat` per target at `now`: gauges as they are, counters as their
    /// increase over `window`.
    fn measure(
        &mut self,
        stat: Stat,
        window: Duration,
        stats: &Stats,
        now: Duration,
    ) -> Vec<(String, f64)> {
        let at = At { now, window };
        match stat {
            Stat::MemoryUsageRatio => stats
                .targets
                .iter()
                .filter_map(|t| {
                    let m = t.cgroup.memory?;
                    let max = m.max.filter(|m| *m > 0)?;
                    Some((t.target.clone(), m.current as f64 / max as f64))
                })
                .collect(),
            Stat::ConnsRatio => stats
                .conns
                .iter()
                .filter_map(|c| {
                    let cap = c.cap.filter(|c| *c > 0)?;
                    Some((format!("user:{}", c.uid), c.live as f64 / cap as f64))
                })
                .collect(),
            Stat::PinsMissing => stats
                .pins_missing
                .map(|missing| ("agent".to_string(), missing as f64))
                .into_iter()
                .collect(),
            Stat::PenaltyTier => {
                // One alert per user: the highest tier of the enforcing rules it is in.
                let mut tiers: std::collections::BTreeMap<&str, usize> = Default::default();
                for p in stats.penalties.iter().filter(|p| !p.monitor) {
                    let t = tiers.entry(&p.target).or_default();
                    *t = (*t).max(p.tier);
                }
                tiers
                    .into_iter()
                    .map(|(target, tier)| (target.to_string(), tier as f64))
                    .collect()
            }
            Stat::MapFillRatio => stats
                .host
                .iter()
                .flat_map(|h| &h.maps)
                .map(|m| (m.map.clone(), m.ratio()))
                .collect(),
            Stat::ConnDenials => self.per_uid(Counter::Denials, stats, at, |c| c.denied.total()),
            Stat::RateDenials => self.per_uid(Counter::RateDenials, stats, at, |c| {
                c.denied.rate + c.denied.group_rate
            }),
            Stat::WouldDeny => {
                self.per_uid(Counter::WouldDeny, stats, at, |c| c.would_deny.total())
            }
            Stat::CpuThrottledRatio => self.throttled_ratios(stats, at),
            Stat::EventsLost => match &stats.host {
                Some(host) => {
                    let lost = host.events_lost as f64;
                    let inc =
                        self.increase(Counter::EventsLost, Subject::Agent, at.now, lost, at.window);
                    vec![("agent".to_string(), inc)]
                }
                None => Vec::new(),
            },
            Stat::OomKills => stats
                .targets
                .iter()
                .filter_map(|t| {
                    let m = t.cgroup.memory?;
                    let subject = Subject::Target(t.target.clone());
                    let kills = m.events_oom_kill as f64;
                    let inc = self.increase(Counter::OomKills, subject, at.now, kills, at.window);
                    Some((t.target.clone(), inc))
                })
                .collect(),
        }
    }

    /// The increase of a per-UID counter (`value` of a UID's stats), by UID.
    fn per_uid(
        &mut self,
        counter: Counter,
        stats: &Stats,
        at: At,
        value: impl Fn(&UidConnStats) -> u64,
    ) -> Vec<(String, f64)> {
        stats
            .conns
            .iter()
            .map(|c| {
                let total = value(c) as f64;
                let inc = self.increase(counter, Subject::Uid(c.uid), at.now, total, at.window);
                (format!("user:{}", c.uid), inc)
            })
            .collect()
    }

    /// Throttled periods over periods with runnable tasks, both over the window, by target.
    fn throttled_ratios(&mut self, stats: &Stats, at: At) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for t in &stats.targets {
            let Some(cpu) = t.cgroup.cpu else { continue };
            let subject = Subject::Target(t.target.clone());
            let throttled = cpu.nr_throttled as f64;
            let throttled = self.increase(
                Counter::CpuThrottled,
                subject.clone(),
                at.now,
                throttled,
                at.window,
            );
            let periods = cpu.nr_periods as f64;
            let periods = self.increase(Counter::CpuPeriods, subject, at.now, periods, at.window);
            if periods > 0.0 {
                out.push((t.target.clone(), throttled / periods));
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
            let mut seen = BTreeSet::new();
            for (target, value) in values {
                let key = (rule.name.clone(), target.clone());
                seen.insert(key.clone());
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
                .range((rule.name.clone(), String::new())..)
                .map(|(k, _)| k)
                .take_while(|k| k.0 == rule.name)
                .filter(|k| !seen.contains(*k))
                .cloned()
                .collect();
            for key in gone {
                if let Some((State::Firing, since, value)) = self.active.remove(&key) {
                    transitions.push(self.alert(rule, &key.1, State::Resolved, since, value));
                }
            }
        }
        let touched = std::mem::take(&mut self.touched);
        self.history.retain(|key, _| touched.contains(key));
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
        model::{
            alert::default_rules,
            usage::{CpuStats, MemoryStats},
        },
        testing::{group_stats, uid_stats},
    };

    fn stats(memory_current: u64, oom: u64, denied: u64, throttled: u64, periods: u64) -> Stats {
        let cpu = CpuStats {
            nr_throttled: throttled,
            nr_periods: periods,
            ..CpuStats::default()
        };
        let memory = MemoryStats {
            current: memory_current,
            max: Some(100),
            events_oom_kill: oom,
            ..MemoryStats::default()
        };
        Stats {
            targets: vec![group_stats("batch", 1, cpu, memory)],
            conns: vec![uid_stats(1000, 1, Some(10), 1, denied)],
            ..Stats::default()
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
        at_start.conns.push(uid_stats(2000, 0, None, 0, 1));
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

    #[test]
    fn history_is_bounded_per_series_and_dropped_for_vanished_series() {
        let mut e = Engine::new(default_rules());
        let mut many = stats(0, 0, 0, 0, 0);
        many.conns = (0..1000).map(|uid| uid_stats(uid, 0, None, 0, 0)).collect();
        for second in 0..300 {
            e.evaluate(&many, s(second));
        }
        let samples: usize = e.history.values().map(History::len).sum();
        // Three series per UID (denials, rate denials, would-denies) plus the agent's and
        // one cgroup target's, each bounded by its resolution.
        assert!(
            samples <= 3005 * (super::super::history::RESOLUTION as usize + 2),
            "{samples}"
        );
        many.conns.truncate(10);
        e.evaluate(&many, s(300));
        let denial_series = e
            .history
            .keys()
            .filter(|k| k.counter == Counter::Denials)
            .count();
        assert_eq!(denial_series, 10, "series of vanished UIDs are dropped");
    }
}
