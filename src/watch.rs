//! `archiver watch`: change stream → batches → enrich → archive → checkpoint.
//!
//! A reader task pulls events and cuts them into batches (by size or by the first event's age);
//! the writer archives each batch and only then saves the batch's resume token. The bounded
//! channel between them lets the next batch be read while the current one is written. On a
//! transient error both are torn down and the stream reopens after the last saved token: events
//! after it are replayed, and the idempotent archive absorbs the replay.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, Document, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::error::Error;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::archive::{Archiver, EventTimes, WriteOutcome};
use crate::checkpoint::{Checkpoint, CheckpointError, CheckpointFile};
use crate::config::CheckpointStoreKind;
use crate::config::Config;
use crate::coordination::{self, Lease, MongoCheckpoints, StoreError};
use crate::db::{self, is_history_lost, is_transient, ConnectError, Databases};
use crate::enrich::ArchiveSource;
use crate::health::{Role, Telemetry};
use crate::redact::scrub;
use std::sync::Arc;

/// Operation types after which a change stream cannot continue.
const INVALIDATING_OPERATIONS: &[&str] = &["drop", "rename", "dropDatabase", "invalidate"];

/// Shortest `maxAwaitTimeMS`, so a zero batch wait does not turn into a busy loop.
const MIN_AWAIT: Duration = Duration::from_millis(50);

/// How often an idle stream's advancing position is saved.
const IDLE_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// How many orders a batch enriches at once before the size of an archive document is known.
const FIRST_SLICE: usize = 50;

/// After a shutdown request, how long the batch in flight may still take before it is abandoned
/// (its token is not saved, so it is replayed at the next start).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// An error that says a server did not answer in time; transient, so the operation is retried.
fn timed_out(what: &str, limit: Duration) -> Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {} ms while {what}", limit.as_millis()))
        .into()
}

/// Runs a database operation of the writer, abandoning it when it goes unanswered for `limit`
/// (a silent network: the driver may wait forever for a reply) or when shutdown was requested
/// more than [`SHUTDOWN_GRACE`] ago. Only for idempotent operations, which are then retried.
async fn bounded<T>(
    operation: impl std::future::Future<Output = Result<T, Error>>,
    what: &str,
    limit: Duration,
    shutdown: &CancellationToken,
) -> Result<T, Error> {
    let grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = operation => result,
        _ = tokio::time::sleep(limit) => Err(timed_out(what, limit)),
        _ = grace_over => Err(timed_out(what, SHUTDOWN_GRACE)),
    }
}

/// Why `watch` stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The token file cannot be used.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Connecting failed (bad URI, or unreachable after retries).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Another process holds the token file.
    #[error(
        "another archiver watch is already running on the resume token file {0} \
         (its lock file {0}.lock is held); refusing to start"
    )]
    Locked(PathBuf),
    /// The orders collection was dropped or renamed.
    #[error(
        "the change stream on {namespace} was invalidated by a {operation:?} event (the collection \
         was dropped or renamed); everything before it is archived and the token file is kept. \
         Restart with --reset-token once the collection exists again"
    )]
    Invalidated {
        /// The watched namespace.
        namespace: String,
        /// The event type.
        operation: String,
    },
    /// The saved token is older than the oplog.
    #[error(
        "cannot resume the change stream: the saved position is no longer in the oplog \
         (history lost): {0}"
    )]
    HistoryLost(String),
    /// Transient errors did not stop within the retry bound.
    #[error("giving up after {attempts} failed attempts: {message}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: usize,
        /// The last error.
        message: String,
    },
    /// Options that contradict each other or the saved state.
    #[error("{0}")]
    Usage(String),
    /// The gap-fill or catch-up failed.
    #[error("filling the archive from the orders collection failed: {0}")]
    Fill(String),
    /// A newer leader owns the shared checkpoint; this process stopped writing.
    #[error("the checkpoint of stream {0} was taken over by a newer leader")]
    Fenced(String),
    /// A database error that retrying cannot fix.
    #[error("{context}: {message}")]
    Database {
        /// What was being done.
        context: &'static str,
        /// The error.
        message: String,
    },
}

/// The fields of a change event that `watch` uses; the server projects away the rest.
#[derive(Debug, Deserialize)]
struct StreamEvent {
    #[serde(rename = "_id")]
    token: ResumeToken,
    #[serde(rename = "operationType")]
    operation: String,
    #[serde(rename = "documentKey", default)]
    document_key: Option<Document>,
    #[serde(rename = "clusterTime", default)]
    cluster_time: Option<Timestamp>,
    #[serde(rename = "wallTime", default)]
    wall_time: Option<mongodb::bson::DateTime>,
}

/// What the reader hands the writer.
#[derive(Debug)]
struct StreamBatch {
    events: Vec<StreamEvent>,
    /// Resume after this once the events are archived.
    token: Option<ResumeToken>,
    /// Set when the stream ended on a drop/rename/invalidate event.
    invalidated: Option<String>,
}

/// The change stream pipeline: only changes that leave an order delivered, plus the events that
/// end the stream, with only the fields `watch` reads.
pub fn delivered_filter(config: &Config) -> Vec<Document> {
    let status = &config.orders.fields.status;
    let delivered = &config.orders.delivered_status;
    let deliveries = doc! { "$or": [
        {
            "operationType": { "$in": ["insert", "replace"] },
            format!("fullDocument.{status}"): delivered,
        },
        {
            "operationType": "update",
            format!("updateDescription.updatedFields.{status}"): delivered,
        },
    ] };
    // A partitioned worker only receives its share, filtered by the server.
    let deliveries = coordination::restrict_to_partition(config, deliveries, "$documentKey._id");
    vec![
        doc! { "$match": { "$or": [
            deliveries,
            { "operationType": { "$in": INVALIDATING_OPERATIONS } },
        ] } },
        doc! { "$project": { "operationType": 1, "documentKey": 1, "clusterTime": 1, "wallTime": 1 } },
    ]
}

