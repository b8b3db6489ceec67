//! The web console, in headless Chromium: it shows the projections, runs a
//! search, browses a table and retries a dead letter whose cause is gone;
//! it shows a preview's diff and promotes it; in a cluster, it shows who
//! runs each shard.
//! Screenshots of each step go to `$CARGO_TARGET_DIR/console-screenshots/`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::support::{Server, ndjson, plugins};

const ADMIN: &str = "console-admin-token-0123";

fn cache() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/refract")
}

/// Where the console tests put their screenshots.
fn screenshots() -> PathBuf {
    let shots = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    shots
}

/// Run `tests/console/<script>` with `args` in headless Chromium, and what
/// it printed last (its findings, as JSON).
fn in_chromium(script: &str, args: &[&str]) -> Value {
    let playwright = cache().join("browser/node_modules/playwright-core");
    assert!(playwright.exists(), "playwright-core is not installed: run scripts/install-tools");
    assert!(PathBuf::from("/usr/bin/chromium").exists(), "chromium is not installed: run scripts/install-tools");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/console").join(script);
    let out =
        Command::new("node").arg(script).args(args).env("PLAYWRIGHT_CORE", &playwright).output().expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the browser run failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn the_console_shows_projections_searches_and_retries_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let config = format!("auth:\n  admin-token: {ADMIN}\n");
    let server = Server::start(dir.path(), &[&p.order_summary, &p.order_search], &config);
    let admin = server.client().with_token(Some(ADMIN));
    let events = refract_client::fixtures::orders(1_000, 61, 0.02);
    assert_eq!(admin.append_ndjson("orders", &ndjson(&events)).unwrap().status, 200);
    admin.wait_caught_up(std::time::Duration::from_secs(60)).unwrap();

    // A payment for an order that did not exist: its cause goes away once the order arrives.
    let letters = admin.get("/v1/projections/order-summary/dead-letters?limit=1000").unwrap().body;
    let letter = letters["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["type"] == "PaymentReceived" && l["error"].as_str().unwrap().contains("unknown order"))
        .expect("a payment for an unknown order")
        .clone();
    let order = letter["data"]["orderId"].as_str().unwrap();
    let placed = json!({"type": "OrderPlaced", "key": order, "data": {"orderId": order, "customerId": "c-1",
        "total": 10.0, "items": [], "description": "late order"}});
    assert_eq!(admin.append_ndjson("orders", &ndjson(&[placed])).unwrap().status, 200);
    admin.wait_caught_up(std::time::Duration::from_secs(60)).unwrap();

    let shots = screenshots();
    let seen = in_chromium("drive.cjs", &[&server.url, ADMIN, &letter["id"].to_string(), shots.to_str().unwrap()]);

    assert_eq!((seen["state"].as_str(), seen["lag"].as_str()), (Some("running"), Some("0")), "{seen}");
    let total =
        admin.get("/v1/projections/order-search/indexes/orders/search?q=lamp&limit=1").unwrap().body["total"].clone();
    assert_eq!(seen["searched"], format!("{total} hits"), "{seen}");
    let items = seen["items"].as_array().unwrap();
    assert!(!items.is_empty() && items.iter().all(|k| k.as_str().unwrap().starts_with("o-1")), "{seen}");
    // Reproduced before the retry: the order has arrived since, so the payment applies now.
    let reproduced = seen["reproduced"].as_str().unwrap_or_default();
    assert!(
        reproduced.starts_with(&format!("dead letter {}: ends otherwise now: {{\"applied\":true}}", letter["id"])),
        "{seen}"
    );
    assert!(reproduced.contains(&format!("refract dead-letters order-summary reproduce {}", letter["id"])), "{seen}");
    assert_eq!(seen["retried"], "retried: 1 applied, 0 failed again", "{seen}");
    assert_eq!(seen["errors"], json!([]), "the page logged errors: {seen}");
    // The retry really happened: the letter is gone, the payment applied.
    let path = format!("/v1/projections/order-summary/dead-letters/{}", letter["id"]);
    assert_eq!(admin.get(&path).unwrap().status, 404);
    let paid = admin.get(&format!("/v1/projections/order-summary/tables/orders/items/{order}")).unwrap().body;
    assert_eq!(paid["paid"], letter["data"]["amount"], "{paid}");
    for step in ["1-projections", "2-search", "3-table", "4-dead-letters", "5-retried"] {
        assert!(shots.join(format!("{step}.png")).metadata().unwrap().len() > 1000, "{step}.png");
    }
    eprintln!("screenshots in {}", shots.display());
}

/// A preview's row offers its diff, which the console shows table by table
/// with samples, and promotes it.
#[test]
fn the_console_shows_a_previews_diff_and_promotes_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let config = format!("auth:\n  admin-token: {ADMIN}\n");
    let server = Server::start(dir.path(), &[&p.order_summary], &config);
    let admin = server.client().with_token(Some(ADMIN));
    let events = refract_client::fixtures::orders(1_000, 63, 0.0);
    assert_eq!(admin.append_ndjson("orders", &ndjson(&events)).unwrap().status, 200);
    admin.wait_caught_up(std::time::Duration::from_secs(60)).unwrap();
    let variant = std::fs::read(&p.order_summary_canceled).unwrap();
    let started = admin.post("/v1/projections/order-summary/preview", "application/wasm", &variant).unwrap();
    assert_eq!(started.status, 202, "{}", started.body);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let diff = loop {
        let diff = admin.get("/v1/projections/order-summary/preview/diff").unwrap().body;
        if diff["caughtUp"] == true && diff["livePosition"] == events.len() {
            break diff;
        }
        assert!(std::time::Instant::now() < until, "the preview never caught up: {diff}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };

    let shots = screenshots();
    let seen = in_chromium("preview.cjs", &[&server.url, ADMIN, shots.to_str().unwrap()]);
    assert_eq!(seen["building"], "preview gen 1: caught up", "{seen}");
    assert!(seen["summary"].as_str().unwrap().contains("caught up at 1000 events"), "{seen}");
    let orders = diff["tables"].as_array().unwrap().iter().find(|t| t["table"] == "orders").unwrap();
    let expected: Vec<&Value> = ["added", "removed", "changed", "unchanged"].iter().map(|k| &orders[k]).collect();
    assert_eq!(seen["counts"].as_array().unwrap().iter().collect::<Vec<_>>(), expected, "{seen}");
    assert!(orders["changed"].as_u64().unwrap() > 0, "{orders}");
    assert!(seen["samples"].as_str().unwrap().contains(r#""status":"canceled""#), "{seen}");
    assert_eq!(seen["errors"], json!([]), "the page logged errors: {seen}");
    // The promotion went through: generation 1 goes live.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while server.get("/v1/projections/order-summary")["generation"] != 1 {
        assert!(std::time::Instant::now() < until, "the promoted preview never went live");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(shots.join("6-preview-diff.png").metadata().unwrap().len() > 1000);
}

/// In a cluster, the console shows the members and, for each shard, the
/// instance active for it and its standbys: what `GET /v1/cluster` says.
#[test]
fn the_console_shows_who_runs_each_shard_of_a_cluster() {
    use crate::partitioned::{ORDERS_STREAM, active_shards, cluster_config, start_cluster};
    use crate::support::kafka::{Broker, Out};
    let broker = Broker::start();
    broker.create_topic("shop.orders", 4);
    let events = refract_client::fixtures::orders(2_000, 62, 0.0);
    broker.producer().send_all("shop.orders", &events.iter().map(Out::plain).collect::<Vec<_>>());
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let p = plugins();
    let start = |i: usize| {
        let config = cluster_config(&broker, ["a", "b"][i], "console", 1, ORDERS_STREAM);
        Server::start(dirs[i].path(), &[&p.order_summary], &format!("{config}auth:\n  admin-token: {ADMIN}\n"))
    };
    let servers = start_cluster(2, &["order-summary"], 4, start);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while servers.iter().any(|s| active_shards(s, "order-summary").is_empty()) {
        assert!(std::time::Instant::now() < until, "the group never gave both instances shards");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let shots = screenshots();
    let seen = in_chromium("cluster.cjs", &[&servers[0].url, ADMIN, "4", shots.to_str().unwrap()]);

    assert_eq!(seen["errors"], json!([]), "the page logged errors: {seen}");
    assert_eq!(seen["members"], json!(["a (this)", "b"]), "{seen}");
    assert!(seen["summary"].as_str().unwrap().starts_with("2 of 2 instances live; this is a"), "{seen}");
    let rows = seen["rows"].as_array().unwrap();
    let shown: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["shard"].as_str().unwrap().into(),
                r["active"].as_str().unwrap().into(),
                r["standbys"].as_str().unwrap().into(),
            )
        })
        .collect();
    // What each instance says it is active for, now (the group settled before the page read it).
    let (by_a, by_b) = (active_shards(&servers[0], "order-summary"), active_shards(&servers[1], "order-summary"));
    for (n, (shard, active, standbys)) in shown.iter().enumerate() {
        assert_eq!(shard, &format!("order-summary/{n}"), "{seen}");
        let (owner, other) = if by_a.contains(&(n as u64)) { ("a", "b") } else { ("b", "a") };
        assert!(by_a.contains(&(n as u64)) != by_b.contains(&(n as u64)), "shard {n}: a {by_a:?}, b {by_b:?}");
        assert_eq!((active.as_str(), standbys.as_str()), (owner, other), "shard {n}: {seen}");
    }
    assert!(rows.iter().all(|r| r["state"].as_str().unwrap().starts_with("ready")), "{seen}");
    assert!(shots.join("6-cluster.png").metadata().unwrap().len() > 1000);
}
