//! `archiver purge`: a verified move. Deletes from the orders collection the delivered orders
//! older than a bound, but only those whose archive document exists and still matches the
//! order: its `source_digest` (or, for documents written without one, the fields the archive
//! copies) is compared with the order as it is now.
//!
//! Safe by construction:
//! - an order missing from the archive, or changed since it was archived, is never deleted: it
//!   is counted and reported (`--rearchive` first replaces the archive copy of a changed order);
//! - each delete re-checks, in its own filter, that the order still equals the document that was
//!   verified (`$expr` comparing `$$ROOT` with it, as MongoDB compares values), so an edit made
//!   between the check and the delete is never lost: that order stays;
//! - the archive copy of a purged order is marked `purged_at` (before the delete, unmarked if the
//!   order stays), so that `verify` does not take it for an orphan;
//! - deletes go in batches (`--batch-size`) under a rate limit (`--max-per-sec`), each batch
//!   first written to `--backup` (JSON Lines, canonical extended JSON, fsynced) when asked;
//! - a crash at any point leaves only orders that were archived and verified deleted; a rerun
//!   finishes the rest.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use mongodb::Collection;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::{self, RetryPolicy};
use crate::error::UsageError;
use crate::pipeline::document::{copied_fields, field, item_field, source_digest, ArchiveSource};
use crate::pipeline::order_id::equality_key;
use crate::pipeline::scan::{delivered_in_range, parse_date, DateRange, Progress};
use crate::pipeline::sink::Archiver;

/// How many ids a dry run lists per kind of skipped order.
const SAMPLE_IDS: usize = 10;

/// Most orders verified and deleted at once: the delete's filter carries each in full, and a
/// command may not exceed 16 MB.
const MAX_BATCH_SIZE: usize = 5_000;

/// What a purge did (or, with `--dry-run`, would do).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PurgeSummary {
    /// Delivered orders older than the bound.
    pub matched: u64,
    /// Of those, archived and unchanged: what may be deleted.
    pub eligible: u64,
    /// Deleted from the orders collection.
    pub purged: u64,
    /// Kept: changed since archived (or during the purge).
    pub skipped_changed: u64,
    /// Kept: not in the archive.
    pub skipped_missing: u64,
    /// Archive copies replaced first (`--rearchive`).
    pub rearchived: u64,
    /// A few ids of changed orders.
    pub changed_ids: Vec<String>,
    /// A few ids of orders missing from the archive.
    pub missing_ids: Vec<String>,
    /// Wall time.
    #[serde(skip)]
    pub duration: Duration,
}

impl PurgeSummary {
    /// Whether any order was kept for a reason a person should look at.
    pub fn skipped_any(&self) -> bool {
        self.skipped_changed + self.skipped_missing > 0
    }
}

/// The bounds of the purge: `--older-than` (a span before now or a date), after `--date-from`.
/// The bound may not be in the future: an order not yet placed is never purged.
/// What `archiver purge` is asked to do (from the command line).
#[derive(Debug, Clone, Default)]
pub struct PurgeOptions {
    /// Delete orders placed before this: a span before now (90d, 24h) or a date.
    pub older_than: String,
    /// Only orders placed on or after this date.
    pub date_from: Option<String>,
    /// Report what would be deleted and kept, delete nothing.
    pub dry_run: bool,
    /// Orders verified and deleted at a time.
    pub batch_size: usize,
    /// Most deletions per second (0: no limit).
    pub max_per_sec: u64,
    /// Append each deleted order to this file first.
    pub backup: Option<PathBuf>,
    /// Archive changed orders again before deleting them.
    pub rearchive: bool,
}