/// Where a stream without a saved token starts.
#[derive(Debug, Clone, Copy)]
pub enum StartPosition {
    /// Changes from the moment the stream opens.
    Now,
    /// Changes from this cluster time.
    At(Timestamp),
}

impl StartPosition {
    /// Parses `--start-at`: `now` or an RFC 3339 time.
    pub fn parse(value: &str) -> Result<Self, WatchError> {
        if value.eq_ignore_ascii_case("now") {
            return Ok(StartPosition::Now);
        }
        let time = DateTime::parse_from_rfc3339(value).map_err(|e| {
            WatchError::Usage(format!("--start-at {value:?}: expected `now` or an RFC 3339 time ({e})"))
        })?;
        let secs = u32::try_from(time.timestamp())
            .map_err(|_| WatchError::Usage(format!("--start-at {value:?} is out of range")))?;
        Ok(StartPosition::At(Timestamp { time: secs, increment: 0 }))
    }
}

/// Options of one `watch` run.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Delete the token file before starting (explicit reset).
    pub reset_token: bool,
    /// Where to start when there is no token; `None` means now, and leaves a saved token alone.
    pub start: Option<StartPosition>,
    /// Archive every delivered order missing from the archive before streaming.
    pub catch_up: bool,
}

/// Holds the token file's lock for as long as it lives.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

/// Takes the exclusive lock that keeps two `watch` processes off one token file.
pub fn lock_token_file(token_file: &std::path::Path) -> Result<InstanceLock, WatchError> {
    let mut lock_path = token_file.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|source| CheckpointError::Unwritable { path: token_file.to_path_buf(), source })?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| CheckpointError::Unwritable { path: lock_path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(InstanceLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(WatchError::Locked(token_file.to_path_buf())),
        Err(std::fs::TryLockError::Error(source)) => {
            Err(CheckpointError::Unwritable { path: lock_path, source }.into())
        }
    }
}

/// Running totals, for the log.
#[derive(Debug, Default)]
struct Totals {
    history_lost: u64,
    events: u64,
    batches: u64,
    written: WriteOutcome,
}

/// Runs `watch` until `shutdown` is cancelled (`Ok`) or a fatal error.
pub async fn run(
    config: &Config,
    options: WatchOptions,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) -> Result<(), WatchError> {
    {
        let telemetry = telemetry.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            telemetry.stopping();
        });
    }
    match config.coordination.checkpoint_store {
        CheckpointStoreKind::File => {
            let token_path = config.watch.resume_token_file.clone();
            let _lock = lock_token_file(&token_path)?;
            let dbs = tokio::select! {
                dbs = db::connect(config) => dbs?.reading_from_primary(),
                _ = shutdown.cancelled() => return Ok(()),
            };
            let store = Store::File(CheckpointFile::new(&token_path));
            lead(config, &dbs, store, &options, &telemetry, &shutdown).await
        }
        CheckpointStoreKind::Mongodb => {
            let dbs = tokio::select! {
                dbs = db::connect(config) => dbs?.reading_from_primary(),
                _ = shutdown.cancelled() => return Ok(()),
            };
            follow_lease(config, &dbs, options, &telemetry, &shutdown).await
        }
    }
}

/// With the shared store: wait as a standby until the lease is ours, lead while it stays ours,
/// and go back to standby if it is lost.
async fn follow_lease(
    config: &Config,
    dbs: &Databases,
    mut options: WatchOptions,
    telemetry: &Arc<Telemetry>,
    shutdown: &CancellationToken,
) -> Result<(), WatchError> {
    let c = &config.coordination;
    let leases = Lease::collection(&dbs.archive, config);
    let stream = coordination::stream_name(config);
    let holder = coordination::instance_id(config);
    let ttl = Duration::from_millis(c.lease_ttl_ms);
    let heartbeat = Duration::from_millis(c.lease_renew_ms);
    // The lease as first seen held by another: when it changes (renewed, taken), a live leader
    // exists, and the first-leader options no longer apply. A lease left by a crashed run of
    // this same service only expires, which leaves them armed.
    let mut first_seen = None;
    loop {
        let mut announced = false;
        let lease = loop {
            match Lease::try_acquire(&leases, &stream, &holder, ttl).await {
                Ok(Some(lease)) => break lease,
                Ok(None) => {
                    telemetry.set_role(Role::Standby);
                    let current = Lease::current(&leases, &stream).await.ok().flatten();
                    if let Some(lease) = &current {
                        let seen = (lease.epoch, lease.expires_at);
                        if *first_seen.get_or_insert(seen) != seen {
                            disarm_first_leader_options(&mut options, &stream);
                        }
                    }
                    if !announced {
                        tracing::info!(stream = %stream, instance = %holder,
                            leader = ?current.as_ref().map(|l| l.holder.clone()),
                            lease_expires_at = ?current.map(|l| l.expires_at),
                            "standby: another instance holds the lease");
                        announced = true;
                    }
                }
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %scrub(&e.to_string()), "cannot reach the lease; retrying")
                }
                Err(e) => {
                    return Err(WatchError::Database { context: "taking the lease", message: scrub(&e.to_string()) })
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(heartbeat) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        };
        if lease.previous_holder().is_some() {
            telemetry.metrics.takeovers.inc();
        }
        telemetry.set_role(Role::Leader);
        tracing::info!(stream = %stream, instance = %holder, epoch = lease.epoch(),
            previous_leader = ?lease.previous_holder(), "leadership acquired");
        let store = MongoCheckpoints::new(&dbs.archive, config, &stream, lease.epoch());
        // The lease is kept alive from now on: the fence may wait behind a transaction that the
        // previous leader left open when it died or was cut off, until the server aborts it
        // (its transaction lifetime, 60 s by default), and the lease must not lapse meanwhile.
        let leadership = shutdown.child_token();
        let keeper = tokio::spawn(keep_lease(lease, heartbeat, leadership.clone()));
        let fenced = tokio::select! {
            fenced = store.fence() => fenced.map_err(|e| scrub(&e.to_string())),
            _ = leadership.cancelled() => Err("the lease was lost while fencing".to_owned()),
        };
        if let Err(error) = fenced {
            leadership.cancel();
            let released = keeper.await.map(|(lease, _)| lease);
            if shutdown.is_cancelled() {
                if let Ok(lease) = released {
                    lease.release().await;
                }
                return Ok(());
            }
            tracing::warn!(error = %error, "could not fence the checkpoint; standing by");
            tokio::time::sleep(heartbeat).await;
            continue;
        }
        let result = lead(config, dbs, Store::Mongo(store), &options, telemetry, &leadership).await;
        leadership.cancel();
        let (lease, lost) =
            keeper.await.map_err(|e| WatchError::Database { context: "keeping the lease", message: e.to_string() })?;
        // Reset and catch-up are for the first leadership only.
        options.reset_token = false;
        options.catch_up = false;
        if shutdown.is_cancelled() {
            lease.release().await;
            return result;
        }
        match result {
            Ok(()) | Err(WatchError::Fenced(_)) if lost || matches!(result, Err(WatchError::Fenced(_))) => {
                telemetry.set_role(Role::Standby);
                telemetry.stream_lost("standby");
                tracing::warn!(stream = %stream, "leadership lost; stopped writing, back to standby");
            }
            other => {
                lease.release().await;
                return other;
            }
        }
    }
}

