//! The one error type of the HTTP API: `{"error": {"code", "message"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An API error with a stable machine-readable code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// Any status, with a stable code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    /// The request was malformed or named invalid things (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, code: "bad_request", message: message.into() }
    }

    /// What the request names does not exist (404).
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, code, message: message.into() }
    }

    /// The request conflicts with how the server is set up (409).
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::CONFLICT, code, message: message.into() }
    }

    /// The request lacks the bearer token the route needs (401).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::UNAUTHORIZED, code: "unauthorized", message: message.into() }
    }

    /// The route is switched off by configuration (403).
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::FORBIDDEN, code, message: message.into() }
    }

    /// A query's `wait_for` positions were not reached in time (504).
    pub fn timeout(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::GATEWAY_TIMEOUT, code: "wait_timeout", message: message.into() }
    }

    /// The server failed: logged in full, reported briefly (500 or 503).
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: format!("{context} failed; see the server log"),
        }
    }

    /// Storage refused a write (disk full, I/O error): try again later (503).
    pub fn unavailable(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "storage_unavailable",
            message: format!("{context}: {error}"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = super::dto::ErrorBody {
            error: super::dto::ErrorDetail { code: self.code.to_owned(), message: self.message },
        };
        (self.status, Json(body)).into_response()
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
