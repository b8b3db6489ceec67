//! A counter with a condition variable: writers bump it, readers wait for a change.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Wakes readers when something was written. `wait` returns at the latest
/// after its timeout, so readers can also notice shutdown; async readers
/// (change streams) [`Signal::watch`] it instead.
pub struct Signal {
    writes: Mutex<u64>,
    changed: Condvar,
    watched: tokio::sync::watch::Sender<u64>,
}

impl Default for Signal {
    fn default() -> Self {
        Signal { writes: Mutex::new(0), changed: Condvar::new(), watched: tokio::sync::watch::channel(0).0 }
    }
}

impl Signal {
    /// The number of writes so far.
    pub fn current(&self) -> u64 {
        *self.writes.lock().expect("signal lock")
    }

    pub fn notify(&self) {
        let mut writes = self.writes.lock().expect("signal lock");
        *writes += 1;
        self.changed.notify_all();
        self.watched.send_replace(*writes);
    }

    /// A receiver that sees the count change, for async readers.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.watched.subscribe()
    }

    /// Wait until more than `seen` writes happened, or `timeout` passed.
    pub fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.writes.lock().expect("signal lock");
        let (guard, _) = self.changed.wait_timeout_while(guard, timeout, |n| *n <= seen).expect("signal lock");
        *guard
    }
}
