//! The projector: one worker per projection, feeding batches of events from
//! the log to a plugin and committing the effects with the checkpoint.

mod worker;

pub use worker::{
    BatchOptions, Failed, Projector, Reload, Replay, Retries, RetryReport, RetryRequest, WorkerState, WorkerStatus,
};
