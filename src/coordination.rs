//! Coordination of several `archiver` processes through MongoDB itself: the shared checkpoint
//! store, the leadership lease with its fencing epoch, and partitions of the order ids.
//!
//! - **Lease** (`archiver_leases`, one document per stream): `{holder, epoch, expires_at}`. It is
//!   taken when expired (or already ours) and renewed on a heartbeat, with majority write concern.
//!   Each takeover increments `epoch`.
//! - **Checkpoints** (`archiver_checkpoints`, one document per stream): the resume token and the
//!   epoch of the leader that wrote it. A save only matches a document whose epoch is not newer
//!   than the writer's, so a leader that lost its lease (paused, partitioned) cannot move the
//!   checkpoint: its save fails with a duplicate key (the upsert cannot insert a second document)
//!   and it steps down. A new leader stamps its epoch on the checkpoint before it streams.
//! - **Partitions**: an order belongs to partition `h(_id) mod N`, where `h` reads the last two
//!   hex digits of the id's string form (the ObjectId counter: uniform). Every id, of any type,
//!   maps to exactly one partition, in the change stream filter and in `batch` alike.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, Document};
use mongodb::change_stream::event::ResumeToken;
use mongodb::error::{Error, ErrorKind};
use mongodb::options::{ReturnDocument, WriteConcern};
use mongodb::{ClientSession, Collection, Database};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::config::Config;

/// Largest number of partitions (the partition key has 256 values).
pub const MAX_PARTITIONS: u32 = 256;

/// The partition (0..`partitions`) of the id at `id_path` (e.g. `$_id`), as an expression.
///
/// It is total: it evaluates for every id, because an error in it fails the whole change stream
/// (and resuming replays the same event) or the whole `batch`/`verify` query. So the id's string
/// form comes from `$convert` with `onError`/`onNull`, and is left-padded with `"00"` so that it
/// always has the two characters the key reads. Padding leaves the last two characters of any
/// longer string as they were: ObjectIds (and every other id the former `$toString` form
/// accepted with two or more characters) keep their partition. Ids without a string form
/// (documents, arrays, binary, regular expressions…) all fall in partition 0.
pub fn partition_expr(id_path: &str, partitions: u32) -> Document {
    let hex_digit = |from_end: i32| -> Bson {
        Bson::Document(doc! { "$max": [0, { "$indexOfCP": [
            "0123456789abcdef",
            { "$toLower": { "$substrCP": ["$$id", { "$subtract": [{ "$strLenCP": "$$id" }, from_end] }, 1] } },
        ] }] })
    };
    let id_text = doc! { "$convert": { "input": id_path, "to": "string", "onError": "", "onNull": "" } };
    doc! { "$let": {
        "vars": { "id": { "$concat": ["00", id_text] } },
        "in": { "$mod": [{ "$add": [{ "$multiply": [16, hex_digit(2)] }, hex_digit(1)] }, i64::from(partitions)] },
    } }
}

/// A query condition selecting this worker's partition, or `None` when not partitioned.
pub fn partition_filter(config: &Config, id_path: &str) -> Option<Document> {
    let c = &config.coordination;
    (c.partitions > 1).then(|| {
        doc! { "$expr": { "$eq": [partition_expr(id_path, c.partitions), i64::from(c.partition)] } }
    })
}

/// Adds this worker's partition condition to `filter`.
pub fn restrict_to_partition(config: &Config, mut filter: Document, id_path: &str) -> Document {
    if let Some(partition) = partition_filter(config, id_path) {
        filter = doc! { "$and": [filter, partition] };
    }
    filter
}

/// The stream name: what checkpoints and leases are keyed by.
///
/// Partitions always qualify the name, a configured `STREAM_NAME` included: each partition needs
/// its own checkpoint and its own lease. Sharing them would let one partition's checkpoint move
/// past events the others have not archived yet, and make one worker the only leader of all.
pub fn stream_name(config: &Config) -> String {
    let c = &config.coordination;
    let base = if c.stream_name.is_empty() { config.orders_namespace() } else { c.stream_name.clone() };
    if c.partitions > 1 {
        format!("{base}#{}of{}", c.partition, c.partitions)
    } else {
        base
    }
}

