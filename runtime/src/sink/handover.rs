//! Handing a shard's emitted events over between instances, so that a
//! derived event reaches its Kafka topic once although the shard that emits
//! it moves (issue 26, step 5 of `docs/cluster-design.md`).
//!
//! - Every copy of a shard (active or standby) numbers its emits alike:
//!   per source partition, in that partition's order
//!   ([`crate::store::Origin`]), and publishes each under the emit id
//!   `<projection>/<stream>/<partition>/<ordinal>`.
//! - Only the active copy publishes. After each chunk it records on the
//!   control topic, under `publication/<projection>/<shard>`, a
//!   [`Publication`]: up to which ordinal of each partition it has published,
//!   and, per target partition, an offset before which none of the records
//!   it publishes next can land. A standby keeps what it emits until a
//!   publication covers it.
//! - A new active copy waits until the last writer of that record has let
//!   the shard go (a final record) or is gone (no longer live), then skips
//!   what the record covers, and reads each target partition from the
//!   recorded offset to its end: emit ids found there were published after
//!   the record, and are not sent again.
//! - A rebuilt generation numbers its emits afresh (under its own id
//!   prefix), counting those of the history it replayed, so every copy
//!   numbers alike although each switched at its own point. When it takes
//!   over from the previous generation's record, what its outbox does not
//!   hold is done (history), and the rest is its to publish.
//!
//! The guarantee: exactly once on the target topics, for a plugin whose
//! emits follow from the events of their partition (the same events in the
//! same order emit the same events), unless the records published after the
//! last publication were deleted (retention) before the new owner read them.
//! A shard that joins topics emitting on one topic's events depending on
//! what arrived from another may number differently on the new owner: its
//! emits around a hand-over can repeat or be missing. Kafka transactions
//! would not need the read, but tansu 0.6.0 has none.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What the active copy of a shard has published (on the control topic).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Publication {
    /// The instance that wrote it.
    pub instance: String,
    /// The generation of the shard it speaks of: a rebuilt generation
    /// numbers its emits afresh, so an older generation's ordinals say
    /// nothing of its emits.
    #[serde(default)]
    pub generation: u64,
    /// It let the shard go: it publishes nothing more for it.
    pub released: bool,
    /// Per source partition: every emit numbered up to `ordinal` is published.
    pub published: Vec<Published>,
    /// Per target partition: none of the records the writer publishes after
    /// this one lands before `offset`.
    pub from: Vec<Mark>,
    /// When it was written, in ms since the Unix epoch.
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub stream: String,
    pub partition: u32,
    pub ordinal: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Per (stream, partition): the last ordinal published.
pub type Ordinals = BTreeMap<(String, u32), u64>;
/// Per (topic, partition): an offset.
pub type Offsets = BTreeMap<(String, i32), i64>;

impl Publication {
    /// What `instance` says it published (`released`: and that it stopped).
    pub fn new(instance: String, generation: u64, released: bool, published: &Ordinals, from: &Offsets) -> Publication {
        Publication {
            instance,
            generation,
            released,
            published: published
                .iter()
                .map(|((stream, partition), ordinal)| Published {
                    stream: stream.clone(),
                    partition: *partition,
                    ordinal: *ordinal,
                })
                .collect(),
            from: from
                .iter()
                .map(|((topic, partition), offset)| Mark {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                })
                .collect(),
            at: crate::clock::now_ms(),
        }
    }

    pub fn ordinals(&self) -> Ordinals {
        self.published.iter().map(|p| ((p.stream.clone(), p.partition), p.ordinal)).collect()
    }

    pub fn offsets(&self) -> Offsets {
        self.from.iter().map(|m| ((m.topic.clone(), m.partition), m.offset)).collect()
    }
}

