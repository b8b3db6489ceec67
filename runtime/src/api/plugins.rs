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
