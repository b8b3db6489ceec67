//! The HTTP API (axum). [`router`] builds every route over an [`AppState`] (a
//! [`crate::runtime::Runtime`] and the API's settings), so
//! tests can drive it with `tower::ServiceExt::oneshot`, without a socket.
//!
//! The operations are listed once, in [`operations`]; `openapi.yaml` (served
//! as `/openapi.json`) documents exactly those (a test checks both ways).
//! Every request goes through `guard` (time limit, errors as JSON) and
//! `auth` (bearer tokens: the admin token for every method but GET/HEAD).
//! Read-model queries (items, pages, search) also take `wait_for` and
//! `timeout_ms`: see [`consistency`].

mod auth;
mod changes;
pub mod consistency;
pub mod dto;
mod error;
mod extract;
mod guard;
mod plugins;
mod preview;
mod projections;
mod search;
mod shards;
mod state;
mod streams;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::routing::{MethodRouter, delete, get, post, put};

pub use error::ApiError;
pub use state::AppState;

/// The page size when a request names none, and the largest allowed.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_LIMIT}, got {n}"))),
    }
}

/// Run `work`, which blocks (a tantivy search), without stalling the other
/// requests of this worker thread. On a multi-threaded runtime it runs right
/// here, once the worker has handed its other tasks to another thread
/// (`block_in_place`): against the blocking pool's round trip, this saves
/// two thread wake-ups per request, and under concurrent searches it does not
/// pile more threads on the cores (measured in `benches/search`). The work
/// cannot be cut short, so the request time limit applies once it is done.
/// A single-threaded runtime (tests) uses the blocking pool.
async fn run_blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        Ok(tokio::task::block_in_place(work))
    } else {
        tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::internal(what, e))
    }
}

/// Stored JSON as it is, without parsing it into a tree (a page of 1,000
/// values of 1 MiB parsed into `serde_json::Value` takes many times that in
/// memory). Values are checked to be JSON when they are written; anything
/// else is passed on as a JSON string.
fn raw_json(bytes: Vec<u8>) -> Box<serde_json::value::RawValue> {
    match String::from_utf8(bytes) {
        Ok(text) => serde_json::value::RawValue::from_string(text).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "a stored value is not JSON");
            serde_json::value::to_raw_value("<not JSON>").expect("a string serializes")
        }),
        Err(e) => serde_json::value::to_raw_value(&String::from_utf8_lossy(e.as_bytes())).expect("a string serializes"),
    }
}

/// The web console, served at `/`: one static page (no external assets)
/// that uses this API with the token the user types in.
const CONSOLE_HTML: &str = include_str!("console.html");

/// The OpenAPI 3.1 description of [`operations`], served as `/openapi.json`.
pub const OPENAPI_YAML: &str = include_str!("openapi.yaml");

fn openapi() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| serde_saphyr::from_str(OPENAPI_YAML).expect("openapi.yaml parses (checked by a test)"))
}