/// Where publications are kept: the control topic (`cluster::Cluster`).
pub trait Publications: Send + Sync {
    /// This instance's id.
    fn instance(&self) -> String;
    /// The last publication of shard `n` of `projection`, and whether its
    /// writer (the run of the instance that wrote it) is still live.
    fn publication(&self, projection: &str, n: u32) -> Option<(Publication, bool)>;
    /// Wait until every record written before this call has been read, so
    /// that [`Publications::publication`] misses none of them (at most
    /// `within`); whether it has.
    fn read_up_to_now(&self, within: Duration) -> bool;
    /// Record `publication` for shard `n` of `projection` (sent and acknowledged).
    fn record(&self, projection: &str, n: u32, publication: &Publication) -> Result<(), String>;
}

/// Whether a shard's relay publishes (its copy is active) or holds what it
/// emits (a standby): the runtime flips it when the shard is taken on or let go.
pub struct Handover {
    pub projection: String,
    pub shard: u32,
    active: AtomicBool,
    /// Set once the instance has joined the cluster.
    publications: Arc<OnceLock<Arc<dyn Publications>>>,
}

impl Handover {
    pub fn new(projection: &str, shard: u32, active: bool, publications: Arc<OnceLock<Arc<dyn Publications>>>) -> Self {
        Handover { projection: projection.to_owned(), shard, active: AtomicBool::new(active), publications }
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
    }

    pub(super) fn publications(&self) -> Option<&Arc<dyn Publications>> {
        self.publications.get()
    }
}

/// How long a new owner waits for the old one, still live, to let the
/// shard go before it takes the publishing over regardless (the old one
/// finishes the chunk it is sending first: seconds on a busy broker).
const RELEASE_WAIT: Duration = Duration::from_secs(30);
/// How often the active copy records its publication while it publishes.
pub(super) const RECORD_INTERVAL: Duration = Duration::from_secs(1);

/// What a shard's relay knows of the publishing it has taken over. (Where
/// to read a target topic back from is the relay's own `from` for it, which
/// starts as the last publication's and moves only once the topic is read.)
#[derive(Debug, Default)]
pub(super) struct Takeover {
    /// Emits the previous owners published, by the last publication.
    pub covered: Ordinals,
    /// Target topics already read.
    pub read: HashSet<String>,
    /// Emit ids found on them: published already, not to be sent again.
    pub seen: HashSet<String>,
    /// Where each read back started: while some of `seen` are still ahead
    /// of this relay's outbox (not yet covered by its ordinals), its
    /// records say their targets must be read back from here, or the next
    /// owner would miss them and send them again.
    pub read_from: Offsets,
}

impl Takeover {
    /// `from` as this relay's record must state it: no further on than
    /// where its read backs started while emits found there are not yet
    /// covered by its ordinals.
    pub(super) fn recorded_from(&self, from: &Offsets) -> Offsets {
        let mut from = from.clone();
        if !self.seen.is_empty() {
            for (at, start) in &self.read_from {
                let offset = from.entry(at.clone()).or_insert(*start);
                *offset = (*offset).min(*start);
            }
        }
        from
    }

    /// Whether `ordinal` of `(stream, partition)` was published by a previous owner, as far as the record says.
    pub(super) fn covers(&self, stream: &str, partition: u32, ordinal: u64) -> bool {
        self.covered.get(&(stream.to_owned(), partition)).is_some_and(|upto| ordinal <= *upto)
    }
}

