//! The shared checkpoint store: one document per stream in a MongoDB collection, fenced by the
//! epoch of the leader that writes it. A save only matches a document whose epoch is not newer
//! than the writer's, so a leader that lost its lease (paused, partitioned) cannot move the
//! checkpoint: its save fails with a duplicate key (the upsert cannot insert a second document)
//! and it steps down. A new leader stamps its epoch on the checkpoint before it streams.

use mongodb::bson::{doc, Bson, Document};
use mongodb::change_stream::event::ResumeToken;
use mongodb::error::Error;
use mongodb::options::WriteConcern;
use mongodb::{Collection, Database};

use super::{Checkpoint, FillProgress, StoreError};
use crate::config::Config;
use crate::db::is_duplicate_key;

/// Checkpoints in a MongoDB collection, one document per stream, fenced by epoch.
#[derive(Debug, Clone)]
pub struct MongoCheckpoints {
    collection: Collection<Document>,
    stream: String,
    epoch: i64,
    /// What was saved last (the token and the fill's progress): an unchanged save is skipped.
    last_saved: Option<(ResumeToken, Option<FillProgress>)>,
}

impl MongoCheckpoints {
    /// The store for `stream`, writing as `epoch`.
    pub fn new(db: &Database, config: &Config, stream: &str, epoch: i64) -> Self {
        let collection = db.collection_with_options(
            &config.coordination.checkpoint_collection,
            mongodb::options::CollectionOptions::builder().write_concern(WriteConcern::majority()).build(),
        );
        MongoCheckpoints { collection, stream: stream.to_owned(), epoch, last_saved: None }
    }

    /// Reads the checkpoint; a malformed document is an error, never a silent reset.
    pub async fn load(&mut self) -> Result<Option<Checkpoint>, StoreError> {
        let found = self
            .collection
            .find_one(doc! { "_id": &self.stream })
            .await
            .map_err(|source| StoreError::Database { context: "reading the checkpoint", source })?;
        let Some(d) = found else { return Ok(None) };
        if d.get_document("resume_token").is_err() {
            // Only fenced (stamped by a leader that has not saved yet).
            return Ok(None);
        }
        let corrupt = |reason: String| StoreError::CorruptDocument { stream: self.stream.clone(), reason };
        let token: ResumeToken =
            mongodb::bson::from_bson(Bson::Document(d.get_document("resume_token").unwrap().clone()))
                .map_err(|e| corrupt(e.to_string()))?;
        let checkpoint = Checkpoint {
            resume_token: token.clone(),
            namespace: d.get_str("stream").unwrap_or(&self.stream).to_owned(),
            last_event_cluster_time: d.get_timestamp("last_event_cluster_time").ok(),
            last_event_wall_time: d.get_datetime("last_event_wall_time").ok().map(|t| t.to_chrono()),
            saved_at: d
                .get_datetime("saved_at")
                .map(|t| t.to_chrono())
                .map_err(|_| corrupt("no saved_at".to_owned()))?,
            position_time: d.get_datetime("position_time").ok().map(|t| t.to_chrono()),
            fill: match d.get_document("fill") {
                Ok(f) => Some(FillProgress {
                    kind: f.get_str("kind").map_err(|_| corrupt("fill without a kind".to_owned()))?.to_owned(),
                    since: f.get_datetime("since").ok().map(|t| t.to_chrono()),
                    after: f.get("after").filter(|a| !matches!(a, Bson::Null)).cloned(),
                    started_at: f
                        .get_datetime("started_at")
                        .map(|t| t.to_chrono())
                        .map_err(|_| corrupt("fill without started_at".to_owned()))?,
                }),
                Err(_) => None,
            },
        };
        self.last_saved = Some((token, checkpoint.fill.clone()));
        Ok(Some(checkpoint))
    }

    fn fenced_filter(&self) -> Document {
        doc! { "_id": &self.stream, "$or": [{ "epoch": { "$lte": self.epoch } }, { "epoch": { "$exists": false } }] }
    }

    /// Stamps this leader's epoch on the checkpoint, so older leaders can no longer save.
    pub async fn fence(&self) -> Result<(), StoreError> {
        self.collection
            .update_one(self.fenced_filter(), doc! { "$set": { "epoch": self.epoch, "stream": &self.stream } })
            .upsert(true)
            .await
            .map(|_| ())
            .map_err(|e| self.failed("fencing the checkpoint", e))
    }

    /// A failed write: a duplicate key means the fenced filter matched nothing because a newer
    /// leader stamped the document, so the upsert tried to insert a second one.
    fn failed(&self, context: &'static str, source: Error) -> StoreError {
        if is_duplicate_key(&source) {
            StoreError::Fenced(self.stream.clone())
        } else {
            StoreError::Database { context, source }
        }
    }

    /// Saves `checkpoint` unless a newer leader owns the stream. Returns whether anything was
    /// written.
    pub async fn save(&mut self, checkpoint: &Checkpoint) -> Result<bool, StoreError> {
        let position = (checkpoint.resume_token.clone(), checkpoint.fill.clone());
        if self.last_saved.as_ref() == Some(&position) {
            return Ok(false);
        }
        let token = mongodb::bson::to_bson(&checkpoint.resume_token).map_err(|e| StoreError::Database {
            context: "saving the checkpoint",
            source: Error::custom(e.to_string()),
        })?;
        let set = doc! {
            "version": 2,
            "stream": &self.stream,
            "resume_token": token,
            "epoch": self.epoch,
            "saved_at": mongodb::bson::DateTime::from_chrono(checkpoint.saved_at),
            "last_event_cluster_time": checkpoint.last_event_cluster_time.map_or(Bson::Null, Bson::Timestamp),
            "last_event_wall_time": checkpoint
                .last_event_wall_time
                .map_or(Bson::Null, |t| Bson::DateTime(mongodb::bson::DateTime::from_chrono(t))),
            "position_time": checkpoint
                .position_time
                .map_or(Bson::Null, |t| Bson::DateTime(mongodb::bson::DateTime::from_chrono(t))),
            "fill": checkpoint.fill.as_ref().map_or(Bson::Null, |f| Bson::Document(doc! {
                "kind": &f.kind,
                "since": f.since.map_or(Bson::Null, |t| Bson::DateTime(mongodb::bson::DateTime::from_chrono(t))),
                "after": f.after.clone().unwrap_or(Bson::Null),
                "started_at": mongodb::bson::DateTime::from_chrono(f.started_at),
            })),
        };
        self.collection
            .update_one(self.fenced_filter(), doc! { "$set": set })
            .upsert(true)
            .await
            .map_err(|e| self.failed("saving the checkpoint", e))?;
        self.last_saved = Some(position);
        Ok(true)
    }

    /// Removes the checkpoint (explicit `--reset-token`).
    pub async fn remove(&mut self) -> Result<(), StoreError> {
        self.last_saved = None;
        self.collection
            .update_one(self.fenced_filter(), doc! { "$unset": { "resume_token": "" } })
            .await
            .map(|_| ())
            .map_err(|e| self.failed("removing the checkpoint", e))
    }
}
