//! A counter with a condition variable: writers bump it, readers wait for a change.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Wakes readers when something was written. `wait` returns at the latest
/// after its timeout, so readers can also notice shutdown.
#[derive(Default)]
pub struct Signal {
    writes: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    /// The number of writes so far.
    pub fn current(&self) -> u64 {
        *self.writes.lock().expect("signal lock")
    }

    pub fn notify(&self) {
        *self.writes.lock().expect("signal lock") += 1;
        self.changed.notify_all();
    }

    /// Wait until more than `seen` writes happened, or `timeout` passed.
    pub fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.writes.lock().expect("signal lock");
        let (guard, _) = self.changed.wait_timeout_while(guard, timeout, |n| *n <= seen).expect("signal lock");
        *guard
    }
}
