//! The socket exchange: one request line out, one response line back, and the typed result
//! or the refusal.

use std::{
    io::{BufRead, BufReader},
    os::{fd::AsRawFd, unix::net::UnixStream},
    path::Path,
    process::ExitCode,
    time::Duration,
};

use rlagent::{
    control::protocol::{request_line, Request, Response},
    model::text::escaped,
};
use serde::{de::DeserializeOwned, Serialize};

/// Connects, with messages that say what to check.
pub fn connect(socket: &Path) -> Result<UnixStream, String> {
    UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            format!(
                "cannot reach {}: {e} (is rlagent running?)",
                socket.display()
            )
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied: {} is for root and the agent's control group",
            socket.display()
        ),
        _ => format!("cannot reach {}: {e}", socket.display()),
    })
}

/// Writes one request line. MSG_NOSIGNAL: rlctl lets SIGPIPE end it quietly when its own
/// output is cut (`| head`), but an agent that closes the socket (busy) must give an
/// error message instead.
fn send_request(stream: &UnixStream, request: &Request) -> std::io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    let line = request_line(request);
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        let n = send(stream.as_raw_fd(), rest, MsgFlags::MSG_NOSIGNAL)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Sends one request and reads one response.
pub fn call(socket: &Path, request: &Request) -> Result<Response, String> {
    let stream = connect(socket)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    send_request(&stream, request).map_err(|e| format!("sending to {}: {e}", socket.display()))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("reading from {}: {e}", socket.display()))?;
    serde_json::from_str(&line).map_err(|e| format!("the agent's answer is not valid: {e}"))
}

/// The outcome of one request: the typed result, or the exit code of a refusal (already
/// reported on stderr, and on stdout with `--json`).
pub enum Outcome<T> {
    Done(T),
    Refused(ExitCode),
}

/// Sends `request` and decodes its result as `T`.
pub fn request<T: DeserializeOwned>(
    socket: &Path,
    json: bool,
    request: &Request,
) -> Result<Outcome<T>, String> {
    let response = call(socket, request)?;
    if !response.ok {
        return Ok(Outcome::Refused(refused(&response, json)));
    }
    response.result().map(Outcome::Done)
}

/// Reports a refusal: the message on stderr (and the whole answer with `--json`); exit 1.
pub fn refused(response: &Response, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(response).unwrap_or_default()
        );
    }
    if let Some(error) = &response.error {
        // It may quote a name or path a tenant chose.
        eprintln!("rlctl: {}", escaped(&error.message));
    }
    ExitCode::FAILURE
}

/// Sends `request` and prints its result: as JSON with `--json`, else with `table`.
pub fn show<T: DeserializeOwned + Serialize>(
    socket: &Path,
    json: bool,
    req: &Request,
    table: impl FnOnce(&T) -> String,
) -> Result<ExitCode, String> {
    match request::<T>(socket, json, req)? {
        Outcome::Refused(code) => Ok(code),
        Outcome::Done(result) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", table(&result));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Sends a watch request and prints its stream until the agent closes it: each line as
/// JSON with `--json`, else the first answer with `first` and every later one with `each`.
pub fn watch(
    socket: &Path,
    json: bool,
    req: &Request,
    first: impl Fn(&Response) -> Result<String, String>,
    each: impl Fn(&Response) -> Result<String, String>,
) -> Result<ExitCode, String> {
    use std::io::Write;
    let stream = connect(socket)?;
    send_request(&stream, req).map_err(|e| format!("sending to {}: {e}", socket.display()))?;
    let mut is_first = true;
    for line in BufReader::new(&stream).lines() {
        let line = line.map_err(|e| format!("reading from {}: {e}", socket.display()))?;
        let response: Response = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        if json {
            println!("{line}");
            if is_first && !response.ok {
                return Ok(ExitCode::FAILURE);
            }
        } else if !response.ok {
            let code = refused(&response, false);
            if is_first {
                // Refused outright (busy, not allowed): the watch never started.
                return Ok(code);
            }
        } else if is_first {
            print!("{}", first(&response)?);
        } else {
            print!("{}", each(&response)?);
        }
        is_first = false;
        std::io::stdout().flush().map_err(|e| e.to_string())?;
    }
    Ok(ExitCode::SUCCESS)
}
