//! The control socket's transport. Each client gets its own task; a client that sends
//! garbage, a line over 64 KiB, or nothing for [`IDLE_TIMEOUT`], is answered (when it can
//! be) and cut off without affecting anyone else. At most [`MAX_CLIENTS`] are served at
//! once, of which [`RESERVED_CLIENTS`] are kept for root and operators, so users cannot
//! lock them out; the next one is told the agent is busy, and the refusal is counted.
//! Requests run on the blocking pool through [`App::blocking`] (see `handlers`), so no
//! request stalls the runtime.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{unix::OwnedWriteHalf, UnixListener, UnixStream},
    sync::Semaphore,
    time::timeout,
};

use super::{
    access::{Access, Peer},
    handlers,
    protocol::{
        parse_request, AlertEvent, AlertsResult, ErrorCode, EventLine, EventsResult, Request,
        Response, MAX_LINE,
    },
};
use crate::{
    agent::App,
    model::{alert::Alert, event::DenialEvent},
    observe::budget::Budget,
};

pub const MAX_CLIENTS: usize = 512;
/// Of [`MAX_CLIENTS`], the slots only root and operators may take.
pub const RESERVED_CLIENTS: usize = 64;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: another agent is already listening there")]
    InUse { path: PathBuf },
}

/// Creates the socket: parent directory, stale socket removed, mode set, and group
/// `control_gid` when there is one.
pub fn bind(path: &Path, mode: u32, control_gid: Option<u32>) -> Result<UnixListener, ServerError> {
    let io = |source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    match control_gid {
        Some(gid) => std::os::unix::fs::chown(path, None, Some(gid)).map_err(io)?,
        None => tracing::warn!(
            "the control group does not exist; only root can change quotas through {}",
            path.display()
        ),
    }
    Ok(listener)
}

pub async fn serve(listener: UnixListener, app: Arc<App>) {
    let shared = Arc::new(Semaphore::new(MAX_CLIENTS - RESERVED_CLIENTS));
    let reserve = Arc::new(Semaphore::new(RESERVED_CLIENTS));
    let budgets = app.budgets();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = match Peer::of(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                tracing::warn!("control socket: no peer credentials: {e}");
                continue;
            }
        };
        let access = peer.access(app.control_gid());
        // Users share the general slots; root and operators fall back on the reserve.
        let permit = shared.clone().try_acquire_owned().or_else(|e| {
            if access.reads_all() {
                reserve.clone().try_acquire_owned()
            } else {
                Err(e)
            }
        });
        match permit {
            Ok(permit) => {
                let app = app.clone();
                tokio::spawn(async move {
                    client(stream, peer, access, app).await;
                    drop(permit);
                });
            }
            Err(_) => {
                let (budget, limit) = if access.reads_all() {
                    (Budget::ControlReserve, MAX_CLIENTS)
                } else {
                    (Budget::ControlClients, MAX_CLIENTS - RESERVED_CLIENTS)
                };
                budgets.exhausted(budget, limit);
                tokio::spawn(async move {
                    let mut stream = stream;
                    let busy = Response::error(
                        ErrorCode::Busy,
                        format!("the agent is serving {limit} clients; try again"),
                    );
                    let _ = send(&mut stream, &busy).await;
                });
            }
        }
    }
}

enum Line {
    Complete,
    Eof,
    TooLong,
}

/// Reads up to and including `\n`, refusing lines over [`MAX_LINE`].
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Line> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(Line::Eof);
        }
        let (chunk, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        if buf.len() + chunk.len() > MAX_LINE + 1 {
            return Ok(Line::TooLong);
        }
        buf.extend_from_slice(chunk);
        let used = chunk.len();
        reader.consume(used);
        if done {
            return Ok(Line::Complete);
        }
    }
}

/// Writes one response line; false when the client is gone or too slow.
async fn send(out: &mut (impl AsyncWriteExt + Unpin), response: &Response) -> bool {
    matches!(
        timeout(WRITE_TIMEOUT, out.write_all(response.to_line().as_bytes())).await,
        Ok(Ok(()))
    )
}