/// `--reset-token`, `--start-at` and `--catch-up` act on the stream's shared checkpoint, and only
/// a process that leads from its start may use them: a standby taking over hours later would
/// otherwise wipe the checkpoint another leader kept, or refuse to start. Once another instance
/// is seen keeping the lease alive, they are dropped, with a warning.
fn disarm_first_leader_options(options: &mut WatchOptions, stream: &str) {
    let armed = [
        ("--reset-token", options.reset_token),
        ("--start-at", options.start.is_some()),
        ("--catch-up", options.catch_up),
    ];
    let dropped: Vec<&str> = armed.iter().filter(|(_, on)| *on).map(|(flag, _)| *flag).collect();
    if dropped.is_empty() {
        return;
    }
    tracing::warn!(stream = %stream, options = ?dropped,
        "another instance leads this stream: these options apply only to the first leader and are ignored");
    options.reset_token = false;
    options.start = None;
    options.catch_up = false;
}

/// Renews the lease every `heartbeat`; cancels `leadership` as soon as the lease is lost or
/// cannot be renewed for most of its time to live, so this process stops writing before another
/// one may take over. Returns the lease and whether it was lost.
async fn keep_lease(mut lease: Lease, heartbeat: Duration, leadership: CancellationToken) -> (Lease, bool) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(heartbeat) => {}
            _ = leadership.cancelled() => return (lease, false),
        }
        // A renewal must answer before the lease stops being surely ours; waiting longer would
        // let this process write while a standby may already have taken over.
        let fresh_for = lease.fresh_for(0.6);
        let renewed = tokio::time::timeout(fresh_for, lease.renew())
            .await
            .unwrap_or_else(|_| Err(timed_out("renewing the lease", fresh_for)));
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(epoch = lease.epoch(), "the lease was taken over");
                leadership.cancel();
                return (lease, true);
            }
            Err(e) if lease.is_fresh(0.6) => {
                tracing::warn!(error = %scrub(&e.to_string()), "could not renew the lease; retrying");
            }
            Err(e) => {
                tracing::warn!(error = %scrub(&e.to_string()),
                    "could not renew the lease in time; stepping down before it expires");
                leadership.cancel();
                return (lease, true);
            }
        }
    }
}

