//! `cargo xtask install`: puts the binaries, the systemd unit, sysusers.d and tmpfiles.d
//! entries, a default config (only if none exists), shell completions and the man page in
//! place. With `--destdir` it only writes files (packaging, the systemd guest test);
//! without, it also runs systemd-sysusers, systemd-tmpfiles and daemon-reload.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{cargo, run, workspace_root};

pub struct Options {
    pub destdir: Option<PathBuf>,
    pub prefix: PathBuf,
    /// Already built binaries (default: a release build now).
    pub bin_dir: Option<PathBuf>,
}

fn put(root: &Path, path: &str, contents: &[u8], mode: u32) -> Result<()> {
    let target = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().unwrap())?;
    std::fs::write(&target, contents).with_context(|| format!("writing {}", target.display()))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
    println!("installed {}", target.display());
    Ok(())
}

/// The output of `bin args` (completions and man pages come from the binaries).
pub(crate) fn generated(bin: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(bin).args(args).output()?;
    anyhow::ensure!(out.status.success(), "{} {args:?} failed", bin.display());
    Ok(out.stdout)
}

pub fn install(opts: Options) -> Result<()> {
    let ws = workspace_root();
    let bin_dir = match opts.bin_dir {
        Some(dir) => dir,
        None => {
            run(cargo().args(["build", "--release", "--bin", "rlagent", "--bin", "rlctl"]))?;
            ws.join("target/release")
        }
    };
    let root = opts.destdir.clone().unwrap_or_else(|| PathBuf::from("/"));
    let prefix = opts.prefix.to_string_lossy().into_owned();
    for bin in ["rlagent", "rlctl"] {
        let bytes = std::fs::read(bin_dir.join(bin))
            .with_context(|| format!("reading {}", bin_dir.join(bin).display()))?;
        put(&root, &format!("{prefix}/bin/{bin}"), &bytes, 0o755)?;
    }
    let unit = std::fs::read_to_string(ws.join("systemd/rlagent.service"))?
        .replace("/usr/local/bin/", &format!("{prefix}/bin/"));
    put(
        &root,
        "/etc/systemd/system/rlagent.service",
        unit.as_bytes(),
        0o644,
    )?;
    // Not active: the drop-in for hosts that set cgroup_driver = "cgroupfs".
    put(
        &root,
        &format!("{prefix}/share/rlagent/cgroupfs-driver.conf"),
        &std::fs::read(ws.join("systemd/cgroupfs-driver.conf"))?,
        0o644,
    )?;
    put(
        &root,
        "/usr/lib/sysusers.d/rlagent.conf",
        &std::fs::read(ws.join("systemd/rlagent.sysusers"))?,
        0o644,
    )?;
    put(
        &root,
        "/usr/lib/tmpfiles.d/rlagent.conf",
        &std::fs::read(ws.join("systemd/rlagent.tmpfiles"))?,
        0o644,
    )?;
    if root.join("etc/rlagent/rlagent.toml").exists() {
        println!(
            "kept the existing {}",
            root.join("etc/rlagent/rlagent.toml").display()
        );
    } else {
        put(
            &root,
            "/etc/rlagent/rlagent.toml",
            &std::fs::read(ws.join("agent/src/config/default-config.toml"))?,
            0o644,
        )?;
    }
    let rlctl = bin_dir.join("rlctl");
    put(
        &root,
        "/usr/share/bash-completion/completions/rlctl",
        &generated(&rlctl, &["completions", "bash"])?,
        0o644,
    )?;
    put(
        &root,
        "/usr/share/zsh/vendor-completions/_rlctl",
        &generated(&rlctl, &["completions", "zsh"])?,
        0o644,
    )?;
    put(
        &root,
        "/usr/share/fish/vendor_completions.d/rlctl.fish",
        &generated(&rlctl, &["completions", "fish"])?,
        0o644,
    )?;
    put(
        &root,
        &format!("{prefix}/share/man/man1/rlctl.1"),
        &generated(&rlctl, &["man"])?,
        0o644,
    )?;
    put(
        &root,
        &format!("{prefix}/share/man/man8/rlagent.8"),
        &generated(&bin_dir.join("rlagent"), &["man"])?,
        0o644,
    )?;

    if opts.destdir.is_none() && Path::new("/run/systemd/system").exists() {
        run(&mut Command::new("systemd-sysusers"))?;
        run(
            Command::new("systemd-tmpfiles").args(["--create", "/usr/lib/tmpfiles.d/rlagent.conf"])
        )?;
        run(Command::new("systemctl").arg("daemon-reload"))?;
        println!("next: systemctl enable --now rlagent");
    }
    Ok(())
}
