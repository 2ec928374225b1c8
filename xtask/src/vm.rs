//! `cargo xtask vm-test`: runs the guest tests (tests/tests/guest.rs) inside a throw-away
//! qemu guest with a Debian kernel and pure cgroup v2, where cpu/memory/pids controllers
//! and host-wide BPF attach are real (this host's cgroups are hybrid).
//! See shared/notes/vm-testing.md for the measured facts behind each step.
//!
//! Everything fetched is cached under ~/.cache/rlagent-vm, keyed by package version:
//! qemu (from bookworm-backports, because the image's qemu-utils comes from there), the
//! kernel and busybox-static (downloaded and unpacked, never installed on the host).
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{cargo, output, run};

const MUSL: &str = "x86_64-unknown-linux-musl";
const MARKER: &str = "@@VM-EXIT rc=";

fn cache() -> PathBuf {
    crate::home().join(".cache/rlagent-vm")
}

/// apt-get/apt-cache options that read the machine's sources plus bookworm-backports
/// from a private list, so the host's apt configuration is left as it is.
fn apt_options() -> Result<Vec<String>> {
    let dir = cache().join("apt");
    let parts = dir.join("sources");
    let lists = dir.join("lists");
    std::fs::create_dir_all(lists.join("partial"))?;
    std::fs::create_dir_all(&parts)?;
    let system = Path::new("/etc/apt/sources.list.d/debian.sources");
    let text =
        std::fs::read_to_string(system).with_context(|| format!("reading {}", system.display()))?;
    // The main archive's URI, from the stanza that lists plain `bookworm`.
    let uri = text
        .split("\n\n")
        .find(|stanza| {
            stanza
                .lines()
                .any(|l| l.starts_with("Suites:") && l.split_whitespace().any(|s| s == "bookworm"))
        })
        .and_then(|stanza| stanza.lines().find_map(|l| l.strip_prefix("URIs:")))
        .map(|u| u.trim().to_string())
        .context("no bookworm stanza with URIs in debian.sources")?;
    std::fs::write(parts.join("debian.sources"), &text)?;
    std::fs::write(
        parts.join("backports.sources"),
        format!(
            "Types: deb\nURIs: {uri}\nSuites: bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )?;
    let opts = vec![
        "-o".to_string(),
        "Dir::Etc::SourceList=/dev/null".to_string(),
        "-o".to_string(),
        format!("Dir::Etc::SourceParts={}", parts.display()),
        "-o".to_string(),
        format!("Dir::State::Lists={}", lists.display()),
    ];
    let fresh = std::fs::read_dir(&lists)?.flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .contains("bookworm-backports")
    });
    if !fresh {
        run(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
    }
    Ok(opts)
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ensure_qemu() -> Result<()> {
    if have("qemu-system-x86_64") && have("cpio") {
        return Ok(());
    }
    let opts = apt_options()?;
    run(Command::new("apt-get")
        .args(&opts)
        .args([
            "install",
            "-y",
            "-q",
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
            "cpio",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The Debian kernel (uncompressed vmlinux, for the fast PVH boot) and busybox.
fn ensure_guest_kernel() -> Result<(PathBuf, PathBuf)> {
    let opts = apt_options()?;
    let depends = output(
        Command::new("apt-cache")
            .args(&opts)
            .args(["depends", "linux-image-amd64"]),
    )?;
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .context("linux-image-amd64 names no kernel package")?
        .trim()
        .to_string();
    let dir = cache().join(&package);
    let vmlinux = dir.join("vmlinux");
    let busybox = dir.join("root/bin/busybox");
    if vmlinux.exists() && busybox.exists() {
        return Ok((vmlinux, busybox));
    }
    std::fs::create_dir_all(&dir)?;
    run(Command::new("apt-get").current_dir(&dir).args(&opts).args([
        "download",
        &package,
        "busybox-static",
    ]))?;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg")
                .arg("-x")
                .arg(&path)
                .arg(dir.join("root")))?;
        }
    }
    let vmlinuz = std::fs::read_dir(dir.join("root/boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .context("no vmlinuz in the kernel package")?;
    // The bzImage holds an xz stream; the kernel inside boots ~3 s faster under TCG.
    run(Command::new("python3").args([
        "-c",
        "import lzma,sys\n\
         d=open(sys.argv[1],'rb').read(); i=d.find(b'\\xfd7zXZ\\x00')\n\
         assert i>=0, 'no xz stream'\n\
         open(sys.argv[2],'wb').write(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(d[i:]))",
        &vmlinuz.to_string_lossy(),
        &vmlinux.to_string_lossy(),
    ]))?;
    Ok((vmlinux, busybox))
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
export PATH=/bin HOME=/root RLAGENT_BIN_DIR=/bin RLAGENT_GUEST=1 RLAGENT_REQUIRE_PRIVILEGED=1
cd /tmp
/bin/guest-tests $(cat /testargs)
echo "@@VM-EXIT rc=$?"
poweroff -f
"#;

/// Builds the static binaries and the guest test executable; returns (name, path) pairs.
fn build_guest_binaries() -> Result<Vec<(String, PathBuf)>> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == MUSL) {
        run(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    run(cargo().args([
        "build",
        "--release",
        "--target",
        MUSL,
        "-p",
        "rlagent",
        "-p",
        "rlagent-tests",
        "--bins",
    ]))?;
    let json = output(cargo().args([
        "test",
        "--release",
        "--target",
        MUSL,
        "-p",
        "rlagent-tests",
        "--test",
        "guest",
        "--no-run",
        "--message-format=json",
    ]))?;
    let exe = json
        .lines()
        .filter(|l| l.contains("\"compiler-artifact\"") && l.contains("\"name\":\"guest\""))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = l[start..].find('"')?;
            Some(PathBuf::from(&l[start..start + end]))
        })
        .context("cargo did not report the guest test executable")?;
    let bin_dir = crate::workspace_root()
        .join("target")
        .join(MUSL)
        .join("release");
    let mut bins: Vec<(String, PathBuf)> = ["rlagent", "rlctl", "conn-helper", "guest-load"]
        .iter()
        .map(|n| (n.to_string(), bin_dir.join(n)))
        .collect();
    bins.push(("guest-tests".to_string(), exe));
    Ok(bins)
}

fn build_initramfs(busybox: &Path, bins: &[(String, PathBuf)], test_args: &str) -> Result<PathBuf> {
    let stage = cache().join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join("bin"))?;
    std::fs::copy(busybox, stage.join("bin/busybox"))?;
    for (name, path) in bins {
        std::fs::copy(path, stage.join("bin").join(name))
            .with_context(|| format!("copying {}", path.display()))?;
    }
    std::fs::write(stage.join("init"), INIT)?;
    std::fs::write(stage.join("testargs"), test_args)?;
    run(Command::new("chmod").arg("+x").arg(stage.join("init")))?;
    let initrd = cache().join("initrd.cpio");
    // Uncompressed newc: no gzip member, so no padding rule to get wrong.
    run(Command::new("sh").current_dir(&stage).args([
        "-c",
        &format!("find . | cpio -o -H newc --quiet > {}", initrd.display()),
    ]))?;
    Ok(initrd)
}

/// Boots the guest, streams its console, returns the test exit code from the marker line.
fn boot(vmlinux: &Path, initrd: &Path, timeout: Duration) -> Result<i32> {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-net",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet loglevel=3 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut rc = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                println!("guest| {line}");
                if let Some(code) = line.strip_prefix(MARKER) {
                    rc = code.trim().parse().ok();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("guest did not finish in {} s", timeout.as_secs());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let _ = child.wait();
    rc.context(
        "guest stopped without its exit marker (kernel panic or crash; see the console above)",
    )
}

pub fn vm_test(test_args: &[String]) -> Result<()> {
    ensure_qemu()?;
    let (vmlinux, busybox) = ensure_guest_kernel()?;
    let bins = build_guest_binaries()?;
    let args = if test_args.is_empty() {
        "--test-threads=1".to_string()
    } else {
        test_args.join(" ")
    };
    let initrd = build_initramfs(&busybox, &bins, &args)?;
    let started = Instant::now();
    let rc = boot(&vmlinux, &initrd, Duration::from_secs(1200))?;
    eprintln!(
        "xtask: guest finished in {:.1} s with exit code {rc}",
        started.elapsed().as_secs_f64()
    );
    if rc != 0 {
        bail!("guest tests failed (exit code {rc})");
    }
    Ok(())
}
