//! The projector: one worker per projection, feeding batches of events from
//! its sources to a plugin and committing the effects with the checkpoint.
//!
//! The batch loop of one projection (`worker`):
//!
//! 1. Read events after the checkpoint of each subscribed partition, up to
//!    `max-events`.
//! 2. Hand the subscribed ones to the plugin in calls of `call-events`,
//!    inside one [`crate::store::Batch`]; stop early once `max-duration` has passed, so a
//!    batch grows under load but stays short.
//! 3. Commit the writes and the new checkpoints in one transaction.
//!
//! When a call fails, the batch is dropped (nothing was written) and:
//! - `transient` or host errors: the same events are retried with
//!   exponential back-off and jitter;
//! - `rejected` or a trap: the events are bisected, each half in its own
//!   batch, until the failing event stands alone; it becomes a dead letter
//!   and everything else is applied.
//!
//! The files follow the loop: `options` (sizes and back-off),
//! `control` (the command channel), `read_ahead` (the reader thread),
//! `worker` (the loop), `commit` (the pipelined commit), `recovery`
//! (retries, bisection, dead letters), `replay` (what is history) and
//! `status` (what a worker reports).

mod commit;
mod control;
mod options;
mod read_ahead;
mod recovery;
mod replay;
mod status;
mod worker;

pub use control::{Command, Control, RetryFailure, RetryReport, RetryRequest};
pub use options::{BatchOptions, COMMIT_GROWTH};
pub use recovery::letter_event;
pub use replay::{Failed, Replay};
pub use status::{WorkerState, WorkerStatus};
pub use worker::Projector;

/// A rebuild's threads (replaying history behind the live generation) run at
/// `SCHED_IDLE`: they take only CPU nothing else wants, and give a core up
/// the moment a query or the live worker wakes. At normal priority a waking
/// query thread waited up to a scheduler tick (4 ms) for a core on a busy
/// machine: p99 went from 0.4 to 4 ms during a rebuild; with this, 0.7 ms.
/// The price: on a machine kept fully busy by other work, a rebuild waits.
fn set_background(background: bool) {
    #[cfg(target_os = "linux")]
    {
        let policy = if background { libc::SCHED_IDLE } else { libc::SCHED_OTHER };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: changes the scheduling policy of the calling thread only (pid 0).
        if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not change a thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = background;
}

#[cfg(test)]
mod tests;
