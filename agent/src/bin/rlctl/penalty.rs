//! `rlctl penalties` and `rlctl release`: the penalty box.

use std::{fmt::Write as _, path::Path, process::ExitCode};

use rlagent::{
    control::protocol::{PenaltiesResult, ReleaseResult, Request},
    model::text::escaped,
    observe::adapt::Penalty,
};

use crate::{client, events::time};

/// One penalty as a line of text (also used by `rlctl why`).
pub fn line(p: &Penalty) -> String {
    format!(
        "{:<16} {:<16} {:<4} {:<20} {:<20} {:<7} {}\n",
        escaped(&p.target),
        escaped(&p.rule),
        p.tier,
        time(p.since * 1000),
        time(p.until * 1000),
        if p.monitor { "monitor" } else { "enforce" },
        escaped(&p.reason)
    )
}

pub const HEADER: &str = "TARGET           RULE             TIER SINCE                UNTIL                MODE    REASON\n";

fn table(r: &PenaltiesResult) -> String {
    let mut out = String::from(HEADER);
    for p in &r.penalties {
        out.push_str(&line(p));
    }
    if !r.adapt.is_empty() {
        out.push_str("\nadaptive rules holding:\n");
        for a in &r.adapt {
            let _ = writeln!(
                out,
                "  {} on {} ({}): {}",
                escaped(&a.rule),
                escaped(&a.target),
                if a.monitor { "monitor" } else { "enforce" },
                escaped(&a.reason)
            );
        }
    }
    out
}

pub fn penalties(socket: &Path, json: bool) -> Result<ExitCode, String> {
    client::show(socket, json, &Request::Penalties {}, table)
}

pub fn release(socket: &Path, json: bool, target: String) -> Result<ExitCode, String> {
    client::show(
        socket,
        json,
        &Request::Release { target },
        |r: &ReleaseResult| {
            let mut out = String::new();
            for d in &r.lifted {
                let _ = writeln!(
                    out,
                    "{}: {} tier {} lifted",
                    escaped(&r.target),
                    escaped(&d.source),
                    d.tier.unwrap_or(0)
                );
            }
            out
        },
    )
}
