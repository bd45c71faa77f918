//! Filling the archive from the orders collection: the catch-up before streaming, and the
//! gap-fill after the stream lost its history. A fill archives the orders it matches in `_id`
//! order and saves how far it went with the checkpoint as it goes: a fill stopped by a crash, a
//! kill or a restart is continued by the next start where it stopped, never begun again.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::options::Hint;
use tokio_util::sync::CancellationToken;

use super::stream::{open_stream, StartPosition};
use super::writer::{persist_checkpoint, StreamState};
use super::WatchError;
use crate::checkpoint::{Checkpoint, FillProgress};
use crate::config::Config;
use crate::coordination;
use crate::db::{self, is_transient, Databases, RetryPolicy};
use crate::pipeline::document::ArchiveSource;
use crate::pipeline::sink::{id_of, Archiver, WriteOutcome};

/// The catch-up's kind, as recorded in the checkpoint.
pub(super) const CATCH_UP: &str = "catch-up";
/// The gap-fill's kind, as recorded in the checkpoint.
pub(super) const GAP_FILL: &str = "gap-fill";

/// How often a fill saves how far it went, at most.
const SAVE_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A fill of `kind` that begins now (for a gap-fill, of the orders delivered since `since`).
pub(super) fn new_fill(kind: &str, since: Option<DateTime<Utc>>) -> FillProgress {
    FillProgress { kind: kind.to_owned(), since, after: None, started_at: Utc::now() }
}

/// The delivered orders a fill of `progress` archives: for the catch-up, every delivered order;
/// for a gap-fill, those a stream that lost its history since `since` may have missed (delivered
/// since then by their own delivery date, and those whose delivery date is unknown). Either way
/// only the orders after `progress.after` in `_id` order, which are not done yet.
fn fill_filter(config: &Config, progress: &FillProgress) -> Document {
    let f = &config.orders.fields;
    let mut filter = doc! { f.status.clone(): &config.orders.delivered_status };
    if let Some(since) = progress.since.filter(|_| progress.kind == GAP_FILL) {
        let since = mongodb::bson::DateTime::from_chrono(since);
        filter.insert(
            "$or",
            vec![
                doc! { f.date_livraison.clone(): { "$gte": since } },
                doc! { f.date_livraison.clone(): { "$not": { "$type": "date" } } },
            ],
        );
    }
    let filter = coordination::restrict_to_partition(config, filter, "$_id");
    match &progress.after {
        // `$expr` compares across types in BSON order, as the sort does (a query `$gt` would
        // skip the ids of other types).
        Some(after) => doc! { "$and": [filter, { "$expr": { "$gt": ["$_id", { "$literal": after }] } }] },
        None => filter,
    }
}

