//! Bearer tokens: the admin token guards every mutating route, the query
//! token (when set) every query. `/` (the console page), `/healthz` and
//! `/openapi.json` are always open.
//!
//! Without an admin token, appends stay open (a local, zero-configuration
//! setup) but routes that change what code runs or what is served (plugin
//! uploads, rebuilds) are off.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::config::AuthConfig;

/// Routes that change what code runs or what is served: never open without an admin token.
const ADMIN_ONLY: [&str; 2] = ["/v1/plugins", "/v1/projections"];

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Compare without stopping at the first difference (no timing hint).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let auth = &state.http.auth;
    match check(auth, request.method(), request.uri().path(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => {
            // Read what the client is sending (within the body limit, without
            // keeping it), so that it gets the JSON error rather than a
            // connection reset mid-upload.
            super::guard::discard(request.into_body(), state.http.limits.max_body_bytes()).await;
            e.into_response()
        }
    }
}

fn check(auth: &AuthConfig, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    // The console page holds no data: it asks for it with the user's token.
    if path == "/" || path == "/healthz" || path == "/openapi.json" {
        return Ok(());
    }
    let presented = bearer(headers);
    let admin = auth.admin_token.as_deref();
    let is_admin = |p: Option<&str>| matches!((p, admin), (Some(p), Some(a)) if same(p, a));
    if !matches!(*method, Method::GET | Method::HEAD) {
        return match admin {
            Some(_) if is_admin(presented) => Ok(()),
            Some(_) => Err(ApiError::unauthorized(format!(
                "{method} {path} needs the admin token: send `Authorization: Bearer <admin token>`"
            ))),
            None if ADMIN_ONLY.iter().any(|p| path.starts_with(p)) => Err(ApiError::forbidden(
                "admin_disabled",
                "plugin uploads and rebuilds are off: set auth.admin-token in refract.yaml or REFRACT_ADMIN_TOKEN",
            )),
            None => Ok(()),
        };
    }
    match auth.query_token.as_deref() {
        Some(q) if presented.is_some_and(|p| same(p, q)) || is_admin(presented) => Ok(()),
        Some(_) => {
            Err(ApiError::unauthorized("queries need the query token: send `Authorization: Bearer <query token>`"))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abcdefgh12345678", "abcdefgh12345678"));
        assert!(!same("abcdefgh12345678", "abcdefgh12345679"));
        assert!(!same("abc", "abcd"));
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer  tok ".parse().unwrap());
        assert_eq!(bearer(&headers), Some("tok"));
    }
}
