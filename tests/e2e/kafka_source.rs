//! Projections reading Kafka topics on a real Kafka-protocol broker (tansu),
//! written to by a real Kafka client (librdkafka).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::kafka::{Broker, Out, TestProducer, append_commit_marker};
use crate::support::{Server, plugins};

fn kafka_config(broker: &Broker, streams: &str) -> String {
    format!("kafka:\n  brokers: {}\n  streams:\n{streams}", broker.address())
}

const ORDERS_AS_PLAIN_JSON: &str = "    orders: { topic: shop.orders, format: json, type-header: event-type }\n";

#[test]
fn records_produced_to_kafka_fold_into_the_reference_read_model() {
    let broker = Broker::start();
    broker.create_topic("shop.orders", 4);
    let events = refract_client::fixtures::orders(5000, 41, 0.01);
    let records: Vec<Out> = events.iter().map(Out::plain).collect();
    broker.producer().send_all("shop.orders", &records);

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[&plugins().order_summary], &kafka_config(&broker, ORDERS_AS_PLAIN_JSON));
    let status = server.wait_checkpoints("order-summary", events.len() as u64);
    server.assert_order_summary_is_the_fold_of(&events);

    // Lag per partition: the high watermark against the checkpoint.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let mut status = status;
    while status["partitions"].as_array().unwrap().len() < 4 {
        assert!(std::time::Instant::now() < until, "watermarks never appeared: {status}");
        std::thread::sleep(Duration::from_millis(100));
        status = server.get("/v1/projections/order-summary");
    }
    for p in status["partitions"].as_array().unwrap() {
        assert_eq!(p["head"], p["checkpoint"], "{status}");
        assert_eq!(p["lag"], 0);
    }
    assert_eq!(status["lag"], 0);
    // Read-your-writes with Kafka positions: topic (or stream), partition, offset.
    let p0 = &status["partitions"][0];
    let last = p0["checkpoint"].as_u64().unwrap() - 1;
    let partition = p0["partition"].as_u64().unwrap();
    for name in ["shop.orders", "orders"] {
        let path =
            format!("/v1/projections/order-summary/tables/orders/items?limit=1&wait_for={name}:{partition}:{last}");
        assert_eq!(server.client().get(&path).unwrap().status, 200);
    }
    let ahead = format!(
        "/v1/projections/order-summary/tables/orders/items?wait_for=shop.orders:{partition}:{}&timeout_ms=50",
        last + 1
    );
    assert_eq!(server.client().get(&ahead).unwrap().status, 504, "a position not produced yet is not reached");
    // A rejected event's dead letter names its topic.
    let letters = server.get("/v1/projections/order-summary/dead-letters?limit=1");
    assert_eq!(letters["deadLetters"][0]["topic"], "shop.orders");
}

