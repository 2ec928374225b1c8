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
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Our errors do not repeat their source, so the chain is the whole story.
            eprintln!("rlagent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
