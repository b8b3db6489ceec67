//! Where a projection stands in its streams: a [`Checkpoint`] per partition
//! as the read model stores it, and the same as a [`Cursor`] to read from.
//! Sources, the projector and the store all speak these; this module
//! depends on none of them. [`CheckpointStore`] is how a source reads the
//! checkpoints the store keeps without knowing the store.

use std::collections::BTreeMap;

use serde::Serialize;

/// How far a projection has read one source partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    pub stream: String,
    pub partition: u32,
    /// The offset of the next event to handle.
    pub next_offset: u64,
}

/// Per (stream, partition): the offset of the next event to read.
pub type Cursor = BTreeMap<(String, u32), u64>;

/// `checkpoints` as a cursor.
pub fn cursor(checkpoints: impl IntoIterator<Item = Checkpoint>) -> Cursor {
    checkpoints.into_iter().map(|c| ((c.stream, c.partition), c.next_offset)).collect()
}

/// Where durable checkpoints are read from: the read model, for a source
/// that reports them back to the system it reads (Kafka's consumer group).
/// A trait so that sources depend on this module, not on the store.
pub trait CheckpointStore: Send + Sync {
    /// Every partition's checkpoint as of the last commit.
    fn durable_checkpoints(&self) -> Result<Vec<Checkpoint>, String>;
}

/// `cursor` as checkpoints, in (stream, partition) order.
pub fn checkpoints(cursor: Cursor) -> Vec<Checkpoint> {
    cursor.into_iter().map(|((stream, partition), next_offset)| Checkpoint { stream, partition, next_offset }).collect()
}
