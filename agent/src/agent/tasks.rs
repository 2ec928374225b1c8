//! The agent's background loops, each spawned once at start and run for as long as the
//! agent runs: denial events from the ring buffer, groups' cgroups followed, idle UID
//! counters retired, and alerts evaluated (and sent to an Alertmanager). Each does its
//! work through [`App`] on the blocking pool, like every other caller.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{app::App, error::AppError};
use crate::{
    kernel::{bpf::events::EventReader, heap},
    model::{alert::State, error_chain},
    observe::{alerts::alertmanager, events::LOG_WINDOW},
};

/// After a batch of events, how long the reader waits before it looks again. Without it,
/// a flood woke the agent for every few events: `perf` of `bench events` put half the
/// agent's CPU in the scheduler's context switch. The ring holds 256 KiB (some 3,000
/// events), 6 ms at 500,000 a second, so a pause of 1-2 ms (tokio's timer granularity)
/// should lose none (none was lost up to 236,000 a second); a lone event is read at once,
/// as the pause follows a batch only.
const EVENT_BATCH_PAUSE: Duration = Duration::from_millis(1);

/// Reads the programs' denial events as they arrive, for as long as the agent runs.
pub async fn events(app: Arc<App>, reader: EventReader) {
    // Readable interest only: a ring buffer's fd never becomes writable for us.
    // SAFETY: the reader owns the ring buffer's fd, which stays open and the same
    // until the reader (owned by the AsyncFd) is dropped.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE)
    };
    let mut reader = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(
                "cannot watch the denial event ring buffer: {e}; no denial events will be logged"
            );
            return;
        }
    };
    loop {
        // While a log window is open, wake up once a window at least, to close it.
        let readable = if app.events().windows_open() {
            match tokio::time::timeout(LOG_WINDOW, reader.readable_mut()).await {
                Ok(readable) => readable,
                Err(_) => {
                    app.events().flush();
                    continue;
                }
            }
        } else {
            reader.readable_mut().await
        };
        let mut guard = match readable {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!("watching the denial event ring buffer failed: {e}");
                return;
            }
        };
        let mut batch = Vec::new();
        while let Some(raw) = guard.get_inner_mut().next_event() {
            batch.push(raw);
        }
        guard.clear_ready();
        app.record_events(&batch);
        app.events().flush();
        if !batch.is_empty() {
            tokio::time::sleep(EVENT_BATCH_PAUSE).await;
        }
    }
}

/// Every 2 s, follows the groups' cgroups (see [`Self::refresh_groups`]).
pub async fn group_refresh(app: Arc<App>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if !app.snapshot().desired.conns.groups.is_empty() {
            if let Err(e) = app
                .blocking("group limits", |app| app.refresh_groups())
                .await
                .and_then(|r| r)
            {
                tracing::warn!(
                    "applying the limits of a new group's cgroup failed: {}",
                    error_chain(&e)
                );
            }
        }
    }
}

/// Every second while there are `[[adapt]]` or `[[penalty]]` rules (or steps of removed
/// ones in force), one round of them (see [`App::adapt_round`]); nothing otherwise.
pub async fn adapt(app: Arc<App>) {
    loop {
        tokio::time::sleep(crate::model::adapt::ROUND_INTERVAL).await;
        if !app.adapt_wanted() {
            continue;
        }
        if let Err(e) = app
            .blocking("adaptive rules and penalties", |app| app.adapt_round())
            .await
            .and_then(|r| r)
        {
            tracing::warn!(
                "a round of the adaptive rules and penalties failed: {}",
                error_chain(&e)
            );
        }
    }
}

/// Every `[bpf] uid_retire_interval`, retires the counters of UIDs idle since the
/// last round (see [`Agent::retire_idle`]), so counters never run out however many
/// UIDs connect over time.
pub async fn retire(app: Arc<App>) {
    loop {
        tokio::time::sleep(app.snapshot().config.bpf.uid_retire_interval).await;
        match app
            .blocking("retiring idle UID counters", |app| app.retire_idle())
            .await
            .and_then(|r| r)
        {
            Ok(0) => {}
            Ok(retired) => tracing::debug!(retired, "idle UID counters retired"),
            Err(e) => tracing::warn!("retiring idle UID counters failed: {}", error_chain(&e)),
        }
    }
}

/// The alert loop: a baseline evaluation now (counters that exist predate this agent;
/// anything that appears later counts from zero), then one every `[alerts] interval`,
/// with firing alerts re-sent to the Alertmanager each time (it expires alerts that
/// stop arriving) and resolved ones once.
pub async fn alerts(app: Arc<App>) {
    let started = Instant::now();
    if let Err(e) = app
        .blocking("alert evaluation", |app| {
            app.evaluate_alerts(Duration::ZERO)
        })
        .await
        .and_then(|r| r)
    {
        tracing::warn!("alert baseline skipped: {}", error_chain(&e));
    }
    let config = &app.snapshot().config;
    let alertmanager = config.alertmanager.clone().map(|url| {
        // Alerts of many hosts meet in one Alertmanager: each says which host it is.
        let mut labels = config.alert_labels.clone();
        let instance = config.alert_instance.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown".to_string())
        });
        labels.insert("instance".to_string(), instance);
        alertmanager::start(url, labels)
    });
    loop {
        tokio::time::sleep(app.snapshot().config.alert_interval).await;
        let evaluated = app
            .blocking("alert evaluation", move |app| {
                let transitions = app.evaluate_alerts(started.elapsed())?;
                let mut batch = app.alerts();
                batch.extend(
                    transitions
                        .into_iter()
                        .filter(|a| a.state == State::Resolved),
                );
                // A round reads every target's stats: what it freed goes back to the
                // kernel, so the idle agent's RSS does not grow round by round.
                heap::release_free_memory();
                Ok::<_, AppError>(batch)
            })
            .await
            .and_then(|r| r);
        match (evaluated, &alertmanager) {
            (Ok(batch), Some(am)) => am.send(&batch),
            (Ok(_), None) => {}
            (Err(e), _) => tracing::warn!("alert evaluation skipped: {}", error_chain(&e)),
        }
    }
}
