//! Full-text search over a projection's indexes.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use super::extract::{Path, Query};

use super::consistency::{self, Consistency};
use super::{ApiError, page_limit};
use crate::runtime::Runtime;
use crate::store::search::{QueryError, SearchRequest, SearchResponse};

/// The deepest page a search may ask for (`offset` + `limit`).
const MAX_WINDOW: usize = 10_000;

pub(super) async fn search(
    State(rt): State<Arc<Runtime>>,
    Path((name, index)): Path<(String, String)>,
    Query(request): Query<SearchRequest>,
    Query(wait): Query<Consistency>,
) -> Result<Json<SearchResponse>, ApiError> {
    let limit = page_limit(request.limit)?;
    if request.offset + limit > MAX_WINDOW {
        return Err(ApiError::bad_request(format!("offset + limit must be at most {MAX_WINDOW}")));
    }
    let projection = super::projections::find(&rt, &name)?;
    let live = projection.live();
    if !live.indexes.open.contains_key(&index) {
        let known: Vec<&String> = live.indexes.open.keys().collect();
        return Err(ApiError::not_found(
            "index_not_found",
            format!("projection {name:?} has no index {index:?}; it has {known:?}"),
        ));
    }
    consistency::wait(&rt, &projection, &wait, true).await?;
    let response = super::run_blocking("searching", move || live.indexes.open[&index].search(&request, limit))
        .await?
        .map_err(|e| match e {
        QueryError::Invalid(m) => ApiError::bad_request(m),
        other => ApiError::internal("searching", other),
    })?;
    Ok(Json(response))
}
