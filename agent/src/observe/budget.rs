//! Bounded resources and what happens when one runs out: every refusal is counted (the
//! metric `rlagent_budget_exhausted_total{budget}`), and logged at most once a minute per
//! budget, so a flood cannot flood the log either.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// The budgets the agent keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Control socket clients of users (root and operators have a reserve of their own).
    ControlClients,
    /// Control socket clients of root and operators, reserve included.
    ControlReserve,
    /// Connections to the metrics listener.
    MetricsConnections,
}

impl Budget {
    const ALL: [Self; 3] = [
        Self::ControlClients,
        Self::ControlReserve,
        Self::MetricsConnections,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ControlClients => "control_clients",
            Self::ControlReserve => "control_reserve",
            Self::MetricsConnections => "metrics_connections",
        }
    }
}

/// Refusal counters, shared by everything that enforces a budget.
#[derive(Debug, Default)]
pub struct Budgets {
    refused: [AtomicU64; 3],
    last_logged: [AtomicU64; 3],
}

impl Budgets {
    /// Counts one refusal of `budget` (`limit` is its size, for the log line).
    pub fn exhausted(&self, budget: Budget, limit: usize) {
        let i = budget as usize;
        self.refused[i].fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_logged[i].load(Ordering::Relaxed);
        if now >= last + 60
            && self.last_logged[i]
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                budget = budget.name(),
                limit,
                "budget exhausted: refusing new connections (counted in rlagent_budget_exhausted_total; logged at most once a minute)"
            );
        }
    }

    /// Refusals so far, by budget name.
    pub fn refused(&self) -> BTreeMap<String, u64> {
        Budget::ALL
            .iter()
            .map(|b| {
                (
                    b.name().to_string(),
                    self.refused[*b as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_per_budget() {
        let budgets = Budgets::default();
        for _ in 0..3 {
            budgets.exhausted(Budget::MetricsConnections, 64);
        }
        budgets.exhausted(Budget::ControlClients, 448);
        let refused = budgets.refused();
        assert_eq!(refused["metrics_connections"], 3);
        assert_eq!(refused["control_clients"], 1);
        assert_eq!(refused["control_reserve"], 0);
    }
}
