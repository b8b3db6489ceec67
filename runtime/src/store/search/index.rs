//! The open tantivy indexes of a projection.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy};

use super::schema::IndexSchema;

/// One open tantivy index.
pub struct OpenIndex {
    pub schema: IndexSchema,
    pub index: Index,
    pub reader: IndexReader,
    pub(super) writer: Mutex<IndexWriter>,
}

/// Errors of the search side.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("tantivy: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    #[error("{0}")]
    Store(#[from] crate::store::Error),
    #[error("opening index directory: {0}")]
    Dir(#[from] tantivy::directory::error::OpenDirectoryError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl OpenIndex {
    /// Open (or create) the index of `schema` in `dir`.
    pub fn open(dir: &Path, schema: IndexSchema) -> Result<Self, SearchError> {
        std::fs::create_dir_all(dir)?;
        let directory = tantivy::directory::MmapDirectory::open(dir)?;
        let index = Index::open_or_create(directory, schema.schema.clone())?;
        // One indexing thread: the projector needs the other core.
        let writer = index.writer_with_num_threads(1, 64 << 20)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        Ok(OpenIndex { schema, index, reader, writer: Mutex::new(writer) })
    }

    /// The outbox sequence of the last tantivy commit.
    pub fn committed_sequence(&self) -> Result<u64, SearchError> {
        let metas = self.index.load_metas()?;
        Ok(metas.payload.and_then(|p| p.parse().ok()).unwrap_or(0))
    }
}

/// The search indexes of one projection and how far they are applied.
pub struct Indexes {
    pub open: BTreeMap<String, OpenIndex>,
    /// The outbox sequence all indexes have committed.
    pub applied: AtomicU64,
}

impl Indexes {
    /// Open every index in `schemas` under `dir/<index>`.
    pub fn open(dir: &Path, schemas: &BTreeMap<String, IndexSchema>) -> Result<Self, SearchError> {
        let mut open = BTreeMap::new();
        for (name, schema) in schemas {
            open.insert(name.clone(), OpenIndex::open(&dir.join(name), schema.clone())?);
        }
        let applied = open.values().map(OpenIndex::committed_sequence).collect::<Result<Vec<_>, _>>()?;
        let applied = applied.into_iter().min().unwrap_or(0);
        Ok(Indexes { open, applied: AtomicU64::new(applied) })
    }
}
