//! Prometheus metrics, served as `GET /metrics` in the text exposition format.
//!
//! Most figures already exist for the status API (the read model's counters,
//! checkpoints and heads, rebuild progress, hot-swap counts) and are read when
//! scraped. What only exists as it happens is counted in [`crate::telemetry`]
//! (batch latency, requests per route, compile-cache lookups); this module
//! only renders.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::telemetry::{Histogram, HttpMetrics};

/// `name_bucket`, `name_sum` and `name_count` lines of `h` with `labels`.
fn histogram(out: &mut String, h: &Histogram, name: &str, labels: &str) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, cumulative) in h.cumulative() {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count());
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum());
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count());
}

fn http(out: &mut String, metrics: &HttpMetrics) {
    header(out, "refract_http_requests_total", "counter", "HTTP requests by method, route and status");
    for ((method, route, status), n) in metrics.requests() {
        let _ = writeln!(
            out,
            "refract_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
        );
    }
    header(out, "refract_http_request_duration_seconds", "histogram", "HTTP request latency by route");
    for ((method, route), h) in metrics.latency() {
        let labels = format!("method=\"{method}\",route=\"{route}\"");
        histogram(out, &h, "refract_http_request_duration_seconds", &labels);
    }
}

/// Key lookups of partitioned projections, by how their shard was found.
pub fn lookups(out: &mut String, lookups: &crate::telemetry::LookupMetrics) {
    header(
        out,
        "refract_key_lookups_total",
        "counter",
        "key lookups of partitioned projections: asked the key's shard (owner), every shard, or the key's shard then every shard (misrouted: another shard held it)",
    );
    for ((projection, table, route), n) in lookups.counts() {
        let (projection, table, route) = (label(&projection), label(&table), route.label());
        let _ = writeln!(
            out,
            "refract_key_lookups_total{{projection=\"{projection}\",table=\"{table}\",route=\"{route}\"}} {n}"
        );
    }
}

fn compile_cache(out: &mut String, (hits, misses): (u64, u64)) {
    header(out, "refract_compile_cache_hits_total", "counter", "components loaded from the compile cache");
    let _ = writeln!(out, "refract_compile_cache_hits_total {hits}");
    header(out, "refract_compile_cache_misses_total", "counter", "components compiled (not in the cache)");
    let _ = writeln!(out, "refract_compile_cache_misses_total {misses}");
}

