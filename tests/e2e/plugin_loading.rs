//! Plugins load from the plugins directory through the compile cache; a
//! broken plugin file or a corrupt cache entry never stops the runtime;
//! `refract plugin check` says what a component is before it is deployed.

use std::process::Command;

use serde_json::{Value, json};

use crate::support::{Server, plugins};

fn compiles(server: &Server) -> usize {
    server.log().matches("compiled component").count()
}

#[test]
fn broken_plugins_are_reported_and_the_others_run() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm but not really").unwrap();
    let not_a_projection = dir.path().join("core-module.wasm");
    std::fs::write(&not_a_projection, b"\0asm\x01\0\0\0").unwrap(); // an empty core module, not a component
    let p = plugins();
    let server = Server::start(dir.path(), &[&p.order_summary, &garbage, &not_a_projection], "");

    let list = server.get("/v1/projections");
    let names: Vec<&str> =
        list["projections"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["order-summary"]);
    let errors = list["pluginErrors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    for e in errors {
        assert!(e["error"].as_str().unwrap().contains("does not compile as a component"), "{e}");
    }
    assert!(errors.iter().any(|e| e["file"].as_str().unwrap().ends_with("garbage.wasm")));
}

#[test]
fn restarts_load_from_the_compile_cache_and_corrupt_entries_are_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let p = plugins();
    let mut server = Server::start(dir.path(), &[&p.order_summary, &p.account_balance], "");
    assert_eq!(compiles(&server), 2);
    server.stop();
    server.restart();
    assert_eq!(compiles(&server), 2, "the second start compiled again instead of using the cache");

    // Truncate one entry and flip a byte in the other: both must be recompiled, not loaded.
    server.stop();
    let cache = dir.path().join("data/cache/compiled");
    let mut entries: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    assert_eq!(entries.len(), 2);
    let bytes = std::fs::read(&entries[0]).unwrap();
    std::fs::write(&entries[0], &bytes[..bytes.len() / 2]).unwrap();
    let mut bytes = std::fs::read(&entries[1]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entries[1], &bytes).unwrap();
    server.restart();
    assert_eq!(compiles(&server), 4);
    assert_eq!(server.log().matches("discarding a corrupt or foreign compile-cache entry").count(), 2);
    assert_eq!(server.get("/v1/projections")["projections"].as_array().unwrap().len(), 2);
}

#[test]
fn plugin_check_reports_the_world_and_manifest_and_refuses_what_is_not_a_plugin() {
    let refract = env!("CARGO_BIN_EXE_refract");
    let out = Command::new(refract).args(["plugin", "check", "--json"]).arg(&plugins().order_search).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let checked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(checked["kind"], "projection");
    assert_eq!(checked["batches"], "packed", "the Rust SDK's components take packed batches");
    assert_eq!(checked["name"], "order-search");
    assert_eq!(checked["indexes"], json!(["orders"]));
    assert_eq!(checked["keyedTables"], json!([]));
    let out = Command::new(refract).args(["plugin", "check", "--json"]).arg(&plugins().order_summary).output().unwrap();
    let checked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(checked["keyedTables"], json!([{"table": "orders", "separator": null}]), "{checked}");
    let out = Command::new(refract)
        .args(["plugin", "check", "--json"])
        .arg(&plugins().orders_payments_join)
        .output()
        .unwrap();
    let checked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((checked["kind"].as_str(), checked["batches"].as_str()), (Some("enricher"), Some("packed")));

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm not really").unwrap();
    let out = Command::new(refract).args(["plugin", "check"]).arg(&junk).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not compile as a component"));
}

/// The plugin ABI promise: a component built against an earlier version
/// of the WIT package keeps running on this runtime. The checked-in build
/// of `order-summary` (tests/fixtures/abi) folds the fixture orders into
/// the same read model as the reference.
#[test]
fn a_component_built_against_an_earlier_wit_still_runs() {
    let fixture = crate::support::workspace_root().join("tests/fixtures/abi/order_summary-wit-0.1.0.wasm");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[&fixture], "");
    let status = server.get("/v1/projections/order-summary");
    assert_eq!(status["plugin"]["version"], "0.1.0", "{status}");
    let events = refract_client::fixtures::orders(3000, 43, 0.01);
    assert_eq!(server.client().append_ndjson("orders", &crate::support::ndjson(&events)).unwrap().status, 200);
    server.wait_caught_up();
    server.assert_order_summary_is_the_fold_of(&events);
}
