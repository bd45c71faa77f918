//! `archiver verify`: reconciles the archive with the source for a date range: delivered orders
//! per day on each side, the ids missing from the archive and the archive documents with no
//! delivered order behind them (orphans); with `--repair`, archives what is missing.
//!
//! Both sides are streamed in chunks and checked by `_id` against the other side, so memory
//! holds one chunk plus the differences, whatever the size of the range; every query names at
//! most one chunk of ids, far below the 16 MB limit of a command. Ids are compared as MongoDB
//! compares them ([`equality_key`]): an order archived under `NumberLong(1)` is the order `1`.

use std::collections::{BTreeMap, HashSet};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::Collection;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db;
use crate::db::RetryPolicy;
use crate::pipeline::document::{field, ArchiveSource};
use crate::pipeline::order_id::{equality_key, id_text, present_among};
use crate::pipeline::scan::{delivered_in_range, DateRange};
use crate::pipeline::sink::{ArchivedRow, Archiver};

/// One day of the report.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct DayReport {
    /// `YYYY-MM-DD` (UTC) of `date_commande`.
    pub day: String,
    /// Delivered orders in the source.
    pub source: u64,
    /// Archive documents.
    pub archive: u64,
    /// Delivered orders missing from the archive.
    pub missing: u64,
    /// Archive documents without a delivered order.
    pub orphaned: u64,
    /// Archive documents whose order `purge` deleted from the source (not orphans).
    pub purged: u64,
}

/// The whole report (also the `--json` output).
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Range start (inclusive).
    pub date_from: DateTime<Utc>,
    /// Range end (exclusive), if any.
    pub date_to: Option<DateTime<Utc>>,
    /// Whether source and archive agree (after any repair).
    pub consistent: bool,
    /// Delivered orders in the range.
    pub source_delivered: u64,
    /// Archive documents in the range.
    pub archived: u64,
    /// Ids of delivered orders not in the archive (after any repair).
    pub missing: Vec<String>,
    /// Ids of archive documents whose order is gone or no longer delivered, other than those
    /// `purge` deleted.
    pub orphaned: Vec<String>,
    /// Archive documents whose order `archiver purge` deleted from the source, after verifying
    /// the copy: expected, not an inconsistency.
    pub purged: u64,
    /// Orders archived by `--repair`.
    pub repaired: u64,
    /// Per-day counts.
    pub days: Vec<DayReport>,
}

/// What a reconciliation counted, whichever the archive.
struct Counts {
    source_delivered: u64,
    archived: u64,
    purged: u64,
    repaired: u64,
}

impl VerifyReport {
    /// The report of a reconciliation of `range`: the counts, the ids still missing (after any
    /// repair), the orphans, and the days.
    fn of(
        range: DateRange,
        counts: Counts,
        missing_ids: &[Bson],
        orphaned: Vec<String>,
        days: BTreeMap<String, DayReport>,
    ) -> VerifyReport {
        let missing: Vec<String> = missing_ids.iter().map(id_text).collect();
        VerifyReport {
            date_from: range.from,
            date_to: range.to,
            consistent: missing.is_empty() && orphaned.is_empty(),
            source_delivered: counts.source_delivered,
            archived: counts.archived,
            purged: counts.purged,
            missing,
            orphaned,
            repaired: counts.repaired,
            days: days.into_values().collect(),
        }
    }
}

/// Ids per query (`$in`), on both sides and in the repair.
const CHUNK: usize = 1000;

