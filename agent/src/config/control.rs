//! `[control]` and `[metrics]`: who may reach the agent, and where.

use std::{net::SocketAddr, path::PathBuf};

use super::{
    raw::{RawControl, RawMetrics},
    ConfigError, Source,
};

pub(super) struct Control {
    pub socket: PathBuf,
    pub mode: u32,
    pub group: String,
    pub operator_cgroups: Vec<PathBuf>,
    pub metrics_listen: SocketAddr,
}

pub(super) fn validate(
    at: &Source,
    control: &RawControl,
    metrics: &RawMetrics,
) -> Result<Control, ConfigError> {
    let mode = &control.mode;
    let socket_mode = u32::from_str_radix(mode.get_ref(), 8)
        .ok()
        .filter(|m| *m <= 0o777 && mode.get_ref().len() >= 3)
        .ok_or_else(|| {
            at.invalid(
                at.line(mode.span()),
                "mode",
                mode.get_ref(),
                "expected octal permission bits such as \"0660\"",
            )
        })?;
    let listen = &metrics.listen;
    let metrics_listen = listen.get_ref().parse().map_err(|_| {
        at.invalid(
            at.line(listen.span()),
            "listen",
            listen.get_ref(),
            "expected an address:port such as 127.0.0.1:9464",
        )
    })?;
    let operator_cgroups = control
        .operator_cgroups
        .iter()
        .map(|path| at.cgroup_path(path, "operator_cgroups", false))
        .collect::<Result<_, _>>()?;
    Ok(Control {
        socket: control.socket.clone(),
        mode: socket_mode,
        group: control.group.clone(),
        operator_cgroups,
        metrics_listen,
    })
}
