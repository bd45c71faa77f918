//! The archive's port and the last stage of the pipeline. [`ArchiveStore`] is what a store of
//! archive documents must do: write a batch idempotently (one document per order, whatever is
//! replayed), record dead letters, read copies back for `verify` and `purge`, and keep `watch`'s
//! position or leave it to a checkpoint store. One adapter per store, chosen once at start by
//! [`Archiver::open`]: [`mongo`] (a collection, the default) and [`delta`] (a Delta Lake table).
//! [`Archiver`] enriches orders and writes them through the port; the commands and the rest of
//! the pipeline never know which store it is.
//!
//! Orders a store refuses go to its dead letters, never silently away.

pub mod delta;
pub mod mongo;

pub use delta::ArchivedRow;
pub use mongo::MAX_DOCUMENT_BYTES;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document, RawBsonRef, RawDocument, RawDocumentBuf};
use mongodb::error::Error;
use mongodb::options::IndexOptions;
use mongodb::Collection;
use mongodb::IndexModel;

use super::document::{vanished_order_document, ArchiveSource};
use super::join::Joiner;
use super::lookup::{self, enrichment_stages};
use super::order_id::equality_key;
use crate::checkpoint::CheckpointKeeper;
use crate::config::{ArchiveSink, Config, EnrichMode};
use crate::db::{error_code, is_archive_refusal, is_transient, Databases};

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
    /// Orders recorded in the dead letters instead.
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

/// An order a store refused on its own account.
#[derive(Debug)]
pub struct Refusal {
    /// The order's id.
    pub id: Bson,
    /// The store's error code, when it has one.
    pub code: Option<i32>,
    /// The store's explanation, scrubbed of credentials.
    pub reason: String,
    /// The error it came with, returned when the refusal turns out not to be the order's.
    pub error: Error,
    /// The size of its archive document, when that is why it was refused.
    pub size: Option<usize>,
}

/// A dead letter: an order the archive could not take, or a delivery event whose order id cannot
/// be read, with why. Stores keep one per order (or event) and count the attempts, or keep one
/// row per attempt.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The order's id; `None` for an event whose order id cannot be read.
    pub order_id: Option<Bson>,
    /// The change event's position, for an event dead-lettered as such.
    pub event_position: Option<String>,
    /// Why, scrubbed of credentials.
    pub reason: String,
    /// The error code, when the refusal came with one.
    pub code: Option<i32>,
    /// The archive document's size, when that is why it was refused.
    pub size: Option<usize>,
    /// When the delivery event happened (`watch` only).
    pub event_time: Option<mongodb::bson::DateTime>,
    /// Which command met it.
    pub source: ArchiveSource,
}

/// What a store returns: a boxed future, so that stores can be chosen at run time.
pub type StoreFuture<'a, T, E = Error> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'a>>;

/// What a store of archive documents does: the archive's port. The write errors are the
/// driver's type, since the archiver classifies them (transient, the store's own refusal, an
/// order's fault); an adapter wraps its own in [`crate::db::StoreFailure`].
pub trait ArchiveStore: std::fmt::Debug + Send + Sync {
    /// Where the documents go, for logs and reports (no credentials).
    fn describe(&self) -> String;

    /// Writes archive documents idempotently: one per order, an order already archived left as
    /// it is (counted in `already_archived`). A document the store refuses on its own account
    /// goes to `refused`, the others are written; an error of the whole write is returned.
    fn write<'a>(&'a self, docs: Vec<RawDocumentBuf>, refused: &'a mut Vec<Refusal>) -> StoreFuture<'a, WriteOutcome>;

    /// The [`equality_key`]s of the ids among `ids` known to be archived, so that they are not
    /// enriched in vain; a store may know none (its writes leave them out anyway).
    fn archived_among<'a>(&'a self, ids: &'a [Bson]) -> StoreFuture<'a, HashSet<String>>;

    /// Whether [`ArchiveStore::replace`] can replace an archive copy (`purge --rearchive`).
    fn replaces_copies(&self) -> bool {
        false
    }