pub fn purge_range(args: &PurgeOptions, now: DateTime<Utc>) -> Result<DateRange, UsageError> {
    let to = parse_date(&args.older_than, now)?;
    if to > now {
        return Err(UsageError(format!(
            "--older-than {:?} is in the future ({to}); nothing newer than now is purged",
            args.older_than
        )));
    }
    let from = match &args.date_from {
        Some(from) => parse_date(from, now)?,
        None => DateTime::<Utc>::UNIX_EPOCH - chrono::Duration::days(365 * 1000),
    };
    if from >= to {
        return Err(UsageError(format!("--date-from ({from}) must be before the --older-than bound ({to})")));
    }
    Ok(DateRange { from, to: Some(to) })
}

/// Whether archive document `archived` still describes `order`: by digest when it has one,
/// else by the fields it copies from the order (the top-level ones, and each item's menu id
/// and quantity).
pub fn archived_as_is(config: &Config, order: &Document, archived: &Document) -> bool {
    if let Ok(digest) = archived.get_str(field::SOURCE_DIGEST) {
        return digest == source_digest(order);
    }
    let f = &config.orders.fields;
    let value = |doc: &Document, name: &str| doc.get(name).cloned().unwrap_or(Bson::Null);
    if copied_fields(f).iter().any(|(name, source)| value(archived, name) != value(order, source)) {
        return false;
    }
    match (order.get(&f.items), archived.get(field::ITEMS)) {
        (Some(Bson::Array(items)), Some(Bson::Array(copies))) => {
            items.len() == copies.len()
                && items.iter().zip(copies).all(|(item, copy)| {
                    // An item that is not a document is archived with null fields.
                    let empty = Document::new();
                    let item = item.as_document().unwrap_or(&empty);
                    let Some(copy) = copy.as_document() else { return false };
                    value(item, &f.item_menu_id) == value(copy, item_field::MENU_ID)
                        && value(item, &f.item_quantite) == value(copy, item_field::QUANTITE)
                })
        }
        // Items that were not an array are archived as an empty list.
        (_, Some(Bson::Array(copies))) => copies.is_empty(),
        _ => false,
    }
}

