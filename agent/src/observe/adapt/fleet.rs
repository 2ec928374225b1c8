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
        out.push(FleetAlert {
            firing,
            target,
            rule,
            tier: n,
            alertname,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone)]
struct Entry {
    tier: usize,
    since: Duration,
    until: Duration,
}

/// The fleet's penalties in force here, by (rule, uid, alert name): each alert holds its
/// own tier, and a user is in the highest tier any of its alerts holds for the rule.
#[derive(Debug, Default)]
pub struct Fleet {
    entries: BTreeMap<(String, u32, String), Entry>,
}

fn monitor(rules: &[PenaltyRule], name: &str) -> bool {
    rules
        .iter()
        .any(|r| r.name == name && r.mode == Mode::Monitor)
}

impl Fleet {
    /// Applies firing alerts (a new entry, a changed tier, or a later expiry: sending the
    /// same alert again only extends it) and lifts resolved ones, each alert its own
    /// entry. `uid` is each alert's target resolved; returns the changes.
    pub fn apply(
        &mut self,
        now: Duration,
        alerts: &[(u32, FleetAlert)],
        rules: &[PenaltyRule],
        max_duration: Duration,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        for (uid, a) in alerts {
            let key = (a.rule.clone(), *uid, a.alertname.clone());
            let decision = |change, tier| Decision {
                change,
                source: format!("penalty:{}", a.rule),
                target: format!("user:{uid}"),
                tier: Some(tier),
                reason: format!("fleet: alert {} from Alertmanager", a.alertname),
                monitor: monitor(rules, &a.rule),
            };
            if !a.firing {
                if let Some(e) = self.entries.remove(&key) {
                    out.push(decision(Change::Released, e.tier));
                }
                continue;
            }
            let until = now.saturating_add(max_duration);
            match self.entries.get_mut(&key) {
                Some(e) if e.tier == a.tier => e.until = until,
                previous => {
                    let change = match previous {
                        Some(e) if e.tier < a.tier => Change::Escalated,
                        Some(_) => Change::Released,
                        None => Change::Applied,
                    };
                    self.entries.insert(
                        key,
                        Entry {
                            tier: a.tier,
                            since: now,
                            until,
                        },
                    );
                    out.push(decision(change, a.tier));
                }
            }
        }
        out
    }

    /// Drops the entries of rules (or tiers) that are gone and those whose alert was not
    /// sent again within `max_duration`.
    pub fn expire(&mut self, now: Duration, rules: &[PenaltyRule]) -> Vec<Decision> {
        let mut out = Vec::new();
        self.entries.retain(|(rule, uid, alertname), e| {
            let known = rules
                .iter()
                .any(|r| r.name == *rule && e.tier <= r.tiers.len());
            if known && now < e.until {
                return true;
            }
            out.push(Decision {
                change: Change::Released,
                source: format!("penalty:{rule}"),
                target: format!("user:{uid}"),
                tier: Some(e.tier),
                reason: if known {
                    format!("fleet: alert {alertname} not sent again within max_duration")
                } else {
                    format!(
                        "fleet: alert {alertname}: the rule or its tier is no longer in the config"
                    )
                },
                monitor: monitor(rules, rule),
            });
            false
        });
        out
    }

