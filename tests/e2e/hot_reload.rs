//! New plugin versions dropped into the plugins directory are loaded off the
//! hot path and swapped in between batches: no event lost or applied twice,
//! a broken version leaves the running one in place, a new file starts a
//! new projection — all without a restart.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Server, ndjson, plugins, reference, wait_status};

/// `wasm` with a custom section appended: the same code, a different file
/// (a different hash), as a rebuilt plugin would be.
pub(crate) fn variant(wasm: &[u8], n: u8) -> Vec<u8> {
    let name = b"refract-test";
    let payload = [n; 16];
    let mut out = wasm.to_vec();
    out.push(0); // custom section
    out.push((1 + name.len() + payload.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

/// Replace `file` atomically, as a deployment would (write, then rename).
fn install(file: &Path, bytes: &[u8]) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

fn wait_for(server: &Server, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let status = server.get("/v1/projections/order-summary");
        if check(&status) {
            return status;
        }
        assert!(Instant::now() < until, "{what}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn new_versions_swap_in_between_batches_without_losing_or_repeating_events() {
    const EVENTS: usize = 12_000;
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let config = "batch:\n  max-events: 400\n  call-events: 100\n  max-duration-ms: 20\n";
    let server = Server::start(dir.path(), &[&p.order_summary], config);
    let file = dir.path().join("plugins").join(p.order_summary.file_name().unwrap());
    let original = std::fs::read(&p.order_summary).unwrap();
    let events = refract_client::fixtures::orders(EVENTS, 31, 0.01);

    let url = server.url.clone();
    let chunks: Vec<Vec<u8>> = events.chunks(400).map(ndjson).collect();
    let appender = std::thread::spawn(move || {
        let client = refract_client::Client::new(&url);
        for chunk in chunks {
            assert_eq!(client.append_ndjson("orders", &chunk).unwrap().status, 200);
            std::thread::sleep(Duration::from_millis(40));
        }
    });
    for n in 1..=3u32 {
        install(&file, &variant(&original, n as u8));
        wait_for(&server, "the new version was not swapped in", |s| s["reloads"].as_u64() == Some(u64::from(n)));
    }
    // A broken version: reported, and the running one carries on.
    install(&file, b"\0asm not really");
    let status = wait_for(&server, "the broken version was not reported", |s| s["reloadError"].is_string());
    assert!(status["reloadError"].as_str().unwrap().contains("compil"), "{status}");
    assert_eq!(status["state"], "running");
    install(&file, &variant(&original, 9));
    wait_for(&server, "a good version did not clear the error", |s| s["reloads"] == 4 && s["reloadError"].is_null());
    appender.join().unwrap();
    server.wait_caught_up();

    let expected = reference::orders(&events);
    let got: Vec<(String, Value)> = server.table("order-summary", "orders");
    assert!(got == expected.orders.into_iter().collect::<Vec<_>>(), "orders differ from the reference fold");
    let status = server.get("/v1/projections/order-summary");
    assert_eq!(status["eventsApplied"], EVENTS - expected.rejected, "no event applied twice: {status}");
    assert_eq!(status["deadLetters"], expected.rejected);
    assert!(server.log().contains("plugin version swapped in"));
}

#[test]
fn a_new_plugin_file_starts_a_new_projection_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.order_summary], "streams:\n  partitions: { accounts: 1 }\n");
    let accounts = refract_client::fixtures::accounts(2000, 8, 0.02);
    assert_eq!(server.client().append_ndjson("accounts", &ndjson(&accounts)).unwrap().status, 200);
    let target = dir.path().join("plugins").join(p.account_balance.file_name().unwrap());
    install(&target, &std::fs::read(&p.account_balance).unwrap());
    wait_status(
        &server.client(),
        "/v1/projections/account-balance",
        200,
        Duration::from_secs(60),
        "account-balance never started",
    );
    server.wait_caught_up();
    let (balances, rejected) = reference::balances(&accounts);
    let expected: Vec<(String, Value)> = balances.into_iter().collect();
    assert!(server.table("account-balance", "balances") == expected);
    assert_eq!(server.get("/v1/projections/account-balance")["deadLetters"], rejected);

    // Removing the file stops the projection and keeps its data; putting it back resumes it.
    std::fs::remove_file(&target).unwrap();
    wait_status(
        &server.client(),
        "/v1/projections/account-balance",
        404,
        Duration::from_secs(30),
        "account-balance did not stop",
    );
    assert!(dir.path().join("data/projections/account-balance/read-model.redb").exists(), "data kept");
    assert_eq!(server.get("/v1/projections/order-summary")["state"], "running", "the others run on");
    let more = refract_client::fixtures::accounts(2400, 8, 0.02);
    assert_eq!(server.client().append_ndjson("accounts", &ndjson(&more[2000..])).unwrap().status, 200);
    install(&target, &std::fs::read(&p.account_balance).unwrap());
    wait_status(
        &server.client(),
        "/v1/projections/account-balance",
        200,
        Duration::from_secs(60),
        "account-balance did not come back",
    );
    server.wait_caught_up();
    let (balances, rejected) = reference::balances(&more);
    assert!(server.table("account-balance", "balances") == balances.into_iter().collect::<Vec<_>>());
    let status = server.get("/v1/projections/account-balance");
    assert_eq!(status["deadLetters"], rejected, "resumed from its checkpoint: {status}");
    assert_eq!(status["eventsApplied"], 2400 - rejected);
}

#[test]
fn fifty_uploaded_versions_under_ingest_apply_every_event_once_and_fail_no_query() {
    const EVENTS: usize = 10_000;
    const ADMIN: &str = "admin-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let config = format!(
        "auth:\n  admin-token: {ADMIN}\nbatch:\n  max-events: 400\n  call-events: 100\n  max-duration-ms: 20\n"
    );
    let server = Server::start(dir.path(), &[&p.order_summary], &config);
    let admin = refract_client::Client::new(&server.url).with_token(Some(ADMIN));
    let original = std::fs::read(&p.order_summary).unwrap();
    let plugin = p.order_summary.file_stem().unwrap().to_str().unwrap().to_owned();
    let events = refract_client::fixtures::orders(EVENTS, 32, 0.01);

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, chunks) = (server.url.clone(), events.chunks(250).map(ndjson).collect::<Vec<_>>());
    let appender = std::thread::spawn(move || {
        let client = refract_client::Client::new(&url).with_token(Some(ADMIN));
        for chunk in chunks {
            assert_eq!(client.append_ndjson("orders", &chunk).unwrap().status, 200);
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    let (url, stop) = (server.url.clone(), done.clone());
    let querier = std::thread::spawn(move || {
        let client = refract_client::Client::new(&url);
        let (mut queries, mut failed) = (0, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for path in ["/v1/projections/order-summary", "/v1/projections/order-summary/tables/orders/items?limit=10"]
            {
                queries += 1;
                failed += usize::from(client.get(path).map_or(true, |r| r.status != 200));
            }
        }
        (queries, failed)
    });
    for n in 0..50u8 {
        let reply = admin.put(&format!("/v1/plugins/{plugin}"), "application/wasm", &variant(&original, n)).unwrap();
        assert_eq!(reply.status, 202, "{}", reply.body);
        wait_for(&server, "an uploaded version was not swapped in", |s| s["reloads"] == u64::from(n) + 1);
    }
    // Broken uploads: refused with the reason, visible in the status; the running version stays.
    let empty_component = b"\0asm\x0d\0\x01\0";
    let trap = std::fs::read(&p.chaos_trap).unwrap();
    for (bytes, expected) in
        [(&b"not wasm at all"[..], "compil"), (&empty_component[..], ""), (&trap[..], "asked to fail in manifest()")]
    {
        let reply = admin.put(&format!("/v1/plugins/{plugin}"), "application/wasm", bytes).unwrap();
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert!(reply.body["error"]["message"].as_str().unwrap().contains(expected), "{}", reply.body);
        let status = server.get("/v1/projections/order-summary");
        assert!(status["reloadError"].as_str().unwrap().starts_with("upload refused"), "{status}");
        assert_eq!((status["reloads"].as_u64(), status["state"].as_str()), (Some(50), Some("running")));
    }
    appender.join().unwrap();
    server.wait_caught_up();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (queries, failed) = querier.join().unwrap();
    assert_eq!(failed, 0, "{failed} of {queries} queries failed during the swaps");
    assert!(queries > 100);

    let expected = reference::orders(&events);
    let got: Vec<(String, Value)> = server.table("order-summary", "orders");
    assert!(got == expected.orders.into_iter().collect::<Vec<_>>(), "orders differ from the reference fold");
    let status = server.get("/v1/projections/order-summary");
    assert_eq!(status["eventsApplied"], EVENTS - expected.rejected, "every event applied exactly once: {status}");
}

#[test]
fn a_schema_version_bump_rebuilds_automatically_while_queries_stay_up() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.chaos], "");
    let events: Vec<Value> =
        (0..4000).map(|i| serde_json::json!({"type": "Ok", "key": format!("k{i}"), "data": {"n": i}})).collect();
    assert_eq!(server.client().append_ndjson("chaos", &ndjson(&events)).unwrap().status, 200);
    server.wait_caught_up();
    let before = server.get("/v1/projections/testkit-chaos");
    assert_eq!((before["plugin"]["schemaVersion"].as_u64(), before["generation"].as_u64()), (Some(1), Some(0)));

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (url, stop) = (server.url.clone(), done.clone());
    let querier = std::thread::spawn(move || {
        let client = refract_client::Client::new(&url);
        let mut failed = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let page = client.get("/v1/projections/testkit-chaos/tables/applied/items?limit=1000");
            failed +=
                usize::from(page.map_or(true, |r| r.status != 200 || r.body["items"].as_array().unwrap().len() < 1000));
        }
        failed
    });
    let file = dir.path().join("plugins").join(p.chaos.file_name().unwrap());
    install(&file, &std::fs::read(&p.chaos_v2).unwrap());
    let until = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = server.get("/v1/projections/testkit-chaos");
        if status["generation"] == 1 && status["rebuild"].is_null() {
            break status;
        }
        assert!(Instant::now() < until, "no automatic rebuild: {status}");
        std::thread::sleep(Duration::from_millis(50));
    };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(querier.join().unwrap(), 0, "queries failed during the rebuild");
    assert_eq!(status["plugin"]["schemaVersion"], 2, "{status}");
    assert_eq!(status["eventsApplied"], 4000);
    assert_eq!(server.table("testkit-chaos", "applied").len(), 4000);
}

