//! The enricher trait: events in, events out.

use crate::{Event, Failure, Manifest, NewEvent};

/// An enricher: turns events into zero or more new events (filter, map,
/// flat-map, join, upcast), keeping any state it needs in [`Table`](crate::Table)s.
/// Implement [`Enricher::enrich`] for one event, or override
/// [`Enricher::enrich_batch`] to work on whole batches. Where the outputs go
/// is the runtime's routing (`plugins.<name>.routes` in `refract.yaml`).
///
/// ```
/// use refract_sdk::{Enricher, Event, Failure, Manifest, NewEvent};
///
/// /// Drops test orders and renames a field on the rest.
/// struct CleanOrders;
///
/// impl Enricher for CleanOrders {
///     fn manifest() -> Manifest {
///         Manifest::new("clean-orders", "1.0.0").subscribe("orders", &[])
///     }
///
///     fn enrich(event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Failure> {
///         let mut data: serde_json::Value = event.json()?;
///         if data["test"] == true {
///             return Ok(()); // filtered out
///         }
///         if let Some(customer) = data.as_object_mut().and_then(|o| o.remove("cust")) {
///             data["customer"] = customer;
///         }
///         out.push(NewEvent::json(&event.event_type, &data)?.derived_from(event));
///         Ok(())
///     }
/// }
///
/// let event = refract_sdk::testing::event("orders", "OrderPlaced", Some("o-1"), br#"{"cust":"c-1"}"#);
/// let outputs = CleanOrders::enrich_batch(vec![event]).unwrap();
/// assert_eq!(outputs[0].data(), br#"{"customer":"c-1"}"#);
/// assert_eq!(outputs[0].key_str(), Some("o-1"));
/// ```
pub trait Enricher {
    /// Describe the enricher: the streams it reads and its state tables.
    fn manifest() -> Manifest;

    /// Enrich one event, pushing its outputs (none to filter it out).
    fn enrich(event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Failure>;

    /// Enrich a batch: the default enriches each event in order. The runtime
    /// commits the batch's outputs and state changes atomically, or none.
    fn enrich_batch(events: Vec<Event>) -> Result<Vec<NewEvent>, Failure> {
        let mut out = Vec::new();
        for event in &events {
            Self::enrich(event, &mut out)?;
        }
        Ok(out)
    }
}
