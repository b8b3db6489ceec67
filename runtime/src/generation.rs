//! Generations of a projection's read model, and blue/green rebuilds.
//!
//! A projection's data lives in `projections/<name>/`. Its live generation
//! is named by the file `generation` there (absent: generation 0, whose
//! files sit in that directory itself, as data directories of earlier
//! versions have them); generation `n > 0` lives in `gen-<n>/`.
//!
//! A rebuild starts generation `n + 1` (recorded in the file `rebuilding`,
//! so that a restart resumes it) with its own worker replaying every
//! subscribed stream from the beginning, emission off, while the live
//! generation keeps consuming and answering queries. Once the new one has
//! reached the live one's checkpoints, the [`monitor`] switches:
//! 1. the live worker stops after its batch (its checkpoints are final) and
//!    its emitted events are published, all of them (retried while the
//!    target fails: its outbox is deleted with it);
//! 2. the new worker catches up to exactly those checkpoints, as history;
//! 3. the `generation` file is replaced (the switch, atomic on disk; retried
//!    until it holds), queries go to the new generation, and it emits for
//!    every event after those checkpoints. Nothing the new generation emits
//!    is published before the switch is durable: a crash before it leaves the
//!    old generation live, and that one emits for what comes next;
//! 4. the old generation's files are deleted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::{Backoff, now_ms};
use crate::plugin::Manifest;
use crate::projector::{Control, Replay, WorkerStatus};
use crate::source::kafka::Watermarks;
use crate::source::log::EventLog;
use crate::source::reader::Cursor;
use crate::store::ReadModel;
use crate::store::search::Indexes;

/// The file naming the live generation.
const LIVE_FILE: &str = "generation";
/// The file naming the generation being rebuilt.
const REBUILD_FILE: &str = "rebuilding";

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
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
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

/// A rebuild in progress.
pub struct Rebuild {
    pub generation: Arc<Generation>,
    started: Instant,
    /// When it started, in ms since the Unix epoch.
    started_at: i64,
    /// Events the new generation had handled when this run of it started.
    initial: u64,
    cancel: AtomicBool,
    /// Set once the live generation has stopped for the switch: from then on
    /// the switch completes (a cancel is refused).
    pub(crate) switching: AtomicBool,
    /// What the switch is waiting for, when it cannot go on (shown in the status).
    waiting_for: Mutex<Option<String>>,
}

/// What the status shows of a rebuild.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebuildStatus {
    pub generation: u64,
    /// Events replayed so far (sum of the new generation's checkpoints).
    pub replayed: u64,
    /// Where the live generation is (the target, moving while events arrive).
    pub target: u64,
    pub events_per_second: f64,
    /// Seconds left at the current rate (`null` before it is known).
    pub eta_seconds: Option<f64>,
    pub started_at: i64,
    /// The live generation has stopped and the new one is taking over.
    pub switching: bool,
    /// Why the switch cannot go on yet (e.g. the old generation's emitted
    /// events cannot be published), while it retries.
    pub waiting_for: Option<String>,
}

fn total(c: &Cursor) -> u64 {
    c.values().sum()
}

impl Rebuild {
    pub fn new(generation: Arc<Generation>) -> crate::store::Result<Self> {
        let initial = total(&generation.checkpoints()?);
        Ok(Rebuild {
            generation,
            started: Instant::now(),
            started_at: now_ms(),
            initial,
            cancel: AtomicBool::new(false),
            switching: AtomicBool::new(false),
            waiting_for: Mutex::new(None),
        })
    }

    /// Ask the monitor to stop the rebuild and delete what it built; it
    /// wakes at once.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.generation.read_model.commit_signal().notify();
    }

    pub fn status(&self, live: &Generation) -> crate::store::Result<RebuildStatus> {
        let replayed = total(&self.generation.checkpoints()?);
        let target = total(&live.checkpoints()?);
        let rate = (replayed - self.initial.min(replayed)) as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        let eta_seconds = (rate > 0.0).then(|| target.saturating_sub(replayed) as f64 / rate);
        Ok(RebuildStatus {
            generation: self.generation.number,
            replayed,
            target,
            events_per_second: rate,
            eta_seconds,
            started_at: self.started_at,
            switching: self.switching.load(Ordering::Relaxed),
            waiting_for: self.waiting_for.lock().expect("waiting lock").clone(),
        })
    }

    fn wait_for(&self, why: Option<String>) {
        *self.waiting_for.lock().expect("waiting lock") = why;
    }
}

