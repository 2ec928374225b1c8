//! `rlctl events [--follow] [--uid U]` and `rlctl why user:<u>`.

use std::{fmt::Write as _, path::Path, process::ExitCode, time::SystemTime};

use rlagent::{
    control::protocol::{EventLine, EventsResult, Request, Response, WhyResult},
    model::{event::DenialEvent, text::escaped},
};

use crate::client;

pub fn time(ms: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

const HEADER: &str = "TIME                 UID     PID      COMM             GROUP        REASON     MODE     DESTINATION                  LIMIT\n";

/// One event; its text fields escaped (a process names itself), so a row is one line.
fn row(e: &DenialEvent) -> String {
    format!(
        "{:<20} {:<7} {:<8} {:<16} {:<12} {:<10} {:<8} {:<28} {}\n",
        time(e.time_ms),
        e.uid,
        e.pid,
        escaped(&e.comm),
        escaped(e.group.as_deref().unwrap_or("-")),
        e.reason,
        if e.monitor { "monitor" } else { "denied" },
        escaped(&e.destination),
        e.limit
    )
}

fn table(r: &EventsResult) -> String {
    if r.events.is_empty() {
        return "no denial events kept\n".to_string();
    }
    let mut out = HEADER.to_string();
    for e in &r.events {
        out.push_str(&row(e));
    }
    out
}

/// The last events; with `follow`, then every new one as it happens.
pub fn events(
    socket: &Path,
    json: bool,
    uid: Option<u32>,
    limit: Option<usize>,
    follow: bool,
) -> Result<ExitCode, String> {
    if follow {
        return client::watch(
            socket,
            json,
            &Request::WatchEvents { uid },
            |r: &Response| {
                let first = r.result::<EventsResult>()?;
                Ok(if first.events.is_empty() {
                    HEADER.to_string()
                } else {
                    table(&first)
                })
            },
            |r: &Response| Ok(row(&r.result::<EventLine>()?.event)),
        );
    }
    client::show(socket, json, &Request::Events { uid, limit }, table)
}

fn why_text(r: &WhyResult) -> String {
    let mut out = String::new();
    if !r.penalties.is_empty() {
        let _ = write!(out, "penalties:\n{}", crate::penalty::HEADER);
        for p in &r.penalties {
            out.push_str(&crate::penalty::line(p));
        }
        out.push('\n');
    }
    if r.reasons.is_empty() {
        let _ = writeln!(out, "{}: no connect() was denied (nor would be in monitor mode) since the programs were loaded", escaped(&r.target));
        return out;
    }
    for reason in &r.reasons {
        let mut counts = Vec::new();
        if reason.denied > 0 {
            counts.push(format!("{} denied", reason.denied));
        }
        if reason.would_deny > 0 {
            counts.push(format!(
                "{} would be denied (monitor mode)",
                reason.would_deny
            ));
        }
        if counts.is_empty() {
            counts.push(format!("{} recent events", reason.events));
        }
        let last = reason
            .last_ms
            .map_or(String::new(), |ms| format!(", last at {}", time(ms)));
        let _ = writeln!(
            out,
            "{}: {} by {}{last}\n    limit: {}",
            escaped(&r.target),
            counts.join(", "),
            reason.reason,
            escaped(&reason.limit)
        );
    }
    if let Some(c) = &r.counters {
        if c.events_dropped > 0 {
            let _ = writeln!(
                out,
                "({} denials of this user were not sent as events: over the per-user event rate)",
                c.events_dropped
            );
        }
    }
    if !r.events.is_empty() {
        let _ = write!(out, "\nlast events:\n{HEADER}");
        for e in &r.events {
            out.push_str(&row(e));
        }
    }
    out
}

/// Why a user's connections were refused.
pub fn why(socket: &Path, json: bool, target: String) -> Result<ExitCode, String> {
    client::show(socket, json, &Request::Why { target }, why_text)
}
