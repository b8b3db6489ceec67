//! The plugins-directory watcher: a file moved in, changed or removed is
//! noticed in milliseconds (inotify through `notify`, with a scan every
//! second as the fallback) and handed to [`Runtime::deploy`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::Runtime;
use super::deploy::Loader;

/// Whether a notification is a change: reads (this watcher loading a file)
/// are not, a write that ends is.
fn is_change(kind: notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(access) => access == AccessKind::Close(AccessMode::Write),
        _ => true,
    }
}

/// What the watcher compares to see that a file changed: its inode, length,
/// and modification and change times. The times alone are not enough: a
/// file system stamps them with a coarse clock (ext4: a few milliseconds),
/// so a build of the same length moved in right after another would look
/// unchanged; a moved-in file has a new inode.
pub(super) type Stamp = Option<(u64, u64, std::time::SystemTime, (i64, i64))>;

/// Watches the plugins directory: a changed file is loaded off the hot path
/// and, if it loads and describes itself, handed to its projection's worker
/// to swap in between batches; a new file starts a new projection.
///
/// The operating system says when the directory changes (inotify, through
/// `notify`), and the directory is also scanned every second: a directory
/// created after the start, or a file system that sends no notifications
/// (NFS), is still seen.
pub(super) struct Watcher {
    pub(super) loader: Arc<Loader>,
    pub(super) dir: PathBuf,
}

/// How often the plugins directory is scanned without a notification.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// After a notification, how long the directory must stay quiet before it
/// is scanned: a file moved in sends one, a file being copied in many.
const SETTLE: Duration = Duration::from_millis(20);

impl Watcher {
    pub(super) fn stamp(file: &Path) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(file).ok()?;
        Some((m.ino(), m.len(), m.modified().ok()?, (m.ctime(), m.ctime_nsec())))
    }

    pub(super) fn run(self, runtime: &Arc<Runtime>) {
        let (tx, changes) = std::sync::mpsc::channel::<()>();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| is_change(e.kind)) {
                let _ = tx.send(());
            }
        })
        .and_then(|mut w| notify::Watcher::watch(&mut w, &self.dir, notify::RecursiveMode::NonRecursive).map(|()| w));
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "no change notifications for the plugins directory; scanning it every second");
                None
            }
        };
        while !runtime.stop.load(Ordering::Relaxed) {
            match changes.recv_timeout(RESCAN_INTERVAL) {
                Ok(()) => {
                    let until = Instant::now() + RESCAN_INTERVAL;
                    while changes.recv_timeout(SETTLE).is_ok() && Instant::now() < until {}
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(RESCAN_INTERVAL),
            }
            if !runtime.stop.load(Ordering::Relaxed) {
                self.scan(runtime);
            }
        }
    }

    /// Load what changed in the directory since the last scan, and stop the
    /// projections whose file is gone.
    fn scan(&self, runtime: &Arc<Runtime>) {
        if !self.dir.is_dir() {
            return;
        }
        let files = match plugin_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading the plugins directory");
                return;
            }
        };
        let gone: Vec<PathBuf> = {
            let mut stamps = runtime.plugin_stamps.lock().expect("stamps lock");
            let gone: Vec<PathBuf> = stamps.keys().filter(|f| !files.contains(f)).cloned().collect();
            for file in &gone {
                stamps.remove(file);
            }
            gone
        };
        for file in gone {
            let label = file.display().to_string();
            if let Some(p) = runtime.projections().into_iter().find(|p| p.source == label) {
                tracing::info!(plugin = %label, projection = %p.manifest().name, "plugin file removed; stopping its projection");
                runtime.remove(&p.manifest().name);
            }
            runtime.waits.lock().expect("waits lock").end(&label);
            runtime.clear_plugin_error(&label);
        }
        for file in files {
            // Under the lock: an upload replaces the file and records its
            // stamp under it too, so what it wrote is never taken for a change.
            let mut stamps = runtime.plugin_stamps.lock().expect("stamps lock");
            let stamp = Self::stamp(&file);
            if stamps.get(&file) == Some(&stamp) {
                continue;
            }
            stamps.insert(file.clone(), stamp);
            drop(stamps);
            self.changed(runtime, &file);
        }
    }

    fn changed(&self, runtime: &Arc<Runtime>, file: &Path) {
        runtime.deploy(file, self.loader.load(file));
    }
}

/// The `*.wasm` files in `dir`, sorted; none when `dir` does not exist.
pub(super) fn plugin_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(dir = %dir.display(), "the plugins directory does not exist; no projections loaded");
            return Ok(Vec::new());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("reading the plugins directory {}", dir.display()));
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build of the same length moved in within the file system's
    /// timestamp tick (the same modification time) is still a change.
    #[test]
    fn a_file_moved_in_with_the_same_length_and_time_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let (live, staged) = (dir.path().join("p.wasm"), dir.path().join("p.wasm.new"));
        std::fs::write(&live, b"version 1").unwrap();
        let before = Watcher::stamp(&live);
        let modified = std::fs::metadata(&live).unwrap().modified().unwrap();
        std::fs::write(&staged, b"version 2").unwrap();
        std::fs::File::options().write(true).open(&staged).unwrap().set_modified(modified).unwrap();
        std::fs::rename(&staged, &live).unwrap();
        let after = Watcher::stamp(&live);
        assert_eq!(std::fs::metadata(&live).unwrap().modified().unwrap(), modified);
        assert_ne!(before, after);
        assert_eq!(after, Watcher::stamp(&live), "an unchanged file keeps its stamp");
    }
}
