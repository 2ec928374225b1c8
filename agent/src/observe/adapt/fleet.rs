//! Fleet-wide penalties: decided by a PromQL rule over every node, delivered by
//! Alertmanager's webhook, applied here as a tier of a local `[[penalty]]` rule until the
//! alert resolves or `max_duration` passes without the alert being sent again.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::{Change, Decision, Penalty};
use crate::model::{
    adapt::{PenaltyRule, Step},
    quota::Mode,
    target::{Target, UserRef},
};

/// The largest webhook body read.
pub const MAX_WEBHOOK_BODY: usize = 64 * 1024;

/// Alertmanager's webhook payload (version 4), the parts read here.
#[derive(Debug, Deserialize)]
pub struct Payload {
    pub version: String,
    pub alerts: Vec<AmAlert>,
}

#[derive(Debug, Deserialize)]
pub struct AmAlert {
    pub status: String,
    pub labels: BTreeMap<String, String>,
    /// Alertmanager's identity of the alert (a hash of its labels).
    #[serde(default)]
    pub fingerprint: String,
}

/// One alert as the agent acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetAlert {
    pub firing: bool,
    /// `target` as the alert names it (`user:<uid|name>`), resolved by the caller.
    pub target: String,
    pub rule: String,
    pub tier: usize,
    pub alertname: String,
    /// What makes it one alert: Alertmanager's fingerprint, else its whole label set.
    pub identity: String,
}

/// Why an alert of a payload is refused (a label missing or naming nothing here).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("payload version {0:?}: expected Alertmanager's webhook version 4")]
    Version(String),
    #[error("alert {alertname:?} has no {label} label (the rule must set target, rule and tier)")]
    Missing {
        alertname: String,
        label: &'static str,
    },
    #[error("alert {alertname:?}: status {status:?}, expected firing or resolved")]
    Status { alertname: String, status: String },
    #[error("alert {alertname:?}: no [[penalty]] rule named {rule:?} on this host")]
    UnknownRule { alertname: String, rule: String },
    #[error("alert {alertname:?}: tier {tier:?} of rule {rule}, which has tiers 1 to {tiers}")]
    UnknownTier {
        alertname: String,
        rule: String,
        tier: String,
        tiers: usize,
    },
}

impl FleetError {
    /// A short name for the refusal counter.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Version(_) => "version",
            Self::Missing { .. } | Self::Status { .. } => "labels",
            Self::UnknownRule { .. } => "unknown_rule",
            Self::UnknownTier { .. } => "unknown_tier",
        }
    }
}

