//! The bpffs directory that holds our pins.

use std::{
    io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

use super::BpfError;

/// True when `path` exists and lies on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Makes `pin_path` a directory on a bpffs: created inside an existing bpffs, or, when its
/// nearest existing ancestor is not one, a bpffs is mounted at `pin_path` itself.
pub fn ensure_pin_dir(pin_path: &Path) -> Result<(), BpfError> {
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| BpfError::Io { what, path, source }
    };
    let mut existing: PathBuf = pin_path.to_path_buf();
    while !existing.exists() {
        match existing.parent() {
            Some(parent) => existing = parent.to_path_buf(),
            None => break,
        }
    }
    std::fs::create_dir_all(pin_path).map_err(io_err("creating the pin directory", pin_path))?;
    if is_bpffs(&existing) {
        return Ok(());
    }
    if is_bpffs(pin_path) {
        return Ok(());
    }
    // A new bpffs instance at the pin directory changes nothing else on the host.
    mount(
        Some("bpf"),
        pin_path,
        Some("bpf"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|errno| BpfError::Io {
        what: "mounting bpffs",
        path: pin_path.to_path_buf(),
        source: errno.into(),
    })?;
    tracing::info!(path = %pin_path.display(), "mounted bpffs for pins");
    Ok(())
}

/// Removes everything below `dir` on a bpffs (unpinning links detaches them once no
/// process holds them), then `dir` itself, unmounting it first if it is a bpffs mount of
/// its own.
pub fn remove_pins(dir: &Path) -> Result<(), BpfError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(BpfError::Io {
                what: "reading the pin directory",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let own_mount = is_bpffs(dir) && dir.parent().is_some_and(|p| !is_bpffs(p));
    for entry in entries.flatten() {
        let path = entry.path();
        // A bpffs mount's own `maps.debug`/`progs.debug` (bpf_preload) cannot be removed;
        // they go with the unmount.
        if own_mount && path.extension().is_some_and(|e| e == "debug") {
            continue;
        }
        let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_pins(&path)
        } else {
            std::fs::remove_file(&path).map_err(|source| BpfError::Io {
                what: "removing a pin",
                path: path.clone(),
                source,
            })
        };
        result?;
    }
    if own_mount {
        umount2(dir, MntFlags::MNT_DETACH).map_err(|errno| BpfError::Io {
            what: "unmounting bpffs",
            path: dir.to_path_buf(),
            source: errno.into(),
        })?;
    }
    std::fs::remove_dir(dir).map_err(|source| BpfError::Io {
        what: "removing the pin directory",
        path: dir.to_path_buf(),
        source,
    })
}
