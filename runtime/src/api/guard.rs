//! What every request goes through, whatever its route: a time limit,
//! errors as JSON, and its count and latency for `/metrics`. axum answers
//! its own rejections (a body over the limit, a method the route lacks) in
//! plain text; clients of a JSON API should get the same
//! `{"error": {"code", "message"}}` from every failure.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::config::ApiConfig;

pub(super) async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let limits = &state.http.limits;
    let timeout = limits.request_timeout();
    let method = request.method().to_string();
    let route = super::route_of(request.uri().path());
    let uri = request.uri().clone();
    let response = match tokio::time::timeout(timeout, refuse_too_large(limits, request, next)).await {
        Ok(response) => as_json(response, limits.max_body_mb).await,
        Err(_) => {
            let what = format!("{method} {}", uri.path());
            tracing::warn!(request = %what, "request timed out");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "request_timeout",
                format!("{what} took longer than {} ms (api.request-timeout-ms)", timeout.as_millis()),
            )
            .into_response()
        }
    };
    state.http.metrics.record(&method, route, response.status().as_u16(), started.elapsed());
    response
}

/// A body declared larger than the limit is refused before any handler
/// runs. What the client sends is read first (up to a bound), so that it
/// gets the JSON error rather than a connection reset mid-upload.
async fn refuse_too_large(limits: &ApiConfig, request: Request, next: Next) -> Response {
    let limit = limits.max_body_bytes();
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => {
            if n <= 4 * limit as u64 {
                discard(request.into_body(), n as usize).await;
            }
            StatusCode::PAYLOAD_TOO_LARGE.into_response()
        }
        _ => next.run(request).await,
    }
}

/// Read what the client is sending and drop it frame by frame (up to `max`
/// bytes, for at most a few seconds), so that a client refused mid-upload
/// gets the answer rather than a connection reset, without the body ever
/// being held in memory.
pub(super) async fn discard(body: axum::body::Body, max: usize) {
    use axum::body::HttpBody;
    let mut body = std::pin::pin!(body);
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = 0usize;
    while seen <= max {
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx));
        match tokio::time::timeout_at(until, frame).await {
            Ok(Some(Ok(frame))) => seen += frame.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
}

/// An error response that is not JSON, made JSON (keeping `Allow` on a 405).
async fn as_json(response: Response, max_body_mb: usize) -> Response {
    let status = response.status();
    let is_json = response.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10).await.map(|b| String::from_utf8_lossy(&b).trim().to_owned());
    let text = text.unwrap_or_default();
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ("body_too_large", format!("the request body is larger than {max_body_mb} MiB (api.max-body-mb)"))
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts.headers.get(ALLOW).and_then(|v| v.to_str().ok()).unwrap_or("");
            ("method_not_allowed", format!("this route takes {allowed}"))
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", text),
        StatusCode::BAD_REQUEST => ("bad_request", text),
        _ => ("error", if text.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { text }),
    };
    let mut json = ApiError::new(status, code, message).into_response();
    if let Some(allow) = parts.headers.get(ALLOW) {
        json.headers_mut().insert(ALLOW, allow.clone());
    }
    json
}
