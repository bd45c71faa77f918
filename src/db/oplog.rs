//! The source's oplog window: the times of its first and last entries, as
//! `rs.printReplicationInfo()` reports them. How far back the oplog reaches bounds how long
//! `watch` may stop before its saved position falls out of it (lost history).

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::Error;
use mongodb::options::{ReadPreference, SelectionCriteria};
use mongodb::Client;

use super::{cause_in_one_line, error_code, is_transient, UNAUTHORIZED};

/// The oldest and newest entries of the oplog, by their wall-clock times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OplogWindow {
    /// Time of the oldest entry still in the oplog.
    pub first: DateTime<Utc>,
    /// Time of the newest entry (the primary's last write).
    pub last: DateTime<Utc>,
    /// Bytes the oplog holds and its cap, when the server tells (`$collStats`): an oplog that
    /// has not filled up yet drops nothing, so its window grows instead of sliding.
    pub fill: Option<OplogFill>,
}

/// How full the oplog is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OplogFill {
    /// Bytes of entries held (`storageStats.size`).
    pub used_bytes: u64,
    /// The configured cap (`storageStats.maxSize`).
    pub max_bytes: u64,
}

/// Below this share of its cap, an oplog is taken as not yet rolling. The server truncates by
/// whole stretches of entries ("truncate markers") once the cap is passed, so a full oplog
/// hovers just under its cap, never far below it.
const FILLING_BELOW: f64 = 0.9;

impl OplogWindow {
    /// How much time the oplog covers, in seconds.
    pub fn seconds(&self) -> f64 {
        (self.last - self.first).num_milliseconds() as f64 / 1000.0
    }

    /// How long before the oplog starts dropping its oldest entries, if it goes on filling at
    /// the pace it has so far, in seconds: 0 once it is full (or when its fill is unknown).
    pub fn seconds_until_full(&self) -> f64 {
        match self.fill {
            Some(OplogFill { used_bytes, max_bytes })
                if used_bytes > 0 && (used_bytes as f64) < FILLING_BELOW * max_bytes as f64 =>
            {
                self.seconds() * (max_bytes - used_bytes) as f64 / used_bytes as f64
            }
            _ => 0.0,
        }
    }

    /// How much longer a position at `position` stays in the oplog if the oplog keeps rolling at
    /// the pace of its window, in seconds: negative once it has left it. An oplog still filling
    /// up first has to fill (a fresh replica set's window is minutes long but drops nothing).
    pub fn headroom_seconds(&self, position: DateTime<Utc>) -> f64 {
        (position - self.first).num_milliseconds() as f64 / 1000.0 + self.seconds_until_full()
    }
}

/// Why the window could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OplogError {
    /// The server refused, and will keep refusing: the user may not read the `local` database
    /// (or the deployment has no oplog to read, such as a `mongos`).
    #[error("cannot read the oplog window ({reason})")]
    Refused {
        /// What was refused, in one line.
        reason: String,
        /// The driver's error.
        #[source]
        source: Error,
    },
    /// A failure that may pass (network, election): try again later.
    #[error("cannot read the oplog window for now")]
    Transient(#[source] Error),
}

impl OplogError {
    /// Sorts a driver error: transient, or a refusal that retrying will not change.
    pub fn classify(error: Error) -> OplogError {
        if is_transient(&error) {
            return OplogError::Transient(error);
        }
        let reason = if error_code(&error) == Some(UNAUTHORIZED) {
            "no privilege to read local.oplog.rs".to_owned()
        } else {
            cause_in_one_line(&error)
        };
        OplogError::Refused { reason, source: error }
    }
}

/// Reads the window of the oplog of `client`'s primary; `Ok(None)` when there is no oplog (a
/// standalone server) or it is empty.
///
/// The oldest entry is the first in natural order of the capped `local.oplog.rs`, which needs
/// no index. The newest is the primary's last write as `hello` reports it (`lastWrite`), which
/// every replica set member answers, falling back to the last entry in natural order.
pub async fn read_window(client: &Client) -> Result<Option<OplogWindow>, OplogError> {
    let primary = SelectionCriteria::ReadPreference(ReadPreference::Primary);
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let entry = |order: i32| {
        oplog
            .find_one(doc! {})
            .sort(doc! { "$natural": order })
            .projection(doc! { "_id": 0, "ts": 1, "wall": 1 })
            .selection_criteria(primary.clone())
    };
    let Some(first) = entry(1).await.map_err(OplogError::classify)?.as_ref().and_then(entry_time) else {
        return Ok(None);
    };
    let hello = client
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .selection_criteria(primary.clone())
        .await
        .map_err(OplogError::classify)?;
    let last_write = hello.get_document("lastWrite").ok().and_then(|w| w.get_datetime("lastWriteDate").ok());
    let last = match last_write {
        Some(date) => date.to_chrono(),
        None => entry(-1).await.map_err(OplogError::classify)?.as_ref().and_then(entry_time).unwrap_or(first),
    };
    // `lastWriteDate` has whole seconds: never report a window that ends before it starts.
    Ok(Some(OplogWindow { first, last: last.max(first), fill: read_fill(&oplog, primary).await }))
}