/// Start recording that generation `number` of the projection in `root` is being rebuilt.
pub fn mark_rebuilding(root: &Path, number: u64) -> std::io::Result<()> {
    write_number(root, REBUILD_FILE, number)
}

/// What the monitor needs of the projection it switches.
pub struct Switch<'a> {
    pub name: &'a str,
    pub root: &'a Path,
    pub live: &'a RwLock<Arc<Generation>>,
    pub rebuild: &'a Mutex<Option<Arc<Rebuild>>>,
    /// Held while the live generation changes, so that a new plugin version
    /// being deployed reaches whichever generation is live after it.
    pub starting: &'a Mutex<()>,
    pub log: &'a Arc<EventLog>,
    pub kafka: &'a Arc<crate::source::kafka::KafkaConfig>,
    /// The runtime is shutting down: stop, and resume at the next start.
    pub shutdown: &'a AtomicBool,
}

/// How many events `ahead` has handled that `behind_` has not, over all partitions.
fn behind(behind_: &Cursor, ahead: &Cursor) -> u64 {
    ahead.iter().map(|(k, a)| a.saturating_sub(behind_.get(k).copied().unwrap_or(0))).sum()
}

/// A rebuild that has reached its gate switches when the live generation is
/// at most this many events further: what the new one still has to replay
/// while the old one is stopped.
const SWITCH_WITHIN: u64 = 2_000;

fn caught_up(new: &Cursor, live: &Cursor) -> bool {
    live.iter().all(|(k, v)| new.get(k).copied().unwrap_or(0) >= *v)
}

/// The positions of `generation`'s dead letters (empty when they cannot be
/// read: then the rebuild treats those events as history, as before).
fn failed(generation: &Generation) -> crate::projector::Failed {
    let mut positions = std::collections::BTreeSet::new();
    let mut after = 0;
    loop {
        match generation.read_model.dead_letters(after, 1000) {
            Ok(page) if !page.is_empty() => {
                after = page.last().map_or(after, |(id, _)| *id);
                positions.extend(page.into_iter().map(|(_, l)| (l.stream, l.partition, l.offset)));
            }
            Ok(_) => return Arc::new(positions),
            Err(e) => {
                tracing::warn!(generation = generation.number, error = %e, "reading dead letters for a rebuild");
                return Arc::new(positions);
            }
        }
    }
}

/// Run `step` until it reports done, backing off while it fails and showing
/// why in the rebuild's status. False when the runtime shuts down first (the
/// rebuild then resumes at the next start, the old generation still live on disk).
fn retry(s: &Switch<'_>, job: &Rebuild, what: &str, mut step: impl FnMut() -> Result<bool, String>) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        if s.shutdown.load(Ordering::Relaxed) {
            job.generation.stop();
            return false;
        }
        match step() {
            Ok(true) => {
                job.wait_for(None);
                return true;
            }
            Ok(false) => backoff.reset(),
            Err(e) => {
                tracing::warn!(projection = s.name, error = %e, "{what} failed; retrying");
                job.wait_for(Some(format!("{what}: {e}")));
                std::thread::sleep(backoff.next_delay());
            }
        }
    }
}

/// How long the monitor waits for the new generation to commit before it
/// looks at the flags no commit announces (shutdown, a removed projection).
const FLAG_CHECK: Duration = Duration::from_millis(250);

