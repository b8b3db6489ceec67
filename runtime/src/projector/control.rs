//! What the watcher and the API ask of a running worker, through one
//! command channel that the worker waits on together with its batches.

use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use super::replay::Replay;
use crate::plugin::Handler;

/// What the watcher and the API ask of a worker. The worker waits on these
/// and on its batches together, so a command is taken at once, between
/// two batches.
pub enum Command {
    /// Swap in a new version of the plugin: what the old one handled is
    /// committed first, and the new one goes on from there.
    Swap(Box<dyn Handler>),
    /// Hand dead letters to the plugin again.
    RetryDeadLetters(RetryRequest),
    /// End a pause after too many dead letters in a row.
    Resume,
    /// Treat these events as replayed history from the next batch on (a
    /// rebuild moving its gate, or switching to live).
    SetReplay(Replay),
    /// Settle the commit in flight and stop.
    Stop,
}

/// Where to send a worker its [`Command`]s.
#[derive(Clone)]
pub struct Control(pub(super) crossbeam_channel::Sender<Command>);

impl Control {
    /// Ask the worker to run `next` from the next batch on.
    pub fn swap(&self, next: Box<dyn Handler>) {
        self.send(Command::Swap(next));
    }

    /// Ask the worker to retry dead letters; the report comes on `request.reply`.
    pub fn retry(&self, request: RetryRequest) {
        self.send(Command::RetryDeadLetters(request));
    }

    /// Ask the worker to end its pause.
    pub fn resume(&self) {
        self.send(Command::Resume);
    }

    /// Ask the worker to treat `replay` as history from the next batch on.
    pub fn set_replay(&self, replay: Replay) {
        self.send(Command::SetReplay(replay));
    }

    /// Ask the worker to stop after its current batch.
    pub fn stop(&self) {
        self.send(Command::Stop);
    }

    /// A worker that has stopped takes no commands: a swap or a request
    /// sent to it is dropped (a retry's caller sees its reply channel close).
    fn send(&self, command: Command) {
        let _ = self.0.send(command);
    }
}

/// Dead letters to retry (all of them when `ids` is `None`), and where to
/// send what came of it. The worker takes them between batches.
pub struct RetryRequest {
    pub ids: Option<Vec<u64>>,
    pub reply: mpsc::Sender<RetryReport>,
}

/// What a retry of dead letters did.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryReport {
    /// Letters whose events the plugin has now handled: applied and removed.
    pub applied: Vec<u64>,
    /// Letters that failed again (each keeps its event, with the new error).
    pub failed: Vec<RetryFailure>,
    /// Ids asked for that are not dead letters.
    pub missing: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RetryFailure {
    pub id: u64,
    pub error: String,
}