/// Runs `archiver purge`.
pub async fn run(config: &Config, args: &PurgeOptions, shutdown: CancellationToken) -> anyhow::Result<PurgeSummary> {
    let range = purge_range(args, Utc::now())?;
    if !(1..=MAX_BATCH_SIZE).contains(&args.batch_size) {
        // Each delete carries its orders in full: a 16 MB command holds a few thousand.
        bail!(UsageError(format!("--batch-size must be between 1 and {MAX_BATCH_SIZE}")));
    }
    let policy = RetryPolicy::bounded(&config.retry);
    let dbs = tokio::select! {
        dbs = db::connect(config, &policy) => dbs?,
        _ = shutdown.cancelled() => bail!("interrupted before connecting"),
    };
    // The orders are read and deleted on the primary: what is verified is what is deleted.
    let source = db::on_primary(&dbs.source);
    let orders: Collection<Document> = source.collection(&config.orders.collection);
    let archiver = Archiver::open(config, &dbs, ArchiveSource::Batch).await?;
    if args.rearchive && !archiver.replaces_copies() {
        bail!(UsageError(format!(
            "--rearchive replaces archive copies, which {} does not do: purge without it, and archive \
             changed orders again with verify --repair after they are purged or restored",
            archiver.store_description()
        )));
    }
    let filter = delivered_in_range(config, range);
    let started = Instant::now();
    tracing::info!(older_than = %range.to.unwrap_or(range.from), date_from = ?args.date_from, dry_run = args.dry_run,
        batch_size = args.batch_size, max_per_sec = args.max_per_sec, "purge starting");
    let matched = orders.count_documents(filter.clone()).await.context("counting the orders to purge")?;
    let mut backup = match (&args.backup, args.dry_run) {
        (Some(path), false) => Some(Backup::open(path)?),
        _ => None,
    };
    let mut summary = PurgeSummary { matched, ..Default::default() };
    let progress = Progress::new(matched, "purge progress");
    let mut pace = Pace::new(args.max_per_sec);
    let mut chunks =
        orders.find(filter).batch_size(args.batch_size.min(10_000) as u32).await?.try_chunks(args.batch_size);
    while let Some(chunk) = chunks.next().await {
        if shutdown.is_cancelled() {
            break;
        }
        let chunk = chunk.map_err(|e| e.1).context("reading the orders to purge")?;
        progress.add(chunk.len() as u64);
        let mut eligible = verify_chunk(config, &archiver, chunk, args, &mut summary).await?;
        summary.eligible += eligible.len() as u64;
        if args.dry_run || eligible.is_empty() {
            continue;
        }
        pace.wait_for(eligible.len(), &shutdown).await;
        if shutdown.is_cancelled() {
            break;
        }
        if let Some(backup) = &mut backup {
            backup.append(&eligible).context("writing the backup")?;
        }
        // The archive copies are marked first, so that `verify` tells a purged order from an
        // orphan whatever instant a crash comes at: a mark whose order still exists is harmless.
        let ids: Vec<Bson> = eligible.iter().filter_map(|d| d.get("_id").cloned()).collect();
        archiver.mark_purged(&ids).await.context("marking the archive copies as purged")?;
        let deleted = delete_unchanged(&orders, &eligible).await.context("deleting archived orders")?;
        summary.purged += deleted;
        if deleted < eligible.len() as u64 {
            // Edited between the check and the delete: kept, and reported as changed.
            let still = crate::pipeline::order_id::present_among(&orders, &ids, doc! {}).await?;
            eligible.retain(|d| d.get("_id").is_some_and(|id| still.contains(&equality_key(id))));
            let kept: Vec<Bson> = eligible.iter().filter_map(|d| d.get("_id").cloned()).collect();
            archiver.unmark_purged(&kept).await.context("unmarking the archive copies of kept orders")?;
            for order in &eligible {
                tracing::warn!(order_id = %id_text(order), "order changed during the purge; kept");
                note(&mut summary.changed_ids, order);
            }
            summary.skipped_changed += eligible.len() as u64;
        }
    }
    progress.finish();
    summary.duration = started.elapsed();
    report(&summary, args.dry_run);
    if shutdown.is_cancelled() {
        bail!("interrupted: the purge is partly done; run the same command again to finish it");
    }
    Ok(summary)
}

/// Sorts a chunk of orders into eligible (returned), changed and missing; with `--rearchive`,
/// changed orders get a fresh archive copy first and become eligible.
async fn verify_chunk(
    config: &Config,
    archiver: &Archiver,
    chunk: Vec<Document>,
    args: &PurgeOptions,
    summary: &mut PurgeSummary,
) -> anyhow::Result<Vec<Document>> {
    let delivered_on = &config.orders.fields.date_livraison;
    let archived = archiver.copies_of(&chunk, delivered_on).await.context("reading the archive")?;
    let mut eligible = Vec::with_capacity(chunk.len());
    let mut changed = Vec::new();
    for order in chunk {
        let key = order.get("_id").map(equality_key).unwrap_or_default();
        match archived.get(&key) {
            None => {
                tracing::warn!(order_id = %id_text(&order), "not in the archive; kept (verify --repair archives it)");
                note(&mut summary.missing_ids, &order);
                summary.skipped_missing += 1;
            }
            Some(copy) if archived_as_is(config, &order, copy) => eligible.push(order),
            Some(_) => changed.push(order),
        }
    }
    if changed.is_empty() {
        return Ok(eligible);
    }
    if args.rearchive && !args.dry_run {
        let ids: Vec<Bson> = changed.iter().filter_map(|d| d.get("_id").cloned()).collect();
        summary.rearchived += archiver.rearchive(&ids).await.context("replacing archive copies")?;
        tracing::info!(orders = ids.len(), "changed orders archived again (--rearchive)");
        // Deleted only where the archive now holds a copy of exactly the order to delete: a copy
        // the replace left as it was (the order no longer counts as delivered there, or vanished
        // meanwhile) keeps its order in the source.
        let copies = archiver.copies_of(&changed, delivered_on).await.context("reading the archive")?;
        for order in changed {
            let key = order.get("_id").map(equality_key).unwrap_or_default();
            let digest = copies.get(&key).and_then(|copy| copy.get_str(field::SOURCE_DIGEST).ok());
            if digest == Some(source_digest(&order).as_str()) {
                eligible.push(order);
            } else {
                tracing::warn!(order_id = %id_text(&order),
                    "changed since archived and not archived again; kept (its archive copy is the old one)");
                note(&mut summary.changed_ids, &order);
                summary.skipped_changed += 1;
            }
        }
    } else if args.rearchive {
        // A dry run counts them as they would be: archived again, then purged.
        eligible.extend(changed);
    } else {
        for order in &changed {
            tracing::warn!(order_id = %id_text(order), "changed since archived; kept (--rearchive archives it again)");
            note(&mut summary.changed_ids, order);
        }
        summary.skipped_changed += changed.len() as u64;
    }
    Ok(eligible)
}

