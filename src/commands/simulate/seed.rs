//! Seeding: the reference collections and orders written in bulk, continuing what exists.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{stream, StreamExt, TryStreamExt};
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::Collection;
use tokio_util::sync::CancellationToken;

use super::data::*;
use crate::config::{Config, RetrySettings};
use crate::db::{self, is_duplicate_key, is_transient, Databases, RetryPolicy};
use crate::error::UsageError;

/// What [`seed`] does.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    /// The seed.
    pub seed: u64,
    /// Orders to add (0: only the reference collections, when missing).
    pub count: u64,
    /// Fraction of them already delivered, in `[0, 1]`.
    pub p_delivered: f64,
    /// Where their dates fall.
    pub span: DateSpan,
    /// Drop the simulated collections first.
    pub drop: bool,
    /// Orders generated and inserted together.
    pub chunk_size: usize,
    /// Chunks in flight at once.
    pub concurrency: usize,
}

impl SeedOptions {
    /// Options with the default chunking and no drop.
    pub fn new(seed: u64, count: u64, p_delivered: f64, span: DateSpan) -> SeedOptions {
        SeedOptions {
            seed,
            count,
            p_delivered,
            span,
            drop: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

/// What [`seed`] did.
#[derive(Debug, Clone, Default)]
pub struct SeedSummary {
    /// The seed used.
    pub seed: u64,
    /// `database.collection` of every collection dropped first.
    pub dropped: Vec<String>,
    /// Customers inserted (0 when existing ones were reused).
    pub clients: u64,
    /// Couriers inserted.
    pub livreurs: u64,
    /// Restaurants inserted.
    pub restaurants: u64,
    /// Menu entries inserted.
    pub menu_entries: u64,
    /// Orders inserted.
    pub orders: u64,
    /// Delivered orders among them.
    pub delivered: u64,
    /// Cancelled orders among them.
    pub cancelled: u64,
    /// Number of the first order of this run (the ones before were there already).
    pub first_number: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Stopped by the shutdown token before all orders were written.
    pub interrupted: bool,
}

impl SeedSummary {
    /// Orders inserted per second of the whole run.
    pub fn orders_per_sec(&self) -> f64 {
        self.orders as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

pub(super) fn collection(dbs: &Databases, name: &str) -> Collection<Document> {
    dbs.source.collection(name)
}

/// Seeds the database: drops first if asked, creates the reference collections that are empty
/// (reusing those that are not), then inserts `count` orders numbered after the highest existing
/// one, in chunks written concurrently. Stops launching chunks when `shutdown` fires; the
/// chunks in flight complete.
pub async fn seed(
    dbs: &Databases,
    config: &Config,
    options: &SeedOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<SeedSummary> {
    Ok(seed_keeping_references(dbs, config, options, shutdown).await?.0)
}

/// [`seed`], also returning the references, which live mode then needs not read again.
pub(super) async fn seed_keeping_references(
    dbs: &Databases,
    config: &Config,
    options: &SeedOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<(SeedSummary, Arc<References>)> {
    if !(0.0..=1.0).contains(&options.p_delivered) {
        return Err(UsageError(format!("p_delivered must be between 0 and 1, got {}", options.p_delivered)).into());
    }
    let started = Instant::now();
    let mut summary = SeedSummary { seed: options.seed, ..Default::default() };
    if options.drop {
        summary.dropped = drop_simulated(dbs, config).await?;
    }
    let generator = Generator::new(config, options.seed);
    let refs = ensure_references(dbs, config, &generator, options, &mut summary).await?;

    let orders = collection(dbs, &config.orders.collection);
    let first = next_order_number(&orders, config).await?;
    summary.first_number = first;
    let end = first + options.count;
    let refs = Arc::new(refs);
    if options.count == 0 {
        summary.elapsed = started.elapsed();
        return Ok((summary, refs));
    }
    tracing::info!(seed = options.seed, orders = options.count, first_numero = %numero_commande(first),
        p_delivered = options.p_delivered, date_from = %options.span.start, date_to = %options.span.end,
        "seeding orders");

    let generator = Arc::new(generator);
    let chunk_refs = refs.clone();
    let chunk_size = options.chunk_size.max(1);
    let chunks = (first..end).step_by(chunk_size).map(|start| start..(start + chunk_size as u64).min(end));
    let (p_delivered, span) = (options.p_delivered, options.span);
    let written = stream::iter(chunks)
        .take_until(shutdown.cancelled())
        .map(|numbers| {
            let (generator, refs, orders) = (generator.clone(), chunk_refs.clone(), orders.clone());
            let retry = config.retry.clone();
            async move {
                // Generation is CPU work: off the async threads, so inserts keep flowing.
                let batch = tokio::task::spawn_blocking(move || generator.orders(&refs, numbers, p_delivered, span))
                    .await
                    .context("generating orders")?;
                insert_documents(&orders, &batch.documents, &retry).await?;
                anyhow::Ok(batch)
            }
        })
        .buffer_unordered(options.concurrency.max(1));
    let mut written = std::pin::pin!(written);
    let mut last_progress = Instant::now();
    while let Some(batch) = written.next().await {
        let batch = batch?;
        summary.orders += batch.documents.len() as u64;
        summary.delivered += batch.delivered;
        summary.cancelled += batch.cancelled;
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            tracing::info!(done = summary.orders, total = options.count, "seeding progress");
        }
    }
    summary.interrupted = summary.orders < options.count;
    summary.elapsed = started.elapsed();
    Ok((summary, refs))
}

/// Drops the orders, the four reference collections, the archive and its dead letters: all
/// the simulation writes or leads to, and nothing else.
pub(super) async fn drop_simulated(dbs: &Databases, config: &Config) -> anyhow::Result<Vec<String>> {
    let l = &config.lookups;
    let source = [
        &config.orders.collection,
        &l.client.collection,
        &l.livreur.collection,
        &l.restaurant.collection,
        &l.menu.collection,
    ];
    let archive = [&config.archive.collection, &config.archive.errors_collection];
    let targets =
        source.iter().map(|name| (&dbs.source, *name)).chain(archive.iter().map(|name| (&dbs.archive, *name)));
    let mut dropped = Vec::new();
    for (database, name) in targets {
        let namespace = format!("{}.{}", database.name(), name);
        if dropped.contains(&namespace) {
            continue;
        }
        database.collection::<Document>(name).drop().await.with_context(|| format!("dropping {namespace}"))?;
        tracing::info!(database = database.name(), collection = %name, "collection dropped (--drop)");
        dropped.push(namespace);
    }
    Ok(dropped)
}

/// Loads the references, generates and inserts those missing, and returns them all.
pub(super) async fn ensure_references(
    dbs: &Databases,
    config: &Config,
    generator: &Generator,
    options: &SeedOptions,
    summary: &mut SeedSummary,
) -> anyhow::Result<References> {
    let mut refs = load_references(dbs, config).await?;
    let sizes = ReferenceSizes::for_orders(options.count);
    let l = &config.lookups;
    let insert = |name: &str, docs: Vec<Document>| {
        let target = collection(dbs, name);
        let retry = config.retry.clone();
        let (chunk_size, concurrency) = (options.chunk_size.max(1), options.concurrency.max(1));
        async move {
            let chunks: Vec<Vec<Document>> = docs.chunks(chunk_size).map(<[Document]>::to_vec).collect();
            stream::iter(chunks)
                .map(|chunk| {
                    let (target, retry) = (target.clone(), retry.clone());
                    async move { insert_documents(&target, &chunk, &retry).await }
                })
                .buffer_unordered(concurrency)
                .try_collect::<Vec<()>>()
                .await
        }
    };
    if refs.clients.is_empty() {
        let docs = generator.clients(sizes.clients, options.span);
        refs.clients = ids_of(&docs);
        summary.clients = docs.len() as u64;
        insert(&l.client.collection, docs).await?;
    } else {
        tracing::info!(collection = %l.client.collection, existing = refs.clients.len(), "reusing existing customers");
    }
    if refs.livreurs.is_empty() {
        let docs = generator.livreurs(sizes.livreurs, options.span);
        refs.livreurs = ids_of(&docs);
        summary.livreurs = docs.len() as u64;
        insert(&l.livreur.collection, docs).await?;
    } else {
        tracing::info!(collection = %l.livreur.collection, existing = refs.livreurs.len(), "reusing existing couriers");
    }
    if refs.restaurants.is_empty() {
        // Also when restaurants exist but none has a priced menu entry: orders need dishes.
        let generated = generator.restaurants(sizes.restaurants, options.span);
        summary.restaurants = generated.restaurants.len() as u64;
        summary.menu_entries = generated.menu.len() as u64;
        refs.restaurants = generated.menus;
        insert(&l.restaurant.collection, generated.restaurants).await?;
        insert(&l.menu.collection, generated.menu).await?;
    } else {
        tracing::info!(collection = %l.restaurant.collection, existing = refs.restaurants.len(),
            "reusing existing restaurants and menus");
    }
    refs.sort();
    Ok(refs)
}

/// Reads the references already in the database, sorted by id. Documents whose `_id` is not an
/// ObjectId, and menu entries without a numeric price, are left out.
pub async fn load_references(dbs: &Databases, config: &Config) -> anyhow::Result<References> {
    let l = &config.lookups;
    pub(super) async fn ids(target: Collection<Document>) -> anyhow::Result<Vec<ObjectId>> {
        let docs: Vec<Document> = target
            .find(doc! {})
            .projection(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await
            .with_context(|| format!("reading {}", target.name()))?;
        Ok(ids_of(&docs))
    }
    let clients = ids(collection(dbs, &l.client.collection)).await?;
    let livreurs = ids(collection(dbs, &l.livreur.collection)).await?;
    let restaurant_ids = ids(collection(dbs, &l.restaurant.collection)).await?;

    let menu = collection(dbs, &l.menu.collection);
    let prix_field = &l.menu.prix_field;
    let entries: Vec<Document> = menu
        .find(doc! {})
        .projection(doc! { "_id": 1, MENU_RESTAURANT_FIELD: 1, prix_field.clone(): 1 })
        .await?
        .try_collect()
        .await
        .with_context(|| format!("reading {}", menu.name()))?;
    let mut dishes: BTreeMap<ObjectId, Vec<Dish>> = BTreeMap::new();
    for entry in entries {
        let (Ok(id), Ok(restaurant)) = (entry.get_object_id("_id"), entry.get_object_id(MENU_RESTAURANT_FIELD)) else {
            continue;
        };
        let prix = match entry.get(prix_field) {
            Some(Bson::Double(p)) => *p,
            Some(Bson::Int32(p)) => f64::from(*p),
            Some(Bson::Int64(p)) => *p as f64,
            _ => continue,
        };
        dishes.entry(restaurant).or_default().push(Dish { id, prix });
    }
    let restaurants = restaurant_ids
        .into_iter()
        .filter_map(|id| dishes.remove(&id).map(|dishes| RestaurantMenu { id, dishes }))
        .collect();
    let mut refs = References { clients, livreurs, restaurants };
    refs.sort();
    Ok(refs)
}

/// One more than the highest `CMD-NNNNNN` number in the orders, or 1.
///
/// Numbers are compared as numbers, not strings: past 999999 they grow a digit, and
/// "CMD-1000000" sorts before "CMD-999999". So the highest string is taken per length and the
/// longest that parses wins. A string range selects the numbers rather than a `$regex`, which
/// some servers (SecantusDB) evaluate very slowly, and which no index would serve.
pub async fn next_order_number(orders: &Collection<Document>, config: &Config) -> anyhow::Result<u64> {
    let field = &config.orders.fields.numero_commande;
    let pipeline = vec![
        doc! { "$match": { field.clone(): { "$gte": "CMD-", "$lt": "CMD." } } },
        doc! { "$group": {
            "_id": { "$strLenCP": format!("${field}") },
            "highest": { "$max": format!("${field}") },
        } },
    ];
    let groups: Vec<Document> =
        orders.aggregate(pipeline).await?.try_collect().await.context("finding the highest order number")?;
    let highest = groups
        .iter()
        .filter_map(|group| group.get_str("highest").ok()?.strip_prefix("CMD-")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    Ok(highest + 1)
}

/// Inserts `docs` unordered, retrying transient errors as the settings allow.
pub(super) async fn insert_documents(
    target: &Collection<Document>,
    docs: &[Document],
    retry: &RetrySettings,
) -> anyhow::Result<()> {
    if docs.is_empty() {
        return Ok(());
    }
    let mut attempt = 0;
    let insert = async || {
        attempt += 1;
        match target.insert_many(docs).ordered(false).await {
            // A failed attempt may have written part of the chunk; those documents are ours
            // (same ids), and this unordered insert wrote the rest around them.
            Err(e) if attempt > 1 && is_duplicate_key(&e) => Ok(()),
            other => other.map(|_| ()),
        }
    };
    let what = format!("inserting into {}", target.name());
    db::retry(&RetryPolicy::bounded(retry), &what, is_transient, None, insert)
        .await
        .map_err(|failed| anyhow::Error::new(failed).context(what))
}