/// This process's name in the lease.
pub fn instance_id(config: &Config) -> String {
    if !config.coordination.instance_id.is_empty() {
        return config.coordination.instance_id.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{host}:{}", std::process::id())
}

fn is_duplicate_key(err: &Error) -> bool {
    crate::db::error_code(err) == Some(11000) || matches!(err.kind.as_ref(), ErrorKind::Command(c) if c.code == 11000)
}

fn now_bson() -> mongodb::bson::DateTime {
    mongodb::bson::DateTime::now()
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    leases: Collection<Document>,
    stream: String,
    holder: String,
    ttl: Duration,
    epoch: i64,
    previous_holder: Option<String>,
    renewed_at: Instant,
}

/// Who holds a lease, for standbys' logs and `health`.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    /// The holder.
    pub holder: String,
    /// Its epoch.
    pub epoch: i64,
    /// When it expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// The lease collection, written with majority write concern.
    pub fn collection(db: &Database, config: &Config) -> Collection<Document> {
        db.collection_with_options(
            &config.coordination.lease_collection,
            mongodb::options::CollectionOptions::builder().write_concern(WriteConcern::majority()).build(),
        )
    }

    /// Takes the lease if it is free, expired or already ours.
    pub async fn try_acquire(
        leases: &Collection<Document>,
        stream: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, Error> {
        let now = now_bson();
        let expires = mongodb::bson::DateTime::from_millis(now.timestamp_millis() + ttl.as_millis() as i64);
        let before = leases.find_one(doc! { "_id": stream }).await?;
        let result = leases
            .find_one_and_update(
                doc! { "_id": stream, "$or": [{ "expires_at": { "$lt": now } }, { "holder": holder }] },
                doc! { "$set": { "holder": holder, "expires_at": expires, "acquired_at": now }, "$inc": { "epoch": 1_i64 } },
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await;
        match result {
            Ok(Some(lease)) => Ok(Some(Lease {
                leases: leases.clone(),
                stream: stream.to_owned(),
                holder: holder.to_owned(),
                ttl,
                epoch: lease
                    .get("epoch")
                    .and_then(Bson::as_i64)
                    .or_else(|| lease.get_i32("epoch").ok().map(i64::from))
                    .unwrap_or(1),
                previous_holder: before
                    .and_then(|b| b.get_str("holder").ok().map(str::to_owned))
                    .filter(|h| h != holder),
                renewed_at: Instant::now(),
            })),
            Ok(None) => Ok(None),
            Err(e) if is_duplicate_key(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Who holds the lease of `stream`, if anyone.
    pub async fn current(leases: &Collection<Document>, stream: &str) -> Result<Option<LeaseInfo>, Error> {
        Ok(leases.find_one(doc! { "_id": stream }).await?.map(|d| LeaseInfo {
            holder: d.get_str("holder").unwrap_or_default().to_owned(),
            epoch: d
                .get("epoch")
                .and_then(Bson::as_i64)
                .or_else(|| d.get_i32("epoch").ok().map(i64::from))
                .unwrap_or(0),
            expires_at: d
                .get_datetime("expires_at")
                .ok()
                .and_then(|t| DateTime::from_timestamp_millis(t.timestamp_millis()))
                .unwrap_or_default(),
        }))
    }

    /// Extends the lease. `Ok(false)`: it was taken over (or expired and taken).
    pub async fn renew(&mut self) -> Result<bool, Error> {
        let now = now_bson();
        let expires = mongodb::bson::DateTime::from_millis(now.timestamp_millis() + self.ttl.as_millis() as i64);
        let result = self
            .leases
            .update_one(
                doc! { "_id": &self.stream, "holder": &self.holder, "epoch": self.epoch },
                doc! { "$set": { "expires_at": expires } },
            )
            .await?;
        if result.matched_count == 1 {
            self.renewed_at = Instant::now();
        }
        Ok(result.matched_count == 1)
    }

    /// Whether the lease is surely still ours: renewed within `fraction` of its time to live.
    pub fn is_fresh(&self, fraction: f64) -> bool {
        self.renewed_at.elapsed() < self.ttl.mul_f64(fraction)
    }

    /// How much longer the lease stays [fresh](Lease::is_fresh) for `fraction` (zero once not).
    pub fn fresh_for(&self, fraction: f64) -> Duration {
        self.ttl.mul_f64(fraction).saturating_sub(self.renewed_at.elapsed())
    }

    /// Gives the lease up at once, so a standby need not wait for it to expire.
    pub async fn release(&self) {
        let released = self
            .leases
            .update_one(
                doc! { "_id": &self.stream, "holder": &self.holder, "epoch": self.epoch },
                doc! { "$set": { "expires_at": mongodb::bson::DateTime::from_millis(0) } },
            )
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %crate::redact::scrub(&e.to_string()), "could not release the lease; it will expire");
        }
    }

    /// The fencing epoch.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Who held it before, when this was a takeover.
    pub fn previous_holder(&self) -> Option<&str> {
        self.previous_holder.as_deref()
    }
}

/// Why a save to the shared store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A newer leader owns the checkpoint: this process must stop writing.
    #[error("the checkpoint of stream {0} belongs to a newer leader (fenced)")]
    Fenced(String),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] Error),
}

