//! The HTTP API driven through the router, without a socket
//! (`tower::ServiceExt::oneshot`), over a runtime running the `order-summary`
//! projection compiled natively.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use order_summary::OrderSummary;
use refract::config::Config;
use refract::plugin::native::NativeProjection;
use refract::runtime::Runtime;
use refract_sdk::Projection;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Api {
    _dir: tempfile::TempDir,
    state: refract::api::AppState,
}

impl Api {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { data_dir: dir.path().join("data"), ..Config::default() };
        let runtime = Arc::new(Runtime::open(&config).unwrap());
        runtime
            .add(Box::new(NativeProjection::new(OrderSummary::manifest(), OrderSummary::handle)), "native".into())
            .unwrap();
        Api { _dir: dir, state: refract::api::AppState::new(runtime, &config) }
    }

    async fn call(&self, method: &str, uri: &str, content_type: &str, body: &str) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", content_type)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = refract::api::router(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, body)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call("GET", uri, "application/json", "").await
    }

    async fn caught_up(&self) {
        let until = Instant::now() + Duration::from_secs(30);
        while self.get("/v1/projections/order-summary").await.1["lag"] != 0 {
            assert!(Instant::now() < until, "the projection did not catch up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.state.runtime.shutdown();
    }
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not a JSON error: {body}"))
}

#[tokio::test]
async fn appended_orders_are_served_as_items_and_pages() {
    let api = Api::new();
    let events = r#"{"type":"OrderPlaced","key":"o-1","time":5,"data":{"orderId":"o-1","customerId":"c-9","total":20}}
{"type":"PaymentReceived","key":"o-1","time":6,"data":{"orderId":"o-1","paymentId":"p","amount":20}}
{"type":"OrderPlaced","key":"o-2","time":7,"data":{"orderId":"o-2","customerId":"c-9","total":1.5}}
"#;
    let (status, body) = api.call("POST", "/v1/streams/orders/events", "application/x-ndjson", events).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["positions"].as_array().unwrap().len(), 3);
    api.caught_up().await;

    let (status, order) = api.get("/v1/projections/order-summary/tables/orders/items/o-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        order,
        json!({"orderId": "o-1", "customerId": "c-9", "status": "paid", "total": 20.0, "paid": 20.0, "updatedAt": 6})
    );
    let (_, page) = api.get("/v1/projections/order-summary/tables/customer-orders/items?prefix=c-9/&limit=1").await;
    assert_eq!(page["items"][0]["key"], "c-9/o-1");
    assert_eq!(page["next"], "c-9/o-1");
    let (_, page) =
        api.get("/v1/projections/order-summary/tables/customer-orders/items?prefix=c-9/&after=c-9/o-1").await;
    assert_eq!(page["items"][0]["value"], json!({"orderId": "o-2", "status": "placed", "total": 1.5}));
    assert_eq!(page["next"], Value::Null);

    let (_, list) = api.get("/v1/projections").await;
    assert_eq!(list["projections"][0]["name"], "order-summary");
    assert_eq!(list["projections"][0]["eventsApplied"], 3);
    let (_, streams) = api.get("/v1/streams").await;
    assert_eq!(streams["streams"][0]["name"], "orders");
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_append_nothing() {
    let api = Api::new();
    let cases = [
        ("POST", "/v1/streams/orders/events", "application/json", "{not json", StatusCode::BAD_REQUEST, "bad_request"),
        (
            "POST",
            "/v1/streams/orders/events",
            "application/json",
            r#"{"type":"A"}"#,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        ("POST", "/v1/streams/orders/events", "application/json", "[]", StatusCode::BAD_REQUEST, "bad_request"),
        (
            "POST",
            "/v1/streams/orders/events",
            "text/plain",
            r#"{"type":"A","data":1}"#,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "POST",
            "/v1/streams/..%2Fetc/events",
            "application/json",
            r#"{"type":"A","data":1}"#,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        ("GET", "/v1/streams/orders/events", "", "", StatusCode::NOT_FOUND, "stream_not_found"),
        ("GET", "/v1/projections/nope", "", "", StatusCode::NOT_FOUND, "projection_not_found"),
        ("GET", "/v1/projections/order-summary/tables/nope/items", "", "", StatusCode::NOT_FOUND, "table_not_found"),
        (
            "GET",
            "/v1/projections/order-summary/tables/orders/items/o-404",
            "",
            "",
            StatusCode::NOT_FOUND,
            "key_not_found",
        ),
        (
            "GET",
            "/v1/projections/order-summary/tables/orders/items?limit=5000",
            "",
            "",
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        ("GET", "/v1/projections/order-summary/dead-letters?after=x", "", "", StatusCode::BAD_REQUEST, "bad_request"),
        ("GET", "/v2/anything", "", "", StatusCode::NOT_FOUND, "no_route"),
    ];
    for (method, uri, content_type, body, want_status, want_code) in cases {
        let (status, reply) = api.call(method, uri, content_type, body).await;
        assert_eq!((status, error_code(&reply)), (want_status, want_code), "{method} {uri}: {reply}");
    }
    // A batch with one invalid event is refused whole.
    let mixed = "{\"type\":\"A\",\"data\":1}\n{\"type\":\"\",\"data\":2}\n";
    let (status, reply) = api.call("POST", "/v1/streams/orders/events", "application/x-ndjson", mixed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reply["error"]["message"].as_str().unwrap().contains("event 1"), "{reply}");
    let (_, streams) = api.get("/v1/streams").await;
    assert_eq!(streams["streams"], json!([]));
}
