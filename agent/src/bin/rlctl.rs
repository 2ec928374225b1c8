//! `rlctl`: the control client. The control socket it talks to is not built yet (it comes
//! with the control-socket work); until then every command parses its arguments with the
//! final grammar and then says plainly that it cannot act. Exit codes: 1 refused, 2 usage.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "rlctl", version, about = "Control client for rlagent")]
struct Cli {
    /// Control socket
    #[arg(long, default_value = "/run/rlagent/rlagent.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Set quota fields on a target (user:<uid|name>, user:*, <group>, cgroup:<path>)
    SetQuota {
        target: String,
        #[arg(long)]
        cpu: Option<String>,
        #[arg(long)]
        memory: Option<String>,
        #[arg(long)]
        memory_high: Option<String>,
        #[arg(long)]
        pids: Option<String>,
        #[arg(long)]
        conns: Option<String>,
        #[arg(long)]
        conn_rate: Option<String>,
        #[arg(long)]
        conn_burst: Option<String>,
    },
    /// Clear quota fields of a target
    ClearQuota {
        target: String,
        #[arg(long)]
        all: bool,
    },
    /// List targets and their quotas
    List,
    /// Usage and limits per target
    Stats {
        target: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Agent status
    Status,
    /// Alerts (and a live stream with --watch)
    Alerts {
        #[arg(long)]
        watch: bool,
    },
    /// Run a command in a group
    Run {
        group: String,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Move processes into a group
    Move {
        group: String,
        #[arg(required = true)]
        pids: Vec<u32>,
    },
    /// Reload the agent's config
    Reload,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Validate what can be validated now, with the agent's own parsers.
    if let Command::SetQuota { target, .. } | Command::ClearQuota { target, .. } = &cli.command {
        if let Err(e) = target.parse::<rlagent::target::Target>() {
            eprintln!("rlctl: {e}");
            return std::process::ExitCode::from(2);
        }
    }
    eprintln!(
        "rlctl: cannot reach {}: this build of rlagent has no control socket yet.\n\
         Change quotas in the config file and send SIGHUP (systemctl reload rlagent);\n\
         see live connection counts with `rlagent conns`.",
        cli.socket.display()
    );
    std::process::ExitCode::FAILURE
}
