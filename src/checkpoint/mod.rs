//! Checkpoints: where `watch` records how far the archive is known to be complete, and the
//! stores that keep them ([`file`], the local token file; [`mongo`], the shared collection fenced
//! by the leader's epoch; and an archive that keeps its position in the same commits as its
//! data, a Delta table, behind [`CheckpointKeeper`]). It knows nothing of the pipeline: a checkpoint is a resume token and
//! the times it stands for, saved only after the archive acknowledged what it covers.

pub mod file;
pub mod mongo;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use mongodb::bson::{self, Bson, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use serde::{Deserialize, Serialize};

pub use file::{lock_token_file, CheckpointFile, InstanceLock};
pub use mongo::MongoCheckpoints;

/// The format version this build writes. It also reads version 1, which has no `position_time`.
pub const FORMAT_VERSION: u32 = 2;

/// Why a checkpoint could not be read or written, from either store. None of these silently
/// resets a checkpoint, because that would skip or replay an unknown amount of work: the file
/// errors are fatal, a fenced save ends this process's leadership, and only a database error
/// that [`StoreError::is_transient`] is retried.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but cannot be read.
    #[error("cannot read the resume token file {path}: {source}")]
    Unreadable {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but does not hold a checkpoint this build understands.
    #[error(
        "the resume token file {path} is corrupt ({reason}); it was left untouched: \
         fix or move it, or restart with --reset-token to start from now"
    )]
    Corrupt {
        /// The token file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The checkpoint belongs to another collection.
    #[error(
        "the resume token file {path} was written for {found}, not {expected}; \
         use another RESUME_TOKEN_FILE for this collection"
    )]
    WrongNamespace {
        /// The token file.
        path: PathBuf,
        /// The namespace recorded in the file.
        found: String,
        /// The namespace being watched.
        expected: String,
    },
    /// The new checkpoint could not be made durable.
    #[error("cannot write the resume token file {path}: {source}")]
    Unwritable {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another process holds the token file.
    #[error(
        "another archiver watch is already running on the resume token file {0} \
         (its lock file {0}.lock is held); refusing to start"
    )]
    Locked(PathBuf),
    /// The archive that keeps the position (a Delta table) cannot read or write it.
    #[error("the archive table {uri}: {reason}")]
    Table {
        /// The table.
        uri: String,
        /// What failed.
        reason: String,
    },
    /// A newer leader owns the shared checkpoint: this process must stop writing.
    #[error("the checkpoint of stream {0} belongs to a newer leader (fenced)")]
    Fenced(String),
    /// The shared store's database failed.
    #[error("{context} in the shared checkpoint collection")]
    Database {
        /// What was being done.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: mongodb::error::Error,
    },
    /// The shared checkpoint document cannot be understood.
    #[error("the shared checkpoint of stream {stream} is corrupt ({reason}); it was left untouched")]
    CorruptDocument {
        /// The stream.
        stream: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl StoreError {
    /// Whether retrying later may succeed: a database error of the shared store that is
    /// transient (a failover, a network fault). Everything else needs a person or a new leader.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Database { source, .. } if crate::db::is_transient(source))
    }

    /// Whether the error is about the checkpoint's content (exit code 3 says "fix the file").
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt { .. } | StoreError::WrongNamespace { .. } | StoreError::CorruptDocument { .. }
        )
    }
}

/// One saved position of the change stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The token to resume after.
    pub resume_token: ResumeToken,
    /// `database.collection` of the watched orders.
    pub namespace: String,
    /// Cluster time of the last archived event, if any event was archived since the token
    /// started: what a gap-fill after lost history starts from.
    pub last_event_cluster_time: Option<Timestamp>,
    /// Wall-clock time of the last archived event, for humans and for the gap-fill date bound.
    pub last_event_wall_time: Option<DateTime<Utc>>,
    /// When this checkpoint was written.
    pub saved_at: DateTime<Utc>,
    /// The time the token stands for when it is not the last archived event's: an idle stream's
    /// token stands for the moment the stream was read up to (the last event's times stay, for
    /// the gap-fill). See [`Checkpoint::position`].
    pub position_time: Option<DateTime<Utc>>,
    /// A fill under way when this checkpoint was saved: the next start continues it where it
    /// stopped before it streams, never begins it again.
    pub fill: Option<FillProgress>,
}

