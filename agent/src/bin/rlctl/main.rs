//! `rlctl`: the control client. One request per invocation over the agent's socket.
//! Exit codes: 0 success, 1 refused (or the agent cannot be reached), 2 usage,
//! 3 a change that was saved but of which nothing is enforced (the warnings say why).
//! One file per command; `client` holds the socket exchange.

mod alerts;
mod client;
mod events;
mod fields;
mod penalty;
mod quota;
mod run;
mod show;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "rlctl", version, about = "Control client for rlagent")]
struct Cli {
    /// The agent's control socket
    #[arg(long, global = true, default_value = "/run/rlagent/rlagent.sock")]
    socket: PathBuf,
    /// Print the agent's JSON answer instead of a table
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Set quota fields on a target (user:<uid|name>, user:*, <group>, cgroup:<path>)
    SetQuota {
        target: String,
        #[command(flatten)]
        quota: fields::QuotaArgs,
    },
    /// Clear quota fields of a target (defaults such as user:* apply again)
    ClearQuota {
        target: String,
        #[command(flatten)]
        fields: fields::ClearArgs,
    },
    /// Every target's quota, with where each value comes from (config or runtime)
    List,
    /// Usage and limits, of every target or one
    Stats { target: Option<String> },
    /// The agent's version, uptime, kernel features and attach point
    Status,
    /// Alerts of the agent's engine that are pending or firing (--watch: then every
    /// transition as it happens)
    Alerts {
        #[arg(long)]
        watch: bool,
    },
    /// Denial events: connect() calls a limit refused, or would refuse in monitor mode
    /// (the last N, then with --follow each as it happens)
    Events {
        /// Only this UID's events (users other than root and operators see only theirs)
        #[arg(long)]
        uid: Option<u32>,
        /// How many of the last events (default 20, at most 1024)
        #[arg(short = 'n', long)]
        limit: Option<usize>,
        #[arg(long)]
        follow: bool,
    },
    /// Why a user's connections were refused: each reason, with the limit behind it now
    Why { target: String },
    /// Run a command in a group: rlctl moves itself into the group, then execs CMD
    Run {
        group: String,
        #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
        cmd: Vec<String>,
    },
    /// Move processes into a group
    Move {
        group: String,
        #[arg(required = true)]
        pids: Vec<u32>,
    },
    /// Re-read the agent's config file (as SIGHUP does)
    Reload,
    /// Users in the penalty box ([[penalty]] rules): rule, tier, since, until and why;
    /// and the [[adapt]] rules whose step holds
    Penalties,
    /// Lift every penalty of a user (root, or an operator for users from uid_min up)
    Release { target: String },
    /// Print shell completions (bash, zsh, fish, elvish, powershell)
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff)
    #[command(hide = true)]
    Man,
}

fn main() -> ExitCode {
    // Like other command-line tools, end quietly when the reader of our output goes away
    // (`rlctl --json stats | grep -q ...`), instead of panicking on a failed print.
    // SAFETY: at the start of main, before any thread exists; SIG_DFL is always valid.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    let cli = Cli::parse();
    let socket = cli.socket.as_path();
    let json = cli.json;
    let result = match cli.command {
        Command::SetQuota { target, quota } => quota::set(socket, json, target, quota),
        Command::ClearQuota { target, fields } => quota::clear(socket, json, target, fields),
        Command::List => show::list(socket, json),
        Command::Stats { target } => show::stats(socket, json, target),
        Command::Status => show::status(socket, json),
        Command::Alerts { watch: false } => alerts::list(socket, json),
        Command::Alerts { watch: true } => alerts::watch(socket, json),
        Command::Events { uid, limit, follow } => events::events(socket, json, uid, limit, follow),
        Command::Why { target } => events::why(socket, json, target),
        Command::Run { group, cmd } => run::run(socket, json, group, cmd),
        Command::Move { group, pids } => run::move_pids(socket, json, group, pids),
        Command::Reload => show::reload(socket, json),
        Command::Penalties => penalty::penalties(socket, json),
        Command::Release { target } => penalty::release(socket, json, target),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "rlctl", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => man(&mut std::io::stdout())
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("rlctl: {}", rlagent::model::text::escaped(&message));
            ExitCode::FAILURE
        }
    }
}

/// The exit code of a change that was saved but of which nothing is enforced.
pub const NOT_ENFORCED: u8 = 3;

/// A usage error: message and exit code 2.
fn usage(message: &str) -> Result<ExitCode, String> {
    eprintln!("rlctl: {message}");
    Ok(ExitCode::from(2))
}

/// rlctl(1).
fn man(w: &mut dyn std::io::Write) -> std::io::Result<()> {
    use rlagent::manpage::{render, Section};
    render(
        Cli::command(),
        "1",
        &[
            Section {
                heading: "EXAMPLES",
                items: &[
                    ("rlctl set-quota agent --cpu 50%", "Hold the group agent to half a CPU."),
                    ("rlctl run agent -- make -j8", "Run a command in the group agent."),
                    (
                        "rlctl set-quota user:alice --conns 64 --memory 8G",
                        "Cap alice's live connections at 64 and her memory at 8 GiB.",
                    ),
                    (
                        "rlctl set-quota 'user:*' --conns 256",
                        "A default for every UID from uid_min up that has no cap of its own.",
                    ),
                    ("rlctl clear-quota user:alice --memory", "Lift one field again."),
                    (
                        "rlctl list",
                        "Every quota with its source (config or runtime) and whether the kernel enforces it.",
                    ),
                    ("rlctl stats --json", "Usage, limits and connection counters."),
                    ("rlctl alerts --watch", "The firing alerts, then each change as it happens."),
                    (
                        "rlctl set-quota user:alice --conn-rate 20/s --conn-burst 40 --mode monitor",
                        "Watch a connection rate for alice without denying anything yet.",
                    ),
                    (
                        "rlctl set-quota batch --conns 200",
                        "All processes of the group batch together hold at most 200 connections.",
                    ),
                    (
                        "rlctl events --follow --uid 1001",
                        "Each denial of UID 1001 as it happens: process, destination, reason.",
                    ),
                    ("rlctl why user:alice", "The limits behind alice's last denials."),
                ],
            },
            Section {
                heading: "EXIT STATUS",
                items: &[
                    ("0", "Done."),
                    ("1", "Refused, or the agent could not be reached; the message says why."),
                    ("2", "Bad usage."),
                    (
                        "3",
                        "A change was saved but none of it is enforced (a controller is missing, for example); the warnings say why.",
                    ),
                ],
            },
            Section {
                heading: "SEE ALSO",
                items: &[("", "rlagent(8), systemd.resource-control(5)")],
            },
        ],
        w,
    )
}