    /// Replaces the archive copy of an order with `document` (written when absent).
    fn replace(&self, document: RawDocumentBuf) -> StoreFuture<'_, ()> {
        drop(document);
        Box::pin(async { Err(Error::custom("this archive never replaces an archive copy")) })
    }

    /// Where the dead letters go, for logs and reports.
    fn dead_letter_location(&self) -> String;

    /// Records a dead letter (or another attempt of one).
    fn record_dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> StoreFuture<'a, ()>;

    /// Makes what was written durable and visible to readers (a table's rows committed).
    fn finish(&self) -> StoreFuture<'_, ()>;

    /// The archive copies of these orders, by [`equality_key`] of their ids, read from what is
    /// durable (a collection's majority-committed documents, a table's committed version): at
    /// least their `source_digest`, and for a collection the whole copy. `delivered_on` names
    /// the orders' delivery date field (a table is partitioned by it). An order without a copy
    /// is absent.
    fn copies_of<'a>(
        &'a self,
        orders: &'a [Document],
        delivered_on: &'a str,
    ) -> StoreFuture<'a, HashMap<String, Document>, anyhow::Error>;

    /// Records that `purge` is deleting these orders from the source, so that `verify` tells
    /// their copies from orphans.
    fn mark_purged<'a>(&'a self, ids: &'a [Bson]) -> StoreFuture<'a, (), anyhow::Error>;

    /// Undoes [`ArchiveStore::mark_purged`] for orders `purge` kept after all (a store whose
    /// marks only count for orders gone from the source needs nothing).
    fn unmark_purged<'a>(&'a self, ids: &'a [Bson]) -> StoreFuture<'a, (), anyhow::Error> {
        let _ = ids;
        Box::pin(async { Ok(()) })
    }

    /// How many dead letters the store holds (orders and events), for `health`.
    fn dead_letter_count(&self) -> StoreFuture<'_, u64, anyhow::Error>;

    /// The archived rows of a date range, when the store is read whole for `verify` (a table);
    /// `None` when `verify` compares in the database, chunk by chunk (a collection).
    fn rows_in(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: Option<chrono::DateTime<chrono::Utc>>,
    ) -> StoreFuture<'_, Option<Vec<ArchivedRow>>, anyhow::Error> {
        let _ = (from, to);
        Box::pin(async { Ok(None) })
    }

    /// The keeper of `watch`'s position when the store keeps it in the same commits as the data
    /// (a table, committing at least every `commit_every`; `on_loss` is cancelled when rows
    /// waiting for a commit are lost); `None` when the position lives in a checkpoint store.
    fn checkpoint_keeper(
        &self,
        commit_every: std::time::Duration,
        on_loss: tokio_util::sync::CancellationToken,
    ) -> StoreFuture<'_, Option<Arc<dyn CheckpointKeeper>>, std::convert::Infallible> {
        let _ = (commit_every, on_loss);
        Box::pin(async { Ok(None) })
    }

    /// The store's version and number of data files, when it is a table.
    fn summary(&self) -> StoreFuture<'_, Option<(Option<u64>, usize)>, anyhow::Error> {
        Box::pin(async { Ok(None) })
    }

    /// Rewrites the small files of the days between `from` and `to` into one per day (a table).
    fn compact(
        &self,
        from: Option<chrono::NaiveDate>,
        to: Option<chrono::NaiveDate>,
    ) -> StoreFuture<'_, delta::Compaction, anyhow::Error> {
        let _ = (from, to);
        Box::pin(async { Err(not_a_table()) })
    }

    /// Deletes the files no version references any more, older than `retention` (a table).
    fn vacuum(&self, retention: chrono::Duration) -> StoreFuture<'_, usize, anyhow::Error> {
        let _ = retention;
        Box::pin(async { Err(not_a_table()) })
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

/// Enriches orders and writes them to the archive, through its store.
#[derive(Debug, Clone)]
pub struct Archiver {
    orders: Collection<Document>,
    stages: Vec<Document>,
    /// The client-side join, when configured and possible for this configuration.
    joiner: Option<Joiner>,
    source: ArchiveSource,
    delivered_status: String,
    /// Where the archive documents go.
    store: Arc<dyn ArchiveStore>,
}

