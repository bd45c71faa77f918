//! Idempotent writes to the archive. Every archive document is keyed on its order's `_id` and
//! inserted only if absent, so replaying an event or re-running a date range never makes a second
//! document. Orders the archive refuses go to a dead-letter collection, never silently away.
//!
//! The archive is a MongoDB collection, or a Delta Lake table ([`delta`]), chosen once at start
//! by [`Archiver::open`]: the callers write through the same [`Archiver`] either way.

pub mod delta;

pub use delta::ArchivedRow;

use std::collections::HashSet;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document, RawBsonRef, RawDocument, RawDocumentBuf};
use mongodb::error::{Error, ErrorKind};
use mongodb::options::{IndexOptions, UpdateOptions};
use mongodb::Collection;
use mongodb::IndexModel;

use super::document::{vanished_order_document, ArchiveSource};
use super::join::Joiner;
use super::lookup::{self, enrichment_stages};
use super::order_id::{equality_key, present_among};
use crate::config::{ArchiveSink, Config, EnrichMode};
use crate::db::{error_code, is_archive_refusal, is_transient, Databases, DUPLICATE_KEY};

/// The largest document MongoDB stores (`maxBsonObjectSize`).
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;

/// The server's code for a document over [`MAX_DOCUMENT_BYTES`].
const BSON_OBJECT_TOO_LARGE: i32 = 10334;

/// When each order's delivery event happened, keyed by [`equality_key`]; recorded with dead
/// letters. Empty for the batch path, which has no events.
pub type EventTimes = std::collections::HashMap<String, mongodb::bson::DateTime>;

/// The `_id` of a document read from the server or built by `archiver` (null if it has none).
pub fn id_of(document: &RawDocument) -> Bson {
    document.get("_id").ok().flatten().and_then(|id| Bson::try_from(id).ok()).unwrap_or(Bson::Null)
}

/// The keys of the `_id`s of `docs`.
fn id_keys(docs: &[RawDocumentBuf]) -> HashSet<String> {
    docs.iter().map(|d| equality_key(&id_of(d))).collect()
}

/// What one archive write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Archive documents created.
    pub inserted: u64,
    /// Orders that were already in the archive (left as they were).
    pub already_archived: u64,
    /// Documents written with a non-empty `anomalies`.
    pub anomalies: u64,
    /// Orders recorded in the dead-letter collection instead.
    pub dead_lettered: u64,
    /// Of those, orders whose archive document exceeds the archive's document size limit.
    pub too_large: u64,
}

impl std::ops::AddAssign for WriteOutcome {
    fn add_assign(&mut self, other: Self) {
        self.inserted += other.inserted;
        self.already_archived += other.already_archived;
        self.anomalies += other.anomalies;
        self.dead_lettered += other.dead_lettered;
        self.too_large += other.too_large;
    }
}

/// An order the archive refused on its own account.
#[derive(Debug)]
struct Refusal {
    id: Bson,
    code: Option<i32>,
    /// The server's explanation, scrubbed of credentials.
    reason: String,
    /// The error it came with, returned when the refusal turns out not to be the order's.
    error: Error,
    /// The size of its archive document, when that is why it was refused.
    size: Option<usize>,
}

impl Refusal {
    fn into_error(self) -> Error {
        self.error
    }
}

/// Whether `err` may be caused by a particular order (and so is worth narrowing down): not when
/// it is transient, nor when it is the archive refusing writes on its own account (a validator,
/// a privilege, a full disk: see [`is_archive_refusal`]), whatever the number of orders.
fn may_be_an_orders_fault(err: &Error) -> bool {
    !is_transient(err) && !is_archive_refusal(err)
}

fn has_anomalies(doc: &RawDocument) -> bool {
    doc.get_array(super::document::field::ANOMALIES).is_ok_and(|a| a.into_iter().next().is_some())
}

/// The error of a table maintenance asked of a collection.
fn not_a_table() -> anyhow::Error {
    crate::error::UsageError(
        "compact and vacuum maintain a Delta table: set ARCHIVE_SINK=delta and ARCHIVE_TABLE_URI".to_owned(),
    )
    .into()
}

