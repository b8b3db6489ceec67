//! Uploading plugins (admin token required).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;

use super::extract::Path;
use axum::http::StatusCode;

use super::ApiError;
use super::dto::PluginInstalled;
use crate::runtime::{InstallError, Runtime};

/// `GET /v1/projections/{p}/components/{sha256}`: a component of the
/// projection's plugin the runtime keeps by its content hash (a dead
/// letter's `pluginDigest`), as `application/wasm`.
pub(super) async fn component(
    State(rt): State<Arc<Runtime>>,
    Path((projection, digest)): Path<(String, String)>,
) -> Result<([(axum::http::header::HeaderName, &'static str); 1], Vec<u8>), ApiError> {
    let read = tokio::task::spawn_blocking(move || rt.component(&projection, &digest).map(|bytes| (digest, bytes)))
        .await
        .map_err(|e| ApiError::internal("reading a kept component", e))?
        .map_err(|e| ApiError::unavailable("reading a kept component", e))?;
    match read {
        (_, Some(bytes)) => Ok(([(axum::http::header::CONTENT_TYPE, "application/wasm")], bytes)),
        (digest, None) => Err(ApiError::not_found("component_not_found", format!("no component {digest:?} is kept"))),
    }
}

/// `PUT /v1/plugins/{name}`: check the component (compile, instantiate,
/// manifest) and install it as `<plugins-dir>/<name>.wasm`; the watcher
/// then swaps it in (or starts its projection) within a second.
pub(super) async fn upload(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<PluginInstalled>), ApiError> {
    let installing = rt.clone();
    let file = name.clone();
    let manifest = tokio::task::spawn_blocking(move || installing.install_plugin(&file, &body))
        .await
        .map_err(|e| ApiError::internal("installing a plugin", e))?
        .map_err(|e| match e {
            InstallError::Refused(e) => ApiError::bad_request(format!("plugin {name:?} not installed: {e}")),
            InstallError::Storage(e) => ApiError::unavailable(&format!("plugin {name:?} not installed"), e),
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(PluginInstalled {
            plugin: name,
            projection: manifest.name,
            version: manifest.version,
            schema_version: manifest.schema_version,
        }),
    ))
}
