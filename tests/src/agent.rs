//! The real `rlagent` (and `rlctl`) binaries, run against a scratch config.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use rlagent::kernel::bpf::{ConnStats, PinnedMaps};

use crate::*;

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

/// A test's scratch directory with a config, the pin directory and logs.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    /// The port of the last started agent's /metrics. The config asks for port 0, and
    /// [`Agent::start`] reads the port the agent bound from its STATUS=, so no other
    /// process can take it between a test's choice and the agent's bind.
    metrics_port: std::sync::atomic::AtomicU16,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("rlagent-test")
                .tempdir()
                .expect("tempdir"),
            metrics_port: std::sync::atomic::AtomicU16::new(0),
        }
    }
    /// The /metrics port of the agent last started on this scratch.
    pub fn metrics_port(&self) -> u16 {
        let port = self.metrics_port.load(std::sync::atomic::Ordering::Relaxed);
        assert_ne!(port, 0, "no agent was started on this scratch");
        port
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
            "state_path = \"{}\"\n[control]\nsocket = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            self.state_path().display(),
            self.socket_path().display(),
        )
    }
    /// Writes a config attached to `cgroup` with pins in this scratch dir; `extra_bpf` goes
    /// into `[bpf]`, `rest` after it (quotas).
    pub fn write_config(&self, cgroup: &TestCgroup, extra_bpf: &str, rest: &str) {
        self.write_config_at(None, cgroup, extra_bpf, rest);
    }

    /// [`Self::write_config`] with the agent's groups under `<cgroup>/slice` (the
    /// cgroupfs driver makes them there), for tests with groups.
    pub fn write_config_with_groups(&self, cgroup: &TestCgroup, extra_bpf: &str, rest: &str) {
        let root = format!("{}/slice", cgroup.relative);
        self.write_config_at(Some(&root), cgroup, extra_bpf, rest);
    }

    fn write_config_at(&self, root: Option<&str>, cgroup: &TestCgroup, bpf: &str, rest: &str) {
        let root = root.map_or(String::new(), |r| format!("cgroup_root = \"{r}\"\n"));
        let text = format!(
            "{root}{}[bpf]\nattach_cgroup = \"{}\"\npin_path = \"{}\"\n{bpf}\n{rest}\n",
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
                "uid {uid}: live {live}, expected {want}; its socket records (cookie, owner): {:?}",
                self.socket_records(uid)
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// This scratch's pinned hash map `name`, to read or write as the programs see it.
    pub fn pinned_hash_map<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> HashMap<MapData, K, V> {
        let pin = rlagent::kernel::bpf::PinLayout::new(&self.pin_path()).map(name);
        let data = MapData::from_pin(&pin)
            .unwrap_or_else(|e| panic!("opening the pinned map {}: {e}", pin.display()));
        let map = Map::from_map_data(data).unwrap_or_else(|e| panic!("map {name}: {e}"));
        HashMap::try_from(map).unwrap_or_else(|e| panic!("{name} as a hash map: {e}"))
    }

    /// The charged-socket records (`RL_SOCK_OWNER`) of `uid`: cookie and owner word.
    pub fn socket_records(&self, uid: u32) -> Vec<(u64, u64)> {
        let records: HashMap<MapData, u64, rlagent_common::SockOwner> =
            self.pinned_hash_map(rlagent_common::names::SOCK_OWNER);
        records
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, record)| record.owner as u32 == uid)
            .map(|(cookie, record)| (cookie, record.owner))
            .collect()
    }
    /// The counters of `uid` (zeroed when it has none).
    pub fn conns(&self, uid: u32) -> rlagent_common::Conns {
        self.stats().per_uid.get(&uid).copied().unwrap_or_default()
    }

    /// The counters charged to the group whose cgroup is `path`.
    pub fn group_conns(&self, path: &Path) -> rlagent_common::Conns {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::metadata(path).expect("group cgroup").ino();
        self.maps()
            .groups()
            .expect("group counters")
            .get(&id)
            .unwrap_or_else(|| panic!("no counters for {}", path.display()))
            .conns
    }

    /// Waits until the group whose cgroup is `path` has `want` live connections.
    pub fn wait_group_live(&self, path: &Path, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.group_conns(path).live != want {
            assert!(
                Instant::now() < deadline,
                "group {}: live {}, expected {want}",
                path.display(),
                self.group_conns(path).live
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// rlctl against this scratch's agent, which must succeed: its stdout.
    pub fn rlctl_ok(&self, args: &[&str]) -> String {
        let out = self.rlctl(args);
        assert!(
            out.status.success(),
            "rlctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
        let status = agent.wait_ready();
        let port = status
            .as_deref()
            .and_then(|s| s.split("http://127.0.0.1:").nth(1))
            .and_then(|rest| rest.split('/').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no metrics port in the agent's STATUS= {status:?}"));
        scratch
            .metrics_port
            .store(port, std::sync::atomic::Ordering::Relaxed);
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the next READY=1, and returns the STATUS= sent with it.
    pub fn wait_ready(&mut self) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]);
                if message.lines().any(|l| l == "READY=1") {
                    return message
                        .lines()
                        .find_map(|l| l.strip_prefix("STATUS="))
                        .map(str::to_owned);
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

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid()), sig);
    }

    /// SIGHUP, then waits for the READY=1 that ends the reload.
    pub fn reload(&mut self) {
        self.signal(Signal::SIGHUP);
        self.wait_ready();
    }

    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM and the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(Signal::SIGTERM);
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