/// Wait until the last writer of shard `h`'s publication has let it go or
/// is gone (at most [`RELEASE_WAIT`]), and say what it published. `None`
/// when the wait was cut short: the shard was let go, or `stop` set.
pub(super) fn take_over(h: &Handover, stop: &AtomicBool) -> Option<Publication> {
    let waited = Instant::now();
    let mut read_up = false;
    loop {
        if stop.load(Ordering::Relaxed) || !h.is_active() {
            return None;
        }
        let Some(publications) = h.publications() else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        // Decide on every record written so far: a view that missed the
        // last owner's would let two instances publish at once.
        if !read_up && !publications.read_up_to_now(Duration::from_secs(5)) {
            if waited.elapsed() < RELEASE_WAIT {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            tracing::warn!(projection = %h.projection, shard = h.shard, "the control topic could not be read to its end; deciding on what was read");
        }
        read_up = true;
        let me = publications.instance();
        match publications.publication(&h.projection, h.shard) {
            None => return Some(Publication::default()),
            Some((p, live)) if p.released || !live || p.instance == me => return Some(p),
            Some((p, _)) if waited.elapsed() >= RELEASE_WAIT => {
                tracing::warn!(projection = %h.projection, shard = h.shard, holder = %p.instance, "the previous owner has not let the shard go; publishing anyway (its last emits may repeat)");
                return Some(p);
            }
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A directory in memory: (publication, writer live) per shard.
    #[derive(Default)]
    struct Directory(Mutex<BTreeMap<(String, u32), (Publication, bool)>>);

    impl Publications for Directory {
        fn instance(&self) -> String {
            "b".into()
        }
        fn publication(&self, projection: &str, n: u32) -> Option<(Publication, bool)> {
            self.0.lock().unwrap().get(&(projection.to_owned(), n)).cloned()
        }
        fn read_up_to_now(&self, _: Duration) -> bool {
            true
        }
        fn record(&self, projection: &str, n: u32, publication: &Publication) -> Result<(), String> {
            self.0.lock().unwrap().insert((projection.to_owned(), n), (publication.clone(), true));
            Ok(())
        }
    }

    #[test]
    fn a_record_points_back_to_emits_read_back_until_its_ordinals_cover_them() {
        let mut takeover = Takeover::default();
        takeover.read_from.insert(("t".into(), 0), 2300);
        let from: Offsets = [(("t".to_owned(), 0), 4022), (("t".to_owned(), 1), 10)].into();
        // Nothing found ahead: the relay's own offsets.
        assert_eq!(takeover.recorded_from(&from), from);
        // Emits the previous owner published, not yet passed by the outbox:
        // the next owner must read them back too.
        takeover.seen.insert("p/s/0/4383".into());
        let recorded = takeover.recorded_from(&from);
        assert_eq!(recorded[&("t".to_owned(), 0)], 2300);
        assert_eq!(recorded[&("t".to_owned(), 1)], 10);
    }

    #[test]
    fn a_new_owner_waits_for_the_old_one_to_let_go_or_leave() {
        let directory = Arc::new(Directory::default());
        let cell = Arc::new(OnceLock::new());
        let _ = cell.set(directory.clone() as Arc<dyn Publications>);
        let h = Handover::new("p", 0, true, cell);
        let stop = AtomicBool::new(false);
        assert_eq!(take_over(&h, &stop), Some(Publication::default()), "nothing recorded: nothing published");

        let held = Publication {
            instance: "a".into(),
            published: vec![Published { stream: "s".into(), partition: 0, ordinal: 7 }],
            ..Default::default()
        };
        directory.record("p", 0, &held).unwrap();
        let releasing = {
            let directory = directory.clone();
            let held = held.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                directory.record("p", 0, &Publication { released: true, ..held }).unwrap();
            })
        };
        let started = Instant::now();
        let taken = take_over(&h, &stop).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250), "did not wait for the release");
        assert!(taken.released);
        assert_eq!(taken.ordinals().get(&("s".to_owned(), 0)), Some(&7));
        releasing.join().unwrap();

        // A writer that is gone needs no release.
        directory.0.lock().unwrap().insert(("p".into(), 0), (held, false));
        assert!(!take_over(&h, &stop).unwrap().released);
        // Let go meanwhile: no takeover.
        directory.0.lock().unwrap().get_mut(&("p".into(), 0)).unwrap().1 = true;
        h.set_active(false);
        assert_eq!(take_over(&h, &stop), None);
    }
}
