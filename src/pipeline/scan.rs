//! Scans of the orders collection: date ranges, the query of the delivered orders of a range,
//! and the chunked, concurrent archiving of every order a query matches (client path, or the
//! server's `$merge`). `batch`, `verify --repair` and `watch`'s fills all go through here.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::Collection;
use tokio_util::sync::CancellationToken;

use super::lookup::ORDER_AS_STORED;
use super::sink::{id_of, Archiver, EventTimes, WriteOutcome};
use crate::config::{Config, WritePath};
use crate::db::{self, is_transient, Databases, RetryPolicy};
use crate::error::UsageError;

/// The accepted date forms, quoted in errors.
pub const DATE_FORMS: &str =
    "YYYY-MM-DD, an RFC 3339 date-time (2026-11-20T08:00:00Z), today, yesterday, or a span before now (7d, 24h, 30m)";

/// Parses a `--date-from` / `--date-to` value, relative to `now`. Dates are UTC.
pub fn parse_date(value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, UsageError> {
    let v = value.trim();
    let midnight = |d: NaiveDate| d.and_time(NaiveTime::MIN).and_utc();
    let lower = v.to_ascii_lowercase();
    match lower.as_str() {
        "today" => return Ok(midnight(now.date_naive())),
        "yesterday" => {
            if let Some(day) = now.date_naive().checked_sub_days(chrono::Days::new(1)) {
                return Ok(midnight(day));
            }
        }
        "now" => return Ok(now),
        _ => {}
    }
    if let Ok(d) = NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        return Ok(midnight(d));
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Some(unit) = lower.chars().last().filter(|c| matches!(c, 'd' | 'h' | 'm')) {
        if let Ok(n) = lower[..lower.len() - 1].parse::<u64>() {
            // Checked all the way: a span too long for a duration, or reaching before the
            // earliest representable date, is a usage error, not a panic.
            let n = i64::try_from(n).ok();
            let span = n.and_then(|n| match unit {
                'd' => chrono::TimeDelta::try_days(n),
                'h' => chrono::TimeDelta::try_hours(n),
                _ => chrono::TimeDelta::try_minutes(n),
            });
            return span.and_then(|span| now.checked_sub_signed(span)).ok_or_else(|| {
                UsageError(format!("invalid date {value:?}: {v} reaches too far back; expected {DATE_FORMS}"))
            });
        }
    }
    Err(UsageError(format!("invalid date {value:?}: expected {DATE_FORMS}")))
}

/// The validated range: `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    /// Inclusive start.
    pub from: DateTime<Utc>,
    /// Exclusive end, if any.
    pub to: Option<DateTime<Utc>>,
}

impl DateRange {
    /// Parses both ends; `to` must come after `from`.
    pub fn parse(from: &str, to: Option<&str>, now: DateTime<Utc>) -> Result<Self, UsageError> {
        let from_date = parse_date(from, now)?;
        let to_date = to.map(|t| parse_date(t, now)).transpose()?;
        if let Some(to_date) = to_date {
            if to_date <= from_date {
                return Err(UsageError(format!("--date-to ({to_date}) must be after --date-from ({from_date})")));
            }
        }
        Ok(DateRange { from: from_date, to: to_date })
    }
}

/// The query of the delivered orders of a range.
/// Why no order could ever be selected with this configuration, whatever the range: a typo in
/// the database or collection name, or in the delivered status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceMismatch {
    /// The orders collection is not in the source database.
    #[error(
        "the orders collection {collection} does not exist in database {database}{}",
        elsewhere(.databases_with_it)
    )]
    NoOrdersCollection {
        /// `MONGODB_DB`.
        database: String,
        /// `ORDERS_COLLECTION`.
        collection: String,
        /// The databases that have a collection of that name.
        databases_with_it: Vec<String>,
    },
    /// No order has the delivered status, while orders with a status much like it, or with a
    /// whole lifecycle of others, exist.
    #[error(
        "no order in {collection} has the status {status:?} (DELIVERED_STATUS); the statuses present are: {}",
        present.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
    )]
    NoSuchStatus {
        /// `ORDERS_COLLECTION`.
        collection: String,
        /// `DELIVERED_STATUS`.
        status: String,
        /// The statuses found (at most [`STATUSES_SHOWN`]).
        present: Vec<String>,
    },
}