/// Why the archive cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store exists but is not one this configuration writes (a table of other columns):
    /// a configuration error.
    #[error("{0}")]
    Misconfigured(String),
    /// The store cannot be reached, read or created.
    #[error("{0}")]
    Unavailable(String),
}

/// Enriches orders and writes them to the archive.
#[derive(Debug, Clone)]
pub struct Archiver {
    orders: Collection<Document>,
    archive: Collection<RawDocumentBuf>,
    dead_letters: Collection<Document>,
    stages: Vec<Document>,
    /// The client-side join, when configured and possible for this configuration.
    joiner: Option<Joiner>,
    source: ArchiveSource,
    delivered_status: String,
    /// The Delta table, when the archive is one: documents go there instead of `archive`.
    lake: Option<std::sync::Arc<tokio::sync::Mutex<delta::DeltaArchive>>>,
}

impl Archiver {
    /// The archiver of the configured store: the collection, or the Delta table (opened, or
    /// created when there is none).
    pub async fn open(config: &Config, dbs: &Databases, source: ArchiveSource) -> Result<Self, OpenError> {
        let mut archiver = Archiver::new(config, dbs, source);
        if config.archive.sink == ArchiveSink::Delta {
            let uri = config.lake.table_uri.as_deref().unwrap_or_default();
            // `watch` keeps its position per stream; `batch` runs need none.
            let app_id = match source {
                ArchiveSource::Watch => crate::coordination::stream_name(config),
                _ => format!("archiver-{}", source.as_str()),
            };
            let table = delta::DeltaArchive::open(config, uri, &app_id).await.map_err(|e| match e {
                delta::LakeError::Layout { .. } => OpenError::Misconfigured(e.to_string()),
                other => OpenError::Unavailable(other.to_string()),
            })?;
            tracing::info!(table = %table.uri(), "archiving to a Delta table");
            archiver.lake = Some(std::sync::Arc::new(tokio::sync::Mutex::new(table)));
        }
        Ok(archiver)
    }

    /// The archiver of an existing Delta table, for reading it (nothing is created); `None`
    /// when the table does not exist yet, or the archive is the collection.
    pub async fn open_existing_table(config: &Config, dbs: &Databases) -> Result<Option<Self>, OpenError> {
        if config.archive.sink != ArchiveSink::Delta {
            return Ok(None);
        }
        let uri = config.lake.table_uri.as_deref().unwrap_or_default();
        let app_id = crate::coordination::stream_name(config);
        match delta::DeltaArchive::open_existing(config, uri, &app_id).await {
            Ok(Some(table)) => {
                let mut archiver = Archiver::new(config, dbs, ArchiveSource::Watch);
                archiver.lake = Some(std::sync::Arc::new(tokio::sync::Mutex::new(table)));
                Ok(Some(archiver))
            }
            Ok(None) => Ok(None),
            Err(e @ delta::LakeError::Layout { .. }) => Err(OpenError::Misconfigured(e.to_string())),
            Err(e) => Err(OpenError::Unavailable(e.to_string())),
        }
    }

    /// The table's version and number of data files (a Delta table's; `None` for the
    /// collection).
    pub async fn table_summary(&self) -> anyhow::Result<Option<(Option<u64>, usize)>> {
        let Some(lake) = &self.lake else { return Ok(None) };
        Ok(Some(lake.lock().await.summary().await?))
    }

    /// Commits what the store still holds for a later write (the Delta table's waiting rows);
    /// nothing to do for the collection.
    pub async fn finish(&self) -> Result<(), Error> {
        if let Some(lake) = &self.lake {
            lake.lock().await.commit(None).await.map_err(|e| crate::db::StoreFailure::error(e.to_string()))?;
        }
        Ok(())
    }

