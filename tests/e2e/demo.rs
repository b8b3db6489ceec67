//! `refract demo`: starts the runtime with the example plugins, appends
//! sample events and prints queries that work.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use refract_client::Client;

use crate::support::{free_port, plugins};

#[test]
fn the_demo_appends_sample_events_and_prints_queries_that_answer() {
    let dir = tempfile::tempdir().unwrap();
    let plugins_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins_dir).unwrap();
    let p = plugins();
    for f in [&p.order_summary, &p.order_search, &p.account_balance, &p.orders_payments_join, &p.shipments] {
        std::fs::copy(f, plugins_dir.join(f.file_name().unwrap())).unwrap();
    }
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("demo.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_refract"))
        .current_dir(dir.path())
        .args(["demo", "--events", "2000", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--plugins-dir")
        .arg(&plugins_dir)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut printed = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.contains("Press Ctrl-C");
        printed.push(line);
        if done {
            break;
        }
    }
    let text = printed.join("\n");
    assert!(text.contains("projections caught up"), "{text}");
    // Every printed GET query answers 200 with JSON.
    let client = Client::new(&format!("http://127.0.0.1:{port}"));
    let mut queried = 0;
    for line in &printed {
        if let Some(url) = line.trim().strip_prefix("curl -s ").and_then(|rest| rest.split(" | ").next()) {
            let url = url.trim_matches('\'');
            let path = url.split_once(&format!(":{port}")).map(|(_, path)| path).unwrap();
            let reply = client.get(path).unwrap();
            assert_eq!(reply.status, 200, "{path}: {}", reply.body);
            queried += 1;
        }
    }
    assert!(queried >= 9, "{text}");

    // A first screen that teaches: dead letters per projection, as their
    // statuses count them, with where to look; and a few logged in full, not
    // hundreds (the rest counted, one line per 10 s).
    let statuses = client.get("/v1/projections").unwrap().body;
    let mut dead_lettering = 0;
    for p in statuses["projections"].as_array().unwrap() {
        let (name, count) = (p["name"].as_str().unwrap(), p["deadLetters"].as_u64().unwrap());
        if count > 0 {
            let line = format!("  {name}: {count} — refract dead-letters {name} --url http://127.0.0.1:{port}");
            assert!(printed.contains(&line), "{line:?} in\n{text}");
            dead_lettering += 1;
        }
    }
    assert!(dead_lettering >= 2, "the fixtures' poison is dead-lettered: {statuses}");
    assert!(text.contains(&format!("and in the console: http://127.0.0.1:{port}/")), "{text}");
    let in_full =
        std::fs::read_to_string(dir.path().join("demo.log")).unwrap().matches("dead-lettering an event").count();
    assert!(in_full <= 5 * dead_lettering, "{in_full} dead letters logged in full");
    let (order_letters, until) = (
        client.get("/v1/projections/order-summary").unwrap().body["deadLetters"].as_u64().unwrap(),
        std::time::Instant::now() + std::time::Duration::from_secs(30),
    );
    assert!(order_letters > 5, "more than are logged in full: {order_letters}");
    while !std::fs::read_to_string(dir.path().join("demo.log")).unwrap().contains("more events in the last") {
        assert!(std::time::Instant::now() < until, "the dead letters not logged in full were never counted");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let listed = Command::new(env!("CARGO_BIN_EXE_refract"))
        .args(["dead-letters", "order-summary", "--url", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(listed.status.success() && !listed.stdout.is_empty(), "{listed:?}");
    // The join enricher's output reached the projection over it.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while client.get("/v1/projections/shipments/tables/ready/items?limit=1").unwrap().body["items"]
        .as_array()
        .is_none_or(|items| items.is_empty())
    {
        assert!(std::time::Instant::now() < until, "no order was joined with its payments");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let faceted = client.get("/v1/projections/order-search/indexes/orders/search?facets=status&limit=1").unwrap();
    assert!(faceted.body["facets"]["status"].as_array().is_some_and(|b| !b.is_empty()), "{}", faceted.body);
    let orders = client.get("/v1/projections/order-summary").unwrap();
    assert_eq!(orders.body["lag"], 0);
    assert!(orders.body["eventsApplied"].as_u64().unwrap() > 1500);
    assert!(dir.path().join("refract-demo-data/log.redb").exists());
    child.kill().unwrap();
    child.wait().unwrap();
}