/// Whether `found` is `wanted` but for accents, case, or at most two edits.
fn looks_like(found: &str, wanted: &str) -> bool {
    let fold = |s: &str| -> Vec<char> {
        s.chars()
            .flat_map(char::to_lowercase)
            .map(|c| match c {
                'à' | 'â' | 'ä' => 'a',
                'é' | 'è' | 'ê' | 'ë' => 'e',
                'î' | 'ï' => 'i',
                'ô' | 'ö' => 'o',
                'ù' | 'û' | 'ü' => 'u',
                'ç' => 'c',
                other => other,
            })
            .collect()
    };
    let (a, b) = (fold(found), fold(wanted));
    // Levenshtein distance, one row at a time.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()] <= 2
}

/// Most databases and statuses a [`SourceMismatch`] names.
const STATUSES_SHOWN: usize = 10;

fn elsewhere(databases: &[String]) -> String {
    match databases {
        [] => " (nor in any other database of the deployment): check MONGODB_DB and ORDERS_COLLECTION".to_owned(),
        _ => format!(" (check MONGODB_DB): databases with one: {}", databases.join(", ")),
    }
}

/// Checks that the configuration can select orders at all: the orders collection exists in the
/// source database, and the delivered status is one of the statuses present (when there are
/// orders). Reads only: nothing is created. `Ok(None)` when all is well.
pub async fn source_mismatch(config: &Config, dbs: &Databases) -> mongodb::error::Result<Option<SourceMismatch>> {
    let collection = &config.orders.collection;
    let names = dbs.source.list_collection_names().await?;
    if !names.contains(collection) {
        let mut databases_with_it = Vec::new();
        // Another database holding the collection is the likely intent; a user who may not
        // list databases gets the message without it.
        if let Ok(databases) = dbs.source_client.list_database_names().await {
            for database in databases.iter().filter(|d| !["admin", "local", "config"].contains(&d.as_str())) {
                let db = dbs.source_client.database(database);
                if db.list_collection_names().await.is_ok_and(|names| names.contains(collection)) {
                    databases_with_it.push(database.clone());
                }
                if databases_with_it.len() == STATUSES_SHOWN {
                    break;
                }
            }
        }
        return Ok(Some(SourceMismatch::NoOrdersCollection {
            database: dbs.source.name().to_owned(),
            collection: collection.clone(),
            databases_with_it,
        }));
    }
    // One delivered order settles it (the status index serves the query); otherwise `distinct`
    // on the status field lists what is there, a scan on a server that cannot use the index.
    let orders: Collection<Document> = dbs.source.collection(collection);
    let delivered = doc! { config.orders.fields.status.clone(): &config.orders.delivered_status };
    if orders.find_one(delivered).projection(doc! { "_id": 1 }).await?.is_some() {
        return Ok(None);
    }
    let statuses = orders.distinct(&config.orders.fields.status, doc! {}).await?;
    let wanted = Bson::String(config.orders.delivered_status.clone());
    if statuses.is_empty() || statuses.contains(&wanted) {
        return Ok(None);
    }
    // A platform whose orders are not delivered yet is not a typo: a status that is the
    // configured one but for accents, case or two letters is; so is a whole lifecycle (three
    // statuses or more) without the configured one.
    let near = statuses.iter().filter_map(Bson::as_str).any(|s| looks_like(s, &config.orders.delivered_status));
    if !near && statuses.len() < 3 {
        return Ok(None);
    }
    let present = statuses
        .iter()
        .take(STATUSES_SHOWN)
        .map(|s| s.as_str().map_or_else(|| s.clone().into_relaxed_extjson().to_string(), str::to_owned))
        .collect();
    Ok(Some(SourceMismatch::NoSuchStatus {
        collection: collection.clone(),
        status: config.orders.delivered_status.clone(),
        present,
    }))
}

pub fn delivered_in_range(config: &Config, range: DateRange) -> Document {
    let f = &config.orders.fields;
    let mut dates = doc! { "$gte": mongodb::bson::DateTime::from_chrono(range.from) };
    if let Some(to) = range.to {
        dates.insert("$lt", mongodb::bson::DateTime::from_chrono(to));
    }
    let filter = doc! { f.status.clone(): &config.orders.delivered_status, f.date_commande.clone(): dates };
    crate::coordination::restrict_to_partition(config, filter, "$_id")
}

