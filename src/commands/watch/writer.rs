//! The writer: archives a batch of the stream (in slices when its documents are large), then
//! saves its position, never before the archive acknowledged it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::bson::{Bson, RawDocumentBuf, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::error::Error;
use tokio_util::sync::CancellationToken;

use super::stream::{StartPosition, StreamBatch};
use super::{Totals, WatchError};
use crate::checkpoint::{Checkpoint, Store, StoreError};
use crate::config::RetrySettings;
use crate::db::{self, bounded, RetryPolicy};
use crate::pipeline::order_id::equality_key;
use crate::pipeline::sink::{id_of, Archiver, EventTimes, WriteOutcome};
use crate::telemetry::Telemetry;

/// What survives a stream restart.
pub(super) struct StreamState {
    pub(super) checkpoint: Option<Checkpoint>,
    pub(super) store: Store,
    pub(super) namespace: String,
    pub(super) start: StartPosition,
    pub(super) totals: Totals,
    pub(super) retry: RetrySettings,
    pub(super) telemetry: Arc<Telemetry>,
    /// Longest wait for an archive write or a checkpoint save.
    pub(super) write_timeout: Duration,
    /// Most bytes of archive documents enriched and written at once.
    pub(super) max_batch_bytes: u64,
    /// The average size of the orders read so far (a moving average; 0 until the first), which
    /// sizes how many are read at a time: what is held stays bounded by their actual sizes
    /// whatever this says.
    pub(super) order_bytes: u64,
}

