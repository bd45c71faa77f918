//! `archiver watch`: change stream → batches → enrich → archive → checkpoint.
//!
//! This module owns the run and its leadership: which checkpoint store is used, standby and
//! takeover with the shared store, and the loop that reopens the stream after a transient error
//! or fills the archive after lost history. The stream reader ([`stream`]), the writer
//! ([`writer`]), the fills ([`fill`]) and the oplog headroom watch ([`oplog`]) are its parts. On a transient error reader and writer
//! are torn down and the stream reopens after the last saved token: events after it are
//! replayed, and the idempotent archive absorbs the replay.

mod fill;
mod oplog;
mod stream;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use mongodb::bson::{doc, Bson};
use mongodb::error::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{lock_token_file, CheckpointFile, MongoCheckpoints, Store, StoreError};
use crate::config::{CheckpointStoreKind, Config};
use crate::coordination::{self, leadership, Lease};
use crate::db::{self, is_history_lost, is_transient, ConnectError, Databases, RetryPolicy};
use crate::pipeline::document::ArchiveSource;
use crate::pipeline::order_id::{equality_key, present_among};
use crate::pipeline::sink::{Archiver, EventTimes, OpenError, WriteOutcome};
use crate::redact::scrub;
use crate::telemetry::{Role, Telemetry};

use fill::{fill, new_fill, CATCH_UP, GAP_FILL};
pub use stream::{delivered_filter, StartPosition};
use stream::{is_event_too_large, open_stream, open_stream_await, read_batches, read_past_large_events, StreamBatch};
use writer::{persist, write_batch, StreamFailure, StreamState};