    /// The archived rows of a date range, read from a Delta table (`None` for the collection,
    /// which `verify` queries itself).
    pub async fn table_rows_in(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: Option<chrono::DateTime<chrono::Utc>>,
    ) -> anyhow::Result<Option<Vec<delta::ArchivedRow>>> {
        let Some(lake) = &self.lake else { return Ok(None) };
        Ok(Some(lake.lock().await.rows_in(from, to).await?))
    }

    /// The `source_digest` of the table rows of these orders, by [`equality_key`] of their ids
    /// (an order without a row is absent), read from the latest committed version; `None` for
    /// the collection, which `purge` reads itself.
    pub async fn table_digests_of(
        &self,
        orders: &[Document],
        delivered_on: &str,
    ) -> anyhow::Result<Option<std::collections::HashMap<String, Option<String>>>> {
        let Some(lake) = &self.lake else { return Ok(None) };
        let wanted: Vec<(String, Option<chrono::NaiveDate>)> = orders
            .iter()
            .map(|order| {
                let id = order.get("_id").cloned().unwrap_or(Bson::Null);
                let day = order.get_datetime(delivered_on).ok().map(|d| d.to_chrono().date_naive());
                (crate::pipeline::order_id::id_text(&id), day)
            })
            .collect();
        let digests = lake.lock().await.digests_of(&wanted).await?;
        Ok(Some(
            orders
                .iter()
                .filter_map(|order| {
                    let id = order.get("_id")?;
                    let digest = digests.get(&crate::pipeline::order_id::id_text(id))?;
                    Some((equality_key(id), digest.clone()))
                })
                .collect(),
        ))
    }

    /// Whether the archive keeps its rows in a table (a Delta table), which replaces nothing.
    pub fn is_table(&self) -> bool {
        self.lake.is_some()
    }

    /// Records that `purge` deleted these orders from the source (a Delta table only; the
    /// collection marks its documents itself).
    pub async fn mark_purged_in_table(&self, ids: &[Bson]) -> anyhow::Result<()> {
        if let Some(lake) = &self.lake {
            let texts: Vec<String> = ids.iter().map(crate::pipeline::order_id::id_text).collect();
            lake.lock().await.mark_purged(&texts).await?;
        }
        Ok(())
    }

    /// Rewrites the small files of the archive's days into one per day (see
    /// [`delta::DeltaArchive::compact`]); for a Delta table only.
    pub async fn compact(
        &self,
        from: Option<chrono::NaiveDate>,
        to: Option<chrono::NaiveDate>,
    ) -> anyhow::Result<delta::Compaction> {
        let lake = self.lake.as_ref().ok_or_else(not_a_table)?;
        Ok(lake.lock().await.compact(from, to).await?)
    }

    /// Deletes the files of the archive no version references any more, older than
    /// `retention` (see [`delta::DeltaArchive::vacuum`]); for a Delta table only.
    pub async fn vacuum(&self, retention: chrono::Duration) -> anyhow::Result<usize> {
        let lake = self.lake.as_ref().ok_or_else(not_a_table)?;
        Ok(lake.lock().await.vacuum(retention).await?)
    }

    /// The keeper of `watch`'s position when the archive keeps it in the same commits as the
    /// data (a Delta table); `None` for the collection, whose checkpoints live elsewhere.
    pub async fn checkpoint_keeper(
        &self,
        config: &Config,
        on_loss: &tokio_util::sync::CancellationToken,
    ) -> Option<std::sync::Arc<dyn crate::checkpoint::CheckpointKeeper>> {
        let lake = self.lake.clone()?;
        let every = std::time::Duration::from_secs(config.lake.commit_secs);
        Some(std::sync::Arc::new(delta::DeltaCheckpoints::new(lake, every, on_loss.clone()).await))
    }

