//! What Refract measures as it happens, in plain types with no dependencies:
//! a worker's batch timings ([`BatchMetrics`], kept in its status), requests
//! per route ([`HttpMetrics`]) and compile-cache lookups ([`CacheCounters`],
//! owned by the cache). [`crate::metrics`] renders them for Prometheus.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds (then `+Inf`).
pub const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A latency histogram with [`BUCKETS`].
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative), then the overflow.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| s <= *b).unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Add `other`'s observations (another shard's, say) to these.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.sum += other.sum;
    }

    /// The sum of the observations, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// (upper bound, observations at or below it) per bucket of [`BUCKETS`].
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        BUCKETS.iter().zip(self.counts.iter()).scan(0, |total, (bound, n)| {
            *total += n;
            Some((*bound, *total))
        })
    }
}

/// What a worker measures as it goes (kept in its status, under its lock).
#[derive(Debug, Clone, Default)]
pub struct BatchMetrics {
    /// From the start of a transaction to its commit being durable.
    pub batch_seconds: Histogram,
    /// Inside the plugin (calls to `handle`/`enrich`, instantiation included).
    pub plugin_seconds: f64,
    /// Committing to the read model.
    pub storage_seconds: f64,
}

impl BatchMetrics {
    /// Add `other`'s measurements (another shard's worker) to these.
    pub fn merge(&mut self, other: &BatchMetrics) {
        self.batch_seconds.merge(&other.batch_seconds);
        self.plugin_seconds += other.plugin_seconds;
        self.storage_seconds += other.storage_seconds;
    }
}

/// Requests and their latency per route template.
#[derive(Default)]
pub struct HttpMetrics {
    /// (method, route, status) → requests.
    requests: Mutex<BTreeMap<(String, &'static str, u16), u64>>,
    /// (method, route) → latency.
    latency: Mutex<BTreeMap<(String, &'static str), Histogram>>,
}

impl HttpMetrics {
    pub fn record(&self, method: &str, route: &'static str, status: u16, took: Duration) {
        *self.requests.lock().expect("metrics lock").entry((method.to_owned(), route, status)).or_default() += 1;
        self.latency.lock().expect("metrics lock").entry((method.to_owned(), route)).or_default().observe(took);
    }

    /// (method, route, status) → requests, so far.
    pub fn requests(&self) -> BTreeMap<(String, &'static str, u16), u64> {
        self.requests.lock().expect("metrics lock").clone()
    }

    /// (method, route) → latency, so far.
    pub fn latency(&self) -> BTreeMap<(String, &'static str), Histogram> {
        self.latency.lock().expect("metrics lock").clone()
    }
}

/// How a key lookup of a partitioned projection found its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LookupRoute {
    /// The table is keyed like the events: only the shard of the key's
    /// partition was asked, and held it.
    Owner,
    /// The table is not keyed: every shard was asked.
    EveryShard,
    /// The key's shard did not hold it, so every shard was asked; none did.
    OwnerThenEveryShard,
    /// The key's shard did not hold it and another did: the table is not
    /// keyed as declared, or the producer partitions by another hash.
    Misrouted,
}

impl LookupRoute {
    pub fn label(self) -> &'static str {
        match self {
            LookupRoute::Owner => "owner",
            LookupRoute::EveryShard => "every_shard",
            LookupRoute::OwnerThenEveryShard => "owner_then_every_shard",
            LookupRoute::Misrouted => "misrouted",
        }
    }
}

/// Key lookups of partitioned projections, by projection, table and route.
#[derive(Default)]
pub struct LookupMetrics(Mutex<BTreeMap<(String, String, LookupRoute), u64>>);

impl LookupMetrics {
    /// Count one lookup; returns how many `route` took for that table so far.
    pub fn record(&self, projection: &str, table: &str, route: LookupRoute) -> u64 {
        let mut counts = self.0.lock().expect("metrics lock");
        let n = counts.entry((projection.to_owned(), table.to_owned(), route)).or_default();
        *n += 1;
        *n
    }

    /// (projection, table, route) → lookups, so far.
    pub fn counts(&self) -> BTreeMap<(String, String, LookupRoute), u64> {
        self.0.lock().expect("metrics lock").clone()
    }
}

/// Lookups in a compile cache.
#[derive(Debug, Default)]
pub struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
}

impl CacheCounters {
    pub fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// (hits, misses) so far.
    pub fn get(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }
}
