//! `rlctl alerts [--watch]`.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::ExitCode,
};

use rlagent::{
    control::protocol::{request_line, AlertEvent, AlertsResult, Request, Response},
    model::alert::Alert,
};

use crate::client;

fn row(a: &Alert) -> String {
    format!(
        "{:<8} {:<9} {:<28} {:<20} {}\n",
        a.state, a.severity, a.rule, a.target, a.summary
    )
}

fn table(r: &AlertsResult) -> String {
    if r.alerts.is_empty() {
        return "no alerts pending or firing\n".to_string();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<9} {:<28} {:<20} SUMMARY",
        "STATE", "SEVERITY", "RULE", "TARGET"
    );
    for a in &r.alerts {
        out.push_str(&row(a));
    }
    out
}

pub fn list(socket: &Path, json: bool) -> Result<ExitCode, String> {
    client::show(socket, json, &Request::Alerts {}, table)
}

/// The current alerts, then each transition as it happens.
pub fn watch(socket: &Path, json: bool) -> Result<ExitCode, String> {
    let stream = client::connect(socket)?;
    (&stream)
        .write_all(request_line(&Request::WatchAlerts {}).as_bytes())
        .map_err(|e| e.to_string())?;
    let mut first = true;
    for line in BufReader::new(&stream).lines() {
        let line = line.map_err(|e| format!("reading from {}: {e}", socket.display()))?;
        let response: Response = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        if json {
            println!("{line}");
            if first && !response.ok {
                return Ok(ExitCode::FAILURE);
            }
        } else {
            if !response.ok {
                let code = client::refused(&response, false);
                if first {
                    // Refused outright (busy, not allowed): the watch never started.
                    return Ok(code);
                }
            } else if first {
                print!("{}", table(&response.result::<AlertsResult>()?));
            } else {
                print!("{}", row(&response.result::<AlertEvent>()?.event));
            }
        }
        first = false;
        std::io::stdout().flush().map_err(|e| e.to_string())?;
    }
    Ok(ExitCode::SUCCESS)
}