/// Streams as the writer of `store` until `stop` is cancelled or a fatal error.
async fn lead(
    config: &Config,
    dbs: &Databases,
    mut store: Store,
    options: &WatchOptions,
    telemetry: &Arc<Telemetry>,
    stop: &CancellationToken,
) -> Result<(), WatchError> {
    let stream_name = coordination::stream_name(config);
    if options.reset_token {
        store.remove().await?;
        tracing::warn!(store = %store.describe(), "resume token reset on request (--reset-token)");
    }
    let saved = store.load(&stream_name).await?;
    if saved.is_some() && options.start.is_some() {
        return Err(WatchError::Usage(format!(
            "--start-at was given but a resume token exists in {}; add --reset-token to \
             discard it, or drop --start-at to resume from it",
            store.describe()
        )));
    }
    match &saved {
        Some(cp) => tracing::info!(store = %store.describe(), saved_at = %cp.saved_at,
            "resuming after the saved token"),
        None => tracing::info!(store = %store.describe(), "no resume token file; starting from now"),
    }
    let archiver = Archiver::new(config, dbs, ArchiveSource::Watch);
    let mut state = StreamState {
        checkpoint: saved,
        store,
        namespace: stream_name,
        start: options.start.unwrap_or(StartPosition::Now),
        totals: Totals::default(),
        retry: config.retry.clone(),
        telemetry: telemetry.clone(),
        // Off: a leader that dies or is cut off inside a transaction leaves the checkpoint
        // locked until the server aborts the transaction (its lifetime, 60 s by default), and a
        // takeover waited that long behind it. Writes are idempotent and checkpoint saves fenced
        // by epoch, so the transaction added no guarantee; the path stays for a later opt-in
        // with the previous leader's sessions killed at takeover.
        transactions: false,
        write_timeout: Duration::from_millis(config.watch.write_timeout_ms),
        max_batch_bytes: config.watch.batch_max_bytes,
    };
    if options.catch_up {
        let delivered = doc! { config.orders.fields.status.clone(): &config.orders.delivered_status };
        let delivered = coordination::restrict_to_partition(config, delivered, "$_id");
        fill(config, dbs, &mut state, delivered, "catch-up", stop).await?;
    }
    let mut delays = db::backoff(&config.retry);
    let mut attempts = 0usize;
    loop {
        let (result, progressed) = run_stream(config, dbs, &archiver, &mut state, stop).await;
        let error = match result {
            Ok(()) => {
                tracing::info!(
                    events = state.totals.events,
                    batches = state.totals.batches,
                    archived = state.totals.written.inserted,
                    already_archived = state.totals.written.already_archived,
                    "watch stopped; position saved"
                );
                return Ok(());
            }
            Err(StreamFailure::Fatal(e)) => return Err(e),
            Err(StreamFailure::Mongo(e, context)) => (e, context),
        };
        let (error, context) = error;
        if stop.is_cancelled() {
            // Asked to stop (or leadership lost) while the stream failed: the position saved is
            // before anything unarchived, so stopping here loses nothing.
            tracing::info!(error = %scrub(&error.to_string()), context, "stopping; position saved");
            return Ok(());
        }
        telemetry.progressed();
        if progressed {
            delays = db::backoff(&config.retry);
            attempts = 0;
        }
        let message = scrub(&error.to_string());
        if is_history_lost(&error) {
            state.totals.history_lost += 1;
            telemetry.metrics.history_lost.inc();
            telemetry.stream_lost("filling the gap after lost history");
            tracing::error!(error = %message, checkpoint = ?state.checkpoint.as_ref().map(|c| c.saved_at),
                "HISTORY LOST: the saved resume token is no longer in the oplog; filling the gap \
                 from the orders collection, then streaming from before the fill");
            let Some(checkpoint) = state.checkpoint.clone() else {
                return Err(WatchError::HistoryLost(message));
            };
            let since = checkpoint.last_event_wall_time.unwrap_or(checkpoint.saved_at)
                - chrono::Duration::seconds(config.watch.gap_fill_margin_secs.min(i64::MAX as u64) as i64);
            fill(config, dbs, &mut state, gap_filter(config, since), "gap-fill", stop).await?;
            if stop.is_cancelled() {
                // The fill was interrupted; the next start fills again from the same position.
                return Ok(());
            }
            continue;
        }
        if !is_transient(&error) {
            return Err(WatchError::Database { context, message });
        }
        attempts += 1;
        telemetry.stream_lost("reconnecting");
        telemetry.metrics.reconnects.inc();
        telemetry.metrics.retries.inc();
        let Some(delay) = delays.next() else {
            return Err(WatchError::RetriesExhausted { attempts, message });
        };
        tracing::warn!(attempt = attempts, retry_in_ms = delay.as_millis() as u64, error = %message,
            context, "transient database error; reopening the stream after the saved token");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// Where checkpoints are kept.
enum Store {
    /// The local token file.
    File(CheckpointFile),
    /// The shared collection, fenced by the lease epoch.
    Mongo(MongoCheckpoints),
}

/// Why a checkpoint could not be saved.
enum SaveFailure {
    Disk(CheckpointError),
    Fenced(String),
    Database(Error),
}

impl Store {
    fn describe(&self) -> String {
        match self {
            Store::File(f) => f.path().display().to_string(),
            Store::Mongo(_) => "the shared checkpoint collection".to_owned(),
        }
    }

    async fn load(&mut self, stream: &str) -> Result<Option<Checkpoint>, WatchError> {
        Ok(match self {
            Store::File(f) => f.load(stream)?,
            Store::Mongo(m) => m.load().await?,
        })
    }

    async fn remove(&mut self) -> Result<(), WatchError> {
        match self {
            Store::File(f) => Ok(f.remove()?),
            Store::Mongo(m) => m.remove().await.map_err(store_error),
        }
    }

    /// Saves `checkpoint`; a shared-store save unanswered for `limit` is abandoned (an
    /// upsert of the same position: retrying it is harmless).
    async fn save(
        &mut self,
        checkpoint: &Checkpoint,
        limit: Duration,
        shutdown: &CancellationToken,
    ) -> Result<bool, SaveFailure> {
        match self {
            Store::File(f) => f.save(checkpoint).map_err(SaveFailure::Disk),
            Store::Mongo(m) => {
                let save = async { Ok::<_, Error>(m.save(checkpoint, None).await) };
                match bounded(save, "saving the checkpoint", limit, shutdown).await {
                    Ok(Ok(written)) => Ok(written),
                    Ok(Err(StoreError::Fenced(s))) => Err(SaveFailure::Fenced(s)),
                    Ok(Err(StoreError::Database(e))) | Err(e) => Err(SaveFailure::Database(e)),
                }
            }
        }
    }
}

fn store_error(e: StoreError) -> WatchError {
    match e {
        StoreError::Fenced(stream) => WatchError::Fenced(stream),
        StoreError::Database(e) => {
            WatchError::Database { context: "the checkpoint store", message: scrub(&e.to_string()) }
        }
    }
}

/// The delivered orders a stream that lost its history since `since` may have missed: those
/// delivered since then by their own delivery date, and those whose delivery date is unknown.
pub fn gap_filter(config: &Config, since: DateTime<Utc>) -> Document {
    let f = &config.orders.fields;
    let since = mongodb::bson::DateTime::from_millis(since.timestamp_millis());
    let filter = doc! {
        f.status.clone(): &config.orders.delivered_status,
        "$or": [
            { f.date_livraison.clone(): { "$gte": since } },
            { f.date_livraison.clone(): { "$not": { "$type": "date" } } },
        ],
    };
    coordination::restrict_to_partition(config, filter, "$_id")
}

/// Archives, through the batch path, every order matching `filter` that is not archived yet,
/// then moves the stream to a point taken *before* the fill started, so that nothing delivered
/// during the fill falls between the two. Saved only once the fill is complete: a crash during
/// it resumes from the old position and fills again (idempotently).
async fn fill(
    config: &Config,
    dbs: &Databases,
    state: &mut StreamState,
    filter: Document,
    what: &'static str,
    shutdown: &CancellationToken,
) -> Result<(), WatchError> {
    let keep_position = what == "catch-up" && state.checkpoint.is_some();
    // The time the new position stands for is when it was taken, not when the fill ended: a
    // later gap-fill must start from here, or it would miss what was delivered during this one.
    let taken_at = Utc::now();
    let start_token = if keep_position {
        None
    } else {
        let stream = open_stream(config, dbs, None, StartPosition::Now)
            .await
            .map_err(|e| WatchError::Fill(scrub(&e.to_string())))?;
        stream.resume_token()
    };
    // A fill is long work of its own, bounded by its retries; the liveness clock is for batches.
    state.telemetry.work_done();
    let started = Instant::now();
    let archiver = Archiver::new(config, dbs, ArchiveSource::Batch);
    let (matched, outcome) = crate::batch::archive_matching(
        config,
        dbs,
        &archiver,
        &filter,
        crate::config::WritePath::Client,
        true,
        shutdown,
    )
    .await
    .map_err(|e| WatchError::Fill(scrub(&format!("{e:#}"))))?;
    tracing::warn!(
        fill = what,
        matched,
        newly_archived = outcome.inserted,
        already_archived = outcome.already_archived,
        anomalies = outcome.anomalies,
        dead_lettered = outcome.dead_lettered,
        duration_ms = started.elapsed().as_millis() as u64,
        "archive filled from the orders collection"
    );
    if shutdown.is_cancelled() {
        // Interrupted: keep the old position so the next start fills again.
        return Ok(());
    }
    if let Some(token) = start_token {
        persist(state, token, None, Some(taken_at), shutdown).await.map_err(WatchError::from)?;
    }
    Ok(())
}

/// What survives a stream restart.
struct StreamState {
    checkpoint: Option<Checkpoint>,
    store: Store,
    namespace: String,
    start: StartPosition,
    totals: Totals,
    retry: crate::config::RetrySettings,
    telemetry: Arc<Telemetry>,
    /// Whether archive writes and checkpoints go in one transaction (shared store, while the
    /// server accepts transactions).
    transactions: bool,
    /// Longest wait for an archive write or a checkpoint save.
    write_timeout: Duration,
    /// Most bytes of archive documents enriched and written at once.
    max_batch_bytes: u64,
}

enum StreamFailure {
    Fatal(WatchError),
    Mongo(Error, &'static str),
}

impl From<CheckpointError> for StreamFailure {
    fn from(e: CheckpointError) -> Self {
        StreamFailure::Fatal(e.into())
    }
}

impl From<StreamFailure> for WatchError {
    fn from(failure: StreamFailure) -> Self {
        match failure {
            StreamFailure::Fatal(e) => e,
            StreamFailure::Mongo(e, context) => WatchError::Database { context, message: scrub(&e.to_string()) },
        }
    }
}

/// One life of the change stream. Returns whether any batch was archived, so that the caller
/// can reset its backoff.
async fn run_stream(
    config: &Config,
    dbs: &Databases,
    archiver: &Archiver,
    state: &mut StreamState,
    shutdown: &CancellationToken,
) -> (Result<(), StreamFailure>, bool) {
    let mut progressed = false;
    let result = async {
        let resume = state.checkpoint.as_ref().map(|c| &c.resume_token);
        let opened_at = Utc::now();
        let stream = open_stream(config, dbs, resume, state.start)
            .await
            .map_err(|e| StreamFailure::Mongo(e, "opening the change stream"))?;
        tracing::info!(namespace = %state.namespace, "change stream open");
        state.telemetry.stream_opened();
        // Whatever was pending is replayed by this stream: nothing waits until it delivers.
        state.telemetry.work_done();
        // Record the starting point at once, so a crash before the first batch still resumes
        // from here rather than from a later "now".
        if state.checkpoint.is_none() {
            if let Some(token) = stream.resume_token() {
                persist(state, token, None, Some(opened_at), shutdown).await?;
            }
        }
        let (tx, mut rx) = mpsc::channel::<Result<StreamBatch, Error>>(2);
        let reader_stop = shutdown.child_token();
        let reader = tokio::spawn(read_batches(
            stream,
            tx,
            config.watch.batch_size,
            Duration::from_millis(config.watch.batch_max_wait_ms),
            open_stream_await(config) + Duration::from_millis(config.watch.stream_timeout_ms),
            state.telemetry.clone(),
            reader_stop.clone(),
        ));
        let _stop_reader = reader_stop.clone().drop_guard();
        let outcome = loop {
            let message = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                message = rx.recv() => message,
            };
            let Some(message) = message else { break Ok(()) };
            let batch = match message {
                Ok(batch) => batch,
                Err(e) => break Err(StreamFailure::Mongo(e, "reading the change stream")),
            };
            if !batch.events.is_empty() {
                state.telemetry.work_pending();
            }
            if let Err(e) = write_batch(archiver, state, batch, &mut progressed, shutdown).await {
                break Err(e);
            }
            state.telemetry.work_done();
        };
        // The receiver goes first, so a reader parked on a full channel returns at once.
        drop(rx);
        reader_stop.cancel();
        let _ = reader.await;
        outcome
    }
    .await;
    (result, progressed)
}

/// How long the server holds an idle getMore of the stream open.
fn open_stream_await(config: &Config) -> Duration {
    Duration::from_millis(config.watch.batch_max_wait_ms).max(MIN_AWAIT)
}

/// Opens the filtered stream after `resume`, or else at `start`.
async fn open_stream(
    config: &Config,
    dbs: &Databases,
    resume: Option<&ResumeToken>,
    start: StartPosition,
) -> Result<ChangeStream<StreamEvent>, Error> {
    let orders = dbs.source.collection::<Document>(&config.orders.collection);
    let mut watch = orders
        .watch()
        .pipeline(delivered_filter(config))
        .max_await_time(open_stream_await(config))
        .batch_size(config.watch.batch_size.min(u32::MAX as usize) as u32);
    watch = match (resume, start) {
        (Some(token), _) => watch.resume_after(token.clone()),
        (None, StartPosition::At(ts)) => watch.start_at_operation_time(ts),
        (None, StartPosition::Now) => watch,
    };
    Ok(watch.await?.with_type::<StreamEvent>())
}

/// Hands `message` to the writer unless stopped first; false when the reader should end (stopped,
/// or the writer is gone). Every send races `stop`: a writer that failed stops reading the
/// channel, and a reader parked on a full channel would otherwise never return.
async fn hand_over(
    tx: &mpsc::Sender<Result<StreamBatch, Error>>,
    message: Result<StreamBatch, Error>,
    stop: &CancellationToken,
) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        sent = tx.send(message) => sent.is_ok(),
    }
}

