//! The rules' state as the agent keeps it between rounds.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{fleet::Fleet, Engine, Penalty};
use crate::model::{
    adapt::{AdaptRule, PenaltyRule, Step},
    users::UserDb,
};

/// How long a user's groups are remembered for `exempt = ["@group"]`.
const GROUPS_TTL: Duration = Duration::from_secs(60);

/// The rules' state in the agent: the engine, the steps last handed to the agent, and
/// the users' groups for exemptions.
#[derive(Debug, Default)]
pub struct Run {
    pub engine: Engine,
    /// Penalties the fleet decided (Alertmanager's webhook).
    pub fleet: Fleet,
    pub steps: Vec<Step>,
    pub groups: Groups,
}

/// Each user's groups (primary and supplementary), with when they were read, for
/// `exempt = ["@group"]`.
#[derive(Debug, Default)]
pub struct Groups(BTreeMap<u32, (Instant, Vec<u32>)>);

impl Run {
    /// The steps in force: the local rules' and the fleet's.
    pub fn all_steps(&self, adapt: &[AdaptRule], penalty: &[PenaltyRule]) -> Vec<Step> {
        let mut steps = self.engine.steps(adapt, penalty);
        steps.extend(self.fleet.steps(penalty));
        steps
    }

    /// The penalised users, local and fleet, one line per user and rule (the higher tier
    /// where both hold); `now` on the engine's clock is `wall` since the epoch.
    pub fn penalties(&self, rules: &[PenaltyRule], now: Duration, wall: Duration) -> Vec<Penalty> {
        let mut by_key: BTreeMap<(String, String), Penalty> = BTreeMap::new();
        let base = wall.saturating_sub(now);
        let local = self.engine.penalties(rules, now, wall);
        for p in local.into_iter().chain(self.fleet.penalties(rules, base)) {
            let key = (p.target.clone(), p.rule.clone());
            match by_key.get(&key) {
                Some(held) if held.tier >= p.tier => {}
                _ => {
                    by_key.insert(key, p);
                }
            }
        }
        by_key.into_values().collect()
    }
}

impl Groups {
    /// Whether `rule` leaves `uid` alone: listed by UID, or a member of a listed group.
    /// Groups read more than a minute ago are read again; the entries of other users are
    /// dropped then, so the cache holds the users recently asked about.
    pub fn exempt(&mut self, rule: &PenaltyRule, uid: u32, users: &dyn UserDb) -> bool {
        if rule.exempt_uids.contains(&uid) {
            return true;
        }
        if rule.exempt_gids.is_empty() {
            return false;
        }
        let now = Instant::now();
        let fresh = self
            .0
            .get(&uid)
            .is_some_and(|(at, _)| now.duration_since(*at) < GROUPS_TTL);
        if !fresh {
            self.0
                .retain(|_, (at, _)| now.duration_since(*at) < GROUPS_TTL);
            let groups = users.groups_of(uid).unwrap_or_else(|e| {
                tracing::warn!(
                    uid,
                    "cannot read the user's groups for a penalty's exempt list: {e}"
                );
                Vec::new()
            });
            self.0.insert(uid, (now, groups));
        }
        self.0
            .get(&uid)
            .is_some_and(|(_, groups)| groups.iter().any(|g| rule.exempt_gids.contains(g)))
    }
}
