//! `rlagent`: the enforcement daemon, and its offline commands. One file per command.

mod check_config;
mod conns;
mod log;
mod run;
mod stats;
mod uninstall;
mod watch;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    /// processes back to the root cgroup and remove the agent's cgroup subtree. Refused
    /// while an agent answers on the control socket (stop it first)
    Uninstall {
        /// Uninstall even under a running agent (its enforcement stops)
        #[arg(long)]
        force: bool,
    },
    /// Print the manual page (roff)
    #[command(hide = true)]
    Man,
}

fn main() -> std::process::ExitCode {
    log::init();
    let cli = Cli::parse();
    let config = cli.config.as_deref();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run::run(config),
        Command::CheckConfig => check_config::check_config(config),
        Command::Conns => conns::conns(config),
        Command::Stats { json } => stats::stats(config, json),
        Command::Uninstall { force } => uninstall::uninstall(config, force),
        Command::Man => man(&mut std::io::stdout()).map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Our errors do not repeat their source, so the chain is the whole story.
            // It may quote a path, a name or a value from outside.
            let message = format!("{e:#}");
            eprintln!("rlagent: {}", rlagent::model::text::escaped(&message));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Says which drop-ins an offline command left out, and why.
fn warn_skipped(skipped: &[rlagent::config::ConfigError]) {
    for e in skipped {
        let message = rlagent::model::error_chain(e);
        eprintln!(
            "rlagent: warning: left out: {}",
            rlagent::model::text::escaped(&message)
        );
    }
}

/// rlagent(8).
fn man(w: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    use rlagent::manpage::{render, Section};
    render(
        Cli::command(),
        "8",
        &[
            Section {
                heading: "EXAMPLES",
                items: &[
                    ("systemctl enable --now rlagent", "Run it as the service it is meant to be."),
                    (
                        "rlagent --config /etc/rlagent/rlagent.toml check-config",
                        "Validate the config and its drop-ins, and print the connection limits they give.",
                    ),
                    ("rlagent conns", "Live connections, caps and denials per UID, from the pinned maps."),
                    ("rlagent stats --json", "Usage and limits of every managed cgroup, without a running agent."),
                    (
                        "systemctl stop rlagent && rlagent uninstall",
                        "Switch enforcement off: detach the programs and give back every limit.",
                    ),
                ],
            },
            Section {
                heading: "FILES",
                items: &[
                    ("/etc/rlagent/rlagent.toml", "The config (an embedded default when absent)."),
                    (
                        "/etc/rlagent/rlagent.d/*.toml",
                        "Drop-ins merged over it in name order; a change reloads the agent.",
                    ),
                    ("/run/rlagent/rlagent.sock", "The control socket rlctl(1) talks to."),
                    ("/var/lib/rlagent/state.json", "Quotas set through rlctl, kept across restarts."),
                    ("/sys/fs/bpf/rlagent", "The pinned programs and maps: enforcement outlives the agent."),
                    (
                        "/run/rlagent/systemd-units",
                        "The unit properties the systemd driver set, and what they were before.",
                    ),
                ],
            },
            Section {
                heading: "ENVIRONMENT",
                items: &[(
                    "RLAGENT_LOG",
                    "Log filter in tracing's syntax (default info), e.g. debug or rlagent::kernel=debug.",
                )],
            },
            Section {
                heading: "SIGNALS",
                items: &[
                    ("SIGHUP", "Reload the config; a bad one is refused whole and the running limits stay."),
                    ("SIGTERM", "Stop; the programs stay attached and keep enforcing."),
                ],
            },
            Section {
                heading: "SEE ALSO",
                items: &[("", "rlctl(1), systemd.resource-control(5), systemd-run(1)")],
            },
        ],
        w,
    )
}
