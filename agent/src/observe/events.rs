//! The denial event log: each event the programs send becomes a per-UID and per-reason
//! count, an entry in a bounded ring of recent events (`rlctl events`, `rlctl why`), a
//! line to every `rlctl events --follow`, and a warning log line, the first of each UID,
//! reason and mode in a second; the others of that second are summed up in one line
//! (see [`EventLog::flush`]).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::model::{event::DenialEvent, reason::Reason};

/// Recent events kept for `rlctl events` and `rlctl why`.
pub const RECENT_EVENTS: usize = 1024;

/// Events received, by (uid, reason, monitor).
pub type Received = BTreeMap<(u32, Reason, bool), u64>;

/// Of the events of one UID, reason and mode, one log line per this much time; the rest
/// are counted and summed up in one line when it has passed. A flood of denials (a loop
/// calling connect(), tens of thousands a second) would otherwise cost the agent a
/// formatted line and a write each, and flood the journal, which drops lines past its own
/// rate limit without saying which.
pub const LOG_WINDOW: Duration = Duration::from_secs(1);

/// The log lines of one UID, reason and mode: when its window opened (with a line), and
/// the events since that were not logged one by one.
struct Window {
    opened: Instant,
    unlogged: u64,
}

pub struct EventLog {
    /// The recent events, and the number the next one gets.
    recent: Mutex<(VecDeque<DenialEvent>, u64)>,
    received: Mutex<Received>,
    stream: tokio::sync::broadcast::Sender<DenialEvent>,
    windows: Mutex<Windows>,
}

/// The open log windows, by (uid, reason, monitor); closed ones are removed by
/// [`EventLog::flush`], which last looked at them at `flushed`.
#[derive(Default)]
struct Windows {
    open: HashMap<(u32, Reason, bool), Window>,
    flushed: Option<Instant>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            recent: Mutex::new((VecDeque::with_capacity(RECENT_EVENTS), 1)),
            received: Mutex::default(),
            stream: tokio::sync::broadcast::channel(RECENT_EVENTS).0,
            windows: Mutex::default(),
        }
    }
}

impl EventLog {
    /// Numbers, counts, keeps and streams one event, and logs it unless another of its
    /// UID, reason and mode was logged less than [`LOG_WINDOW`] ago.
    pub fn record(&self, event: DenialEvent) {
        self.record_at(event, Instant::now());
    }

    /// [`Self::record`] of an event taken in at `now` (one reading of the clock for a
    /// batch).
    pub fn record_at(&self, mut event: DenialEvent, now: Instant) {
        let key = (event.uid, event.reason, event.monitor);
        let log = match lock(&self.windows).open.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut open)
                if now.saturating_duration_since(open.get().opened) < LOG_WINDOW =>
            {
                open.get_mut().unlogged += 1;
                false
            }
            std::collections::hash_map::Entry::Occupied(mut closed) => {
                // Not flushed yet: its count goes out first, so lines stay in order.
                let unlogged = std::mem::take(&mut closed.get_mut().unlogged);
                log_unlogged(key, unlogged);
                closed.get_mut().opened = now;
                true
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(Window {
                    opened: now,
                    unlogged: 0,
                });
                true
            }
        };
        if log {
            log_event(&event);
        }
        *lock(&self.received).entry(key).or_default() += 1;
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

    /// Closes the log windows older than [`LOG_WINDOW`]: one line for each with events
    /// not logged one by one. Called after each batch of events and when none came for a
    /// window; it looks at the windows at most twice a window (so a flood of small batches
    /// does not walk every window each time), so a window is closed within about 2.5
    /// windows after it opened.
    pub fn flush(&self) {
        self.flush_at(Instant::now());
    }

    fn flush_at(&self, now: Instant) {
        let mut windows = lock(&self.windows);
        if windows
            .flushed
            .is_some_and(|last| now.saturating_duration_since(last) < LOG_WINDOW / 2)
        {
            return;
        }
        windows.flushed = Some(now);
        windows.open.retain(|key, window| {
            if now.saturating_duration_since(window.opened) < LOG_WINDOW {
                return true;
            }
            log_unlogged(*key, window.unlogged);
            false
        });
    }

    /// Whether a log window is open (then [`Self::flush`] has something to do later).
    pub fn windows_open(&self) -> bool {
        !lock(&self.windows).open.is_empty()
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

/// One event's warning line.
fn log_event(event: &DenialEvent) {
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
}

/// The line for the events of one window that were not logged one by one.
fn log_unlogged((uid, reason, monitor): (u32, Reason, bool), unlogged: u64) {
    if unlogged == 0 {
        return;
    }
    let what = if monitor {
        "more connect() calls would have been denied (monitor mode)"
    } else {
        "more connect() calls denied"
    };
    tracing::warn!(
        target: "rlagent::denial",
        uid,
        reason = %reason,
        unlogged,
        "{what} within a second of the last line, not logged one by one (counted in rlagent_connection_events_total; rlctl events shows the latest)"
    );
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

    /// What a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_line_per_uid_reason_and_mode_a_window_and_the_rest_summed_up_in_one() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        let log = EventLog::default();
        let t0 = Instant::now();
        let after = |ms: u64| t0 + Duration::from_millis(ms);
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100 {
                log.record_at(event(1000, Reason::Cap), after(i));
            }
            log.record_at(event(1001, Reason::Cap), after(0));
            log.record_at(event(1000, Reason::Rate), after(0));
            let mut monitor = event(1000, Reason::Cap);
            monitor.monitor = true;
            log.record_at(monitor, after(0));
            log.flush_at(after(600));
            assert!(log.windows_open(), "no window is a second old yet");
            // Looked at less than half a window ago: not looked at again.
            log.flush_at(after(1050));
            assert!(log.windows_open());
            log.flush_at(after(1100));
            assert!(!log.windows_open(), "every window closed");
            log.record_at(event(1000, Reason::Cap), after(1200));
            log.record_at(event(1000, Reason::Cap), after(1300));
            // Not flushed: the next line of the window says what the last one left out.
            log.record_at(event(1000, Reason::Cap), after(2300));
        });
        let text = String::from_utf8(lock(&captured.0).clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let denied = |uid: u32, reason: &str| {
            lines
                .iter()
                .filter(|l| {
                    l.contains("connect() denied")
                        && l.contains(&format!("uid={uid} "))
                        && l.contains(&format!("reason={reason} "))
                })
                .count()
        };
        assert_eq!(denied(1000, "cap"), 3, "{text}");
        assert_eq!(
            (denied(1001, "cap"), denied(1000, "rate")),
            (1, 1),
            "{text}"
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("would be denied"))
                .count(),
            1,
            "{text}"
        );
        let summed: Vec<&&str> = lines.iter().filter(|l| l.contains("unlogged=")).collect();
        assert_eq!(summed.len(), 2, "{text}");
        assert!(
            summed[0].contains("uid=1000") && summed[0].contains("unlogged=99"),
            "{text}"
        );
        assert!(summed[1].contains("unlogged=1"), "{text}");
        assert_eq!(lines.len(), 8, "{text}");
        assert_eq!(log.received()[&(1000, Reason::Cap, false)], 103);
        assert_eq!(
            log.recent(None, usize::MAX).len(),
            106,
            "each event is kept"
        );
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
