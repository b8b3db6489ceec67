//! Generations of a projection's read model: where each lives on disk
//! (`projections/<name>/`; generation 0 in that directory itself, as data
//! directories of earlier versions have it, generation `n > 0` in
//! `gen-<n>/`), which one is live (the file `generation`; absent: 0), and a
//! running [`Generation`]: its read model, indexes and threads. A rebuild
//! ([`crate::rebuild`]) builds the next one beside the live one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use crate::plugin::Manifest;
use crate::projector::{Control, WorkerStatus};
use crate::source::kafka::Watermarks;
use crate::source::reader::Cursor;
use crate::store::ReadModel;
use crate::store::search::Indexes;

/// The file naming the live generation.
const LIVE_FILE: &str = "generation";
/// The file naming the generation being rebuilt.
const REBUILD_FILE: &str = "rebuilding";
/// The file naming the generation being rebuilt as a preview: it switches
/// only once promoted (which deletes this file). Without it, a restart
/// would resume a preview as a rebuild that switches by itself.
const PREVIEW_FILE: &str = "preview";

/// Where generation `number` of the projection in `root` keeps its files.
pub fn dir(root: &Path, number: u64) -> PathBuf {
    if number == 0 { root.to_owned() } else { root.join(format!("gen-{number}")) }
}

/// The number in `root/file`: `None` only when the file does not exist.
/// Anything else that goes wrong is an error, never "generation 0": taking
/// it for 0 would make [`clean`] delete the real live generation.
fn read_number(root: &Path, file: &str) -> std::io::Result<Option<u64>> {
    let path = root.join(file);
    let text = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?,
    };
    text.trim().parse().map(Some).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} holds {text:?}, not a generation number", path.display()),
        )
    })
}

fn write_number(root: &Path, file: &str, n: u64) -> std::io::Result<()> {
    crate::data_dir::replace_durably(&root.join(file), n.to_string().as_bytes())
}

/// Start recording that generation `number` of the projection in `root` is being rebuilt.
pub fn mark_rebuilding(root: &Path, number: u64) -> std::io::Result<()> {
    write_number(root, REBUILD_FILE, number)
}

/// No rebuild is running any more (it finished or was cancelled).
pub(crate) fn unmark_rebuilding(root: &Path) {
    let _ = std::fs::remove_file(root.join(REBUILD_FILE));
    let _ = std::fs::remove_file(root.join(PREVIEW_FILE));
}

/// Record that the rebuild of generation `number` is a preview (before it is marked as rebuilding).
pub fn mark_preview(root: &Path, number: u64) -> std::io::Result<()> {
    write_number(root, PREVIEW_FILE, number)
}