/// The alerts of `payload`, each checked against `rules`; the first bad one refuses all.
pub fn alerts(payload: &Payload, rules: &[PenaltyRule]) -> Result<Vec<FleetAlert>, FleetError> {
    if payload.version != "4" {
        return Err(FleetError::Version(payload.version.clone()));
    }
    let mut out = Vec::new();
    for a in &payload.alerts {
        let alertname = a.labels.get("alertname").cloned().unwrap_or_default();
        let label = |label| {
            a.labels.get(label).cloned().ok_or(FleetError::Missing {
                alertname: alertname.clone(),
                label,
            })
        };
        let (target, rule, tier) = (label("target")?, label("rule")?, label("tier")?);
        let firing = match a.status.as_str() {
            "firing" => true,
            "resolved" => false,
            _ => {
                return Err(FleetError::Status {
                    alertname,
                    status: a.status.clone(),
                })
            }
        };
        let Some(r) = rules.iter().find(|r| r.name == rule) else {
            return Err(FleetError::UnknownRule { alertname, rule });
        };
        let n = tier
            .parse::<usize>()
            .ok()
            .filter(|t| (1..=r.tiers.len()).contains(t))
            .ok_or_else(|| FleetError::UnknownTier {
                alertname: alertname.clone(),
                rule: rule.clone(),
                tier: tier.clone(),
                tiers: r.tiers.len(),
            })?;
        let identity = if a.fingerprint.is_empty() {
            a.labels
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join(",")
        } else {
            a.fingerprint.clone()
        };
        out.push(FleetAlert {
            firing,
            target,
            rule,
            tier: n,
            alertname,
            identity,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone)]
struct Entry {
    tier: usize,
    since: Duration,
    until: Duration,
    alertname: String,
}

/// The fleet's penalties in force here, each firing alert an entry keyed by (rule, uid,
/// the alert's identity); a user is in the highest tier any alert of the rule holds.
#[derive(Debug, Default)]
pub struct Fleet {
    entries: BTreeMap<(String, u32, String), Entry>,
}

fn monitor(rules: &[PenaltyRule], name: &str) -> bool {
    rules
        .iter()
        .any(|r| r.name == name && r.mode == Mode::Monitor)
}

/// The tier each (rule, uid) is in, with the entry that holds it.
type Held<'a> = BTreeMap<(String, u32), (usize, &'a Entry)>;

impl Fleet {
    /// Each (rule, uid) with the highest tier of its alerts that the rules still have.
    fn held(&self, rules: &[PenaltyRule]) -> Held<'_> {
        let mut out: Held<'_> = BTreeMap::new();
        for ((rule, uid, _), e) in &self.entries {
            let exists = rules
                .iter()
                .any(|r| r.name == *rule && e.tier <= r.tiers.len());
            if !exists {
                continue;
            }
            let slot = out.entry((rule.clone(), *uid)).or_insert((e.tier, e));
            if e.tier > slot.0 {
                *slot = (e.tier, e);
            }
        }
        out
    }

    /// The user's tier per rule before and after a change, as decisions: one per
    /// (rule, uid) whose tier changed.
    fn changes(
        before: BTreeMap<(String, u32), (usize, String)>,
        after: &Held<'_>,
        rules: &[PenaltyRule],
        why: &str,
    ) -> Vec<Decision> {
        let mut keys: Vec<&(String, u32)> = before.keys().chain(after.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for key in keys {
            let (rule, uid) = key;
            let was = before.get(key);
            let now = after.get(key);
            let decision = |change, tier, reason: String| Decision {
                change,
                source: format!("penalty:{rule}"),
                target: format!("user:{uid}"),
                tier: Some(tier),
                reason,
                monitor: monitor(rules, rule),
            };
            match (was, now) {
                (None, Some((t, e))) => out.push(decision(
                    Change::Applied,
                    *t,
                    format!("fleet: alert {} from Alertmanager", e.alertname),
                )),
                (Some((a, _)), Some((b, e))) if b > a => out.push(decision(
                    Change::Escalated,
                    *b,
                    format!("fleet: alert {} from Alertmanager", e.alertname),
                )),
                (Some((a, name)), Some((b, _))) if b < a => out.push(decision(
                    Change::Released,
                    *a,
                    format!("fleet: alert {name} {why}; tier {b} holds"),
                )),
                (Some((a, name)), None) => out.push(decision(
                    Change::Released,
                    *a,
                    format!("fleet: alert {name} {why}"),
                )),
                _ => {}
            }
        }
        out
    }

    fn snapshot(&self, rules: &[PenaltyRule]) -> BTreeMap<(String, u32), (usize, String)> {
        self.held(rules)
            .into_iter()
            .map(|(k, (t, e))| (k, (t, e.alertname.clone())))
            .collect()
    }

    /// Applies firing alerts (a new entry, a changed tier, or a later expiry: sending the
    /// same alert again only extends it) and removes resolved ones, each alert its own
    /// entry. `uid` is each alert's target resolved; returns how each user's tier changed.
    pub fn apply(
        &mut self,
        now: Duration,
        alerts: &[(u32, FleetAlert)],
        rules: &[PenaltyRule],
        max_duration: Duration,
    ) -> Vec<Decision> {
        let before = self.snapshot(rules);
        for (uid, a) in alerts {
            let key = (a.rule.clone(), *uid, a.identity.clone());
            if !a.firing {
                self.entries.remove(&key);
                continue;
            }
            let until = now.saturating_add(max_duration);
            match self.entries.get_mut(&key) {
                Some(e) if e.tier == a.tier => e.until = until,
                _ => {
                    self.entries.insert(
                        key,
                        Entry {
                            tier: a.tier,
                            since: now,
                            until,
                            alertname: a.alertname.clone(),
                        },
                    );
                }
            }
        }
        Self::changes(before, &self.held(rules), rules, "resolved")
    }

    /// Drops every entry when `enabled` is false (the webhook was removed: no resolution
    /// can arrive any more), the entries of rules or tiers that are gone, and those whose
    /// alert was not sent again within `max_duration`.
    pub fn expire(&mut self, now: Duration, rules: &[PenaltyRule], enabled: bool) -> Vec<Decision> {
        let before = self.snapshot(rules);
        self.entries.retain(|(rule, _, _), e| {
            enabled
                && now < e.until
                && rules
                    .iter()
                    .any(|r| r.name == *rule && e.tier <= r.tiers.len())
        });
        let why = if enabled {
            "not sent again within max_duration"
        } else {
            "no longer deliverable ([penalty_webhook] removed)"
        };
        // Entries of rules that are gone are not in `before` either: the reload that
        // removed the rule ended their limits.
        Self::changes(before, &self.held(rules), rules, why)
    }

    /// Lifts the entries of `uid` (an operator's `rlctl release`: until an alert is sent
    /// again).
    pub fn release(&mut self, uid: u32, rules: &[PenaltyRule]) -> Vec<Decision> {
        let mut out: Vec<Decision> = self
            .held(rules)
            .into_iter()
            .filter(|((_, u), _)| *u == uid)
            .map(|((rule, _), (tier, _))| Decision {
                change: Change::Lifted,
                source: format!("penalty:{rule}"),
                target: format!("user:{uid}"),
                tier: Some(tier),
                reason: "lifted by an operator".to_string(),
                monitor: monitor(rules, &rule),
            })
            .collect();
        self.entries.retain(|(_, u, _), _| *u != uid);
        out.sort_by(|a, b| a.source.cmp(&b.source));
        out
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The steps in force (rules in enforce mode).
    pub fn steps(&self, rules: &[PenaltyRule]) -> Vec<Step> {
        self.held(rules)
            .into_iter()
            .filter_map(|((name, uid), (tier, _))| {
                let rule = rules
                    .iter()
                    .find(|r| r.name == name && r.mode == Mode::Enforce)?;
                Some(Step {
                    target: Target::User(UserRef::Uid(uid)),
                    source: format!("penalty:{name}"),
                    quota: rule.tiers.get(tier.checked_sub(1)?)?.quota.clone(),
                })
            })
            .collect()
    }

    /// The fleet's penalties, on a clock that started at `base` since the epoch.
    pub fn penalties(&self, rules: &[PenaltyRule], base: Duration) -> Vec<Penalty> {
        self.held(rules)
            .into_iter()
            .map(|((rule, uid), (tier, e))| Penalty {
                target: format!("user:{uid}"),
                monitor: monitor(rules, &rule),
                rule,
                tier,
                since: base.saturating_add(e.since).as_secs(),
                until: base.saturating_add(e.until).as_secs(),
                reason: format!("fleet: alert {} from Alertmanager", e.alertname),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::config;

    const RULES: &str = "[[penalty]]\nname = \"fleet-hog\"\nwhen = \"cpu > 400%\"\nwindow = \"1m\"\n[[penalty.tier]]\ncpu = \"50%\"\nduration = \"1m\"\n[[penalty.tier]]\ncpu = \"20%\"\nduration = \"1m\"\n";

    fn payload(json: &str) -> Payload {
        serde_json::from_str(json).unwrap()
    }

    fn alert(status: &str, labels: &str) -> String {
        format!(
            r#"{{"version":"4","status":"{status}","receiver":"rlagent","alerts":[{{"status":"{status}","labels":{{"alertname":"FleetHog",{labels}}},"annotations":{{}},"startsAt":"2026-12-08T00:00:00Z","endsAt":"0001-01-01T00:00:00Z","fingerprint":"f1"}}]}}"#
        )
    }

    #[test]
    fn alerts_are_read_and_checked_against_the_local_rules() {
        let rules = config(RULES).penalty_rules;
        let ok = alerts(
            &payload(&alert(
                "firing",
                r#""target":"user:1001","rule":"fleet-hog","tier":"2""#,
            )),
            &rules,
        )
        .unwrap();
        assert_eq!(
            ok,
            vec![FleetAlert {
                firing: true,
                target: "user:1001".into(),
                rule: "fleet-hog".into(),
                tier: 2,
                alertname: "FleetHog".into(),
                identity: "f1".into(),
            }]
        );
        for (labels, kind) in [
            (r#""rule":"fleet-hog","tier":"1""#, "labels"),
            (
                r#""target":"user:1","rule":"nope","tier":"1""#,
                "unknown_rule",
            ),
            (
                r#""target":"user:1","rule":"fleet-hog","tier":"3""#,
                "unknown_tier",
            ),
            (
                r#""target":"user:1","rule":"fleet-hog","tier":"0""#,
                "unknown_tier",
            ),
        ] {
            let err = alerts(&payload(&alert("firing", labels)), &rules).unwrap_err();
            assert_eq!(err.kind(), kind, "{labels}: {err}");
        }
    }

    /// An alert of the rule for user 1001: `id` tells alerts apart.
    fn a(id: &str, firing: bool, tier: usize) -> Vec<(u32, FleetAlert)> {
        vec![(
            1001,
            FleetAlert {
                firing,
                target: "user:1001".into(),
                rule: "fleet-hog".into(),
                tier,
                alertname: "FleetHog".into(),
                identity: id.into(),
            },
        )]
    }

    fn changes(d: &[Decision]) -> Vec<(Change, Option<usize>)> {
        d.iter().map(|d| (d.change, d.tier)).collect()
    }

    #[test]
    fn a_firing_alert_applies_once_extends_on_repeats_and_ends_on_resolve_or_expiry() {
        let rules = config(RULES).penalty_rules;
        let mut fleet = Fleet::default();
        let max = Duration::from_secs(100);
        let s = Duration::from_secs;
        let apply = |f: &mut Fleet, t, alerts: Vec<(u32, FleetAlert)>| {
            changes(&f.apply(s(t), &alerts, &rules, max))
        };
        assert_eq!(
            apply(&mut fleet, 0, a("x", true, 1)),
            [(Change::Applied, Some(1))]
        );
        assert!(
            apply(&mut fleet, 50, a("x", true, 1)).is_empty(),
            "idempotent"
        );
        assert_eq!(fleet.steps(&rules).len(), 1);
        assert!(
            fleet.expire(s(120), &rules, true).is_empty(),
            "extended to 150 s"
        );
        assert_eq!(
            apply(&mut fleet, 121, a("x", true, 2)),
            [(Change::Escalated, Some(2))]
        );
        assert_eq!(fleet.penalties(&rules, s(1000))[0].until, 1221);
        assert_eq!(
            apply(&mut fleet, 130, a("x", false, 2)),
            [(Change::Released, Some(2))]
        );
        assert!(fleet.is_empty());
        apply(&mut fleet, 200, a("x", true, 1));
        assert_eq!(
            changes(&fleet.expire(s(300), &rules, true)),
            [(Change::Released, Some(1))]
        );
        assert!(fleet.steps(&rules).is_empty());
        // With the webhook removed, nothing can resolve what is held: it ends.
        apply(&mut fleet, 400, a("x", true, 1));
        assert_eq!(
            changes(&fleet.expire(s(401), &rules, false)),
            [(Change::Released, Some(1))]
        );
        assert!(fleet.is_empty());
    }

    #[test]
    fn alerts_of_one_rule_each_hold_their_tier_and_the_user_is_in_the_highest() {
        let rules = config(RULES).penalty_rules;
        let mut fleet = Fleet::default();
        let max = Duration::from_secs(100);
        let s = Duration::from_secs;
        let apply = |f: &mut Fleet, t, alerts: Vec<(u32, FleetAlert)>| {
            changes(&f.apply(s(t), &alerts, &rules, max))
        };
        let cpu = |f: &Fleet| {
            f.steps(&rules)
                .first()
                .and_then(|s| s.quota.text(crate::model::quota::Field::Cpu))
        };
        assert_eq!(
            apply(&mut fleet, 0, a("t2", true, 2)),
            [(Change::Applied, Some(2))]
        );
        // A tier-1 alert beside it changes nothing the user sees, and says nothing.
        assert!(apply(&mut fleet, 1, a("t1", true, 1)).is_empty());
        assert!(apply(&mut fleet, 2, a("t1", true, 1)).is_empty());
        assert_eq!(cpu(&fleet).as_deref(), Some("20%"));
        // Tier 1's resolution leaves tier 2; tier 2's, with tier 1 firing, lowers to it.
        assert!(apply(&mut fleet, 3, a("t1", false, 1)).is_empty());
        assert_eq!(cpu(&fleet).as_deref(), Some("20%"));
        apply(&mut fleet, 4, a("t1", true, 1));
        assert_eq!(
            apply(&mut fleet, 5, a("t2", false, 2)),
            [(Change::Released, Some(2))]
        );
        assert_eq!(cpu(&fleet).as_deref(), Some("50%"), "tier 1 still fires");
        // A reload that drops tier 2: its entries no longer count, at once.
        apply(&mut fleet, 6, a("t2", true, 2));
        let one_tier =
            config(&RULES.replace("[[penalty.tier]]\ncpu = \"20%\"\nduration = \"1m\"\n", ""))
                .penalty_rules;
        assert_eq!(fleet.penalties(&one_tier, s(0))[0].tier, 1);
        assert!(
            fleet.expire(s(7), &one_tier, true).is_empty(),
            "tier 1 held throughout"
        );
        let lifted = fleet.release(1001, &one_tier);
        assert_eq!(changes(&lifted), [(Change::Lifted, Some(1))]);
        assert!(fleet.is_empty());
    }
}
