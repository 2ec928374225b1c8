//! `rlctl`: the control client. One request per invocation over the agent's socket.
//! Exit codes: 0 success, 1 refused (or the agent cannot be reached), 2 usage.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    os::unix::{net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{CommandFactory, Parser, Subcommand};
use rlagent::{
    control::protocol::{request_line, Request, Response},
    quota::Field,
    stats::Stats,
};

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

/// Quota values, in the config file's forms.
#[derive(clap::Args, Default)]
struct QuotaArgs {
    /// CPU as a percentage of one CPU (50%, 250%) or max
    #[arg(long)]
    cpu: Option<String>,
    /// memory.max: 512M, 2G, ... or max
    #[arg(long)]
    memory: Option<String>,
    /// memory.high: 512M, 2G, ... or max
    #[arg(long)]
    memory_high: Option<String>,
    /// pids.max or max
    #[arg(long)]
    pids: Option<String>,
    /// Live connections per UID or max
    #[arg(long)]
    conns: Option<String>,
    /// New connections per second (20/s) or max
    #[arg(long)]
    conn_rate: Option<String>,
    /// Connection burst (with --conn-rate)
    #[arg(long)]
    conn_burst: Option<String>,
}

/// Fields to clear.
#[derive(clap::Args)]
struct ClearArgs {
    #[arg(long)]
    cpu: bool,
    #[arg(long)]
    memory: bool,
    #[arg(long)]
    memory_high: bool,
    #[arg(long)]
    pids: bool,
    #[arg(long)]
    conns: bool,
    #[arg(long)]
    conn_rate: bool,
    #[arg(long)]
    conn_burst: bool,
    /// Every field
    #[arg(long, conflicts_with_all = ["cpu", "memory", "memory_high", "pids", "conns", "conn_rate", "conn_burst"])]
    all: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Set quota fields on a target (user:<uid|name>, user:*, <group>, cgroup:<path>)
    SetQuota {
        target: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// Clear quota fields of a target (defaults such as user:* apply again)
    ClearQuota {
        target: String,
        #[command(flatten)]
        fields: ClearArgs,
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
    /// Print shell completions (bash, zsh, fish, elvish, powershell)
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff)
    #[command(hide = true)]
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("rlctl: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let request = match cli.command {
        Command::SetQuota { target, quota } => {
            let fields: BTreeMap<Field, String> = [
                (Field::Cpu, quota.cpu),
                (Field::Memory, quota.memory),
                (Field::MemoryHigh, quota.memory_high),
                (Field::Pids, quota.pids),
                (Field::Conns, quota.conns),
                (Field::ConnRate, quota.conn_rate),
                (Field::ConnBurst, quota.conn_burst),
            ]
            .into_iter()
            .filter_map(|(f, v)| Some((f, v?)))
            .collect();
            if fields.is_empty() {
                return usage("set-quota needs at least one of --cpu --memory --memory-high --pids --conns --conn-rate --conn-burst");
            }
            Request::SetQuota {
                target,
                quota: fields,
            }
        }
        Command::ClearQuota { target, fields: f } => {
            let fields: Vec<Field> = [
                (Field::Cpu, f.cpu),
                (Field::Memory, f.memory),
                (Field::MemoryHigh, f.memory_high),
                (Field::Pids, f.pids),
                (Field::Conns, f.conns),
                (Field::ConnRate, f.conn_rate),
                (Field::ConnBurst, f.conn_burst),
            ]
            .into_iter()
            .filter_map(|(field, set)| set.then_some(field))
            .collect();
            if fields.is_empty() && !f.all {
                return usage("clear-quota needs fields (--cpu, --memory, ...) or --all");
            }
            Request::ClearQuota {
                target,
                fields,
                all: f.all,
            }
        }
        Command::List => Request::List {},
        Command::Stats { target } => Request::Stats { target },
        Command::Status => Request::Status {},
        Command::Alerts { watch: true } => return watch(&cli.socket, cli.json),
        Command::Alerts { watch: false } => Request::Alerts {},
        Command::Run { group, cmd } => {
            let response = call(
                &cli.socket,
                &Request::Move {
                    group,
                    pids: vec![std::process::id()],
                },
            )?;
            if !response.ok {
                return Ok(refused(&response, cli.json));
            }
            let err = std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec();
            return Err(format!("cannot run {}: {err}", cmd[0]));
        }
        Command::Move { group, pids } => Request::Move { group, pids },
        Command::Reload => Request::Reload {},
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "rlctl", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| e.to_string())?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let response = call(&cli.socket, &request)?;
    if !response.ok {
        return Ok(refused(&response, cli.json));
    }
    let result = response.result.unwrap_or_default();
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render(&request, &result));
    Ok(ExitCode::SUCCESS)
}

fn usage(message: &str) -> Result<ExitCode, String> {
    eprintln!("rlctl: {message}");
    Ok(ExitCode::from(2))
}

