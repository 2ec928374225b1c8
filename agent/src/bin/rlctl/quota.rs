//! `rlctl set-quota` and `rlctl clear-quota`.

use std::{collections::BTreeMap, path::Path, process::ExitCode};

use rlagent::{
    control::protocol::{ClearQuotaResult, Request, SetQuotaResult},
    model::{quota::Field, text::escaped},
};

use crate::{
    client::{self, Outcome},
    usage, ClearArgs, QuotaArgs,
};

pub fn set(socket: &Path, json: bool, target: String, q: QuotaArgs) -> Result<ExitCode, String> {
    let quota: BTreeMap<Field, String> = [
        (Field::Cpu, q.cpu),
        (Field::Memory, q.memory),
        (Field::MemoryHigh, q.memory_high),
        (Field::Pids, q.pids),
        (Field::Conns, q.conns),
        (Field::ConnRate, q.conn_rate),
        (Field::ConnBurst, q.conn_burst),
        (Field::Mode, q.mode),
    ]
    .into_iter()
    .filter_map(|(f, v)| Some((f, v?)))
    .collect();
    if quota.is_empty() {
        return usage("set-quota needs at least one of --cpu --memory --memory-high --pids --conns --conn-rate --conn-burst --mode");
    }
    let request = Request::SetQuota { target, quota };
    let r = match client::request::<SetQuotaResult>(socket, json, &request)? {
        Outcome::Refused(code) => return Ok(code),
        Outcome::Done(r) => r,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
        );
    } else {
        let fields: Vec<String> = r.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{}: set {}", escaped(&r.target), fields.join(" "));
    }
    for (field, reason) in &r.not_enforced {
        eprintln!(
            "rlctl: warning: {} {field} is not enforced: {}",
            escaped(&r.target),
            escaped(reason)
        );
    }
    // Saved, but none of it holds: a distinct exit code, so scripts notice.
    if !r.not_enforced.is_empty() && r.not_enforced.len() == r.set.len() {
        return Ok(ExitCode::from(crate::NOT_ENFORCED));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn clear(socket: &Path, json: bool, target: String, f: ClearArgs) -> Result<ExitCode, String> {
    let fields: Vec<Field> = [
        (Field::Cpu, f.cpu),
        (Field::Memory, f.memory),
        (Field::MemoryHigh, f.memory_high),
        (Field::Pids, f.pids),
        (Field::Conns, f.conns),
        (Field::ConnRate, f.conn_rate),
        (Field::ConnBurst, f.conn_burst),
        (Field::Mode, f.mode),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
    .collect();
    if fields.is_empty() && !f.all {
        return usage("clear-quota needs fields (--cpu, --memory, ...) or --all");
    }
    let request = Request::ClearQuota {
        target,
        fields,
        all: f.all,
    };
    client::show(socket, json, &request, |r: &ClearQuotaResult| {
        let fields: Vec<&str> = r.cleared.iter().map(|f| f.name()).collect();
        format!("{}: cleared {}\n", r.target, fields.join(" "))
    })
}
