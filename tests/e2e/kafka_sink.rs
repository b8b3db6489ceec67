//! Derived events a projection emits go to a Kafka topic (tansu) when its
//! stream is configured there: every one arrives, with its type, key and
//! emit id as headers.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::message::{Headers, Message};
use serde_json::Value;

use crate::emitted_events::{emits, wait_published};
use crate::support::kafka::Broker;
use crate::support::{Server, ndjson, plugins};

#[test]
fn emitted_events_can_go_to_a_kafka_topic() {
    const EVENTS: usize = 500;
    let broker = Broker::start();
    broker.create_topic("chaos.echoes", 2);
    let dir = tempfile::tempdir().unwrap();
    let config =
        format!("kafka:\n  brokers: {}\n  streams:\n    echoes: {{ topic: chaos.echoes }}\n", broker.address());
    let server = Server::start(dir.path(), &[&plugins().chaos], &config);
    let reply = server.client().append_ndjson("chaos", &ndjson(&emits(0..EVENTS, "echoes"))).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    wait_published(&server, EVENTS as u64);

    // A stream on Kafka is not appended to over HTTP.
    let refused = server.client().append_ndjson("echoes", &ndjson(&emits(0..1, "x"))).unwrap();
    assert_eq!((refused.status, refused.body["error"]["code"].as_str()), (409, Some("stream_on_kafka")));

    let consumer = broker.reader("chaos.echoes", 2);
    let (mut sources, mut ids) = (BTreeSet::new(), BTreeSet::new());
    let until = Instant::now() + Duration::from_secs(60);
    while sources.len() < EVENTS && Instant::now() < until {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = message.unwrap();
        let value: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        sources.insert(value["source"].as_str().unwrap().to_owned());
        let headers = message.headers().unwrap();
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("event-type").as_deref(), Some("Echo"));
        ids.insert(header("refract-emit-id").unwrap());
        assert!(message.key().is_some());
    }
    assert_eq!(sources.len(), EVENTS, "every emitted event reached the topic");
    assert_eq!(ids.len(), EVENTS);
    assert!(ids.iter().all(|id| id.starts_with("testkit-chaos/")));
}

/// Every `source` of the Echo events on `topic` (2 partitions), read until
/// `expected` distinct ones arrived or a minute passed.
fn sources_on(broker: &Broker, topic: &str, expected: usize) -> BTreeSet<String> {
    let consumer = broker.reader(topic, 2);
    let mut sources = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(60);
    while sources.len() < expected && Instant::now() < until {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let value: Value = serde_json::from_slice(message.unwrap().payload().unwrap()).unwrap();
        sources.insert(value["source"].as_str().unwrap().to_owned());
    }
    sources
}

/// A rebuild reaching its switch while the relay cannot publish (the broker
/// is down) must not delete the old generation's outbox: the switch waits
/// until every event emitted before it is published. It used to stop
/// draining at the first error and delete them.
#[test]
fn a_rebuild_switch_waits_for_the_old_outbox_to_be_published() {
    const ADMIN: &str = "admin-secret-0123456789";
    let mut broker = Broker::start();
    broker.create_topic("chaos.echoes", 2);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "auth:\n  admin-token: {ADMIN}\nkafka:\n  brokers: {}\n  properties:\n    message.timeout.ms: \"2000\"\n  streams:\n    echoes: {{ topic: chaos.echoes }}\n",
        broker.address()
    );
    let server = Server::start(dir.path(), &[&plugins().chaos], &config);
    let admin = refract_client::Client::new(&server.url).with_token(Some(ADMIN));
    assert_eq!(admin.append_ndjson("chaos", &ndjson(&emits(0..500, "echoes"))).unwrap().status, 200);
    wait_published(&server, 500);

    broker.kill();
    assert_eq!(admin.append_ndjson("chaos", &ndjson(&emits(500..800, "echoes"))).unwrap().status, 200);
    server.wait_caught_up();
    let status = server.get("/v1/projections/testkit-chaos");
    assert!(status["emitted"]["lag"].as_u64().unwrap() > 0, "published with the broker down? {status}");
    let started = admin.post("/v1/projections/testkit-chaos/rebuild", "application/json", b"").unwrap();
    assert_eq!(started.status, 202, "{}", started.body);
    // The rebuild reaches its switch and waits there, saying why, while the
    // broker is down; a cancel is too late by then.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let status = server.get("/v1/projections/testkit-chaos");
        let waiting = status["rebuild"]["waitingFor"].as_str().unwrap_or_default();
        if waiting.contains("publishing the old generation's emitted events") {
            assert_eq!(status["rebuild"]["switching"], true, "{status}");
            assert_eq!(status["generation"], 0, "{status}");
            break;
        }
        assert!(Instant::now() < until, "the switch does not wait for the outbox: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let cancel = admin.delete("/v1/projections/testkit-chaos/rebuild").unwrap();
    assert_eq!((cancel.status, cancel.body["error"]["code"].as_str()), (409, Some("rebuild_switching")));
    broker.restart();

    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let status = server.get("/v1/projections/testkit-chaos");
        if status["generation"] == 1 && status["rebuild"].is_null() {
            break;
        }
        assert!(Instant::now() < until, "no switch: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let sources = sources_on(&broker, "chaos.echoes", 800);
    assert_eq!(sources.len(), 800, "events emitted before the switch were lost");
}
