//! The HTTP API (axum). [`router`] builds every route over a [`Runtime`], so
//! tests can drive it with `tower::ServiceExt::oneshot`, without a socket.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | liveness |
//! | `GET /v1/streams` | streams, partitions and heads |
//! | `POST /v1/streams/{stream}/events` | append one event, a JSON array, or NDJSON |
//! | `GET /v1/streams/{stream}/events?partition=&from=&limit=` | read events back |
//! | `GET /v1/projections` | every projection's status, and plugins that failed to load |
//! | `GET /v1/projections/{p}` | one projection's status |
//! | `GET /v1/projections/{p}/tables/{t}/items/{key}` | one value |
//! | `GET /v1/projections/{p}/tables/{t}/items?prefix=&after=&limit=` | a page of entries |
//! | `GET /v1/projections/{p}/dead-letters?after=&limit=` | a page of dead letters |
//! | `GET /v1/projections/{p}/indexes/{i}/search?q=&filter=&sort=&limit=&offset=&facets=` | full-text search |
//!
//! | `POST /v1/projections/{p}/rebuild` | start a blue/green rebuild (admin token) |
//! | `DELETE /v1/projections/{p}/rebuild` | cancel it (admin token) |
//! | `PUT /v1/plugins/{name}` | upload a plugin (admin token) |
//!
//! Read-model queries (items, pages, search) also take `wait_for` and
//! `timeout_ms`: see [`consistency`]. Tokens: see `auth.rs`.

mod auth;
pub mod consistency;
mod error;
mod plugins;
mod projections;
mod search;
mod streams;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};

pub use error::ApiError;

use crate::runtime::Runtime;

/// The largest request body accepted (a batch of appended events).
pub const MAX_BODY_BYTES: usize = 64 << 20;

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

/// Every route of the API over `runtime`.
pub fn router(runtime: Arc<Runtime>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/v1/streams", get(streams::list))
        .route("/v1/streams/{stream}/events", get(streams::read).post(streams::append))
        .route("/v1/projections", get(projections::list))
        .route("/v1/projections/{projection}", get(projections::status))
        .route("/v1/projections/{projection}/tables/{table}/items", get(projections::scan))
        .route("/v1/projections/{projection}/tables/{table}/items/{*key}", get(projections::get_item))
        .route("/v1/projections/{projection}/dead-letters", get(projections::dead_letters))
        .route("/v1/projections/{projection}/dead-letters/retry", post(projections::retry_dead_letters))
        .route(
            "/v1/projections/{projection}/dead-letters/{id}",
            get(projections::dead_letter).delete(projections::skip_dead_letter),
        )
        .route("/v1/projections/{projection}/dead-letters/{id}/retry", post(projections::retry_dead_letter))
        .route("/v1/projections/{projection}/indexes/{index}/search", get(search::search))
        .route("/v1/projections/{projection}/resume", post(projections::resume))
        .route("/v1/projections/{projection}/rebuild", post(projections::rebuild).delete(projections::cancel_rebuild))
        .route("/v1/plugins/{plugin}", put(plugins::upload))
        .fallback(|| async {
            ApiError::not_found("no_route", "no such route; see GET /v1/projections and /v1/streams")
        })
        .layer(axum::middleware::from_fn_with_state(runtime.clone(), auth::authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(runtime)
}

/// Serve the API on `listener` until `shutdown` resolves.
pub async fn serve(
    runtime: Arc<Runtime>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Replies are small: send them at once rather than wait for Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(runtime)).with_graceful_shutdown(shutdown).await
}