fn refused(response: &Response, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(response).unwrap_or_default()
        );
    }
    if let Some(error) = &response.error {
        eprintln!("rlctl: {}", error.message);
    }
    ExitCode::FAILURE
}

/// `rlctl alerts --watch`: the current alerts, then each transition as it happens.
fn watch(socket: &Path, json: bool) -> Result<ExitCode, String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach {}: {e}", socket.display()))?;
    (&stream)
        .write_all(request_line(&Request::WatchAlerts {}).as_bytes())
        .map_err(|e| e.to_string())?;
    let mut first = true;
    for line in BufReader::new(&stream).lines() {
        let line = line.map_err(|e| format!("reading from {}: {e}", socket.display()))?;
        if json {
            println!("{line}");
            std::io::stdout().flush().map_err(|e| e.to_string())?;
            continue;
        }
        let response: Response = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        if !response.ok {
            if let Some(error) = response.error {
                eprintln!("rlctl: {}", error.message);
            }
            continue;
        }
        let result = response.result.unwrap_or_default();
        if first {
            print!("{}", render(&Request::Alerts {}, &result));
            first = false;
        } else {
            let a = &result["event"];
            println!(
                "{:<8} {:<9} {:<28} {:<20} {}",
                a["state"].as_str().unwrap_or(""),
                a["severity"].as_str().unwrap_or(""),
                a["rule"].as_str().unwrap_or(""),
                a["target"].as_str().unwrap_or(""),
                a["summary"].as_str().unwrap_or("")
            );
        }
        std::io::stdout().flush().map_err(|e| e.to_string())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends one request and reads one response.
fn call(socket: &Path, request: &Request) -> Result<Response, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            format!(
                "cannot reach {}: {e} (is rlagent running?)",
                socket.display()
            )
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied: {} is for root and the rlagent group",
            socket.display()
        ),
        _ => format!("cannot reach {}: {e}", socket.display()),
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request_line(request).as_bytes())
        .map_err(|e| format!("sending to {}: {e}", socket.display()))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("reading from {}: {e}", socket.display()))?;
    serde_json::from_str(&line).map_err(|e| format!("the agent's answer is not valid: {e}"))
}

/// Tables for people.
fn render(request: &Request, result: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    match request {
        Request::SetQuota { .. } => {
            let set = result["set"].as_object().cloned().unwrap_or_default();
            let fields: Vec<String> = set
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            let _ = writeln!(
                out,
                "{}: set {}",
                result["target"].as_str().unwrap_or(""),
                fields.join(" ")
            );
        }
        Request::ClearQuota { .. } => {
            let fields: Vec<&str> = result["cleared"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{}: cleared {}",
                result["target"].as_str().unwrap_or(""),
                fields.join(" ")
            );
        }
        Request::List {} => {
            let _ = writeln!(
                out,
                "{:<28} {:<12} {:<10} SOURCE",
                "TARGET", "FIELD", "VALUE"
            );
            for target in result["targets"].as_array().into_iter().flatten() {
                for (field, v) in target["fields"].as_object().into_iter().flatten() {
                    let _ = writeln!(
                        out,
                        "{:<28} {:<12} {:<10} {}",
                        target["target"].as_str().unwrap_or(""),
                        field,
                        v["value"].as_str().unwrap_or(""),
                        v["source"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Request::Stats { .. } => match serde_json::from_value::<Stats>(result.clone()) {
            Ok(stats) => out.push_str(&rlagent::stats::table(&stats)),
            Err(e) => {
                let _ = writeln!(out, "(unreadable stats: {e})");
            }
        },
        Request::Status {} => {
            for (k, v) in result.as_object().into_iter().flatten() {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Array(a) => a
                        .iter()
                        .map(|x| x.as_str().unwrap_or("").to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                    other => other.to_string(),
                };
                let _ = writeln!(out, "{k:<20} {text}");
            }
        }
        Request::Move { .. } => {
            let _ = writeln!(
                out,
                "moved {} into {}",
                result["moved"].as_array().map_or(0, Vec::len),
                result["cgroup"].as_str().unwrap_or("")
            );
        }
        Request::Reload {} => out.push_str("reloaded\n"),
        Request::WatchAlerts {} => {}
        Request::Alerts {} => {
            let alerts = result["alerts"].as_array().cloned().unwrap_or_default();
            if alerts.is_empty() {
                out.push_str("no alerts pending or firing\n");
            } else {
                let _ = writeln!(
                    out,
                    "{:<8} {:<9} {:<28} {:<20} SUMMARY",
                    "STATE", "SEVERITY", "RULE", "TARGET"
                );
            }
            for a in alerts {
                let _ = writeln!(
                    out,
                    "{:<8} {:<9} {:<28} {:<20} {}",
                    a["state"].as_str().unwrap_or(""),
                    a["severity"].as_str().unwrap_or(""),
                    a["rule"].as_str().unwrap_or(""),
                    a["target"].as_str().unwrap_or(""),
                    a["summary"].as_str().unwrap_or("")
                );
            }
        }
    }
    out
}
