//! Reloads when the config file or one of its drop-ins changes on disk (inotify), as
//! SIGHUP does: configuration management drops a file in place and the agent follows,
//! with the same refuse-whole semantics.
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

/// Starts watching `config` and its drop-in directory; each message on the receiver asks
/// for one reload.
pub fn spawn(config: &Path) -> anyhow::Result<mpsc::Receiver<()>> {
    let dir = config
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let file_name = config.file_name().map(OsStr::to_os_string);
    let drop_dir: PathBuf = Config::drop_in_dir(config);
    let mut inotify = Inotify::init()?;
    let dir_watch = inotify.watches().add(&dir, mask())?;
    let mut drop_watch = inotify.watches().add(&drop_dir, mask()).ok();
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
                    if event.wd == dir_watch {
                        if name.is_some() && name == file_name
                            || name.as_deref() == Some(OsStr::new(CONFIGMAP_DATA))
                        {
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
