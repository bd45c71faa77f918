//! What operators see of a running `watch`: HTTP probes (`/health/live`, `/health/ready`,
//! `/health/startup`) in [`http`], Prometheus metrics in [`metrics`], and systemd notifications
//! (READY, STOPPING, WATCHDOG) in [`notify`]; the outcome of a `batch` run for node_exporter's
//! textfile collector in [`textfile`]. The state behind them ([`Telemetry`]) is what the
//! pipeline reports into; this module knows nothing of the pipeline itself.

mod http;
mod metrics;
mod notify;
pub mod textfile;

pub use http::serve;
pub use metrics::Metrics;
pub use notify::spawn_watchdog;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::db::oplog::OplogWindow;

/// Shared state of the probes and metrics.
#[derive(Debug)]
pub struct Telemetry {
    /// The metrics.
    pub metrics: Metrics,
    registry: Registry,
    started: AtomicBool,
    stream_open: AtomicBool,
    healthy_writes: AtomicBool,
    stopping: AtomicBool,
    /// Unix millis of the last checkpoint save, 0 if none.
    last_checkpoint_ms: AtomicI64,
    /// Unix millis of the position the saved token stands for, 0 if unknown.
    token_time_ms: AtomicI64,
    /// Unix millis of the oldest oplog entry at the last reading, 0 if unknown.
    oplog_first_ms: AtomicI64,
    /// How long the oplog needs to fill up before it drops anything (0: full, or unknown).
    oplog_until_full_ms: AtomicI64,
    reason: Mutex<&'static str>,
    role: Mutex<Role>,
    /// Unix millis since when work has been waiting (a batch received, a failed write to
    /// retry), 0 when none: liveness is about progress on pending work, not about idleness.
    pending_since_ms: AtomicI64,
    /// Unix millis of the last step forward (a batch archived, a retry attempted).
    progress_ms: AtomicI64,
    /// How long pending work may see no progress before the process counts as stuck.
    liveness_timeout_ms: AtomicI64,
    /// Orders archived by the fills of this process.
    fill_orders: AtomicU64,
    /// When systemd was last asked for more start time by a fill (Unix millis).
    fill_extended_ms: AtomicI64,
}

/// How often a fill asks systemd for more start time, at most.
pub const FILL_EXTEND_EVERY: Duration = Duration::from_secs(10);
/// How much more start time it asks for each time: several intervals, so that a slow chunk
/// does not let the start timeout run out while the fill still advances.
pub const FILL_EXTENSION: Duration = Duration::from_secs(90);

