//! `rlagent`: the enforcement daemon.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use rlagent::control::server;
use rlagent::{
    bpf::{self, PinnedMaps},
    config::Config,
    daemon::{cap_text, Agent},
};
use std::sync::{Arc, Mutex};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "rlagent",
    version,
    about = "Host-level resource enforcement agent"
)]
struct Cli {
    /// Config file [default: /etc/rlagent/rlagent.toml, or the embedded default if absent]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (the default)
    Run,
    /// Validate the config and print what it would enforce
    CheckConfig,
    /// Show live connections, denials and caps per UID from the pinned maps
    Conns,
    /// Usage and limits of every managed cgroup, and connection counters
    Stats {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Detach the kernel programs, remove their pins (counts are lost), move placed
    /// processes back to the root cgroup and remove the agent's cgroup subtree
    Uninstall,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RLAGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config.as_deref()),
        Command::CheckConfig => check_config(cli.config.as_deref()),
        Command::Conns => conns(cli.config.as_deref()),
        Command::Stats { json } => stats(cli.config.as_deref(), json),
        Command::Uninstall => uninstall(cli.config.as_deref()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rlagent: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, leaving out a cause its parent's message already contains
/// (our error types name their cause in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let message = cause.to_string();
        if !text.contains(&message) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&message);
        }
    }
    text
}

fn run(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let admin_gid = rlagent::control::auth::group_gid(&config.control_group);
    let socket_path = config.control_socket.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        // The listeners first: "already in use" must fail before anything is loaded.
        let listener = server::bind(&config)?;
        let metrics_listen = config.metrics_listen;
        let metrics = tokio::net::TcpListener::bind(metrics_listen)
            .await
            .with_context(|| format!("metrics listen address {metrics_listen}"))?;
        let agent = Agent::start(config)?;
        let engine = rlagent::alerts::Engine::new(agent.effective().config.alert_rules.clone());
        let shared = Arc::new(server::Shared {
            alerts: Mutex::new(engine),
            alert_events: tokio::sync::broadcast::channel(256).0,
            agent: Mutex::new(agent),
            config_path: config_path.map(Path::to_path_buf),
            admin_gid,
        });
        tokio::spawn(server::serve(listener, shared.clone()));
        let scrape_from = shared.clone();
        let collect = Arc::new(move || scrape_from.stats().map_err(|e| e.to_string()));
        tokio::spawn(rlagent::metrics::serve(metrics, collect));
        // The engine's baseline, before READY=1: counters that exist now predate this
        // agent; anything that appears later is new and counts from zero.
        let alerts_started = std::time::Instant::now();
        match shared.stats() {
            Ok(stats) => {
                let mut engine = shared.alerts.lock().unwrap_or_else(|p| p.into_inner());
                rlagent::alerts::Engine::log(&engine.evaluate(&stats, std::time::Duration::ZERO));
            }
            Err(e) => tracing::warn!("alert baseline skipped: {e}"),
        }
        tokio::spawn(evaluate_alerts(shared.clone(), alerts_started));
        let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            tracing::warn!("cannot notify systemd: {e}");
        }
        tracing::info!(socket = %socket_path.display(), metrics = %metrics_listen, "ready");
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                    match Config::load(config_path) {
                        Ok(config) => {
                            let reloading = shared.clone();
                            let result = tokio::task::spawn_blocking(move || {
                                reloading.agent.lock().unwrap_or_else(|p| p.into_inner()).reload(config)
                                .map_err(|e| e.to_string())
                            })
                            .await
                            .context("reload task")?;
                            match result {
                                Ok(()) => server::reload_alert_rules(&shared),
                                Err(e) => tracing::error!("reload failed, keeping the running limits: {e}"),
                            }
                        }
                        Err(e) => tracing::error!("reload refused, keeping the running config: {e}"),
                    }
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                }
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let _ = std::fs::remove_file(&socket_path);
        tracing::info!("stopping; programs stay attached through their pinned links (rlagent uninstall removes them)");
        anyhow::Ok(())
    })
}

