//! The adaptive rules and the penalty box in the agent: one round a second reads the
//! host's pressure and the users' usage, runs the state machines
//! ([`crate::observe::adapt::Engine`]) and applies the steps in force through the one
//! apply path ([`super::reconcile::Agent::set_steps`]).

use std::{collections::BTreeMap, time::SystemTime};

use super::{app::App, error::AppError};
use crate::{
    model::{
        adapt::UserSignal,
        target::{Target, UserRef},
    },
    observe::adapt::{
        fleet::{alerts, Payload},
        Change, Decision, Inputs, Penalty, Run,
    },
};

fn unix_now() -> std::time::Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

impl App {
    /// One round of the adaptive rules and penalties: reads what their conditions need,
    /// says each change (a warning), and enforces the steps in force. Blocking.
    pub fn adapt_round(&self) -> Result<Vec<Decision>, AppError> {
        let snapshot = self.snapshot();
        let config = &snapshot.config;
        let (adapt, penalty) = (&config.adapt_rules, &config.penalty_rules);
        // What the rules read, before the rules' lock is taken.
        let mut inputs = Inputs::default();
        if !adapt.is_empty() {
            inputs.host = self.observer.host_pressure();
        }
        let signals: Vec<UserSignal> = penalty.iter().flat_map(|r| r.when.signals()).collect();
        if !signals.is_empty() {
            inputs.users = self.observer.user_usage(&config.layout(), &signals);
        }
        if signals.contains(&UserSignal::DenialsPerMin) {
            for uid in self.observer.conn_usage()?.unwrap_or_default().per_uid {
                let total = uid.denied.total();
                inputs.users.entry(uid.uid).or_default().denied = Some(total);
            }
        }
        let mut run = self.adapt.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.started.elapsed();
        let users = self.users.clone();
        let uid_min = config.bpf.uid_min;
        let Run { engine, groups, .. } = &mut *run;
        // Root and system users are never penalised, as they get no `user:*` default.
        let mut decisions = engine.round(now, adapt, penalty, &inputs, &mut |rule, uid| {
            uid < uid_min || groups.exempt(rule, uid, users.as_ref())
        });
        decisions.extend(
            run.fleet
                .expire(now, penalty, config.penalty_webhook.is_some()),
        );
        self.commit(&mut run, &decisions, "adaptive rules and penalties")?;
        Ok(decisions)
    }

    /// Says `decisions` and hands the steps now in force to the agent, when they changed.
    fn commit(
        &self,
        run: &mut Run,
        decisions: &[Decision],
        what: &'static str,
    ) -> Result<(), AppError> {
        let snapshot = self.snapshot();
        let config = &snapshot.config;
        let steps = run.all_steps(&config.adapt_rules, &config.penalty_rules);
        // Held while steps are wanted or in force (a failed apply is tried again).
        let held = !steps.is_empty() || !run.steps.is_empty() || !run.fleet.is_empty();
        let applied = if steps == run.steps {
            Ok(())
        } else {
            self.with_agent(what, |agent| agent.set_steps(steps.clone()))
                .map(|_| run.steps = steps)
        };
        self.adapt_held
            .store(held, std::sync::atomic::Ordering::Relaxed);
        // Said once applied: a change that could not be applied is not called done (the
        // steps are tried again at the next round).
        for d in decisions {
            say(d, applied.is_ok());
        }
        applied
    }

    /// Applies the alerts of an Alertmanager webhook (see [`crate::observe::adapt::fleet`]),
    /// checked against the rules in force now; every alert's target must be a user of
    /// this host's user database. An alert for a user the rule exempts, or below
    /// `uid_min`, is skipped and counted (`exempt`), as locally such a user is never
    /// penalised. Returns the changes and the number skipped. Blocking.
    pub fn fleet_alerts(&self, payload: &Payload) -> Result<(Vec<Decision>, usize), AppError> {
        let snapshot = self.snapshot();
        let config = &snapshot.config;
        let Some(webhook) = &config.penalty_webhook else {
            return Ok((Vec::new(), 0));
        };
        let rules = &config.penalty_rules;
        let mut resolved = Vec::new();
        for a in alerts(payload, rules)? {
            let target = self.resolve_target(&a.target)?;
            let Target::User(UserRef::Uid(uid)) = target else {
                return Err(AppError::FleetTarget {
                    alertname: a.alertname,
                    target: target.to_string(),
                });
            };
            resolved.push((uid, a));
        }
        let mut run = self.adapt.lock().unwrap_or_else(|p| p.into_inner());
        let mut skipped = 0;
        resolved.retain(|(uid, a)| {
            // A resolution is always taken: it can only lift.
            let exempt = a.firing
                && (*uid < config.bpf.uid_min
                    || rules.iter().any(|r| {
                        r.name == a.rule && run.groups.exempt(r, *uid, self.users.as_ref())
                    }));
            if exempt {
                skipped += 1;
                self.webhook_refused(
                    "exempt",
                    &format!(
                        "alert {}: user:{uid} is exempt from {} or below uid_min",
                        a.alertname, a.rule
                    ),
                );
            }
            !exempt
        });
        let now = self.started.elapsed();
        let decisions = run.fleet.apply(now, &resolved, rules, webhook.max_duration);
        self.commit(&mut run, &decisions, "fleet penalties")?;
        Ok((decisions, skipped))
    }