/// Checkpoints in a MongoDB collection, one document per stream, fenced by epoch.
#[derive(Debug, Clone)]
pub struct MongoCheckpoints {
    collection: Collection<Document>,
    stream: String,
    epoch: i64,
    last_saved: Option<ResumeToken>,
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

    fn location(&self) -> std::path::PathBuf {
        format!("mongodb:{}/{}", self.collection.name(), self.stream).into()
    }

    /// Reads the checkpoint; a malformed document is an error, never a silent reset.
    pub async fn load(&mut self) -> Result<Option<Checkpoint>, CheckpointError> {
        let found = self.collection.find_one(doc! { "_id": &self.stream }).await.map_err(|e| {
            CheckpointError::Unreadable { path: self.location(), source: std::io::Error::other(e.to_string()) }
        })?;
        let Some(d) = found else { return Ok(None) };
        if d.get_document("resume_token").is_err() {
            // Only fenced (stamped by a leader that has not saved yet).
            return Ok(None);
        }
        let corrupt = |reason: String| CheckpointError::Corrupt { path: self.location(), reason };
        let token: ResumeToken =
            mongodb::bson::from_bson(Bson::Document(d.get_document("resume_token").unwrap().clone()))
                .map_err(|e| corrupt(e.to_string()))?;
        let checkpoint = Checkpoint {
            resume_token: token.clone(),
            namespace: d.get_str("stream").unwrap_or(&self.stream).to_owned(),
            last_event_cluster_time: d.get_timestamp("last_event_cluster_time").ok(),
            last_event_wall_time: d
                .get_datetime("last_event_wall_time")
                .ok()
                .and_then(|t| DateTime::from_timestamp_millis(t.timestamp_millis())),
            saved_at: d
                .get_datetime("saved_at")
                .ok()
                .and_then(|t| DateTime::from_timestamp_millis(t.timestamp_millis()))
                .ok_or_else(|| corrupt("no saved_at".to_owned()))?,
        };
        self.last_saved = Some(token);
        Ok(Some(checkpoint))
    }

    fn fenced_filter(&self) -> Document {
        doc! { "_id": &self.stream, "$or": [{ "epoch": { "$lte": self.epoch } }, { "epoch": { "$exists": false } }] }
    }