/// Evaluates the alert rules every `[alerts] interval`, logging each transition once.
async fn evaluate_alerts(shared: Arc<server::Shared>, started: std::time::Instant) {
    let target = shared
        .agent
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .config()
        .alertmanager
        .clone();
    let alertmanager = target.map(rlagent::alerts::alertmanager::start);
    loop {
        let interval = shared
            .agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config()
            .alert_interval;
        tokio::time::sleep(interval).await;
        let shared = shared.clone();
        let alertmanager = alertmanager.clone();
        let evaluated = tokio::task::spawn_blocking(move || {
            let stats = shared.stats().map_err(|e| e.to_string())?;
            let mut engine = shared.alerts.lock().unwrap_or_else(|p| p.into_inner());
            let transitions = engine.evaluate(&stats, started.elapsed());
            rlagent::alerts::Engine::log(&transitions);
            for alert in &transitions {
                // No watchers is fine.
                let _ = shared.alert_events.send(alert.clone());
            }
            if let Some(am) = &alertmanager {
                // Firing alerts are re-sent every evaluation (Alertmanager expires alerts
                // that stop arriving); resolved ones once, with endsAt.
                let mut batch = engine.current();
                batch.extend(
                    transitions
                        .into_iter()
                        .filter(|a| a.state == rlagent::alerts::State::Resolved),
                );
                am.send(&batch);
            }
            Ok::<_, String>(())
        })
        .await;
        if let Ok(Err(e)) = evaluated {
            tracing::warn!("alert evaluation skipped: {e}");
        }
    }
}

fn check_config(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let limits = rlagent::conn_limits::ConnLimits::from_config(&config);
    println!("config {}: valid", config.source.display());
    println!("attach cgroup: /{}", config.bpf.attach_cgroup.display());
    println!(
        "default cap (user:*, UID >= {}): {}",
        limits.uid_min,
        cap_text(limits.default_cap)
    );
    println!("host-wide cap: {}", cap_text(limits.host_cap));
    for (uid, cap) in &limits.per_uid {
        println!("user:{uid}: {}", cap_text(*cap));
    }
    for (target, fields) in rlagent::conn_limits::unenforced_fields(&config) {
        println!(
            "{target}: not enforced by this build yet: {}",
            fields.join(", ")
        );
    }
    Ok(())
}

fn conns(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let maps = PinnedMaps::open(&config.bpf.pin_path).with_context(|| {
        format!(
            "is the agent installed? no maps pinned under {}",
            config.bpf.pin_path.display()
        )
    })?;
    let stats = maps.stats()?;
    println!(
        "{:>10} {:>8} {:>8} {:>10} {:>11} {:>11}",
        "UID", "LIVE", "CAP", "ADMITTED", "DENIED_CAP", "DENIED_HOST"
    );
    for (uid, c) in &stats.per_uid {
        println!(
            "{uid:>10} {:>8} {:>8} {:>10} {:>11} {:>11}",
            c.live,
            cap_text(maps.cap_for(*uid)?),
            c.admitted,
            c.denied_cap,
            c.denied_host
        );
    }
    println!(
        "host: {} live, {} let through untracked (map full)",
        stats.host.live, stats.host.untracked
    );
    Ok(())
}

fn stats(config_path: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    // What the agent enforces: the config with the quotas set through rlctl merged in.
    let effective = rlagent::state::RuntimeState::load(&config.state_path)?.merge(&config)?;
    let mount = rlagent::cgroup2::find_mount()?;
    let stats = rlagent::stats::collect(&effective.config, &mount)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    print!("{}", rlagent::stats::table(&stats));
    Ok(())
}

fn uninstall(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    bpf::uninstall(&config.bpf.pin_path)?;
    println!(
        "removed programs and pins under {}",
        config.bpf.pin_path.display()
    );
    let mount = rlagent::cgroup2::find_mount()?;
    let fs = rlagent::cgroup::CgroupFs::new(&mount);
    if fs.path(&config.cgroup_root).exists() {
        let moved = fs.remove_tree(&config.cgroup_root)?;
        println!(
            "moved {moved} processes back to {} and removed {}",
            mount.display(),
            fs.path(&config.cgroup_root).display()
        );
    }
    Ok(())
}
