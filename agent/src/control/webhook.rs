//! `[penalty_webhook]`: an HTTP endpoint for Alertmanager's webhook receiver. A POST
//! with the bearer token and a version-4 payload applies each firing alert as a tier of a
//! local `[[penalty]]` rule (labels `target`, `rule`, `tier`) and lifts each resolved one;
//! anything else is refused, counted (`rlagent_penalty_webhook_refused_total`) and logged
//! at most once a minute.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Bytes, Method, Request, Response, StatusCode};

use crate::{
    agent::{App, AppError},
    model::error_chain,
    observe::adapt::fleet::{Payload, MAX_WEBHOOK_BODY},
};

/// Requests served at once, and from one address; more connections are closed at once
/// (and counted), so one peer cannot hold every slot.
const MAX_CONNECTIONS: usize = 16;
/// Alertmanager sends a request per group of alerts at once (one per penalised user
/// with `group_by: [alertname, target]`); refused ones it sends again.
const MAX_PER_PEER: usize = 8;
/// Alertmanager sends a request at once: a peer that is slow to is cut off soon.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// Serves the webhook on `listener` for as long as the agent runs.
pub async fn serve(listener: tokio::net::TcpListener, app: Arc<App>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let peers: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("penalty webhook accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            app.webhook_refused("busy", "too many connections at once");
            continue;
        };
        let ip = peer.ip();
        {
            let mut held = peers.lock().unwrap_or_else(|p| p.into_inner());
            let n = held.entry(ip).or_default();
            if *n >= MAX_PER_PEER {
                drop(held);
                app.webhook_refused("busy", &format!("too many connections at once from {ip}"));
                continue;
            }
            *n += 1;
        }
        let app = app.clone();
        let held = PeerSlot {
            peers: peers.clone(),
            ip,
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(req, &app).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(held);
            drop(permit);
        });
    }
}

/// A connection counted against its address, given back when dropped (also when the task
/// ends by a panic).
struct PeerSlot {
    peers: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body + "\n")))
        .expect("static response parts")
}

/// Compares `given` with `wanted` over all of `wanted`, without stopping at the first
/// difference or at the end of `given`: the time taken tells neither how much of a guess
/// was right nor how long the token is.
fn same(given: &[u8], wanted: &[u8]) -> bool {
    let differ = wanted.iter().enumerate().fold(0u8, |acc, (i, w)| {
        acc | (w ^ given.get(i).copied().unwrap_or(!w))
    });
    differ == 0 && given.len() == wanted.len()
}

async fn handle(req: Request<hyper::body::Incoming>, app: &Arc<App>) -> Response<Full<Bytes>> {
    let refuse = |status, kind, why: String| {
        app.webhook_refused(kind, &why);
        reply(status, why)
    };
    if req.method() != Method::POST {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            "POST Alertmanager's webhook payload here".into(),
        );
    }
    let Some(webhook) = app.snapshot().config.penalty_webhook.clone() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "disabled",
            "no [penalty_webhook]".into(),
        );
    };
    let wanted = format!("Bearer {}", webhook.token.expose());
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !same(given, wanted.as_bytes()) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "token",
            "a bearer token is required (the one in [penalty_webhook] token_file)".into(),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_WEBHOOK_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "size",
                format!("the body is over {MAX_WEBHOOK_BODY} bytes, or was cut"),
            )
        }
    };
    let payload: Payload = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "json",
                format!("not Alertmanager's webhook JSON: {e}"),
            )
        }
    };
    let count = payload.alerts.len();
    match app
        .blocking("fleet penalties", move |app| app.fleet_alerts(&payload))
        .await
        .and_then(|r| r)
    {
        Ok((decisions, skipped)) => reply(
            StatusCode::OK,
            format!(
                "{count} alerts read, {} changes, {skipped} skipped (exempt users)",
                decisions.len()
            ),
        ),
        Err(AppError::Fleet(e)) => refuse(StatusCode::BAD_REQUEST, e.kind(), e.to_string()),
        // A target that is not a user of this host: the sender's to fix.
        Err(e @ (AppError::Target(_) | AppError::FleetTarget { .. })) => {
            refuse(StatusCode::BAD_REQUEST, "target", error_chain(&e))
        }
        // The agent could not apply it (the decision is kept and applied again each
        // round): a server error, not the sender's.
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, "apply", error_chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_whole() {
        assert!(super::same(b"Bearer abc", b"Bearer abc"));
        assert!(!super::same(b"Bearer abd", b"Bearer abc"));
        assert!(!super::same(b"Bearer ab", b"Bearer abc"));
        assert!(!super::same(b"", b"Bearer abc"));
    }
}
