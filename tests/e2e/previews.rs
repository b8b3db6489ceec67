//! Previews: a new version of a projection's plugin built beside the live
//! one, compared with it key by key, then promoted (the rebuild's switch)
//! or discarded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use refract_client::Client;
use serde_json::Value;

use crate::support::{Server, ndjson, plugins, reference};

const ADMIN: &str = "admin-secret-0123456789";

fn config() -> String {
    format!("auth:\n  admin-token: {ADMIN}\nbatch:\n  max-events: 200\n  call-events: 50\n  max-duration-ms: 10\n")
}

fn admin(server: &Server) -> Client {
    Client::new(&server.url).with_token(Some(ADMIN))
}

fn append(server: &Server, events: &[Value]) {
    for chunk in events.chunks(2000) {
        assert_eq!(admin(server).append_ndjson("orders", &ndjson(chunk)).unwrap().status, 200);
    }
}

/// The diff once the preview has handled every event the live generation has.
fn caught_up_diff(server: &Server, events: usize) -> Value {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let diff = server.get("/v1/projections/order-summary/preview/diff?samples=3");
        if diff["caughtUp"] == true && diff["livePosition"] == events {
            return diff;
        }
        assert!(Instant::now() < until, "the preview never caught up: {diff}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Queries of the live read model, over and over until told to stop: the
/// statuses of every answer that was not a 200.
fn query_until(url: String, id: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::thread::spawn(move || {
        let client = Client::new(&url);
        let (mut answered, mut failed) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            for path in [
                format!("/v1/projections/order-summary/tables/orders/items/{id}"),
                "/v1/projections/order-summary/tables/customer-orders/items?limit=50".to_owned(),
            ] {
                match client.get(&path) {
                    Ok(reply) if reply.status == 200 => answered += 1,
                    Ok(reply) => failed.push(format!("{path}: {} {}", reply.status, reply.body)),
                    Err(e) => failed.push(format!("{path}: {e}")),
                }
            }
        }
        (answered, failed)
    })
}

/// A new `order-summary` version that stores a cancelled order's status as
/// `canceled` is built beside the live one while a client queries the live
/// one without a single failure; it follows new events; the diff counts
/// exactly the cancelled orders as changed in both tables; a restart keeps
/// it a preview; promoting switches to it (and makes it the plugin file).
#[test]
fn a_new_version_is_previewed_beside_the_live_one_then_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let mut server = Server::start(dir.path(), &[&p.order_summary], &config());
    let events = refract_client::fixtures::orders(6_000, 27, 0.01);
    append(&server, &events[..4000]);
    server.wait_caught_up();
    let (known, _) = server.table("order-summary", "orders")[0].clone();
    let stop = Arc::new(AtomicBool::new(false));
    let client = query_until(server.url.clone(), known, stop.clone());

    // Built beside the live one; the CLI follows it until it has caught up.
    let variant = p.order_summary_canceled.to_str().unwrap();
    let out = server.cli(&["rebuild", "order-summary", "--preview", "--plugin", variant], Some(ADMIN));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("the preview has caught up"), "{stderr}");
    assert!(stderr.contains("refract preview order-summary diff"), "{stderr}");
    let status = server.get("/v1/projections/order-summary");
    assert_eq!((status["generation"].as_u64(), status["rebuild"]["preview"].as_bool()), (Some(0), Some(true)));

    // The same version uploaded again is swapped into the live generation
    // only: the preview keeps the version it previews.
    let original = std::fs::read(&p.order_summary).unwrap();
    let uploaded = admin(&server).put("/v1/plugins/order_summary", "application/wasm", &original).unwrap();
    assert_eq!(uploaded.status, 202, "{}", uploaded.body);

    // It keeps following the live generation.
    append(&server, &events[4000..]);
    server.wait_caught_up();
    let diff = caught_up_diff(&server, events.len());
    let expected = reference::orders(&events);
    let cancelled = expected.orders.values().filter(|o| o["status"] == "cancelled").count() as u64;
    let cancelled_first =
        reference::orders(&events[..4000]).orders.values().filter(|o| o["status"] == "cancelled").count();
    assert!(
        cancelled_first > 0 && (cancelled_first as u64) < cancelled,
        "orders are cancelled before and after the upload"
    );
    for (table, total) in [("customer-orders", expected.customer_orders.len()), ("orders", expected.orders.len())] {
        let t = diff["tables"].as_array().unwrap().iter().find(|t| t["table"] == table).unwrap();
        assert_eq!(
            (t["added"].as_u64(), t["removed"].as_u64(), t["changed"].as_u64(), t["unchanged"].as_u64()),
            (Some(0), Some(0), Some(cancelled), Some(total as u64 - cancelled)),
            "{table}: {t}"
        );
        let samples = t["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 3, "{t}");
        for s in samples {
            assert_eq!((s["change"].as_str(), s["live"]["status"].as_str()), (Some("changed"), Some("cancelled")));
            assert_eq!(s["preview"]["status"], "canceled", "{s}");
            let mut live = s["live"].clone();
            live["status"] = "canceled".into();
            assert_eq!(live, s["preview"], "only the status differs");
        }
    }
    assert_eq!((diff["generation"].as_u64(), diff["liveGeneration"].as_u64()), (Some(1), Some(0)));
    assert!(diff["previewVersion"].as_str().unwrap().ends_with("+canceled"), "{diff}");
    // The CLI shows the same counts.
    let out = server.cli(&["preview", "order-summary", "diff", "--samples", "1"], None);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let row = shown.lines().find(|l| l.starts_with("orders ")).unwrap_or_default();
    let counts: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        counts[1..],
        ["0", "0", &cancelled.to_string(), &(expected.orders.len() as u64 - cancelled).to_string()]
    );
    assert!(shown.contains("caught up at 6000 events") && shown.contains(r#""status":"canceled""#), "{shown}");

    // The live read model is untouched: a preview emits and switches nothing.
    server.assert_order_summary_is_the_fold_of(&events);
    stop.store(true, Ordering::Relaxed);
    let (answered, failed) = client.join().unwrap();
    assert!(failed.is_empty() && answered > 0, "{answered} answered; failed: {failed:?}");

    // A restart resumes it as a preview, not as a rebuild that switches by itself.
    server.stop();
    server.restart();
    server.wait_caught_up();
    caught_up_diff(&server, events.len());
    let status = server.get("/v1/projections/order-summary");
    assert_eq!((status["generation"].as_u64(), status["rebuild"]["preview"].as_bool()), (Some(0), Some(true)));

    // Promoted: the rebuild's switch, with the client querying throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let (known, _) = server.table("order-summary", "orders")[0].clone();
    let client = query_until(server.url.clone(), known, stop.clone());
    let out = server.cli(&["preview", "order-summary", "promote"], Some(ADMIN));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("generation 1 of order-summary is live"), "{stderr}");
    stop.store(true, Ordering::Relaxed);
    let (answered, failed) = client.join().unwrap();
    assert!(failed.is_empty() && answered > 0, "{answered} answered; failed: {failed:?}");
    let orders = server.table("order-summary", "orders");
    let spelled = |s: &str| orders.iter().filter(|(_, o)| o["status"] == s).count() as u64;
    assert_eq!((spelled("canceled"), spelled("cancelled")), (cancelled, 0));
    let file = dir.path().join("plugins").join(p.order_summary.file_name().unwrap());
    assert_eq!(std::fs::read(&file).unwrap(), std::fs::read(&p.order_summary_canceled).unwrap());
    let root = dir.path().join("data/projections/order-summary");
    for gone in ["preview.wasm", "preview", "rebuilding", "read-model.redb"] {
        assert!(!root.join(gone).exists(), "{gone} is left after the promotion");
    }
    let none = server.client().get("/v1/projections/order-summary/preview/diff").unwrap();
    assert_eq!((none.status, none.body["error"]["code"].as_str()), (404, Some("no_preview")), "{}", none.body);

    // After a restart the promoted version runs: no reload, no rebuild.
    server.stop();
    server.restart();
    let status = server.get("/v1/projections/order-summary");
    assert_eq!(status["generation"], 1, "{status}");
    assert!(status["rebuild"].is_null() && status["reloadError"].is_null(), "{status}");
    assert!(status["plugin"]["version"].as_str().unwrap().ends_with("+canceled"), "{status}");
}

