//! The worker against a real log and read model, with a native plugin that
//! counts events and fails on request.

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refract_sdk::{Event as SdkEvent, Failure, Manifest, Projection, Table};
use serde_json::json;

use super::commit::InFlight;
use super::recovery::event_in;
use super::*;
use crate::plugin::native::NativeProjection;
use crate::source::NewEvent;
use crate::source::log::EventLog;
use crate::source::log::LogOptions;
use crate::source::reader::{Cursor, Delivery, LogReader, Pending, Reader};
use crate::store::read_model::Commit;
use crate::store::{DeadLetter, ReadModel};

const SEEN: Table<u64> = Table::new("seen");
const TOTAL: Table<u64> = Table::new("total");

thread_local! {
    static FLAKES_LEFT: Cell<u32> = const { Cell::new(0) };
}

/// Counts events (read-modify-write: applying one twice would show) and
/// fails on request: `Bad` is rejected, `Boom` panics, `Flaky` is transient
/// while `FLAKES_LEFT` > 0.
struct Counter;

impl Projection for Counter {
    fn manifest() -> Manifest {
        Manifest::new("counter", "1.2.3")
            .subscribe("s", &["Ok", "Bad", "Boom", "Flaky", "Emit"])
            .table(&SEEN)
            .table(&TOTAL)
    }

    fn apply(e: &SdkEvent) -> Result<(), Failure> {
        match e.event_type.as_str() {
            "Bad" => return Err(Failure::rejected(format!("bad event at {}", e.offset))),
            "Boom" => panic!("boom at {}", e.offset),
            "Flaky" if FLAKES_LEFT.get() > 0 => {
                FLAKES_LEFT.set(FLAKES_LEFT.get() - 1);
                return Err(Failure::transient("try again"));
            }
            "Emit" => refract_sdk::emit(
                "echoes",
                refract_sdk::NewEvent::json("Echo", &format!("{}/{}", e.partition, e.offset))?.time(e.time),
            )?,
            _ => {}
        }
        SEEN.put(&format!("{}/{:04}", e.partition, e.offset), &e.offset)?;
        let total = TOTAL.get("all")?.unwrap_or(0);
        TOTAL.put("all", &(total + 1))
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    log: Arc<EventLog>,
    read_model: Arc<ReadModel>,
    status: Arc<Mutex<WorkerStatus>>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let options = LogOptions { default_partitions: 2, ..LogOptions::default() };
        let log = Arc::new(EventLog::open(&dir.path().join("log.redb"), options).unwrap());
        let read_model = Arc::new(ReadModel::open(&dir.path().join("rm.redb")).unwrap());
        Fixture { _dir: dir, log, read_model, status: Arc::default() }
    }

    fn append(&self, types: &[&str]) {
        let events: Vec<NewEvent> = types
            .iter()
            .enumerate()
            .map(|(i, t)| serde_json::from_value(json!({"type": t, "key": format!("k{}", i % 7), "data": {}})).unwrap())
            .collect();
        self.log.append("s", &events).unwrap();
    }

    fn projector(&self, options: BatchOptions) -> Projector {
        let handler = Box::new(NativeProjection::new(Counter::manifest(), Counter::handle));
        Projector::new(
            handler,
            self.read_model.clone(),
            crate::source::Sources::log(self.log.clone()),
            options,
            self.status.clone(),
        )
        .unwrap()
    }

    fn drain(&self, projector: &mut Projector) {
        while projector.step().unwrap() > 0 {}
    }

    fn total(&self) -> u64 {
        self.read_model.get("total", "all").unwrap().map_or(0, |v| serde_json::from_slice(&v).unwrap())
    }
}

fn fast() -> BatchOptions {
    BatchOptions { call_events: 8, initial_backoff: Duration::from_millis(1), ..BatchOptions::default() }
}

