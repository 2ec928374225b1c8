//! `rlctl alerts [--watch]`.

use std::{fmt::Write as _, path::Path, process::ExitCode};

use rlagent::{
    control::protocol::{AlertEvent, AlertsResult, Request, Response},
    model::{alert::Alert, text::escaped},
};

use crate::client;

fn row(a: &Alert) -> String {
    format!(
        "{:<8} {:<9} {:<28} {:<20} {}\n",
        a.state,
        a.severity,
        escaped(&a.rule),
        escaped(&a.target),
        escaped(&a.summary)
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
    client::watch(
        socket,
        json,
        &Request::WatchAlerts {},
        |r: &Response| Ok(table(&r.result::<AlertsResult>()?)),
        |r: &Response| Ok(row(&r.result::<AlertEvent>()?.event)),
    )
}
