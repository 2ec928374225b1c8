//! `[bpf]`: where the programs attach, where they pin, and the kernel-side settings.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{raw::RawBpf, BpfConfig, ConfigError, Source};
use crate::model::{
    duration,
    quota::{ConnRate, Limit, Mode},
    subuid::SubordinateUids,
    units::{parse_burst, parse_count, parse_rate},
};

/// Denial events per UID by default: enough to explain any refusal, too few to flood.
const DEFAULT_EVENT_RATE: ConnRate = ConnRate {
    count: 20,
    period_s: 1,
};
const DEFAULT_EVENT_BURST: u64 = 100;
/// How often idle UID counters are retired: often enough that a host where new UIDs
/// connect all day keeps room, rarely enough to cost nothing.
const DEFAULT_UID_RETIRE_INTERVAL: Duration = Duration::from_secs(30);

/// Connect errnos an operator may choose; each makes sense to a program that connect()s.
const DENY_ERRNOS: &[(&str, i32)] = &[
    ("EPERM", libc::EPERM),
    ("EACCES", libc::EACCES),
    ("ECONNREFUSED", libc::ECONNREFUSED),
    ("EAGAIN", libc::EAGAIN),
    ("ENOBUFS", libc::ENOBUFS),
    ("ENETUNREACH", libc::ENETUNREACH),
    ("EHOSTUNREACH", libc::EHOSTUNREACH),
];

pub(super) fn validate(at: &Source, raw: &RawBpf) -> Result<BpfConfig, ConfigError> {
    let attach_cgroup = at.cgroup_path(&raw.attach_cgroup, "attach_cgroup", true)?;
    let max_tracked_sockets = max_tracked_sockets(at, raw)?;
    let host_conns = host_conns(at, raw, max_tracked_sockets)?;
    let mode = match &raw.mode {
        None => Mode::Enforce,
        Some(v) => Mode::parse("mode", v.get_ref())
            .map_err(|e| at.invalid(at.line(v.span()), "mode", v.get_ref(), &e.to_string()))?,
    };
    let subordinate_uids = match &raw.subordinate_uids {
        None => SubordinateUids::Owner,
        Some(v) => SubordinateUids::parse(v.get_ref()).ok_or_else(|| {
            at.invalid(
                at.line(v.span()),
                "subordinate_uids",
                v.get_ref(),
                "expected owner (charge a subordinate UID's connections to the user who owns its range) or separate",
            )
        })?,
    };
    Ok(BpfConfig {
        attach_cgroup,
        pin_path: absolute(at, "pin_path", &raw.pin_path)?,
        count_udp: raw.count_udp,
        host_conns,
        uid_min: raw.uid_min,
        deny_errno: deny_errno(at, raw)?,
        max_tracked_sockets,
        on_full: raw.on_full,
        mode,
        event_rate: event_rate(at, raw)?,
        event_burst: event_burst(at, raw)?,
        uid_retire_interval: uid_retire_interval(at, raw)?,
        subordinate_uids,
        subuid_file: absolute(at, "subuid_file", &raw.subuid_file)?,
        // Read by `Config::load`, which does the file I/O.
        subordinate: Vec::new(),
    })
}

/// `path` of `key`, which must be absolute.
fn absolute(at: &Source, key: &'static str, path: &Path) -> Result<PathBuf, ConfigError> {
    if !path.is_absolute() {
        return Err(at.invalid(0, key, &path.display().to_string(), "must be absolute"));
    }
    Ok(path.to_path_buf())
}

fn max_tracked_sockets(at: &Source, raw: &RawBpf) -> Result<u32, ConfigError> {
    let max_sockets = &raw.max_tracked_sockets;
    u32::try_from(*max_sockets.get_ref())
        .ok()
        .filter(|n| (1024..=1 << 24).contains(n))
        .ok_or_else(|| {
            at.invalid(
                at.line(max_sockets.span()),
                "max_tracked_sockets",
                &max_sockets.get_ref().to_string(),
                "expected a whole number from 1024 to 16777216",
            )
        })
}

/// The host-wide cap, `None` for none. Charges no enforce-mode cap bounds take at most
/// half the charged-socket map; past that a connect() is let through uncharged, so a host
/// cap above that half could be passed by such connections without ever being reached.
fn host_conns(
    at: &Source,
    raw: &RawBpf,
    max_tracked_sockets: u32,
) -> Result<Option<u64>, ConfigError> {
    let Some(v) = &raw.host_conns else {
        return Ok(None);
    };
    let text = v.get_ref().to_string();
    let cap = parse_count("host_conns", &text, 0)
        .map_err(|e| at.invalid(at.line(v.span()), "host_conns", &text, &e.to_string()))?
        .value();
    let budget = u64::from(max_tracked_sockets / 2);
    match cap {
        Some(cap) if cap > budget => Err(at.invalid(
            at.line(v.span()),
            "host_conns",
            &cap.to_string(),
            &format!(
                "cannot be honoured with max_tracked_sockets = {max_tracked_sockets}: \
                 connections no cap bounds are tracked up to half of it ({budget}); \
                 set max_tracked_sockets to at least {}",
                cap.saturating_mul(2)
            ),
        )),
        _ => Ok(cap),
    }
}

fn deny_errno(at: &Source, raw: &RawBpf) -> Result<i32, ConfigError> {
    let errno_name = raw.deny_errno.get_ref();
    DENY_ERRNOS
        .iter()
        .find(|(name, _)| name == errno_name)
        .map(|(_, errno)| *errno)
        .ok_or_else(|| {
            let names: Vec<&str> = DENY_ERRNOS.iter().map(|(n, _)| *n).collect();
            at.invalid(
                at.line(raw.deny_errno.span()),
                "deny_errno",
                errno_name,
                &format!("expected one of {}", names.join(", ")),
            )
        })
}

fn event_rate(at: &Source, raw: &RawBpf) -> Result<ConnRate, ConfigError> {
    let Some(v) = &raw.event_rate else {
        return Ok(DEFAULT_EVENT_RATE);
    };
    match parse_rate(v.get_ref()) {
        Ok(Limit::Value(rate)) => Ok(rate),
        Ok(Limit::Max) => Err(at.invalid(
            at.line(v.span()),
            "event_rate",
            v.get_ref(),
            "events per second or minute such as 20/s (max is not allowed: the rate is what keeps a flood of denials from flooding the agent)",
        )),
        Err(e) => Err(at.invalid(at.line(v.span()), "event_rate", v.get_ref(), &e.to_string())),
    }
}

fn event_burst(at: &Source, raw: &RawBpf) -> Result<u64, ConfigError> {
    let Some(v) = &raw.event_burst else {
        return Ok(DEFAULT_EVENT_BURST);
    };
    parse_burst(&v.get_ref().to_string()).map_err(|e| {
        at.invalid(
            at.line(v.span()),
            "event_burst",
            &v.get_ref().to_string(),
            &e.to_string(),
        )
    })
}

fn uid_retire_interval(at: &Source, raw: &RawBpf) -> Result<Duration, ConfigError> {
    let Some(v) = &raw.uid_retire_interval else {
        return Ok(DEFAULT_UID_RETIRE_INTERVAL);
    };
    duration::parse(v.get_ref())
        .filter(|d| (Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(d))
        .ok_or_else(|| {
            at.invalid(
                at.line(v.span()),
                "uid_retire_interval",
                v.get_ref(),
                "expected a duration from 1s to 24h such as 30s or 5m",
            )
        })
}
