//! What a worker reports: its state, its last error, what it measured.

use serde::{Deserialize, Serialize};

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerState {
    Running,
    /// Waiting to retry after a transient or host failure.
    Retrying,
    /// Stopped consuming after too many dead letters in a row; resumes on
    /// request or when a new plugin version is swapped in.
    Paused,
    Stopped,
}

/// A worker's live status, shared with the HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    pub state: WorkerState,
    pub last_error: Option<String>,
    /// When `last_error` happened (ms since the Unix epoch).
    pub last_error_at: Option<i64>,
    /// Consecutive retries of the current batch.
    pub retries: u32,
    /// New plugin versions swapped in since the worker started.
    pub reloads: u32,
    /// Latency and where the time goes, for `/metrics`.
    #[serde(skip)]
    pub metrics: crate::telemetry::BatchMetrics,
}

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            state: WorkerState::Running,
            last_error: None,
            last_error_at: None,
            retries: 0,
            reloads: 0,
            metrics: Default::default(),
        }
    }
}
