//! The state machines of `[[adapt]]` rules and the penalty box, on a clock they are given
//! (so tests run them on a fake one). Each round takes the host's pressure and every
//! user's usage, and returns what changed; [`Engine::steps`] is what the agent enforces
//! for them, one more source of desired state.

mod average;
pub mod fleet;
mod run;

use average::averaged;
pub use run::Run;

use std::{
    collections::{BTreeMap, VecDeque},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::model::{
    adapt::{AdaptRule, HostPressure, PenaltyRule, Step, UserSample},
    quota::Mode,
    target::{Target, UserRef},
};

/// What one round saw.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub host: HostPressure,
    pub users: BTreeMap<u32, UserSample>,
}

/// A change a round made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A step or a tier applies (or, in monitor mode, would).
    Applied,
    /// A penalised user crossed again at the end of a tier: the next tier.
    Escalated,
    /// The step or tier ended.
    Released,
    /// An operator lifted the penalty.
    Lifted,
}

/// One change, said in the log, the event stream and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub change: Change,
    /// `adapt:<rule>` or `penalty:<rule>`.
    pub source: String,
    pub target: String,
    /// The tier (penalties only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<usize>,
    /// The measured value and the threshold.
    pub reason: String,
    pub monitor: bool,
}

/// A penalised user, as `rlctl penalties` lists them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Penalty {
    pub target: String,
    pub rule: String,
    pub tier: usize,
    /// Seconds since the epoch.
    pub since: u64,
    pub until: u64,
    pub reason: String,
    pub monitor: bool,
}

#[derive(Debug, Clone, Default)]
struct AdaptState {
    active: bool,
    true_since: Option<Duration>,
    false_since: Option<Duration>,
    reason: String,
}

#[derive(Debug, Clone, Default)]
struct PenaltyState {
    /// The tier in force (1-based), 0 when none.
    tier: usize,
    since: Duration,
    until: Duration,
    reason: String,
    /// The last tier held, and when it ended or last decayed: a crossing within
    /// `forgive_after` of that enters the tier above it.
    last_tier: usize,
    last_end: Duration,
}

/// The rules' state between rounds.
#[derive(Debug, Default)]
pub struct Engine {
    adapt: BTreeMap<String, AdaptState>,
    /// By (rule, uid).
    penalties: BTreeMap<(String, u32), PenaltyState>,
    /// One sample per round per user, back to the longest window.
    history: BTreeMap<u32, VecDeque<(Duration, UserSample)>>,
    /// Penalties entered, by (rule, tier).
    pub entered: BTreeMap<(String, usize), u64>,
}

impl Engine {
    /// One round at `now` (a monotonic clock). `exempt(rule, uid)` says whether a
    /// penalty rule leaves a user alone.
    pub fn round(
        &mut self,
        now: Duration,
        adapt: &[AdaptRule],
        penalty: &[PenaltyRule],
        inputs: &Inputs,
        exempt: &mut dyn FnMut(&PenaltyRule, u32) -> bool,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        self.adapt.retain(|name, state| {
            let kept = adapt.iter().any(|r| r.name == *name);
            if !kept && state.active {
                out.push(Decision {
                    change: Change::Released,
                    source: format!("adapt:{name}"),
                    target: String::new(),
                    tier: None,
                    reason: "the rule is no longer in the config".to_string(),
                    monitor: false,
                });
            }
            kept
        });
        for rule in adapt {
            self.adapt_round(now, rule, &inputs.host, &mut out);
        }
        self.record(now, penalty, &inputs.users);
        // States of rules that are gone, and tiers past a reloaded rule's last, end here.
        self.penalties.retain(|(name, uid), state| {
            let rule = penalty.iter().find(|r| r.name == *name);
            let tiers = rule.map_or(0, |r| r.tiers.len());
            state.last_tier = state.last_tier.min(tiers);
            if state.tier > 0 && state.tier > tiers {
                out.push(Decision {
                    change: Change::Released,
                    source: format!("penalty:{name}"),
                    target: format!("user:{uid}"),
                    tier: Some(state.tier),
                    reason: "the rule or its tier is no longer in the config".to_string(),
                    monitor: rule.is_some_and(|r| r.mode == Mode::Monitor),
                });
                state.tier = 0;
            }
            tiers > 0
        });
        for rule in penalty {
            self.penalty_round(now, rule, exempt, &mut out);
        }
        out
    }