/// How many times the silence limit a stream may stay silent before it is reopened.
const SILENT_STREAM_REOPEN_AFTER: u32 = 6;

/// The stream's next answer. Silent for `silence_limit`, the stream is reported not ready (a
/// network that went quiet, or a server too busy to answer); silent for
/// [`SILENT_STREAM_REOPEN_AFTER`] times that, it fails with a transient error and is reopened. A
/// late answer in between makes it ready again: reopening a slow stream would only repeat the
/// slow read.
async fn next_within(
    stream: &mut ChangeStream<StreamEvent>,
    silence_limit: Duration,
    telemetry: &Telemetry,
) -> Result<Option<StreamEvent>, Error> {
    let next = stream.next_if_any();
    tokio::pin!(next);
    if let Ok(answer) = tokio::time::timeout(silence_limit, &mut next).await {
        return answer;
    }
    tracing::warn!(silent_ms = silence_limit.as_millis() as u64, "the change stream does not answer; not ready");
    telemetry.stream_lost("change stream silent");
    let reopen_after = silence_limit * SILENT_STREAM_REOPEN_AFTER;
    match tokio::time::timeout(reopen_after - silence_limit, &mut next).await {
        Ok(answer) => {
            if answer.is_ok() {
                tracing::info!("the change stream answers again");
                telemetry.stream_opened();
            }
            answer
        }
        Err(_) => Err(timed_out("reading the change stream", reopen_after)),
    }
}

