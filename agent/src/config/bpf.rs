//! `[bpf]`: where the programs attach, where they pin, and the kernel-side settings.

use super::{raw::RawBpf, BpfConfig, ConfigError, Source};
use crate::model::units::parse_count;

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
    let host_conns = match &raw.host_conns {
        None => None,
        Some(v) => {
            let text = v.get_ref().to_string();
            parse_count("host_conns", &text, 0)
                .map_err(|e| at.invalid(at.line(v.span()), "host_conns", &text, &e.to_string()))?
                .value()
        }
    };
    let errno_name = raw.deny_errno.get_ref();
    let deny_errno = DENY_ERRNOS
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
        })?;
    let max_sockets = &raw.max_tracked_sockets;
    let max_tracked_sockets = u32::try_from(*max_sockets.get_ref())
        .ok()
        .filter(|n| (1024..=1 << 24).contains(n))
        .ok_or_else(|| {
            at.invalid(
                at.line(max_sockets.span()),
                "max_tracked_sockets",
                &max_sockets.get_ref().to_string(),
                "expected a whole number from 1024 to 16777216",
            )
        })?;
    if !raw.pin_path.is_absolute() {
        return Err(at.invalid(
            0,
            "pin_path",
            &raw.pin_path.display().to_string(),
            "must be absolute",
        ));
    }
    Ok(BpfConfig {
        attach_cgroup,
        pin_path: raw.pin_path.clone(),
        count_udp: raw.count_udp,
        host_conns,
        uid_min: raw.uid_min,
        deny_errno,
        max_tracked_sockets,
        on_full: raw.on_full,
    })
}