    /// Lifts the entries of `uid` (an operator's `rlctl release`: until an alert is sent
    /// again).
    pub fn release(&mut self, uid: u32, rules: &[PenaltyRule]) -> Vec<Decision> {
        let mut out = Vec::new();
        self.entries.retain(|(rule, u, _), e| {
            if *u != uid {
                return true;
            }
            out.push(Decision {
                change: Change::Lifted,
                source: format!("penalty:{rule}"),
                target: format!("user:{uid}"),
                tier: Some(e.tier),
                reason: "lifted by an operator".to_string(),
                monitor: monitor(rules, rule),
            });
            false
        });
        out
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Each (rule, uid) with the highest tier of its alerts, and that entry.
    fn highest(&self) -> BTreeMap<(&str, u32), (&str, &Entry)> {
        let mut out: BTreeMap<(&str, u32), (&str, &Entry)> = BTreeMap::new();
        for ((rule, uid, alertname), e) in &self.entries {
            let slot = out.entry((rule.as_str(), *uid)).or_insert((alertname, e));
            if e.tier > slot.1.tier {
                *slot = (alertname, e);
            }
        }
        out
    }

    /// The steps in force (rules in enforce mode).
    pub fn steps(&self, rules: &[PenaltyRule]) -> Vec<Step> {
        self.highest()
            .into_iter()
            .filter_map(|((name, uid), (_, e))| {
                let rule = rules
                    .iter()
                    .find(|r| r.name == name && r.mode == Mode::Enforce)?;
                Some(Step {
                    target: Target::User(UserRef::Uid(uid)),
                    source: format!("penalty:{name}"),
                    quota: rule.tiers.get(e.tier.checked_sub(1)?)?.quota.clone(),
                })
            })
            .collect()
    }

    /// The fleet's penalties, on a clock that started at `base` since the epoch.
    pub fn penalties(&self, rules: &[PenaltyRule], base: Duration) -> Vec<Penalty> {
        self.highest()
            .into_iter()
            .map(|((rule, uid), (alertname, e))| Penalty {
                target: format!("user:{uid}"),
                rule: rule.to_string(),
                tier: e.tier,
                since: base.saturating_add(e.since).as_secs(),
                until: base.saturating_add(e.until).as_secs(),
                reason: format!("fleet: alert {alertname} from Alertmanager"),
                monitor: monitor(rules, rule),
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
            r#"{{"version":"4","status":"{status}","receiver":"rlagent","alerts":[{{"status":"{status}","labels":{{"alertname":"FleetHog",{labels}}},"annotations":{{}},"startsAt":"2026-12-08T00:00:00Z","endsAt":"0001-01-01T00:00:00Z","fingerprint":"x"}}]}}"#
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
                alertname: "FleetHog".into()
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

    #[test]
    fn a_firing_alert_applies_once_extends_on_repeats_and_ends_on_resolve_or_expiry() {
        let rules = config(RULES).penalty_rules;
        let mut fleet = Fleet::default();
        let a = |firing, tier| {
            vec![(
                1001,
                FleetAlert {
                    firing,
                    target: "user:1001".into(),
                    rule: "fleet-hog".into(),
                    tier,
                    alertname: "FleetHog".into(),
                },
            )]
        };
        let max = Duration::from_secs(100);
        let s = Duration::from_secs;
        assert_eq!(
            fleet.apply(s(0), &a(true, 1), &rules, max)[0].change,
            Change::Applied
        );
        assert!(
            fleet.apply(s(50), &a(true, 1), &rules, max).is_empty(),
            "idempotent"
        );
        assert_eq!(fleet.steps(&rules).len(), 1);
        assert!(
            fleet.expire(s(120), &rules).is_empty(),
            "extended to 150 s by the repeat"
        );
        assert_eq!(
            fleet.apply(s(121), &a(true, 2), &rules, max)[0].change,
            Change::Escalated
        );
        assert_eq!(fleet.penalties(&rules, s(1000))[0].until, 1221);
        assert_eq!(
            fleet.apply(s(130), &a(false, 2), &rules, max)[0].change,
            Change::Released
        );
        assert!(fleet.is_empty());
        fleet.apply(s(200), &a(true, 1), &rules, max);
        assert_eq!(fleet.expire(s(300), &rules)[0].change, Change::Released);
        assert!(fleet.steps(&rules).is_empty());
        // Two alerts of one rule: the higher tier holds, and each resolves on its own.
        let mut other = a(true, 2);
        other[0].1.alertname = "FleetHogHarder".into();
        fleet.apply(s(400), &a(true, 1), &rules, max);
        fleet.apply(s(400), &other, &rules, max);
        assert!(fleet.apply(s(410), &a(true, 1), &rules, max).is_empty());
        assert_eq!(
            fleet.penalties(&rules, s(0))[0].tier,
            2,
            "not loosened by a repeat of tier 1"
        );
        let cpu = |f: &Fleet| {
            f.steps(&rules)[0]
                .quota
                .text(crate::model::quota::Field::Cpu)
        };
        assert_eq!(cpu(&fleet).as_deref(), Some("20%"));
        fleet.apply(s(420), &a(false, 1), &rules, max);
        assert_eq!(
            cpu(&fleet).as_deref(),
            Some("20%"),
            "tier 1's resolution leaves tier 2"
        );
        // A reload that drops the tier ends the entry instead of indexing past the tiers.
        let one_tier =
            config(&RULES.replace("[[penalty.tier]]\ncpu = \"20%\"\nduration = \"1m\"\n", ""))
                .penalty_rules;
        assert!(fleet.steps(&one_tier).is_empty());
        assert_eq!(fleet.expire(s(430), &one_tier)[0].change, Change::Released);
        assert!(fleet.is_empty());
    }
}