/// Every operation of the API: method, path, handler.
pub fn operations() -> Vec<(Method, &'static str, MethodRouter<AppState>)> {
    use Method as M;
    vec![
        (M::GET, "/", get(console)),
        (M::GET, "/healthz", get(|| async { axum::Json(dto::Health { status: "ok".into() }) })),
        (M::GET, "/openapi.json", get(|| async { axum::Json(openapi()) })),
        (M::GET, "/metrics", get(metrics)),
        (M::GET, "/v1/cluster", get(cluster)),
        (M::GET, "/v1/streams", get(streams::list)),
        (M::GET, "/v1/streams/{stream}/events", get(streams::read)),
        (M::POST, "/v1/streams/{stream}/events", post(streams::append)),
        (M::GET, "/v1/projections", get(projections::list)),
        (M::GET, "/v1/projections/{projection}", get(projections::status)),
        (M::GET, "/v1/projections/{projection}/tables/{table}/items", get(projections::scan)),
        (M::GET, "/v1/projections/{projection}/tables/{table}/items/{*key}", get(projections::get_item)),
        (M::GET, "/v1/projections/{projection}/tables/{table}/changes", get(changes::changes)),
        (M::GET, "/v1/projections/{projection}/dead-letters", get(projections::dead_letters)),
        (M::POST, "/v1/projections/{projection}/dead-letters/retry", post(projections::retry_dead_letters)),
        (M::GET, "/v1/projections/{projection}/dead-letters/{id}", get(projections::dead_letter)),
        (M::DELETE, "/v1/projections/{projection}/dead-letters/{id}", delete(projections::skip_dead_letter)),
        (M::POST, "/v1/projections/{projection}/dead-letters/{id}/retry", post(projections::retry_dead_letter)),
        (M::GET, "/v1/projections/{projection}/dead-letters/{id}/reproduction", get(projections::reproduce)),
        (M::GET, "/v1/projections/{projection}/components/{digest}", get(plugins::component)),
        (M::GET, "/v1/projections/{projection}/indexes/{index}/search", get(search::search)),
        (M::POST, "/v1/projections/{projection}/resume", post(projections::resume)),
        (M::POST, "/v1/projections/{projection}/rebuild", post(projections::rebuild)),
        (M::DELETE, "/v1/projections/{projection}/rebuild", delete(projections::cancel_rebuild)),
        (M::POST, "/v1/projections/{projection}/preview", post(preview::start)),
        (M::GET, "/v1/projections/{projection}/preview/diff", get(preview::diff)),
        (M::POST, "/v1/projections/{projection}/preview/promote", post(preview::promote)),
        (M::DELETE, "/v1/projections/{projection}/preview", delete(preview::discard)),
        (M::PUT, "/v1/plugins/{plugin}", put(plugins::upload)),
    ]
}

/// `GET /`: the console; in a cluster, marked so that it shows the cluster
/// (and asks nothing of `/v1/cluster` otherwise).
async fn console(axum::extract::State(state): axum::extract::State<AppState>) -> axum::response::Html<String> {
    let mode = if state.cluster.is_some() { "on" } else { "off" };
    axum::response::Html(CONSOLE_HTML.replacen("<body>", &format!("<body data-cluster=\"{mode}\">"), 1))
}

/// `GET /v1/cluster`: the members of the control topic, as this instance last read them.
async fn cluster(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<axum::Json<crate::cluster::ClusterView>, ApiError> {
    match &state.cluster {
        Some(cluster) => Ok(axum::Json(cluster.view())),
        None => Err(ApiError::not_found(
            "not_in_a_cluster",
            "this instance is not in a cluster: give its refract.yaml a `cluster:` section (and `kafka.brokers`)",
        )),
    }
}

/// `GET /metrics`: Prometheus' text format.
async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> impl axum::response::IntoResponse {
    let text = tokio::task::spawn_blocking(move || state.metrics()).await.unwrap_or_default();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

/// The route template `path` matches (`{projection}` matches one segment,
/// `{*key}` the rest), or `other`: the `route` label of HTTP metrics.
pub fn route_of(path: &str) -> &'static str {
    static PATHS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let paths = PATHS.get_or_init(|| {
        let mut paths: Vec<&'static str> = operations().into_iter().map(|(_, p, _)| p).collect();
        paths.dedup();
        paths
    });
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let matches = |template: &str| -> bool {
        let parts: Vec<&str> = template.trim_start_matches('/').split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            if part.starts_with("{*") {
                return segments.get(i).is_some_and(|s| !s.is_empty());
            }
            let Some(segment) = segments.get(i) else { return false };
            let fits = if part.starts_with('{') { !segment.is_empty() } else { segment == part };
            if !fits {
                return false;
            }
        }
        segments.len() == parts.len()
    };
    paths.iter().copied().find(|t| matches(t)).unwrap_or("other")
}

/// Every route of the API over `state`.
pub fn router(state: AppState) -> Router {
    let mut by_path: std::collections::BTreeMap<&str, MethodRouter<AppState>> = Default::default();
    for (_, path, handler) in operations() {
        let merged = match by_path.remove(path) {
            Some(other) => other.merge(handler),
            None => handler,
        };
        by_path.insert(path, merged);
    }
    let mut router = Router::new();
    for (path, handler) in by_path {
        router = router.route(path, handler);
    }
    let max_body = state.http.limits.max_body_bytes();
    let api = router
        .fallback(|| async { ApiError::not_found("no_route", "no such route; see GET /openapi.json") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authorize))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state.clone());
    // Around the whole router (not each route, as `Router::layer` would), so
    // that the guard sees responses as routing made them, `Allow` included.
    Router::new().fallback_service(api).layer(axum::middleware::from_fn_with_state(state, guard::guard))
}

