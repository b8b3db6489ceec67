//! Where an enricher's outputs go.
//!
//! An enricher returns events; it does not name streams. Routes, set per
//! enricher in `refract.yaml` (`plugins.<name>.routes`), send each output to
//! every stream of every route it matches — by event type and, optionally,
//! exact header values (CloudEvents attributes travel as `ce_*` headers), like
//! a Knative trigger. Without routes, every output goes to the stream named
//! after the enricher. An output no route matches is dropped and counted
//! (`unroutedOutputs` in the status), never silently.
//!
//! Routed outputs are emitted into the batch, so they commit with the
//! enricher's state and checkpoint in one transaction and the relay
//! publishes them exactly once (see `sink.rs`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::HandleError;
use crate::store::Batch;
use crate::wit::{EmitError, Outgoing};

/// One route: which outputs, and the streams they go to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Route {
    /// The event types this route takes; empty: every type.
    #[serde(default)]
    pub types: Vec<String>,
    /// Headers an output must carry, with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The streams matching outputs are appended to.
    pub to: Vec<String>,
}

impl Route {
    fn matches(&self, event: &Outgoing) -> bool {
        (self.types.is_empty() || self.types.contains(&event.event_type))
            && self.headers.iter().all(|(name, value)| event.headers.iter().any(|(n, v)| n == name && v == value))
    }
}

/// An enricher's routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes(Vec<Route>);

impl Routes {
    /// `routes` as configured for `enricher`; none configured: everything to
    /// the stream named `enricher`.
    pub fn new(enricher: &str, routes: &[Route]) -> Result<Self, String> {
        for (i, route) in routes.iter().enumerate() {
            if route.to.is_empty() {
                return Err(format!("route {} of {enricher:?} goes to no stream", i + 1));
            }
            for stream in &route.to {
                crate::names::validate("stream", stream)
                    .map_err(|e| format!("route {} of {enricher:?}: {e}", i + 1))?;
            }
        }
        if routes.is_empty() {
            return Ok(Self::to_own_stream(enricher));
        }
        Ok(Routes(routes.to_vec()))
    }

    /// Every output to the stream named `enricher`.
    pub fn to_own_stream(enricher: &str) -> Self {
        Routes(vec![Route { types: Vec::new(), headers: BTreeMap::new(), to: vec![enricher.to_owned()] }])
    }

    /// The streams `event` goes to: those of every route it matches, each once.
    pub fn targets(&self, event: &Outgoing) -> Vec<&str> {
        let mut targets: Vec<&str> = Vec::new();
        for route in self.0.iter().filter(|r| r.matches(event)) {
            for stream in &route.to {
                if !targets.contains(&stream.as_str()) {
                    targets.push(stream);
                }
            }
        }
        targets
    }

    /// Every stream some route sends to.
    pub fn streams(&self) -> Vec<&str> {
        let mut streams: Vec<&str> = self.0.iter().flat_map(|r| r.to.iter().map(String::as_str)).collect();
        streams.sort_unstable();
        streams.dedup();
        streams
    }
}

/// Emit `outputs` into `batch` along `routes`. An output the runtime cannot
/// publish (data not JSON, too large) rejects the batch, so bisection finds
/// the input event that produced it and dead-letters it.
pub fn deliver(batch: &mut Batch, routes: &Routes, outputs: Vec<Outgoing>) -> Result<(), HandleError> {
    for output in outputs {
        let targets = routes.targets(&output);
        let Some((last, rest)) = targets.split_last() else {
            batch.count_unrouted();
            continue;
        };
        let event_type = output.event_type.clone();
        let refused = |e: EmitError| {
            let (EmitError::InvalidStream(m) | EmitError::InvalidEvent(m) | EmitError::TooLarge(m)) = e;
            HandleError::Rejected(format!("output {event_type:?}: {m}"))
        };
        for stream in rest {
            batch.emit(stream, output.clone()).map_err(refused)?;
        }
        batch.emit(last, output).map_err(refused)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(event_type: &str, headers: &[(&str, &str)]) -> Outgoing {
        Outgoing {
            event_type: event_type.into(),
            key: None,
            time: 0,
            headers: headers.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            data: b"{}".to_vec(),
        }
    }

    #[test]
    fn an_output_goes_to_every_matching_route_once() {
        let routes: Vec<Route> = serde_saphyr::from_str(
            "
            - { types: [OrderReadyForShipment], to: [shipping, notifications] }
            - { types: [OrderReadyForShipment, OrderUnpaid], headers: { region: eu }, to: [notifications, eu] }
            - { types: [OrderUnpaid], to: [notifications] }
            ",
        )
        .unwrap();
        let routes = Routes::new("join", &routes).unwrap();
        assert_eq!(routes.targets(&output("OrderReadyForShipment", &[])), ["shipping", "notifications"]);
        assert_eq!(
            routes.targets(&output("OrderReadyForShipment", &[("region", "eu")])),
            ["shipping", "notifications", "eu"]
        );
        assert_eq!(routes.targets(&output("OrderUnpaid", &[("region", "us")])), ["notifications"]);
        assert!(routes.targets(&output("Other", &[])).is_empty());
        assert_eq!(routes.streams(), ["eu", "notifications", "shipping"]);
    }

    #[test]
    fn without_routes_everything_goes_to_the_enricher_s_own_stream() {
        let routes = Routes::new("upcaster", &[]).unwrap();
        assert_eq!(routes.targets(&output("Anything", &[])), ["upcaster"]);
    }

    #[test]
    fn a_route_to_no_stream_or_a_bad_name_is_refused() {
        let empty = Route { types: vec![], headers: BTreeMap::new(), to: vec![] };
        assert!(Routes::new("e", &[empty]).unwrap_err().contains("no stream"));
        let bad = Route { types: vec![], headers: BTreeMap::new(), to: vec!["../x".into()] };
        assert!(Routes::new("e", &[bad]).is_err());
    }
}
