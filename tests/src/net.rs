//! Loopback listeners and `conn-helper` processes that connect as test UIDs.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use crate::*;

/// TCP listeners on 127.0.0.1 and ::1 that accept and hold every connection.
pub struct Listener {
    pub port4: u16,
    pub port6: u16,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Listener {
    /// Holds every accepted connection (tests inspect counts while they are open).
    pub fn new() -> Self {
        Self::with_hold(true)
    }

    /// Closes accepted connections at once (benchmarks: flat memory, no fd limit).
    pub fn dropping() -> Self {
        Self::with_hold(false)
    }

    /// MPTCP listeners (`IPPROTO_MPTCP`) that close accepted connections at once.
    pub fn mptcp() -> Self {
        Self::build(false, |addr| {
            use std::os::fd::{AsRawFd, FromRawFd};
            let v6 = addr.starts_with('[');
            let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
            // A raw socket(2): nix's SockProtocol has no IPPROTO_MPTCP (262).
            // SAFETY: socket(2) takes no pointers; the result is checked.
            let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 262) };
            assert!(fd >= 0, "MPTCP socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a new socket that nothing else owns.
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            let sa: std::net::SocketAddr = addr.parse().unwrap();
            let sock = nix::sys::socket::SockaddrStorage::from(sa);
            nix::sys::socket::bind(listener.as_raw_fd(), &sock).expect("binding MPTCP listener");
            nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(1024).unwrap())
                .expect("listen");
            listener
        })
    }

    fn with_hold(hold: bool) -> Self {
        Self::build(hold, |addr| {
            TcpListener::bind(addr).expect("binding loopback listener")
        })
    }

    fn build(hold: bool, bind: impl Fn(&str) -> TcpListener) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let mut ports = Vec::new();
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let listener = bind(addr);
            listener.set_nonblocking(true).unwrap();
            ports.push(listener.local_addr().unwrap().port());
            let (stop, held) = (stop.clone(), held.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) if hold => held.lock().unwrap().push(stream),
                        Ok(_) => {}
                        Err(_) => thread::sleep(Duration::from_millis(1)),
                    }
                }
            });
        }
        Self {
            port4: ports[0],
            port6: ports[1],
            stop,
            held,
        }
    }

    /// Drops accepted connections (keeps memory flat in long runs).
    pub fn forget_accepted(&self) {
        self.held.lock().unwrap().clear();
    }
}

impl Default for Listener {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A loopback port nothing listens on: free to bind (a test's own server), or refused
/// when connected to. Taken below the kernel's ephemeral range (32768 and up by default),
/// so no outgoing connection of another process takes it meanwhile, and never the same
/// twice in one test binary, where tests run in parallel.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Each test binary starts at its own place in 20000..32000.
    let base = 20_000 + (std::process::id() % 600) * 20;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base - 20_000 + offset) % 12_000;
        let port = u16::try_from(port).expect("below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
        {
            return port;
        }
    }
}

/// Outcome of one connect() by a helper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    Ok(u64),
    Err(i32, u64),
}

impl Connect {
    pub fn id(self) -> u64 {
        match self {
            Self::Ok(id) | Self::Err(_, id) => id,
        }
    }
    pub fn is_ok(self) -> bool {
        matches!(self, Self::Ok(_))
    }
}

/// A `conn-helper` process in `cgroup`, running as `uid`.
pub struct Helper {
    child: Option<Child>,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    pub fn spawn(cgroup: &Path, uid: u32) -> Self {
        Self::spawn_by(&[], cgroup, uid)
    }

    /// A helper started through `wrapper` (a command and its arguments that run the
    /// helper, such as `nsenter --net=...`).
    pub fn spawn_by(wrapper: &[&str], cgroup: &Path, uid: u32) -> Self {
        let helper = target_bin("conn-helper");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&helper);
                c
            }
            None => Command::new(&helper),
        };
        let mut child = command
            .arg(cgroup)
            .arg(uid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting conn-helper");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut helper = Self {
            child: Some(child),
            stdin,
            stdout,
        };
        assert_eq!(helper.read_line(), "ready");
        helper
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading helper");
        assert!(!line.is_empty(), "conn-helper exited");
        line.trim_end().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a command without waiting for the reply (to start several helpers at once).
    pub fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("writing helper");
        self.stdin.flush().unwrap();
    }

    pub fn reply(&mut self) -> String {
        self.read_line()
    }

    pub fn cmd(&mut self, command: &str) -> String {
        self.send(command);
        self.read_line()
    }

    pub fn connect(&mut self, kind: &str, port: u16) -> Connect {
        let reply = self.cmd(&format!("connect {kind} {port}"));
        let words: Vec<&str> = reply.split_whitespace().collect();
        match words.as_slice() {
            ["ok", id] => Connect::Ok(id.parse().unwrap()),
            ["err", errno, id] => Connect::Err(errno.parse().unwrap(), id.parse().unwrap()),
            _ => panic!("unexpected helper reply {reply:?}"),
        }
    }

    /// connect() again on socket `id`; `Ok(())` or the errno.
    pub fn reconnect(&mut self, id: u64, port: u16) -> Result<(), i32> {
        let reply = self.cmd(&format!("reconnect {id} {port}"));
        match reply.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["ok"] => Ok(()),
            ["err", errno] => Err(errno.parse().unwrap()),
            _ => panic!("unexpected helper reply {reply:?}"),
        }
    }

    pub fn close(&mut self, id: u64) {
        assert_eq!(self.cmd(&format!("close {id}")), "ok");
    }

    pub fn close_all(&mut self) {
        assert_eq!(self.cmd("close-all"), "ok");
    }

    /// Lets the helper exit by itself, sockets still open.
    pub fn exit(mut self) {
        self.send("exit");
        self.child.take().unwrap().wait().unwrap();
    }

    /// SIGKILL, sockets still open.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
