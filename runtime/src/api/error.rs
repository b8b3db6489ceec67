//! The one error type of the HTTP API: `{"error": {"code", "message"}}`.

use std::borrow::Cow;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An API error with a stable machine-readable code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: Cow<'static, str>,
    message: String,
    /// Seconds after which the request may succeed (`Retry-After`).
    retry_after: Option<u32>,
}

impl ApiError {
    /// Any status, with a stable code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code: Cow::Borrowed(code), message: message.into(), retry_after: None }
    }

    /// The request was malformed or named invalid things (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// What the request names does not exist (404).
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    /// The request conflicts with how the server is set up (409).
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    /// The request lacks the bearer token the route needs (401).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// The route is switched off by configuration (403).
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, code, message)
    }

    /// A query's `wait_for` positions were not reached in time (504).
    pub fn timeout(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "wait_timeout", message)
    }

    /// The server failed: logged in full, reported briefly (500 or 503).
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{context} failed; see the server log"))
    }

    /// Storage refused a write (disk full, I/O error): try again later (503).
    pub fn unavailable(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", format!("{context}: {error}"))
    }

    /// A shard of a partitioned projection cannot answer now (it is being
    /// restored, or its instance cannot be reached): 503 with `Retry-After`,
    /// never a partial answer presented as whole.
    pub fn shard_unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message) }
    }

    /// The projection asked for has not started yet: a partitioned one
    /// waits for its brokers to say how many shards it has (503 with
    /// `Retry-After`).
    pub fn not_started(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(5),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "projection_not_started", message)
        }
    }

    /// The error another instance answered a forwarded request with, passed on.
    pub fn relayed(status: StatusCode, code: String, message: String, retry_after: Option<u32>) -> Self {
        ApiError { status, code: Cow::Owned(code), message, retry_after }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The machine-readable code of the error.
    pub fn code(&self) -> &str {
        &self.code
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = super::dto::ErrorBody {
            error: super::dto::ErrorDetail { code: self.code.into_owned(), message: self.message },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

impl From<crate::store::Error> for ApiError {
    fn from(e: crate::store::Error) -> Self {
        ApiError::internal("reading the read model", e)
    }
}