fn day_of(doc: &Document, field: &str) -> String {
    doc.get_datetime(field)
        .ok()
        .map(|d| d.to_chrono())
        .map(|d| d.date_naive().to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Reads the ids (and days) of `documents` in chunks and asks `counterpart`, chunk by chunk,
/// which of them it holds in a document matching `filter`; `tally` gets each id, its day, and
/// whether it is held. The one scan both sides of the reconciliation use.
async fn reconcile(
    documents: mongodb::Cursor<Document>,
    day_field: &str,
    counterpart: &Collection<Document>,
    filter: &Document,
    mut tally: impl FnMut(Bson, String, bool, &Document),
) -> mongodb::error::Result<()> {
    let mut chunks = std::pin::pin!(documents.try_chunks(CHUNK));
    while let Some(chunk) = chunks.try_next().await.map_err(|e| e.1)? {
        let ids: Vec<Bson> = chunk.iter().map(|d| d.get("_id").cloned().unwrap_or(Bson::Null)).collect();
        let held = present_among(counterpart, &ids, filter.clone()).await?;
        for (id, d) in ids.into_iter().zip(&chunk) {
            let is_held = held.contains(&equality_key(&id));
            tally(id, day_of(d, day_field), is_held, d);
        }
    }
    Ok(())
}

/// Runs the reconciliation.
pub async fn run(
    config: &Config,
    range: DateRange,
    repair: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<VerifyReport> {
    let policy = RetryPolicy::bounded(&config.retry);
    let dbs = tokio::select! {
        dbs = db::connect(config, &policy) => dbs?,
        _ = shutdown.cancelled() => anyhow::bail!("interrupted before connecting"),
    };
    let archiver = Archiver::open(config, &dbs, ArchiveSource::Batch).await?;
    if let Some(rows) = archiver.rows_in(range.from, range.to).await? {
        return verify_table(config, &dbs, &archiver, range, repair, rows).await;
    }
    let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
    let archive: Collection<Document> = dbs.archive.collection(&config.archive.collection);
    let date_field = config.orders.fields.date_commande.clone();
    let mut days: BTreeMap<String, DayReport> = BTreeMap::new();

    // Source side: every delivered order of the range must be in the archive (by id).
    let mut missing_ids: Vec<Bson> = Vec::new();
    let mut source_delivered = 0u64;
    let cursor = orders
        .find(delivered_in_range(config, range))
        .projection(doc! { "_id": 1, date_field.clone(): 1 })
        .await
        .context("reading the delivered orders")?;
    reconcile(cursor, &date_field, &archive, &doc! {}, |id, day, archived, _| {
        source_delivered += 1;
        let entry = days.entry(day.clone()).or_insert_with(|| DayReport { day, ..Default::default() });
        entry.source += 1;
        if !archived {
            entry.missing += 1;
            missing_ids.push(id);
        }
    })
    .await
    .context("comparing the delivered orders with the archive")?;

    // Archive side: every archive document of the range must have a delivered order behind it.
    let mut archive_range = doc! {};
    let mut dates = doc! { "$gte": mongodb::bson::DateTime::from_chrono(range.from) };
    if let Some(to) = range.to {
        dates.insert("$lt", mongodb::bson::DateTime::from_chrono(to));
    }
    archive_range.insert("date_commande", dates);
    let archive_range = crate::coordination::restrict_to_partition(config, archive_range, "$_id");
    let delivered = doc! { config.orders.fields.status.clone(): &config.orders.delivered_status };
    let mut orphaned = Vec::new();
    let mut archived_total = 0u64;
    let mut purged = 0u64;
    let cursor = archive
        .find(archive_range)
        .projection(doc! { "_id": 1, "date_commande": 1, field::PURGED_AT: 1 })
        .await
        .context("reading the archive")?;
    reconcile(cursor, "date_commande", &orders, &delivered, |id, day, delivered, copy| {
        archived_total += 1;
        let entry = days.entry(day.clone()).or_insert_with(|| DayReport { day, ..Default::default() });
        entry.archive += 1;
        if !delivered && copy.contains_key(field::PURGED_AT) {
            entry.purged += 1;
            purged += 1;
        } else if !delivered {
            entry.orphaned += 1;
            orphaned.push(id_text(&id));
        }
    })
    .await
    .context("comparing the archive with the delivered orders")?;

    let mut repaired = 0;
    if repair && !missing_ids.is_empty() {
        let mut still_missing = Vec::new();
        // Chunk by chunk: one `$in` of every missing id would pass the 16 MB command limit
        // (around 800,000 ObjectIds).
        for ids in missing_ids.chunks(CHUNK) {
            let outcome = archiver.archive_missing_ids(ids).await.context("repairing")?;
            repaired += outcome.inserted;
            let archived = present_among(&archive, ids, doc! {}).await.context("checking the repair")?;
            still_missing.extend(ids.iter().filter(|id| !archived.contains(&equality_key(id))).cloned());
        }
        tracing::info!(repaired, still_missing = still_missing.len(), "missing orders archived (--repair)");
        missing_ids = still_missing;
    }
    let counts = Counts { source_delivered, archived: archived_total, purged, repaired };
    Ok(VerifyReport::of(range, counts, &missing_ids, orphaned, days))
}

/// [`run`] on an archive kept as a table, whose rows of the range are read at once (three
/// columns): the delivered orders of the range are compared with them by id, and so are they
/// with the delivered orders. An archived order whose source order is no longer delivered, or
/// whose order date moved out of the range, is an orphan (unless purged).
async fn verify_table(
    config: &Config,
    dbs: &db::Databases,
    archiver: &Archiver,
    range: DateRange,
    repair: bool,
    rows: Vec<ArchivedRow>,
) -> anyhow::Result<VerifyReport> {
    if config.coordination.partitions > 1 {
        return Err(crate::error::UsageError(
            "verify of a Delta table covers every partition: run it without --partitions".to_owned(),
        )
        .into());
    }
    let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
    let date_field = config.orders.fields.date_commande.clone();
    let mut days: BTreeMap<String, DayReport> = BTreeMap::new();
    let held: HashSet<&str> = rows.iter().map(|row| row.id.as_str()).collect();
    let (mut source_delivered, mut delivered_ids, mut missing_ids) = (0u64, HashSet::new(), Vec::new());
    let mut cursor = orders
        .find(delivered_in_range(config, range))
        .projection(doc! { "_id": 1, date_field.clone(): 1 })
        .await
        .context("reading the delivered orders")?;
    while let Some(order) = cursor.try_next().await.context("reading the delivered orders")? {
        let id = order.get("_id").cloned().unwrap_or(Bson::Null);
        let text = id_text(&id);
        let day = day_of(&order, &date_field);
        source_delivered += 1;
        let entry = days.entry(day.clone()).or_insert_with(|| DayReport { day, ..Default::default() });
        entry.source += 1;
        if !held.contains(text.as_str()) {
            entry.missing += 1;
            missing_ids.push(id);
        }
        delivered_ids.insert(text);
    }
    let (mut orphaned, mut purged) = (Vec::new(), 0u64);
    for row in &rows {
        let entry =
            days.entry(row.day.clone()).or_insert_with(|| DayReport { day: row.day.clone(), ..Default::default() });
        entry.archive += 1;
        if delivered_ids.contains(&row.id) {
            continue;
        }
        if row.purged {
            entry.purged += 1;
            purged += 1;
        } else {
            entry.orphaned += 1;
            orphaned.push(row.id.clone());
        }
    }
    let mut repaired = 0;
    if repair && !missing_ids.is_empty() {
        for ids in missing_ids.chunks(CHUNK) {
            repaired += archiver.archive_missing_ids(ids).await.context("repairing")?.inserted;
        }
        archiver.finish().await.context("committing the repair")?;
        let now_held: HashSet<String> =
            archiver.rows_in(range.from, range.to).await?.unwrap_or_default().into_iter().map(|row| row.id).collect();
        missing_ids.retain(|id| !now_held.contains(&id_text(id)));
        tracing::info!(repaired, still_missing = missing_ids.len(), "missing orders archived (--repair)");
    }
    let counts = Counts { source_delivered, archived: rows.len() as u64, purged, repaired };
    Ok(VerifyReport::of(range, counts, &missing_ids, orphaned, days))
}

/// The human-readable report.
pub fn render(report: &VerifyReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let to = report.date_to.map(|t| t.to_rfc3339()).unwrap_or_else(|| "now".to_owned());
    let _ = writeln!(out, "verify {} .. {}", report.date_from.to_rfc3339(), to);
    let _ = writeln!(out, "{:<12} {:>10} {:>10} {:>8} {:>8}", "day", "delivered", "archived", "missing", "orphaned");
    for d in &report.days {
        let _ = writeln!(out, "{:<12} {:>10} {:>10} {:>8} {:>8}", d.day, d.source, d.archive, d.missing, d.orphaned);
    }
    let _ = writeln!(
        out,
        "{:<12} {:>10} {:>10} {:>8} {:>8}",
        "total",
        report.source_delivered,
        report.archived,
        report.missing.len(),
        report.orphaned.len()
    );
    const SHOWN: usize = 20;
    for (label, ids) in [("missing from the archive", &report.missing), ("orphaned in the archive", &report.orphaned)] {
        if !ids.is_empty() {
            let more = ids.len().saturating_sub(SHOWN);
            let shown: Vec<&str> = ids.iter().take(SHOWN).map(String::as_str).collect();
            let _ = writeln!(
                out,
                "{label}: {}{}",
                shown.join(", "),
                if more > 0 { format!(" (and {more} more; --json lists all)") } else { String::new() }
            );
        }
    }
    if report.repaired > 0 {
        let _ = writeln!(out, "repaired: {} orders archived", report.repaired);
    }
    if report.purged > 0 {
        let _ =
            writeln!(out, "purged: {} archive documents whose order archiver purge deleted (expected)", report.purged);
    }
    let _ = writeln!(out, "{}", if report.consistent { "consistent" } else { "DIFFERENT" });
    out
}
