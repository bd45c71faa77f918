//! The MongoDB adapter of the archive (`ARCHIVE_SINK=mongodb`, the default): one document per
//! order in the archive collection, keyed on the order's `_id` and inserted only if absent; dead
//! letters in their own collection, one document per order (or unreadable event), updated at
//! each attempt.

use std::collections::{HashMap, HashSet};

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::error::{Error, ErrorKind};
use mongodb::options::{CollectionOptions, ReadConcern};
use mongodb::Collection;

use super::{id_of, ArchiveStore, DeadLetter, Refusal, StoreFuture, WriteOutcome};
use crate::config::Config;
use crate::db::{is_archive_refusal, is_transient, Databases, DUPLICATE_KEY};
use crate::pipeline::document::field;
use crate::pipeline::order_id::{equality_key, present_among};

/// The largest document MongoDB stores (`maxBsonObjectSize`).
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;

/// The server's code for a document over [`MAX_DOCUMENT_BYTES`].
const BSON_OBJECT_TOO_LARGE: i32 = 10334;

/// The archive collection and its dead-letter collection.
#[derive(Debug, Clone)]
pub struct CollectionStore {
    archive: Collection<RawDocumentBuf>,
    /// The archive read at majority from the primary: a copy that a failover could still roll
    /// back must never justify deleting its order.
    archive_for_purge: Collection<Document>,
    dead_letters: Collection<Document>,
}

impl CollectionStore {
    /// The configured collections, in the archive database.
    pub fn new(config: &Config, dbs: &Databases) -> Self {
        CollectionStore {
            archive: dbs.archive.collection(&config.archive.collection),
            archive_for_purge: crate::db::on_primary(&dbs.archive).collection_with_options(
                &config.archive.collection,
                CollectionOptions::builder().read_concern(ReadConcern::majority()).build(),
            ),
            dead_letters: dbs.archive.collection(&config.archive.errors_collection),
        }
    }

    /// Inserts `docs` unordered. A duplicate key on `_id` means "already archived"; any other
    /// per-document refusal (validation, a duplicate on another unique index, a bad value, a
    /// document over the size limit) is collected in `refused`; a transient per-document error
    /// (a shard's failover) fails the whole call so that it is retried.
    async fn insert(&self, docs: Vec<RawDocumentBuf>, refused: &mut Vec<Refusal>) -> Result<WriteOutcome, Error> {
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
        let flagged: Vec<bool> = docs.iter().map(|d| super::has_anomalies(d)).collect();
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
        let archived = self.present(&duplicates).await?;
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

    async fn present(&self, ids: &[Bson]) -> Result<HashSet<String>, Error> {
        present_among(&self.archive.clone_with_type(), ids, doc! {}).await
    }

    /// Records (or updates) a dead letter: keyed by the order's id, or by `event:<position>`
    /// for an event whose order id cannot be read.
    async fn upsert_dead_letter(&self, letter: &DeadLetter) -> Result<(), Error> {
        let now = mongodb::bson::DateTime::now();
        let key = match (&letter.order_id, &letter.event_position) {
            (Some(id), _) => id.clone(),
            (None, position) => Bson::String(format!("event:{}", position.as_deref().unwrap_or_default())),
        };
        let mut set = doc! {
            "order_id": letter.order_id.clone().unwrap_or(Bson::Null),
            "reason": &letter.reason,
            "error_code": letter.code.map(Bson::Int32).unwrap_or(Bson::Null),
            "source": letter.source.as_str(),
            "last_attempt_at": now,
        };
        let mut set_on_insert = doc! { "first_attempt_at": now };
        match &letter.event_position {
            Some(position) if letter.order_id.is_none() => {
                set.insert("event_position", position);
            }
            _ => {
                set.insert("size_bytes", letter.size.map_or(Bson::Null, |bytes| Bson::Int64(bytes as i64)));
                set_on_insert.insert("event_time", letter.event_time.map_or(Bson::Null, Bson::DateTime));
            }
        }
        self.dead_letters
            .update_one(
                doc! { "_id": key },
                doc! { "$set": set, "$setOnInsert": set_on_insert, "$inc": { "attempts": 1 } },
            )
            .upsert(true)
            .await
            .map(|_| ())
    }
}

impl ArchiveStore for CollectionStore {
    fn describe(&self) -> String {
        format!("the collection {}", self.archive.namespace())
    }

    fn write<'a>(&'a self, docs: Vec<RawDocumentBuf>, refused: &'a mut Vec<Refusal>) -> StoreFuture<'a, WriteOutcome> {
        Box::pin(self.insert(docs, refused))
    }

    fn archived_among<'a>(&'a self, ids: &'a [Bson]) -> StoreFuture<'a, HashSet<String>> {
        Box::pin(self.present(ids))
    }

    fn replaces_copies(&self) -> bool {
        true
    }

    fn replace(&self, document: RawDocumentBuf) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let id = id_of(&document);
            self.archive.replace_one(doc! { "_id": id }, document).upsert(true).await.map(drop)
        })
    }

    fn dead_letter_location(&self) -> String {
        format!("the collection {}", self.dead_letters.namespace())
    }

    fn record_dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> StoreFuture<'a, ()> {
        Box::pin(self.upsert_dead_letter(letter))
    }

    fn finish(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn copies_of<'a>(
        &'a self,
        orders: &'a [Document],
        _delivered_on: &'a str,
    ) -> StoreFuture<'a, HashMap<String, Document>, anyhow::Error> {
        Box::pin(async move {
            let ids: Vec<&Bson> = orders.iter().filter_map(|o| o.get("_id")).collect();
            let archived: Vec<Document> =
                self.archive_for_purge.find(doc! { "_id": { "$in": ids } }).await?.try_collect().await?;
            Ok(archived.into_iter().filter_map(|d| Some((equality_key(d.get("_id")?), d))).collect())
        })
    }

    fn mark_purged<'a>(&'a self, ids: &'a [Bson]) -> StoreFuture<'a, (), anyhow::Error> {
        Box::pin(async move {
            let now = mongodb::bson::DateTime::now();
            let marked = doc! { "$set": { field::PURGED_AT: now } };
            self.archive_for_purge.update_many(doc! { "_id": { "$in": ids } }, marked).await?;
            Ok(())
        })
    }

    fn unmark_purged<'a>(&'a self, ids: &'a [Bson]) -> StoreFuture<'a, (), anyhow::Error> {
        Box::pin(async move {
            let unmarked = doc! { "$unset": { field::PURGED_AT: "" } };
            self.archive_for_purge.update_many(doc! { "_id": { "$in": ids } }, unmarked).await?;
            Ok(())
        })
    }

    fn dead_letter_count(&self) -> StoreFuture<'_, u64, anyhow::Error> {
        Box::pin(async move { Ok(self.dead_letters.estimated_document_count().await?) })
    }
}
