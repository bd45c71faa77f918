//! Idempotent writes to the archive. Every archive document is keyed on its order's `_id` and
//! inserted only if absent, so replaying an event or re-running a date range never makes a second
//! document. Orders the archive refuses go to a dead-letter collection, never silently away.

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{Error, ErrorKind};
use mongodb::options::UpdateOptions;
use mongodb::Collection;

use crate::config::{Config, EnrichMode};
use crate::join::Joiner;
use crate::db::{error_code, is_transient, Databases};
use crate::enrich::{enrichment_stages, vanished_order_document, ArchiveSource};

/// When each order's delivery event happened, keyed by [`id_key`]; recorded with dead
/// letters. Empty for the batch path, which has no events.
pub type EventTimes = std::collections::HashMap<String, mongodb::bson::DateTime>;

/// A hashable key for an id (`Bson` has no `Hash`): its debug form, which keeps the type, so
/// `Int32(1)` and `Int64(1)` stay distinct as they are in MongoDB.
pub fn id_key(id: &Bson) -> String {
    format!("{id:?}")
}

/// The keys of the `_id`s of `docs`.
fn id_keys(docs: &[Document]) -> std::collections::HashSet<String> {
    docs.iter().filter_map(|d| d.get("_id")).map(id_key).collect()
}

/// Server code of a duplicate key: the order is already archived.
const DUPLICATE_KEY: i32 = 11000;

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
}

impl std::ops::AddAssign for WriteOutcome {
    fn add_assign(&mut self, other: Self) {
        self.inserted += other.inserted;
        self.already_archived += other.already_archived;
        self.anomalies += other.anomalies;
        self.dead_lettered += other.dead_lettered;
    }
}

/// Enriches orders and writes them to the archive.
#[derive(Debug, Clone)]
pub struct Archiver {
    orders: Collection<Document>,
    archive: Collection<Document>,
    dead_letters: Collection<Document>,
    stages: Vec<Document>,
    /// The client-side join, when configured and possible for this configuration.
    joiner: Option<Joiner>,
    source: ArchiveSource,
    delivered_status: String,
}

impl Archiver {
    /// An archiver for `source` documents.
    pub fn new(config: &Config, dbs: &Databases, source: ArchiveSource) -> Self {
        Archiver {
            orders: dbs.source.collection(&config.orders.collection),
            archive: dbs.archive.collection(&config.archive.collection),
            dead_letters: dbs.archive.collection(&config.archive.errors_collection),
            stages: enrichment_stages(config, source),
            joiner: match config.enrich.mode {
                EnrichMode::Join => Joiner::new(config, &dbs.source, source),
                EnrichMode::Lookup => None,
            },
            source,
            delivered_status: config.orders.delivered_status.clone(),
        }
    }

    /// A session on the archive's deployment, for transactions.
    pub async fn start_session(&self) -> Result<mongodb::ClientSession, Error> {
        self.archive.client().start_session().await
    }

    /// The enrichment stages, for callers that build their own pipelines around them.
    pub fn stages(&self) -> &[Document] {
        &self.stages
    }

    /// Archives the orders with these ids. A transient error is returned for the caller to
    /// retry the whole call (harmless: writes are idempotent); a permanent error is narrowed down
    /// to the orders that cause it, which are dead-lettered while the rest are archived.
    pub async fn archive_ids(&self, ids: &[Bson], times: &EventTimes) -> Result<WriteOutcome, Error> {
        match self.enrich_and_write(ids, times).await {
            Err(e) if !is_transient(&e) && ids.len() > 1 => {
                let (left, right) = ids.split_at(ids.len() / 2);
                let mut outcome = Box::pin(self.archive_ids(left, times)).await?;
                outcome += Box::pin(self.archive_ids(right, times)).await?;
                Ok(outcome)
            }
            Err(e) if !is_transient(&e) && ids.len() == 1 => {
                self.dead_letter(&ids[0], &e, times).await?;
                Ok(WriteOutcome { dead_lettered: 1, ..Default::default() })
            }
            other => other,
        }
    }

    /// Whether whole orders can be joined here (so callers may stream orders, not ids).
    pub fn joins(&self) -> bool {
        self.joiner.is_some()
    }

    /// Archives orders already read (by `batch`, which streams them): joined on the client, with
    /// the same fallbacks as [`Archiver::archive_ids`] when the join or the write cannot do them.
    pub async fn archive_orders(&self, orders: &[Document]) -> Result<WriteOutcome, Error> {
        let ids: Vec<Bson> = orders.iter().filter_map(|o| o.get("_id").cloned()).collect();
        let no_events = EventTimes::new();
        let Some(joiner) = &self.joiner else { return self.archive_ids(&ids, &no_events).await };
        match joiner.enrich(orders).await? {
            Some(docs) => match self.write(docs, &no_events).await {
                Err(e) if !is_transient(&e) => self.archive_ids(&ids, &no_events).await,
                other => other,
            },
            None => self.archive_ids(&ids, &no_events).await,
        }
    }