    fn adapt_round(
        &mut self,
        now: Duration,
        rule: &AdaptRule,
        host: &HostPressure,
        out: &mut Vec<Decision>,
    ) {
        let state = self.adapt.entry(rule.name.clone()).or_default();
        let held = rule.when.eval(|s| host.value(s));
        let decision = |change, reason: String| Decision {
            change,
            source: format!("adapt:{}", rule.name),
            target: rule.target.to_string(),
            tier: None,
            reason,
            monitor: rule.mode == Mode::Monitor,
        };
        match held {
            Some((why, value)) => {
                state.false_since = None;
                let since = *state.true_since.get_or_insert(now);
                if !state.active && now.saturating_sub(since) >= rule.hold {
                    state.active = true;
                    state.reason = format!(
                        "{} = {value:.2} (threshold {} {}) for {}s",
                        signal_text(why.text.as_str()),
                        why.cmp.symbol(),
                        why.threshold,
                        rule.hold.as_secs()
                    );
                    out.push(decision(Change::Applied, state.reason.clone()));
                }
            }
            None => {
                state.true_since = None;
                if state.active {
                    let since = *state.false_since.get_or_insert(now);
                    if now.saturating_sub(since) >= rule.release_after {
                        state.active = false;
                        state.false_since = None;
                        out.push(decision(
                            Change::Released,
                            format!(
                                "`{}` false for {}s",
                                rule.when,
                                rule.release_after.as_secs()
                            ),
                        ));
                    }
                }
            }
        }
    }

    /// Appends this round's samples and drops those older than every window needs.
    fn record(&mut self, now: Duration, rules: &[PenaltyRule], users: &BTreeMap<u32, UserSample>) {
        if rules.is_empty() {
            self.history.clear();
            return;
        }
        let keep =
            rules.iter().map(|r| r.window).max().unwrap_or_default() + Duration::from_secs(2);
        for (uid, sample) in users {
            self.history
                .entry(*uid)
                .or_default()
                .push_back((now, *sample));
        }
        self.history.retain(|uid, samples| {
            if !users.contains_key(uid) {
                // Gone (no cgroup, no counters): start afresh if it comes back.
                return false;
            }
            // Keep one sample at or before the longest window's start, as the baseline.
            while samples.len() > 1 && samples[1].0 + keep <= now {
                samples.pop_front();
            }
            true
        });
    }

    fn penalty_round(
        &mut self,
        now: Duration,
        rule: &PenaltyRule,
        exempt: &mut dyn FnMut(&PenaltyRule, u32) -> bool,
        out: &mut Vec<Decision>,
    ) {
        let monitor = rule.mode == Mode::Monitor;
        let source = format!("penalty:{}", rule.name);
        let mut uids: Vec<u32> = self.history.keys().copied().collect();
        uids.extend(
            self.penalties
                .keys()
                .filter(|(name, _)| *name == rule.name)
                .map(|(_, uid)| *uid),
        );
        uids.sort_unstable();
        uids.dedup();
        for uid in uids {
            let crossing = self
                .history
                .get(&uid)
                .and_then(|samples| {
                    rule.when
                        .eval(|s| averaged(samples, rule.window, s))
                        .map(|(why, value)| {
                            format!(
                                "{} = {} over {}s (threshold {} {})",
                                why.signal.name(),
                                why.signal.show(value),
                                rule.window.as_secs(),
                                why.cmp.symbol(),
                                why.signal.show(why.threshold)
                            )
                        })
                })
                // Asked only of users who cross: a look-up of groups may go to a directory.
                .filter(|_| !exempt(rule, uid));
            let key = (rule.name.clone(), uid);
            let state = self.penalties.entry(key.clone()).or_default();
            let decision = |change, tier, reason: &str| Decision {
                change,
                source: source.clone(),
                target: format!("user:{uid}"),
                tier,
                reason: reason.to_string(),
                monitor,
            };
            let mut enter = |state: &mut PenaltyState, tier: usize, reason: String| {
                state.tier = tier;
                state.since = now;
                state.until = now.saturating_add(rule.tiers[tier - 1].duration);
                state.reason = reason;
                *self.entered.entry((rule.name.clone(), tier)).or_default() += 1;
            };
            if state.tier > 0 {
                if now < state.until {
                    continue;
                }
                match crossing {
                    Some(reason) => {
                        let tier = (state.tier + 1).min(rule.tiers.len());
                        enter(state, tier, reason);
                        out.push(decision(Change::Escalated, Some(tier), &state.reason));
                    }
                    None => {
                        state.last_tier = state.tier;
                        state.last_end = now;
                        state.tier = 0;
                        out.push(decision(
                            Change::Released,
                            Some(state.last_tier),
                            &format!("tier {} ended", state.last_tier),
                        ));
                    }
                }
                continue;
            }
            // Good behaviour decays the remembered tier, one per `forgive_after`.
            while state.last_tier > 0
                && now.saturating_sub(state.last_end) >= rule.forgive_after(state.last_tier)
            {
                state.last_end = state
                    .last_end
                    .saturating_add(rule.forgive_after(state.last_tier));
                state.last_tier -= 1;
            }
            match crossing {
                Some(reason) => {
                    let tier = (state.last_tier + 1).min(rule.tiers.len());
                    enter(state, tier, reason);
                    out.push(decision(Change::Applied, Some(tier), &state.reason));
                }
                None if state.last_tier == 0 => {
                    self.penalties.remove(&key);
                }
                None => {}
            }
        }
    }

