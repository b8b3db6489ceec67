//! Full-text search over a projection's indexes.

use axum::Json;
use axum::extract::State;

use super::extract::{Path, Query};

use super::consistency::{self, Consistency};
use super::shards::{Incoming, Partial, Plan};
use super::{ApiError, AppState, page_limit};
use crate::store::search::{QueryError, SearchRequest, SearchResponse, merge};

/// The deepest page a search may ask for (`offset` + `limit`).
const MAX_WINDOW: usize = 10_000;

pub(super) async fn search(
    State(state): State<AppState>,
    Path((name, index)): Path<(String, String)>,
    Query(request): Query<SearchRequest>,
    Query(wait): Query<Consistency>,
    Query(partial): Query<Partial>,
    incoming: Incoming,
) -> Result<(axum::http::HeaderMap, Json<SearchResponse>), ApiError> {
    let limit = page_limit(request.limit)?;
    if request.offset + limit > MAX_WINDOW {
        return Err(ApiError::bad_request(format!("offset + limit must be at most {MAX_WINDOW}")));
    }
    let projection = super::projections::find(&state.runtime, &name)?;
    let known = projection.index_names();
    if !known.contains(&index) {
        return Err(ApiError::not_found(
            "index_not_found",
            format!("projection {name:?} has no index {index:?}; it has {known:?}"),
        ));
    }
    let plan = Plan::allowing_partial(&state, &projection, &incoming, &partial).await?;
    let (state, projection, plan, wait, incoming, request, index) =
        (&state, &projection, &plan, &wait, &incoming, &request, &index);
    let (response, generation) = plan
        .in_one_generation(|| async move {
            let (waited, parts) = tokio::join!(
                consistency::wait(&state.runtime, projection, &plan.local, wait, true),
                plan.ask(state, incoming)
            );
            waited?;
            // Every shard's (and every other instance's) first offset + limit hits
            // hold the page; a part of another instance's search answers just those.
            let mut answers = Vec::new();
            for part in parts? {
                answers.push(part.answer::<SearchResponse>()?);
            }
            let shards: Vec<_> = plan.local.iter().map(|s| s.live()).collect();
            let (merges, part, request, index) = (plan.merges(), plan.part, request.clone(), index.clone());
            super::run_blocking("searching", move || {
                if !merges && let [one] = shards.as_slice() {
                    return one.indexes.open[&index].search(&request, limit);
                }
                let each = SearchRequest { offset: 0, ..request.clone() };
                for shard in &shards {
                    answers.push(shard.indexes.open[&index].search(&each, request.offset + limit)?);
                }
                Ok(if part { merge(&each, request.offset + limit, answers) } else { merge(&request, limit, answers) })
            })
            .await?
            .map_err(|e| match e {
                QueryError::Invalid(m) => ApiError::bad_request(m),
                other => ApiError::internal("searching", other),
            })
        })
        .await?;
    Ok((plan.headers(generation), Json(SearchResponse { missing_shards: plan.missing(), ..response })))
}