    /// The penalised users now.
    pub fn penalties(&self) -> Vec<Penalty> {
        let snapshot = self.snapshot();
        let run = self.adapt.lock().unwrap_or_else(|p| p.into_inner());
        run.penalties(
            &snapshot.config.penalty_rules,
            self.started.elapsed(),
            unix_now(),
        )
    }

    /// Lifts every penalty of `uid` and enforces what is left. Blocking.
    pub fn release_penalty(&self, uid: u32) -> Result<Vec<Decision>, AppError> {
        let snapshot = self.snapshot();
        let config = &snapshot.config;
        let mut run = self.adapt.lock().unwrap_or_else(|p| p.into_inner());
        let mut lifted = run.engine.release(uid, &config.penalty_rules);
        lifted.extend(run.fleet.release(uid, &config.penalty_rules));
        self.commit(&mut run, &lifted, "lifting a penalty")?;
        Ok(lifted)
    }

    /// True when the rules need a round: some exist, or steps of removed ones are in force.
    /// Takes no lock: it runs on the runtime's thread, while a round may hold `adapt`
    /// through an apply.
    pub fn adapt_wanted(&self) -> bool {
        let config = &self.snapshot().config;
        !config.adapt_rules.is_empty()
            || !config.penalty_rules.is_empty()
            || self.adapt_held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts a refused webhook request by `kind`, and logs it at most once a minute (an
    /// unauthenticated sender must not fill the log).
    pub fn webhook_refused(&self, kind: &str, why: &str) {
        let mut r = self
            .webhook_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *r.0.entry(kind.to_string()).or_default() += 1;
        let now = std::time::Instant::now();
        if r.1
            .is_none_or(|last| now.duration_since(last) >= std::time::Duration::from_secs(60))
        {
            r.1 = Some(now);
            let total: u64 = r.0.values().sum();
            tracing::warn!(
                kind,
                refused_so_far = total,
                "penalty webhook request refused: {} (logged at most once a minute)",
                crate::model::text::escaped(why)
            );
        }
    }

    /// Penalties entered since the start, by (rule, tier).
    pub fn penalties_entered(&self) -> BTreeMap<(String, usize), u64> {
        let run = self.adapt.lock().unwrap_or_else(|p| p.into_inner());
        run.engine.entered.clone()
    }

    /// The adaptive rules whose step holds, with why.
    pub fn adapt_holding(&self) -> Vec<(String, String)> {
        let run = self.adapt.lock().unwrap_or_else(|p| p.into_inner());
        run.engine.active_adapt()
    }
}

/// A decision as a log line: a warning when limits tighten or are lifted.
fn say(d: &Decision, applied: bool) {
    let tier = d.tier.map(|t| t.to_string()).unwrap_or_default();
    let mode = if d.monitor { "monitor" } else { "enforce" };
    // The reason may quote an alert name from Alertmanager.
    let reason = crate::model::text::escaped(&d.reason);
    if !applied && !d.monitor {
        tracing::error!(
            source = %d.source,
            target = %d.target,
            tier,
            %reason,
            "decided, but applying the limits failed (tried again every round): {}",
            message(d)
        );
        return;
    }
    match d.change {
        Change::Applied | Change::Escalated | Change::Lifted => tracing::warn!(
            source = %d.source,
            target = %d.target,
            tier,
            mode,
            %reason,
            "{}",
            message(d)
        ),
        Change::Released => tracing::info!(
            source = %d.source,
            target = %d.target,
            tier,
            mode,
            %reason,
            "{}",
            message(d)
        ),
    }
}

fn message(d: &Decision) -> &'static str {
    match (d.change, d.monitor) {
        (Change::Applied, false) => "limits tightened",
        (Change::Applied, true) => "limits would tighten (monitor mode: nothing changed)",
        (Change::Escalated, false) => "penalty tier raised",
        (Change::Escalated, true) => "penalty tier would rise (monitor mode)",
        (Change::Released, _) => "step released",
        (Change::Lifted, _) => "penalty lifted by an operator",
    }
}
