//! Harness for rlagent's privileged tests and benchmarks: a child cgroup of this host's
//! cgroup2 mount (never the root), a private bpffs for pins, the real `rlagent` binary,
//! loopback listeners and `conn-helper` processes running as test UIDs.
//!
//! Everything created here is removed on drop; only processes started here are killed,
//! by PID.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use rlagent::kernel::bpf::{ConnStats, PinnedMaps};

/// True when this process may run privileged tests (root, cgroup2 mounted). Otherwise
/// prints why and returns false, or panics when `RLAGENT_REQUIRE_PRIVILEGED=1` (CI), where
/// a skip is a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("needs root".to_string())
    } else {
        rlagent::kernel::cgroup::mount::find()
            .err()
            .map(|e| e.to_string())
    };
    let Some(why) = why else { return true };
    if std::env::var("RLAGENT_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: {why}, and RLAGENT_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("SKIP {test}: {why}");
    false
}

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

/// The cgroup v2 path of `pid` relative to the mount (`""` for the root, or when it exited).
pub fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::/"))
        .unwrap_or("")
        .to_string()
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

/// `rlctl --socket <socket>`, to add arguments (and a UID, or piped output) to.
pub fn rlctl(socket: &Path) -> Command {
    let mut cmd = Command::new(target_bin("rlctl"));
    cmd.arg("--socket").arg(socket);
    cmd
}

/// A binary built into the same target directory as the running executable, or in
/// `$RLAGENT_BIN_DIR` (the qemu guest keeps them in /bin).
pub fn target_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("RLAGENT_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "{name} is not built next to {}: run `cargo build --workspace --bins` first (`cargo xtask test` does)",
        exe.display()
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A child cgroup of the cgroup2 mount, removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    /// Relative to the cgroup2 mount, as the config's `attach_cgroup` wants it.
    pub relative: String,
}

impl TestCgroup {
    pub fn new() -> Self {
        let mount = rlagent::kernel::cgroup::mount::find().expect("cgroup2 mount");
        let relative = unique("rlagent-test");
        let path = mount.join(&relative);
        assert_ne!(path, mount, "never the root cgroup");
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path, relative }
    }

    /// A sibling cgroup without programs (for A/B runs), removed on drop.
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        p
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// Removes a cgroup and its descendants, deepest first. Processes in them were started by
/// the test and are gone by now, but rmdir can briefly see them (EBUSY) while they exit.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A test's scratch directory with a config, the pin directory and logs.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    /// A loopback port free when the scratch was made, for this agent's /metrics.
    pub metrics_port: u16,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("rlagent-test")
                .tempdir()
                .expect("tempdir"),
            metrics_port: free_port(),
        }
    }
    pub fn pin_path(&self) -> PathBuf {
        self.dir.path().join("pins")
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("rlagent.toml")
    }
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("rlagent.sock")
    }
    pub fn state_path(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }
    /// `[control]` and `state_path` lines that keep this test's agent to its scratch dir.
    pub fn private_paths(&self) -> String {
        format!(
            "state_path = \"{}\"\n[control]\nsocket = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
            self.state_path().display(),
            self.socket_path().display(),
            self.metrics_port
        )
    }
    /// Writes a config attached to `cgroup` with pins in this scratch dir; `extra_bpf` goes
    /// into `[bpf]`, `rest` after it (quotas).
    pub fn write_config(&self, cgroup: &TestCgroup, extra_bpf: &str, rest: &str) {
        let text = format!(
            "{}[bpf]\nattach_cgroup = \"{}\"\npin_path = \"{}\"\n{extra_bpf}\n{rest}\n",
            self.private_paths(),
            cgroup.relative,
            self.pin_path().display()
        );
        std::fs::write(self.config_path(), text).expect("writing config");
    }
    pub fn maps(&self) -> PinnedMaps {
        PinnedMaps::open(&self.pin_path()).expect("opening pinned maps")
    }
    pub fn stats(&self) -> ConnStats {
        self.maps().stats().expect("reading stats")
    }
    /// Live connections of `uid` (0 when it has no counters yet).
    pub fn live(&self, uid: u32) -> u64 {
        self.stats().per_uid.get(&uid).map_or(0, |c| c.live)
    }
    /// Waits until `uid`'s live count is `want` (releases happen as sockets are freed).
    pub fn wait_live(&self, uid: u32, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let live = self.live(uid);
            if live == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "uid {uid}: live {live}, expected {want}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
    /// rlctl against this scratch's agent.
    pub fn rlctl(&self, args: &[&str]) -> std::process::Output {
        rlctl(&self.socket_path())
            .args(args)
            .output()
            .expect("running rlctl")
    }

    /// Runs `rlagent uninstall` for this scratch's config (idempotent).
    pub fn uninstall(&self) {
        let out = Command::new(target_bin("rlagent"))
            .arg("--config")
            .arg(self.config_path())
            .arg("uninstall")
            .output()
            .expect("running rlagent uninstall");
        assert!(
            out.status.success(),
            "uninstall: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.config_path().exists() && self.pin_path().exists() {
            let _ = Command::new(target_bin("rlagent"))
                .arg("--config")
                .arg(self.config_path())
                .arg("uninstall")
                .output();
        }
    }
}

/// The real `rlagent` binary, run with `NOTIFY_SOCKET` so readiness is the READY=1 it
/// sends, as under systemd.
pub struct Agent {
    child: Option<Child>,
    notify: UnixDatagram,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(scratch: &Scratch) -> Self {
        let notify_path = scratch.dir.path().join(unique("notify"));
        let notify = UnixDatagram::bind(&notify_path).expect("binding notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let log = scratch.dir.path().join(unique("agent.log"));
        let child = Command::new(target_bin("rlagent"))
            .arg("--config")
            .arg(scratch.config_path())
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting rlagent");
        let mut agent = Self {
            child: Some(child),
            notify,
            log,
        };
        agent.wait_ready();
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the next READY=1.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 256];
        loop {
            if let Ok(n) = self.notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "rlagent exited ({status}) before READY=1:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "rlagent not ready in 30 s:\n{}",
                self.log_text()
            );
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGHUP, then waits for the READY=1 that ends the reload.
    pub fn reload(&mut self) {
        self.signal(libc::SIGHUP);
        self.wait_ready();
    }

    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM and the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.take().unwrap().wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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

    fn with_hold(hold: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let mut ports = Vec::new();
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let listener = TcpListener::bind(addr).expect("binding loopback listener");
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
/// when connected to.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
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
        let mut child = Command::new(target_bin("conn-helper"))
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
