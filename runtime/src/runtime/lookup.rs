//! Plugins' `lookup` capability: reads from other projections' live read models.

use super::Runtime;
use crate::plugin::{Lookup, LookupError, LookupFailure};

/// Serves plugins' `lookup` calls from the live generations of the runtime's projections.
pub(super) struct RuntimeLookup(pub(super) std::sync::Weak<Runtime>);

impl Lookup for RuntimeLookup {
    fn get(&self, projection: &str, table: &str, key: &str) -> Result<Option<Vec<u8>>, LookupFailure> {
        let runtime = self.0.upgrade().ok_or_else(|| LookupFailure::Host("the runtime is shutting down".into()))?;
        let Some(p) = runtime.projection(projection) else {
            let error = LookupError::UnknownProjection(format!("no projection {projection:?} is running"));
            return Err(LookupFailure::Refused(error));
        };
        if !p.manifest().tables.iter().any(|t| t == table) {
            let error = LookupError::UnknownTable(format!("{projection} declares no table {table:?}"));
            return Err(LookupFailure::Refused(error));
        }
        // A partitioned projection's key is in at most one of its shards.
        let mut found = None;
        for shard in p.shards() {
            let value = shard.live().read_model.get(table, key);
            match value.map_err(|e| LookupFailure::Host(format!("lookup in {projection}/{table}: {e}")))? {
                Some(_) if found.is_some() => {
                    return Err(LookupFailure::Host(format!(
                        "lookup in {projection}/{table}: key {key:?} is held by more than one shard"
                    )));
                }
                Some(v) => found = Some(v),
                None => {}
            }
        }
        Ok(found)
    }
}
