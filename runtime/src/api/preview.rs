//! Previews of another plugin version (`runtime::preview`): starting one,
//! what promoting it would change, promoting it, discarding it.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::ApiError;
use super::dto::{PreviewDiscarded, PreviewPromoted, RebuildStarted};
use super::extract::{Path, Query};
use super::projections::{find, rebuild_error};
use crate::runtime::{PreviewDiff, Runtime};

/// `POST /v1/projections/{p}/preview`: build the component in the body (none:
/// the plugin file again) beside the live generation; it never switches by itself.
pub(super) async fn start(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<RebuildStarted>), ApiError> {
    find(&rt, &name)?;
    let projection = name.clone();
    let component = (!body.is_empty()).then(|| body.to_vec());
    let started = tokio::task::spawn_blocking(move || rt.preview(&projection, component))
        .await
        .map_err(|e| ApiError::internal("starting a preview", e))?;
    match started {
        Ok(generation) => {
            Ok((StatusCode::ACCEPTED, Json(RebuildStarted { projection: name, generation, preview: true })))
        }
        Err(e) => Err(rebuild_error(&name, e)),
    }
}

/// `?samples=` of the diff: keys shown of each kind per table.
#[derive(Deserialize)]
pub(super) struct DiffQuery {
    samples: Option<usize>,
}

/// Samples of each kind per table when the query names none.
const DEFAULT_SAMPLES: usize = 5;

/// `GET /v1/projections/{p}/preview/diff`: per table, the keys the preview
/// adds, removes and changes against the live generation (with samples);
/// per index, the documents in each.
pub(super) async fn diff(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
    Query(query): Query<DiffQuery>,
) -> Result<Json<PreviewDiff>, ApiError> {
    find(&rt, &name)?;
    let samples = query.samples.unwrap_or(DEFAULT_SAMPLES);
    if samples > crate::runtime::MAX_SAMPLES {
        return Err(ApiError::bad_request(format!("samples is at most {}", crate::runtime::MAX_SAMPLES)));
    }
    let projection = name.clone();
    let compared = tokio::task::spawn_blocking(move || rt.preview_diff(&projection, samples))
        .await
        .map_err(|e| ApiError::internal("comparing a preview", e))?;
    compared.map(Json).map_err(|e| rebuild_error(&name, e))
}

/// `POST /v1/projections/{p}/preview/promote`: the preview becomes the
/// projection's version and switches once caught up, as a rebuild does.
pub(super) async fn promote(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<PreviewPromoted>), ApiError> {
    find(&rt, &name)?;
    let projection = name.clone();
    let promoted = tokio::task::spawn_blocking(move || rt.promote_preview(&projection))
        .await
        .map_err(|e| ApiError::internal("promoting a preview", e))?;
    match promoted {
        Ok(generation) => Ok((StatusCode::ACCEPTED, Json(PreviewPromoted { projection: name, promoted: generation }))),
        Err(e) => Err(rebuild_error(&name, e)),
    }
}

/// `DELETE /v1/projections/{p}/preview`: stop the preview and delete what it built.
pub(super) async fn discard(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
) -> Result<Json<PreviewDiscarded>, ApiError> {
    find(&rt, &name)?;
    let projection = name.clone();
    let discarded = tokio::task::spawn_blocking(move || rt.discard_preview(&projection))
        .await
        .map_err(|e| ApiError::internal("discarding a preview", e))?;
    match discarded {
        Ok(generation) => Ok(Json(PreviewDiscarded { projection: name, discarded: generation })),
        Err(e) => Err(rebuild_error(&name, e)),
    }
}