/// A dead letter from Kafka (not in the embedded log) is retried as the
/// event it was: the same headers, content type and bytes.
#[test]
fn a_dead_letter_retries_with_its_headers_content_type_and_bytes() {
    let letter = |data: serde_json::Value, content_type: Option<&str>| DeadLetter {
        stream: "payments".into(),
        topic: Some("payments.v1".into()),
        partition: 2,
        offset: 7,
        key: Some("k".into()),
        event_type: "PaymentReceived".into(),
        time: 5,
        data,
        headers: vec![("ce_source".into(), "bank".into()), ("trace".into(), "t-1".into())],
        content_type: content_type.map(str::to_owned),
        plugin_version: "1".into(),
        plugin_digest: None,
        error: "rejected".into(),
        failed_at: 6,
    };
    let text = event_in(&letter(serde_json::json!("\"quoted\" text"), Some("text/plain")));
    assert_eq!(text.data, b"\"quoted\" text");
    assert_eq!(text.content_type, "text/plain");
    assert_eq!(text.headers, [("ce_source".to_owned(), "bank".to_owned()), ("trace".to_owned(), "t-1".to_owned())]);
    let json = event_in(&letter(serde_json::json!({"amount": 1}), None));
    assert_eq!((json.data.as_slice(), json.content_type.as_str()), (&br#"{"amount":1}"#[..], "application/json"));
    // A letter stored before these fields existed still reads.
    let old = r#"{"stream":"s","partition":0,"offset":1,"key":null,"type":"T","time":0,"data":1,"pluginVersion":"1","error":"e","failedAt":0}"#;
    let old: DeadLetter = serde_json::from_str(old).unwrap();
    assert!(old.headers.is_empty() && old.content_type.is_none());
}

#[test]
fn bisection_dead_letters_only_the_poison_events() {
    let f = Fixture::new();
    let mut types = vec!["Ok"; 100];
    for at in [3, 40, 41, 77] {
        types[at] = "Bad";
    }
    types[60] = "Boom";
    f.append(&types);
    let mut p = f.projector(fast());
    f.drain(&mut p);

    assert_eq!(f.total(), 95, "every good event applied exactly once");
    let letters = f.read_model.dead_letters(0, 100).unwrap();
    assert_eq!(letters.len(), 5);
    assert!(letters.iter().all(|(_, l)| l.plugin_version == "1.2.3"));
    let boom = letters.iter().find(|(_, l)| l.event_type == "Boom").unwrap();
    assert!(boom.1.error.contains("trap: plugin panicked: boom at"), "{}", boom.1.error);
    let counters = f.read_model.counters().unwrap();
    assert_eq!((counters.events_applied, counters.dead_letters), (95, 5));
    let heads = f.log.heads("s").unwrap();
    let checkpoints: Vec<u64> = f.read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).collect();
    assert_eq!(checkpoints, heads);
}

#[test]
fn a_new_worker_resumes_from_the_checkpoint_without_reapplying() {
    let f = Fixture::new();
    f.append(&["Ok"; 50]);
    let mut p = f.projector(fast());
    f.drain(&mut p);
    drop(p);
    f.append(&["Ok"; 30]);
    let mut p = f.projector(fast());
    f.drain(&mut p);
    assert_eq!(f.total(), 80);
    assert_eq!(f.read_model.counters().unwrap().events_applied, 80);
}

#[test]
fn a_resumed_rebuild_holds_back_until_its_gate_is_set_and_reads_nothing_twice() {
    let f = Fixture::new();
    f.append(&["Ok"; 50]);
    let mut p = f.projector(fast());
    f.drain(&mut p);
    drop(p);
    f.append(&["Ok"; 20]);
    // A rebuild's worker after a restart: replaying from its checkpoints,
    // the gate at the live generation's checkpoints not set yet.
    let mut p = f.projector(fast());
    p.set_replaying(true);
    let control = p.control();
    let worker = std::thread::spawn(move || p.run());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.total(), 50, "nothing read past the unset gate, nothing read again");
    let heads: Cursor =
        f.log.heads("s").unwrap().into_iter().enumerate().map(|(p, h)| (("s".to_owned(), p as u32), h)).collect();
    control.set_replay(Replay::Until(heads.clone(), Failed::default()));
    let until = Instant::now() + Duration::from_secs(10);
    while f.read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).sum::<u64>() < 70 {
        assert!(Instant::now() < until, "the gated worker did not catch up");
        std::thread::sleep(Duration::from_millis(10));
    }
    control.stop();
    worker.join().unwrap();
    assert_eq!(f.total(), 70, "every event applied once");
    assert_eq!(f.read_model.counters().unwrap().events_applied, 70);
}

/// The scheduling policy of this process's thread named `name` (Linux: field 41 of its stat).
#[cfg(target_os = "linux")]
fn policy_of(name: &str) -> Option<u32> {
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        if std::fs::read_to_string(dir.join("comm")).ok()?.trim() == name {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // Fields after the parenthesised name, which may contain spaces.
            let rest = &stat[stat.rfind(')')? + 2..];
            return rest.split(' ').nth(38)?.parse().ok();
        }
    }
    None
}

