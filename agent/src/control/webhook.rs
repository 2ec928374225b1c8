//! `[penalty_webhook]`: an HTTP endpoint for Alertmanager's webhook receiver. A POST
//! with the bearer token and a version-4 payload applies each firing alert as a tier of a
//! local `[[penalty]]` rule (labels `target`, `rule`, `tier`) and lifts each resolved one;
//! anything else is refused, counted (`rlagent_penalty_webhook_refused_total`) and logged
//! at most once a minute.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Bytes, Method, Request, Response, StatusCode};

use crate::{
    agent::App,
    model::error_chain,
    observe::adapt::fleet::{alerts, Payload, MAX_WEBHOOK_BODY},
};

/// Requests served at once; more connections are closed at once (and counted).
const MAX_CONNECTIONS: usize = 16;
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves the webhook on `listener` for as long as the agent runs.
pub async fn serve(listener: tokio::net::TcpListener, app: Arc<App>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
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
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(req, &app).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body + "\n")))
        .expect("static response parts")
}

/// Compares without stopping at the first difference, so the time taken does not tell
/// how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    let rules = app.snapshot().config.penalty_rules.clone();
    let fleet = match alerts(&payload, &rules) {
        Ok(fleet) => fleet,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.kind(), e.to_string()),
    };
    let count = fleet.len();
    match app
        .blocking("fleet penalties", move |app| app.fleet_alerts(fleet))
        .await
        .and_then(|r| r)
    {
        Ok(decisions) => reply(
            StatusCode::OK,
            format!("{count} alerts read, {} changes", decisions.len()),
        ),
        Err(e) => refuse(StatusCode::BAD_REQUEST, "apply", error_chain(&e)),
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
