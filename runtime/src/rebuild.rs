//! Blue/green rebuilds.
//!
//! A rebuild starts generation `n + 1` (recorded in the file `rebuilding`,
//! so that a restart resumes it) with its own worker replaying every
//! subscribed stream from the beginning, emission off, while the live
//! generation keeps consuming and answering queries. Once the new one has
//! reached the live one's checkpoints, the [`monitor`] switches (a
//! partitioned projection's shards each build their own, and switch only
//! once every shard's has caught up, so that no query reads two
//! generations at once: the [`SwitchBarrier`]):
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
//!
//! A *preview* is a rebuild with another plugin version that is held at
//! its switch until it is promoted ([`Rebuild::promote`]): caught up, it
//! keeps following the live generation as history, emitting nothing, so
//! that its tables can be compared with the live ones (`store::diff`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::{Backoff, now_ms};
use crate::generation::{self, Generation};
use crate::projector::Replay;
use crate::source::log::EventLog;
use crate::source::reader::Cursor;

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
    /// It has caught up with the live generation (and follows it) and waits
    /// for the others to switch (shown in a cluster's announcements).
    pub(crate) caught_up: AtomicBool,
    /// A preview: it does not switch until it is promoted.
    preview: bool,
    promoted: AtomicBool,
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
    /// A preview: it switches only once promoted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preview: bool,
    /// It has caught up with the live generation and follows it (a
    /// preview's tables can be compared; a rebuild waits for its other shards).
    #[serde(default)]
    pub caught_up: bool,
}

impl RebuildStatus {
    /// One status for the rebuilds of a projection's shards (one for each):
    /// their sums, the slowest one's time left, switching once one is.
    pub fn combined(shards: Vec<RebuildStatus>) -> Option<RebuildStatus> {
        let mut shards = shards.into_iter();
        let mut whole = shards.next()?;
        for s in shards {
            whole.replayed += s.replayed;
            whole.target += s.target;
            whole.events_per_second += s.events_per_second;
            whole.eta_seconds = match (whole.eta_seconds, s.eta_seconds) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            whole.started_at = whole.started_at.min(s.started_at);
            whole.switching |= s.switching;
            whole.waiting_for = whole.waiting_for.or(s.waiting_for);
            whole.preview |= s.preview;
            whole.caught_up &= s.caught_up;
        }
        Some(whole)
    }
}

fn total(c: &Cursor) -> u64 {
    c.values().sum()
}

impl Rebuild {
    /// A rebuild into `generation`; a preview (`preview`) waits to be promoted before it switches.
    pub fn new(generation: Arc<Generation>, preview: bool) -> crate::store::Result<Self> {
        let initial = total(&generation.checkpoints()?);
        Ok(Rebuild {
            generation,
            started: Instant::now(),
            started_at: now_ms(),
            initial,
            cancel: AtomicBool::new(false),
            switching: AtomicBool::new(false),
            waiting_for: Mutex::new(None),
            caught_up: AtomicBool::new(false),
            preview,
            promoted: AtomicBool::new(false),
        })
    }

    /// Whether it is a preview (promoted or not).
    pub fn is_preview(&self) -> bool {
        self.preview
    }

    /// Let a preview switch once it has caught up, as a rebuild does; the monitor wakes at once.
    pub fn promote(&self) {
        self.promoted.store(true, Ordering::Relaxed);
        self.generation.read_model.commit_signal().notify();
    }

    /// A preview not promoted yet: it must not switch.
    pub fn held(&self) -> bool {
        self.preview && !self.promoted.load(Ordering::Relaxed)
    }

    /// Whether it has caught up and waits to switch.
    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
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
            preview: self.preview,
            caught_up: self.is_caught_up(),
        })
    }

    fn wait_for(&self, why: Option<String>) {
        *self.waiting_for.lock().expect("waiting lock") = why;
    }
}