async fn client(stream: UnixStream, peer: Peer, access: Access, app: Arc<App>) {
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    loop {
        let mut buf = Vec::new();
        let response = match timeout(IDLE_TIMEOUT, read_line(&mut reader, &mut buf)).await {
            Err(_) | Ok(Err(_)) | Ok(Ok(Line::Eof)) => return,
            Ok(Ok(Line::TooLong)) => {
                let r = Response::error(
                    ErrorCode::TooLarge,
                    format!("request line over {MAX_LINE} bytes"),
                );
                send(&mut write_half, &r).await;
                return;
            }
            Ok(Ok(Line::Complete)) => match std::str::from_utf8(&buf) {
                Err(_) => Response::error(ErrorCode::BadRequest, "request is not UTF-8"),
                Ok(line) => match parse_request(line.trim_end()) {
                    Err(response) => response,
                    Ok(Request::WatchAlerts {}) => {
                        watch_alerts(&app, access, reader, &mut write_half).await;
                        return;
                    }
                    Ok(Request::WatchEvents { uid }) => {
                        watch_events(&app, access, uid, reader, &mut write_half).await;
                        return;
                    }
                    Ok(request) => app
                        .blocking("request", {
                            let peer = peer.clone();
                            move |app| handlers::handle(app, &peer, access, request)
                        })
                        .await
                        .unwrap_or_else(|e| handlers::refused(&e)),
                },
            },
        };
        if !send(&mut write_half, &response).await {
            return;
        }
    }
}

/// Streams denial events to one client until it goes away, as [`watch_alerts`] does
/// alerts: the last events, then one line per event (of the UID the caller may read).
async fn watch_events(
    app: &Arc<App>,
    access: Access,
    uid: Option<u32>,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    out: &mut OwnedWriteHalf,
) {
    let uid = match handlers::events_uid(access, uid) {
        Ok(uid) => uid,
        Err(refusal) => {
            send(out, &refusal).await;
            return;
        }
    };
    let mine = move |e: &DenialEvent| uid.is_none_or(|u| e.uid == u);
    let (recent, events) = app.events().follow(uid, handlers::DEFAULT_EVENTS);
    if !send(out, &Response::ok(&EventsResult { events: recent })).await {
        return;
    }
    stream(reader, out, events, "denial events", move |event| {
        mine(&event).then(|| Response::ok(&EventLine { event }))
    })
    .await;
}

/// The rest of a watch: one line per item of `items` that `line` turns into a response,
/// until the client goes away. No idle cut-off (the client only listens), but the read
/// side is watched, so a client that closes is noticed at once and its slot freed, even
/// when nothing is ever sent to it. A watcher that falls behind is told how much it
/// missed (`what` names the items).
async fn stream<T: Clone>(
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    out: &mut OwnedWriteHalf,
    mut items: tokio::sync::broadcast::Receiver<T>,
    what: &str,
    line: impl Fn(T) -> Option<Response>,
) {
    let mut ignored = [0u8; 512];
    loop {
        let response = tokio::select! {
            // Anything the client sends is ignored; EOF or an error means it is gone.
            read = tokio::io::AsyncReadExt::read(&mut reader, &mut ignored) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
            item = items.recv() => match item {
                Ok(item) => match line(item) {
                    Some(response) => response,
                    None => continue,
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Response::error(
                    ErrorCode::Busy,
                    format!("this watcher fell behind; {n} {what} were skipped"),
                ),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        };
        if !send(out, &response).await {
            return;
        }
    }
}

/// Streams alert transitions to one client until it goes away: the current alerts, then
/// one line per transition (see [`stream`]).
async fn watch_alerts(
    app: &Arc<App>,
    access: Access,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    out: &mut OwnedWriteHalf,
) {
    let mine = move |a: &Alert| access.sees_name(&a.target);
    let events = app.subscribe_alerts();
    let current = match app.blocking("alerts", |app| app.alerts()).await {
        Ok(alerts) => alerts.into_iter().filter(|a| mine(a)).collect(),
        Err(e) => {
            send(out, &handlers::refused(&e)).await;
            return;
        }
    };
    if !send(out, &Response::ok(&AlertsResult { alerts: current })).await {
        return;
    }
    stream(reader, out, events, "alert events", move |alert| {
        mine(&alert).then(|| Response::ok(&AlertEvent { event: alert }))
    })
    .await;
}
