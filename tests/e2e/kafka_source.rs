//! Projections reading Kafka topics on a real Kafka-protocol broker (tansu),
//! written to by a real Kafka client (librdkafka).

use std::time::Duration;

use serde_json::Value;

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
