//! The denial event log: each event the programs send becomes a warning log line, a
//! per-UID and per-reason count, an entry in a bounded ring of recent events (`rlctl
//! events`, `rlctl why`), and a line to every `rlctl events --follow`.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Mutex,
};

use crate::model::{event::DenialEvent, reason::Reason};

/// Recent events kept for `rlctl events` and `rlctl why`.
pub const RECENT_EVENTS: usize = 1024;

/// Events received, by (uid, reason, monitor).
pub type Received = BTreeMap<(u32, Reason, bool), u64>;

pub struct EventLog {
    /// The recent events, and the number the next one gets.
    recent: Mutex<(VecDeque<DenialEvent>, u64)>,
    received: Mutex<Received>,
    stream: tokio::sync::broadcast::Sender<DenialEvent>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            recent: Mutex::new((VecDeque::with_capacity(RECENT_EVENTS), 1)),
            received: Mutex::default(),
            stream: tokio::sync::broadcast::channel(RECENT_EVENTS).0,
        }
    }
}

impl EventLog {
    /// Numbers, logs, counts, keeps and streams one event.
    pub fn record(&self, mut event: DenialEvent) {
        let group = event.group.as_deref().unwrap_or("-");
        let what = if event.monitor {
            "connect() would be denied (monitor mode, let through)"
        } else {
            "connect() denied"
        };
        // The process named itself: the log's field format escapes every field (a
        // newline in it would otherwise be a forged log line), so it goes in as it is.
        tracing::warn!(
            target: "rlagent::denial",
            uid = event.uid,
            pid = event.pid,
            comm = %event.comm,
            group,
            reason = %event.reason,
            limit = event.limit,
            destination = %event.destination,
            errno = event.errno,
            "{what}"
        );
        *lock(&self.received)
            .entry((event.uid, event.reason, event.monitor))
            .or_default() += 1;
        let mut recent = lock(&self.recent);
        event.seq = recent.1;
        recent.1 += 1;
        if recent.0.len() == RECENT_EVENTS {
            recent.0.pop_front();
        }
        recent.0.push_back(event.clone());
        // Sent under the lock, so the stream's order is the numbers' order.
        // No receiver is not an error: nobody follows the stream.
        let _ = self.stream.send(event);
        drop(recent);
    }

    /// The last `limit` events (of `uid` only, when given), oldest first.
    pub fn recent(&self, uid: Option<u32>, limit: usize) -> Vec<DenialEvent> {
        last(&lock(&self.recent).0, uid, limit)
    }

    /// The last `limit` events (of `uid`, when given) and the stream of every later one:
    /// taken together, so no event is in both or in neither.
    pub fn follow(
        &self,
        uid: Option<u32>,
        limit: usize,
    ) -> (
        Vec<DenialEvent>,
        tokio::sync::broadcast::Receiver<DenialEvent>,
    ) {
        let recent = lock(&self.recent);
        (last(&recent.0, uid, limit), self.stream.subscribe())
    }

    pub fn received(&self) -> Received {
        lock(&self.received).clone()
    }
}

/// The last `limit` of `events` (of `uid`, when given), oldest first.
fn last(events: &VecDeque<DenialEvent>, uid: Option<u32>, limit: usize) -> Vec<DenialEvent> {
    let mut events: Vec<DenialEvent> = events
        .iter()
        .rev()
        .filter(|e| uid.is_none_or(|u| e.uid == u))
        .take(limit)
        .cloned()
        .collect();
    events.reverse();
    events
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(uid: u32, reason: Reason) -> DenialEvent {
        DenialEvent {
            seq: 0,
            time_ms: 0,
            uid,
            pid: 1,
            comm: "x".into(),
            group: None,
            reason,
            monitor: false,
            limit: 1,
            destination: "127.0.0.1:1".into(),
            errno: 1,
        }
    }

    #[test]
    fn the_ring_keeps_the_latest_and_filters_by_uid() {
        let log = EventLog::default();
        let (before, mut follow) = log.follow(None, 10);
        assert!(before.is_empty());
        for i in 0..RECENT_EVENTS {
            log.record(event(1000 + (i % 2) as u32, Reason::Cap));
        }
        assert_eq!(log.recent(None, usize::MAX).len(), RECENT_EVENTS);
        let mine = log.recent(Some(1001), 3);
        assert_eq!(mine.len(), 3);
        assert!(mine.iter().all(|e| e.uid == 1001));
        assert_eq!(follow.try_recv().unwrap().uid, 1000);
        for i in 0..10 {
            log.record(event(1000 + i % 2, Reason::Cap));
        }
        assert_eq!(log.recent(None, usize::MAX).len(), RECENT_EVENTS);
        assert_eq!(log.received()[&(1000, Reason::Cap, false)], 517);
    }
}