    /// Lifts every penalty `uid` is in now (an operator's `rlctl release`), forgetting
    /// those rules' tiers for it and its samples (a crossing then needs a whole new
    /// window, so the release is not undone by the usage that led to it); returns what
    /// was lifted.
    pub fn release(&mut self, uid: u32, rules: &[PenaltyRule]) -> Vec<Decision> {
        let mut out = Vec::new();
        self.penalties.retain(|(name, u), state| {
            // A user not penalised now keeps what is remembered of its last tier.
            if *u != uid || state.tier == 0 {
                return true;
            }
            {
                out.push(Decision {
                    change: Change::Lifted,
                    source: format!("penalty:{name}"),
                    target: format!("user:{uid}"),
                    tier: Some(state.tier),
                    reason: "lifted by an operator".to_string(),
                    monitor: rules
                        .iter()
                        .any(|r| r.name == *name && r.mode == Mode::Monitor),
                });
            }
            false
        });
        if !out.is_empty() {
            self.history.remove(&uid);
        }
        out
    }

    /// The steps in force (enforce mode only), for the desired state.
    pub fn steps(&self, adapt: &[AdaptRule], penalty: &[PenaltyRule]) -> Vec<Step> {
        let mut steps = Vec::new();
        for rule in adapt.iter().filter(|r| r.mode == Mode::Enforce) {
            if self.adapt.get(&rule.name).is_some_and(|s| s.active) {
                steps.push(Step {
                    target: rule.target.clone(),
                    source: format!("adapt:{}", rule.name),
                    quota: rule.step.clone(),
                });
            }
        }
        for ((name, uid), state) in &self.penalties {
            let Some(rule) = penalty.iter().find(|r| r.name == *name) else {
                continue;
            };
            let tier = state.tier.checked_sub(1).and_then(|i| rule.tiers.get(i));
            if let (Some(tier), Mode::Enforce) = (tier, rule.mode) {
                steps.push(Step {
                    target: Target::User(UserRef::Uid(*uid)),
                    source: format!("penalty:{name}"),
                    quota: tier.quota.clone(),
                });
            }
        }
        steps
    }

    /// The penalised users; `now` on the engine's clock is `wall` since the epoch.
    pub fn penalties(
        &self,
        penalty: &[PenaltyRule],
        now: Duration,
        wall: Duration,
    ) -> Vec<Penalty> {
        // The engine's clock started at `base` since the epoch.
        let base = wall.saturating_sub(now);
        let at = |t: Duration| (base + t).as_secs();
        self.penalties
            .iter()
            .filter(|(_, s)| s.tier > 0)
            .map(|((name, uid), s)| Penalty {
                target: format!("user:{uid}"),
                rule: name.clone(),
                tier: s.tier,
                since: at(s.since),
                until: at(s.until),
                reason: s.reason.clone(),
                monitor: penalty
                    .iter()
                    .any(|r| r.name == *name && r.mode == Mode::Monitor),
            })
            .collect()
    }

    /// The adaptive rules holding now, with why.
    pub fn active_adapt(&self) -> Vec<(String, String)> {
        self.adapt
            .iter()
            .filter(|(_, s)| s.active)
            .map(|(name, s)| (name.clone(), s.reason.clone()))
            .collect()
    }
}

