//! Search indexes: mappings turned into tantivy schemas, documents checked
//! against them, and the indexer that applies the outbox to tantivy.
//!
//! Exactly-once indexing, by construction:
//! 1. `search.upsert/delete` go into the batch (coalesced per id); at
//!    commit, one outbox entry per changed document (sequence → index, id and
//!    the document, or its deletion) is written in the batch's redb
//!    transaction ([`super::ReadModel::commit`]).
//! 2. The [`Indexer`] reads outbox entries after the last sequence it
//!    applied, replays them on tantivy (delete by id, then add the current
//!    document if there is one), and commits tantivy with that sequence as
//!    the commit payload, on an interval — never per batch.
//! 3. Then it trims the outbox up to that sequence.
//!
//! After a crash the indexer resumes from the payload of the last tantivy
//! commit. Replaying entries again is harmless: each is a delete by id
//! followed by an add of that version, applied in sequence order, so the
//! last version wins however often the tail is replayed.
//!
//! `schema` compiles mappings and checks documents, `index` holds the
//! open indexes, `indexer` applies the outbox, `query` runs searches.

mod index;
mod indexer;
mod query;
mod schema;

pub use index::{Indexes, OpenIndex, SearchError};
pub use indexer::Indexer;
pub use query::{
    MAX_FACETS, MAX_QUERY_BYTES, MAX_QUERY_DEPTH, QueryError, SearchHit, SearchRequest, SearchResponse, merge,
};
pub use schema::{FieldMapping, FieldType, ID_FIELD, IndexMapping, IndexSchema, SOURCE_FIELD, mapping_change};

#[cfg(test)]
mod tests;