/// Why `watch` stopped other than by a shutdown request. Each variant keeps its cause; the
/// messages are one line, with the cause in short (see `app::describe`).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The checkpoint cannot be used: a corrupt or unwritable token file, a token file locked by
    /// another process, or a shared checkpoint taken over by a newer leader.
    #[error(transparent)]
    Checkpoint(#[from] StoreError),
    /// The connection string is invalid.
    #[error(transparent)]
    Connect(#[from] ConnectError),
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
    /// The saved token is older than the oplog, and there is no checkpoint to fill the gap from.
    #[error("cannot resume the change stream: the saved position is no longer in the oplog (history lost)")]
    HistoryLost(#[source] Error),
    /// Options that contradict each other or the saved state.
    #[error("{0}")]
    Usage(String),
    /// The gap-fill or catch-up failed.
    #[error("filling the archive from the orders collection failed")]
    Fill(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A database error that retrying cannot fix.
    #[error("{context}")]
    Database {
        /// What was being done.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: Error,
    },
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
    // A service rides out a database outage instead of exiting: see `db::retry`.
    let keep_trying = RetryPolicy::unbounded(&config.retry);
    let result = async {
        match config.coordination.checkpoint_store {
            CheckpointStoreKind::File => {
                let token_path = config.watch.resume_token_file.clone();
                let _lock = lock_token_file(&token_path)?;
                let dbs = tokio::select! {
                    dbs = db::connect(config, &keep_trying) => dbs?.reading_from_primary(),
                    _ = shutdown.cancelled() => return Ok(()),
                };
                spawn_oplog_monitor(config, &dbs, &telemetry, &shutdown);
                let store = Store::File(CheckpointFile::new(&token_path));
                lead(config, &dbs, store, &options, &telemetry, &shutdown).await
            }
            CheckpointStoreKind::Mongodb => {
                let dbs = tokio::select! {
                    dbs = db::connect(config, &keep_trying) => dbs?.reading_from_primary(),
                    _ = shutdown.cancelled() => return Ok(()),
                };
                spawn_oplog_monitor(config, &dbs, &telemetry, &shutdown);
                follow_lease(config, &dbs, options, &telemetry, &shutdown).await
            }
        }
    }
    .await;
    // Said before returning too: the task above may not run before the process exits, and
    // systemd must hear STOPPING (sent once whichever comes first).
    if shutdown.is_cancelled() {
        telemetry.stopping();
    }
    result
}

/// Watches the source oplog's headroom for as long as the process runs (whatever its role: the
/// telemetry only reports a headroom while this process writes).
fn spawn_oplog_monitor(config: &Config, dbs: &Databases, telemetry: &Arc<Telemetry>, shutdown: &CancellationToken) {
    let warn_below = Duration::from_secs(config.watch.oplog_headroom_warn_secs);
    tokio::spawn(oplog::monitor(dbs.source_client.clone(), telemetry.clone(), warn_below, shutdown.clone()));
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
                Err(e) => return Err(WatchError::Database { context: "taking the lease", source: e }),
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
        let keeper = tokio::spawn(leadership::keep(lease, heartbeat, leadership.clone()));
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
        let (lease, lost) = keeper
            .await
            .map_err(|e| WatchError::Database { context: "keeping the lease", source: Error::custom(e.to_string()) })?;
        // Reset and catch-up are for the first leadership only.
        options.reset_token = false;
        options.catch_up = false;
        if shutdown.is_cancelled() {
            lease.release().await;
            return result;
        }
        if back_to_standby(&result, lost) {
            if let Err(e) = &result {
                tracing::warn!(stream = %stream, error = %e, "stopped leading on this error");
            }
            telemetry.set_role(Role::Standby);
            telemetry.stream_lost("standby");
            tracing::warn!(stream = %stream, "leadership lost; stopped writing, back to standby");
        } else {
            lease.release().await;
            return result;
        }
    }
}

/// Whether a leadership that ended with `result` goes back to standby rather than ending the
/// process: fenced by a newer leader, or the lease lost (`lost`) with nothing wrong but the
/// outage that lost it. A call to the shared store retried through an outage gives up when
/// leading ends, with the outage's error: that error is the lost lease's, not a reason to exit.
fn back_to_standby(result: &Result<(), WatchError>, lost: bool) -> bool {
    match result {
        Err(WatchError::Checkpoint(StoreError::Fenced(_))) => true,
        Ok(()) => lost,
        Err(WatchError::Checkpoint(error)) => lost && error.is_transient(),
        Err(WatchError::Database { source, .. }) => lost && db::is_transient(source),
        Err(_) => false,
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

/// Streams as the writer of `store` until `stop` is cancelled or a fatal error.
/// Makes durable what the store holds back (a Delta table's last rows and position), at a stop.
async fn flush_store(state: &mut StreamState) -> Result<(), WatchError> {
    state.store.flush().await?;
    Ok(())
}

async fn lead(
    config: &Config,
    dbs: &Databases,
    mut store: Store,
    options: &WatchOptions,
    telemetry: &Arc<Telemetry>,
    stop: &CancellationToken,
) -> Result<(), WatchError> {
    let stream_name = coordination::stream_name(config);
    let archiver = Archiver::open(config, dbs, ArchiveSource::Watch).await.map_err(|e| match e {
        OpenError::Misconfigured(reason) => WatchError::Usage(reason),
        OpenError::Unavailable(reason) => {
            WatchError::Checkpoint(StoreError::Table { uri: config.lake.table_uri.clone().unwrap_or_default(), reason })
        }
    })?;
    // A typo in MONGODB_DB or DELIVERED_STATUS archives nothing: said at start. Watching goes
    // on (the collection may be created, or the status appear, later).
    if let Ok(Some(mismatch)) = crate::pipeline::scan::source_mismatch(config, dbs).await {
        tracing::error!(problem = %mismatch, "as configured, no delivery can be archived; watching anyway");
    }
    // An archive that commits the position with its data keeps it: one source of truth.
    // Rows lost before their commit (a data file that cannot be written) end this leadership:
    // the next one replays from the table's last commit.
    if let Some(keeper) = archiver.checkpoint_keeper(config, stop).await {
        store = Store::Table(keeper);
    }
    // A database outage while taking over is ridden out like any other (shared store only: a
    // token file's errors are never transient).
    let keep_trying = RetryPolicy::unbounded(&config.retry);
    let transient = StoreError::is_transient;
    if options.reset_token {
        let store = &mut store;
        db::retry(&keep_trying, "resetting the checkpoint", transient, Some(stop), async || store.remove().await)
            .await
            .map_err(|failed| failed.error)?;
        tracing::warn!(store = %store.describe(), "resume token reset on request (--reset-token)");
    }
    let saved = {
        let store = &mut store;
        db::retry(&keep_trying, "reading the checkpoint", transient, Some(stop), async || {
            store.load(&stream_name).await
        })
        .await
        .map_err(|failed| failed.error)?
    };
    if saved.is_some() && options.start.is_some() {
        return Err(WatchError::Usage(format!(
            "--start-at was given but a resume token exists in {}; add --reset-token to \
             discard it, or drop --start-at to resume from it",
            store.describe()
        )));
    }
    if let Some(cp) = &saved {
        telemetry.checkpoint_loaded(cp.position().timestamp_millis());
    }
    match &saved {
        Some(cp) => tracing::info!(store = %store.describe(), saved_at = %cp.saved_at,
            "resuming after the saved token"),
        None => tracing::info!(store = %store.describe(), "no resume token file; starting from now"),
    }
    // References kept between batches, exact as long as the stream carries their changes.
    let caching = archiver.clone().with_reference_cache(config.enrich.reference_cache_entries);
    let mut state = StreamState {
        checkpoint: saved,
        store,
        namespace: stream_name,
        start: options.start.unwrap_or(StartPosition::Now),
        totals: Totals::default(),
        retry: config.retry.clone(),
        telemetry: telemetry.clone(),
        write_timeout: Duration::from_millis(config.watch.write_timeout_ms),
        max_batch_bytes: config.watch.batch_max_bytes,
        order_bytes: 0,
    };
    // A fill a previous run left unfinished goes on first, where it stopped; then the catch-up
    // asked for, unless that was the fill just finished.
    let unfinished = state.checkpoint.as_ref().and_then(|c| c.fill.clone());
    let caught_up = unfinished.as_ref().is_some_and(|f| f.kind == CATCH_UP);
    if let Some(progress) = unfinished {
        fill(config, dbs, &mut state, &archiver, progress, stop).await?;
    }
    if options.catch_up && !caught_up && !stop.is_cancelled() {
        fill(config, dbs, &mut state, &archiver, new_fill(CATCH_UP, None), stop).await?;
    }
    if stop.is_cancelled() {
        flush_store(&mut state).await?;
        return Ok(());
    }
    let mut delays = keep_trying.schedule();
    let mut attempts = 0usize;
    loop {
        let (result, progressed) = run_stream(config, dbs, [&archiver, &caching], &mut state, stop).await;
        let error = match result {
            Ok(()) => {
                flush_store(&mut state).await?;
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
            Err(StreamFailure::Reopen(why)) => {
                tracing::info!(why, "reopening the change stream after the saved token");
                continue;
            }
            Err(StreamFailure::Mongo(e, context)) => (e, context, false),
            Err(StreamFailure::ArchiveRefused(e)) => (e, "archiving a batch", true),
        };
        let (error, context, refused) = error;
        if stop.is_cancelled() {
            // Asked to stop (or leadership lost) while the stream failed: the position saved is
            // before anything unarchived, so stopping here loses nothing.
            flush_store(&mut state).await?;
            tracing::info!(error = %scrub(&error.to_string()), context, "stopping; position saved");
            return Ok(());
        }
        telemetry.progressed();
        if progressed {
            delays = keep_trying.schedule();
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
                return Err(WatchError::HistoryLost(error));
            };
            let since = checkpoint.last_event_wall_time.unwrap_or(checkpoint.saved_at)
                - chrono::Duration::seconds(config.watch.gap_fill_margin_secs.min(i64::MAX as u64) as i64);
            fill(config, dbs, &mut state, &archiver, new_fill(GAP_FILL, Some(since)), stop).await?;
            if stop.is_cancelled() {
                // The fill was interrupted; the next start fills again from the same position.
                return Ok(());
            }
            continue;
        }
        let mut too_large = false;
        if is_event_too_large(&error) {
            tracing::error!(error = %message, "a change event is too large for the server to send (over 16 MB): \
                reading past it with a stream that carries no order content, and archiving the orders it \
                names that are delivered");
            match read_past_large_event(config, dbs, &archiver, &mut state, stop).await {
                Ok(true) => continue,
                Ok(false) | Err(StreamFailure::Mongo(..)) => too_large = true,
                Err(StreamFailure::Fatal(e)) => return Err(e),
                Err(other) => return Err(other.into()),
            }
        }
        if !is_transient(&error) && !refused && !too_large {
            return Err(WatchError::Database { context, source: error });
        }
        attempts += 1;
        telemetry.stream_lost(if refused { "the archive refuses writes" } else { "reconnecting" });
        telemetry.metrics.reconnects.inc();
        telemetry.metrics.retries.inc();
        // The schedule of an unbounded policy never ends: a service keeps trying.
        let delay = delays.next().unwrap_or(keep_trying.max_delay);
        if refused {
            tracing::error!(attempt = attempts, retry_in_ms = delay.as_millis() as u64, error = %message,
                context, "the archive refuses the batch on its own account (a validator, a privilege, \
                its state), not because of an order: nothing dead-lettered, the position stays before \
                the batch; retrying until the archive accepts it");
        } else {
            tracing::warn!(attempt = attempts, retry_in_ms = delay.as_millis() as u64, error = %message,
                context, "transient database error; reopening the stream after the saved token");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// Reads past the change events after the saved position with a stream that never ships an
/// order's content (see [`read_past_large_events`]), archives those of the orders it names that
/// are delivered, and saves the position after them. Returns whether the position moved.
async fn read_past_large_event(
    config: &Config,
    dbs: &Databases,
    archiver: &Archiver,
    state: &mut StreamState,
    stop: &CancellationToken,
) -> Result<bool, StreamFailure> {
    let failed = |e| StreamFailure::Mongo(e, "reading past a change event too large to send");
    let limit = state.write_timeout;
    let what = "reading past a change event too large to send";
    // Work under way: the liveness probe watches it like a batch.
    state.telemetry.work_pending();
    let resume = state.checkpoint.as_ref().map(|c| c.resume_token.clone());
    let reading = read_past_large_events(config, dbs, resume.as_ref(), config.watch.batch_size * 10);
    let read = db::bounded(reading, what, limit, stop).await.map_err(failed)?;
    for change in &read.references_changed {
        archiver.forget_reference(&change.collection, change.id.as_ref());
    }
    let mut times = EventTimes::new();
    let mut ids = Vec::new();
    for (id, time) in read.orders {
        if let std::collections::hash_map::Entry::Vacant(slot) = times.entry(equality_key(&id)) {
            slot.insert(time.unwrap_or_else(mongodb::bson::DateTime::now));
            ids.push(id);
        }
    }
    let orders = db::on_primary(&dbs.source).collection(&config.orders.collection);
    let delivered_filter = doc! { config.orders.fields.status.clone(): &config.orders.delivered_status };
    let delivered =
        db::bounded(present_among(&orders, &ids, delivered_filter), what, limit, stop).await.map_err(failed)?;
    let (delivered, others): (Vec<Bson>, Vec<Bson>) =
        ids.into_iter().partition(|id| delivered.contains(&equality_key(id)));
    if !others.is_empty() {
        tracing::warn!(orders = others.len(), sample = ?others.iter().take(5).collect::<Vec<_>>(),
            "orders changed past a change event too large to send are not delivered now (or no longer exist): \
             not archived; should one have been delivered and changed since, `archiver verify --repair` archives it");
    }
    let mut outcome = db::bounded(archiver.archive_ids(&delivered, &times), what, limit, stop).await.map_err(failed)?;
    for (position, reason) in &read.unreadable {
        tracing::error!(position = %position, error = %reason, dead_letters = %archiver.dead_letter_location(),
            "a change names no readable order id; dead-lettered");
        db::bounded(archiver.dead_letter_event(position, reason), what, limit, stop).await.map_err(failed)?;
        outcome.dead_lettered += 1;
    }
    let metrics = &state.telemetry.metrics;
    metrics.orders_archived.inc_by(outcome.inserted);
    metrics.dead_letters.inc_by(outcome.dead_lettered);
    metrics.orders_too_large.inc_by(outcome.too_large);
    state.telemetry.work_done();
    tracing::warn!(
        changes = delivered.len() + others.len(),
        archived = outcome.inserted,
        already_archived = outcome.already_archived,
        caught_up = read.token.is_some(),
        "read past a change event too large to send"
    );
    let Some(token) = read.token else { return Ok(false) };
    // The last delivery's times stay, as for an idle stream: a gap-fill starts from them.
    let (cluster_time, wall_time) = state
        .checkpoint
        .as_ref()
        .map(|c| (c.last_event_cluster_time, c.last_event_wall_time))
        .unwrap_or((read.cluster_time, None));
    persist(state, token, cluster_time, wall_time, stop).await?;
    Ok(true)
}

/// Whether `caching` may keep the references it reads, exact through the changes the stream
/// carries: not (references read for every batch) when one is the orders collection itself,
/// is a view (whose changes happen in another collection), or does not exist yet (it could be
/// created as a view, which no change event announces). A reference collection dropped or
/// renamed while the stream runs reopens it, so that this is decided again.
async fn keeps_references(config: &Config, dbs: &Databases, caching: &Archiver) -> bool {
    let references = caching.cached_reference_collections();
    if references.is_empty() {
        return false;
    }
    if references.contains(&config.orders.collection) {
        tracing::warn!("a reference collection is the orders collection: references are read for every batch");
        return false;
    }
    let listed = async {
        let mut specs = dbs.source.list_collections().filter(doc! { "name": { "$in": &references } }).await?;
        let mut collections = Vec::new();
        while let Some(spec) = futures_util::TryStreamExt::try_next(&mut specs).await? {
            if spec.collection_type == mongodb::results::CollectionType::Collection {
                collections.push(spec.name);
            }
        }
        Ok::<_, Error>(collections)
    };
    match listed.await {
        Ok(collections) if references.iter().all(|r| collections.contains(r)) => true,
        Ok(collections) => {
            let others: Vec<&String> = references.iter().filter(|r| !collections.contains(r)).collect();
            tracing::info!(collections = ?others,
                "reference collections that are views or do not exist: references are read for every batch");
            false
        }
        // Not knowing, keep nothing; the stream's own opening tells whether the server answers.
        Err(e) => {
            tracing::warn!(error = %scrub(&e.to_string()), "cannot list the reference collections: references are read for every batch");
            false
        }
    }
}

/// One life of the change stream. Returns whether any batch was archived, so that the caller
/// can reset its backoff. `archivers`: one that reads the references for every batch, and one
/// that keeps them, used when the stream carries their changes.
async fn run_stream(
    config: &Config,
    dbs: &Databases,
    [archiver, caching]: [&Archiver; 2],
    state: &mut StreamState,
    shutdown: &CancellationToken,
) -> (Result<(), StreamFailure>, bool) {
    let mut progressed = false;
    let result = async {
        let resume = state.checkpoint.as_ref().map(|c| &c.resume_token);
        let opened_at = Utc::now();
        let opened = open_stream(config, dbs, resume, state.start, keeps_references(config, dbs, caching).await)
            .await
            .map_err(|e| StreamFailure::Mongo(e, "opening the change stream"))?;
        let stream = opened.stream;
        let archiver = if opened.follows_references {
            // The changes made while no stream carried them are unknown: read everything afresh.
            caching.forget_references();
            caching
        } else {
            archiver
        };
        tracing::info!(namespace = %state.namespace, references_kept = opened.follows_references,
            "change stream open");
        state.telemetry.metrics.reference_cache_enabled.set(i64::from(opened.follows_references));
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
        let writer_idle = Arc::new(AtomicBool::new(true));
        let reader_stop = shutdown.child_token();
        let reader = tokio::spawn(read_batches(
            stream,
            tx,
            config.watch.batch_size,
            Duration::from_millis(config.watch.batch_max_wait_ms),
            open_stream_await(config) + Duration::from_millis(config.watch.stream_timeout_ms),
            writer_idle.clone(),
            [dbs.source.name().to_owned(), config.orders.collection.clone()],
            state.telemetry.clone(),
            reader_stop.clone(),
        ));
        let _stop_reader = reader_stop.clone().drop_guard();
        let outcome = loop {
            writer_idle.store(rx.is_empty(), Ordering::Release);
            let message = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                message = rx.recv() => message,
            };
            writer_idle.store(false, Ordering::Release);
            let Some(message) = message else { break Ok(()) };
            let batch = match message {
                Ok(batch) => batch,
                Err(e) => break Err(StreamFailure::Mongo(e, "reading the change stream")),
            };
            if !batch.events.is_empty() {
                state.telemetry.work_pending();
            }
            // A reference collection dropped or renamed may come back as a view, or be created
            // where none was: what the stream should follow is decided again by reopening it.
            let replaced = batch.references_changed.iter().any(|change| change.id.is_none());
            if let Err(e) = write_batch(archiver, state, batch, &mut progressed, shutdown).await {
                break Err(e);
            }
            state.telemetry.work_done();
            if replaced {
                break Err(StreamFailure::Reopen("a reference collection was dropped or renamed"));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A leader whose lease was lost in an outage of the shared store (the chaos soak: the
    /// server stopped as a standby took over) was reading the checkpoint; that read gave up
    /// with the outage's error when leading ended. It goes back to standby: it used to exit 1.
    #[test]
    fn a_leadership_lost_in_an_outage_goes_back_to_standby_whatever_call_it_ended() {
        let outage = || Error::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"));
        let reading =
            || WatchError::Checkpoint(StoreError::Database { context: "reading the checkpoint", source: outage() });
        assert!(back_to_standby(&Err(reading()), true));
        assert!(back_to_standby(&Err(WatchError::Database { context: "reading the stream", source: outage() }), true));
        assert!(back_to_standby(&Ok(()), true));
        assert!(back_to_standby(&Err(WatchError::Checkpoint(StoreError::Fenced("s".to_owned()))), false));
        // Still leading: the error is the process's own, and ends it.
        assert!(!back_to_standby(&Err(reading()), false));
        assert!(!back_to_standby(&Ok(()), false));
        // Lost, but an error no outage explains: it ends the process.
        assert!(!back_to_standby(&Err(WatchError::Usage("bad".to_owned())), true));
        let denied = Error::custom("not authorized");
        assert!(!back_to_standby(&Err(WatchError::Database { context: "reading the stream", source: denied }), true));
    }
}