/// Records of a transactional producer are followed by a commit marker, an
/// offset no consumer is handed: the checkpoint steps over it, so lag
/// reaches 0 (audit 17f).
///
/// tansu 0.6.0 has no transaction coordinator (no EndTxn), so this runs on
/// librdkafka's mock cluster, a Kafka-protocol broker on a local port that
/// the server process connects to like any broker, with the markers a
/// broker writes at a commit appended as raw control batches.
#[test]
fn transaction_markers_are_stepped_over_so_lag_reaches_zero() {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("starting librdkafka's mock cluster");
    cluster.create_topic("shop.orders", 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let events = refract_client::fixtures::orders(60, 43, 0.0);
    let records: Vec<Out> = events.iter().map(|e| Out { partition: Some(0), ..Out::plain(e) }).collect();
    let producer = TestProducer::new(&bootstrap);
    for half in records.chunks(30) {
        producer.send_all("shop.orders", half);
        append_commit_marker(&bootstrap, "shop.orders", 0);
    }

    let dir = tempfile::tempdir().unwrap();
    let config = format!("kafka:\n  brokers: {bootstrap}\n  streams:\n{ORDERS_AS_PLAIN_JSON}");
    let server = Server::start(dir.path(), &[&plugins().order_summary], &config);
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = server.get("/v1/projections/order-summary");
        let handled = status["eventsApplied"].as_u64().unwrap() + status["deadLetters"].as_u64().unwrap();
        if handled == events.len() as u64 && status["lag"] == 0 && status["partitions"][0]["head"] == 62 {
            break status;
        }
        assert!(std::time::Instant::now() < until, "lag never reached 0: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // 60 records and two markers.
    assert_eq!(status["partitions"][0]["checkpoint"], 62, "{status}");
    server.assert_order_summary_is_the_fold_of(&events);
}

#[test]
fn sigkills_and_a_broker_restart_lose_and_double_nothing() {
    let mut broker = Broker::start();
    broker.create_topic("shop.orders", 4);
    let events = refract_client::fixtures::orders(20_000, 42, 0.01);
    let dir = tempfile::tempdir().unwrap();
    // Small batches: many commits, so kills land between and inside them.
    let config = format!(
        "batch:\n  max-events: 400\n  call-events: 100\n  max-duration-ms: 20\n{}",
        kafka_config(&broker, ORDERS_AS_PLAIN_JSON)
    );
    let mut server = Server::start(dir.path(), &[&plugins().order_summary], &config);
    let mut rng = refract_client::fixtures::Rng::new(7);
    let producer = broker.producer();
    let chunks: Vec<&[Value]> = events.chunks(2500).collect();
    let mut kills_mid_batch = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let records: Vec<Out> = chunk.iter().map(Out::plain).collect();
        if i == 3 {
            producer.send_all("shop.orders", &records);
            // The broker goes away while the projection reads, and comes back with its data.
            broker.kill();
            std::thread::sleep(Duration::from_millis(500));
            broker.restart();
            continue;
        }
        if i % 2 == 1 {
            producer.send_all("shop.orders", &records);
            continue;
        }
        // Kill the process while this chunk is being produced and consumed.
        let address = broker.address();
        let sending = std::thread::spawn(move || TestProducer::new(&address).send_all("shop.orders", &records));
        std::thread::sleep(Duration::from_millis(rng.range(20, 300)));
        // Every record is applied or dead-lettered: fewer means work in hand.
        let status = server.get("/v1/projections/order-summary");
        let handled = status["eventsApplied"].as_u64().unwrap() + status["deadLetters"].as_u64().unwrap();
        server.kill();
        eprintln!("kill during chunk {i}: {handled} records handled of {} produced", (i + 1) * 2500);
        kills_mid_batch += usize::from(handled < ((i + 1) * 2500) as u64);
        sending.join().unwrap();
        server.restart();
    }
    assert!(kills_mid_batch >= 1, "no kill landed while the projection was behind");
    server.wait_checkpoints("order-summary", events.len() as u64);
    server.assert_order_summary_is_the_fold_of(&events);
}

/// Every event `testkit-chaos` applied, as `<partition>/<offset>`.
fn applied(server: &Server) -> BTreeSet<String> {
    server.table("testkit-chaos", "applied").into_iter().map(|(k, _)| k).collect()
}

#[test]
fn a_consumer_group_splits_partitions_and_hands_them_over_exactly_once() {
    let broker = Broker::start();
    broker.create_topic("chaos.events", 4);
    let record = |i: usize| Out {
        key: Some(format!("k{i}")),
        value: Some(json!({"type": "Ok", "n": i}).to_string().into_bytes()),
        ..Out::default()
    };
    let streams = "    chaos: { topic: chaos.events }\n";
    let config = format!("{}  mode: group\n  group-id: refract-test\n", kafka_config(&broker, streams));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = plugins();
    let mut a = Server::start(dir_a.path(), &[&p.chaos], &config);
    let b = Server::start(dir_b.path(), &[&p.chaos], &config);
    // The group settles: each instance reads some of the four partitions.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let owned = |s: &Server| s.get("/v1/projections/testkit-chaos")["partitions"].as_array().unwrap().len();
        let (by_a, by_b) = (owned(&a), owned(&b));
        if by_a > 0 && by_b > 0 && by_a + by_b == 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the group did not split the partitions: A {by_a}, B {by_b}\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let producer = broker.producer();
    producer.send_all("chaos.events", &(0..4000).map(record).collect::<Vec<_>>());

    // Both instances share the first 4,000 events between them.
    let until = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (in_a, in_b) = (applied(&a), applied(&b));
        if in_a.len() + in_b.len() >= 4000 {
            assert!(!in_a.is_empty() && !in_b.is_empty(), "one instance got every partition");
            break;
        }
        assert!(std::time::Instant::now() < until, "only {} + {} events applied", in_a.len(), in_b.len());
        std::thread::sleep(Duration::from_millis(100));
    }
    // A leaves midway; B takes its partitions over from its checkpoints.
    a.stop();
    // What A applied, read from its read model file once it has exited.
    let path = dir_a.path().join("data/projections/testkit-chaos/read-model.redb");
    let read_model = refract::store::ReadModel::open(&path).unwrap();
    let in_a: BTreeSet<String> =
        read_model.scan("applied", "", None, usize::MAX).unwrap().into_iter().map(|(k, _)| k).collect();
    producer.send_all("chaos.events", &(4000..8000).map(record).collect::<Vec<_>>());
    let until = std::time::Instant::now() + Duration::from_secs(120);
    let in_b = loop {
        let in_b = applied(&b);
        if in_b.len() + in_a.len() >= 8000 || std::time::Instant::now() > until {
            break in_b;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let both: Vec<&String> = in_a.intersection(&in_b).collect();
    assert!(both.is_empty(), "{} events applied by both instances, e.g. {:?}", both.len(), &both[..both.len().min(5)]);
    assert_eq!(in_a.len() + in_b.len(), 8000, "events lost: {} by A, {} by B", in_a.len(), in_b.len());
}

/// A group member whose worker is stuck does not stall the group (audit
/// 16): a `stuck` record on every partition, with `behind` records after
/// it, produced while instance A reads them all, leaves A's worker paused
/// or retrying with its reader waiting; B then joins, and the rebalance
/// completes while A is still stuck, so B reads its share.
fn a_stuck_member_does_not_stall_a_rebalance(stuck: &str, behind: &str, extra: &str, state: &str) {
    let broker = Broker::start();
    broker.create_topic("chaos.events", 4);
    let streams = "    chaos: { topic: chaos.events }\n";
    let config = format!("{}  mode: group\n  group-id: refract-test\n{extra}", kafka_config(&broker, streams));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = plugins();
    let a = Server::start(dir_a.path(), &[&p.chaos], &config);
    let owned = |s: &Server| s.get("/v1/projections/testkit-chaos")["partitions"].as_array().unwrap().len();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while owned(&a) < 4 {
        assert!(std::time::Instant::now() < until, "A never read all four partitions:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let record = |partition: i32, t: &str| Out {
        key: Some(format!("k{partition}")),
        value: Some(json!({"type": t, "n": partition}).to_string().into_bytes()),
        partition: Some(partition),
        ..Out::default()
    };
    let producer = broker.producer();
    producer.send_all("chaos.events", &(0..4).map(|p| record(p, stuck)).collect::<Vec<_>>());
    // More behind them, in more batches than A's reader holds ready: the
    // reader waits for the stuck worker to take the next one.
    const BEHIND: usize = 200;
    let filler: Vec<Out> = (0..4).flat_map(|p| (0..BEHIND).map(move |_| p)).map(|p| record(p, behind)).collect();
    producer.send_all("chaos.events", &filler);
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while a.get("/v1/projections/testkit-chaos")["state"] != state {
        assert!(
            std::time::Instant::now() < until,
            "A never became {state}: {}",
            a.get("/v1/projections/testkit-chaos")
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let joined = std::time::Instant::now();
    // B itself is not stuck: it dead-letters or retries at once.
    let config_b = format!("{}  mode: group\n  group-id: refract-test\n", kafka_config(&broker, streams));
    let b = Server::start(dir_b.path(), &[&p.chaos], &config_b);
    let until = joined + Duration::from_secs(45);
    while owned(&b) == 0 {
        assert!(
            std::time::Instant::now() < until,
            "the group stalled: B got no partition while A was {state}\nA:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = a.get("/v1/projections/testkit-chaos");
    eprintln!("B read its share {:?} after joining; A is {}", joined.elapsed(), status["state"]);
    // B handles what it owns, up to the records produced after it joined.
    let partitions_b: Vec<i32> = b.get("/v1/projections/testkit-chaos")["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["partition"].as_i64().unwrap() as i32)
        .collect();
    producer.send_all("chaos.events", &partitions_b.iter().map(|p| record(*p, "Ok")).collect::<Vec<_>>());
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while !partitions_b.iter().all(|p| applied(&b).contains(&format!("{p}/{:020}", 1 + BEHIND))) {
        assert!(std::time::Instant::now() < until, "B applied {:?} of partitions {partitions_b:?}", applied(&b));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_paused_group_member_does_not_stall_a_rebalance() {
    let extra = "limits:\n  pause-after-dead-letters: 2\nbatch:\n  max-events: 50\n";
    a_stuck_member_does_not_stall_a_rebalance("Reject", "Reject", extra, "paused");
}

#[test]
fn a_retrying_group_member_does_not_stall_a_rebalance() {
    // A transient failure, retried after five minutes: the worker is busy retrying.
    let extra = "batch:\n  max-events: 50\n  initial-backoff-ms: 300000\n  max-backoff-ms: 300000\n";
    a_stuck_member_does_not_stall_a_rebalance("Flaky", "Ok", extra, "retrying");
}