    /// An archiver for `source` documents.
    pub fn new(config: &Config, dbs: &Databases, source: ArchiveSource) -> Self {
        // Enrichment reads from the primary whatever the URI's read preference: a secondary that
        // lags behind the change stream would make a just-delivered order look vanished or stale,
        // and that document would be archived for good.
        let primary = crate::db::on_primary(&dbs.source);
        Archiver {
            orders: primary.collection(&config.orders.collection),
            archive: dbs.archive.collection(&config.archive.collection),
            dead_letters: dbs.archive.collection(&config.archive.errors_collection),
            stages: enrichment_stages(config, source),
            joiner: match config.enrich.mode {
                EnrichMode::Join => Joiner::new(config, &primary, source),
                EnrichMode::Lookup => None,
            },
            source,
            delivered_status: config.orders.delivered_status.clone(),
            lake: None,
        }
    }

    /// The same archiver, keeping up to `capacity` references it has read for the orders that
    /// follow, when it joins (see [`Joiner::with_cache`]): for runs over a range.
    pub fn with_reference_cache(mut self, capacity: usize) -> Self {
        self.joiner = self.joiner.map(|joiner| joiner.with_cache(capacity));
        self
    }

    /// The reference collections whose documents this archiver keeps (see
    /// [`Joiner::cached_collections`]).
    pub fn cached_reference_collections(&self) -> Vec<String> {
        self.joiner.as_ref().map(Joiner::cached_collections).unwrap_or_default()
    }

    /// Forgets a changed reference (see [`Joiner::forget`]).
    pub fn forget_reference(&self, collection: &str, id: Option<&Bson>) {
        if let Some(joiner) = &self.joiner {
            joiner.forget(collection, id);
        }
    }

    /// The reference cache's counts since last asked (see [`Joiner::take_cache_stats`]).
    pub fn take_reference_cache_stats(&self) -> Option<crate::pipeline::join::ReferenceCacheStats> {
        self.joiner.as_ref().and_then(Joiner::take_cache_stats)
    }

    /// Forgets every reference kept.
    pub fn forget_references(&self) {
        if let Some(joiner) = &self.joiner {
            joiner.forget_all();
        }
    }

    /// The enrichment stages, for callers that build their own pipelines around them.
    pub fn stages(&self) -> &[Document] {
        &self.stages
    }

    /// Archives the orders with these ids. A transient error is returned for the caller to
    /// retry the whole call (harmless: writes are idempotent). An error that may be one order's
    /// fault is narrowed down by bisection to the orders that cause it, which are dead-lettered
    /// while the rest are archived; an error that cannot be an order's fault (no permission, a
    /// killed operation) is returned as it is, and so is one that every order of the batch meets
    /// alike: the batch is then not archived and the caller stops, with nothing dead-lettered.
    pub async fn archive_ids(&self, ids: &[Bson], times: &EventTimes) -> Result<WriteOutcome, Error> {
        let mut refused = Vec::new();
        let outcome = self.narrow_down(ids, times, &mut refused).await?;
        self.settle(outcome, refused, ids.len(), times).await
    }

    /// Enriches and writes `ids`, bisecting errors that may be one order's fault; the orders
    /// refused on their own are collected in `refused`.
    async fn narrow_down(
        &self,
        ids: &[Bson],
        times: &EventTimes,
        refused: &mut Vec<Refusal>,
    ) -> Result<WriteOutcome, Error> {
        let written = match self.enrich(ids).await {
            Ok(docs) => self.write_collecting(docs, refused).await,
            Err(e) => Err(e),
        };
        match written {
            Err(e) if !may_be_an_orders_fault(&e) => Err(e),
            Err(_) if ids.len() > 1 => {
                let (left, right) = ids.split_at(ids.len() / 2);
                let mut outcome = Box::pin(self.narrow_down(left, times, refused)).await?;
                outcome += Box::pin(self.narrow_down(right, times, refused)).await?;
                Ok(outcome)
            }
            Err(e) => {
                refused.push(Refusal {
                    id: ids[0].clone(),
                    code: error_code(&e),
                    reason: crate::redact::scrub(&e.to_string()),
                    error: e,
                    size: None,
                });
                Ok(WriteOutcome::default())
            }
            ok => ok,
        }
    }