    /// Stamps this leader's epoch on the checkpoint, so older leaders can no longer save.
    pub async fn fence(&self) -> Result<(), StoreError> {
        let stamped = self
            .collection
            .update_one(self.fenced_filter(), doc! { "$set": { "epoch": self.epoch, "stream": &self.stream } })
            .upsert(true)
            .await;
        match stamped {
            Err(e) if is_duplicate_key(&e) => Err(StoreError::Fenced(self.stream.clone())),
            other => other.map(|_| ()).map_err(StoreError::from),
        }
    }

    /// Saves `checkpoint` unless a newer leader owns the stream; within `session` when given
    /// (the archive write's transaction). Returns whether anything was written.
    pub async fn save(
        &mut self,
        checkpoint: &Checkpoint,
        session: Option<&mut ClientSession>,
    ) -> Result<bool, StoreError> {
        if self.last_saved.as_ref() == Some(&checkpoint.resume_token) && session.is_none() {
            return Ok(false);
        }
        let token = mongodb::bson::to_bson(&checkpoint.resume_token).map_err(|e| Error::custom(e.to_string()))?;
        let mut set = doc! {
            "version": 1,
            "stream": &self.stream,
            "resume_token": token,
            "epoch": self.epoch,
            "saved_at": mongodb::bson::DateTime::from_millis(checkpoint.saved_at.timestamp_millis()),
            "last_event_cluster_time": checkpoint.last_event_cluster_time.map_or(Bson::Null, Bson::Timestamp),
        };
        set.insert(
            "last_event_wall_time",
            checkpoint
                .last_event_wall_time
                .map_or(Bson::Null, |t| Bson::DateTime(mongodb::bson::DateTime::from_millis(t.timestamp_millis()))),
        );
        let update = self.collection.update_one(self.fenced_filter(), doc! { "$set": set }).upsert(true);
        let result = match session {
            Some(session) => update.session(session).await,
            None => update.await,
        };
        match result {
            Ok(_) => {
                self.last_saved = Some(checkpoint.resume_token.clone());
                Ok(true)
            }
            Err(e) if is_duplicate_key(&e) => Err(StoreError::Fenced(self.stream.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the checkpoint (explicit `--reset-token`).
    pub async fn remove(&mut self) -> Result<(), StoreError> {
        self.last_saved = None;
        self.collection
            .update_one(self.fenced_filter(), doc! { "$unset": { "resume_token": "" } })
            .await
            .map(|_| ())
            .map_err(|e| if is_duplicate_key(&e) { StoreError::Fenced(self.stream.clone()) } else { e.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_distinguish_partitions() {
        let mut config = Config::default();
        assert_eq!(stream_name(&config), "livraison.Commandes");
        config.coordination.partitions = 4;
        config.coordination.partition = 2;
        assert_eq!(stream_name(&config), "livraison.Commandes#2of4");
        config.coordination.stream_name = "eu".into();
        assert_eq!(stream_name(&config), "eu#2of4");
    }

    /// A configured name used to be taken as is: every partition shared one lease and one
    /// checkpoint.
    #[test]
    fn configured_stream_names_are_qualified_only_when_partitioned() {
        let mut config = Config::default();
        config.coordination.stream_name = "eu".into();
        assert_eq!(stream_name(&config), "eu", "unpartitioned names are unchanged");
        config.coordination.partitions = 3;
        let names: std::collections::HashSet<String> = (0..3)
            .map(|i| {
                config.coordination.partition = i;
                stream_name(&config)
            })
            .collect();
        assert_eq!(names, ["eu#0of3", "eu#1of3", "eu#2of3"].map(String::from).into());
    }

    #[test]
    fn partition_filter_only_when_partitioned() {
        let mut config = Config::default();
        assert!(partition_filter(&config, "$_id").is_none());
        config.coordination.partitions = 3;
        config.coordination.partition = 1;
        let text = format!("{:?}", partition_filter(&config, "$documentKey._id").unwrap());
        assert!(text.contains("$documentKey._id") && text.contains("$mod"), "{text}");
    }
}