/// Whether this process writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The only writer, without a lease (file checkpoints).
    Single,
    /// Holds the lease and writes.
    Leader,
    /// Waits for the lease.
    Standby,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Leader => "leader",
            Role::Standby => "standby",
        }
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Registers every metric.
    pub fn new() -> Self {
        Telemetry::labelled(Vec::new())
    }

    /// Telemetry whose every series carries `labels`: which stream and partition this process
    /// serves, so that the series of several processes on one dashboard can be told apart and
    /// grouped (a leader and its standbys share a stream).
    pub fn labelled(labels: Vec<(String, String)>) -> Self {
        let labels = labels.into_iter().map(|(k, v)| (k.into(), v.into()));
        let mut registry = Registry::with_prefix_and_labels("archiver", labels);
        let metrics = Metrics {
            events_received: Counter::default(),
            orders_archived: Counter::default(),
            orders_already_archived: Counter::default(),
            anomalies: Counter::default(),
            dead_letters: Counter::default(),
            orders_too_large: Counter::default(),
            write_errors: Counter::default(),
            retries: Counter::default(),
            reconnects: Counter::default(),
            history_lost: Counter::default(),
            batches: Counter::default(),
            takeovers: Counter::default(),
            leader: Gauge::default(),
            ready: Gauge::default(),
            batch_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            lag: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            seconds_since_checkpoint: Gauge::default(),
            token_age: Gauge::default(),
            oplog_window: Family::default(),
            oplog_headroom: Family::default(),
            reference_cache_hits: Counter::default(),
            reference_cache_misses: Counter::default(),
            reference_cache_invalidations: Counter::default(),
            reference_cache_entries: Gauge::default(),
            reference_cache_enabled: Gauge::default(),
        };
        metrics.leader.set(1);
        let m = &metrics;
        registry.register("events_received", "Change events received", m.events_received.clone());
        registry.register("orders_archived", "Archive documents created", m.orders_archived.clone());
        registry.register(
            "orders_already_archived",
            "Orders found already archived",
            m.orders_already_archived.clone(),
        );
        registry.register("anomalies", "Archive documents written with anomalies", m.anomalies.clone());
        registry.register("dead_letters", "Orders recorded in the dead-letter collection", m.dead_letters.clone());
        registry.register(
            "orders_too_large",
            "Orders dead-lettered because their archive document exceeds the 16 MiB document limit",
            m.orders_too_large.clone(),
        );
        registry.register("write_errors", "Failed archive writes", m.write_errors.clone());
        registry.register("retries", "Retries after transient errors", m.retries.clone());
        registry.register("reconnects", "Change stream reopenings", m.reconnects.clone());
        registry.register(
            "history_lost",
            "Saved positions found outside the oplog (gap-filled)",
            m.history_lost.clone(),
        );
        registry.register("batches", "Batches archived", m.batches.clone());
        registry.register("takeovers", "Leaderships taken over from another instance", m.takeovers.clone());
        registry.register("leader", "1 when this process writes (leader or single), 0 as a standby", m.leader.clone());
        registry.register("ready", "1 when /health/ready answers 200, 0 otherwise", m.ready.clone());
        registry.register("batch_duration_seconds", "Time to enrich and write a batch", m.batch_duration.clone());
        registry.register("lag_seconds", "Event time to archive write", m.lag.clone());
        registry.register(
            "seconds_since_last_checkpoint",
            "Seconds since the resume token was last saved",
            m.seconds_since_checkpoint.clone(),
        );
        registry.register(
            "resume_token_age_seconds",
            "Age of the position the saved token stands for",
            m.token_age.clone(),
        );
        registry.register("oplog_window_seconds", "Time window of the source oplog", m.oplog_window.clone());
        registry.register(
            "oplog_headroom_seconds",
            "How much longer watch could stop before its saved position leaves the oplog",
            m.oplog_headroom.clone(),
        );
        registry.register(
            "reference_cache_hits",
            "References found in the reference cache",
            m.reference_cache_hits.clone(),
        );
        registry.register(
            "reference_cache_misses",
            "References read from the source (not in the reference cache)",
            m.reference_cache_misses.clone(),
        );
        registry.register(
            "reference_cache_invalidations",
            "Reference cache entries forgotten because their document changed or the stream reopened",
            m.reference_cache_invalidations.clone(),
        );
        registry.register(
            "reference_cache_entries",
            "Entries in the reference cache",
            m.reference_cache_entries.clone(),
        );
        registry.register(
            "reference_cache_enabled",
            "1 when references are kept between batches, 0 when they are read for every batch",
            m.reference_cache_enabled.clone(),
        );
        let build: Family<Vec<(String, String)>, Gauge> = Family::default();
        build.get_or_create(&vec![("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned())]).set(1);
        registry.register("build_info", "Build information", build);
        Telemetry {
            metrics,
            registry,
            started: AtomicBool::new(false),
            stream_open: AtomicBool::new(false),
            healthy_writes: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            last_checkpoint_ms: AtomicI64::new(0),
            token_time_ms: AtomicI64::new(0),
            oplog_first_ms: AtomicI64::new(0),
            oplog_until_full_ms: AtomicI64::new(0),
            reason: Mutex::new("starting"),
            role: Mutex::new(Role::Single),
            pending_since_ms: AtomicI64::new(0),
            progress_ms: AtomicI64::new(0),
            liveness_timeout_ms: AtomicI64::new(120_000),
            fill_orders: AtomicU64::new(0),
            fill_extended_ms: AtomicI64::new(0),
        }
    }

    /// Sets the role shown by the probes and the `archiver_leader` gauge.
    pub fn set_role(&self, role: Role) {
        let previous = std::mem::replace(&mut *self.role.lock().unwrap_or_else(|e| e.into_inner()), role);
        self.metrics.leader.set(i64::from(role != Role::Standby));
        if role == Role::Standby {
            self.started.store(true, Ordering::SeqCst);
            if previous != Role::Standby {
                // A standby that holds its place in the election has started: a service manager
                // waiting for READY=1 (systemd's Type=notify) would otherwise kill it at its
                // start timeout, again and again. The watchdog is pinged as for any idle process.
                notify::send(&[notify::Notice::Ready, notify::Notice::Status("standby: another instance leads")]);
            }
        }
    }

    /// The current role.
    pub fn role(&self) -> Role {
        *self.role.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_reason(&self, reason: &'static str) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// The stream is open: started and ready.
    pub fn stream_opened(&self) {
        self.started.store(true, Ordering::SeqCst);
        self.stream_open.store(true, Ordering::SeqCst);
        self.set_reason("streaming");
        notify::send(&[notify::Notice::Ready, notify::Notice::Status("streaming")]);
    }

    /// A fill (the catch-up before streaming, or a gap-fill) archived `orders` more (0 when it
    /// starts). The process has started (`/health/startup` answers 200: it is up and advancing)
    /// but is not ready (`/health/ready` says "filling"), its progress keeps it live, and systemd
    /// is asked for more start time while it advances (`EXTEND_TIMEOUT_USEC`, every
    /// [`FILL_EXTEND_EVERY`] at most, each for [`FILL_EXTENSION`]): a long fill at start is neither
    /// killed by a start timeout nor by a startup probe, to start over from scratch.
    pub fn fill_progressed(&self, orders: u64) {
        self.started.store(true, Ordering::SeqCst);
        self.stream_open.store(false, Ordering::SeqCst);
        self.set_reason("filling");
        self.progressed();
        let done = self.fill_orders.fetch_add(orders, Ordering::SeqCst) + orders;
        let now = chrono::Utc::now().timestamp_millis();
        let last = self.fill_extended_ms.load(Ordering::SeqCst);
        if orders == 0 || now - last >= FILL_EXTEND_EVERY.as_millis() as i64 {
            self.fill_extended_ms.store(now, Ordering::SeqCst);
            let status = format!("filling: {done} orders archived");
            notify::send(&[
                notify::Notice::ExtendTimeout(FILL_EXTENSION.as_micros() as u32),
                notify::Notice::Status(&status),
            ]);
        }
    }

    /// The stream failed and is being reopened (or the process is filling a gap).
    pub fn stream_lost(&self, reason: &'static str) {
        self.stream_open.store(false, Ordering::SeqCst);
        self.set_reason(reason);
        notify::send(&[notify::Notice::Status(reason)]);
    }

    /// A batch write failed or succeeded.
    pub fn write_result(&self, ok: bool) {
        self.healthy_writes.store(ok, Ordering::SeqCst);
        if !ok {
            self.metrics.write_errors.inc();
        }
    }

    /// A checkpoint was saved for a position at `position_ms` (Unix millis, if known).
    pub fn checkpoint_saved(&self, position_ms: Option<i64>) {
        self.last_checkpoint_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::SeqCst);
        if let Some(ms) = position_ms {
            self.token_time_ms.store(ms, Ordering::SeqCst);
        }
    }

    /// The checkpoint read at the start of a leadership stands for `position_ms` (Unix millis):
    /// its age and oplog headroom are known before the first save.
    pub fn checkpoint_loaded(&self, position_ms: i64) {
        self.token_time_ms.store(position_ms, Ordering::SeqCst);
    }

    /// What the reference cache did since last reported.
    pub fn reference_cache_observed(&self, hits: u64, misses: u64, invalidations: u64, entries: u64) {
        let m = &self.metrics;
        m.reference_cache_hits.inc_by(hits);
        m.reference_cache_misses.inc_by(misses);
        m.reference_cache_invalidations.inc_by(invalidations);
        m.reference_cache_entries.set(entries.min(i64::MAX as u64) as i64);
    }

    /// The source oplog's window was read.
    pub fn oplog_window_read(&self, window: &OplogWindow) {
        self.oplog_first_ms.store(window.first.timestamp_millis(), Ordering::SeqCst);
        self.oplog_until_full_ms.store((window.seconds_until_full() * 1000.0) as i64, Ordering::SeqCst);
        self.metrics.oplog_window.get_or_create(&Vec::new()).set(window.seconds());
    }

    /// The oplog window cannot be read: both oplog gauges are withdrawn.
    pub fn oplog_window_unknown(&self) {
        self.oplog_first_ms.store(0, Ordering::SeqCst);
        self.metrics.oplog_window.clear();
        self.metrics.oplog_headroom.clear();
    }

    /// How much longer the saved position stays in the oplog, in seconds (negative once it has
    /// left it): known to the writer once both the position and the oplog window are; a
    /// standby's last position is not its own any more.
    pub fn oplog_headroom_seconds(&self) -> Option<f64> {
        let first = self.oplog_first_ms.load(Ordering::SeqCst);
        let position = self.token_time_ms.load(Ordering::SeqCst);
        let until_full = self.oplog_until_full_ms.load(Ordering::SeqCst);
        (first != 0 && position != 0 && self.role() != Role::Standby)
            .then(|| (position - first + until_full) as f64 / 1000.0)
    }

    /// Sets how long pending work may go without progress before the process counts as stuck.
    pub fn set_liveness_timeout(&self, timeout: Duration) {
        self.liveness_timeout_ms.store(timeout.as_millis().min(i64::MAX as u128) as i64, Ordering::SeqCst);
    }

    /// Work is waiting to be done (kept from the first call until [`Telemetry::work_done`]).
    pub fn work_pending(&self) {
        let now = chrono::Utc::now().timestamp_millis();
        let _ = self.pending_since_ms.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// A step forward on pending work that did not finish it (a retry attempted).
    pub fn progressed(&self) {
        self.progress_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::SeqCst);
    }

    /// Nothing is waiting any more.
    pub fn work_done(&self) {
        self.progressed();
        self.pending_since_ms.store(0, Ordering::SeqCst);
    }

    /// How long pending work has gone without progress, when that is longer than allowed.
    pub fn stalled_for(&self) -> Option<Duration> {
        let pending_since = self.pending_since_ms.load(Ordering::SeqCst);
        if pending_since == 0 {
            return None;
        }
        let last = pending_since.max(self.progress_ms.load(Ordering::SeqCst));
        let quiet = chrono::Utc::now().timestamp_millis() - last;
        (quiet > self.liveness_timeout_ms.load(Ordering::SeqCst)).then(|| Duration::from_millis(quiet as u64))
    }

    /// Shutting down: not ready any more.
    pub fn stopping(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        self.stream_open.store(false, Ordering::SeqCst);
        self.set_reason("shutting down");
        notify::send(&[notify::Notice::Stopping]);
    }

    /// Ready: stream open, last write fine, not stopping.
    pub fn is_ready(&self) -> (bool, &'static str) {
        let ready = self.stream_open.load(Ordering::SeqCst)
            && self.healthy_writes.load(Ordering::SeqCst)
            && !self.stopping.load(Ordering::SeqCst);
        let reason = *self.reason.lock().unwrap_or_else(|e| e.into_inner());
        (ready, if !ready && reason == "streaming" { "last write failed" } else { reason })
    }

    /// What `/health/ready` answers: a standby is healthy and ready to take over (while not
    /// stopping); any other role is ready as [`Telemetry::is_ready`] says.
    pub fn readiness(&self) -> (bool, &'static str) {
        if self.role() == Role::Standby && !self.stopping.load(Ordering::SeqCst) {
            (true, "ready")
        } else {
            self.is_ready()
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let now = chrono::Utc::now().timestamp_millis();
        let age = |ms: i64| if ms == 0 { f64::NAN } else { (now - ms) as f64 / 1000.0 };
        self.metrics.seconds_since_checkpoint.set(age(self.last_checkpoint_ms.load(Ordering::SeqCst)));
        self.metrics.token_age.set(age(self.token_time_ms.load(Ordering::SeqCst)));
        self.metrics.ready.set(i64::from(self.readiness().0));
        match self.oplog_headroom_seconds() {
            Some(headroom) => {
                self.metrics.oplog_headroom.get_or_create(&Vec::new()).set(headroom);
            }
            None => self.metrics.oplog_headroom.clear(),
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_stream_and_writes() {
        let t = Telemetry::new();
        assert_eq!(t.is_ready(), (false, "starting"));
        t.stream_opened();
        assert!(t.is_ready().0);
        t.write_result(false);
        assert_eq!(t.is_ready(), (false, "last write failed"));
        t.write_result(true);
        t.stream_lost("reconnecting");
        assert_eq!(t.is_ready(), (false, "reconnecting"));
        t.stream_opened();
        t.stopping();
        assert_eq!(t.is_ready(), (false, "shutting down"));
    }

    #[test]
    fn liveness_means_progress_on_pending_work() {
        let t = Telemetry::new();
        t.set_liveness_timeout(Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.stalled_for(), None, "idle is not stalled");
        t.work_pending();
        assert_eq!(t.stalled_for(), None, "just pending");
        std::thread::sleep(Duration::from_millis(80));
        assert!(t.stalled_for().is_some(), "pending without progress");
        t.progressed();
        assert_eq!(t.stalled_for(), None, "a retry is progress");
        std::thread::sleep(Duration::from_millis(80));
        assert!(t.stalled_for().is_some());
        t.work_done();
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.stalled_for(), None, "nothing pending any more");
    }

    #[test]
    fn exposition_names_every_metric() {
        let t = Telemetry::new();
        t.metrics.orders_archived.inc_by(3);
        t.checkpoint_saved(Some(chrono::Utc::now().timestamp_millis() - 2000));
        let first = chrono::Utc::now() - chrono::Duration::hours(1);
        t.oplog_window_read(&OplogWindow { first, last: chrono::Utc::now(), fill: None });
        let text = t.render();
        for name in [
            "archiver_events_received_total",
            "archiver_orders_archived_total 3",
            "archiver_anomalies_total",
            "archiver_dead_letters_total",
            "archiver_orders_too_large_total",
            "archiver_write_errors_total",
            "archiver_retries_total",
            "archiver_reconnects_total",
            "archiver_batches_total",
            "archiver_batch_duration_seconds_bucket",
            "archiver_lag_seconds_bucket",
            "archiver_seconds_since_last_checkpoint",
            "archiver_ready 0",
            "archiver_resume_token_age_seconds",
            "archiver_build_info{version=",
            "archiver_history_lost_total",
            "archiver_oplog_window_seconds ",
            "archiver_oplog_headroom_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn oplog_gauges_are_absent_until_known() {
        let sample = |text: &str, name: &str| {
            text.lines().find(|l| l.starts_with(name)).map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        };
        let t = Telemetry::new();
        let text = t.render();
        assert!(!text.contains("archiver_oplog"), "not even a HELP line before a reading: {text}");

        let first = chrono::Utc::now() - chrono::Duration::hours(2);
        t.oplog_window_read(&OplogWindow { first, last: first + chrono::Duration::hours(2), fill: None });
        let text = t.render();
        assert_eq!(sample(&text, "archiver_oplog_window_seconds"), Some(7200.0), "{text}");
        assert_eq!(sample(&text, "archiver_oplog_headroom_seconds"), None, "no checkpoint yet: {text}");

        t.checkpoint_saved(Some((first + chrono::Duration::minutes(90)).timestamp_millis()));
        assert_eq!(sample(&t.render(), "archiver_oplog_headroom_seconds"), Some(5400.0));
        t.set_role(Role::Standby);
        assert_eq!(sample(&t.render(), "archiver_oplog_headroom_seconds"), None, "a standby's position is stale");
        t.set_role(Role::Leader);
        assert!(sample(&t.render(), "archiver_oplog_headroom_seconds").is_some());

        t.oplog_window_unknown();
        let text = t.render();
        assert_eq!(sample(&text, "archiver_oplog_window_seconds"), None, "{text}");
        assert_eq!(sample(&text, "archiver_oplog_headroom_seconds"), None, "{text}");
    }
}
