//! `rlctl set-quota` and `rlctl clear-quota`.

use std::{path::Path, process::ExitCode};

use rlagent::{
    control::protocol::{ClearQuotaResult, Request, SetQuotaResult},
    model::text::escaped,
};

use crate::{
    client::{self, Outcome},
    fields::{self, ClearArgs, QuotaArgs},
    usage,
};

pub fn set(socket: &Path, json: bool, target: String, q: QuotaArgs) -> Result<ExitCode, String> {
    let quota = q.0;
    if quota.is_empty() {
        return usage(&format!(
            "set-quota needs at least one of {}",
            fields::flags()
        ));
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
    let fields = f.fields;
    if fields.is_empty() && !f.all {
        return usage(&format!(
            "clear-quota needs fields ({}) or --all",
            fields::flags()
        ));
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
