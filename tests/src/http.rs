//! Talking HTTP to the agent's /metrics and to the Prometheus tools the tests run.

use std::{io::Write, net::TcpStream, process::Child};

/// GET `path` from this scratch's agent's metrics listener; (status line and headers, body).
pub fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::Read;
    let mut s =
        TcpStream::connect(("127.0.0.1", port)).expect("connecting to the metrics listener");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        head.to_string(),
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

/// Decodes an HTTP/1.1 chunked body (Go servers answer that way).
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

/// The value of one sample line (`name{labels}`) in a Prometheus text body.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// An external tool named by an environment variable (`cargo xtask test` sets them:
/// RLAGENT_PROMTOOL, RLAGENT_PROMETHEUS, RLAGENT_ALERTMANAGER). Missing: a skip with a
/// message, or a failure under RLAGENT_REQUIRE_PRIVILEGED=1.
pub fn external_tool(var: &str, test: &str) -> Option<std::ffi::OsString> {
    let tool = std::env::var_os(var);
    if tool.is_none() {
        if std::env::var("RLAGENT_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("{test}: {var} is not set (cargo xtask test sets it)");
        }
        eprintln!("SKIP {test}: {var} is not set");
    }
    tool
}

/// A server process the test started (Prometheus, Alertmanager), with its scratch dir,
/// killed when dropped.
pub struct ServerProcess {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
