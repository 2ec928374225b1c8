//! Bounding the per-UID series: only UIDs that matter are exported.

use std::{collections::HashMap, time::Duration};

use crate::observe::stats::Stats;

/// Keeps per-UID series to UIDs that matter: those with a cap, with live connections, or
/// whose counters moved within [`UID_ACTIVITY_WINDOW`]. Idle UIDs drop out, so the
/// number of series follows activity, not history.
#[derive(Default)]
pub struct UidActivity {
    last: HashMap<u32, (u64, std::time::Instant)>,
}

pub const UID_ACTIVITY_WINDOW: Duration = Duration::from_secs(300);

impl UidActivity {
    pub fn retain(&mut self, stats: &mut Stats, now: std::time::Instant) {
        stats.conns.retain(|c| {
            let total = c.admitted + c.denied.total() + c.would_deny.total() + c.events_dropped;
            let changed_at = match self.last.get(&c.uid) {
                Some((seen, at)) if *seen == total => *at,
                _ => now,
            };
            self.last.insert(c.uid, (total, changed_at));
            c.cap.is_some()
                || c.rate.is_some()
                || c.live > 0
                || now.duration_since(changed_at) < UID_ACTIVITY_WINDOW
        });
        // The events-received series follow their UID's.
        let kept: std::collections::BTreeSet<u32> = stats.conns.iter().map(|c| c.uid).collect();
        stats
            .events_received
            .retain(|(uid, _, _), _| kept.contains(uid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model::usage::UidConnStats, testing::uid_stats};

    fn uid(uid: u32, live: u64, cap: Option<u64>, admitted: u64) -> UidConnStats {
        uid_stats(uid, live, cap, admitted, 0)
    }

    #[test]
    fn idle_uids_drop_out_of_the_per_uid_series() {
        let mut activity = UidActivity::default();
        let start = std::time::Instant::now();
        let scrape =
            |activity: &mut UidActivity, at: std::time::Instant, conns: Vec<UidConnStats>| {
                let mut stats = Stats {
                    conns,
                    ..Stats::default()
                };
                activity.retain(&mut stats, at);
                stats.conns.iter().map(|c| c.uid).collect::<Vec<_>>()
            };
        let all = || {
            vec![
                uid(1, 0, None, 5),
                uid(2, 0, Some(4), 5),
                uid(3, 2, None, 5),
            ]
        };
        assert_eq!(
            scrape(&mut activity, start, all()),
            vec![1, 2, 3],
            "new activity is shown"
        );
        let later = start + UID_ACTIVITY_WINDOW + Duration::from_secs(1);
        assert_eq!(
            scrape(&mut activity, later, all()),
            vec![2, 3],
            "idle UID 1 drops out; caps and live stay"
        );
        let mut busy = all();
        busy[0].admitted = 6;
        assert_eq!(
            scrape(&mut activity, later, busy),
            vec![1, 2, 3],
            "it comes back when it connects"
        );
    }
}
