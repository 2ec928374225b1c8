//! The rules' state as the agent keeps it between rounds.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::Engine;
use crate::model::{
    adapt::{PenaltyRule, Step},
    users::UserDb,
};

/// How long a user's groups are remembered for `exempt = ["@group"]`.
const GROUPS_TTL: Duration = Duration::from_secs(60);

/// The rules' state in the agent: the engine, the steps last handed to the agent, and
/// the users' groups for exemptions.
#[derive(Debug, Default)]
pub struct Run {
    pub engine: Engine,
    pub steps: Vec<Step>,
    /// Each user's groups (primary and supplementary), with when they were read.
    groups: BTreeMap<u32, (Instant, Vec<u32>)>,
}

impl Run {
    /// Whether `rule` leaves `uid` alone: listed by UID, or a member of a listed group.
    pub fn exempt(&mut self, rule: &PenaltyRule, uid: u32, users: &dyn UserDb) -> bool {
        if rule.exempt_uids.contains(&uid) {
            return true;
        }
        if rule.exempt_gids.is_empty() {
            return false;
        }
        let now = Instant::now();
        let fresh = self
            .groups
            .get(&uid)
            .is_some_and(|(at, _)| now.duration_since(*at) < GROUPS_TTL);
        if !fresh {
            let groups = users.groups_of(uid).unwrap_or_else(|e| {
                tracing::warn!(
                    uid,
                    "cannot read the user's groups for a penalty's exempt list: {e}"
                );
                Vec::new()
            });
            self.groups.insert(uid, (now, groups));
        }
        self.groups[&uid]
            .1
            .iter()
            .any(|g| rule.exempt_gids.contains(g))
    }
}