    /// Dead-letters the refused orders, unless every one of the `total` orders was refused with
    /// the same error: that is the archive's or the deployment's doing (a validator that
    /// rejects everything, a missing privilege), not the orders', and it is returned instead.
    async fn settle(
        &self,
        mut outcome: WriteOutcome,
        refused: Vec<Refusal>,
        total: usize,
        times: &EventTimes,
    ) -> Result<WriteOutcome, Error> {
        // An oversized document is the order's own fault whatever the others' fate.
        let alike = refused.windows(2).all(|w| w[0].code == w[1].code) && refused.iter().all(|r| r.size.is_none());
        if total > 1 && refused.len() == total && alike {
            let first = refused.into_iter().next().expect("total > 1");
            tracing::error!(orders = total, code = ?first.code, error = %first.reason,
                "the archive refused every order of the batch with the same error: not the orders' \
                 fault, nothing dead-lettered; stopping");
            return Err(first.into_error());
        }
        for refusal in &refused {
            tracing::error!(order_id = %refusal.id, code = ?refusal.code, error = %refusal.reason,
                size_bytes = refusal.size, "cannot archive an order; recorded in the dead-letter collection");
            self.record_dead_letter(refusal, times).await?;
            outcome.dead_lettered += 1;
            outcome.too_large += u64::from(refusal.size.is_some());
        }
        Ok(outcome)
    }

    /// Whether whole orders can be joined here (so callers may stream orders, not ids).
    pub fn joins(&self) -> bool {
        self.joiner.is_some()
    }

    /// Archives orders already read (by `batch`, which streams them): joined on the client, with
    /// the same fallbacks as [`Archiver::archive_ids`] when the join or the write cannot do them.
    pub async fn archive_orders(&self, orders: &[RawDocumentBuf]) -> Result<WriteOutcome, Error> {
        self.archive_read_orders(orders, &EventTimes::new()).await
    }

    /// [`Archiver::archive_orders`], with the times of the delivery events (recorded with dead
    /// letters).
    pub async fn archive_read_orders(
        &self,
        orders: &[RawDocumentBuf],
        times: &EventTimes,
    ) -> Result<WriteOutcome, Error> {
        let ids: Vec<Bson> = orders.iter().map(|o| id_of(o)).collect();
        let Some(joiner) = &self.joiner else { return self.archive_ids(&ids, times).await };
        let Some(docs) = joiner.enrich(orders).await? else {
            return self.archive_ids(&ids, times).await;
        };
        let mut refused = Vec::new();
        match self.write_collecting(docs, &mut refused).await {
            Ok(outcome) => self.settle(outcome, refused, ids.len(), times).await,
            Err(e) if may_be_an_orders_fault(&e) => self.archive_ids(&ids, times).await,
            Err(e) => Err(e),
        }
    }

    /// The orders with these ids, as stored, read `read_ahead` at a time (from the primary): for
    /// callers that bound the bytes they hold by the orders' actual sizes.
    pub async fn orders_by_id(&self, ids: &[Bson], read_ahead: u32) -> Result<mongodb::Cursor<RawDocumentBuf>, Error> {
        let orders = self.orders.clone_with_type::<RawDocumentBuf>();
        orders.find(doc! { "_id": { "$in": ids } }).batch_size(read_ahead.max(1)).await
    }

    /// Like [`Archiver::archive_ids`], but first leaves out the orders already archived, so
    /// that nothing is enriched in vain.
    pub async fn archive_missing_ids(&self, ids: &[Bson]) -> Result<WriteOutcome, Error> {
        let archived = self.archived_among(ids).await?;
        let missing: Vec<Bson> = ids.iter().filter(|id| !archived.contains(&equality_key(id))).cloned().collect();
        let mut outcome = self.archive_ids(&missing, &EventTimes::new()).await?;
        outcome.already_archived += (ids.len() - missing.len()) as u64;
        Ok(outcome)
    }

