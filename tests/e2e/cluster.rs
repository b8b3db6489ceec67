//! Membership through Kafka: instances with a `cluster:` section announce
//! themselves on the control topic (tansu here) and see each other in
//! `GET /v1/cluster`: who they are, where, and how far each projection is;
//! an instance that stops cleanly leaves at once, one that is killed goes
//! silent and is shown as not live.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::kafka::Broker;
use crate::support::{Server, ndjson, plugins};

fn member(server: &Server, id: &str) -> Option<Value> {
    let view = server.get("/v1/cluster");
    view["members"].as_array().and_then(|m| m.iter().find(|m| m["instance"] == id).cloned())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < until, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn instances_see_each_other_on_the_control_topic_and_see_one_leave_or_go_silent() {
    let broker = Broker::start();
    let config = |id: &str| {
        format!(
            "kafka:\n  brokers: {}\ncluster:\n  instance-id: {id}\n  announce-interval-ms: 1000\n",
            broker.address()
        )
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(dir_a.path(), &[&plugins().order_summary], &config("a"));
    let mut b = Server::start(dir_b.path(), &[&plugins().order_summary], &config("b"));

    // Each sees both, live, with its URL and what it holds.
    for (server, name) in [(&a, "a"), (&b, "b")] {
        for id in ["a", "b"] {
            wait_until(&format!("{name} never saw {id} live: {}", server.get("/v1/cluster")), || {
                member(server, id).is_some_and(|m| m["live"] == true)
            });
        }
    }
    let view = a.get("/v1/cluster");
    assert_eq!((view["instance"].as_str(), view["controlTopic"].as_str()), (Some("a"), Some("refract.cluster")));
    let seen_b = member(&a, "b").unwrap();
    assert_eq!(seen_b["url"], b.url, "{seen_b}");
    assert_eq!(seen_b["projections"][0]["name"], "order-summary", "{seen_b}");

    // What b applies shows up in what a hears of it.
    let orders: Vec<Value> = (0..20)
        .map(|i| json!({"type": "OrderPlaced", "key": format!("o-{i}"), "data": {"orderId": format!("o-{i}"), "customerId": "c", "total": 1.0}}))
        .collect();
    assert_eq!(b.client().append_ndjson("orders", &ndjson(&orders)).unwrap().status, 200);
    wait_until("a never heard that b applied 20 events", || {
        member(&a, "b").is_some_and(|m| m["projections"][0]["eventsApplied"] == 20)
    });
    let checkpoints: u64 = member(&a, "b").unwrap()["projections"][0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["checkpoint"].as_u64().unwrap())
        .sum();
    assert_eq!(checkpoints, 20, "b's checkpoints, as a hears them");

    // `refract status --cluster` on either instance: a row each.
    let out = a.cli(&["status", "--cluster"], None);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.lines().next().unwrap().contains("INSTANCE"), "{table}");
    let row = |id: &str| table.lines().find(|l| l.split_whitespace().next() == Some(id)).map(str::to_owned);
    let row_a = row("a").unwrap_or_else(|| panic!("no row for a in\n{table}"));
    assert!(row_a.contains("(this)") && row_a.contains(&a.url) && row_a.contains("yes"), "{row_a}");
    let row_b = row("b").unwrap_or_else(|| panic!("no row for b in\n{table}"));
    assert!(row_b.contains(&b.url) && row_b.contains("order-summary 0 20 0"), "{row_b}");

    // And in the metrics.
    let metrics = a.client().get("/metrics").unwrap().body;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("refract_cluster_members{live=\"true\"} 2"), "{metrics}");
    assert!(metrics.contains("refract_cluster_member_silent_seconds{instance=\"b\"}"), "{metrics}");

    // A clean stop leaves at once (a tombstone), not after silence.
    b.stop();
    wait_until("b's clean stop did not remove it", || member(&a, "b").is_none());

    // Back, then killed: it goes silent, and is shown as not live.
    b.restart();
    wait_until("b did not come back", || member(&a, "b").is_some_and(|m| m["live"] == true));
    b.kill();
    wait_until("a killed b still shows as live", || member(&a, "b").is_some_and(|m| m["live"] == false));
    assert!(member(&a, "b").unwrap()["silentMs"].as_u64().unwrap() > 3000, "silent for three intervals");
    assert!(member(&a, "a").unwrap()["live"] == true, "a itself stays live");
}

#[test]
fn an_instance_outside_a_cluster_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[], "");
    let reply = server.client().get("/v1/cluster").unwrap();
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body["error"]["code"], "not_in_a_cluster", "{}", reply.body);
}
