//! `rlagent run`: the daemon. Listeners first (so "already in use" fails before anything is
//! loaded), then enforcement, then READY=1; SIGHUP, and a change of the config file or a
//! drop-in on disk, reload through the one reload path.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use rlagent::{
    agent::{tasks, App},
    config::Config,
    control::{server, webhook},
    kernel::{heap, nss::SystemUsers},
    model::{error_chain, users::UserDb},
    observe::metrics,
};
use tokio::signal::unix::{signal, Signal, SignalKind};

pub fn run(config_path: Option<&Path>) -> anyhow::Result<()> {
    let users: Arc<dyn UserDb> = Arc::new(SystemUsers);
    let config = Config::load(config_path, users.as_ref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let socket_path = config.control_socket.clone();
        let control_gid = rlagent::agent::app::control_gid(users.as_ref(), &config.control_group);
        let listener = server::bind(&socket_path, config.control_mode, control_gid)?;
        let metrics_listen = config.metrics_listen;
        let metrics_listener = tokio::net::TcpListener::bind(metrics_listen)
            .await
            .with_context(|| format!("metrics listen address {metrics_listen}"))?;
        // The address bound, which differs from the configured one for port 0.
        let metrics_addr = metrics_listener
            .local_addr()
            .with_context(|| format!("metrics listen address {metrics_listen}"))?;
        let webhook_listener = match &config.penalty_webhook {
            None => None,
            Some(w) => Some(
                tokio::net::TcpListener::bind(w.listen)
                    .await
                    .with_context(|| format!("[penalty_webhook] listen address {}", w.listen))?,
            ),
        };
        let app = App::start(config, config_path.map(Path::to_path_buf), users)?;
        heap::release_free_memory();
        tokio::spawn(server::serve(listener, app.clone()));
        if let Some(listener) = webhook_listener {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "penalty webhook listening");
            }
            tokio::spawn(webhook::serve(listener, app.clone()));
        }
        let scrapes = app.clone();
        let collect = Arc::new(move || scrapes.stats().map_err(|e| error_chain(&e)));
        tokio::spawn(metrics::serve(
            metrics_listener,
            collect,
            app.budgets(),
            heap::release_free_memory,
        ));
        spawn_tasks(&app);
        let mut signals = Signals::install()?;
        let mut changes = watch_changes(config_path, &app);
        // STATUS= is what `systemctl status` shows; the tests read the metrics port from it.
        let status = format!(
            "control socket {}, metrics on http://{metrics_addr}/metrics",
            socket_path.display()
        );
        if let Err(e) = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]) {
            tracing::warn!("cannot notify systemd: {e}");
        }
        tracing::info!(socket = %socket_path.display(), metrics = %metrics_addr, "ready");
        loop {
            let changed = async {
                match changes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(()) = changed => {
                    tracing::info!("the config changed on disk; reloading");
                    reload(&app).await;
                }
                _ = signals.hangup.recv() => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                    reload(&app).await;
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                }
                _ = signals.terminate.recv() => break,
                _ = signals.interrupt.recv() => break,
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let _ = std::fs::remove_file(&socket_path);
        tracing::info!("stopping; programs stay attached through their pinned links (rlagent uninstall removes them)");
        anyhow::Ok(())
    })
}

/// The background loops (see [`tasks`]).
fn spawn_tasks(app: &Arc<App>) {
    tokio::spawn(tasks::alerts(app.clone()));
    tokio::spawn(tasks::group_refresh(app.clone()));
    tokio::spawn(tasks::retire(app.clone()));
    tokio::spawn(tasks::adapt(app.clone()));
    match rlagent::kernel::bpf::events::EventReader::open(&app.snapshot().config.bpf.pin_path) {
        Ok(reader) => {
            tokio::spawn(tasks::events(app.clone(), reader));
        }
        Err(e) => tracing::error!(
            "cannot open the denial event ring buffer: {}; denials are still counted, but not logged one by one",
            error_chain(&e)
        ),
    }
}

/// SIGHUP reloads; SIGTERM and SIGINT stop.
struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            hangup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
            terminate: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }
}

/// Changes on disk of the config file (the one given, or the default when it exists), its
/// drop-ins and the subordinate UID file; `None` when they cannot be watched (logged).
fn watch_changes(config_path: Option<&Path>, app: &App) -> Option<tokio::sync::mpsc::Receiver<()>> {
    let watched = config_path.map(Path::to_path_buf).or_else(|| {
        let default = Path::new(rlagent::config::DEFAULT_CONFIG_PATH);
        default.exists().then(|| default.to_path_buf())
    });
    let subuid_file = app.snapshot().config.bpf.subuid_file.clone();
    match crate::watch::spawn(watched.as_deref(), &[subuid_file]) {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::warn!(
                "not watching the config for changes ({e}); reload with SIGHUP or rlctl reload"
            );
            None
        }
    }
}

/// The one reload path; a refused config leaves the running one in force.
async fn reload(app: &Arc<App>) {
    if let Err(e) = app
        .blocking("reload", |app| app.reload())
        .await
        .and_then(|r| r)
    {
        tracing::error!(
            "reload refused, keeping the running config and limits: {}",
            error_chain(&e)
        );
    }
}
