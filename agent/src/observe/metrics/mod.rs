//! `/metrics`: the same [`Stats`] model the control socket serves, rendered as Prometheus
//! text with the prometheus crate (metric families built per scrape from the model, so
//! counters are the kernel's own values, not re-counted here).
//!
//! Names are `rlagent_*` in base units (`_seconds_total`, `_bytes`), label `target` on
//! cgroup series and `uid` on connection series. Per-UID series exist for UIDs the
//! connection maps know (a UID with a cap or a connection since the maps were created),
//! so their number is bounded by the map size (65 536).

mod cardinality;
mod render;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, Request, Response, StatusCode};

pub use cardinality::{UidActivity, UID_ACTIVITY_WINDOW};
pub use render::render;

use crate::observe::{
    budget::{Budget, Budgets},
    stats::Stats,
};

/// Connections served at once; more are accepted and closed at once (and counted), so a
/// flood of idle connections holds at most this many descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request, and the longest a connection lives.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves `/metrics` over HTTP/1.1, one request per connection; `collect` builds the stats
/// for each scrape, and `after` runs (on the blocking pool) once a scrape's connection is
/// done and its response dropped, at most once a second: the port is open to every local
/// user, and a loop of connections must not queue up work. Runs on its own connection
/// budget, apart from the control socket's.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    collect: Arc<F>,
    budgets: Arc<Budgets>,
    after: fn(),
) where
    F: Fn() -> Result<Stats, String> + Send + Sync + 'static,
{
    let activity = Arc::new(std::sync::Mutex::new(UidActivity::default()));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let last_after: Arc<std::sync::Mutex<Option<std::time::Instant>>> = Arc::default();
    loop {
        let (stream, _peer): (_, SocketAddr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            budgets.exhausted(Budget::MetricsConnections, MAX_CONNECTIONS);
            drop(stream);
            continue;
        };
        let collect = collect.clone();
        let activity = activity.clone();
        let last_after = last_after.clone();
        tokio::spawn(async move {
            let scraped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let scrape = scraped.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let collect = collect.clone();
                let activity = activity.clone();
                if req.uri().path() == "/metrics" {
                    scrape.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                async move { Ok::<_, Infallible>(respond(req, collect, activity).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            if scraped.load(std::sync::atomic::Ordering::Relaxed) && due(&last_after) {
                let _ = tokio::task::spawn_blocking(after).await;
            }
            drop(permit);
        });
    }
}

/// True, and `last` set to now, when `last` is a second ago or more (or never).
fn due(last: &std::sync::Mutex<Option<std::time::Instant>>) -> bool {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    let now = std::time::Instant::now();
    if last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
        return false;
    }
    *last = Some(now);
    true
}

async fn respond<F>(
    req: Request<hyper::body::Incoming>,
    collect: Arc<F>,
    activity: Arc<std::sync::Mutex<UidActivity>>,
) -> Response<Full<Bytes>>
where
    F: Fn() -> Result<Stats, String> + Send + Sync + 'static,
{
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    match req.uri().path() {
        "/metrics" => match tokio::task::spawn_blocking(move || {
            let mut stats = collect()?;
            activity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(&mut stats, std::time::Instant::now());
            Ok::<_, String>(stats)
        })
        .await
        {
            Ok(Ok(stats)) => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                render(&stats),
            ),
            Ok(Err(e)) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("collecting stats: {e}\n"),
            ),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            "rlagent: metrics at /metrics\n".to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; metrics are at /metrics\n".to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_after_a_scrape_is_due_at_most_once_a_second() {
        let last = std::sync::Mutex::new(None);
        assert!(due(&last), "never ran: due");
        assert!(!due(&last), "just ran: not due");
        *last.lock().unwrap() = Some(std::time::Instant::now() - Duration::from_millis(1001));
        assert!(due(&last), "a second ago: due again");
        assert!(!due(&last));
    }
}