/// Pulls events and cuts them into batches until stopped or the stream fails. A stream that
/// stays silent for `silence_limit` (beyond the server's await time, which already bounds an
/// idle getMore) is taken for a network fault and reported as a transient error.
async fn read_batches(
    mut stream: ChangeStream<StreamEvent>,
    tx: mpsc::Sender<Result<StreamBatch, Error>>,
    batch_size: usize,
    max_wait: Duration,
    silence_limit: Duration,
    telemetry: Arc<Telemetry>,
    stop: CancellationToken,
) {
    let mut last_token = stream.resume_token();
    let mut last_idle_save = Instant::now();
    loop {
        let mut events: Vec<StreamEvent> = Vec::new();
        let mut first_event_at: Option<Instant> = None;
        let mut invalidated = None;
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                next = next_within(&mut stream, silence_limit, &telemetry) => next,
            };
            match next {
                Err(e) => {
                    // Not ready from now on, even while the writer is still busy with (or stuck
                    // on) the batch before: readiness tells the stream's state, not the writer's.
                    telemetry.stream_lost("reconnecting");
                    // Hand over what was read first: it is valid, only unsaved.
                    if !events.is_empty() {
                        let token = events.last().map(|e| e.token.clone());
                        let batch = StreamBatch { events, token, invalidated: None };
                        if !hand_over(&tx, Ok(batch), &stop).await {
                            return;
                        }
                    }
                    hand_over(&tx, Err(e), &stop).await;
                    return;
                }
                Ok(Some(event)) if INVALIDATING_OPERATIONS.contains(&event.operation.as_str()) => {
                    invalidated = Some(event.operation);
                    break;
                }
                Ok(Some(event)) => {
                    events.push(event);
                    first_event_at.get_or_insert_with(Instant::now);
                    if events.len() >= batch_size {
                        break;
                    }
                }
                Ok(None) => break,
            }
            if first_event_at.is_some_and(|t| t.elapsed() >= max_wait) {
                break;
            }
        }
        let token = if invalidated.is_some() {
            // Never save the invalidating event's own token: it cannot be resumed after.
            events.last().map(|e| e.token.clone()).or_else(|| last_token.clone())
        } else {
            stream.resume_token()
        };
        if events.is_empty() && invalidated.is_none() {
            // Idle: pass the advancing position on now and then, so a quiet collection's token
            // stays inside the oplog window.
            if token == last_token || last_idle_save.elapsed() < IDLE_CHECKPOINT_EVERY {
                continue;
            }
            last_idle_save = Instant::now();
        }
        last_token = token.clone();
        let done = invalidated.is_some();
        if !hand_over(&tx, Ok(StreamBatch { events, token, invalidated }), &stop).await || done {
            return;
        }
    }
}

