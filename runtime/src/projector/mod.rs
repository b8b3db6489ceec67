//! The projector: one worker per projection, feeding batches of events from
//! the log to a plugin and committing the effects with the checkpoint.

mod worker;

pub use worker::{
    BatchOptions, Command, Control, Failed, Projector, Replay, RetryReport, RetryRequest, WorkerState, WorkerStatus,
};
