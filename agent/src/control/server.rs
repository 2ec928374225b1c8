//! The control socket server. Each client gets its own task; a client that sends garbage,
//! a line over 64 KiB, or nothing for [`IDLE_TIMEOUT`], is answered (when it can be) and cut
//! off without affecting anyone else. At most [`MAX_CLIENTS`] are served at once; the next
//! one is told the agent is busy. Requests that change state run one at a time (the agent
//! is behind one lock) and are all-or-nothing (see `Agent::change`).

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
    time::timeout,
};

use super::{
    auth::{self, Access},
    protocol::{parse_request, ErrorCode, Request, Response, MAX_LINE},
};
use crate::{
    cgroup::CgroupError,
    config::Config,
    daemon::{Agent, DaemonError},
    quota::Field,
    state::{Source, StateError},
    target::{Target, UserRef},
};

pub const MAX_CLIENTS: usize = 512;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {path}: another agent is already listening there")]
    InUse { path: PathBuf },
}

/// What the request handlers share.
pub struct Shared {
    pub agent: Mutex<Agent>,
    /// The alert engine, evaluated on its own schedule (see `rlagent run`).
    pub alerts: Mutex<crate::alerts::Engine>,
    /// Every alert transition, for `watch_alerts` clients.
    pub alert_events: tokio::sync::broadcast::Sender<crate::alerts::Alert>,
    /// The config file the agent was started with (`None`: the embedded default).
    pub config_path: Option<PathBuf>,
    pub admin_gid: Option<u32>,
}

impl Shared {
    /// Stats of everything the agent enforces, with its own counters (placement moves,
    /// alerts firing): the one model served to rlctl, /metrics and the alert engine. The
    /// agent's lock is held only to copy what the collection needs.
    pub fn stats(&self) -> Result<crate::stats::Stats, CgroupError> {
        let (config, mount, moves) = {
            let agent = self.agent.lock().unwrap_or_else(|p| p.into_inner());
            (
                agent.effective().config.clone(),
                agent.mount().to_path_buf(),
                agent.placement_moves(),
            )
        };
        let mut stats = crate::stats::collect(&config, &mount)?;
        stats.placement_moves = moves;
        stats.alerts_firing = self
            .alerts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .firing();
        Ok(stats)
    }
}

/// Creates the socket: parent directory, stale socket removed, mode and group set.
pub fn bind(config: &Config) -> Result<UnixListener, ServerError> {
    let path = &config.control_socket;
    let io = |source| ServerError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse { path: path.clone() });
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.control_mode))
        .map_err(io)?;
    match auth::group_gid(&config.control_group) {
        Some(gid) => std::os::unix::fs::chown(path, None, Some(gid)).map_err(io)?,
        None => tracing::warn!(
            group = %config.control_group,
            "admin group does not exist; only root can change quotas through {}",
            path.display()
        ),
    }
    Ok(listener)
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    client(stream, shared).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let mut stream = stream;
                    let busy = Response::error(
                        ErrorCode::Busy,
                        format!("the agent is serving {MAX_CLIENTS} clients; try again"),
                    );
                    let _ =
                        timeout(WRITE_TIMEOUT, stream.write_all(busy.to_line().as_bytes())).await;
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

