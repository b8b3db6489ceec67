//! What every handler and middleware of the API shares: the runtime it
//! serves, and the API's own settings and counters, which the runtime does
//! not need to know about.

use std::sync::Arc;

use axum::extract::FromRef;

use crate::cluster::Cluster;
use crate::config::{ApiConfig, AuthConfig, Config};
use crate::runtime::Runtime;
use crate::telemetry::HttpMetrics;

/// The router's state. Handlers that only need the runtime extract
/// `State<Arc<Runtime>>` from it.
#[derive(Clone)]
pub struct AppState {
    pub runtime: Arc<Runtime>,
    /// This instance's membership, when it is in a cluster.
    pub cluster: Option<Arc<Cluster>>,
    pub(super) http: Arc<Http>,
}

/// How many change streams read their logs at once.
const CHANGE_READS: usize = 2;

/// The API's side of the configuration, and what it measures.
pub(super) struct Http {
    /// Bearer tokens, with the environment's applied.
    pub(super) auth: AuthConfig,
    /// Body limit and time limits.
    pub(super) limits: ApiConfig,
    /// Requests per route, for `/metrics`.
    pub(super) metrics: HttpMetrics,
    /// Key lookups of partitioned projections, by how their shard was found.
    pub(super) lookups: crate::telemetry::LookupMetrics,
    /// Asks the other instances of a cluster for their shards' parts of an answer.
    pub(super) peers: ureq::Agent,
    /// Set when the server stops: change streams end, so that the
    /// requests in flight can finish (a client resumes elsewhere or later).
    pub(super) closing: tokio::sync::watch::Sender<bool>,
    /// Change streams reading their logs at once: a few, however many
    /// streams there are, so that a hundred of them do not each hold a
    /// thread (and its allocator's heap) and the cores ingestion needs.
    pub(super) change_reads: Arc<tokio::sync::Semaphore>,
    /// The read models change streams follow, each read once per commit.
    pub(super) feeds: super::changes::Feeds,
}

impl AppState {
    /// The API over `runtime`, set up as `config` says (`auth`, `api`).
    pub fn new(runtime: Arc<Runtime>, config: &Config) -> Self {
        let http = Http {
            auth: config.auth.resolved(),
            limits: config.api.clone(),
            metrics: HttpMetrics::default(),
            lookups: Default::default(),
            peers: super::shards::peers_agent(),
            closing: tokio::sync::watch::channel(false).0,
            change_reads: Arc::new(tokio::sync::Semaphore::new(CHANGE_READS)),
            feeds: Default::default(),
        };
        AppState { runtime, cluster: None, http: Arc::new(http) }
    }

    /// The API of an instance in a cluster: it answers `GET /v1/cluster`.
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// The client other instances are asked with.
    pub(super) fn peers(&self) -> ureq::Agent {
        self.http.peers.clone()
    }

    /// Every metric, as `GET /metrics` serves them.
    pub fn metrics(&self) -> String {
        let mut text = crate::metrics::render(&self.runtime, &self.http.metrics);
        crate::metrics::lookups(&mut text, &self.http.lookups);
        if let Some(cluster) = &self.cluster {
            crate::metrics::cluster(&mut text, &cluster.view());
        }
        text
    }
}

impl FromRef<AppState> for Arc<Runtime> {
    fn from_ref(state: &AppState) -> Self {
        state.runtime.clone()
    }
}
