//! Reloads when the config file, one of its drop-ins or another file the config reads (the
//! subuid file) changes on disk (inotify), as SIGHUP does: configuration management drops
//! a file in place and the agent follows, with the same refuse-whole semantics.
//!
//! The directories are watched, not the files: editors and config management replace a
//! file by renaming a new one over it, which a watch on the old file would miss. A
//! Kubernetes ConfigMap volume changes by swapping its `..data` link, which counts too.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    time::Duration,
};

use inotify::{Inotify, WatchMask};
use rlagent::config::{Config, DROP_IN_DIR};
use tokio::sync::mpsc;

/// The link a Kubernetes ConfigMap volume swaps to publish new contents.
const CONFIGMAP_DATA: &str = "..data";

/// Edits come as bursts of events (write, rename): one reload after the burst settles.
const SETTLE: Duration = Duration::from_millis(300);

fn mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CREATE
        | WatchMask::DELETE
}

fn parent(path: &Path) -> PathBuf {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Starts watching `config` (when there is a file) and its drop-in directory, and the
/// `files` the config reads; each message on the receiver asks for one reload. A file's
/// directory that does not exist is not watched.
pub fn spawn(config: Option<&Path>, files: &[PathBuf]) -> anyhow::Result<mpsc::Receiver<()>> {
    let mut inotify = Inotify::init()?;
    // (watch, the name in its directory that counts)
    let mut watched = Vec::new();
    let mut dir_watch = None;
    let mut drop_watch = None;
    let mut drop_dir = PathBuf::new();
    if let Some(config) = config {
        let wd = inotify.watches().add(parent(config), mask())?;
        watched.push((wd.clone(), config.file_name().map(OsStr::to_os_string)));
        drop_dir = Config::drop_in_dir(config);
        drop_watch = inotify.watches().add(&drop_dir, mask()).ok();
        dir_watch = Some(wd);
    }
    for file in files {
        if let Ok(wd) = inotify.watches().add(parent(file), mask()) {
            watched.push((wd, file.file_name().map(OsStr::to_os_string)));
        }
    }
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("rlagent-config-watch".into())
        .spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                let events = match inotify.read_events_blocking(&mut buffer) {
                    Ok(events) => events,
                    Err(e) => {
                        tracing::warn!(
                            "watching the config stopped ({e}); reload with SIGHUP or rlctl reload"
                        );
                        return;
                    }
                };
                let mut changed = false;
                let mut drop_dir_appeared = false;
                for event in events {
                    let name = event.name.map(OsStr::to_os_string);
                    if name.is_some()
                        && watched
                            .iter()
                            .any(|(wd, file)| *wd == event.wd && *file == name)
                    {
                        changed = true;
                    }
                    if Some(&event.wd) == dir_watch.as_ref() {
                        if name.as_deref() == Some(OsStr::new(CONFIGMAP_DATA)) {
                            changed = true;
                        } else if name.as_deref() == Some(OsStr::new(DROP_IN_DIR)) {
                            changed = true;
                            drop_dir_appeared = true;
                        }
                    } else if Some(&event.wd) == drop_watch.as_ref()
                        && name
                            .as_deref()
                            .is_some_and(|n| Path::new(n).extension() == Some(OsStr::new("toml")))
                    {
                        changed = true;
                    }
                }
                if drop_dir_appeared {
                    drop_watch = inotify.watches().add(&drop_dir, mask()).ok();
                }
                if changed {
                    std::thread::sleep(SETTLE);
                    // Full: a reload is already asked for, and it will read this change.
                    let _ = tx.try_send(());
                }
            }
        })?;
    Ok(rx)
}