/// A discarded preview leaves nothing on disk; bad requests are refused
/// with the reason and change nothing.
#[test]
fn a_discarded_preview_leaves_nothing_and_bad_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.order_summary, &p.account_balance], &config());
    let events = refract_client::fixtures::orders(3_000, 28, 0.01);
    append(&server, &events);
    server.wait_caught_up();
    let root = dir.path().join("data/projections/order-summary");
    let listing = || {
        let mut names: Vec<String> =
            std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    let before = listing();
    let post = |route: &str, body: &[u8]| {
        admin(&server).post(&format!("/v1/projections/order-summary/{route}"), "application/wasm", body).unwrap()
    };

    // Refused: another projection's component, one that is no component, nothing to promote or discard.
    let other = post("preview", &std::fs::read(&p.account_balance).unwrap());
    assert_eq!(other.status, 400, "{}", other.body);
    assert!(other.body["error"]["message"].as_str().unwrap().contains("provides projection \"account-balance\""));
    let garbage = post("preview", b"not wasm");
    assert_eq!(garbage.status, 400, "{}", garbage.body);
    let promote =
        admin(&server).post("/v1/projections/order-summary/preview/promote", "application/json", b"").unwrap();
    assert_eq!((promote.status, promote.body["error"]["code"].as_str()), (404, Some("no_preview")));
    let discard = admin(&server).delete("/v1/projections/order-summary/preview").unwrap();
    assert_eq!((discard.status, discard.body["error"]["code"].as_str()), (404, Some("no_preview")));
    let anonymous = server.client().post("/v1/projections/order-summary/preview", "", b"").unwrap();
    assert_eq!(anonymous.status, 401);
    assert_eq!(listing(), before, "a refused request left files");

    // With no component: the plugin file again (the same read model: nothing changes).
    let started = post("preview", b"");
    assert_eq!((started.status, started.body["generation"].as_u64()), (202, Some(1)), "{}", started.body);
    assert_eq!(started.body["preview"], true);
    let again = post("preview", b"");
    assert_eq!((again.status, again.body["error"]["code"].as_str()), (409, Some("preview_open")), "{}", again.body);
    let rebuild = post("rebuild", b"");
    assert_eq!((rebuild.status, rebuild.body["error"]["code"].as_str()), (409, Some("preview_open")));
    let diff = caught_up_diff(&server, events.len());
    for t in diff["tables"].as_array().unwrap() {
        assert_eq!((t["added"].as_u64(), t["removed"].as_u64(), t["changed"].as_u64()), (Some(0), Some(0), Some(0)));
    }
    assert!(root.join("gen-1").exists() && root.join("preview.wasm").exists());

    let out = server.cli(&["preview", "order-summary", "discard"], Some(ADMIN));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("discarded the preview of order-summary (generation 1)"), "{stderr}");
    assert_eq!(listing(), before, "the discarded preview left files");
    let status = server.get("/v1/projections/order-summary");
    assert!(status["rebuild"].is_null() && status["generation"] == 0, "{status}");
    server.assert_order_summary_is_the_fold_of(&events);
}