    /// Like [`Archiver::archive_ids`], but first leaves out the orders already archived, so
    /// that nothing is enriched in vain.
    pub async fn archive_missing_ids(&self, ids: &[Bson]) -> Result<WriteOutcome, Error> {
        let found: Vec<Document> = self
            .archive
            .find(doc! { "_id": { "$in": ids } })
            .projection(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await?;
        let archived = id_keys(&found);
        let missing: Vec<Bson> = ids.iter().filter(|id| !archived.contains(&id_key(id))).cloned().collect();
        let mut outcome = self.archive_ids(&missing, &EventTimes::new()).await?;
        outcome.already_archived += (ids.len() - missing.len()) as u64;
        Ok(outcome)
    }

    async fn enrich_and_write(&self, ids: &[Bson], times: &EventTimes) -> Result<WriteOutcome, Error> {
        let docs = self.enrich(ids).await?;
        self.write(docs, times).await
    }

    /// Inserts the documents not yet archived, inside `session`'s transaction, so that the
    /// caller can commit them together with a checkpoint. Any write error aborts the whole.
    pub async fn insert_missing_in(
        &self,
        docs: Vec<Document>,
        session: &mut mongodb::ClientSession,
    ) -> Result<WriteOutcome, Error> {
        let ids: Vec<&Bson> = docs.iter().filter_map(|d| d.get("_id")).collect();
        let found: Vec<Document> = self
            .archive
            .find(doc! { "_id": { "$in": ids } })
            .projection(doc! { "_id": 1 })
            .session(&mut *session)
            .await?
            .stream(&mut *session)
            .try_collect()
            .await?;
        let archived = id_keys(&found);
        let total = docs.len() as u64;
        let missing: Vec<Document> = docs
            .into_iter()
            .filter(|d| d.get("_id").is_some_and(|id| !archived.contains(&id_key(id))))
            .collect();
        let anomalies = missing
            .iter()
            .filter(|d| d.get_array("anomalies").is_ok_and(|a| !a.is_empty()))
            .count() as u64;
        let inserted = missing.len() as u64;
        if !missing.is_empty() {
            self.archive.insert_many(missing).session(&mut *session).await?;
        }
        Ok(WriteOutcome { inserted, already_archived: total - inserted, anomalies, dead_lettered: 0 })
    }

    /// The archive documents of these orders (one per id, flagged if the order vanished).
    pub async fn enrich(&self, ids: &[Bson]) -> Result<Vec<Document>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut docs = self.enrich_found(ids).await?;
        if docs.len() < ids.len() {
            // Deleted between delivery and enrichment: archive what is known, flagged.
            let found = id_keys(&docs);
            let vanished: Vec<Document> = ids
                .iter()
                .filter(|id| !found.contains(&id_key(id)))
                .map(|id| vanished_order_document(id.clone(), &self.delivered_status, self.source))
                .collect();
            for d in &vanished {
                tracing::warn!(order_id = %d.get("_id").map(|b| b.to_string()).unwrap_or_default(),
                    "delivered order no longer exists; archiving its id with anomaly commande_introuvable");
            }
            docs.extend(vanished);
        }
        Ok(docs)
    }

    /// The archive documents of the orders that still exist: joined on the client when
    /// configured (and possible for these orders), else by the `$lookup` pipeline.
    async fn enrich_found(&self, ids: &[Bson]) -> Result<Vec<Document>, Error> {
        if let Some(joiner) = &self.joiner {
            let orders: Vec<Document> =
                self.orders.find(doc! { "_id": { "$in": ids } }).await?.try_collect().await?;
            if let Some(docs) = joiner.enrich(&orders).await? {
                return Ok(docs);
            }
            tracing::debug!(orders = orders.len(), "batch needs the $lookup pipeline (arrays or decimals)");
        }
        let mut pipeline = Vec::with_capacity(self.stages.len() + 1);
        pipeline.push(doc! { "$match": { "_id": { "$in": ids } } });
        pipeline.extend(self.stages.iter().cloned());
        self.orders.aggregate(pipeline).await?.try_collect().await
    }

    /// Inserts already-enriched documents, keeping any that are already archived.
    pub async fn write(&self, docs: Vec<Document>, times: &EventTimes) -> Result<WriteOutcome, Error> {
        if docs.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let total = docs.len() as u64;
        let anomalies = docs
            .iter()
            .filter(|d| d.get_array("anomalies").is_ok_and(|a| !a.is_empty()))
            .count() as u64;
        let ids: Vec<Bson> = docs.iter().map(|d| d.get("_id").cloned().unwrap_or(Bson::Null)).collect();
        match self.archive.insert_many(docs).ordered(false).await {
            Ok(_) => Ok(WriteOutcome { inserted: total, anomalies, ..Default::default() }),
            Err(e) => {
                let ErrorKind::InsertMany(failure) = e.kind.as_ref() else {
                    return Err(e);
                };
                if failure.write_concern_error.is_some() {
                    return Err(e);
                }
                let write_errors = failure.write_errors.clone().unwrap_or_default();
                let mut outcome = WriteOutcome { anomalies, ..Default::default() };
                for w in &write_errors {
                    if w.code == DUPLICATE_KEY {
                        outcome.already_archived += 1;
                    } else {
                        let id = ids.get(w.index).cloned().unwrap_or(Bson::Null);
                        self.record_dead_letter(&id, &w.message, Some(w.code), times).await?;
                        tracing::error!(order_id = %id, code = w.code, error = %w.message,
                            "the archive refused an order; recorded in the dead-letter collection");
                        outcome.dead_lettered += 1;
                    }
                }
                outcome.inserted = total - write_errors.len() as u64;
                Ok(outcome)
            }
        }
    }

    async fn dead_letter(&self, id: &Bson, error: &Error, times: &EventTimes) -> Result<(), Error> {
        let message = crate::redact::scrub(&error.to_string());
        tracing::error!(order_id = %id, code = ?error_code(error), error = %message,
            "cannot archive an order; recorded in the dead-letter collection");
        self.record_dead_letter(id, &message, error_code(error), times).await
    }

    /// Records (or updates) the dead letter of one order.
    async fn record_dead_letter(
        &self,
        id: &Bson,
        reason: &str,
        code: Option<i32>,
        times: &EventTimes,
    ) -> Result<(), Error> {
        let now = mongodb::bson::DateTime::now();
        let event_time = times.get(&id_key(id)).map_or(Bson::Null, |t| Bson::DateTime(*t));
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