#[cfg(target_os = "linux")]
#[test]
fn a_rebuild_replays_at_idle_priority_and_goes_live_at_normal_priority() {
    let f = Fixture::new();
    f.append(&["Ok"; 20]);
    let mut p = f.projector(fast());
    p.set_replaying(true);
    let control = p.control();
    let worker = std::thread::Builder::new().name("rebuild-test".into()).spawn(move || p.run()).unwrap();
    let wait_for = |policy: u32| {
        let until = Instant::now() + Duration::from_secs(5);
        while policy_of("rebuild-test") != Some(policy) {
            assert!(Instant::now() < until, "policy {:?}, wanted {policy}", policy_of("rebuild-test"));
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(libc::SCHED_IDLE as u32);
    // The switch: it handles live events from here on, at normal priority.
    control.set_replay(Replay::Live);
    wait_for(libc::SCHED_OTHER as u32);
    control.stop();
    worker.join().unwrap();
}

#[test]
fn transient_failures_are_retried_with_back_off_not_dead_lettered() {
    let f = Fixture::new();
    f.append(&["Ok", "Flaky", "Ok"]);
    FLAKES_LEFT.set(3);
    let mut p = f.projector(fast());
    f.drain(&mut p);
    assert_eq!(f.total(), 3);
    assert!(f.read_model.dead_letters(0, 10).unwrap().is_empty());
    let status = f.status.lock().unwrap();
    assert_eq!(status.state, WorkerState::Running);
    assert!(status.last_error.as_deref().unwrap().contains("transient: try again"));
}

/// Told to stop while it backs off from a failing batch, a worker stops
/// then, not at the end of the back-off (an hour here); commands sent
/// during the back-off wait for it and do not wake it.
#[test]
fn a_stop_cuts_a_back_off_short() {
    let f = Fixture::new();
    f.append(&["Flaky"]);
    let hour = Duration::from_secs(3600);
    let p = f.projector(BatchOptions { initial_backoff: hour, max_backoff: hour, ..fast() });
    let control = p.control();
    let (stopped, worker_stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        FLAKES_LEFT.set(u32::MAX);
        p.run();
        let _ = stopped.send(());
    });
    let until = Instant::now() + Duration::from_secs(10);
    while f.status.lock().unwrap().state != WorkerState::Retrying {
        assert!(Instant::now() < until, "the batch never failed");
        std::thread::sleep(Duration::from_millis(5));
    }
    control.resume();
    assert!(worker_stopped.recv_timeout(Duration::from_millis(300)).is_err(), "a resume does not end a back-off");
    control.stop();
    assert!(worker_stopped.recv_timeout(Duration::from_secs(30)).is_ok(), "the stop was not taken during the back-off");
    assert_eq!(f.total(), 0, "the failing batch was not applied");
}

#[test]
fn unsubscribed_event_types_advance_the_checkpoint_without_reaching_the_plugin() {
    let f = Fixture::new();
    f.append(&["Ok", "Other", "Other", "Ok"]);
    let mut p = f.projector(fast());
    f.drain(&mut p);
    assert_eq!(f.total(), 2);
    let next: u64 = f.read_model.checkpoints().unwrap().iter().map(|c| c.next_offset).sum();
    assert_eq!(next, 4);
}

#[test]
fn a_time_bounded_batch_commits_what_it_handled_and_the_rest_follows() {
    let f = Fixture::new();
    f.append(&["Ok"; 200]);
    // A zero duration ends every transaction after its first call.
    let options = BatchOptions { max_duration: Duration::ZERO, ..fast() };
    let mut p = f.projector(options);
    assert_eq!(p.step().unwrap(), 200);
    let counters = f.read_model.counters().unwrap();
    assert_eq!((counters.events_applied, counters.batches), (200, 200_u64.div_ceil(8)));
    assert_eq!(f.total(), 200);
}

#[test]
fn a_projection_that_is_behind_catches_up_in_larger_batches() {
    let batches_for = |catch_up_factor: u32| {
        let f = Fixture::new();
        f.append(&["Ok"; 1000]);
        let options = BatchOptions { max_events: 100, catch_up_factor, ..fast() };
        let p = f.projector(options);
        let control = p.control();
        let worker = std::thread::spawn(move || p.run());
        let until = Instant::now() + Duration::from_secs(10);
        while f.read_model.counters().unwrap().events_applied < 1000 {
            assert!(Instant::now() < until, "caught up");
            std::thread::sleep(Duration::from_millis(5));
        }
        control.stop();
        worker.join().unwrap();
        assert_eq!(f.total(), 1000);
        f.read_model.counters().unwrap().batches
    };
    // At least ten batches of at most 100; behind, up to 400 at a time.
    let (normal, catching_up) = (batches_for(1), batches_for(4));
    assert!(normal >= 10 && catching_up * 2 <= normal, "{catching_up} batches against {normal}");
}

#[test]
fn a_batch_behind_grows_while_the_previous_one_is_still_committing() {
    let batches_for = |options: BatchOptions| {
        let f = Fixture::new();
        f.append(&["Ok"; 800]);
        let mut p = f.projector(options);
        // The previous batch's commit takes 300 ms (as a large table's may).
        let done = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(Duration::from_millis(300))
        });
        let commit = Commit { checkpoints: Vec::new(), applied: 0, dead_letters: Vec::new(), retired: Vec::new() };
        let writes = Arc::new(p.begin().unwrap().into_writes());
        let (_finishing, finished) = crossbeam_channel::bounded(0);
        p.in_flight = Some(InFlight { commit, writes, started: Instant::now(), done, finished });
        let (log_streams, _) = p.sources.split(&p.subscriptions);
        let mut pending = Pending::new(true);
        LogReader::new(f.log.clone(), log_streams).read(&p.checkpoints, 800, Duration::ZERO, &mut pending).unwrap();
        let read = pending.events.len() as u64;
        assert!(read > 400, "the read shares 800 between two partitions: {read}");
        p.process(&pending);
        p.settle().unwrap();
        assert_eq!(f.total(), read);
        (f.read_model.counters().unwrap().batches, read)
    };
    // Catch-up batches of 200 events: one batch while the commit before it runs…
    assert_eq!(batches_for(BatchOptions { max_events: 100, catch_up_factor: 2, ..fast() }).0, 1);
    // …unless catch-up batches are off.
    let (batches, read) = batches_for(BatchOptions { max_events: 200, catch_up_factor: 1, ..fast() });
    assert_eq!(batches, read.div_ceil(200));
}

