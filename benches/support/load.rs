//! What the bench does to the database directly with the driver, without any `archiver` logic:
//! delivering (or un-delivering) orders by id, steady paced deliveries, waiting for the archive
//! to fill, and the two reference workloads — the raw copy (L0) and the bare change-stream
//! reader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{stream, StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::Collection;
use tokio::task::JoinHandle;

use archiver::config::Config;

/// The status un-delivered orders are reset to between runs: not delivered, so the change
/// stream filter ignores the reset itself.
const UNDELIVERED_STATUS: &str = "en_livraison";

/// How orders are delivered in bulk: `chunk` ids per `update_many`, `in_flight` at once.
#[derive(Debug, Clone, Copy)]
pub struct Updater {
    /// Ids per `update_many`.
    pub chunk: usize,
    /// Updates in flight.
    pub in_flight: usize,
}

/// `$set` of a delivery now, as the platform does it: the status and the client's clock as
/// `date_livraison` (what the latency case measures from).
pub fn delivery(config: &Config) -> Document {
    let f = &config.orders.fields;
    doc! { "$set": {
        f.status.clone(): &config.orders.delivered_status,
        f.date_livraison.clone(): mongodb::bson::DateTime::now(),
    } }
}

/// `$set` that puts delivered orders back on the road, so a run can deliver them again.
pub fn undelivery(config: &Config) -> Document {
    let f = &config.orders.fields;
    doc! { "$set": { f.status.clone(): UNDELIVERED_STATUS, f.date_livraison.clone(): Bson::Null } }
}

impl Updater {
    /// Applies `update()` (called per chunk, so a delivery date is the time it is sent) to
    /// every order in `ids`, as fast as the server allows. Returns the wall time.
    pub async fn update_ids(
        self,
        orders: &Collection<Document>,
        ids: &[Bson],
        update: impl Fn() -> Document,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let matched: u64 = stream::iter(ids.chunks(self.chunk.max(1)))
            .map(|chunk| {
                let (filter, update) = (doc! { "_id": { "$in": chunk.to_vec() } }, update());
                async move { orders.update_many(filter, update).await }
            })
            .buffer_unordered(self.in_flight.max(1))
            .map_ok(|result| result.matched_count)
            .try_fold(0, |total, n| async move { Ok(total + n) })
            .await
            .context("updating orders")?;
        if matched != ids.len() as u64 {
            bail!("updated {matched} orders out of {}", ids.len());
        }
        Ok(started.elapsed())
    }
}

/// Delivers `ids` at a steady `rate` per second, `group` orders per update, never more than
/// `in_flight` updates outstanding. When the server cannot keep up the schedule slips rather
/// than bursting, and the rate reached is what the caller reports. Returns the wall time.
pub async fn deliver_paced(
    orders: &Collection<Document>,
    config: &Config,
    ids: &[Bson],
    rate: f64,
    group: usize,
    in_flight: usize,
) -> anyhow::Result<Duration> {
    let period = Duration::from_secs_f64(group as f64 / rate);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let mut updates = tokio::task::JoinSet::new();
    let started = Instant::now();
    for chunk in ids.chunks(group.max(1)) {
        ticks.tick().await;
        let permit = permits.clone().acquire_owned().await?;
        let (orders, filter, update) = (orders.clone(), doc! { "_id": { "$in": chunk.to_vec() } }, delivery(config));
        updates.spawn(async move {
            let result = orders.update_many(filter, update).await;
            drop(permit);
            result
        });
    }
    while let Some(result) = updates.join_next().await {
        result?.context("delivering orders")?;
    }
    Ok(started.elapsed())
}

/// Polls the number of documents in `collection` until it reaches `target`; returns when it
/// did. Fails after `timeout`, or as soon as `alive` fails (a dead `watch` never fills it).
pub async fn wait_for_count(
    collection: &Collection<Document>,
    target: u64,
    timeout: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Instant> {
    let started = Instant::now();
    loop {
        let count = collection.count_documents(doc! {}).await?;
        if count >= target {
            return Ok(Instant::now());
        }
        alive()?;
        if started.elapsed() > timeout {
            bail!("{} holds {count} documents after {timeout:?}, expected {target}", collection.name());
        }
        // Short enough not to blur rates measured over seconds, long enough to cost nothing.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// L0, the physical bound of archiving: reads the orders matching `filter` and inserts them,
/// unchanged and never parsed (raw BSON), into `target`. One cursor with large batches feeds
/// unordered `insert_many`s of `batch` documents, `in_flight` at once. Returns the documents
/// copied.
pub async fn copy_raw(
    source: &Collection<RawDocumentBuf>,
    filter: Document,
    target: &Collection<RawDocumentBuf>,
    batch: usize,
    in_flight: usize,
) -> anyhow::Result<u64> {
    source
        .find(filter)
        .batch_size(batch as u32)
        .await?
        .try_chunks(batch)
        .map_err(|e| e.1)
        .map_ok(|docs| async move {
            let n = docs.len() as u64;
            target.insert_many(docs).ordered(false).await.map(|_| n)
        })
        .try_buffer_unordered(in_flight)
        .try_fold(0, |total, n| async move { Ok(total + n) })
        .await
        .context("copying orders")
}

/// The bare change-stream reader: opens a stream on `orders` with `pipeline` (awaited, so
/// changes made after this returns are seen) and counts its events, unparsed, until
/// `target`. The handle yields the moment the last one arrived.
pub async fn count_stream_events(
    orders: &Collection<Document>,
    pipeline: Vec<Document>,
    target: u64,
    batch_size: u32,
    max_await: Duration,
) -> anyhow::Result<JoinHandle<anyhow::Result<Instant>>> {
    let mut stream = orders
        .watch()
        .pipeline(pipeline)
        .batch_size(batch_size)
        .max_await_time(max_await)
        .await?
        .with_type::<RawDocumentBuf>();
    Ok(tokio::spawn(async move {
        let mut seen = 0;
        while seen < target {
            match stream.next().await {
                Some(event) => {
                    event?;
                    seen += 1;
                }
                None => bail!("the change stream ended after {seen} events"),
            }
        }
        Ok(Instant::now())
    }))
}