/// How far a fill (the catch-up, or a gap-fill after lost history) went: it archives the orders
/// it matches in `_id` order, and those up to `after` are done.
#[derive(Debug, Clone, PartialEq)]
pub struct FillProgress {
    /// Which fill: `catch-up` or `gap-fill`.
    pub kind: String,
    /// For a gap-fill, the delivery date it fills from.
    pub since: Option<DateTime<Utc>>,
    /// The last order id done (in `_id` order); none before the first chunk.
    pub after: Option<Bson>,
    /// When the fill began.
    pub started_at: DateTime<Utc>,
}

/// On-disk layout of version 2, which is version 1 and `position_time` (absent when unset, and
/// always in version 1). Field order is the order in the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV1 {
    version: u32,
    namespace: String,
    /// The token as relaxed extended JSON, e.g. `{"_data": "8263…"}`.
    resume_token: serde_json::Value,
    last_event_cluster_time: Option<ClusterTimeV1>,
    last_event_wall_time: Option<DateTime<Utc>>,
    saved_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    position_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fill: Option<FillV2>,
}

/// A fill under way, in version 2. `after` is canonical extended JSON, so that the id's type
/// survives (`{"$numberLong": "7"}` is not `7`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FillV2 {
    kind: String,
    since: Option<DateTime<Utc>>,
    after: Option<serde_json::Value>,
    started_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterTimeV1 {
    t: u32,
    i: u32,
}

impl Checkpoint {
    /// A checkpoint saved now, for the position `resume_token`.
    pub fn now(
        resume_token: ResumeToken,
        namespace: &str,
        last_event_cluster_time: Option<Timestamp>,
        last_event_wall_time: Option<DateTime<Utc>>,
    ) -> Self {
        Checkpoint {
            resume_token,
            namespace: namespace.to_owned(),
            last_event_cluster_time,
            last_event_wall_time,
            saved_at: Utc::now(),
            position_time: None,
            fill: None,
        }
    }

    /// The time the token stands for: how far the archive is known complete, and what the oplog
    /// headroom counts from.
    pub fn position(&self) -> DateTime<Utc> {
        self.position_time.or(self.last_event_wall_time).unwrap_or(self.saved_at)
    }

    /// Serializes to the file format (pretty JSON with a trailing newline).
    pub fn to_json(&self) -> String {
        let token =
            bson::to_bson(&self.resume_token).map(Bson::into_relaxed_extjson).unwrap_or(serde_json::Value::Null);
        let file = FileV1 {
            version: FORMAT_VERSION,
            namespace: self.namespace.clone(),
            resume_token: token,
            last_event_cluster_time: self
                .last_event_cluster_time
                .map(|ts| ClusterTimeV1 { t: ts.time, i: ts.increment }),
            last_event_wall_time: self.last_event_wall_time,
            saved_at: self.saved_at,
            position_time: self.position_time,
            fill: self.fill.as_ref().map(|f| FillV2 {
                kind: f.kind.clone(),
                since: f.since,
                after: f.after.clone().map(Bson::into_canonical_extjson),
                started_at: f.started_at,
            }),
        };
        let mut text = serde_json::to_string_pretty(&file).expect("a checkpoint always serializes");
        text.push('\n');
        text
    }

    /// Parses the file format; the error is a human-readable reason.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(1 | 2) => {}
            Some(v) => {
                return Err(format!(
                    "format version {v} is not supported by this build (it reads versions 1 and {FORMAT_VERSION})"
                ))
            }
            None => return Err("no \"version\" field".to_owned()),
        }
        let file: FileV1 = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let token_bson =
            Bson::try_from(file.resume_token).map_err(|e| format!("resume_token is not extended JSON: {e}"))?;
        if !matches!(&token_bson, Bson::Document(d) if !d.is_empty()) {
            return Err("resume_token is not a non-empty document".to_owned());
        }
        let resume_token: ResumeToken = bson::from_bson(token_bson).map_err(|e| format!("resume_token: {e}"))?;
        Ok(Checkpoint {
            resume_token,
            namespace: file.namespace,
            last_event_cluster_time: file.last_event_cluster_time.map(|ct| Timestamp { time: ct.t, increment: ct.i }),
            last_event_wall_time: file.last_event_wall_time,
            saved_at: file.saved_at,
            position_time: file.position_time,
            fill: file
                .fill
                .map(|f| {
                    let after = f.after.map(Bson::try_from).transpose().map_err(|e| format!("fill.after: {e}"))?;
                    Ok::<_, String>(FillProgress { kind: f.kind, since: f.since, after, started_at: f.started_at })
                })
                .transpose()?,
        })
    }
}