/// When a new generation that has caught up may switch (a barrier). A projection in
/// one shard switches at once; the shards of a partitioned one wait until
/// every shard's new generation has caught up ([`AllShards`]), then all
/// switch, so that a query merging shards never meets two generations for
/// longer than the switches take (and retries then: `api::shards`).
pub trait SwitchBarrier: Send + Sync {
    /// Shard `n`'s new generation has caught up with its live one (and
    /// keeps following it while it waits).
    fn ready(&self, n: u32);
    /// Whether the shards may switch; once it says so, it keeps saying so.
    fn open(&self) -> bool;
}

/// The gate of a projection in one shard: open as soon as it is ready.
pub struct Alone;

impl SwitchBarrier for Alone {
    fn ready(&self, _: u32) {}

    fn open(&self) -> bool {
        true
    }
}

/// The gate of a partitioned projection whose shards all run here: open
/// once each of them is ready.
pub struct AllShards {
    waiting: Mutex<std::collections::BTreeSet<u32>>,
}

impl AllShards {
    /// A gate waiting for `shards` (those already switched, after a crash in
    /// the middle of a switch, are not waited for).
    pub fn new(shards: impl IntoIterator<Item = u32>) -> Self {
        AllShards { waiting: Mutex::new(shards.into_iter().collect()) }
    }
}

impl SwitchBarrier for AllShards {
    fn ready(&self, n: u32) {
        self.waiting.lock().expect("barrier lock").remove(&n);
    }

    fn open(&self) -> bool {
        self.waiting.lock().expect("barrier lock").is_empty()
    }
}

/// A rebuild of a partitioned projection across a cluster, as asked for on
/// the control topic (`rebuild/<projection>`): every instance rebuilds the
/// copies of its shards (active and standby) into `generation`, and they
/// all switch once the control topic says so (`switch/<projection>`),
/// which any instance writes once every shard's active copy has caught up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRebuild {
    pub generation: u64,
    /// The schema-version it is built with: an instance whose plugin file
    /// declares another waits for the new one (a new version dropped on
    /// the instances one after the other).
    pub schema_version: u32,
    /// Cancelled: every instance deletes what it built.
    #[serde(default)]
    pub cancelled: bool,
    /// The instance that asked.
    pub by: String,
    /// When, in ms since the Unix epoch.
    pub at: i64,
}

/// What the switch of a cluster's rebuild waits on: the control topic.
pub trait ClusterSwitches: Send + Sync {
    /// The generation every shard of `projection` has been told to switch to (0: none).
    fn switched(&self, projection: &str) -> u64;
}

/// The barrier of a shard's copy in a cluster: open once the control topic
/// says that every shard switches to `generation` (readiness travels in
/// this instance's announcements, from the rebuild's status).
pub struct ClusterSwitch {
    pub switches: Arc<dyn ClusterSwitches>,
    pub projection: String,
    pub generation: u64,
}

impl SwitchBarrier for ClusterSwitch {
    fn ready(&self, _: u32) {}

    fn open(&self) -> bool {
        self.switches.switched(&self.projection) >= self.generation
    }
}

/// What the monitor needs of the projection it switches.
pub struct Switch<'a> {
    pub name: &'a str,
    /// The shard it switches (`None`: the projection's only one).
    pub partition: Option<u32>,
    /// When it may switch.
    pub barrier: &'a dyn SwitchBarrier,
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