/// Deletes the orders of `verified` that are still exactly as verified; returns how many.
async fn delete_unchanged(orders: &Collection<Document>, verified: &[Document]) -> mongodb::error::Result<u64> {
    let ids: Vec<&Bson> = verified.iter().filter_map(|d| d.get("_id")).collect();
    let as_verified: Vec<Bson> = verified.iter().cloned().map(Bson::Document).collect();
    let filter = doc! {
        "_id": { "$in": ids },
        "$expr": { "$in": ["$$ROOT", { "$literal": as_verified }] },
    };
    Ok(orders.delete_many(filter).await?.deleted_count)
}

/// Keeps up to [`SAMPLE_IDS`] ids for the report.
fn note(ids: &mut Vec<String>, order: &Document) {
    if ids.len() < SAMPLE_IDS {
        ids.push(id_text(order));
    }
}

fn id_text(order: &Document) -> String {
    match order.get("_id") {
        Some(Bson::ObjectId(id)) => id.to_hex(),
        Some(Bson::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "?".to_owned(),
    }
}

/// Prints the summary (stdout) and logs it.
fn report(s: &PurgeSummary, dry_run: bool) {
    let secs = s.duration.as_secs_f64().max(1e-9);
    let rate = s.purged as f64 / secs;
    tracing::info!(
        matched = s.matched,
        eligible = s.eligible,
        purged = s.purged,
        skipped_changed = s.skipped_changed,
        skipped_missing = s.skipped_missing,
        rearchived = s.rearchived,
        dry_run,
        duration_ms = s.duration.as_millis() as u64,
        orders_per_sec = rate.round() as u64,
        "purge finished"
    );
    if dry_run {
        println!(
            "dry run: {} delivered orders older than the bound; {} archived and unchanged would be purged; \
             {} changed since archived and {} missing from the archive would be kept; nothing was deleted.",
            s.matched, s.eligible, s.skipped_changed, s.skipped_missing
        );
    } else {
        println!(
            "purge: {} purged of {} eligible ({} delivered orders older than the bound); kept: {} changed \
             since archived, {} missing from the archive; {} archived again; in {:.1} s ({:.0} orders/s)",
            s.purged, s.eligible, s.matched, s.skipped_changed, s.skipped_missing, s.rearchived, secs, rate
        );
    }
    if !s.changed_ids.is_empty() {
        println!("changed since archived (first {}): {}", s.changed_ids.len(), s.changed_ids.join(", "));
    }
    if !s.missing_ids.is_empty() {
        println!("missing from the archive (first {}): {}", s.missing_ids.len(), s.missing_ids.join(", "));
    }
}

/// The `--backup` file: deleted orders as JSON Lines, appended and made durable before the
/// delete they precede.
struct Backup {
    file: File,
    path: PathBuf,
}

impl Backup {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the backup file {}", path.display()))?;
        Ok(Backup { file, path: path.to_path_buf() })
    }

    fn append(&mut self, orders: &[Document]) -> anyhow::Result<()> {
        let mut text = String::new();
        for order in orders {
            let json = Bson::Document(order.clone()).into_canonical_extjson();
            text.push_str(&serde_json::to_string(&json)?);
            text.push('\n');
        }
        self.file.write_all(text.as_bytes()).with_context(|| format!("writing {}", self.path.display()))?;
        self.file.sync_all().with_context(|| format!("syncing {}", self.path.display()))
    }
}