/// Where checkpoints are kept: the one interface `watch` uses, whichever store is configured.
#[derive(Debug)]
pub enum Store {
    /// The local token file.
    File(CheckpointFile),
    /// The shared collection, fenced by the lease epoch.
    Mongo(MongoCheckpoints),
    /// The archive itself, which commits the position with the data it covers.
    Table(std::sync::Arc<dyn CheckpointKeeper>),
}

/// A future of a [`CheckpointKeeper`].
pub type KeeperFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// An archive that keeps the position in the same atomic commits as the data it covers (a Delta
/// table): a saved checkpoint is made durable with the next commit, never ahead of the rows it
/// covers, and a position loaded is the one of the last commit.
pub trait CheckpointKeeper: Send + Sync + std::fmt::Debug {
    /// Where the position lives, for logs and errors.
    fn describe(&self) -> String;
    /// The checkpoint of the last commit that carried one.
    fn load(&self) -> KeeperFuture<'_, Option<Checkpoint>>;
    /// Records `checkpoint` as the position of what is written so far; commits it with the
    /// rows waiting when a commit is due. Returns whether a commit was made.
    fn save<'a>(&'a self, checkpoint: &'a Checkpoint) -> KeeperFuture<'a, bool>;
    /// Commits the rows waiting and the last position recorded (at a stop).
    fn flush(&self) -> KeeperFuture<'_, bool>;
    /// Forgets the position (an explicit `--reset-token`): the next start begins from now.
    fn remove(&self) -> KeeperFuture<'_, ()>;
}

impl Store {
    /// Where the checkpoint lives, for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            Store::File(f) => f.path().display().to_string(),
            Store::Mongo(_) => "the shared checkpoint collection".to_owned(),
            Store::Table(t) => t.describe(),
        }
    }

    /// Reads the checkpoint of `stream`; `Ok(None)` when there is none.
    pub async fn load(&mut self, stream: &str) -> Result<Option<Checkpoint>, StoreError> {
        match self {
            Store::File(f) => f.load(stream),
            Store::Mongo(m) => m.load().await,
            Store::Table(t) => t.load().await,
        }
    }

    /// Removes the checkpoint (an explicit `--reset-token`).
    pub async fn remove(&mut self) -> Result<(), StoreError> {
        match self {
            Store::File(f) => f.remove(),
            Store::Mongo(m) => m.remove().await,
            Store::Table(t) => t.remove().await,
        }
    }

    /// Makes `checkpoint` durable; returns whether anything was written (an unchanged position
    /// is not written again).
    pub async fn save(&mut self, checkpoint: &Checkpoint) -> Result<bool, StoreError> {
        match self {
            Store::File(f) => f.save(checkpoint),
            Store::Mongo(m) => m.save(checkpoint).await,
            Store::Table(t) => t.save(checkpoint).await,
        }
    }

    /// Makes durable what a store holds back (the table's waiting rows and last position), at a
    /// stop; nothing to do for the others, which save at once.
    pub async fn flush(&mut self) -> Result<bool, StoreError> {
        match self {
            Store::Table(t) => t.flush().await,
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database outage while a leader reads or fences the shared checkpoint is ridden out (it
    /// used to exit 3, as if the checkpoint were corrupt); a fenced save or a bad document is not.
    #[test]
    fn only_a_transient_database_error_of_the_store_is_retried() {
        let outage: mongodb::error::Error =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused").into();
        assert!(StoreError::Database { context: "reading the checkpoint", source: outage }.is_transient());
        let refused = mongodb::error::Error::custom("not authorized");
        assert!(!StoreError::Database { context: "reading the checkpoint", source: refused }.is_transient());
        assert!(!StoreError::Fenced("s".to_owned()).is_transient());
        let corrupt = StoreError::CorruptDocument { stream: "s".to_owned(), reason: "no saved_at".to_owned() };
        assert!(!corrupt.is_transient() && corrupt.is_corrupt());
    }
}
