//! What operators see of a running `watch`: HTTP probes (`/health/live`, `/health/ready`,
//! `/health/startup`), Prometheus metrics (`/metrics`), and systemd notifications (READY,
//! STOPPING, WATCHDOG).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

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
    leader: Gauge,
    /// Time to enrich and write a batch.
    pub batch_duration: Histogram,
    /// Event time (cluster wall time) to archive write.
    pub lag: Histogram,
    seconds_since_checkpoint: Gauge<f64, std::sync::atomic::AtomicU64>,
    token_age: Gauge<f64, std::sync::atomic::AtomicU64>,
}

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
    reason: Mutex<&'static str>,
    role: Mutex<Role>,
    /// Unix millis since when work has been waiting (a batch received, a failed write to
    /// retry), 0 when none: liveness is about progress on pending work, not about idleness.
    pending_since_ms: AtomicI64,
    /// Unix millis of the last step forward (a batch archived, a retry attempted).
    progress_ms: AtomicI64,
    /// How long pending work may see no progress before the process counts as stuck.
    liveness_timeout_ms: AtomicI64,
}

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
        let mut registry = Registry::with_prefix("archiver");
        let metrics = Metrics {
            events_received: Counter::default(),
            orders_archived: Counter::default(),
            orders_already_archived: Counter::default(),
            anomalies: Counter::default(),
            dead_letters: Counter::default(),
            write_errors: Counter::default(),
            retries: Counter::default(),
            reconnects: Counter::default(),
            history_lost: Counter::default(),
            batches: Counter::default(),
            takeovers: Counter::default(),
            leader: Gauge::default(),
            batch_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            lag: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            seconds_since_checkpoint: Gauge::default(),
            token_age: Gauge::default(),
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
            reason: Mutex::new("starting"),
            role: Mutex::new(Role::Single),
            pending_since_ms: AtomicI64::new(0),
            progress_ms: AtomicI64::new(0),
            liveness_timeout_ms: AtomicI64::new(120_000),
        }
    }

    /// Sets the role shown by the probes and the `archiver_leader` gauge.
    pub fn set_role(&self, role: Role) {
        *self.role.lock().unwrap_or_else(|e| e.into_inner()) = role;
        self.metrics.leader.set(i64::from(role != Role::Standby));
        if role == Role::Standby {
            self.started.store(true, Ordering::SeqCst);
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
        notify(&[Notice::Ready, Notice::Status("streaming")]);
    }

    /// The stream failed and is being reopened (or the process is filling a gap).
    pub fn stream_lost(&self, reason: &'static str) {
        self.stream_open.store(false, Ordering::SeqCst);
        self.set_reason(reason);
        notify(&[Notice::Status(reason)]);
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
        self.stopping.store(true, Ordering::SeqCst);
        self.stream_open.store(false, Ordering::SeqCst);
        self.set_reason("shutting down");
        notify(&[Notice::Stopping]);
    }

    /// Ready: stream open, last write fine, not stopping.
    pub fn is_ready(&self) -> (bool, &'static str) {
        let ready = self.stream_open.load(Ordering::SeqCst)
            && self.healthy_writes.load(Ordering::SeqCst)
            && !self.stopping.load(Ordering::SeqCst);
        let reason = *self.reason.lock().unwrap_or_else(|e| e.into_inner());
        (ready, if !ready && reason == "streaming" { "last write failed" } else { reason })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let now = chrono::Utc::now().timestamp_millis();
        let age = |ms: i64| if ms == 0 { f64::NAN } else { (now - ms) as f64 / 1000.0 };
        self.metrics.seconds_since_checkpoint.set(age(self.last_checkpoint_ms.load(Ordering::SeqCst)));
        self.metrics.token_age.set(age(self.token_time_ms.load(Ordering::SeqCst)));
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// What is told to the service manager.
#[derive(Debug, Clone, Copy)]
enum Notice<'a> {
    Ready,
    Status(&'a str),
    Stopping,
    Watchdog,
}

/// Tells systemd (through `NOTIFY_SOCKET`; outside systemd, nothing happens).
#[cfg(unix)]
fn notify(notices: &[Notice<'_>]) {
    use sd_notify::NotifyState;
    let states: Vec<NotifyState<'_>> = notices
        .iter()
        .map(|n| match *n {
            Notice::Ready => NotifyState::Ready,
            Notice::Status(s) => NotifyState::Status(s),
            Notice::Stopping => NotifyState::Stopping,
            Notice::Watchdog => NotifyState::Watchdog,
        })
        .collect();
    if let Err(e) = sd_notify::notify(&states) {
        tracing::debug!(error = %e, "systemd notification failed");
    }
}

/// No systemd off Unix (Windows services run under NSSM, which watches the process itself).
#[cfg(not(unix))]
fn notify(_notices: &[Notice<'_>]) {}

/// The systemd watchdog interval, when systemd asked for pings.
#[cfg(unix)]
fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

#[cfg(not(unix))]
fn watchdog_interval() -> Option<Duration> {
    None
}

/// Pings the systemd watchdog at half its interval while the pipeline makes progress: a
/// responsive runtime whose pipeline is stuck on pending work is not alive, and systemd should
/// restart it (the token never passed unarchived work, so a restart loses nothing).
pub fn spawn_watchdog(telemetry: Arc<Telemetry>, shutdown: CancellationToken) {
    let Some(interval) = watchdog_interval() else { return };
    tracing::info!(interval_ms = interval.as_millis() as u64, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval((interval / 2).max(Duration::from_millis(100)));
        let mut warned = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            match telemetry.stalled_for() {
                None => {
                    warned = false;
                    notify(&[Notice::Watchdog]);
                }
                Some(quiet) if !warned => {
                    warned = true;
                    tracing::error!(
                        no_progress_ms = quiet.as_millis() as u64,
                        "the pipeline made no progress on pending work; no longer pinging the watchdog"
                    );
                }
                Some(_) => {}
            }
        }
    });
}

fn status(ok: bool, body: &str) -> Response {
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], format!("{{\"status\":{}}}\n", serde_json::Value::from(body)))
        .into_response()
}

async fn live(State(t): State<Arc<Telemetry>>) -> Response {
    match t.stalled_for() {
        None => status(true, "alive"),
        Some(quiet) => {
            let body = serde_json::json!({ "status": "stalled", "no_progress_ms": quiet.as_millis() as u64 });
            (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n"))
                .into_response()
        }
    }
}

async fn ready(State(t): State<Arc<Telemetry>>) -> Response {
    let role = t.role();
    // A standby is healthy and ready to take over; it reports so, with its role.
    let (ok, reason) =
        if role == Role::Standby && !t.stopping.load(Ordering::SeqCst) { (true, "ready") } else { t.is_ready() };
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({ "status": if ok { "ready" } else { reason }, "role": role.as_str() });
    (code, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n")).into_response()
}

async fn startup(State(t): State<Arc<Telemetry>>) -> Response {
    let ok = t.started.load(Ordering::SeqCst);
    status(ok, if ok { "started" } else { "starting" })
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], t.render()).into_response()
}

/// Binds `addr` and serves the probes and metrics until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/startup", get(startup))
        .route("/metrics", get(metrics))
        .with_state(telemetry);
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    tracing::info!(addr = %bound, "health and metrics served");
    Ok(bound)
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
        let text = t.render();
        for name in [
            "archiver_events_received_total",
            "archiver_orders_archived_total 3",
            "archiver_anomalies_total",
            "archiver_dead_letters_total",
            "archiver_write_errors_total",
            "archiver_retries_total",
            "archiver_reconnects_total",
            "archiver_batches_total",
            "archiver_batch_duration_seconds_bucket",
            "archiver_lag_seconds_bucket",
            "archiver_seconds_since_last_checkpoint",
            "archiver_resume_token_age_seconds",
            "archiver_build_info{version=",
            "archiver_history_lost_total",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}

/// `archiver health`: a one-shot report on the source, the archive and the checkpoint that
/// `watch` would resume from — the token file, or with `CHECKPOINT_STORE=mongodb` the shared
/// checkpoint document and the lease of the stream, for the configured partition.
pub mod check {
    use mongodb::bson::{doc, Document};
    use serde_json::{json, Value};

    use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointFile};
    use crate::config::{CheckpointStoreKind, Config};
    use crate::coordination::{self, Lease, MongoCheckpoints};
    use crate::db;
    use crate::redact::{redact_uri, scrub};

    /// What the one-shot check found.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Verdict {
        /// Everything answered as it should.
        Healthy,
        /// Something is down or wrong.
        Unhealthy,
        /// The configuration cannot work (an invalid connection string): a usage error.
        Misconfigured,
    }

    /// Runs every check; returns the JSON report and the verdict.
    pub async fn run(config: &Config) -> (Value, Verdict) {
        let mut quick = config.clone();
        // A probe answers fast: one attempt, no backoff.
        quick.retry.max_attempts = 0;
        let mut healthy = true;
        let mut misconfigured = false;
        let (source, archive, dbs) = match db::connect(&quick).await {
            Ok(dbs) => {
                let source = source_report(config, &dbs.source, &mut healthy).await;
                let archive = archive_report(config, &dbs.archive, &mut healthy).await;
                (source, archive, Some(dbs))
            }
            Err(e) => {
                healthy = false;
                misconfigured = matches!(e, db::ConnectError::InvalidUri { .. });
                let error = json!({ "status": "error", "error": scrub(&e.to_string()) });
                (error.clone(), error, None)
            }
        };
        let token = token_report(config, dbs.as_ref(), &mut healthy).await;
        let report = json!({
            "status": if healthy { "healthy" } else { "unhealthy" },
            "version": env!("CARGO_PKG_VERSION"),
            "source": source,
            "archive": archive,
            "resume_token": token,
        });
        let verdict = match (healthy, misconfigured) {
            (_, true) => Verdict::Misconfigured,
            (true, false) => Verdict::Healthy,
            (false, false) => Verdict::Unhealthy,
        };
        (report, verdict)
    }

    async fn source_report(config: &Config, source: &mongodb::Database, healthy: &mut bool) -> Value {
        let admin = source.client().database("admin");
        let hello = admin.run_command(doc! { "hello": 1 }).await;
        let build = admin.run_command(doc! { "buildInfo": 1 }).await;
        let names = source.list_collection_names().await;
        let (hello, names) = match (hello, names) {
            (Ok(h), Ok(n)) => (h, n),
            (Err(e), _) | (_, Err(e)) => {
                *healthy = false;
                return json!({ "status": "error", "uri": redact_uri(&config.mongodb.uri), "error": scrub(&e.to_string()) });
            }
        };
        let set_name = hello.get_str("setName").ok().map(str::to_owned);
        if set_name.is_none() {
            *healthy = false;
        }
        let wanted = [
            &config.orders.collection,
            &config.lookups.client.collection,
            &config.lookups.livreur.collection,
            &config.lookups.restaurant.collection,
            &config.lookups.menu.collection,
        ];
        let collections: serde_json::Map<String, Value> =
            wanted.iter().map(|c| ((*c).clone(), Value::Bool(names.contains(c)))).collect();
        json!({
            "status": if set_name.is_some() { "ok" } else { "error" },
            "uri": redact_uri(&config.mongodb.uri),
            "database": config.mongodb.database,
            "server_version": build.ok().and_then(|b: Document| b.get_str("version").ok().map(str::to_owned)),
            "replica_set": set_name,
            "change_streams": if hello.get_str("setName").is_ok() { "supported" } else { "unsupported: not a replica set" },
            "writable_primary": hello.get_bool("isWritablePrimary").unwrap_or(false),
            "collections": collections,
        })
    }

    async fn archive_report(config: &Config, archive: &mongodb::Database, healthy: &mut bool) -> Value {
        let names = match archive.list_collection_names().await {
            Ok(names) => names,
            Err(e) => {
                *healthy = false;
                return json!({ "status": "error", "error": scrub(&e.to_string()) });
            }
        };
        let dead_letters = archive
            .collection::<Document>(&config.archive.errors_collection)
            .estimated_document_count()
            .await
            .unwrap_or(0);
        json!({
            "status": "ok",
            "uri": redact_uri(config.archive.uri.as_deref().unwrap_or(&config.mongodb.uri)),
            "database": config.archive_database(),
            "collection": config.archive.collection,
            "present": names.contains(&config.archive.collection),
            "dead_letters": dead_letters,
        })
    }

    /// The checkpoint `watch` resumes from: the same store and the same stream name (with the
    /// partition) as `watch` itself, so a partitioned worker's checkpoint is found and checked.
    async fn token_report(config: &Config, dbs: Option<&db::Databases>, healthy: &mut bool) -> Value {
        let stream = coordination::stream_name(config);
        let mut report = match config.coordination.checkpoint_store {
            CheckpointStoreKind::File => file_token(config, &stream, healthy),
            CheckpointStoreKind::Mongodb => match dbs {
                Some(dbs) => shared_token(config, dbs, &stream, healthy).await,
                None => {
                    *healthy = false;
                    json!({ "status": "error", "error": "the archive database is unreachable" })
                }
            },
        };
        if let Value::Object(fields) = &mut report {
            fields.insert("stream".to_owned(), Value::from(stream));
        }
        report
    }

    fn file_token(config: &Config, stream: &str, healthy: &mut bool) -> Value {
        let path = &config.watch.resume_token_file;
        let file = path.display().to_string();
        // `watch` records its stream name in the file and refuses a file of another stream.
        let mut report = checkpoint_report(CheckpointFile::new(path).load(stream), healthy);
        report["store"] = Value::from("file");
        report["file"] = Value::from(file);
        report
    }

    async fn shared_token(config: &Config, dbs: &db::Databases, stream: &str, healthy: &mut bool) -> Value {
        // The epoch only matters to writers; this store is only read.
        let mut store = MongoCheckpoints::new(&dbs.archive, config, stream, 0);
        let mut report = checkpoint_report(store.load().await, healthy);
        report["store"] = Value::from("mongodb");
        report["collection"] = Value::from(config.coordination.checkpoint_collection.clone());
        let leases = Lease::collection(&dbs.archive, config);
        report["lease"] = match Lease::current(&leases, stream).await {
            Ok(Some(lease)) => json!({
                "holder": lease.holder,
                "epoch": lease.epoch,
                "expires_at": lease.expires_at,
                // An expired lease: no process is writing this stream right now.
                "expired": lease.expires_at < chrono::Utc::now(),
            }),
            Ok(None) => json!({ "holder": null, "note": "no process has led this stream yet" }),
            Err(e) => {
                *healthy = false;
                json!({ "error": scrub(&e.to_string()) })
            }
        };
        report
    }

    fn checkpoint_report(loaded: Result<Option<Checkpoint>, CheckpointError>, healthy: &mut bool) -> Value {
        match loaded {
            Ok(Some(cp)) => {
                let position = cp.last_event_wall_time.unwrap_or(cp.saved_at);
                let now = chrono::Utc::now();
                json!({
                    "status": "ok",
                    "saved_at": cp.saved_at,
                    "age_seconds": (now - cp.saved_at).num_milliseconds() as f64 / 1000.0,
                    "position_age_seconds": (now - position).num_milliseconds() as f64 / 1000.0,
                })
            }
            Ok(None) => json!({ "status": "missing",
                "note": "watch starts from now (or --catch-up) when it has no token" }),
            Err(e) => {
                *healthy = false;
                json!({ "status": "error", "error": scrub(&e.to_string()) })
            }
        }
    }
}