/// Runs `progress` to its end (a fill that begins, or one a previous run saved unfinished) and
/// leaves the stream at a position taken *before* the fill began, so that nothing delivered
/// during the fill falls between the two; a catch-up over a saved position keeps that position.
/// The position is saved with the fill's progress when the fill begins and then every second:
/// whatever stops it, the next start continues the fill before it streams. A transient database
/// error is ridden out (the fill goes on from its progress).
pub(super) async fn fill(
    config: &Config,
    dbs: &Databases,
    state: &mut StreamState,
    watching: &Archiver,
    mut progress: FillProgress,
    shutdown: &CancellationToken,
) -> Result<(), WatchError> {
    let what = if progress.kind == CATCH_UP { CATCH_UP } else { GAP_FILL };
    let continuing = state.checkpoint.as_ref().is_some_and(|c| c.fill.is_some());
    let keep_trying = RetryPolicy::unbounded(&config.retry);
    let keep_position = continuing || (what == CATCH_UP && state.checkpoint.is_some());
    let mut checkpoint = match (&state.checkpoint, keep_position) {
        (Some(saved), true) => saved.clone(),
        _ => {
            // The time the new position stands for is when it was taken, not when the fill
            // ended: a later gap-fill must start from here, or it would miss what was
            // delivered during this one.
            let taken_at = Utc::now();
            let open = async || open_stream(config, dbs, None, StartPosition::Now, false).await;
            let opened = db::retry(
                &keep_trying,
                "cannot open a change stream before the fill",
                is_transient,
                Some(shutdown),
                open,
            )
            .await
            .map_err(|failed| WatchError::Fill(failed.error.into()))?;
            let Some(token) = opened.stream.resume_token() else {
                return Err(WatchError::Fill("the change stream gave no position to start from".into()));
            };
            Checkpoint::now(token, &state.namespace, None, Some(taken_at))
        }
    };
    if continuing {
        tracing::warn!(fill = what, after = ?progress.after, started_at = %progress.started_at,
            "continuing a fill a previous run left unfinished, where it stopped");
    }
    checkpoint.fill = Some(progress.clone());
    save(state, &checkpoint, shutdown).await?;
    // A fill is long work of its own, bounded by its retries; the liveness clock is for batches,
    // and the fill's own progress keeps the process live (and its start time extended).
    state.telemetry.work_done();
    state.telemetry.fill_progressed(0);
    let started = Instant::now();
    // Into the store `watch` writes to, whatever it is: a table's rows commit with the position.
    let archiver = Archiver::sharing_store(config, dbs, ArchiveSource::Batch, watching);
    let mut total = WriteOutcome::default();
    let mut last_save = Instant::now();
    loop {
        let run = archive_in_id_order(
            config,
            dbs,
            &archiver,
            &mut progress,
            state,
            &mut checkpoint,
            &mut last_save,
            &mut total,
            shutdown,
        );
        match run.await {
            Ok(()) => break,
            Err(FillError::Stopped(e)) => return Err(e),
            Err(FillError::Database(e)) if is_transient(&e) && !shutdown.is_cancelled() => {
                state.telemetry.metrics.retries.inc();
                tracing::warn!(fill = what, error = %crate::redact::scrub(&e.to_string()), after = ?progress.after,
                    "the fill failed; going on from its progress");
                tokio::select! {
                    _ = tokio::time::sleep(keep_trying.max_delay.min(Duration::from_secs(1))) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            Err(FillError::Database(e)) => {
                if shutdown.is_cancelled() {
                    break;
                }
                return Err(WatchError::Fill(e.into()));
            }
        }
    }
    tracing::warn!(
        fill = what,
        newly_archived = total.inserted,
        already_archived = total.already_archived,
        anomalies = total.anomalies,
        dead_lettered = total.dead_lettered,
        duration_ms = started.elapsed().as_millis() as u64,
        "archive filled from the orders collection"
    );
    if shutdown.is_cancelled() {
        // Stopped: the progress saved so far is where the next start goes on.
        save(state, &checkpoint, shutdown).await?;
        return Ok(());
    }
    checkpoint.fill = None;
    checkpoint.saved_at = Utc::now();
    save(state, &checkpoint, shutdown).await
}

/// Why a pass of a fill ended early.
enum FillError {
    /// For good (the checkpoint could not be saved).
    Stopped(WatchError),
    /// A database error: a transient one is ridden out.
    Database(mongodb::error::Error),
}

/// One pass over the orders `progress` still has to fill, in `_id` order, `batch.chunk_size`
/// at a time and up to `batch.concurrency` chunks at once (their results taken in order, so
/// that `progress.after` only ever names an id before which all is done).
#[allow(clippy::too_many_arguments)]
async fn archive_in_id_order(
    config: &Config,
    dbs: &Databases,
    archiver: &Archiver,
    progress: &mut FillProgress,
    state: &mut StreamState,
    checkpoint: &mut Checkpoint,
    last_save: &mut Instant,
    total: &mut WriteOutcome,
    shutdown: &CancellationToken,
) -> Result<(), FillError> {
    let orders = db::on_primary(&dbs.source).collection::<RawDocumentBuf>(&config.orders.collection);
    let chunk_size = config.batch.chunk_size.max(1);
    let cursor = orders
        .find(fill_filter(config, progress))
        .projection(doc! { "_id": 1 })
        .sort(doc! { "_id": 1 })
        .hint(Hint::Keys(doc! { "_id": 1 }))
        .batch_size(chunk_size.min(100_000) as u32)
        .await
        .map_err(FillError::Database)?;
    let policy = RetryPolicy::bounded(&config.retry);
    let chunks = cursor
        .try_chunks(chunk_size)
        .take_until(shutdown.cancelled())
        .map(|chunk| async {
            let ids: Vec<Bson> = chunk.map_err(|e| e.1)?.iter().map(|d| id_of(d)).collect();
            let archive = async || archiver.archive_missing_ids(&ids).await;
            let outcome = db::retry(&policy, "archiving a chunk of the fill", is_transient, Some(shutdown), archive)
                .await
                .map_err(|failed| failed.error)?;
            Ok::<_, mongodb::error::Error>((ids, outcome))
        })
        .buffered(config.batch.concurrency.max(1));
    let mut chunks = std::pin::pin!(chunks);
    while let Some(done) = chunks.next().await {
        let (ids, outcome) = done.map_err(FillError::Database)?;
        *total += outcome;
        state.telemetry.metrics.orders_archived.inc_by(outcome.inserted);
        state.telemetry.fill_progressed(ids.len() as u64);
        progress.after = ids.last().cloned();
        checkpoint.fill = Some(progress.clone());
        if last_save.elapsed() >= SAVE_PROGRESS_EVERY {
            *last_save = Instant::now();
            checkpoint.saved_at = Utc::now();
            save(state, checkpoint, shutdown).await.map_err(FillError::Stopped)?;
        }
    }
    Ok(())
}

/// Saves `checkpoint` (with the fill's progress in it), as every save of the stream is.
async fn save(
    state: &mut StreamState,
    checkpoint: &Checkpoint,
    shutdown: &CancellationToken,
) -> Result<(), WatchError> {
    persist_checkpoint(state, checkpoint.clone(), shutdown).await.map(|_| ()).map_err(WatchError::from)
}
