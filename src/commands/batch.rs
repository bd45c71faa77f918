//! `archiver batch`: archives the delivered orders of a date range, with the same enrichment and
//! the same idempotent archive as `watch`, so a range can be run again (or overlap what `watch`
//! already archived) without duplicating anything.
//!
//! The range is read as a stream of order ids, cut into chunks; up to `concurrency` chunks are
//! enriched and written at once, through the client path (aggregation streamed back, then bulk
//! inserts) or the server path (the same aggregation ending in `$merge`): see
//! [`crate::pipeline::scan`].

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::Collection;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, WritePath};
use crate::db::{self, RetryPolicy};
use crate::error::UsageError;
use crate::pipeline::document::ArchiveSource;
use crate::pipeline::scan::{archive_matching, delivered_in_range, source_mismatch, DateRange};
use crate::pipeline::sink::{ensure_indexes, Archiver, WriteOutcome};

/// What `archiver batch` is asked to do (from the command line).
#[derive(Debug, Clone, Default)]
pub struct BatchOptions {
    /// First order date (inclusive), in any form [`DateRange::parse`] reads.
    pub date_from: String,
    /// End of the range (exclusive).
    pub date_to: Option<String>,
    /// Show what would be archived, write nothing.
    pub dry_run: bool,
    /// Write enriched samples to this file as well.
    pub export_samples: Option<std::path::PathBuf>,
    /// How many samples the dry run or the export shows.
    pub sample_size: usize,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct BatchSummary {
    /// Delivered orders in the range.
    pub matched: u64,
    /// The archive write results.
    pub written: WriteOutcome,
    /// Wall time.
    pub duration: Duration,
    /// The range archived.
    pub range: Option<DateRange>,
}

/// Runs `archiver batch`.
pub async fn run(config: &Config, args: &BatchOptions, shutdown: CancellationToken) -> anyhow::Result<BatchSummary> {
    let range = DateRange::parse(&args.date_from, args.date_to.as_deref(), Utc::now())?;
    let write_path = config.batch.write_path;
    if write_path == WritePath::Server && config.archive.sink == crate::config::ArchiveSink::Delta {
        return Err(UsageError(
            "--write-path server writes with $merge into a collection; a Delta table is written by the \
             client path (--write-path client)"
                .to_owned(),
        )
        .into());
    }
    if write_path == WritePath::Server && !config.archive_on_source_cluster() {
        return Err(UsageError(
            "--write-path server needs the archive on the source cluster (ARCHIVE_URI is another \
             deployment); use --write-path client"
                .to_owned(),
        )
        .into());
    }
    let policy = RetryPolicy::bounded(&config.retry);
    let dbs = tokio::select! {
        dbs = db::connect(config, &policy) => dbs?,
        _ = shutdown.cancelled() => bail!("interrupted before connecting"),
    };
    // A typo in MONGODB_DB or DELIVERED_STATUS would archive nothing and exit 0: say so, and
    // create nothing in a database that has no orders.
    if let Some(mismatch) = source_mismatch(config, &dbs).await.context("checking the orders collection")? {
        return Err(UsageError(mismatch.to_string()).into());
    }
    let filter = delivered_in_range(config, range);
    let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
    let archiver = Archiver::open(config, &dbs, ArchiveSource::Batch)
        .await?
        .with_reference_cache(config.enrich.reference_cache_entries);
    let started = Instant::now();

    tracing::info!(date_from = %range.from, date_to = ?range.to.map(|t| t.to_rfc3339()),
        write_path = ?write_path, dry_run = args.dry_run, "batch starting");

    if let Some(path) = &args.export_samples {
        let samples = enriched_samples(&orders, &archiver, &filter, args.sample_size).await?;
        export_samples(path, &samples)?;
        tracing::info!(file = %path.display(), samples = samples.len(), "enriched samples exported");
    }
    if args.dry_run {
        let matched =
            orders.count_documents(filter.clone()).await.context("counting the delivered orders of the range")?;
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

    // It counts the range for its progress, and that count is `matched`: the server filters the
    // range once more for the count, not twice.
    let (matched, written) =
        archive_matching(config, &dbs, &archiver, &filter, write_path, false, &shutdown, &|_| {}).await?;
    archiver.finish().await.context("committing the last rows")?;
    let summary = BatchSummary { matched, written, duration: started.elapsed(), range: Some(range) };
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
    let mut docs: Vec<Document> = orders.aggregate(pipeline).await?.try_collect().await.context("enriching samples")?;
    docs.iter_mut().for_each(crate::pipeline::lookup::finish);
    Ok(docs)
}

fn export_samples(path: &Path, samples: &[Document]) -> anyhow::Result<()> {
    let json: Vec<serde_json::Value> =
        samples.iter().map(|d| Bson::Document(d.clone()).into_canonical_extjson()).collect();
    let mut text = serde_json::to_string_pretty(&json)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing samples to {}", path.display()))
}
