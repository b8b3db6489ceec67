//! What a plugin declares about itself.

use crate::{Table, wit};

/// What a projection declares about itself: name, versions, the streams and
/// event types it reads, and the tables it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    name: String,
    version: String,
    schema_version: u32,
    subscriptions: Vec<(String, Vec<String>)>,
    tables: Vec<String>,
}

impl Manifest {
    /// A manifest for the projection `name` at plugin version `version`, with
    /// schema version 1, no subscriptions and no tables.
    pub fn new(name: &str, version: &str) -> Self {
        Manifest {
            name: name.to_owned(),
            version: version.to_owned(),
            schema_version: 1,
            subscriptions: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// Set the read model's schema version. Bump it whenever the shape of what
    /// the projection writes changes: the runtime then rebuilds the read model.
    pub fn schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// Read `stream`, delivering only `event_types` (every type when empty).
    pub fn subscribe(mut self, stream: &str, event_types: &[&str]) -> Self {
        let types = event_types.iter().map(|t| (*t).to_owned()).collect();
        self.subscriptions.push((stream.to_owned(), types));
        self
    }

    /// Declare a table the projection writes.
    pub fn table<V>(mut self, table: &Table<V>) -> Self {
        self.tables.push(table.name().to_owned());
        self
    }

    #[doc(hidden)]
    pub fn into_wit(self) -> wit::refract::plugin::types::Manifest {
        use wit::refract::plugin::types as t;
        t::Manifest {
            name: self.name,
            version: self.version,
            schema_version: self.schema_version,
            subscriptions: self
                .subscriptions
                .into_iter()
                .map(|(stream, event_types)| t::Subscription { stream, event_types })
                .collect(),
            tables: self.tables,
        }
    }
}
