//! How a worker sizes its batches and retries failures.

use std::time::Duration;

use crate::clock::Backoff;
use crate::store::KvLimits;

/// How much larger than its catch-up size a batch may grow while the
/// previous batch is still committing. redb copies every page a commit
/// touches: once a table with scattered keys (order ids) is large, any batch
/// touches most of its leaves and a commit costs about as much for 40,000
/// events as for 160,000, so when commits are the bottleneck, batches grow
/// until they are not. Where commits are cheap (appends, small tables),
/// batches stay at the catch-up size and the stages keep overlapping.
pub const COMMIT_GROWTH: u32 = 4;

/// How batches are sized and failures retried.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// The most events one batch (one transaction) reads.
    pub max_events: usize,
    /// A batch stops taking more calls once it has run this long.
    pub max_duration: Duration,
    /// The most events passed to the plugin in one call.
    pub call_events: usize,
    /// While a projection is behind (its last read filled a batch), batches
    /// take at least this many times `max_events` (or `max_duration`), and
    /// keep growing, up to [`COMMIT_GROWTH`] times more, while the previous
    /// batch is still committing: fewer, larger transactions while it
    /// catches up (a replay, a rebuild, a backlog), whose results nobody sees
    /// sooner anyway. 1 turns both off.
    pub catch_up_factor: u32,
    /// First retry delay after a transient failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub kv: KvLimits,
    /// Pause after this many dead letters in a row (0: never): a plugin that
    /// fails every event stops instead of dead-lettering the whole stream.
    pub pause_after_dead_letters: u64,
    /// Run a rebuild's threads at `SCHED_IDLE` while they replay history
    /// (see `super::set_background`).
    pub background_rebuilds: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_events: 10_000,
            max_duration: Duration::from_millis(250),
            call_events: 500,
            catch_up_factor: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            kv: KvLimits::default(),
            pause_after_dead_letters: 1_000,
            background_rebuilds: true,
        }
    }
}

impl BatchOptions {
    /// The back-off of retries after a failure.
    pub(super) fn backoff(&self) -> Backoff {
        Backoff::new(self.initial_backoff, self.max_backoff)
    }

    /// Whether batches grow while catching up (a factor of 1 turns it off).
    pub(super) fn catches_up(&self) -> bool {
        self.catch_up_factor > 1
    }

    /// A catch-up batch's size and time bound, before it grows.
    pub(super) fn catch_up_bounds(&self) -> (usize, Duration) {
        let factor = self.catch_up_factor.max(1);
        (self.max_events.saturating_mul(factor as usize), self.max_duration.saturating_mul(factor))
    }

    /// The most events a read takes while catching up: a catch-up batch and
    /// its room to grow while the previous one commits (see `process`).
    pub(super) fn catch_up_read(&self) -> usize {
        match self.catches_up() {
            true => self.catch_up_bounds().0.saturating_mul(COMMIT_GROWTH as usize),
            false => self.max_events,
        }
    }
}