impl Archiver {
    /// The archiver of the configured store: the collection, or the Delta table (opened, or
    /// created when there is none).
    pub async fn open(config: &Config, dbs: &Databases, source: ArchiveSource) -> Result<Self, OpenError> {
        let mut archiver = Archiver::new(config, dbs, source);
        if config.archive.sink == ArchiveSink::Delta {
            // `watch` keeps its position per stream; `batch` runs need none.
            let app_id = match source {
                ArchiveSource::Watch => crate::coordination::stream_name(config),
                _ => format!("archiver-{}", source.as_str()),
            };
            let store = delta::TableStore::open(config, &app_id, true).await?.expect("created when missing");
            tracing::info!(table = %store.describe(), "archiving to a Delta table");
            archiver.store = Arc::new(store);
        }
        Ok(archiver)
    }

    /// The archiver of an existing Delta table, for reading it (nothing is created); `None`
    /// when the table does not exist yet, or the archive is the collection.
    pub async fn open_existing_table(config: &Config, dbs: &Databases) -> Result<Option<Self>, OpenError> {
        if config.archive.sink != ArchiveSink::Delta {
            return Ok(None);
        }
        let app_id = crate::coordination::stream_name(config);
        let Some(store) = delta::TableStore::open(config, &app_id, false).await? else { return Ok(None) };
        let mut archiver = Archiver::new(config, dbs, ArchiveSource::Watch);
        archiver.store = Arc::new(store);
        Ok(Some(archiver))
    }

    /// Where the archive documents go, for reports.
    pub fn store_description(&self) -> String {
        self.store.describe()
    }

    /// The store's version and number of data files, when it is a table.
    pub async fn table_summary(&self) -> anyhow::Result<Option<(Option<u64>, usize)>> {
        self.store.summary().await
    }

    /// Makes what was written durable and visible (a table's waiting rows committed).
    pub async fn finish(&self) -> Result<(), Error> {
        self.store.finish().await
    }

    /// The archived rows of a date range, when the store is read whole for `verify` (see
    /// [`ArchiveStore::rows_in`]).
    pub async fn rows_in(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: Option<chrono::DateTime<chrono::Utc>>,
    ) -> anyhow::Result<Option<Vec<ArchivedRow>>> {
        self.store.rows_in(from, to).await
    }

    /// The archive copies of these orders (see [`ArchiveStore::copies_of`]).
    pub async fn copies_of(
        &self,
        orders: &[Document],
        delivered_on: &str,
    ) -> anyhow::Result<HashMap<String, Document>> {
        self.store.copies_of(orders, delivered_on).await
    }

    /// Whether archive copies can be replaced (`purge --rearchive`).
    pub fn replaces_copies(&self) -> bool {
        self.store.replaces_copies()
    }

    /// Records that `purge` is deleting these orders from the source.
    pub async fn mark_purged(&self, ids: &[Bson]) -> anyhow::Result<()> {
        self.store.mark_purged(ids).await
    }

    /// Undoes [`Archiver::mark_purged`] for orders kept after all.
    pub async fn unmark_purged(&self, ids: &[Bson]) -> anyhow::Result<()> {
        self.store.unmark_purged(ids).await
    }

    /// Where the dead letters go.
    pub fn dead_letter_location(&self) -> String {
        self.store.dead_letter_location()
    }

    /// How many dead letters the store holds.
    pub async fn dead_letter_count(&self) -> anyhow::Result<u64> {
        self.store.dead_letter_count().await
    }

    /// Rewrites the small files of the archive's days into one per day (see
    /// [`delta::DeltaArchive::compact`]); for a Delta table only.
    pub async fn compact(
        &self,
        from: Option<chrono::NaiveDate>,
        to: Option<chrono::NaiveDate>,
    ) -> anyhow::Result<delta::Compaction> {
        self.store.compact(from, to).await
    }

    /// Deletes the files of the archive no version references any more, older than
    /// `retention` (see [`delta::DeltaArchive::vacuum`]); for a Delta table only.
    pub async fn vacuum(&self, retention: chrono::Duration) -> anyhow::Result<usize> {
        self.store.vacuum(retention).await
    }

    /// The keeper of `watch`'s position when the archive keeps it in the same commits as the
    /// data (a Delta table); `None` for the collection, whose checkpoints live elsewhere.
    pub async fn checkpoint_keeper(
        &self,
        config: &Config,
        on_loss: &tokio_util::sync::CancellationToken,
    ) -> Option<Arc<dyn CheckpointKeeper>> {
        let every = std::time::Duration::from_secs(config.lake.commit_secs);
        match self.store.checkpoint_keeper(every, on_loss.clone()).await {
            Ok(keeper) => keeper,
            Err(never) => match never {},
        }
    }

