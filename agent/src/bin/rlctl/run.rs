//! `rlctl run` (rlctl moves itself into the group, then execs the command) and
//! `rlctl move`.

use std::{os::unix::process::CommandExt, path::Path, process::ExitCode};

use rlagent::control::protocol::{MoveResult, Request};

use crate::client::{self, Outcome};

pub fn run(socket: &Path, json: bool, group: String, cmd: Vec<String>) -> Result<ExitCode, String> {
    let request = Request::Move {
        group,
        pids: vec![std::process::id()],
    };
    match client::request::<MoveResult>(socket, json, &request)? {
        Outcome::Refused(code) => Ok(code),
        Outcome::Done(_) => {
            let err = std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec();
            Err(format!("cannot run {}: {err}", cmd[0]))
        }
    }
}

pub fn move_pids(
    socket: &Path,
    json: bool,
    group: String,
    pids: Vec<u32>,
) -> Result<ExitCode, String> {
    client::show(
        socket,
        json,
        &Request::Move { group, pids },
        |r: &MoveResult| format!("moved {} into {}\n", r.moved.len(), r.cgroup.display()),
    )
}
