//! The Prometheus metrics of `watch`, registered once.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// The metrics `watch` updates.
#[derive(Debug)]
pub struct Metrics {
    /// Change events received (after the server-side filter).
    pub events_received: Counter,
    /// Archive documents created.
    pub orders_archived: Counter,
    /// Orders found already archived (replays, overlaps).
    pub orders_already_archived: Counter,
    /// Archive documents written with anomalies.
    pub anomalies: Counter,
    /// Orders recorded in the dead-letter collection.
    pub dead_letters: Counter,
    /// Of those, orders whose archive document exceeds the 16 MiB document limit.
    pub orders_too_large: Counter,
    /// Failed batch writes (each is retried).
    pub write_errors: Counter,
    /// Retries after transient errors.
    pub retries: Counter,
    /// Stream reopenings after an error.
    pub reconnects: Counter,
    /// Times the saved position had fallen out of the oplog.
    pub history_lost: Counter,
    /// Batches archived.
    pub batches: Counter,
    /// Leaderships taken over from another instance.
    pub takeovers: Counter,
    /// References found in the reference cache.
    pub reference_cache_hits: Counter,
    /// References read from the server (not in the cache).
    pub reference_cache_misses: Counter,
    /// Cache entries forgotten because their document changed (or the stream reopened).
    pub reference_cache_invalidations: Counter,
    /// Entries in the reference cache.
    pub reference_cache_entries: Gauge,
    /// 1 when references are kept between batches (the stream carries their changes), 0 when
    /// they are read for every batch (no cache, no privilege to watch the database, views).
    pub reference_cache_enabled: Gauge,
    /// 1 when this process writes (leader or single), 0 as a standby.
    pub leader: Gauge,
    /// 1 when `/health/ready` would answer 200, 0 otherwise: set at each scrape, so that an
    /// alert needs no HTTP probe of its own.
    pub ready: Gauge,
    /// Time to enrich and write a batch.
    pub batch_duration: Histogram,
    /// Event time (cluster wall time) to archive write.
    pub lag: Histogram,
    /// Seconds since the last checkpoint save.
    pub seconds_since_checkpoint: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Age of the position the saved token stands for.
    pub token_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// The source oplog's time window. A family with no label, so that the series is absent
    /// (not 0) until it has been read, and when it cannot be.
    pub oplog_window: Family<Vec<(String, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// How much longer the saved position stays in the oplog; absent while unknown, as above.
    pub oplog_headroom: Family<Vec<(String, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>,
}
