//! The plugin author's loop: `refract plugin test` runs a component on the
//! events of a file, offline, and builds what a server builds from them.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::support::{ndjson, plugins, reference};

/// `refract plugin test args…` in `dir`: (success, standard output, standard error).
fn plugin_test(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_refract"))
        .current_dir(dir)
        .args(["plugin", "test"])
        .args(args)
        .output()
        .expect("running refract plugin test");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// The example `order-summary` on 3,000 orders with poison among them:
/// offline, its tables are the reference fold and exactly the events a
/// server dead-letters fail, with why.
#[test]
fn plugin_test_builds_the_reference_read_model_and_fails_the_events_a_server_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let events = refract_client::fixtures::orders(3000, 71, 0.02);
    std::fs::write(dir.path().join("orders.ndjson"), ndjson(&events)).unwrap();
    let wasm = plugins().order_summary.to_str().unwrap().to_owned();
    let expected = reference::orders(&events);
    assert!(expected.rejected > 10, "the fixture has poison: {}", expected.rejected);

    for quiet in [false, true] {
        let mut args = vec![wasm.as_str(), "--events", "orders.ndjson", "--json"];
        if quiet {
            args.push("--quiet");
        }
        let (ok, stdout, stderr) = plugin_test(dir.path(), &args);
        assert!(ok, "{stderr}");
        let lines = json_lines(&stdout);
        let last = lines.last().unwrap();
        let tables = &last["final"]["tables"];
        let orders: Vec<(String, Value)> =
            tables["orders"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert!(orders == expected.orders.clone().into_iter().collect::<Vec<_>>(), "quiet {quiet}: orders differ");
        let customers: Vec<(String, Value)> =
            tables["customer-orders"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert!(customers == expected.customer_orders.clone().into_iter().collect::<Vec<_>>(), "quiet {quiet}");
        assert_eq!(last["final"]["failed"], expected.rejected, "quiet {quiet}");
        assert_eq!(last["applied"], events.len() - expected.rejected, "quiet {quiet}");
        let failures: Vec<&Value> = lines.iter().filter(|l| l["outcome"]["applied"] == false).collect();
        assert_eq!(failures.len(), expected.rejected, "quiet {quiet}: one line per failed event");
        assert!(failures.iter().all(|f| f["outcome"]["failure"] == "rejected"), "{:?}", failures[0]);
        // Traced, every event handed has its line; quiet, only the failures do.
        let steps = lines.len() - 1;
        assert_eq!(steps, if quiet { expected.rejected } else { events.len() }, "quiet {quiet}");
    }

    // The text trace names each event, what it read and wrote, and why one failed.
    let (ok, stdout, _) = plugin_test(dir.path(), &[&wasm, "--events", "orders.ndjson"]);
    assert!(ok);
    let first = events[0]["data"]["orderId"].as_str().unwrap();
    assert!(stdout.starts_with(&format!("#0 orders 0:0 OrderPlaced key {first}")), "{}", &stdout[..300]);
    assert!(stdout.contains(&format!("   get      orders[\"{first}\"] → none")), "{}", &stdout[..600]);
    assert!(stdout.contains(&format!("   put      orders[\"{first}\"] = {{")), "{}", &stdout[..600]);
    assert!(stdout.contains("   ✗ rejected: "), "a rejected event and its reason");
    assert!(stdout.contains("3000 events in") && stdout.contains(&format!("{} failed", expected.rejected)));
}

/// `--state` starts from given tables; `--expect` compares; bad input is a
/// clear error that names the line or the file.
#[test]
fn plugin_test_starts_from_a_state_and_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = plugins().order_summary.to_str().unwrap().to_owned();
    let payment = json!({"type": "PaymentReceived", "key": "o-9", "time": 50,
        "data": {"orderId": "o-9", "paymentId": "p-1", "amount": 30}});
    std::fs::write(dir.path().join("payment.ndjson"), ndjson(std::slice::from_ref(&payment))).unwrap();

    // Alone, a payment for an order nobody placed is rejected.
    let (ok, stdout, _) = plugin_test(dir.path(), &[&wasm, "--events", "payment.ndjson"]);
    assert!(ok && stdout.contains("✗ rejected") && stdout.contains("1 failed"), "{stdout}");

    // After the order, as a state, it applies.
    let placed =
        json!({"orderId": "o-9", "customerId": "c-1", "status": "placed", "total": 30.0, "paid": 0.0, "updatedAt": 40});
    let state = json!({"tables": {"orders": {"o-9": placed}}});
    std::fs::write(dir.path().join("state.json"), state.to_string()).unwrap();
    let paid =
        json!({"orderId": "o-9", "customerId": "c-1", "status": "paid", "total": 30.0, "paid": 30.0, "updatedAt": 50});
    let expect = json!({"tables": {"orders": {"o-9": paid}}, "failed": 0});
    std::fs::write(dir.path().join("expect.json"), expect.to_string()).unwrap();
    let args = [wasm.as_str(), "--events", "payment.ndjson", "--state", "state.json", "--expect", "expect.json"];
    let (ok, stdout, stderr) = plugin_test(dir.path(), &args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("   get      orders[\"o-9\"] → {"), "the state was read: {stdout}");
    assert!(stderr.contains("as expected"), "{stderr}");

    // An expectation that is not met names the key and field.
    let wrong = json!({"tables": {"orders": {"o-9": {"status": "shipped"}}}});
    std::fs::write(dir.path().join("wrong.json"), wrong.to_string()).unwrap();
    let args = [wasm.as_str(), "--events", "payment.ndjson", "--state", "state.json", "--expect", "wrong.json"];
    let (ok, _, stderr) = plugin_test(dir.path(), &args);
    assert!(!ok);
    assert!(stderr.contains(r#"orders["o-9"].status: expected "shipped", got "paid""#), "{stderr}");
    assert!(stderr.contains(r#"orders["o-9"].total: not expected, got 30.0"#), "{stderr}");
    assert!(!stderr.contains("customer-orders"), "only the tables named compare: {stderr}");

    // Bad input: the line of an event that is not one, a state for a table the plugin lacks, an expectation of unknown shape.
    std::fs::write(dir.path().join("bad.ndjson"), format!("{payment}\n{{\"type\": \"OrderPlaced\"}}\n")).unwrap();
    let (ok, _, stderr) = plugin_test(dir.path(), &[&wasm, "--events", "bad.ndjson"]);
    assert!(!ok && stderr.contains("bad.ndjson: line 2: missing field `data`"), "{stderr}");
    std::fs::write(dir.path().join("state.json"), json!({"tables": {"nope": {"k": 1}}}).to_string()).unwrap();
    let (ok, _, stderr) = plugin_test(dir.path(), &[&wasm, "--events", "payment.ndjson", "--state", "state.json"]);
    assert!(!ok && stderr.contains("nope"), "{stderr}");
    std::fs::write(dir.path().join("expect.json"), json!({"table": {}}).to_string()).unwrap();
    let (ok, _, stderr) = plugin_test(dir.path(), &[&wasm, "--events", "payment.ndjson", "--expect", "expect.json"]);
    assert!(!ok && stderr.contains("unknown field `table`"), "{stderr}");
    let (ok, _, stderr) = plugin_test(dir.path(), &[&wasm]);
    assert!(!ok && stderr.contains("--events"), "{stderr}");
}

/// A dead letter from a running server: `refract dead-letters … reproduce`
/// writes a folder whose command reproduces the failure offline — the same
/// error, the same reads — with the exact component that failed.
#[test]
fn a_dead_letter_is_reproduced_offline_with_the_same_error_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = crate::support::Server::start(dir.path(), &[&plugins().order_summary], "");
    let placed = json!({"type": "OrderPlaced", "key": "o-1", "time": 10,
        "data": {"orderId": "o-1", "customerId": "c-1", "total": 30.0, "items": [], "description": "a lamp"}});
    let payment = json!({"type": "PaymentReceived", "key": "o-9", "time": 20,
        "data": {"orderId": "o-9", "paymentId": "p-1", "amount": 5.0}});
    let events = [placed.clone(), placed, payment];
    assert_eq!(server.client().append_ndjson("orders", &ndjson(&events)).unwrap().status, 200);
    server.wait_checkpoints("order-summary", 3);
    let letters = server.get("/v1/projections/order-summary/dead-letters")["deadLetters"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 2, "placed twice, and paid for an unknown order: {letters:?}");

    let wasm = std::fs::read(&plugins().order_summary).unwrap();
    for letter in &letters {
        let (id, error) = (letter["id"].as_u64().unwrap(), letter["error"].as_str().unwrap());
        let digest = letter["pluginDigest"].as_str().unwrap_or_else(|| panic!("{letter}"));
        let (status, component) =
            server.client().get_bytes(&format!("/v1/projections/order-summary/components/{digest}")).unwrap();
        assert_eq!((status, component == wasm), (200, true), "the exact component is kept");

        let out = dir.path().join(format!("reproduce-{id}"));
        let written = server
            .cli(&["dead-letters", "order-summary", "reproduce", &id.to_string(), "-o", out.to_str().unwrap()], None);
        assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
        for file in ["plugin.wasm", "event.ndjson", "state.json", "trace.json", "README.md"] {
            assert!(out.join(file).is_file(), "{file} missing");
        }
        let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(readme.contains(error) && readme.contains("refract plugin test plugin.wasm"), "{readme}");
        let reproduction = server.get(&format!("/v1/projections/order-summary/dead-letters/{id}/reproduction"));
        assert_eq!(reproduction["sameError"], true, "{reproduction}");

        // Offline, the command in the folder: the same error, the same reads.
        let args = ["plugin.wasm", "--events", "event.ndjson", "--state", "state.json", "--json"];
        let (ok, stdout, stderr) = plugin_test(&out, &args);
        assert!(ok, "{stderr}");
        let step = &json_lines(&stdout)[0];
        assert_eq!(step["outcome"]["error"], error, "{step}");
        assert_eq!(step["calls"], reproduction["calls"], "the same reads");
    }
    // The second OrderPlaced read the order the first one placed: its value is in the state.
    let first = letters[0]["id"].as_u64().unwrap();
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(format!("reproduce-{first}/state.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(state["tables"]["orders"]["o-1"]["status"], "placed", "{state}");

    // A letter that is not there, a component that is not kept: clear 404s.
    let missing = server.client().get("/v1/projections/order-summary/dead-letters/999/reproduction").unwrap();
    assert_eq!((missing.status, missing.body["error"]["code"].as_str()), (404, Some("dead_letter_not_found")));
    let none = format!("/v1/projections/order-summary/components/{}", "0".repeat(64));
    assert_eq!(server.client().get_bytes(&none).unwrap().0, 404);

    // A start sweeps a component no dead letter names and no plugin runs,
    // and keeps the one the dead letters name (here also the one running).
    let digest = letters[0]["pluginDigest"].as_str().unwrap();
    let kept = dir.path().join("data/components/order-summary");
    std::fs::write(kept.join(format!("{}.wasm", "f".repeat(64))), b"an old version nothing names").unwrap();
    server.stop();
    server.restart();
    let path = format!("/v1/projections/order-summary/components/{digest}");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while kept.join(format!("{}.wasm", "f".repeat(64))).exists() {
        assert!(std::time::Instant::now() < until, "the start never swept");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(server.client().get_bytes(&path).unwrap().0, 200, "named by dead letters: kept");
}
