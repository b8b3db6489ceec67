//! `{{name}}`: a Refract projection. It counts the events of each type on the
//! `orders` stream; change `manifest` and `apply` to build your read model.

use refract_sdk::{Event, Failure, Manifest, Projection, Table};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Count {
    pub n: u64,
    /// Time (ms) of the last event counted.
    pub last: i64,
}

pub const COUNTS: Table<Count> = Table::new("counts");

pub struct Plugin;

impl Projection for Plugin {
    fn manifest() -> Manifest {
        Manifest::new("{{name}}", env!("CARGO_PKG_VERSION")).subscribe("orders", &[]).table(&COUNTS)
    }

    fn apply(event: &Event) -> Result<(), Failure> {
        let _data: serde_json::Value = event.json()?; // data that is not JSON becomes a dead letter
        let mut count = COUNTS.get(&event.event_type)?.unwrap_or_default();
        count.n += 1;
        count.last = event.time;
        COUNTS.put(&event.event_type, &count)
    }
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_projection!(Plugin);

#[cfg(test)]
mod tests {
    use refract_sdk::native::{MemoryBackend, with_backend};
    use refract_sdk::testing::event;

    use super::*;

    #[test]
    fn counts_events_by_type() {
        let events = vec![
            event("orders", "OrderPlaced", Some("o-1"), br#"{"orderId":"o-1"}"#),
            event("orders", "OrderPlaced", Some("o-2"), br#"{"orderId":"o-2"}"#),
        ];
        let (store, result) = with_backend(MemoryBackend::default(), || Plugin::handle(events));
        result.unwrap();
        assert_eq!(store.get("counts", "OrderPlaced"), Some(br#"{"n":2,"last":0}"#.as_slice()));
    }

    #[test]
    fn data_that_is_not_json_is_rejected() {
        let events = vec![event("orders", "OrderPlaced", None, b"not json")];
        let (_, result) = with_backend(MemoryBackend::default(), || Plugin::handle(events));
        assert!(matches!(result, Err(Failure::Rejected(_))));
    }
}
