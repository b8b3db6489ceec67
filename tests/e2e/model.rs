//! A model-based test: a random sequence of appends, graceful restarts,
//! SIGKILLs mid-batch, rebuilds and plugin swaps against a running server;
//! after each step the read model must equal the reference fold of every
//! event appended so far (the model), each applied exactly once. A second
//! test does the same for derived events: an emitting projection and an
//! enricher downstream of it, through SIGKILLs, rebuilds and SIGKILLs inside
//! a rebuild's switch, every derived event published exactly once. A third
//! sends derived events to Kafka through broker outages.
//!
//! `REFRACT_MODEL_SEED` replays a failing sequence; `REFRACT_MODEL_STEPS`
//! runs longer.

use std::time::Duration;

use refract_client::Client;
use refract_client::fixtures::Rng;
use serde_json::Value;

use crate::support::{Server, ndjson, plugins};

const ADMIN: &str = "admin-secret-0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Append,
    Restart,
    KillMidBatch,
    Rebuild,
    Swap,
}

#[test]
fn random_appends_restarts_kills_rebuilds_and_swaps_keep_the_read_model_equal_to_the_fold() {
    let seed: u64 = std::env::var("REFRACT_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261122);
    let steps: usize = std::env::var("REFRACT_MODEL_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let wasm = std::fs::read(&plugins().order_summary).unwrap();
    let config = format!("auth:\n  admin-token: {ADMIN}\n");
    let mut server = Server::start(dir.path(), &[&plugins().order_summary], &config);
    let admin = |server: &Server| Client::new(&server.url).with_token(Some(ADMIN));

    // The stream the steps append from, in order; `model` is what was appended.
    let stream = refract_client::fixtures::orders(steps * 600, seed, 0.01);
    let mut next = 0;
    let mut model: Vec<Value> = Vec::new();
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    let mut swaps = 0;
    for i in 0..steps {
        let step = match rng.range(0, 9) {
            0..=4 => Step::Append,
            5 => Step::Restart,
            6 | 7 => Step::KillMidBatch,
            8 => Step::Rebuild,
            _ => Step::Swap,
        };
        *counts.entry(format!("{step:?}").leak()).or_default() += 1;
        let context = format!("seed {seed}, step {i} ({step:?})");
        match step {
            Step::Append => {
                let n = (rng.range(1, 600) as usize).min(stream.len() - next);
                let reply = admin(&server).append_ndjson("orders", &ndjson(&stream[next..next + n])).unwrap();
                assert_eq!(reply.status, 200, "{context}: {}", reply.body);
                model.extend_from_slice(&stream[next..next + n]);
                next += n;
            }
            Step::Restart => {
                server.stop();
                server.restart();
            }
            Step::KillMidBatch => {
                // A large append (durable once answered), then SIGKILL while
                // the projection is working through it.
                let n = (rng.range(400, 999) as usize).min(stream.len() - next);
                let reply = admin(&server).append_ndjson("orders", &ndjson(&stream[next..next + n])).unwrap();
                assert_eq!(reply.status, 200, "{context}: {}", reply.body);
                model.extend_from_slice(&stream[next..next + n]);
                next += n;
                kill_mid_batch(&mut server, &mut rng);
            }
            Step::Rebuild => rebuild(&mut server, "order-summary", &context, false, |_| {}),
            Step::Swap => {
                let reply = admin(&server).put("/v1/plugins/order_summary", "application/wasm", &wasm).unwrap();
                assert_eq!(reply.status, 202, "{context}: {}", reply.body);
                swaps += 1;
            }
        }
        server.wait_caught_up();
        server.assert_order_summary_is_the_fold_of(&model);
    }
    eprintln!("model test: seed {seed}, {steps} steps {counts:?}, {} events, {swaps} swaps, no loss", model.len());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EmitStep {
    Append,
    KillMidBatch,
    Rebuild,
    KillInsideSwitch,
}

/// The same for derived events, through a projection and an enricher:
/// `testkit-chaos` emits one `Echo` per event it applies to `orders-raw`,
/// and `order-upcaster` (an enricher) passes each on to `echoes`. After
/// every step of appends, SIGKILLs mid-batch, rebuilds of either, and
/// SIGKILLs inside either's rebuild switch (held open by the test hook
/// `REFRACT_TEST_SWITCH_DELAY_MS`), both derived streams hold exactly one
/// echo per event appended: none lost, none twice.
#[test]
fn random_kills_and_rebuilds_publish_every_derived_event_exactly_once() {
    let seed: u64 = std::env::var("REFRACT_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261206);
    let steps: usize = std::env::var("REFRACT_MODEL_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "auth:\n  admin-token: {ADMIN}\nbatch:\n  max-events: 100\n  max-duration-ms: 5\n\
         plugins:\n  order-upcaster:\n    routes:\n      - {{ to: [echoes] }}\n"
    );
    let mut server = Server::start(dir.path(), &[&plugins().chaos, &plugins().order_upcaster], &config);
    server.env.push(("REFRACT_TEST_SWITCH_DELAY_MS".into(), "400".into()));
    server.kill();
    server.restart();
    let admin = |server: &Server| Client::new(&server.url).with_token(Some(ADMIN));
    let mut appended = 0usize;
    let append = |server: &Server, appended: &mut usize, n: usize| {
        let events = crate::emitted_events::emits(*appended..*appended + n, "orders-raw");
        assert_eq!(admin(server).append_ndjson("chaos", &ndjson(&events)).unwrap().status, 200);
        *appended += n;
    };
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..steps {
        let step = match rng.range(0, 9) {
            0..=3 => EmitStep::Append,
            4 | 5 => EmitStep::KillMidBatch,
            6 | 7 => EmitStep::Rebuild,
            _ => EmitStep::KillInsideSwitch,
        };
        let projection = ["testkit-chaos", "order-upcaster"][rng.range(0, 1) as usize];
        let name = match step {
            EmitStep::Rebuild | EmitStep::KillInsideSwitch => format!("{step:?} {projection}"),
            _ => format!("{step:?}"),
        };
        let context = format!("seed {seed}, step {i} ({name})");
        *counts.entry(name).or_default() += 1;
        match step {
            EmitStep::Append => append(&server, &mut appended, rng.range(1, 300) as usize),
            EmitStep::KillMidBatch => {
                append(&server, &mut appended, rng.range(200, 599) as usize);
                kill_mid_batch(&mut server, &mut rng);
            }
            EmitStep::Rebuild | EmitStep::KillInsideSwitch => {
                let n = rng.range(50, 249) as usize;
                let kill = step == EmitStep::KillInsideSwitch;
                rebuild(&mut server, projection, &context, kill, |s| append(s, &mut appended, n));
            }
        }
        // Settled in the order events flow: the projection, then the enricher reading what it emitted.
        for projection in ["testkit-chaos", "order-upcaster"] {
            server.wait_caught_up();
            crate::emitted_events::wait_settled(&server, projection, &context);
        }
        for stream in ["orders-raw", "echoes"] {
            let echoes = server.stream(stream);
            let ns: std::collections::BTreeSet<u64> = echoes.iter().map(|e| e["data"]["n"].as_u64().unwrap()).collect();
            assert_eq!(ns.len(), appended, "{context}: an event derived into {stream} was lost");
            assert_eq!(echoes.len(), appended, "{context}: an event derived into {stream} was published twice");
        }
    }
    eprintln!(
        "derived-event model test: seed {seed}, {steps} steps {counts:?}, {appended} events, none lost or doubled"
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KafkaStep {
    Append,
    KillMidBatch,
    Rebuild,
    KillInsideSwitch,
    BrokerOutage,
}

/// Derived events to a relay target that fails for a while: `testkit-chaos`
/// emits its echoes to a Kafka topic (tansu), through random appends,
/// SIGKILLs mid-batch, rebuilds, SIGKILLs inside the switch, and broker
/// outages (some with a SIGKILL while the broker is down). A Kafka target is
/// at least once: a crash between the producer's flush and the outbox trim
/// publishes records again, under the same `refract-emit-id`. So after every
/// step each event has exactly one emit id (the projection emitted it once),
/// and no event is missing from the topic.
#[test]
fn random_kills_rebuilds_and_broker_outages_publish_every_derived_event_to_kafka() {
    use rdkafka::message::{Headers, Message};

    let seed: u64 = std::env::var("REFRACT_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let steps: usize = std::env::var("REFRACT_MODEL_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let mut rng = Rng::new(seed);
    let mut broker = crate::support::kafka::Broker::start();
    broker.create_topic("chaos.echoes", 2);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "auth:\n  admin-token: {ADMIN}\nbatch:\n  max-events: 100\n  max-duration-ms: 5\n\
         kafka:\n  brokers: {}\n  properties:\n    message.timeout.ms: \"2000\"\n  streams:\n    echoes: {{ topic: chaos.echoes }}\n",
        broker.address()
    );
    let mut server = Server::start(dir.path(), &[&plugins().chaos], &config);
    server.env.push(("REFRACT_TEST_SWITCH_DELAY_MS".into(), "400".into()));
    server.kill();
    server.restart();
    let admin = |server: &Server| Client::new(&server.url).with_token(Some(ADMIN));
    let mut appended = 0usize;
    let append = |server: &Server, appended: &mut usize, n: usize| {
        let events = crate::emitted_events::emits(*appended..*appended + n, "echoes");
        assert_eq!(admin(server).append_ndjson("chaos", &ndjson(&events)).unwrap().status, 200);
        *appended += n;
    };
    // Every record on the topic: emit id → n.
    let topic = |broker: &crate::support::kafka::Broker, expected: usize| {
        let consumer = broker.reader("chaos.echoes", 2);
        let (mut records, mut ids) = (0usize, std::collections::BTreeMap::<String, u64>::new());
        let until = std::time::Instant::now() + Duration::from_secs(60);
        let mut quiet = 0;
        while std::time::Instant::now() < until && (ids.len() < expected || quiet < 3) {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                quiet += 1;
                continue;
            };
            quiet = 0;
            let message = message.unwrap();
            let value: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
            let id = message.headers().and_then(|h| h.iter().find(|h| h.key == "refract-emit-id"));
            let id = String::from_utf8(id.unwrap().value.unwrap().to_vec()).unwrap();
            let n = value["n"].as_u64().unwrap();
            assert_eq!(*ids.entry(id.clone()).or_insert(n), n, "emit id {id} carries two events");
            records += 1;
        }
        (records, ids)
    };
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut republished = 0;
    for i in 0..steps {
        let step = match rng.range(0, 9) {
            0..=2 => KafkaStep::Append,
            3 | 4 => KafkaStep::KillMidBatch,
            5 | 6 => KafkaStep::Rebuild,
            7 => KafkaStep::KillInsideSwitch,
            _ => KafkaStep::BrokerOutage,
        };
        *counts.entry(format!("{step:?}")).or_default() += 1;
        let context = format!("seed {seed}, step {i} ({step:?})");
        match step {
            KafkaStep::Append => append(&server, &mut appended, rng.range(1, 300) as usize),
            KafkaStep::KillMidBatch => {
                append(&server, &mut appended, rng.range(200, 599) as usize);
                kill_mid_batch(&mut server, &mut rng);
            }
            KafkaStep::Rebuild | KafkaStep::KillInsideSwitch => {
                let n = rng.range(50, 249) as usize;
                let kill = step == KafkaStep::KillInsideSwitch;
                rebuild(&mut server, "testkit-chaos", &context, kill, |s| append(s, &mut appended, n));
            }
            KafkaStep::BrokerOutage => {
                // The relay's target is gone while events keep coming.
                broker.kill();
                append(&server, &mut appended, rng.range(100, 399) as usize);
                std::thread::sleep(Duration::from_millis(rng.range(0, 1499)));
                if rng.range(0, 1) == 0 {
                    server.kill();
                    server.restart();
                }
                broker.restart();
            }
        }
        server.wait_caught_up();
        crate::emitted_events::wait_settled(&server, "testkit-chaos", &context);
        let (records, ids) = topic(&broker, appended);
        let ns: std::collections::BTreeSet<u64> = ids.values().copied().collect();
        assert_eq!(ns.len(), appended, "{context}: an emitted event never reached the topic");
        assert_eq!(ids.len(), appended, "{context}: an event was emitted twice (two emit ids)");
        republished = records - ids.len();
    }
    eprintln!(
        "Kafka derived-event model test: seed {seed}, {steps} steps {counts:?}, {appended} events, none lost, \
         none emitted twice, {republished} records published again under their emit id"
    );
}

/// SIGKILL the server a moment (0–29 ms, drawn from `rng`) into handling
/// what was just appended, and start it again.
fn kill_mid_batch(server: &mut Server, rng: &mut Rng) {
    std::thread::sleep(Duration::from_millis(rng.range(0, 29)));
    server.kill();
    server.restart();
}

/// Ask for a rebuild of `projection` (202, or 409 while one runs), and let
/// `meanwhile` append while it replays and switches. With `kill_in_switch`
/// (and a rebuild started), SIGKILL the server inside the switch, held open
/// by `REFRACT_TEST_SWITCH_DELAY_MS`, and start it again.
fn rebuild(
    server: &mut Server,
    projection: &str,
    context: &str,
    kill_in_switch: bool,
    meanwhile: impl FnOnce(&Server),
) {
    let held = server.log().matches("holding the switch").count();
    let path = format!("/v1/projections/{projection}/rebuild");
    let reply = Client::new(&server.url).with_token(Some(ADMIN)).post(&path, "application/json", b"").unwrap();
    assert!([202, 409].contains(&reply.status), "{context}: {}", reply.body);
    meanwhile(server);
    if kill_in_switch && reply.status == 202 {
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while server.log().matches("holding the switch").count() == held {
            assert!(std::time::Instant::now() < until, "{context}: the switch was never reached");
            std::thread::sleep(Duration::from_millis(10));
        }
        server.kill();
        server.restart();
    }
}