/// The preview was promoted: from now on (a restart included) it is a
/// rebuild that switches once it has caught up.
pub(crate) fn unmark_preview(root: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(root.join(PREVIEW_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => std::fs::File::open(root)?.sync_all(),
    }
}

/// Whether the rebuild of generation `number` in `root` is a preview.
pub fn is_preview(root: &Path, number: u64) -> std::io::Result<bool> {
    Ok(read_number(root, PREVIEW_FILE)? == Some(number))
}

/// Give up the rebuild of generation `number`: its files and its mark go.
pub(crate) fn abandon_rebuild(root: &Path, number: u64) {
    delete(root, number);
    unmark_rebuilding(root);
}

/// Make generation `number` the live one: the switch, atomic on disk.
pub(crate) fn make_live(root: &Path, number: u64) -> std::io::Result<()> {
    write_number(root, LIVE_FILE, number)
}

/// The live generation's number, and the one being rebuilt, if any.
pub fn numbers(root: &Path) -> std::io::Result<(u64, Option<u64>)> {
    let live = read_number(root, LIVE_FILE)?.unwrap_or(0);
    Ok((live, read_number(root, REBUILD_FILE)?.filter(|r| *r > live)))
}

/// Delete the files of generation `number`.
pub fn delete(root: &Path, number: u64) {
    let result = if number == 0 {
        let _ = std::fs::remove_file(root.join("read-model.redb"));
        match std::fs::remove_dir_all(root.join("indexes")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    } else {
        match std::fs::remove_dir_all(dir(root, number)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    };
    if let Err(e) = result {
        tracing::warn!(root = %root.display(), generation = number, error = %e, "deleting an old generation");
    }
}

/// Remove generations that are neither live nor being rebuilt (left by a
/// crash between a switch and its clean-up, or by a cancelled rebuild).
pub fn clean(root: &Path) -> std::io::Result<()> {
    let (live, rebuilding) = numbers(root)?;
    if rebuilding.is_none() {
        let _ = std::fs::remove_file(root.join(REBUILD_FILE));
    }
    // A preview marked just before a crash, with no rebuild marked after it
    // (kept when it cannot be read: a preview must never switch by itself).
    if rebuilding.is_none_or(|r| matches!(is_preview(root, r), Ok(false))) {
        let _ = std::fs::remove_file(root.join(PREVIEW_FILE));
    }
    for entry in std::fs::read_dir(root)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("gen-").and_then(|n| n.parse::<u64>().ok())
            && n != live
            && Some(n) != rebuilding
        {
            delete(root, n);
        }
    }
    if live != 0 {
        delete(root, 0);
    }
    Ok(())
}

/// One generation of a projection: its read model and the threads building it.
pub struct Generation {
    pub number: u64,
    /// A projection or an enricher (a new version must be the same).
    pub kind: crate::plugin::Kind,
    pub read_model: Arc<ReadModel>,
    /// Its search indexes (empty for plain projections).
    pub indexes: Arc<Indexes>,
    pub status: Arc<Mutex<WorkerStatus>>,
    /// High watermarks of the Kafka partitions it reads.
    pub watermarks: Watermarks,
    /// Where the watcher, the API and a rebuild send its worker commands
    /// (a new version, dead letters to retry, the end of a pause, which
    /// events are replayed history, stop).
    pub control: Control,
    pub(crate) manifest: Arc<RwLock<Manifest>>,
    /// The running version's tables keyed like its events.
    pub(crate) keyed: Arc<RwLock<crate::plugin::keyed::KeyedTables>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    /// A partitioned projection's shard in a cluster: whether its relay
    /// publishes (the active copy) or holds what it emits (a standby).
    pub(crate) handover: Option<Arc<crate::sink::handover::Handover>>,
}

impl Generation {
    /// The running plugin version's manifest.
    pub fn manifest(&self) -> Manifest {
        self.manifest.read().expect("manifest lock").clone()
    }

    /// Its durable checkpoints.
    pub fn checkpoints(&self) -> crate::store::Result<Cursor> {
        self.read_model.cursor()
    }

    /// Make this shard's copy the active one (it publishes what it emits,
    /// after taking the publishing over) or a standby (it keeps what it
    /// emits until the active copy has published it).
    pub fn set_active(&self, active: bool) {
        use crate::projector::Replay;
        self.read_model.record_changes(active);
        self.control.set_replay(if active { Replay::Live } else { Replay::Standby });
        if let Some(h) = &self.handover {
            h.set_active(active);
        }
    }

    /// Ask its threads to stop after their current batch, without waiting.
    pub fn ask_to_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.control.stop();
    }

    /// Stop its threads after their current batch, and wait for them.
    pub fn stop(&self) {
        self.ask_to_stop();
        for thread in std::mem::take(&mut *self.threads.lock().expect("threads lock")) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a missing `generation` file means generation 0: a file that
    /// cannot be read (EISDIR here; EMFILE or EIO in production) or that
    /// holds no number is an error, and nothing is deleted.
    #[test]
    fn an_unreadable_generation_file_is_an_error_and_deletes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        assert_eq!(numbers(root).unwrap(), (0, None));
        std::fs::create_dir(root.join("gen-3")).unwrap();
        std::fs::write(root.join("gen-3").join("read-model.redb"), b"live data").unwrap();
        write_number(root, LIVE_FILE, 3).unwrap();
        assert_eq!(numbers(root).unwrap(), (3, None));

        std::fs::remove_file(root.join(LIVE_FILE)).unwrap();
        std::fs::create_dir(root.join(LIVE_FILE)).unwrap();
        let error = numbers(root).unwrap_err().to_string();
        assert!(error.contains("generation"), "{error}");
        assert!(clean(root).is_err());
        assert!(root.join("gen-3").join("read-model.redb").exists(), "the live generation was deleted");

        std::fs::remove_dir(root.join(LIVE_FILE)).unwrap();
        std::fs::write(root.join(LIVE_FILE), "").unwrap();
        assert!(numbers(root).is_err(), "an empty file is not generation 0");
        assert!(clean(root).is_err());
        assert!(root.join("gen-3").join("read-model.redb").exists(), "the live generation was deleted");
    }
}
