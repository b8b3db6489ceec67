//! `{{name}}`: a Refract enricher. It reads `OrderPlaced` from `orders` and
//! emits `LargeOrderPlaced` for orders whose total reaches the `threshold`
//! setting (default 100); route its output in refract.yaml
//! (`plugins.{{name}}.routes`), else it goes to the stream `{{name}}`.

use refract_sdk::{Enricher, Event, Failure, Manifest, NewEvent, setting_or};

pub struct Plugin;

impl Enricher for Plugin {
    fn manifest() -> Manifest {
        Manifest::new("{{name}}", env!("CARGO_PKG_VERSION")).subscribe("orders", &["OrderPlaced"])
    }

    fn enrich(event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Failure> {
        let order: serde_json::Value = event.json()?;
        let threshold: f64 = setting_or("threshold", 100.0)?;
        if order["total"].as_f64().unwrap_or(0.0) >= threshold {
            out.push(NewEvent::json("LargeOrderPlaced", &order)?.derived_from(event));
        }
        Ok(())
    }
}

#[cfg(target_arch = "wasm32")]
refract_sdk::export_enricher!(Plugin);

#[cfg(test)]
mod tests {
    use refract_sdk::native::{MemoryBackend, with_backend};
    use refract_sdk::testing::event;

    use super::*;

    #[test]
    fn only_large_orders_pass() {
        let events = vec![
            event("orders", "OrderPlaced", Some("o-1"), br#"{"orderId":"o-1","total":250}"#),
            event("orders", "OrderPlaced", Some("o-2"), br#"{"orderId":"o-2","total":20}"#),
        ];
        let (_, out) = with_backend(MemoryBackend::default(), || Plugin::enrich_batch(events));
        let out = out.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].event_type(), out[0].key_str()), ("LargeOrderPlaced", Some("o-1")));
    }
}
