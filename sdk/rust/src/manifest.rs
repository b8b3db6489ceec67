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
    /// Tables keyed like the events, and the separator that ends the event key.
    keyed: Vec<(String, Option<String>)>,
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
            keyed: Vec::new(),
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

    /// Declare a table whose every key is the key of the events it is
    /// written for (an order's summary under the order's key). On a
    /// partitioned projection (`kafka.mode: partitioned`), a lookup of one
    /// key then asks the one shard that can hold it instead of every shard.
    pub fn keyed_table<V>(self, table: &Table<V>) -> Self {
        self.declare_keyed(table, None)
    }

    /// Declare a table whose every key is the key of the events it is
    /// written for, then `separator`, then anything (`o-17/line-2` for the
    /// events keyed `o-17`, with `"/"`): lookups are routed as for
    /// [`Manifest::keyed_table`].
    pub fn keyed_table_with_separator<V>(self, table: &Table<V>, separator: &str) -> Self {
        self.declare_keyed(table, Some(separator.to_owned()))
    }

    fn declare_keyed<V>(mut self, table: &Table<V>, separator: Option<String>) -> Self {
        self.keyed.push((table.name().to_owned(), separator));
        self.table(table)
    }

    #[doc(hidden)]
    pub fn keyed_into_wit(&self) -> Vec<wit::refract::plugin::types::KeyedTable> {
        let keyed = self.keyed.iter().cloned();
        keyed.map(|(table, separator)| wit::refract::plugin::types::KeyedTable { table, separator }).collect()
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