/// A family of one sample per label set: (name, type, help), then (labels, value) rows.
fn family(out: &mut String, (name, kind, help): (&str, &str, &str), rows: impl Iterator<Item = (String, f64)>) {
    header(out, name, kind, help);
    for (labels, value) in rows {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// The members of the control topic as this instance sees them (`cluster:`).
pub fn cluster(out: &mut String, view: &crate::cluster::ClusterView) {
    let live = view.members.iter().filter(|m| m.live).count();
    family(
        out,
        ("refract_cluster_members", "gauge", "instances on the control topic, live or silent for three intervals"),
        [("live=\"true\"".to_owned(), live as f64), ("live=\"false\"".to_owned(), (view.members.len() - live) as f64)]
            .into_iter(),
    );
    family(
        out,
        ("refract_cluster_member_silent_seconds", "gauge", "per instance: since its last announcement"),
        view.members
            .iter()
            .map(|m| (format!("instance=\"{}\"", label(&m.announcement.instance)), m.silent_ms as f64 / 1000.0)),
    );
}

/// `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value, escaped as the exposition format wants.
pub fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Every metric, for `GET /metrics`.
pub fn render(rt: &crate::runtime::Runtime, http_metrics: &HttpMetrics) -> String {
    let mut out = String::new();
    let mut statuses = Vec::new();
    for p in rt.projections() {
        match rt.status(&p) {
            Ok(status) => statuses.push((p, status)),
            Err(e) => tracing::warn!(error = %e, "reading a status for /metrics"),
        }
    }
    // One metric family at a time, each over every projection.
    type Value = fn(&crate::runtime::ProjectionStatus) -> Option<f64>;
    let families: [(&str, &str, &str, Value); 14] = [
        (
            "refract_events_applied_total",
            "counter",
            "events applied (handed to the plugin or skipped as unsubscribed)",
            |s| Some(s.counters.events_applied as f64),
        ),
        ("refract_dead_letters_total", "counter", "events dead-lettered", |s| Some(s.counters.dead_letters as f64)),
        ("refract_batches_total", "counter", "transactions committed", |s| Some(s.counters.batches as f64)),
        ("refract_unrouted_outputs_total", "counter", "enricher outputs no route took", |s| {
            Some(s.counters.unrouted_outputs as f64)
        }),
        ("refract_lag_events", "gauge", "events in the subscribed partitions not yet handled", |s| Some(s.lag as f64)),
        ("refract_plugin_seconds_total", "counter", "time spent inside the plugin", |s| {
            Some(s.worker.metrics.plugin_seconds)
        }),
        ("refract_storage_seconds_total", "counter", "time spent committing to the read model", |s| {
            Some(s.worker.metrics.storage_seconds)
        }),
        ("refract_plugin_reloads_total", "counter", "new plugin versions swapped in since the start", |s| {
            Some(f64::from(s.worker.reloads))
        }),
        ("refract_generation", "gauge", "the live generation of the read model", |s| Some(s.generation as f64)),
        ("refract_rebuild_running", "gauge", "1 while a rebuild runs", |s| {
            Some(if s.rebuild.is_some() { 1.0 } else { 0.0 })
        }),
        ("refract_rebuild_replayed_events", "gauge", "events a running rebuild has replayed", |s| {
            s.rebuild.as_ref().map(|r| r.replayed as f64)
        }),
        (
            "refract_rebuild_target_events",
            "gauge",
            "where the live generation is, which a running rebuild must reach",
            |s| s.rebuild.as_ref().map(|r| r.target as f64),
        ),
        ("refract_emitted_events_total", "counter", "events the plugin emitted (committed)", |s| {
            Some(s.emitted.events as f64)
        }),
        ("refract_emitted_lag_events", "gauge", "emitted events not yet published", |s| Some(s.emitted.lag as f64)),
    ];
    for (name, kind, help, value) in families {
        header(&mut out, name, kind, help);
        for (_, s) in &statuses {
            if let Some(v) = value(s) {
                let _ = writeln!(out, "{name}{{projection=\"{}\",kind=\"{}\"}} {v}", label(&s.name), kind_of(s));
            }
        }
    }
    header(&mut out, "refract_up", "gauge", "1 for the worker's current state (running, retrying, paused, stopped)");
    for (_, s) in &statuses {
        use crate::projector::WorkerState as W;
        for (state, name) in
            [(W::Running, "running"), (W::Retrying, "retrying"), (W::Paused, "paused"), (W::Stopped, "stopped")]
        {
            let now = u8::from(s.worker.state == state);
            let _ = writeln!(out, "refract_up{{projection=\"{}\",state=\"{name}\"}} {now}", label(&s.name));
        }
    }
    header(
        &mut out,
        "refract_plugin_reload_failures_total",
        "counter",
        "plugin versions refused (compile, instantiate, manifest, checks)",
    );
    for (p, s) in &statuses {
        let _ = writeln!(
            out,
            "refract_plugin_reload_failures_total{{projection=\"{}\"}} {}",
            label(&s.name),
            p.reload_failures.load(Ordering::Relaxed)
        );
    }
    // Each family's lines together, as the exposition format requires.
    let partitions = || {
        statuses.iter().flat_map(|(_, s)| {
            s.partitions.iter().map(move |p| {
                let labels = format!(
                    "projection=\"{}\",stream=\"{}\",partition=\"{}\"",
                    label(&s.name),
                    label(&p.stream),
                    p.partition
                );
                (labels, p)
            })
        })
    };
    family(
        &mut out,
        ("refract_partition_lag_events", "gauge", "per partition: events not yet handled"),
        partitions().map(|(l, p)| (l, p.lag as f64)),
    );
    family(
        &mut out,
        ("refract_partition_checkpoint", "gauge", "per partition: the next offset to handle"),
        partitions().map(|(l, p)| (l, p.checkpoint as f64)),
    );
    // Shards of partitioned projections that run here.
    let shards = || {
        statuses.iter().flat_map(|(_, s)| {
            s.shards.iter().map(move |sh| {
                let role = match sh.role {
                    crate::runtime::ShardRole::Active => "active",
                    crate::runtime::ShardRole::Standby => "standby",
                };
                (format!("projection=\"{}\",shard=\"{}\",role=\"{role}\"", label(&s.name), sh.shard), sh)
            })
        })
    };
    if shards().next().is_some() {
        family(
            &mut out,
            (
                "refract_shard_ready",
                "gauge",
                "per shard running here: 1 once it answers queries, 0 while it is restored",
            ),
            shards().map(|(l, sh)| (l, if sh.ready { 1.0 } else { 0.0 })),
        );
        family(
            &mut out,
            ("refract_shard_lag_events", "gauge", "per shard running here: events in its partitions not yet handled"),
            shards().map(|(l, sh)| (l, sh.lag as f64)),
        );
        family(
            &mut out,
            (
                "refract_shard_restore_remaining_events",
                "gauge",
                "per shard being restored: events left before it answers",
            ),
            shards()
                .filter_map(|(l, sh)| sh.restoring.as_ref().map(|r| (l, r.total.saturating_sub(r.restored) as f64))),
        );
    }
    let indexes = || {
        statuses.iter().flat_map(|(_, s)| {
            s.indexes
                .iter()
                .map(move |i| (format!("projection=\"{}\",index=\"{}\"", label(&s.name), label(&i.name)), i))
        })
    };
    family(
        &mut out,
        ("refract_index_lag_documents", "gauge", "document changes committed to the tables, not yet searchable"),
        indexes().map(|(l, i)| (l, i.lag as f64)),
    );
    family(
        &mut out,
        ("refract_index_documents", "gauge", "documents in the search index"),
        indexes().map(|(l, i)| (l, i.documents as f64)),
    );
    header(
        &mut out,
        "refract_batch_duration_seconds",
        "histogram",
        "from a transaction's start to its commit being durable",
    );
    for (_, s) in &statuses {
        let labels = format!("projection=\"{}\"", label(&s.name));
        histogram(&mut out, &s.worker.metrics.batch_seconds, "refract_batch_duration_seconds", &labels);
    }
    http(&mut out, http_metrics);
    compile_cache(&mut out, rt.compile_cache_lookups());
    out
}

fn kind_of(s: &crate::runtime::ProjectionStatus) -> &'static str {
    match s.plugin.kind {
        crate::plugin::Kind::Projection => "projection",
        crate::plugin::Kind::Enricher => "enricher",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let mut h = Histogram::default();
        for ms in [0.2, 3.0, 3.0, 700.0, 20_000.0] {
            h.observe(Duration::from_secs_f64(ms / 1000.0));
        }
        let mut out = String::new();
        histogram(&mut out, &h, "x_seconds", "p=\"a\"");
        assert!(out.contains("x_seconds_bucket{p=\"a\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{p=\"a\",le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{p=\"a\",le=\"1\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{p=\"a\",le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_seconds_count{p=\"a\"} 5\n"), "{out}");
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