async fn client(stream: UnixStream, shared: Arc<Shared>) {
    let access = match stream.peer_cred() {
        Ok(cred) => auth::access(cred.uid(), cred.gid(), cred.pid(), shared.admin_gid),
        Err(e) => {
            tracing::warn!("control socket: no peer credentials: {e}");
            return;
        }
    };
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
                let _ = timeout(WRITE_TIMEOUT, write_half.write_all(r.to_line().as_bytes())).await;
                return;
            }
            Ok(Ok(Line::Complete)) => match std::str::from_utf8(&buf) {
                Err(_) => Response::error(ErrorCode::BadRequest, "request is not UTF-8"),
                Ok(line) => match parse_request(line.trim_end()) {
                    Err(response) => response,
                    Ok(Request::WatchAlerts {}) => {
                        watch_alerts(&shared, access, &mut write_half).await;
                        return;
                    }
                    Ok(request) => {
                        let shared = shared.clone();
                        tokio::task::spawn_blocking(move || handle(&shared, access, request))
                            .await
                            .unwrap_or_else(|e| {
                                Response::error(ErrorCode::Failed, format!("internal error: {e}"))
                            })
                    }
                },
            },
        };
        if !matches!(
            timeout(
                WRITE_TIMEOUT,
                write_half.write_all(response.to_line().as_bytes())
            )
            .await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// Streams alert transitions to one client until it goes away. No idle cut-off here:
/// the client only listens.
async fn watch_alerts(shared: &Shared, access: Access, out: &mut tokio::net::unix::OwnedWriteHalf) {
    let mine = |a: &crate::alerts::Alert| match access {
        Access::Admin => true,
        Access::Reader { uid } => a.target == format!("user:{uid}"),
    };
    let mut events = shared.alert_events.subscribe();
    let current: Vec<crate::alerts::Alert> = shared
        .alerts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .current()
        .into_iter()
        .filter(|a| mine(a))
        .collect();
    let first = Response::ok(json!({ "alerts": current }));
    if !matches!(
        timeout(WRITE_TIMEOUT, out.write_all(first.to_line().as_bytes())).await,
        Ok(Ok(()))
    ) {
        return;
    }
    loop {
        let response = match events.recv().await {
            Ok(alert) if mine(&alert) => Response::ok(json!({ "event": alert })),
            Ok(_) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Response::error(
                ErrorCode::Busy,
                format!("this watcher fell behind; {n} alert events were skipped"),
            ),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if !matches!(
            timeout(WRITE_TIMEOUT, out.write_all(response.to_line().as_bytes())).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// Maps an apply error to the response a client sees.
fn refused(e: DaemonError) -> Response {
    let code = match &e {
        DaemonError::State(StateError::Quota { .. } | StateError::Target(_)) => ErrorCode::Invalid,
        DaemonError::Cgroup(CgroupError::NoSuchCgroup { .. })
        | DaemonError::UnknownGroup { .. } => ErrorCode::NotFound,
        DaemonError::TooManyUidCaps { .. } => ErrorCode::Invalid,
        _ => ErrorCode::Failed,
    };
    let message = match code {
        ErrorCode::Failed => format!("{e}; the previous quotas are still in force"),
        _ => e.to_string(),
    };
    Response::error(code, message)
}

fn parse_target(text: &str) -> Result<Target, Response> {
    text.parse::<Target>()
        .and_then(Target::resolve_user)
        .map_err(|e| Response::error(ErrorCode::Invalid, e.to_string()))
}

fn handle(shared: &Shared, access: Access, request: Request) -> Response {
    if let (true, Access::Reader { uid }) = (request.writes(), access) {
        return Response::error(
            ErrorCode::PermissionDenied,
            format!("permission denied: changing quotas needs root or the admin group (you are uid {uid})"),
        );
    }
    let lock = || shared.agent.lock().unwrap_or_else(|p| p.into_inner());
    match request {
        Request::SetQuota { target, quota } => {
            let target = match parse_target(&target) {
                Ok(t) => t,
                Err(r) => return r,
            };
            if quota.is_empty() {
                return Response::error(ErrorCode::Invalid, "set_quota needs at least one field");
            }
            // Each value is validated here with the field's own parser, so the message
            // names the field even before the merge.
            let mut probe = crate::quota::Quota::default();
            for (field, value) in &quota {
                if let Err(e) = probe.set(*field, value) {
                    return Response::error(ErrorCode::Invalid, e.to_string());
                }
            }
            let fields: BTreeMap<Field, Option<String>> =
                quota.into_iter().map(|(f, v)| (f, Some(v))).collect();
            match lock().change(&target, &fields) {
                Ok(()) => Response::ok(json!({ "target": target.to_string(), "set": fields })),
                Err(e) => refused(e),
            }
        }
        Request::ClearQuota {
            target,
            fields,
            all,
        } => {
            let target = match parse_target(&target) {
                Ok(t) => t,
                Err(r) => return r,
            };
            let fields: Vec<Field> = if all { Field::ALL.to_vec() } else { fields };
            if fields.is_empty() {
                return Response::error(
                    ErrorCode::Invalid,
                    "clear_quota needs fields or \"all\": true",
                );
            }
            let cleared: BTreeMap<Field, Option<String>> =
                fields.iter().map(|f| (*f, None)).collect();
            match lock().change(&target, &cleared) {
                Ok(()) => Response::ok(json!({ "target": target.to_string(), "cleared": fields })),
                Err(e) => refused(e),
            }
        }
        Request::List {} => {
            let agent = lock();
            let effective = agent.effective();
            let targets: Vec<serde_json::Value> = effective
                .config
                .quotas
                .iter()
                .filter(|(target, _)| visible(access, target))
                .map(|(target, quota)| {
                    let fields: serde_json::Map<String, serde_json::Value> = Field::ALL
                        .iter()
                        .filter_map(|f| {
                            let value = quota.text(*f)?;
                            let source = effective
                                .sources
                                .get(&(target.clone(), *f))
                                .copied()
                                .unwrap_or(Source::Config);
                            Some((
                                f.name().to_string(),
                                json!({ "value": value, "source": source }),
                            ))
                        })
                        .collect();
                    json!({ "target": target.to_string(), "fields": fields })
                })
                .collect();
            Response::ok(json!({ "targets": targets }))
        }
        Request::Stats { target } => {
            let wanted = match target.as_deref().map(parse_target).transpose() {
                Ok(t) => t,
                Err(r) => return r,
            };
            if let (Some(t), Access::Reader { .. }) = (&wanted, access) {
                if !visible(access, t) {
                    return Response::error(
                        ErrorCode::PermissionDenied,
                        format!("permission denied: you may read only your own stats, not {t}"),
                    );
                }
            }
            match shared.stats() {
                Ok(mut stats) => {
                    let keep = |name: &str| match (&wanted, access) {
                        (Some(t), _) => name == t.to_string(),
                        (None, Access::Admin) => true,
                        (None, Access::Reader { uid }) => name == format!("user:{uid}"),
                    };
                    stats.targets.retain(|t| keep(&t.target));
                    stats.conns.retain(|c| keep(&format!("user:{}", c.uid)));
                    Response::ok(serde_json::to_value(&stats).expect("stats serialize"))
                }
                Err(e) => Response::error(ErrorCode::Failed, e.to_string()),
            }
        }
        Request::Status {} => {
            let agent = lock();
            let mount = agent.mount().to_path_buf();
            let controllers =
                std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
            Response::ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_seconds": agent.uptime().as_secs(),
                "kernel": kernel_release(),
                "cgroup2_mount": mount,
                "cgroup_controllers": controllers.split_whitespace().collect::<Vec<_>>(),
                "bpf_attach_cgroup": agent.attach_cgroup(),
                "bpf_pin_path": agent.config().bpf.pin_path,
                "config": agent.config().source,
                "targets": agent.effective().config.quotas.len(),
                "alerts_firing": shared.alerts.lock().unwrap_or_else(|p| p.into_inner()).firing(),
            }))
        }
        Request::Alerts {} => {
            let alerts: Vec<crate::alerts::Alert> = shared
                .alerts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .current()
                .into_iter()
                .filter(|a| match access {
                    Access::Admin => true,
                    Access::Reader { uid } => a.target == format!("user:{uid}"),
                })
                .collect();
            Response::ok(json!({ "alerts": alerts }))
        }
        Request::WatchAlerts {} => {
            Response::error(ErrorCode::BadRequest, "watch_alerts is served as a stream")
        }
        Request::Move { group, pids } => match lock().move_to_group(&group, &pids) {
            Ok(cgroup) => Response::ok(json!({ "group": group, "cgroup": cgroup, "moved": pids })),
            Err(e) => refused(e),
        },
        Request::Reload {} => match Config::load(shared.config_path.as_deref()) {
            Err(e) => Response::error(
                ErrorCode::Invalid,
                format!("reload refused, keeping the running config: {e}"),
            ),
            Ok(config) => {
                // The agent's lock must be released before the alert rules are updated
                // (that takes it again): a guard in the match scrutinee would live on.
                let reloaded = lock().reload(config);
                match reloaded {
                    Ok(()) => {
                        reload_alert_rules(shared);
                        Response::ok(json!({ "reloaded": true }))
                    }
                    Err(e) => refused(e),
                }
            }
        },
    }
}

/// Gives the alert engine the rules of the config just loaded.
pub fn reload_alert_rules(shared: &Shared) {
    let rules = shared
        .agent
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .effective()
        .config
        .alert_rules
        .clone();
    shared
        .alerts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_rules(rules);
}

/// A reader sees only its own user target.
fn visible(access: Access, target: &Target) -> bool {
    match access {
        Access::Admin => true,
        Access::Reader { uid } => *target == Target::User(UserRef::Uid(uid)),
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