/// A comparison's signal, from its text (`host.cpu.some_avg10 > 40` -> `host.cpu.some_avg10`).
fn signal_text(comparison: &str) -> &str {
    comparison.split_whitespace().next().unwrap_or(comparison)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::config;

    const RULES: &str = r#"
[[adapt]]
name = "busy-host"
when = "host.cpu.some_avg10 > 40"
for = "2s"
release_after = "5s"
target = "user:*"
cpu = "50%"

[[penalty]]
name = "cpu-hog"
when = "cpu > 80%"
window = "5s"
exempt = ["2002"]
forgive_after = "100s"
[[penalty.tier]]
cpu = "30%"
duration = "20s"
[[penalty.tier]]
cpu = "10%"
conns = 8
duration = "60s"
"#;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    struct World {
        engine: Engine,
        adapt: Vec<AdaptRule>,
        penalty: Vec<PenaltyRule>,
        /// Cumulative CPU per user, µs.
        cpu: BTreeMap<u32, u64>,
        psi: f64,
        now: u64,
    }

    impl World {
        fn new(text: &str) -> Self {
            let c = config(text);
            Self {
                engine: Engine::default(),
                adapt: c.adapt_rules,
                penalty: c.penalty_rules,
                cpu: BTreeMap::new(),
                psi: 0.0,
                now: 0,
            }
        }

        /// One second passes with each user using `share` of a CPU (percent).
        fn tick(&mut self, shares: &[(u32, u64)]) -> Vec<Decision> {
            self.now += 1;
            let mut inputs = Inputs::default();
            inputs.host.cpu = Some(crate::model::usage::Pressure {
                some_avg10: self.psi,
                ..Default::default()
            });
            for (uid, share) in shares {
                let used = self.cpu.entry(*uid).or_default();
                *used += share * 10_000;
                inputs.users.insert(
                    *uid,
                    UserSample {
                        cpu_usec: Some(*used),
                        ..Default::default()
                    },
                );
            }
            self.engine.round(
                s(self.now),
                &self.adapt,
                &self.penalty,
                &inputs,
                &mut |rule, uid| rule.exempt_uids.contains(&uid),
            )
        }

        /// Ticks until a decision comes, at most `limit` seconds; returns it and when.
        fn until_decision(&mut self, limit: u64, shares: &[(u32, u64)]) -> (u64, Decision) {
            for _ in 0..limit {
                if let Some(d) = self.tick(shares).into_iter().next() {
                    return (self.now, d);
                }
            }
            panic!("no decision within {limit}s (at {})", self.now);
        }
    }

    #[test]
    fn a_hog_enters_tier_one_within_its_window_climbs_on_a_repeat_and_decays() {
        let mut w = World::new(RULES);
        // Idle for a while: a baseline exists.
        for _ in 0..10 {
            assert!(w.tick(&[(2001, 0), (2002, 0)]).is_empty());
        }
        let start = w.now;
        // Two hogs: 200% of a CPU; bob (2002, exempt) the same.
        let (at, d) = w.until_decision(10, &[(2001, 200), (2002, 200)]);
        assert_eq!(
            (d.change, d.tier, d.target.as_str()),
            (Change::Applied, Some(1), "user:2001")
        );
        assert!(at - start <= 5, "tier 1 after {}s", at - start);
        assert!(
            d.reason.starts_with("cpu = ") && d.reason.contains("threshold > 80%"),
            "{}",
            d.reason
        );
        let steps = w.engine.steps(&w.adapt, &w.penalty);
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].source, "penalty:cpu-hog");
        assert_eq!(
            steps[0]
                .quota
                .text(crate::model::quota::Field::Cpu)
                .as_deref(),
            Some("30%")
        );
        // Held to 30% for the tier's 20 s, then released.
        let (at2, d) = w.until_decision(30, &[(2001, 30), (2002, 200)]);
        assert_eq!((d.change, at2 - at), (Change::Released, 20));
        assert!(w.engine.steps(&w.adapt, &w.penalty).is_empty());
        // Back to hogging soon after: tier 2.
        let (_, d) = w.until_decision(10, &[(2001, 200)]);
        assert_eq!((d.change, d.tier), (Change::Applied, Some(2)));
        // Still hogging when tier 2 ends: renewed at the top tier.
        let (_, d) = w.until_decision(70, &[(2001, 200)]);
        assert_eq!((d.change, d.tier), (Change::Escalated, Some(2)));
        let (_, d) = w.until_decision(70, &[(2001, 5)]);
        assert_eq!(d.change, Change::Released);
        // 100 s of good behaviour forgives one of the two tiers: the next hog is tier 2.
        for _ in 0..101 {
            assert!(w.tick(&[(2001, 5)]).is_empty());
        }
        let (_, d) = w.until_decision(10, &[(2001, 200)]);
        assert_eq!(d.tier, Some(2), "one of two tiers forgiven: {d:?}");
        assert_eq!(w.engine.entered[&("cpu-hog".to_string(), 2)], 3);
        // An operator lifts it; the user's samples go with it, so the usage that led to
        // it does not put the user back at the next round, and tier 1 comes next.
        let lifted = w.engine.release(2001, &w.penalty);
        assert_eq!(lifted[0].change, Change::Lifted);
        assert!(w.engine.steps(&w.adapt, &w.penalty).is_empty());
        assert!(
            w.tick(&[(2001, 200)]).is_empty(),
            "not undone by the old window"
        );
        let (_, d) = w.until_decision(10, &[(2001, 200)]);
        assert_eq!((d.change, d.tier), (Change::Applied, Some(1)));
        // Good behaviour forgives the tier remembered since (tier 1): tier 1 again.
        let (_, d) = w.until_decision(30, &[(2001, 5)]);
        assert_eq!(d.change, Change::Released);
        for _ in 0..201 {
            assert!(w.tick(&[(2001, 5)]).is_empty());
        }
        let (_, d) = w.until_decision(10, &[(2001, 200)]);
        assert_eq!(d.tier, Some(1), "tier 1 forgiven: {d:?}");
    }

    #[test]
    fn a_reload_that_drops_a_rule_or_its_tiers_ends_what_they_held() {
        let mut w = World::new(RULES);
        w.tick(&[(2001, 0)]);
        w.until_decision(10, &[(2001, 200)]);
        w.until_decision(30, &[(2001, 5)]);
        let (_, d) = w.until_decision(10, &[(2001, 200)]);
        assert_eq!(d.tier, Some(2));
        // The rule now has one tier: tier 2 ends at once (no index past the tiers), and
        // what is remembered is clamped to the tiers there are.
        let one_tier = RULES.replace(
            "[[penalty.tier]]\ncpu = \"10%\"\nconns = 8\nduration = \"60s\"\n",
            "",
        );
        w.penalty = config(&one_tier).penalty_rules;
        assert_eq!(w.penalty[0].tiers.len(), 1);
        // Still over `when`, the user enters the highest tier there is, in the same round.
        let out = w.tick(&[(2001, 200)]);
        let changes: Vec<_> = out.iter().map(|d| (d.change, d.tier)).collect();
        assert_eq!(
            changes,
            [(Change::Released, Some(2)), (Change::Applied, Some(1))],
            "{out:?}"
        );
        let steps = w.engine.steps(&w.adapt, &w.penalty);
        assert_eq!(
            steps[0]
                .quota
                .text(crate::model::quota::Field::Cpu)
                .as_deref(),
            Some("30%")
        );
        // The rule is gone: its penalty ends, said.
        w.penalty.clear();
        let out = w.tick(&[(2001, 200)]);
        assert_eq!(out[0].change, Change::Released, "{out:?}");
        assert!(w.engine.steps(&w.adapt, &w.penalty).is_empty());
    }

    #[test]
    fn an_adaptive_step_applies_after_for_and_releases_after_release_after() {
        let mut w = World::new(RULES);
        w.tick(&[]);
        w.psi = 55.0;
        let started = w.now;
        let (at, d) = w.until_decision(5, &[]);
        assert_eq!(
            (d.change, d.source.as_str(), d.target.as_str()),
            (Change::Applied, "adapt:busy-host", "user:*")
        );
        assert_eq!(at - started, 3, "true at the first round, held for 2 s");
        assert!(
            d.reason.contains("host.cpu.some_avg10 = 55.00"),
            "{}",
            d.reason
        );
        assert_eq!(
            w.engine.steps(&w.adapt, &w.penalty)[0].target,
            Target::AllUsers
        );
        // A dip shorter than release_after keeps it.
        w.psi = 10.0;
        for _ in 0..4 {
            assert!(w.tick(&[]).is_empty());
        }
        w.psi = 50.0;
        assert!(w.tick(&[]).is_empty());
        w.psi = 10.0;
        let left = w.now;
        let (at, d) = w.until_decision(10, &[]);
        assert_eq!((d.change, at - left), (Change::Released, 6));
    }

    #[test]
    fn monitor_mode_decides_the_same_and_enforces_nothing() {
        let mut w = World::new(
            &RULES
                .replace("window = \"5s\"", "window = \"5s\"\nmode = \"monitor\"")
                .replace("cpu = \"50%\"", "cpu = \"50%\"\nmode = \"monitor\""),
        );
        w.tick(&[(2001, 0)]);
        w.psi = 90.0;
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.extend(w.tick(&[(2001, 200)]));
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen
            .iter()
            .all(|d| d.monitor && d.change == Change::Applied));
        assert!(w.engine.steps(&w.adapt, &w.penalty).is_empty());
        let listed = w.engine.penalties(&w.penalty, s(w.now), s(1_000_000));
        assert_eq!(listed.len(), 1);
        assert!(listed[0].monitor);
        assert_eq!(listed[0].until - listed[0].since, 20);
    }
}