    /// Replaces the archive copies of these orders with documents enriched now (written when
    /// absent), for the orders still in the source and still delivered; returns how many were
    /// written. For an order changed since it was archived, when
    /// asked to (`purge --rearchive`).
    pub async fn rearchive(&self, ids: &[Bson]) -> Result<u64, Error> {
        let mut written = 0;
        for document in self.enrich(ids).await? {
            let id = id_of(&document);
            // An order gone from the source (a concurrent purge took it) or no longer delivered
            // keeps the copy it has: a placeholder or an undelivered order must never replace it.
            let vanished =
                !matches!(document.get(super::document::field::SOURCE_DIGEST), Ok(Some(RawBsonRef::String(_))));
            // Delivered as the purge's query sees it: the status, or an array holding it.
            let is_delivered = |v: RawBsonRef<'_>| matches!(v, RawBsonRef::String(s) if s == self.delivered_status);
            let delivered = match document.get(super::document::field::STATUS) {
                Ok(Some(RawBsonRef::Array(values))) => values.into_iter().flatten().any(is_delivered),
                Ok(Some(value)) => is_delivered(value),
                _ => false,
            };
            if vanished || !delivered {
                continue;
            }
            self.archive.replace_one(doc! { "_id": id }, document).upsert(true).await?;
            written += 1;
        }
        Ok(written)
    }