/// How often a shard that is ready looks whether the others are: the
/// shards of a projection switch within about this much of each other.
const GATE_CHECK: Duration = Duration::from_millis(20);

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
            generation::abandon_rebuild(s.root, new.number);
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
        let mut wait = FLAG_CHECK;
        match (new.checkpoints(), live.checkpoints()) {
            (Ok(n), Ok(l)) => match &gate {
                Some(g) if caught_up(&n, g) && behind(g, &l) <= SWITCH_WITHIN => {
                    job.caught_up.store(true, Ordering::Relaxed);
                    s.barrier.ready(s.partition.unwrap_or(0));
                    if s.barrier.open() && !job.held() {
                        break;
                    }
                    // Other shards are not there yet, or it is a preview:
                    // follow the live generation meanwhile, and look at the
                    // gate often (a preview, which may wait for days, less so).
                    wait = if job.held() { FLAG_CHECK } else { GATE_CHECK };
                    if behind(g, &l) > 0 {
                        new.control.set_replay(Replay::Until(l.clone(), failed(&live)));
                        gate = Some(l);
                    }
                }
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
        // generation can change that (or, once it is ready, the other shards).
        commits.wait(seen, wait);
    }
    let old = s.live.read().expect("live lock").clone();
    job.switching.store(true, Ordering::Relaxed);
    // 1. The live generation stops where it is, and publishes everything it
    //    emitted: its outbox goes with its files, so it must be empty first.
    //    (A standby copy of a shard in a cluster publishes nothing: what it
    //    holds is the active copy's to publish.)
    old.stop();
    let publishes = old.handover.as_ref().is_none_or(|h| h.is_active());
    let mut relay = crate::sink::Relay::new(
        s.name,
        old.number,
        old.read_model.clone(),
        s.log.clone(),
        s.kafka.clone(),
        Arc::default(),
    );
    if let Some(n) = s.partition {
        relay = relay.for_shard(n, None);
    }
    let drained = !publishes
        || retry(&s, &job, "publishing the old generation's emitted events", || match relay.publish_some() {
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
        generation::make_live(s.root, new.number).map(|()| true).map_err(|e| e.to_string())
    });
    if !switched {
        return;
    }
    generation::unmark_rebuilding(s.root);
    let starting = s.starting.lock().expect("starting lock");
    *s.live.write().expect("live lock") = new.clone();
    *s.rebuild.lock().expect("rebuild lock") = None;
    // From here on the new generation is the live one: it emits for every
    // event after the old one's last checkpoints. A shard's copy in a
    // cluster takes the old one's role (read under the lock that taking a
    // shard on or letting it go holds): the active copy publishes, a
    // standby keeps what it emits for the active copy to publish.
    match &new.handover {
        Some(h) if !old.handover.as_ref().is_some_and(|h| h.is_active()) => {
            h.set_active(false);
            new.control.set_replay(Replay::Standby);
        }
        // Recording before the gate opens: every live batch is a change.
        Some(h) => {
            new.read_model.record_changes(true);
            new.control.set_replay(Replay::Before(last));
            h.set_active(true);
        }
        None => {
            new.read_model.record_changes(true);
            new.control.set_replay(Replay::Before(last));
        }
    }
    drop(starting);
    tracing::info!(projection = s.name, generation = new.number, "rebuild finished; the new generation is live");
    // 4. Queries in flight may still hold the old read model; its files go (Linux keeps open ones readable).
    generation::delete(s.root, old.number);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shards_switch_once_every_one_is_ready_and_then_stay_allowed() {
        let barrier = AllShards::new([0, 1, 2]);
        barrier.ready(0);
        barrier.ready(2);
        assert!(!barrier.open(), "shard 1 is not ready");
        barrier.ready(1);
        assert!(barrier.open());
        barrier.ready(1);
        assert!(barrier.open(), "it stays open");
        // After a crash in the middle of a switch, only the shards not yet switched are waited for.
        assert!(AllShards::new([]).open());
        assert!(Alone.open());
    }

    #[test]
    fn a_partitioned_rebuild_shows_its_shards_added_up() {
        let shard = |replayed, target, eta: Option<f64>, started_at, switching| RebuildStatus {
            generation: 3,
            replayed,
            target,
            events_per_second: 100.0,
            eta_seconds: eta,
            started_at,
            switching,
            waiting_for: None,
            preview: false,
            caught_up: switching,
        };
        let whole =
            RebuildStatus::combined(vec![shard(10, 40, Some(0.3), 7, false), shard(30, 50, Some(0.2), 5, true)])
                .unwrap();
        assert_eq!((whole.replayed, whole.target, whole.started_at), (40, 90, 5));
        assert_eq!((whole.events_per_second, whole.eta_seconds, whole.switching), (200.0, Some(0.3), true));
        let unknown = RebuildStatus::combined(vec![shard(1, 2, None, 1, false), shard(1, 2, Some(1.0), 1, false)]);
        assert_eq!(unknown.unwrap().eta_seconds, None, "the slowest shard's time left is not known yet");
        assert!(RebuildStatus::combined(Vec::new()).is_none());
    }
}