/// The rate limit: at most `max_per_sec` deletions per second on average (0: no limit).
struct Pace {
    max_per_sec: u64,
    started: Instant,
    done: u64,
}

impl Pace {
    fn new(max_per_sec: u64) -> Self {
        Pace { max_per_sec, started: Instant::now(), done: 0 }
    }

    /// Waits until `n` more deletions keep the average under the limit.
    async fn wait_for(&mut self, n: usize, shutdown: &CancellationToken) {
        self.done += n as u64;
        if self.max_per_sec == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.done as f64 / self.max_per_sec as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::select! {
                _ = tokio::time::sleep(due - elapsed) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(older_than: &str, date_from: Option<&str>) -> PurgeOptions {
        PurgeOptions {
            older_than: older_than.to_owned(),
            date_from: date_from.map(str::to_owned),
            dry_run: false,
            batch_size: 500,
            max_per_sec: 1000,
            backup: None,
            rearchive: false,
        }
    }

    #[test]
    fn the_bound_is_a_span_or_a_date_and_never_in_the_future() {
        let now: DateTime<Utc> = "2026-12-01T12:00:00Z".parse().unwrap();
        let range = purge_range(&args("90d", None), now).unwrap();
        assert_eq!(range.to, Some("2026-09-02T12:00:00Z".parse().unwrap()));
        let range = purge_range(&args("2026-01-01", Some("2025-01-01")), now).unwrap();
        assert_eq!(
            (range.from.to_rfc3339(), range.to.unwrap().to_rfc3339()),
            ("2025-01-01T00:00:00+00:00".to_owned(), "2026-01-01T00:00:00+00:00".to_owned())
        );
        assert!(purge_range(&args("2027-01-01", None), now).unwrap_err().0.contains("future"));
        assert!(purge_range(&args("2026-01-01", Some("2026-02-01")), now).is_err());
        assert!(purge_range(&args("soon", None), now).is_err());
    }

    #[test]
    fn an_archive_copy_matches_by_digest_or_else_by_its_copied_fields() {
        let config = Config::default();
        let order = doc! { "_id": 1, "numero_commande": "CMD-1", "status": "livrée", "montant_total": 10.0,
        "items": [{ "menu_id": 7, "quantite": 2 }] };
        let with_digest = doc! { "_id": 1, "source_digest": source_digest(&order) };
        assert!(archived_as_is(&config, &order, &with_digest));
        let mut edited = order.clone();
        edited.insert("montant_total", 11.0);
        assert!(!archived_as_is(&config, &edited, &with_digest));

        let fields = doc! { "_id": 1, "numero_commande": "CMD-1", "status": "livrée", "date_commande": Bson::Null,
        "date_livraison": Bson::Null, "montant_total": 10.0, "items": [{ "menu_id": 7, "quantite": 2, "nom": "x" }] };
        assert!(archived_as_is(&config, &order, &fields));
        assert!(!archived_as_is(&config, &edited, &fields));
        let mut more = order.clone();
        more.insert("items", vec![Bson::Document(doc! { "menu_id": 7, "quantite": 3 })]);
        assert!(!archived_as_is(&config, &more, &fields));
    }
}
