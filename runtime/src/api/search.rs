//! Full-text search over a projection's indexes.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use super::extract::{Path, Query};

use super::consistency::{self, Consistency};
use super::{ApiError, page_limit};
use crate::runtime::Runtime;
use crate::store::search::{QueryError, SearchRequest, SearchResponse, merge};

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
    let first = projection.shards()[0].live();
    if !first.indexes.open.contains_key(&index) {
        let known: Vec<&String> = first.indexes.open.keys().collect();
        return Err(ApiError::not_found(
            "index_not_found",
            format!("projection {name:?} has no index {index:?}; it has {known:?}"),
        ));
    }
    consistency::wait(&rt, &projection, &wait, true).await?;
    let shards: Vec<_> = projection.shards().iter().map(|s| s.live()).collect();
    let response = super::run_blocking("searching", move || {
        if let [one] = shards.as_slice() {
            return one.indexes.open[&index].search(&request, limit);
        }
        // Every shard's first offset + limit hits hold the page.
        let each = SearchRequest { offset: 0, ..request.clone() };
        let answers = shards
            .iter()
            .map(|s| s.indexes.open[&index].search(&each, request.offset + limit))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(merge(&request, limit, answers))
    })
    .await?
    .map_err(|e| match e {
        QueryError::Invalid(m) => ApiError::bad_request(m),
        other => ApiError::internal("searching", other),
    })?;
    Ok(Json(response))
}