/// Watch `job` until it is cancelled, the runtime stops, or it has caught
/// up with the live generation, then switch (see the module docs). The
/// monitor wakes when the new generation commits (or a cancel comes), not
/// on a timer: only the new generation's progress can move it on.
pub fn monitor(s: Switch<'_>, job: Arc<Rebuild>) {
    let new = job.generation.clone();
    let commits = new.read_model.commit_signal();
    let mut gate: Option<Cursor> = None;
    loop {
        // Taken before the checkpoints are read, so a commit in between is not missed.
        let seen = commits.current();
        if job.cancel.load(Ordering::Relaxed) {
            new.stop();
            delete(s.root, new.number);
            let _ = std::fs::remove_file(s.root.join(REBUILD_FILE));
            *s.rebuild.lock().expect("rebuild lock") = None;
            tracing::info!(projection = s.name, generation = new.number, "rebuild cancelled");
            return;
        }
        let live = s.live.read().expect("live lock").clone();
        // Shutting down, or the projection was removed (its live worker
        // stopped): stop here; the rebuild resumes when it is added again.
        if s.shutdown.load(Ordering::Relaxed) || live.stop.load(Ordering::Relaxed) {
            new.stop();
            return;
        }
        // The new generation reads only up to a gate at the live generation's
        // durable checkpoints (`Replay::Until`): it never handles as history
        // an event the live one has not handled (and emitted for). Each time
        // it reaches the gate, the gate moves up to the live checkpoints; once
        // they are close, the switch begins.
        match (new.checkpoints(), live.checkpoints()) {
            (Ok(n), Ok(l)) => match &gate {
                Some(g) if caught_up(&n, g) && behind(g, &l) <= SWITCH_WITHIN => break,
                Some(g) if !caught_up(&n, g) => {}
                _ => {
                    // Dead letters commit with their checkpoints: read after
                    // them, these are all the live generation's up to the gate.
                    new.control.set_replay(Replay::Until(l.clone(), failed(&live)));
                    gate = Some(l);
                    // It may be there already (nothing more to replay): look again at once.
                    continue;
                }
            },
            (Err(e), _) | (_, Err(e)) => tracing::warn!(projection = s.name, error = %e, "checking a rebuild"),
        }
        // Not at the gate (or the gate just moved): only a commit of the new
        // generation can change that.
        commits.wait(seen, FLAG_CHECK);
    }
    let old = s.live.read().expect("live lock").clone();
    job.switching.store(true, Ordering::Relaxed);
    // 1. The live generation stops where it is, and publishes everything it
    //    emitted: its outbox goes with its files, so it must be empty first.
    old.stop();
    let mut relay = crate::sink::Relay::new(
        s.name,
        old.number,
        old.read_model.clone(),
        s.log.clone(),
        s.kafka.clone(),
        Arc::default(),
    );
    let drained = retry(&s, &job, "publishing the old generation's emitted events", || match relay.publish_some() {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) => Err(e),
    });
    if !drained {
        return;
    }
    let last = loop {
        match old.checkpoints() {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(projection = s.name, error = %e, "reading the final checkpoints");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    // 2. The new generation catches up to exactly those checkpoints, still
    //    as history: nothing it does is published before the switch is
    //    durable (a crash before it leaves the old generation live, and that
    //    one emits for what comes next).
    new.control.set_replay(Replay::Until(last.clone(), failed(&old)));
    loop {
        let seen = commits.current();
        if new.checkpoints().is_ok_and(|c| caught_up(&c, &last)) {
            break;
        }
        if s.shutdown.load(Ordering::Relaxed) {
            // The old generation stays live on disk; the rebuild resumes at the next start.
            new.stop();
            return;
        }
        commits.wait(seen, FLAG_CHECK);
    }
    // 3. The switch, atomic on disk; retried until it holds (the old
    //    generation has stopped: the projection cannot stay between the two).
    if let Some(ms) = std::env::var("REFRACT_TEST_SWITCH_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        // A test hook: hold here, the last moment before the switch is durable, so that a test can kill the process.
        tracing::warn!(projection = s.name, ms, "holding the switch before it is durable");
        std::thread::sleep(Duration::from_millis(ms));
    }
    let switched = retry(&s, &job, "switching generations", || {
        write_number(s.root, LIVE_FILE, new.number).map(|()| true).map_err(|e| e.to_string())
    });
    if !switched {
        return;
    }
    let _ = std::fs::remove_file(s.root.join(REBUILD_FILE));
    let starting = s.starting.lock().expect("starting lock");
    *s.live.write().expect("live lock") = new.clone();
    *s.rebuild.lock().expect("rebuild lock") = None;
    drop(starting);
    // From here on the new generation is the live one: it emits for every
    // event after the old one's last checkpoints.
    new.control.set_replay(Replay::Before(last));
    tracing::info!(projection = s.name, generation = new.number, "rebuild finished; the new generation is live");
    // 4. Queries in flight may still hold the old read model; its files go (Linux keeps open ones readable).
    delete(s.root, old.number);
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
