//! Delivery to an Alertmanager (`POST /api/v2/alerts`). Runs in its own task fed by a
//! bounded queue: a slow or absent Alertmanager delays only this task, never evaluation
//! or enforcement. Each batch is retried 3 times with backoff; when the queue is full a
//! batch is dropped and counted in the log.
use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::json;
use tokio::{net::TcpStream, sync::mpsc};

use crate::model::alert::{Alert, AlertmanagerUrl, State};

/// How long connecting may take, and then sending the request and reading the reply's
/// head together.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The Alertmanager v2 body for `alerts` (resolved ones carry `endsAt` = now), each with
/// the host's `labels` (`instance` and the configured ones) besides its own.
pub fn body(
    alerts: &[Alert],
    labels: &BTreeMap<String, String>,
    started: SystemTime,
    now: SystemTime,
) -> String {
    let items: Vec<serde_json::Value> = alerts
        .iter()
        .filter(|a| a.state != State::Pending)
        .map(|a| {
            let starts = started + Duration::from_secs_f64(a.active_since_seconds);
            let mut all = json!(labels);
            for (k, v) in [
                ("alertname", &a.rule),
                ("target", &a.target),
                ("severity", &a.severity),
            ] {
                all[k] = json!(v);
            }
            all["source"] = json!("rlagent");
            let mut item = json!({
                "labels": all,
                "annotations": { "summary": a.summary },
                "startsAt": rfc3339(starts),
            });
            if a.state == State::Resolved {
                item["endsAt"] = json!(rfc3339(now));
            }
            item
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// POSTs `body` and reads only the reply's status line and headers (hyper bounds their
/// size); the body is never read, so a hostile or broken peer cannot make the agent buffer
/// a large reply. Connecting, then the exchange, each have [`STEP_TIMEOUT`].
async fn post(target: &AlertmanagerUrl, body: String) -> Result<(), String> {
    let stream = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(&target.host_port))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::post(target.path.as_str())
        .header(hyper::header::HOST, target.host_port.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(STEP_TIMEOUT, sender.send_request(request)).await;
    // Dropping the response and the connection closes it without reading the body.
    driver.abort();
    let status = response
        .map_err(|_| "timed out waiting for the reply".to_string())?
        .map_err(|e| e.to_string())?
        .status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

/// Starts the delivery task; send batches of alerts with [`Sender::send`].
pub fn start(target: AlertmanagerUrl, labels: BTreeMap<String, String>) -> Sender {
    let (tx, mut rx) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        while let Some(body) = rx.recv().await {
            let mut delay = Duration::from_secs(1);
            for attempt in 1..=3 {
                match post(&target, body.clone()).await {
                    Ok(()) => break,
                    Err(e) if attempt == 3 => {
                        tracing::warn!(alertmanager = %target.host_port, "dropping alerts after 3 attempts: {e}")
                    }
                    Err(_) => {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
        }
    });
    Sender {
        tx,
        labels,
        started: SystemTime::now(),
    }
}

#[derive(Clone)]
pub struct Sender {
    tx: mpsc::Sender<String>,
    labels: BTreeMap<String, String>,
    started: SystemTime,
}

impl Sender {
    /// Queues firing and resolved alerts; never waits.
    pub fn send(&self, alerts: &[Alert]) {
        if alerts.iter().all(|a| a.state == State::Pending) {
            return;
        }
        let body = body(alerts, &self.labels, self.started, SystemTime::now());
        if self.tx.try_send(body).is_err() {
            tracing::warn!("Alertmanager queue full; a batch of alerts was dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_bodies() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_779_571_096)),
            "2026-05-23T21:18:16Z"
        );
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        let alert = |state| Alert {
            rule: "R".into(),
            target: "user:1".into(),
            severity: "info".into(),
            state,
            value: 1.0,
            summary: "s".into(),
            active_since_seconds: 10.0,
        };
        let t0 = SystemTime::UNIX_EPOCH;
        let b: serde_json::Value = serde_json::from_str(&body(
            &[
                alert(State::Firing),
                alert(State::Pending),
                alert(State::Resolved),
            ],
            &BTreeMap::from([
                ("instance".to_string(), "node7".to_string()),
                ("team".to_string(), "hpc".to_string()),
            ]),
            t0,
            t0 + Duration::from_secs(60),
        ))
        .unwrap();
        let items = b.as_array().unwrap();
        assert_eq!(items.len(), 2, "pending alerts are not sent");
        assert_eq!(items[0]["labels"]["alertname"], "R");
        assert_eq!(items[0]["labels"]["instance"], "node7");
        assert_eq!(items[0]["labels"]["team"], "hpc");
        assert_eq!(items[0]["labels"]["source"], "rlagent");
        assert_eq!(items[0]["startsAt"], "1970-01-01T00:00:10Z");
        assert!(items[0].get("endsAt").is_none());
        assert_eq!(items[1]["endsAt"], "1970-01-01T00:01:00Z");
    }
}