    /// The archive documents of these orders (one per id, flagged if the order vanished).
    pub async fn enrich(&self, ids: &[Bson]) -> Result<Vec<RawDocumentBuf>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut docs = self.enrich_found(ids).await?;
        if docs.len() < ids.len() {
            // Deleted between delivery and enrichment: archive what is known, flagged.
            let found = id_keys(&docs);
            let vanished: Vec<RawDocumentBuf> = ids
                .iter()
                .filter(|id| !found.contains(&equality_key(id)))
                .map(|id| {
                    tracing::warn!(order_id = %id,
                        "delivered order no longer exists; archiving its id with anomaly commande_introuvable");
                    vanished_order_document(id, &self.delivered_status, self.source)
                })
                .collect();
            docs.extend(vanished);
        }
        Ok(docs)
    }

    /// The archive documents of the orders that still exist: joined on the client when
    /// configured (and possible for these orders), else by the `$lookup` pipeline.
    async fn enrich_found(&self, ids: &[Bson]) -> Result<Vec<RawDocumentBuf>, Error> {
        if let Some(joiner) = &self.joiner {
            let orders: Vec<RawDocumentBuf> = self
                .orders
                .clone_with_type::<RawDocumentBuf>()
                .find(doc! { "_id": { "$in": ids } })
                .await?
                .try_collect()
                .await?;
            if let Some(docs) = joiner.enrich(&orders).await? {
                return Ok(docs);
            }
            tracing::debug!(orders = orders.len(), "batch needs the $lookup pipeline (arrays or decimals)");
        }
        let mut pipeline = Vec::with_capacity(self.stages.len() + 1);
        pipeline.push(doc! { "$match": { "_id": { "$in": ids } } });
        pipeline.extend(self.stages.iter().cloned());
        let mut docs: Vec<Document> = self.orders.aggregate(pipeline).await?.try_collect().await?;
        docs.iter_mut().for_each(lookup::finish);
        Ok(docs.iter().map(RawDocumentBuf::from_document).collect::<Result<_, _>>()?)
    }

    /// Inserts already-enriched documents, keeping any that are already archived; orders the
    /// archive refuses are dead-lettered (see [`Archiver::archive_ids`] for when they are not).
    pub async fn write(&self, docs: Vec<RawDocumentBuf>, times: &EventTimes) -> Result<WriteOutcome, Error> {
        let total = docs.len();
        let mut refused = Vec::new();
        let outcome = self.write_collecting(docs, &mut refused).await?;
        self.settle(outcome, refused, total, times).await
    }

    /// Inserts `docs` unordered. A duplicate key on `_id` means "already archived"; any other
    /// per-document refusal (validation, a duplicate on another unique index, a bad value) is
    /// collected in `refused`; a transient per-document error (a shard's failover) fails the
    /// whole call so that it is retried.
    async fn write_collecting(
        &self,
        docs: Vec<RawDocumentBuf>,
        refused: &mut Vec<Refusal>,
    ) -> Result<WriteOutcome, Error> {
        if let Some(lake) = &self.lake {
            // A table has no per-document limit nor validator: it takes every row, or fails whole.
            return lake.lock().await.append(docs).await.map_err(|e| crate::db::StoreFailure::error(e.to_string()));
        }
        // A document past the server's limit would fail the whole insert (the driver refuses to
        // send it): it is refused here, with its size, and the others are written.
        let (docs, oversized): (Vec<_>, Vec<_>) =
            docs.into_iter().partition(|d| d.as_bytes().len() <= MAX_DOCUMENT_BYTES);
        for document in &oversized {
            let bytes = document.as_bytes().len();
            refused.push(Refusal {
                id: id_of(document),
                code: Some(BSON_OBJECT_TOO_LARGE),
                reason: format!(
                    "its archive document is {bytes} bytes, over the archive's limit of {MAX_DOCUMENT_BYTES} bytes \
                     (16 MiB)"
                ),
                error: Error::custom(format!("archive document of {bytes} bytes")),
                size: Some(bytes),
            });
        }
        if docs.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let flagged: Vec<bool> = docs.iter().map(|d| has_anomalies(d)).collect();
        let ids: Vec<Bson> = docs.iter().map(|d| id_of(d)).collect();
        let error = match self.archive.insert_many(docs).ordered(false).await {
            Ok(_) => {
                let anomalies = flagged.iter().filter(|f| **f).count() as u64;
                return Ok(WriteOutcome { inserted: ids.len() as u64, anomalies, ..Default::default() });
            }
            Err(e) => e,
        };
        let ErrorKind::InsertMany(failure) = error.kind.as_ref() else { return Err(error) };
        if failure.write_concern_error.is_some() || is_transient(&error) || is_archive_refusal(&error) {
            return Err(error);
        }
        let write_errors = failure.write_errors.clone().unwrap_or_default();
        let duplicates: Vec<Bson> =
            write_errors.iter().filter(|w| w.code == DUPLICATE_KEY).filter_map(|w| ids.get(w.index).cloned()).collect();
        let archived = self.archived_among(&duplicates).await?;
        let mut outcome = WriteOutcome::default();
        let mut failed = vec![false; ids.len()];
        for w in &write_errors {
            let Some(id) = ids.get(w.index) else { continue };
            failed[w.index] = true;
            if w.code == DUPLICATE_KEY && archived.contains(&equality_key(id)) {
                outcome.already_archived += 1;
                continue;
            }
            refused.push(Refusal {
                id: id.clone(),
                code: Some(w.code),
                reason: crate::redact::scrub(&w.message),
                error: error.clone(),
                size: None,
            });
        }
        let written = || failed.iter().zip(&flagged).filter(|(failed, _)| !**failed);
        outcome.inserted = written().count() as u64;
        outcome.anomalies = written().filter(|(_, flagged)| **flagged).count() as u64;
        Ok(outcome)
    }

    /// The ids among `ids` already in the archive (none known for a Delta table, which leaves
    /// out what it holds when rows are added).
    async fn archived_among(&self, ids: &[Bson]) -> Result<HashSet<String>, Error> {
        if self.lake.is_some() {
            return Ok(HashSet::new());
        }
        present_among(&self.archive.clone_with_type(), ids, doc! {}).await
    }

    /// Records (or updates) the dead letter of a delivery event whose order id cannot be read,
    /// keyed by the event's position (`event:<resume token data>`).
    pub async fn dead_letter_event(&self, position: &str, reason: &str) -> Result<(), Error> {
        let now = mongodb::bson::DateTime::now();
        self.dead_letters
            .update_one(
                doc! { "_id": format!("event:{position}") },
                doc! {
                    "$set": {
                        "order_id": Bson::Null,
                        "event_position": position,
                        "reason": crate::redact::scrub(reason),
                        "error_code": Bson::Null,
                        "source": self.source.as_str(),
                        "last_attempt_at": now,
                    },
                    "$setOnInsert": { "first_attempt_at": now },
                    "$inc": { "attempts": 1 },
                },
            )
            .upsert(true)
            .await
            .map(|_| ())
    }

    /// Records (or updates) the dead letter of one order.
    async fn record_dead_letter(&self, refusal: &Refusal, times: &EventTimes) -> Result<(), Error> {
        let (id, reason, code) = (&refusal.id, &refusal.reason, refusal.code);
        let now = mongodb::bson::DateTime::now();
        let event_time = times.get(&equality_key(id)).map_or(Bson::Null, |t| Bson::DateTime(*t));
        let size = refusal.size.map_or(Bson::Null, |bytes| Bson::Int64(bytes as i64));
        self.dead_letters
            .update_one(
                doc! { "_id": id },
                doc! {
                    "$set": {
                        "order_id": id,
                        "reason": reason,
                        "error_code": code.map(Bson::Int32).unwrap_or(Bson::Null),
                        "source": self.source.as_str(),
                        "last_attempt_at": now,
                        "size_bytes": size,
                    },
                    "$setOnInsert": { "first_attempt_at": now, "event_time": event_time },
                    "$inc": { "attempts": 1 },
                },
            )
            .with_options(UpdateOptions::builder().upsert(true).build())
            .await
            .map(|_| ())
    }
}