/// Archives one batch, then saves its token.
async fn write_batch(
    archiver: &Archiver,
    state: &mut StreamState,
    batch: StreamBatch,
    progressed: &mut bool,
    shutdown: &CancellationToken,
) -> Result<(), StreamFailure> {
    if !batch.events.is_empty() {
        let started = Instant::now();
        let mut times = EventTimes::with_capacity(batch.events.len());
        let mut ids: Vec<Bson> = Vec::with_capacity(batch.events.len());
        for event in &batch.events {
            let Some(id) = event.document_key.as_ref().and_then(|k| k.get("_id")) else { continue };
            let time = event.wall_time.or_else(|| {
                event.cluster_time.map(|ts| mongodb::bson::DateTime::from_millis(i64::from(ts.time) * 1000))
            });
            // A repeated id (delivered twice in one batch) is archived once.
            if let std::collections::hash_map::Entry::Vacant(slot) = times.entry(crate::order_id::equality_key(id)) {
                slot.insert(time.unwrap_or_else(mongodb::bson::DateTime::now));
                ids.push(id.clone());
            }
        }
        let metrics = &state.telemetry.metrics;
        metrics.events_received.inc_by(batch.events.len() as u64);
        let last = batch.events.last().expect("non-empty");
        let wall_time: Option<DateTime<Utc>> = last
            .wall_time
            .and_then(|t| DateTime::from_timestamp_millis(t.timestamp_millis()))
            .or_else(|| last.cluster_time.and_then(|ts| DateTime::from_timestamp(i64::from(ts.time), 0)));
        let cluster_time = last.cluster_time;
        let mut committed = None;
        // A batch whose documents would exceed the byte bound is enriched and written in slices
        // (its checkpoint still saved only after the last), so memory stays bounded whatever the
        // size of the orders. Until the size of a document is known, slices are small.
        let slice_len = match archiver.document_bytes() {
            Some(bytes) => (state.max_batch_bytes / bytes.max(1)).max(1) as usize,
            None => FIRST_SLICE,
        };
        let sliced = ids.len() > slice_len;
        let transactional = state.transactions && matches!(state.store, Store::Mongo(_)) && !sliced;
        let limit = state.write_timeout;
        let archive_ids = || async {
            let mut outcome = WriteOutcome::default();
            for slice in ids.chunks(slice_len) {
                outcome += bounded(archiver.archive_ids(slice, &times), "archiving a batch", limit, shutdown).await?;
            }
            Ok(outcome)
        };
        let outcome = match (transactional, batch.token.clone(), &mut state.store) {
            (true, Some(token), Store::Mongo(store)) => {
                let checkpoint = Checkpoint::now(token, &state.namespace, cluster_time, wall_time);
                let in_transaction = async { Ok(archive_in_transaction(archiver, store, &ids, &checkpoint).await) };
                let in_transaction = bounded(in_transaction, "archiving a batch", limit, shutdown)
                    .await
                    .unwrap_or_else(|e| Err(TxnFailure::Failed(e)));
                match in_transaction {
                    Ok(outcome) => {
                        committed = Some(checkpoint);
                        Ok(outcome)
                    }
                    Err(TxnFailure::Fenced(stream)) => return Err(StreamFailure::Fatal(WatchError::Fenced(stream))),
                    Err(TxnFailure::Failed(e)) if is_transient(&e) => Err(e),
                    Err(TxnFailure::Unsupported(e)) => {
                        tracing::warn!(error = %scrub(&e.to_string()),
                            "the server refuses transactions; archive writes and checkpoints go separately");
                        state.transactions = false;
                        archive_ids().await
                    }
                    Err(TxnFailure::Failed(e)) => {
                        tracing::warn!(error = %scrub(&e.to_string()),
                            "the batch failed inside a transaction; archiving it order by order");
                        archive_ids().await
                    }
                }
            }
            _ => archive_ids().await,
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                state.telemetry.write_result(false);
                return Err(StreamFailure::Mongo(e, "archiving a batch"));
            }
        };
        state.telemetry.write_result(true);
        metrics.orders_archived.inc_by(outcome.inserted);
        metrics.orders_already_archived.inc_by(outcome.already_archived);
        metrics.anomalies.inc_by(outcome.anomalies);
        metrics.dead_letters.inc_by(outcome.dead_lettered);
        metrics.batches.inc();
        metrics.batch_duration.observe(started.elapsed().as_secs_f64());
        let lag_ms = wall_time.map(|t| (Utc::now() - t).num_milliseconds().max(0));
        if let Some(lag) = lag_ms {
            metrics.lag.observe(lag as f64 / 1000.0);
        }
        state.totals.events += batch.events.len() as u64;
        state.totals.batches += 1;
        state.totals.written += outcome;
        *progressed = true;
        tracing::info!(
            batch_len = batch.events.len(),
            orders = ids.len(),
            slices = ids.len().div_ceil(slice_len),
            inserted = outcome.inserted,
            already_archived = outcome.already_archived,
            anomalies = outcome.anomalies,
            dead_lettered = outcome.dead_lettered,
            lag_ms,
            duration_ms = started.elapsed().as_millis() as u64,
            "batch archived"
        );
        match (committed, batch.token.clone()) {
            (Some(checkpoint), _) => saved(state, checkpoint),
            (None, Some(token)) => {
                persist(state, token, cluster_time, wall_time, shutdown).await?;
            }
            (None, None) => {}
        }
    } else if let Some(token) = batch.token.clone() {
        let (ct, wt) = state
            .checkpoint
            .as_ref()
            .map(|c| (c.last_event_cluster_time, c.last_event_wall_time))
            .unwrap_or((None, None));
        if persist(state, token, ct, wt, shutdown).await? {
            tracing::debug!("idle stream: resume token advanced");
        }
    }
    if let Some(operation) = batch.invalidated {
        return Err(StreamFailure::Fatal(WatchError::Invalidated { namespace: state.namespace.clone(), operation }));
    }
    Ok(())
}

