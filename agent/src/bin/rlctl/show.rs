//! `rlctl list`, `stats`, `status` and `reload`.

use std::{fmt::Write, path::Path, process::ExitCode};

use rlagent::{
    control::protocol::{ListResult, ReloadResult, Request, Status},
    model::{
        feature::FeatureState,
        text::{escaped, escaped_path},
    },
    observe::table,
};

use crate::client;

pub fn list(socket: &Path, json: bool) -> Result<ExitCode, String> {
    client::show(socket, json, &Request::List {}, |r: &ListResult| {
        let mut out = format!(
            "{:<28} {:<12} {:<10} {:<8} ENFORCED\n",
            "TARGET", "FIELD", "VALUE", "SOURCE"
        );
        for target in &r.targets {
            for (field, v) in &target.fields {
                let source = serde_json::to_value(&v.source).unwrap_or_default();
                let enforced = match &v.not_enforced {
                    None => "yes".to_string(),
                    Some(reason) => format!("no: {}", escaped(reason)),
                };
                let _ = writeln!(
                    out,
                    "{:<28} {:<12} {:<10} {:<8} {enforced}",
                    escaped(&target.target),
                    field.name(),
                    escaped(&v.value),
                    source.as_str().unwrap_or_default()
                );
            }
        }
        out
    })
}

pub fn stats(socket: &Path, json: bool, target: Option<String>) -> Result<ExitCode, String> {
    client::show(socket, json, &Request::Stats { target }, table::table)
}

pub fn status(socket: &Path, json: bool) -> Result<ExitCode, String> {
    client::show(socket, json, &Request::Status {}, |s: &Status| {
        let mut out = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(out, "{k:<20} {v}");
        };
        if let Some(h) = &s.host {
            if let Some(input) = &h.adapt_input {
                row("adapt_input", input.clone());
            }
            row("alerts_firing", h.alerts_firing.to_string());
            row(
                "bpf_attach_cgroup",
                escaped_path(&h.bpf_attach_cgroup).to_string(),
            );
            row("bpf_pin_path", escaped_path(&h.bpf_pin_path).to_string());
            row("cgroup_driver", h.cgroup_driver.clone());
            row("cgroup2_mount", escaped_path(&h.cgroup2_mount).to_string());
            row("cgroup_controllers", h.cgroup_controllers.join(" "));
            row("config", escaped_path(&h.config).to_string());
            if !h.pins_missing.is_empty() {
                let missing: Vec<String> = h
                    .pins_missing
                    .iter()
                    .map(|p| escaped_path(p).to_string())
                    .collect();
                row("pins_missing", missing.join(" "));
            }
        }
        row("kernel", s.kernel.clone());
        if let Some(h) = &s.host {
            for f in &h.kernel_features {
                let state = match f.state {
                    FeatureState::Available => "yes".to_string(),
                    FeatureState::Missing => format!("no, so off: {}", escaped(&f.without)),
                    FeatureState::Unknown => format!(
                        "unknown ({}); without it off: {}",
                        escaped(f.detail.as_deref().unwrap_or("the probe failed")),
                        escaped(&f.without)
                    ),
                };
                let required = if f.required { ", required" } else { "" };
                row(
                    "kernel_feature",
                    format!("{} {state}{required}", escaped(&f.name)),
                );
            }
            if !h.skipped_targets.is_empty() {
                row(
                    "skipped_targets",
                    escaped(&h.skipped_targets.join(" ")).to_string(),
                );
            }
            row("targets", h.targets.to_string());
        }
        row("uptime_seconds", s.uptime_seconds.to_string());
        row("version", s.version.clone());
        out
    })
}

pub fn reload(socket: &Path, json: bool) -> Result<ExitCode, String> {
    client::show(socket, json, &Request::Reload {}, |_: &ReloadResult| {
        "reloaded\n".to_string()
    })
}
