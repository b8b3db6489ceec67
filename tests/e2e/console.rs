//! The web console, in headless Chromium: it shows the projections, runs a
//! search, browses a table and retries a dead letter whose cause is gone.
//! Screenshots of each step go to `$CARGO_TARGET_DIR/console-screenshots/`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::support::{Server, ndjson, plugins};

const ADMIN: &str = "console-admin-token-0123";

fn cache() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/refract")
}

#[test]
fn the_console_shows_projections_searches_and_retries_a_dead_letter() {
    let playwright = cache().join("browser/node_modules/playwright-core");
    assert!(playwright.exists(), "playwright-core is not installed: run scripts/install-tools");
    assert!(PathBuf::from("/usr/bin/chromium").exists(), "chromium is not installed: run scripts/install-tools");

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

    let shots = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/console/drive.cjs");
    let out = Command::new("node")
        .arg(script)
        .args([&server.url, ADMIN, &letter["id"].to_string(), shots.to_str().unwrap()])
        .env("PLAYWRIGHT_CORE", &playwright)
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the browser run failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    assert_eq!((seen["state"].as_str(), seen["lag"].as_str()), (Some("running"), Some("0")), "{seen}");
    let total =
        admin.get("/v1/projections/order-search/indexes/orders/search?q=lamp&limit=1").unwrap().body["total"].clone();
    assert_eq!(seen["searched"], format!("{total} hits"), "{seen}");
    let items = seen["items"].as_array().unwrap();
    assert!(!items.is_empty() && items.iter().all(|k| k.as_str().unwrap().starts_with("o-1")), "{seen}");
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