/// Why a stream's life ended: for good, or on a database error the caller may ride out.
pub(super) enum StreamFailure {
    Fatal(WatchError),
    Mongo(Error, &'static str),
    /// Not a failure: the stream is reopened at once after the saved position, for this reason.
    Reopen(&'static str),
    /// The archive refused a batch on its own account (see [`db::is_archive_refusal`]): retried
    /// until it accepts, like a transient error, since no order is at fault.
    ArchiveRefused(Error),
}

impl From<StoreError> for StreamFailure {
    fn from(e: StoreError) -> Self {
        StreamFailure::Fatal(e.into())
    }
}

impl From<StreamFailure> for WatchError {
    fn from(failure: StreamFailure) -> Self {
        match failure {
            StreamFailure::Fatal(e) => e,
            StreamFailure::Mongo(source, context) => WatchError::Database { context, source },
            StreamFailure::Reopen(why) => WatchError::Database { context: why, source: Error::custom(why) },
            StreamFailure::ArchiveRefused(source) => WatchError::Database { context: "archiving a batch", source },
        }
    }
}

/// Archives one batch, then saves its token.
pub(super) async fn write_batch(
    archiver: &Archiver,
    state: &mut StreamState,
    batch: StreamBatch,
    progressed: &mut bool,
    shutdown: &CancellationToken,
) -> Result<(), StreamFailure> {
    // Changed references first: the orders of this batch were delivered after some of them.
    for change in &batch.references_changed {
        archiver.forget_reference(&change.collection, change.id.as_ref());
    }
    if !batch.references_changed.is_empty() {
        tracing::debug!(changes = batch.references_changed.len(), "changed references forgotten");
    }
    if !batch.events.is_empty() {
        let started = Instant::now();
        let mut times = EventTimes::with_capacity(batch.events.len());
        let mut ids: Vec<Bson> = Vec::with_capacity(batch.events.len());
        let mut unreadable = Vec::new();
        for event in &batch.events {
            let id = match event.order_id() {
                Ok(id) => id,
                Err(reason) => {
                    unreadable.push((event.position(), reason));
                    continue;
                }
            };
            let time = event.wall_time.or_else(|| {
                event.cluster_time.map(|ts| mongodb::bson::DateTime::from_millis(i64::from(ts.time) * 1000))
            });
            // A repeated id (delivered twice in one batch) is archived once.
            if let std::collections::hash_map::Entry::Vacant(slot) = times.entry(equality_key(&id)) {
                slot.insert(time.unwrap_or_else(mongodb::bson::DateTime::now));
                ids.push(id);
            }
        }
        let telemetry = state.telemetry.clone();
        let metrics = &telemetry.metrics;
        metrics.events_received.inc_by(batch.events.len() as u64);
        let last = batch.events.last().expect("non-empty");
        let wall_time: Option<DateTime<Utc>> = last
            .wall_time
            .map(|t| t.to_chrono())
            .or_else(|| last.cluster_time.and_then(|ts| DateTime::from_timestamp(i64::from(ts.time), 0)));
        let cluster_time = last.cluster_time;
        // A batch is enriched and written in slices of at most half `max_batch_bytes` of orders,
        // by their actual sizes as they are read (its checkpoint still saved only after the
        // last), so memory stays bounded whatever the sizes of the orders of a burst.
        let archived = async {
            let (mut outcome, slices) = archive_within(archiver, &ids, &times, state, shutdown).await?;
            // A delivery whose order cannot be named is recorded, never passed over in silence.
            for (position, reason) in &unreadable {
                tracing::error!(position = %position, error = %reason, dead_letters = %archiver.dead_letter_location(),
                    "a delivery event names no readable order id; dead-lettered");
                archiver.dead_letter_event(position, reason).await?;
                outcome.dead_lettered += 1;
            }
            Ok::<_, Error>((outcome, slices))
        };
        let (outcome, slices) = match archived.await {
            Ok(archived) => archived,
            Err(e) if db::is_archive_refusal(&e) => {
                state.telemetry.write_result(false);
                return Err(StreamFailure::ArchiveRefused(e));
            }
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
        metrics.orders_too_large.inc_by(outcome.too_large);
        metrics.batches.inc();
        metrics.batch_duration.observe(started.elapsed().as_secs_f64());
        if let Some(cache) = archiver.take_reference_cache_stats() {
            state.telemetry.reference_cache_observed(cache.hits, cache.misses, cache.invalidations, cache.entries);
        }
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
            slices,
            inserted = outcome.inserted,
            already_archived = outcome.already_archived,
            anomalies = outcome.anomalies,
            dead_lettered = outcome.dead_lettered,
            lag_ms,
            duration_ms = started.elapsed().as_millis() as u64,
            "batch archived"
        );
        if let Some(token) = batch.token.clone() {
            persist(state, token, cluster_time, wall_time, shutdown).await?;
        }
    } else if let Some(token) = batch.token.clone() {
        // The last event's times stay: a gap-fill after lost history starts from the last
        // archived delivery, never later.
        let (ct, wt) = state
            .checkpoint
            .as_ref()
            .map(|c| (c.last_event_cluster_time, c.last_event_wall_time))
            .unwrap_or((None, None));
        // But the token itself now stands for the present: the stream read everything up to
        // now. The token's age and the oplog headroom (here and in `archiver health`) count from
        // here, not from the last delivery, or a quiet stream would look about to fall out of
        // the oplog.
        let mut checkpoint = Checkpoint::now(token, &state.namespace, ct, wt);
        checkpoint.position_time = Some(checkpoint.saved_at);
        if persist_checkpoint(state, checkpoint, shutdown).await? {
            tracing::debug!("idle stream: resume token advanced");
        }
    }
    if let Some(operation) = batch.invalidated {
        return Err(StreamFailure::Fatal(WatchError::Invalidated { namespace: state.namespace.clone(), operation }));
    }
    Ok(())
}

/// Archives the orders `ids`, read as stored a few at a time and archived in slices of at most
/// half `max_batch_bytes` of orders (the other half is for their archive documents); the ids not
/// found (deleted since their delivery) last. Each read and each slice is bounded by the write
/// timeout. Returns what was written and in how many slices.
async fn archive_within(
    archiver: &Archiver,
    ids: &[Bson],
    times: &EventTimes,
    state: &mut StreamState,
    shutdown: &CancellationToken,
) -> Result<(WriteOutcome, usize), Error> {
    let (limit, slice_bytes) = (state.write_timeout, (state.max_batch_bytes / 2).max(1));
    // Read ahead about a slice's worth (the server sends at most 16 MB at a time anyway).
    let read_ahead = match state.order_bytes {
        0 => FIRST_READ_AHEAD,
        bytes => (slice_bytes / bytes).clamp(1, MAX_READ_AHEAD) as u32,
    };
    let mut outcome = WriteOutcome::default();
    let mut slices = 0;
    let mut found = std::collections::HashSet::with_capacity(ids.len());
    let mut slice: Vec<RawDocumentBuf> = Vec::new();
    let (mut held, mut read_bytes) = (0, 0);
    let reading = "reading the delivered orders";
    let mut orders = bounded(archiver.orders_by_id(ids, read_ahead), reading, limit, shutdown).await?;
    loop {
        let next = bounded(orders.try_next(), reading, limit, shutdown).await?;
        let done = next.is_none();
        if let Some(order) = next {
            held += order.as_bytes().len() as u64;
            found.insert(equality_key(&id_of(&order)));
            slice.push(order);
        }
        if !slice.is_empty() && (done || held >= slice_bytes) {
            outcome +=
                bounded(archiver.archive_read_orders(&slice, times), "archiving a batch", limit, shutdown).await?;
            slices += 1;
            read_bytes += held;
            slice.clear();
            held = 0;
        }
        if done {
            break;
        }
    }
    if !found.is_empty() {
        let sample = read_bytes / found.len() as u64;
        state.order_bytes = if state.order_bytes == 0 { sample } else { (state.order_bytes * 3 + sample) / 4 };
    }
    let vanished: Vec<Bson> = ids.iter().filter(|id| !found.contains(&equality_key(id))).cloned().collect();
    if !vanished.is_empty() {
        outcome += bounded(archiver.archive_ids(&vanished, times), "archiving a batch", limit, shutdown).await?;
        slices += 1;
    }
    Ok((outcome, slices))
}

/// How many orders are read at a time before their size is known.
const FIRST_READ_AHEAD: u32 = 16;
/// The most orders read at a time.
const MAX_READ_AHEAD: u64 = 1000;

/// Saves the position, retrying with backoff while the disk (or the shared store) refuses.
/// Until it succeeds no further batch is taken, so the token never runs ahead of the archive.
/// Past the retry bounds a disk error is fatal (exit 3), and a database error ends the stream's
/// life like any other (it reopens after the saved token). A fenced save (a newer leader) fails
/// at once.
pub(super) async fn persist(
    state: &mut StreamState,
    token: ResumeToken,
    cluster_time: Option<Timestamp>,
    wall_time: Option<DateTime<Utc>>,
    shutdown: &CancellationToken,
) -> Result<bool, StreamFailure> {
    let checkpoint = Checkpoint::now(token, &state.namespace, cluster_time, wall_time);
    persist_checkpoint(state, checkpoint, shutdown).await
}

/// [`persist`], of a checkpoint already made.
pub(super) async fn persist_checkpoint(
    state: &mut StreamState,
    checkpoint: Checkpoint,
    shutdown: &CancellationToken,
) -> Result<bool, StreamFailure> {
    let policy = RetryPolicy::bounded(&state.retry);
    let retryable =
        |e: &StoreError| matches!(e, StoreError::Unwritable { .. } | StoreError::Table { .. }) || e.is_transient();
    let (store, telemetry, limit) = (&mut state.store, &state.telemetry, state.write_timeout);
    let save = async || {
        // Waiting is progress of a kind: the liveness probe must not restart a process that
        // only waits for its disk or its database to come back.
        telemetry.progressed();
        let save = async { Ok(store.save(&checkpoint).await) };
        bounded(save, "saving the checkpoint", limit, shutdown)
            .await
            .unwrap_or_else(|source| Err(StoreError::Database { context: "saving the checkpoint", source }))
    };
    match db::retry(
        &policy,
        "cannot save the resume token; holding new batches until it can be saved",
        retryable,
        Some(shutdown),
        save,
    )
    .await
    {
        Ok(written) => {
            saved(state, checkpoint);
            Ok(written)
        }
        Err(failed) => Err(match failed.error {
            StoreError::Database { source, context } => StreamFailure::Mongo(source, context),
            other => StreamFailure::Fatal(other.into()),
        }),
    }
}

/// Records a durable checkpoint in memory and in the metrics.
pub(super) fn saved(state: &mut StreamState, checkpoint: Checkpoint) {
    let position = checkpoint.position();
    state.telemetry.checkpoint_saved(Some(position.timestamp_millis()));
    state.checkpoint = Some(checkpoint);
}
