//! The projection trait: events in, tables and indexes out.

use crate::{Event, Failure, IndexMapping, Manifest};

/// A projection: implement [`Projection::apply`] for one event, or override
/// [`Projection::handle`] to work on whole batches.
pub trait Projection {
    /// Describe the projection. Called once when the plugin is loaded.
    fn manifest() -> Manifest;

    /// Apply one event. Return [`Failure::Rejected`] for an event that can
    /// never be applied (it becomes a dead letter) and [`Failure::Transient`]
    /// for a condition worth retrying.
    fn apply(event: &Event) -> Result<(), Failure>;

    /// Apply a batch. The default applies each event in order; the runtime
    /// commits the batch's writes atomically, or none of them.
    fn handle(events: Vec<Event>) -> Result<(), Failure> {
        events.iter().try_for_each(Self::apply)
    }

    /// The search indexes the projection writes through [`Index`](crate::Index); none by default.
    fn indexes() -> Vec<IndexMapping> {
        Vec::new()
    }
}
