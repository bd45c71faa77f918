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
use crate::pipeline::document::ArchiveSource;
use crate::pipeline::order_id::equality_key;
use crate::pipeline::scan::{delivered_in_range, DateRange};
use crate::pipeline::sink::Archiver;

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
    /// Ids of archive documents whose order is gone or no longer delivered.
    pub orphaned: Vec<String>,
    /// Orders archived by `--repair`.
    pub repaired: u64,
    /// Per-day counts.
    pub days: Vec<DayReport>,
}

/// Ids per query (`$in`), on both sides and in the repair.
const CHUNK: usize = 1000;

fn id_text(id: &Bson) -> String {
    match id {
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::String(s) => s.clone(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

fn day_of(doc: &Document, field: &str) -> String {
    doc.get_datetime(field)
        .ok()
        .and_then(|d| DateTime::from_timestamp_millis(d.timestamp_millis()))
        .map(|d| d.date_naive().to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The ids among `ids` found in `collection` with `extra` conditions, by [`equality_key`].
/// One query: callers pass at most [`CHUNK`] ids.
async fn present(
    collection: &Collection<Document>,
    ids: &[Bson],
    extra: &Document,
) -> mongodb::error::Result<HashSet<String>> {
    let mut filter = extra.clone();
    filter.insert("_id", doc! { "$in": ids });
    let found: Vec<Document> = collection.find(filter).projection(doc! { "_id": 1 }).await?.try_collect().await?;
    Ok(found.iter().filter_map(|d| d.get("_id")).map(equality_key).collect())
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
    let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
    let archive: Collection<Document> = dbs.archive.collection(&config.archive.collection);
    let date_field = config.orders.fields.date_commande.clone();
    let mut days: BTreeMap<String, DayReport> = BTreeMap::new();

    // Source side: every delivered order of the range must be in the archive (by id).
    let mut missing_ids: Vec<Bson> = Vec::new();
    let mut source_delivered = 0u64;
    let mut cursor = orders
        .find(delivered_in_range(config, range))
        .projection(doc! { "_id": 1, date_field.clone(): 1 })
        .await
        .context("reading the delivered orders")?;
    let mut chunk: Vec<(Bson, String)> = Vec::with_capacity(CHUNK);
    loop {
        let next = cursor.try_next().await.context("reading the delivered orders")?;
        if let Some(d) = &next {
            chunk.push((d.get("_id").cloned().unwrap_or(Bson::Null), day_of(d, &date_field)));
        }
        if chunk.len() == CHUNK || (next.is_none() && !chunk.is_empty()) {
            let ids: Vec<Bson> = chunk.iter().map(|(id, _)| id.clone()).collect();
            let archived = present(&archive, &ids, &doc! {}).await.context("checking the archive")?;
            for (id, day) in chunk.drain(..) {
                source_delivered += 1;
                let entry = days.entry(day.clone()).or_insert_with(|| DayReport { day, ..Default::default() });
                entry.source += 1;
                if !archived.contains(&equality_key(&id)) {
                    entry.missing += 1;
                    missing_ids.push(id);
                }
            }
        }
        if next.is_none() {
            break;
        }
    }

    // Archive side: every archive document of the range must have a delivered order behind it.
    let mut archive_range = doc! {};
    let mut dates = doc! { "$gte": mongodb::bson::DateTime::from_millis(range.from.timestamp_millis()) };
    if let Some(to) = range.to {
        dates.insert("$lt", mongodb::bson::DateTime::from_millis(to.timestamp_millis()));
    }
    archive_range.insert("date_commande", dates);
    let archive_range = crate::coordination::restrict_to_partition(config, archive_range, "$_id");
    let delivered = doc! { config.orders.fields.status.clone(): &config.orders.delivered_status };
    let mut orphaned = Vec::new();
    let mut archived_total = 0u64;
    let mut cursor = archive
        .find(archive_range)
        .projection(doc! { "_id": 1, "date_commande": 1 })
        .await
        .context("reading the archive")?;
    loop {
        let next = cursor.try_next().await.context("reading the archive")?;
        if let Some(d) = &next {
            chunk.push((d.get("_id").cloned().unwrap_or(Bson::Null), day_of(d, "date_commande")));
        }
        if chunk.len() == CHUNK || (next.is_none() && !chunk.is_empty()) {
            let ids: Vec<Bson> = chunk.iter().map(|(id, _)| id.clone()).collect();
            let in_source = present(&orders, &ids, &delivered).await.context("checking the source")?;
            for (id, day) in chunk.drain(..) {
                archived_total += 1;
                let entry = days.entry(day.clone()).or_insert_with(|| DayReport { day, ..Default::default() });
                entry.archive += 1;
                if !in_source.contains(&equality_key(&id)) {
                    entry.orphaned += 1;
                    orphaned.push(id_text(&id));
                }
            }
        }
        if next.is_none() {
            break;
        }
    }

    let mut repaired = 0;
    if repair && !missing_ids.is_empty() {
        let archiver = Archiver::new(config, &dbs, ArchiveSource::Batch);
        let mut still_missing = Vec::new();
        // Chunk by chunk: one `$in` of every missing id would pass the 16 MB command limit
        // (around 800,000 ObjectIds).
        for ids in missing_ids.chunks(CHUNK) {
            let outcome = archiver.archive_missing_ids(ids).await.context("repairing")?;
            repaired += outcome.inserted;
            let archived = present(&archive, ids, &doc! {}).await.context("checking the repair")?;
            still_missing.extend(ids.iter().filter(|id| !archived.contains(&equality_key(id))).cloned());
        }
        tracing::info!(repaired, still_missing = still_missing.len(), "missing orders archived (--repair)");
        missing_ids = still_missing;
    }
    let missing: Vec<String> = missing_ids.iter().map(id_text).collect();
    Ok(VerifyReport {
        date_from: range.from,
        date_to: range.to,
        consistent: missing.is_empty() && orphaned.is_empty(),
        source_delivered,
        archived: archived_total,
        missing,
        orphaned,
        repaired,
        days: days.into_values().collect(),
    })
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
    let _ = writeln!(out, "{}", if report.consistent { "consistent" } else { "DIFFERENT" });
    out
}