/// A new version whose index mapping changed under the same schema-version
/// is refused with the reason; the running one keeps indexing. It used to
/// swap in: the worker checked documents against the new mapping while the
/// indexer kept the old schema and skipped what did not fit, so search
/// silently lost them.
#[test]
fn a_changed_index_mapping_without_a_new_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.chaos], "search:\n  commit-interval-ms: 50\n");
    let index = |n: u64, extra: Value| {
        let mut data = serde_json::json!({"n": n, "tag": "t"});
        data.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::json!({"type": "Index", "key": format!("k{n}"), "data": data})
    };
    server.client().append_ndjson("chaos", &ndjson(&[index(1, serde_json::json!({}))])).unwrap();
    server.wait_caught_up();

    let file = dir.path().join("plugins").join(p.chaos.file_name().unwrap());
    install(&file, &std::fs::read(&p.chaos_mapping).unwrap());
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = server.get("/v1/projections/testkit-chaos");
        if status["reloadError"].is_string() || status["reloads"].as_u64() > Some(0) {
            break status;
        }
        assert!(Instant::now() < until, "the new version was neither swapped in nor refused: {status}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let error = status["reloadError"].as_str().unwrap_or_else(|| panic!("swapped in: {status}"));
    assert!(
        error.contains("index \"docs\"") && error.contains("colour") && error.contains("schema-version"),
        "{error}"
    );

    // The running version: a document with `colour` does not fit its mapping
    // (a dead letter), the others are searchable.
    let more = [index(2, serde_json::json!({})), index(3, serde_json::json!({"colour": "red"}))];
    server.client().append_ndjson("chaos", &ndjson(&more)).unwrap();
    server.wait_caught_up();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let status = server.get("/v1/projections/testkit-chaos");
        if status["indexes"][0]["lag"] == 0 {
            assert_eq!(status["deadLetters"], 1, "{status}");
            break;
        }
        assert!(Instant::now() < until, "{status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.get("/v1/projections/testkit-chaos/indexes/docs/search")["total"], 2);
}

/// An upload the runtime will not run is refused before it is written: the
/// answer says why and the good file stays, so a restart runs the good
/// version. An upload of the same schema-version during a rebuild reaches
/// the new generation too, so the switch does not drop it. Both used to be
/// lost: the refused file was written (and answered 202), and the
/// rebuilding generation kept the version it started with.
#[test]
fn uploads_that_cannot_run_are_refused_unwritten_and_uploads_during_a_rebuild_survive_the_switch() {
    const ADMIN: &str = "admin-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let config = format!("auth:\n  admin-token: {ADMIN}\nbatch:\n  max-events: 200\n  max-duration-ms: 10\n");
    let mut server = Server::start(dir.path(), &[&p.chaos], &config);
    let admin = refract_client::Client::new(&server.url).with_token(Some(ADMIN));
    let file = dir.path().join("plugins").join(p.chaos.file_name().unwrap());
    let original = std::fs::read(&p.chaos).unwrap();

    let reply = admin.put("/v1/plugins/testkit_chaos", "application/wasm", &std::fs::read(&p.chaos_mapping).unwrap());
    let reply = reply.unwrap();
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body["error"]["message"].as_str().unwrap().contains("mapping of index"), "{}", reply.body);
    assert!(std::fs::read(&file).unwrap() == original, "the refused upload replaced the plugin file");

    // A long rebuild, and a new version (same schema-version) uploaded during it.
    let events: Vec<Value> =
        (0..30_000).map(|i| serde_json::json!({"type": "Ok", "key": format!("k{i}"), "data": {"n": i}})).collect();
    for chunk in events.chunks(5000) {
        assert_eq!(admin.append_ndjson("chaos", &ndjson(chunk)).unwrap().status, 200);
    }
    server.wait_caught_up();
    let started = admin.post("/v1/projections/testkit-chaos/rebuild", "application/json", b"").unwrap();
    assert_eq!(started.status, 202, "{}", started.body);
    let newer = variant(&original, 1);
    let reply = admin.put("/v1/plugins/testkit_chaos", "application/wasm", &newer).unwrap();
    assert_eq!(reply.status, 202, "{}", reply.body);
    let until = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = server.get("/v1/projections/testkit-chaos");
        if status["generation"] == 1 && status["rebuild"].is_null() {
            break status;
        }
        assert!(Instant::now() < until, "no switch: {status}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["reloads"], 1, "the new generation never got the uploaded version: {status}");
    assert!(std::fs::read(&file).unwrap() == newer);
    server.kill();
    server.restart();
    server.wait_caught_up();
    let status = server.get("/v1/projections/testkit-chaos");
    assert!(status["reloadError"].is_null(), "{status}");
    assert_eq!(server.table("testkit-chaos", "applied").len(), 30_000);
}
