//! Filling the archive from the orders collection: the catch-up before streaming, and the
//! gap-fill after the stream lost its history.

use std::time::Instant;

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Document};
use tokio_util::sync::CancellationToken;

use super::stream::{open_stream, StartPosition};
use super::writer::{persist, StreamState};
use super::WatchError;
use crate::config::{Config, WritePath};
use crate::coordination;
use crate::db::{self, is_transient, Databases, RetryPolicy};
use crate::pipeline::document::ArchiveSource;
use crate::pipeline::scan::archive_matching;
use crate::pipeline::sink::Archiver;

/// The delivered orders a stream that lost its history since `since` may have missed: those
/// delivered since then by their own delivery date, and those whose delivery date is unknown.
pub(super) fn gap_filter(config: &Config, since: DateTime<Utc>) -> Document {
    let f = &config.orders.fields;
    let since = mongodb::bson::DateTime::from_chrono(since);
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
pub(super) async fn fill(
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
    // A service rides out a database outage during a fill as it does while streaming: the fill
    // is idempotent (orders already archived are skipped), so it is simply run again.
    let keep_trying = RetryPolicy::unbounded(&config.retry);
    let start_token = if keep_position {
        None
    } else {
        let open = async || open_stream(config, dbs, None, StartPosition::Now, false).await;
        let opened =
            db::retry(&keep_trying, "cannot open a change stream before the fill", is_transient, Some(shutdown), open)
                .await
                .map_err(|failed| WatchError::Fill(failed.error.into()))?;
        opened.stream.resume_token()
    };
    // A fill is long work of its own, bounded by its retries; the liveness clock is for batches,
    // and the fill's own progress keeps the process live (and its start time extended).
    state.telemetry.work_done();
    state.telemetry.fill_progressed(0);
    let started = Instant::now();
    let archiver = Archiver::new(config, dbs, ArchiveSource::Batch);
    let archive = async || {
        let telemetry = &state.telemetry;
        let advanced = |orders: u64| telemetry.fill_progressed(orders);
        let filled =
            archive_matching(config, dbs, &archiver, &filter, WritePath::Client, true, shutdown, &advanced).await;
        state.telemetry.work_done();
        filled.map_err(FillError)
    };
    let (matched, outcome) =
        db::retry(&keep_trying, "the fill failed; filling again", FillError::is_transient, Some(shutdown), archive)
            .await
            .map_err(|failed| WatchError::Fill(failed.error.0.into()))?;
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

/// A failed fill, told apart by its database cause.
struct FillError(anyhow::Error);

impl FillError {
    /// Whether a database error in the chain is transient (a fill is then run again).
    fn is_transient(&self) -> bool {
        self.0.chain().any(|cause| cause.downcast_ref::<mongodb::error::Error>().is_some_and(is_transient))
    }
}

impl std::fmt::Display for FillError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The chain in one line: the retry's warning names the cause, not only the context.
        write!(f, "{:#}", self.0)
    }
}
