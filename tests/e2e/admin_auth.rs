//! Bearer tokens: the admin token guards mutating routes (appends, plugin
//! uploads), the query token guards queries; a plugin uploaded over HTTP is
//! checked before it is installed, then loaded without a restart.

use std::time::Duration;

use refract_client::Client;
use serde_json::json;

use crate::support::{Server, plugins, wait_status};

const ADMIN: &str = "admin-secret-0123456789";
const QUERY: &str = "query-secret-0123456789";

#[test]
fn tokens_guard_their_routes_and_uploads_are_checked_then_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("auth:\n  admin-token: {ADMIN}\n  query-token: {QUERY}\n");
    let server = Server::start(dir.path(), &[&plugins().order_summary], &config);
    let anonymous = server.client();
    let query = Client::new(&server.url).with_token(Some(QUERY));
    let admin = Client::new(&server.url).with_token(Some(ADMIN));
    let wrong = Client::new(&server.url).with_token(Some("not-the-token-at-all"));

    assert_eq!(anonymous.get("/healthz").unwrap().status, 200);
    for client in [&anonymous, &wrong] {
        let refused = client.get("/v1/projections").unwrap();
        assert_eq!((refused.status, refused.body["error"]["code"].as_str()), (401, Some("unauthorized")));
    }
    assert_eq!(query.get("/v1/projections").unwrap().status, 200);
    assert_eq!(admin.get("/v1/projections/order-summary").unwrap().status, 200);

    let event =
        json!({"type": "OrderPlaced", "key": "o-1", "data": {"orderId": "o-1", "customerId": "c-1", "total": 1}});
    let body = event.to_string();
    for client in [&anonymous, &query] {
        let refused = client.post("/v1/streams/orders/events", "application/json", body.as_bytes()).unwrap();
        assert_eq!(refused.status, 401, "{}", refused.body);
    }
    assert_eq!(admin.post("/v1/streams/orders/events", "application/json", body.as_bytes()).unwrap().status, 200);

    // Uploads: the admin token only; a broken component is refused and not installed.
    let wasm = std::fs::read(&plugins().account_balance).unwrap();
    assert_eq!(query.put("/v1/plugins/account-balance", "application/wasm", &wasm).unwrap().status, 401);
    let broken = admin.put("/v1/plugins/broken", "application/wasm", b"\0asm\x0d\0\x01\0junk").unwrap();
    assert_eq!(broken.status, 400, "{}", broken.body);
    assert!(!dir.path().join("plugins/broken.wasm").exists());
    let bad_name = admin.put("/v1/plugins/..%2Fescape", "application/wasm", &wasm).unwrap();
    assert_eq!(bad_name.status, 400, "{}", bad_name.body);

    let accepted = admin.put("/v1/plugins/account-balance", "application/wasm", &wasm).unwrap();
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    assert_eq!(accepted.body["projection"], "account-balance");
    wait_status(
        &query,
        "/v1/projections/account-balance",
        200,
        Duration::from_secs(60),
        "the uploaded plugin never started",
    );
}

#[test]
fn without_an_admin_token_uploads_are_off_and_appends_open() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[&plugins().order_summary], "");
    let client = server.client();
    let wasm = std::fs::read(&plugins().account_balance).unwrap();
    let off = client.put("/v1/plugins/account-balance", "application/wasm", &wasm).unwrap();
    assert_eq!((off.status, off.body["error"]["code"].as_str()), (403, Some("admin_disabled")), "{}", off.body);
    let event =
        json!({"type": "OrderPlaced", "key": "o-1", "data": {"orderId": "o-1", "customerId": "c-1", "total": 1}});
    assert_eq!(
        client.post("/v1/streams/orders/events", "application/json", event.to_string().as_bytes()).unwrap().status,
        200
    );
}
