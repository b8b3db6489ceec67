//! Which events a worker handles as history (a rebuild replaying what the
//! live generation already published), so that what the plugin emits for
//! them is dropped.

use std::sync::Arc;

use crate::position::Cursor;

/// Which events replay history, so that what the plugin emits for them is
/// dropped (it was published when the history was new).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Replay {
    /// Nothing is a replay: everything emitted is published.
    #[default]
    Live,
    /// Everything is (a rebuild catching up while another generation is live).
    All,
    /// Events before these positions are (a rebuild taking over from a
    /// generation that stopped there).
    Before(Cursor),
    /// Everything is, and the reader holds back whatever lies at or after
    /// these positions: a rebuild catching up never runs ahead of the live
    /// generation (the rebuild monitor moves them to its checkpoints), so no
    /// event is ever handled as history by one generation without being
    /// handled live by the other. Except the events the live generation
    /// dead-lettered (the second field): nothing was ever emitted for them,
    /// so what the new version emits for them is published.
    Until(Cursor, Failed),
    /// A standby copy of a shard: every event is another copy's to publish
    /// for, so what the plugin emits is kept, but the relay holds it
    /// (`sink::handover`) until the active copy has published it or this
    /// copy takes the shard on. Like history, it runs in the background.
    Standby,
}

/// Positions (stream, partition, offset) of the live generation's dead letters.
pub type Failed = Arc<std::collections::BTreeSet<(String, u32, u64)>>;

impl Replay {
    /// Replaying history up to a gate (a rebuild before its switch).
    pub(super) fn is_history(&self) -> bool {
        matches!(self, Replay::All | Replay::Until(..) | Replay::Standby)
    }

    pub(super) fn covers(&self, e: &crate::plugin::Event) -> bool {
        match self {
            Replay::Live | Replay::Standby => false,
            Replay::All => true,
            Replay::Until(_, failed) => {
                failed.is_empty() || !failed.contains(&(e.stream.clone(), e.partition, e.offset))
            }
            Replay::Before(h) => h.get(&(e.stream.clone(), e.partition)).is_some_and(|until| e.offset < *until),
        }
    }
}