/// Archives every order matching `filter`: streams their ids in chunks and archives up to
/// `concurrency` chunks at once. With `only_missing`, orders already in the archive are skipped
/// before enrichment (cheap re-runs, gap-fills and repairs). Returns the number matched too.
/// `archived_chunk` is told how many orders each chunk archived, as it is done (a fill reports its
/// progress through it).
#[allow(clippy::too_many_arguments)]
pub async fn archive_matching(
    config: &Config,
    dbs: &Databases,
    archiver: &Archiver,
    filter: &Document,
    write_path: WritePath,
    only_missing: bool,
    shutdown: &CancellationToken,
    archived_chunk: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<(u64, WriteOutcome)> {
    let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
    let matched = orders.count_documents(filter.clone()).await.context("counting the orders to archive")?;
    let chunk_size = config.batch.chunk_size;
    // With the client-side join, whole orders are streamed once and joined chunk by chunk;
    // otherwise only ids are streamed and each chunk is enriched by the pipeline.
    let whole_orders = archiver.joins() && write_path == WritePath::Client && !only_missing;
    let projection = (!whole_orders).then(|| doc! { "_id": 1 });
    // Read as stored: the join works on the BSON as it comes, without parsing it into documents.
    let orders_read = orders
        .clone_with_type::<RawDocumentBuf>()
        .find(filter.clone())
        .with_options(mongodb::options::FindOptions::builder().projection(projection).build())
        .batch_size(chunk_size.min(100_000) as u32)
        .await
        .context("reading the orders to archive")?;
    let progress = Progress::new(matched, "batch progress");
    let policy = RetryPolicy::bounded(&config.retry);
    let no_events = EventTimes::new();
    let chunks = orders_read
        .try_chunks(chunk_size)
        .take_until(shutdown.cancelled())
        .map(|chunk| async {
            let chunk: Vec<RawDocumentBuf> = chunk.map_err(|e| e.1).context("reading the orders to archive")?;
            let ids: Vec<Bson> = chunk.iter().map(|d| id_of(d)).collect();
            let archive_chunk = async || match (write_path, only_missing) {
                _ if whole_orders => archiver.archive_orders(&chunk).await,
                (_, true) => archiver.archive_missing_ids(&ids).await,
                (WritePath::Client, false) => archiver.archive_ids(&ids, &no_events).await,
                (WritePath::Server, false) => merge_chunk(config, dbs, archiver, &ids).await,
            };
            let outcome = db::retry(&policy, "archiving a chunk", is_transient, Some(shutdown), archive_chunk)
                .await
                .map_err(|failed| failed.error)
                .map_err(|error| {
                    let refused = db::is_archive_refusal(&error);
                    let error = anyhow::Error::new(error).context("archiving a chunk");
                    if refused {
                        error.context(
                            "the archive refuses the orders on its own account (a validator, a privilege, its \
                             state), not because of an order: nothing was dead-lettered; fix the archive and \
                             run again",
                        )
                    } else {
                        error
                    }
                })?;
            progress.add(ids.len() as u64);
            archived_chunk(ids.len() as u64);
            anyhow::Ok(outcome)
        })
        .buffer_unordered(config.batch.concurrency);
    let mut chunks = std::pin::pin!(chunks);
    let mut total = WriteOutcome::default();
    while let Some(outcome) = chunks.next().await {
        total += outcome?;
    }
    progress.finish();
    Ok((matched, total))
}

/// The server path: the enrichment ends in `$merge`, inserting only orders not yet archived.
async fn merge_chunk(
    config: &Config,
    dbs: &Databases,
    archiver: &Archiver,
    ids: &[Bson],
) -> Result<WriteOutcome, mongodb::error::Error> {
    let archive: Collection<Document> = dbs.archive.collection(&config.archive.collection);
    let already = archive.count_documents(doc! { "_id": { "$in": ids } }).await?;
    let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
    let mut pipeline = vec![doc! { "$match": { "_id": { "$in": ids } } }];
    pipeline.extend(archiver.stages().iter().cloned());
    // Written on the server, the document gets no digest (`purge` then compares the fields).
    pipeline.push(doc! { "$project": { ORDER_AS_STORED: 0 } });
    pipeline.push(doc! { "$merge": {
        "into": { "db": config.archive_database(), "coll": &config.archive.collection },
        "on": "_id",
        "whenMatched": "keepExisting",
        "whenNotMatched": "insert",
    } });
    orders.aggregate(pipeline).await?;
    let anomalies = archive.count_documents(doc! { "_id": { "$in": ids }, "anomalies.0": { "$exists": true } }).await?;
    Ok(WriteOutcome {
        inserted: (ids.len() as u64).saturating_sub(already),
        already_archived: already,
        anomalies,
        ..WriteOutcome::default()
    })
}

/// A progress bar on a terminal, periodic log lines otherwise.
pub struct Progress {
    /// The log message of a progress line.
    what: &'static str,
    bar: Option<indicatif::ProgressBar>,
    done: std::sync::atomic::AtomicU64,
    total: u64,
    started: Instant,
    last_log: std::sync::Mutex<Instant>,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// Progress towards `total` orders, logged as `what` when not on a terminal.
    pub fn new(total: u64, what: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} orders ({per_sec}, eta {eta})")
            {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            what,
            bar,
            done: 0.into(),
            total,
            started: Instant::now(),
            last_log: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// `n` more orders done.
    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= LOG_EVERY {
            *last = Instant::now();
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(done, total = self.total, orders_per_sec = rate.round() as u64, "{}", self.what);
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_much_like_the_configured_one_is_a_typo() {
        assert!(looks_like("livrée", "livree"));
        assert!(looks_like("livrée", "Livrée"));
        assert!(looks_like("livrée", "livre"));
        assert!(!looks_like("en_attente", "livrée"));
        assert!(!looks_like("annulée", "livrée"));
    }

    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-21T15:30:00Z".parse().unwrap()
    }

    #[test]
    fn parses_every_documented_form() {
        let day = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(parse_date("2026-01-31", now()).unwrap(), day("2026-01-31T00:00:00Z"));
        assert_eq!(parse_date("2026-01-31T10:00:00+02:00", now()).unwrap(), day("2026-01-31T08:00:00Z"));
        assert_eq!(parse_date("today", now()).unwrap(), day("2026-11-21T00:00:00Z"));
        assert_eq!(parse_date("Yesterday", now()).unwrap(), day("2026-11-20T00:00:00Z"));
        assert_eq!(parse_date("7d", now()).unwrap(), day("2026-11-14T15:30:00Z"));
        assert_eq!(parse_date("24h", now()).unwrap(), day("2026-11-20T15:30:00Z"));
        assert_eq!(parse_date("30m", now()).unwrap(), day("2026-11-21T15:00:00Z"));
    }

    #[test]
    fn rejects_bad_dates_naming_the_forms() {
        for bad in ["2026-13-01", "last week", "", "7x", "-3d", "2026/01/01"] {
            let err = parse_date(bad, now()).unwrap_err();
            assert!(err.0.contains("YYYY-MM-DD") && err.0.contains("yesterday"), "{bad}: {err}");
        }
        let err = DateRange::parse("today", Some("yesterday"), now()).unwrap_err();
        assert!(err.0.contains("must be after"), "{err}");
    }

    #[test]
    fn rejects_spans_reaching_past_the_calendar() {
        // The first used to panic: it fits the u32 that was parsed, but reaches before the
        // calendar. The others are too long for a duration at all.
        for huge in ["999999999d", "99999999999d", "99999999999999h", "18446744073709551615m", "9223372036854775807d"] {
            let err = parse_date(huge, now()).unwrap_err();
            assert!(err.0.contains("too far back") && err.0.contains("YYYY-MM-DD"), "{huge}: {err}");
        }
        assert!(DateRange::parse("99999999999d", None, now()).is_err());
        assert!(parse_date("2000000d", now()).is_ok(), "about 5476 years back is still a date");
    }

    #[test]
    fn range_query_uses_configured_fields() {
        let mut config = Config::default();
        config.orders.fields.date_commande = "placed_at".into();
        let range = DateRange::parse("2026-01-01", Some("2026-02-01"), now()).unwrap();
        let q = delivered_in_range(&config, range);
        assert_eq!(q.get_str("status").unwrap(), "livrée");
        let dates = q.get_document("placed_at").unwrap();
        assert!(dates.contains_key("$gte") && dates.contains_key("$lt"));
        let open = delivered_in_range(&config, DateRange { to: None, ..range });
        assert!(!open.get_document("placed_at").unwrap().contains_key("$lt"));
    }
}