    /// An archiver for `source` documents, into the archive collection.
    pub fn new(config: &Config, dbs: &Databases, source: ArchiveSource) -> Self {
        // Enrichment reads from the primary whatever the URI's read preference: a secondary that
        // lags behind the change stream would make a just-delivered order look vanished or stale,
        // and that document would be archived for good.
        let primary = crate::db::on_primary(&dbs.source);
        Archiver {
            orders: primary.collection(&config.orders.collection),
            stages: enrichment_stages(config, source),
            joiner: match config.enrich.mode {
                EnrichMode::Join => Joiner::new(config, &primary, source),
                EnrichMode::Lookup => None,
            },
            source,
            delivered_status: config.orders.delivered_status.clone(),
            store: Arc::new(mongo::CollectionStore::new(config, dbs)),
        }
    }

    /// An archiver for `source` documents writing to the same store as `other` (a fill within
    /// `watch` writes where `watch` writes, and commits with its position).
    pub fn sharing_store(config: &Config, dbs: &Databases, source: ArchiveSource, other: &Archiver) -> Self {
        Archiver { store: other.store.clone(), ..Archiver::new(config, dbs, source) }
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
            Ok(docs) => self.store.write(docs, refused).await,
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
            return Err(first.error);
        }
        for refusal in &refused {
            tracing::error!(order_id = %refusal.id, code = ?refusal.code, error = %refusal.reason,
                size_bytes = refusal.size, dead_letters = %self.store.dead_letter_location(),
                "cannot archive an order; dead-lettered");
            let letter = DeadLetter {
                order_id: Some(refusal.id.clone()),
                event_position: None,
                reason: refusal.reason.clone(),
                code: refusal.code,
                size: refusal.size,
                event_time: times.get(&equality_key(&refusal.id)).copied(),
                source: self.source,
            };
            self.store.record_dead_letter(&letter).await?;
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
        match self.store.write(docs, &mut refused).await {
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
        let archived = self.store.archived_among(ids).await?;
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
            self.store.replace(document).await?;
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
        let outcome = self.store.write(docs, &mut refused).await?;
        self.settle(outcome, refused, total, times).await
    }

    /// Records (or counts another attempt of) the dead letter of a delivery event whose order id
    /// cannot be read, keyed by the event's position.
    pub async fn dead_letter_event(&self, position: &str, reason: &str) -> Result<(), Error> {
        let letter = DeadLetter {
            order_id: None,
            event_position: Some(position.to_owned()),
            reason: crate::redact::scrub(reason),
            code: None,
            size: None,
            event_time: None,
            source: self.source,
        };
        self.store.record_dead_letter(&letter).await
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

/// Creates the indexes the queries rely on, those not there yet: they are listed first, since
/// creating an index that exists still needs the createIndex privilege and costs a command (a
/// quarter of a second each on the development server). A failure (no privilege, duplicate
/// order numbers in existing data) is logged and the run goes on: indexes speed things up, they
/// are not needed for correctness.
pub async fn ensure_indexes(config: &Config, dbs: &Databases) {
    for (collection, model) in wanted_indexes(config, dbs) {
        let keys = model.keys.clone();
        if has_index(&collection, &model).await {
            tracing::info!(collection = collection.name(), keys = %keys, "index present");
            continue;
        }
        match collection.create_index(model).await {
            Ok(_) => tracing::info!(collection = collection.name(), keys = %keys, "index present (created)"),
            Err(e) => tracing::warn!(collection = collection.name(), keys = %keys,
                error = %crate::redact::scrub(&e.to_string()),
                "could not create index; continuing without it (use --skip-indexes to silence)"),
        }
    }
}

/// Whether `collection` has an index on the keys of `model`, unique if `model` is (an index
/// that cannot be listed counts as missing: creating it says why).
async fn has_index(collection: &Collection<Document>, model: &IndexModel) -> bool {
    let unique = |options: Option<&IndexOptions>| options.and_then(|o| o.unique).unwrap_or(false);
    let Ok(listed) = collection.list_indexes().await else { return false };
    let Ok(indexes) = listed.try_collect::<Vec<IndexModel>>().await else { return false };
    indexes
        .iter()
        .any(|index| index.keys == model.keys && unique(index.options.as_ref()) == unique(model.options.as_ref()))
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