/// The indexes the queries rely on, with their collections: on the orders, and on the archive
/// collection (none for a Delta table).
pub fn wanted_indexes(config: &Config, dbs: &Databases) -> Vec<(Collection<Document>, IndexModel)> {
    let f = &config.orders.fields;
    let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
    let archive: Collection<Document> = dbs.archive.collection(&config.archive.collection);
    let unique = IndexOptions::builder().unique(true).build();
    let mut wanted = vec![
        (orders.clone(), IndexModel::builder().keys(doc! { f.numero_commande.clone(): 1 }).options(unique).build()),
        (orders.clone(), IndexModel::builder().keys(doc! { f.status.clone(): 1, f.date_commande.clone(): 1 }).build()),
        (orders, IndexModel::builder().keys(doc! { f.date_commande.clone(): 1 }).build()),
    ];
    if config.archive.sink == ArchiveSink::Mongodb {
        wanted.push((archive, IndexModel::builder().keys(doc! { "date_commande": 1 }).build()));
    }
    wanted
}

/// Creates the indexes the queries rely on. A failure (no privilege, duplicate order numbers in
/// existing data) is logged and the run goes on: indexes speed things up, they are not needed
/// for correctness.
pub async fn ensure_indexes(config: &Config, dbs: &Databases) {
    for (collection, model) in wanted_indexes(config, dbs) {
        let keys = model.keys.clone();
        match collection.create_index(model).await {
            Ok(_) => tracing::info!(collection = collection.name(), keys = %keys, "index present"),
            Err(e) => tracing::warn!(collection = collection.name(), keys = %keys,
                error = %crate::redact::scrub(&e.to_string()),
                "could not create index; continuing without it (use --skip-indexes to silence)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::options::{ReadPreference, SelectionCriteria};

    #[tokio::test]
    async fn enrichment_reads_from_the_primary_whatever_the_uri_says() {
        // No server is contacted: the client only connects on first use.
        let client =
            mongodb::Client::with_uri_str("mongodb://127.0.0.1:9/?readPreference=secondaryPreferred").await.unwrap();
        let db = client.database("livraison");
        let dbs = Databases { source: db.clone(), archive: db, source_client: client };
        let archiver = Archiver::new(&Config::default(), &dbs, ArchiveSource::Watch);
        let primary = |c: Option<&SelectionCriteria>| {
            matches!(c, Some(SelectionCriteria::ReadPreference(ReadPreference::Primary)))
        };
        assert!(primary(archiver.orders.selection_criteria()), "orders: {:?}", archiver.orders.selection_criteria());
        let joiner = archiver.joiner.as_ref().expect("the join is the default");
        for references in joiner.reference_collections() {
            assert!(primary(references.selection_criteria()), "{}", references.name());
        }
    }
}
