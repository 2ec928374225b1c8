//! The adaptive rules and the penalty box in the agent: one round a second reads the
//! host's pressure and the users' usage, runs the state machines
//! ([`crate::observe::adapt::Engine`]) and applies the steps in force through the one
//! apply path ([`super::reconcile::Agent::set_steps`]).

use std::{collections::BTreeMap, time::SystemTime};

use super::{app::App, error::AppError};
use crate::{
    model::adapt::UserSignal,
    observe::adapt::{Change, Decision, Inputs, Penalty},
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
        let mut run = self.adapt.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.started.elapsed();
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
        let mut engine = std::mem::take(&mut run.engine);
        let users = self.users.clone();
        let decisions = engine.round(now, adapt, penalty, &inputs, &mut |rule, uid| {
            run.exempt(rule, uid, users.as_ref())
        });
        let steps = engine.steps(adapt, penalty);
        run.engine = engine;
        for d in &decisions {
            say(d);
        }
        if steps != run.steps {
            self.with_agent("adaptive rules and penalties", |agent| {
                agent.set_steps(steps.clone())
            })?;
            run.steps = steps;
        }
        Ok(decisions)
    }

    /// The penalised users now.
    pub fn penalties(&self) -> Vec<Penalty> {
        let snapshot = self.snapshot();
        let run = self.adapt.lock().unwrap_or_else(|p| p.into_inner());
        run.engine.penalties(
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
        let lifted = run.engine.release(uid, &config.penalty_rules);
        let steps = run.engine.steps(&config.adapt_rules, &config.penalty_rules);
        for d in &lifted {
            say(d);
        }
        if steps != run.steps {
            self.with_agent("lifting a penalty", |agent| agent.set_steps(steps.clone()))?;
            run.steps = steps;
        }
        Ok(lifted)
    }

    /// True when the rules need a round: some exist, or steps of removed ones are in force.
    pub fn adapt_wanted(&self) -> bool {
        let config = &self.snapshot().config;
        !config.adapt_rules.is_empty()
            || !config.penalty_rules.is_empty()
            || !self
                .adapt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .steps
                .is_empty()
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
fn say(d: &Decision) {
    let tier = d.tier.map(|t| t.to_string()).unwrap_or_default();
    let mode = if d.monitor { "monitor" } else { "enforce" };
    match d.change {
        Change::Applied | Change::Escalated | Change::Lifted => tracing::warn!(
            source = %d.source,
            target = %d.target,
            tier,
            mode,
            reason = %d.reason,
            "{}",
            message(d)
        ),
        Change::Released => tracing::info!(
            source = %d.source,
            target = %d.target,
            tier,
            mode,
            reason = %d.reason,
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