/// The oplog's size and cap from `$collStats`; `None` when the server does not say (no such
/// privilege, or a server without storage statistics): the headroom then assumes a full oplog,
/// the cautious side.
async fn read_fill(oplog: &mongodb::Collection<Document>, primary: SelectionCriteria) -> Option<OplogFill> {
    use futures_util::TryStreamExt;
    let stats: Vec<Document> = oplog
        .aggregate([doc! { "$collStats": { "storageStats": {} } }])
        .selection_criteria(primary)
        .await
        .ok()?
        .try_collect()
        .await
        .ok()?;
    let storage = stats.first()?.get_document("storageStats").ok()?;
    let number = |key: &str| match storage.get(key)? {
        Bson::Int32(n) => u64::try_from(*n).ok(),
        Bson::Int64(n) => u64::try_from(*n).ok(),
        Bson::Double(n) if *n >= 0.0 => Some(*n as u64),
        _ => None,
    };
    let fill = OplogFill { used_bytes: number("size")?, max_bytes: number("maxSize")? };
    (fill.max_bytes > 0).then_some(fill)
}

/// The time of an oplog entry: its `wall` clock time (MongoDB 4.2 and later), else the seconds
/// of its `ts` timestamp.
fn entry_time(entry: &Document) -> Option<DateTime<Utc>> {
    match (entry.get("wall"), entry.get("ts")) {
        (Some(Bson::DateTime(wall)), _) => Some(wall.to_chrono()),
        (_, Some(Bson::Timestamp(ts))) => DateTime::from_timestamp(i64::from(ts.time), 0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::Timestamp;

    #[test]
    fn an_entry_is_dated_by_its_wall_time_else_its_timestamp() {
        let wall = mongodb::bson::DateTime::from_millis(1_763_740_800_123);
        let ts = Timestamp { time: 1_763_740_700, increment: 4 };
        assert_eq!(entry_time(&doc! { "ts": ts, "wall": wall }), Some(wall.to_chrono()));
        assert_eq!(entry_time(&doc! { "ts": ts }), DateTime::from_timestamp(1_763_740_700, 0));
        assert_eq!(entry_time(&doc! {}), None);
    }

    #[test]
    fn headroom_is_how_far_the_position_is_past_the_oldest_entry() {
        let first = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let window = OplogWindow { first, last: first + chrono::Duration::hours(10), fill: None };
        assert_eq!(window.seconds(), 36_000.0);
        assert_eq!(window.headroom_seconds(first + chrono::Duration::hours(4)), 14_400.0);
        assert_eq!(window.headroom_seconds(first - chrono::Duration::minutes(1)), -60.0, "already out of the oplog");
    }

    #[test]
    fn an_oplog_still_filling_up_adds_the_time_it_needs_to_fill_at_its_pace() {
        let first = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let position = first + chrono::Duration::minutes(5);
        let window = |used_bytes, max_bytes| OplogWindow {
            first,
            last: first + chrono::Duration::minutes(10),
            fill: Some(OplogFill { used_bytes, max_bytes }),
        };
        // A tenth full after 10 minutes: 90 more minutes to fill, then the 5 minutes of entries
        // before the position go first.
        assert_eq!(window(100, 1000).headroom_seconds(position), 300.0 + 5400.0);
        assert_eq!(window(950, 1000).seconds_until_full(), 0.0, "near its cap an oplog rolls");
        assert_eq!(window(1200, 1000).headroom_seconds(position), 300.0);
        assert_eq!(window(0, 1000).seconds_until_full(), 0.0, "no pace to go by");
    }

    fn command_error(code: i32, message: &str) -> Error {
        let reply = doc! { "code": code, "codeName": "Test", "errmsg": message };
        let error: mongodb::error::CommandError = mongodb::bson::from_document(reply).unwrap();
        mongodb::error::ErrorKind::Command(error).into()
    }

    #[test]
    fn refusals_and_passing_failures_are_told_apart() {
        let unauthorized = OplogError::classify(command_error(13, "not authorized on local to execute command"));
        assert!(
            matches!(&unauthorized, OplogError::Refused { reason, .. } if reason == "no privilege to read local.oplog.rs"),
            "{unauthorized:?}"
        );
        let mongos = OplogError::classify(command_error(13644, "can't use 'local' database through mongos"));
        assert!(matches!(&mongos, OplogError::Refused { reason, .. } if reason.contains("mongos")), "{mongos:?}");
        let election = OplogError::classify(command_error(10107, "not primary"));
        assert!(matches!(election, OplogError::Transient(_)));
        let io: Error = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into();
        assert!(matches!(OplogError::classify(io), OplogError::Transient(_)));
    }
}