/// Saves the position, retrying with backoff while the disk (or the shared store) refuses.
/// Until it succeeds no further batch is taken, so the token never runs ahead of the archive;
/// after the retry bound the error is fatal. A fenced save (a newer leader) fails at once.
async fn persist(
    state: &mut StreamState,
    token: ResumeToken,
    cluster_time: Option<Timestamp>,
    wall_time: Option<DateTime<Utc>>,
    shutdown: &CancellationToken,
) -> Result<bool, StreamFailure> {
    let checkpoint = Checkpoint::now(token, &state.namespace, cluster_time, wall_time);
    let mut delays = db::backoff(&state.retry);
    let mut attempt = 0;
    loop {
        let failure = match state.store.save(&checkpoint, state.write_timeout, shutdown).await {
            Ok(written) => {
                saved(state, checkpoint);
                return Ok(written);
            }
            Err(SaveFailure::Fenced(stream)) => return Err(StreamFailure::Fatal(WatchError::Fenced(stream))),
            Err(SaveFailure::Database(e)) if !is_transient(&e) => {
                return Err(StreamFailure::Mongo(e, "saving the checkpoint"))
            }
            Err(SaveFailure::Database(e)) => StreamFailure::Mongo(e, "saving the checkpoint"),
            Err(SaveFailure::Disk(e)) => StreamFailure::Fatal(e.into()),
        };
        attempt += 1;
        let delay = delays.next().filter(|_| !shutdown.is_cancelled());
        let Some(delay) = delay else { return Err(failure) };
        let error = match &failure {
            StreamFailure::Fatal(e) => e.to_string(),
            StreamFailure::Mongo(e, _) => scrub(&e.to_string()),
        };
        tracing::error!(attempt, retry_in_ms = delay.as_millis() as u64, error = %error,
            "cannot save the resume token; holding new batches until it can be saved");
        state.telemetry.progressed();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Err(failure),
        }
    }
}

/// Why the transactional write did not commit.
enum TxnFailure {
    /// A newer leader owns the checkpoint: nothing was written.
    Fenced(String),
    /// The deployment does not do transactions (standalone server).
    Unsupported(Error),
    /// Anything else; nothing was written.
    Failed(Error),
}

/// Archives a batch and saves its checkpoint in one transaction, so that the shared checkpoint
/// can never disagree with the archive, and a fenced (stale) leader writes neither.
async fn archive_in_transaction(
    archiver: &Archiver,
    store: &mut MongoCheckpoints,
    ids: &[Bson],
    checkpoint: &Checkpoint,
) -> Result<WriteOutcome, TxnFailure> {
    let classify = |e: Error| {
        let illegal =
            crate::db::error_code(&e) == Some(20) || e.to_string().contains("Transaction numbers are only allowed");
        if illegal {
            TxnFailure::Unsupported(e)
        } else {
            TxnFailure::Failed(e)
        }
    };
    // Enrichment reads stay outside the transaction: only the writes need to be atomic.
    let docs = archiver.enrich(ids).await.map_err(TxnFailure::Failed)?;
    let mut session = archiver.start_session().await.map_err(classify)?;
    session.start_transaction().await.map_err(classify)?;
    let written = archiver.insert_missing_in(docs, &mut session).await;
    let outcome = match written {
        Ok(outcome) => outcome,
        Err(e) => {
            let _ = session.abort_transaction().await;
            return Err(classify(e));
        }
    };
    if let Err(e) = store.save(checkpoint, Some(&mut session)).await {
        let _ = session.abort_transaction().await;
        return Err(match e {
            StoreError::Fenced(stream) => TxnFailure::Fenced(stream),
            StoreError::Database(e) => classify(e),
        });
    }
    let mut commit = session.commit_transaction().await;
    if commit.as_ref().is_err_and(|e| e.contains_label("UnknownTransactionCommitResult")) {
        commit = session.commit_transaction().await;
    }
    commit.map_err(classify)?;
    Ok(outcome)
}

/// Records a durable checkpoint in memory and in the metrics.
fn saved(state: &mut StreamState, checkpoint: Checkpoint) {
    let position = checkpoint.last_event_wall_time.unwrap_or(checkpoint.saved_at);
    state.telemetry.checkpoint_saved(Some(position.timestamp_millis()));
    state.checkpoint = Some(checkpoint);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matches_delivered_transitions_only() {
        let mut config = Config::default();
        config.orders.fields.status = "etat".into();
        config.orders.delivered_status = "done".into();
        let pipeline = delivered_filter(&config);
        let or = pipeline[0].get_document("$match").unwrap().get_array("$or").unwrap();
        let deliveries = or[0].as_document().unwrap().get_array("$or").unwrap();
        let insert = deliveries[0].as_document().unwrap();
        assert_eq!(insert.get_str("fullDocument.etat").unwrap(), "done");
        let update = deliveries[1].as_document().unwrap();
        assert_eq!(update.get_str("operationType").unwrap(), "update");
        assert_eq!(update.get_str("updateDescription.updatedFields.etat").unwrap(), "done");
        let ends = or[1].as_document().unwrap().get_document("operationType").unwrap();
        assert_eq!(ends.get_array("$in").unwrap().len(), INVALIDATING_OPERATIONS.len());
        let project = pipeline[1].get_document("$project").unwrap();
        assert!(!project.contains_key("fullDocument"), "full documents are not shipped");
    }

    #[test]
    fn second_instance_cannot_lock_the_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("t.json");
        let first = lock_token_file(&token).unwrap();
        assert!(matches!(lock_token_file(&token), Err(WatchError::Locked(_))));
        drop(first);
        lock_token_file(&token).unwrap();
    }
}
