//! Derived events a projection emits go to a Kafka topic (tansu) when its
//! stream is configured there: every one arrives, with its type, key and
//! emit id as headers.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
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

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset("chaos.echoes", p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
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
