//! `archiver batch`: archives the delivered orders of a date range, with the same enrichment and
//! the same idempotent archive as `watch`, so a range can be run again (or overlap what `watch`
//! already archived) without duplicating anything.
//!
//! The range is read as a stream of order ids, cut into chunks; up to `concurrency` chunks are
//! enriched and written at once, through the client path (aggregation streamed back, then bulk
//! inserts) or the server path (the same aggregation ending in `$merge`).

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use tokio_util::sync::CancellationToken;

use crate::archive::{Archiver, EventTimes, WriteOutcome};
use crate::cli::BatchArgs;
use crate::config::{Config, WritePath};
use crate::db::{self, is_transient, Databases};
use crate::enrich::ArchiveSource;
use crate::exit::UsageError;

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
pub fn delivered_in_range(config: &Config, range: DateRange) -> Document {
    let f = &config.orders.fields;
    let mut dates = doc! { "$gte": mongodb::bson::DateTime::from_millis(range.from.timestamp_millis()) };
    if let Some(to) = range.to {
        dates.insert("$lt", mongodb::bson::DateTime::from_millis(to.timestamp_millis()));
    }
    let filter = doc! { f.status.clone(): &config.orders.delivered_status, f.date_commande.clone(): dates };
    crate::coordination::restrict_to_partition(config, filter, "$_id")
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchSummary {
    /// Delivered orders in the range.
    pub matched: u64,
    /// The archive write results.
    pub written: WriteOutcome,
    /// Wall time.
    pub duration: Duration,
}

/// Runs `archiver batch`.
pub async fn run(config: &Config, args: &BatchArgs, shutdown: CancellationToken) -> anyhow::Result<BatchSummary> {
    let range = DateRange::parse(&args.date_from, args.date_to.as_deref(), Utc::now())?;
    let write_path = config.batch.write_path;
    if write_path == WritePath::Server && !config.archive_on_source_cluster() {
        return Err(UsageError(
            "--write-path server needs the archive on the source cluster (ARCHIVE_URI is another \
             deployment); use --write-path client"
                .to_owned(),
        )
        .into());
    }
    let dbs = tokio::select! {
        dbs = db::connect(config) => dbs?,
        _ = shutdown.cancelled() => bail!("interrupted before connecting"),
    };
    let filter = delivered_in_range(config, range);
    let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
    let archiver = Archiver::new(config, &dbs, ArchiveSource::Batch);
    let started = Instant::now();

    tracing::info!(date_from = %range.from, date_to = ?range.to.map(|t| t.to_rfc3339()),
        write_path = ?write_path, dry_run = args.dry_run, "batch starting");
    let matched = orders.count_documents(filter.clone()).await.context("counting the delivered orders of the range")?;

    if let Some(path) = &args.export_samples {
        let samples = enriched_samples(&orders, &archiver, &filter, args.sample_size).await?;
        export_samples(path, &samples)?;
        tracing::info!(file = %path.display(), samples = samples.len(), "enriched samples exported");
    }
    if args.dry_run {
        let samples = enriched_samples(&orders, &archiver, &filter, args.sample_size).await?;
        println!("dry run: {matched} delivered orders in the range would be archived; nothing was written.");
        for sample in &samples {
            let json = Bson::Document(sample.clone()).into_relaxed_extjson();
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        tracing::info!(matched, samples = samples.len(), "dry run: nothing written");
        return Ok(BatchSummary { matched, duration: started.elapsed(), ..Default::default() });
    }

    if config.batch.create_indexes {
        ensure_indexes(config, &dbs).await;
    } else {
        tracing::info!("index creation skipped (--skip-indexes)");
    }

    let (_, written) = archive_matching(config, &dbs, &archiver, &filter, write_path, false, &shutdown).await?;
    let summary = BatchSummary { matched, written, duration: started.elapsed() };
    let secs = summary.duration.as_secs_f64().max(1e-9);
    let processed = written.inserted + written.already_archived + written.dead_lettered;
    let rate = processed as f64 / secs;
    tracing::info!(
        matched,
        newly_archived = written.inserted,
        already_archived = written.already_archived,
        anomalies = written.anomalies,
        dead_lettered = written.dead_lettered,
        duration_ms = summary.duration.as_millis() as u64,
        orders_per_sec = rate.round() as u64,
        "batch finished"
    );
    println!(
        "batch: {matched} matched, {} newly archived, {} already archived, {} with anomalies, \
         {} dead-lettered, in {:.1} s ({:.0} orders/s)",
        written.inserted, written.already_archived, written.anomalies, written.dead_lettered, secs, rate
    );
    if shutdown.is_cancelled() {
        bail!("interrupted: the range is partly archived; run the same command again to finish it");
    }
    Ok(summary)
}

/// The first `n` enriched documents of the range, without writing anything.
async fn enriched_samples(
    orders: &Collection<Document>,
    archiver: &Archiver,
    filter: &Document,
    n: usize,
) -> anyhow::Result<Vec<Document>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut pipeline = vec![doc! { "$match": filter.clone() }, doc! { "$limit": n as i64 }];
    pipeline.extend(archiver.stages().iter().cloned());
    let docs = orders.aggregate(pipeline).await?.try_collect().await.context("enriching samples")?;
    Ok(docs)
}

fn export_samples(path: &Path, samples: &[Document]) -> anyhow::Result<()> {
    let json: Vec<serde_json::Value> =
        samples.iter().map(|d| Bson::Document(d.clone()).into_canonical_extjson()).collect();
    let mut text = serde_json::to_string_pretty(&json)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing samples to {}", path.display()))
}

/// Creates the indexes the queries rely on. A failure (no privilege, duplicate order numbers in
/// existing data) is logged and the run goes on: indexes speed things up, they are not needed
/// for correctness.
pub async fn ensure_indexes(config: &Config, dbs: &Databases) {
    let f = &config.orders.fields;
    let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
    let archive: Collection<Document> = dbs.archive.collection(&config.archive.collection);
    let unique = IndexOptions::builder().unique(true).build();
    let wanted = [
        (&orders, IndexModel::builder().keys(doc! { f.numero_commande.clone(): 1 }).options(unique).build()),
        (&orders, IndexModel::builder().keys(doc! { f.status.clone(): 1, f.date_commande.clone(): 1 }).build()),
        (&orders, IndexModel::builder().keys(doc! { f.date_commande.clone(): 1 }).build()),
        (&archive, IndexModel::builder().keys(doc! { "date_commande": 1 }).build()),
    ];
    for (collection, model) in wanted {
        let keys = model.keys.clone();
        match collection.create_index(model).await {
            Ok(_) => tracing::info!(collection = collection.name(), keys = %keys, "index present"),
            Err(e) => tracing::warn!(collection = collection.name(), keys = %keys,
                error = %crate::redact::scrub(&e.to_string()),
                "could not create index; continuing without it (use --skip-indexes to silence)"),
        }
    }
}

/// Archives every order matching `filter`: streams their ids in chunks and archives up to
/// `concurrency` chunks at once. With `only_missing`, orders already in the archive are skipped
/// before enrichment (cheap re-runs, gap-fills and repairs). Returns the number matched too.
pub async fn archive_matching(
    config: &Config,
    dbs: &Databases,
    archiver: &Archiver,
    filter: &Document,
    write_path: WritePath,
    only_missing: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<(u64, WriteOutcome)> {
    let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
    let matched = orders.count_documents(filter.clone()).await.context("counting the orders to archive")?;
    let chunk_size = config.batch.chunk_size;
    // With the client-side join, whole orders are streamed once and joined chunk by chunk;
    // otherwise only ids are streamed and each chunk is enriched by the pipeline.
    let whole_orders = archiver.joins() && write_path == WritePath::Client && !only_missing;
    let projection = (!whole_orders).then(|| doc! { "_id": 1 });
    let orders_read = orders
        .find(filter.clone())
        .with_options(mongodb::options::FindOptions::builder().projection(projection).build())
        .batch_size(chunk_size.min(100_000) as u32)
        .await
        .context("reading the orders to archive")?;
    let progress = Progress::new(matched);
    let no_events = EventTimes::new();
    let chunks = orders_read
        .try_chunks(chunk_size)
        .take_until(shutdown.cancelled())
        .map(|chunk| async {
            let chunk: Vec<Document> = chunk.map_err(|e| e.1).context("reading the orders to archive")?;
            let ids: Vec<Bson> = chunk.iter().map(|d| d.get("_id").cloned().unwrap_or(Bson::Null)).collect();
            let outcome = match (write_path, only_missing) {
                _ if whole_orders => with_retry(config, || archiver.archive_orders(&chunk)).await,
                (_, true) => with_retry(config, || archiver.archive_missing_ids(&ids)).await,
                (WritePath::Client, false) => with_retry(config, || archiver.archive_ids(&ids, &no_events)).await,
                (WritePath::Server, false) => with_retry(config, || merge_chunk(config, dbs, archiver, &ids)).await,
            }
            .context("archiving a chunk")?;
            progress.add(ids.len() as u64);
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

/// Retries `op` on transient errors with the configured backoff.
async fn with_retry<F, Fut>(config: &Config, mut op: F) -> Result<WriteOutcome, mongodb::error::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<WriteOutcome, mongodb::error::Error>>,
{
    let mut delays = db::backoff(&config.retry);
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if is_transient(&e) => {
                attempt += 1;
                let Some(delay) = delays.next() else { return Err(e) };
                tracing::warn!(attempt, retry_in_ms = delay.as_millis() as u64,
                    error = %crate::redact::scrub(&e.to_string()), "transient error; retrying the chunk");
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
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
        dead_lettered: 0,
    })
}

/// A progress bar on a terminal, periodic log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    done: std::sync::atomic::AtomicU64,
    total: u64,
    started: Instant,
    last_log: std::sync::Mutex<Instant>,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(total: u64) -> Self {
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
            bar,
            done: 0.into(),
            total,
            started: Instant::now(),
            last_log: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= LOG_EVERY {
            *last = Instant::now();
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(done, total = self.total, orders_per_sec = rate.round() as u64, "batch progress");
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
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