/// A resync while the previous batch is still committing reads again
/// from where that commit ends, not from the checkpoints before it: the
/// span it covers is applied once (audit 17g).
#[test]
fn a_resync_during_a_commit_reads_again_after_that_commit() {
    let f = Fixture::new();
    f.append(&["Ok"; 100]);
    let mut p = f.projector(fast());
    let (log_streams, _) = p.sources.split(&p.subscriptions);
    let mut pending = Pending::default();
    LogReader::new(f.log.clone(), log_streams).read(&p.checkpoints, 1000, Duration::ZERO, &mut pending).unwrap();
    assert_eq!(pending.events.len(), 100);
    // Handle the batch; its commit runs on its own thread, not yet settled.
    p.process(&pending);
    assert!(p.in_flight.is_some());
    let reading = p.spawn_reader();
    let reading = p.read_again(reading);
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        if let Ok(Delivery::Batch(again)) = reading.batches.recv_timeout(Duration::from_millis(50)) {
            p.process(&again);
        }
    }
    reading.end();
    p.settle().unwrap();
    assert_eq!(f.total(), 100, "every event applied once");
}

#[test]
fn emitted_events_commit_with_their_batch_and_are_dropped_while_replaying() {
    let f = Fixture::new();
    let mut types = vec!["Emit"; 20];
    types[5] = "Bad"; // its batch is bisected: the emits of the good halves stay, once
    f.append(&types);
    let mut p = f.projector(fast());
    f.drain(&mut p);
    let emitted = f.read_model.emitted_after(0, 100).unwrap();
    assert_eq!(emitted.len(), 19);
    let mut offsets: Vec<String> = emitted.iter().map(|(_, e)| serde_json::from_str(e.data.get()).unwrap()).collect();
    offsets.sort();
    offsets.dedup();
    assert_eq!(offsets.len(), 19, "no event emitted twice");
    assert!(emitted.iter().all(|(_, e)| e.stream == "echoes" && e.event_type == "Echo"));

    f.append(&["Emit"; 10]);
    p.set_replaying(true);
    f.drain(&mut p);
    assert_eq!(f.read_model.emitted_after(0, 100).unwrap().len(), 19, "replayed events emit nothing");
    assert_eq!(f.total(), 29);
}

#[test]
fn a_replay_horizon_drops_emits_before_it_and_publishes_those_after() {
    let f = Fixture::new();
    f.append(&["Emit"; 40]);
    let mut p = f.projector(fast());
    let horizon: Cursor = [(("s".to_owned(), 0), 5), (("s".to_owned(), 1), 12)].into();
    p.set_replay(Replay::Before(horizon.clone()));
    f.drain(&mut p);
    let emitted: Vec<String> = f
        .read_model
        .emitted_after(0, 100)
        .unwrap()
        .into_iter()
        .map(|(_, e)| serde_json::from_str(e.data.get()).unwrap())
        .collect();
    let heads = f.log.heads("s").unwrap();
    let expected = (heads[0] - 5) + (heads[1] - 12);
    assert_eq!(emitted.len() as u64, expected, "{emitted:?}");
    for source in &emitted {
        let (partition, offset) = source.split_once('/').unwrap();
        let until = horizon[&("s".to_owned(), partition.parse().unwrap())];
        assert!(offset.parse::<u64>().unwrap() >= until, "{source} was before the horizon");
    }
    assert_eq!(f.total(), 40, "every event applied either way");
}
