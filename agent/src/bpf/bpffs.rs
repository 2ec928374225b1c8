//! The bpffs directory that holds our pins.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use super::BpfError;

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

fn statfs_type(path: &Path) -> io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and filled the struct.
    // f_type is i64 on glibc and u64 on musl; the magic fits either way.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    Ok(unsafe { buf.assume_init() }.f_type as u64)
}

/// True when `path` exists and lies on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    statfs_type(path).is_ok_and(|t| t == BPF_FS_MAGIC)
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
    let target = CString::new(pin_path.as_os_str().as_encoded_bytes()).expect("path has no NUL");
    // SAFETY: valid C strings; mounting a new bpffs instance changes nothing else.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(BpfError::Io {
            what: "mounting bpffs",
            path: pin_path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
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
        let c_dir = CString::new(dir.as_os_str().as_encoded_bytes()).expect("path has no NUL");
        // SAFETY: valid C string.
        if unsafe { libc::umount2(c_dir.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(BpfError::Io {
                what: "unmounting bpffs",
                path: dir.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
    }
    std::fs::remove_dir(dir).map_err(|source| BpfError::Io {
        what: "removing the pin directory",
        path: dir.to_path_buf(),
        source,
    })
}