/// Serve the API on `listener` until `shutdown` resolves.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let header_timeout = state.http.limits.header_timeout();
    let closing = state.http.closing.clone();
    let shutdown = async move {
        shutdown.await;
        closing.send_replace(true);
    };
    serve_router(router(state), header_timeout, listener, shutdown).await
}

/// How many connections the server holds open at once: half the process's
/// file descriptors (after raising their soft limit to the hard one), so
/// that clients holding connections never starve the log, the read models
/// and the indexes of files.
fn max_connections() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct passed, nothing else.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 512;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    };
    usize::try_from(soft / 2).unwrap_or(usize::MAX).clamp(64, 1 << 20)
}

/// Serve `router` on `listener` with the API's connection handling (HTTP/1
/// and 2, a header read timeout, TCP_NODELAY, graceful shutdown) until
/// `shutdown` resolves. Public so that the HTTP benchmark measures a
/// hello-world route on exactly the stack the API runs on.
pub async fn serve_router(
    router: Router,
    header_timeout: std::time::Duration,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;

    // hyper's connection builder rather than `axum::serve`, which sets no
    // timer: without one, a client that opens a connection and never
    // finishes its headers (slowloris) holds it for ever, since the request
    // time limit only starts once a request has been read.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    // An HTTP/2 client must answer pings: one that holds a connection
    // without reading (or vanished) is closed.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(header_timeout))
        .keep_alive_timeout(header_timeout);
    let service = TowerToHyperService::new(router);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    // Each connection holds a file descriptor; leave half of them to the
    // log, the read models and the indexes, whatever clients do.
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections()));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                // Out of file descriptors, say: wait for some to close, as axum does.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Replies are small: send them at once rather than wait for Nagle's algorithm.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let (builder, service, watcher) = (builder.clone(), service.clone(), connections.watcher());
        tokio::spawn(async move {
            // hyper's protocol detection waits for the first bytes without a
            // timer: a client that connects and sends nothing is closed here.
            let mut first = [0u8; 1];
            if matches!(tokio::time::timeout(header_timeout, tcp.peek(&mut first)).await, Ok(Ok(n)) if n > 0) {
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service).into_owned();
                if let Err(e) = watcher.watch(connection).await {
                    tracing::trace!(error = %e, "connection ended with an error");
                }
            }
            drop(permit);
        });
    }
    // Stop accepting; let requests in flight finish.
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_openapi_document_describes_exactly_the_routes() {
        let doc: serde_json::Value = serde_saphyr::from_str(OPENAPI_YAML).unwrap();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap().iter().filter(|(k, _)| *k != "parameters") {
                documented.insert((method.to_uppercase(), path.clone()));
                if method != "get" {
                    assert_eq!(
                        operation["security"],
                        serde_json::json!([{"bearer": []}]),
                        "{method} {path} must document that it needs the admin token"
                    );
                }
            }
        }
        let routed: BTreeSet<(String, String)> =
            operations().into_iter().map(|(m, path, _)| (m.to_string(), path.replace("{*", "{"))).collect();
        assert_eq!(documented, routed);
    }

    #[test]
    fn requests_are_counted_under_their_route_template() {
        assert_eq!(route_of("/v1/projections/order-summary"), "/v1/projections/{projection}");
        assert_eq!(route_of("/v1/projections/p/dead-letters/retry"), "/v1/projections/{projection}/dead-letters/retry");
        assert_eq!(route_of("/v1/projections/p/dead-letters/7"), "/v1/projections/{projection}/dead-letters/{id}");
        assert_eq!(
            route_of("/v1/projections/p/tables/t/items/a/b/c"),
            "/v1/projections/{projection}/tables/{table}/items/{*key}"
        );
        assert_eq!(route_of("/metrics"), "/metrics");
        assert_eq!(route_of("/"), "/");
        assert_eq!(route_of("/v1/nothing"), "other");
        assert_eq!(route_of("/v1/projections/"), "other");
    }
}
