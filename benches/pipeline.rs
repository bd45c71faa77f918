//! The `archiver` performance benchmark (issue "Performance"): one reproducible run that
//! measures every archiving path against references measured in the same run, on the same
//! server and data, and prints figures — never a test with timed assertions.
//!
//! Run it with `scripts/bench.sh`: it builds, starts a throwaway SecantusDB server, sets
//! `BENCH_URI` and runs `cargo bench --bench pipeline`. The cases:
//!
//! 1. **batch**: `archiver batch` over every delivered order, client path (with the default
//!    client-side join, and with `ENRICH_MODE=lookup`) and server path, against L1 (the bare
//!    `$lookup` aggregation ending in `$merge`), L0 (a raw copy of the same orders with no
//!    enrichment, as fast as the driver goes) and L0e (a raw copy of the archive documents the
//!    last default batch run wrote, into a collection with the archive's secondary indexes: the
//!    driver's bound for writing what batch writes). Also the `archiver` process's own CPU per
//!    order and peak RSS.
//! 2. **sweep**: the client path over chunk sizes × concurrency.
//! 3. **watch throughput**: `archiver watch` while orders are delivered as fast as the server
//!    allows, against a bare change-stream reader with the same server-side filter; also the
//!    rate of the updater alone. Then one run with `ENRICH_MODE=lookup`, and optional
//!    `BATCH_SIZE` variants.
//! 4. **watch latency**: deliveries paced at a steady rate, then `archived_at − date_livraison`.
//! 5. **memory and CPU** of `watch` during case 3, from `/proc`.
//! 6. **naive**: one aggregation per order, inserts by 100, sequential.
//! 7. **stages**: the cost of each stage of the `$lookup` pipeline (L1 cut after each stage), to
//!    show where the server spends its time.
//! 8. **scaling**: `archiver batch` (defaults) once per size of `BENCH_SCALING_ORDERS`, each on
//!    its own freshly seeded database (`BENCH_DB` + `_scale`, dropped afterwards; seeding is not
//!    timed): throughput, the process's own CPU per order and its peak RSS.
//! 9. **lake**: `archiver batch` into a Delta table on the local disk (`ARCHIVE_SINK=delta`, a
//!    fresh table each run) against `archiver batch` into the archive collection, in the same
//!    run: throughput, bytes on disk per order against the collection's BSON bytes per order,
//!    the process's peak RSS.
//!
//! Each throughput also shows the CPU it cost per order, on the client side (the bench and the
//! `archiver` processes) and on the server: on a 2-core machine this tells what saturates. The
//! `archiver` process's own CPU (neither the bench's nor the server's) is shown on its own rows,
//! from `wait4` for `batch` and from `/proc` for `watch`. The targets end the table, each
//! marked PASS or MISS (n/a when its case was not run).
//!
//! Settings (environment; defaults in brackets): `BENCH_URI` (required), `BENCH_ORDERS`
//! [100000] delivered orders, `BENCH_RUNS` [3] runs per case, `BENCH_SWEEP_CHUNK_SIZES`
//! [500,1000,5000], `BENCH_SWEEP_CONCURRENCY` [1,2,4,8], `BENCH_SWEEP_RUNS` [1],
//! `BENCH_WATCH_ORDERS` [BENCH_ORDERS / 2], `BENCH_WATCH_BATCH_SIZES` [none] extra `watch`
//! batch sizes, one run each, `BENCH_LATENCY_RATE` [1000] orders/s, `BENCH_LATENCY_SECS` [15],
//! `BENCH_LATENCY_WAITS_MS` [none] extra `BATCH_MAX_WAIT_MS` values for the latency case,
//! `BENCH_NAIVE_ORDERS` [BENCH_ORDERS / 10], `BENCH_STAGE_ORDERS` [10000] orders of the
//! enrichment-stage profile, `BENCH_SCALING_ORDERS` [10000,100000,1000000] history sizes of the
//! scaling case, `BENCH_CASES` [batch,stages,sweep,naive,watch,latency,scaling,lake], `BENCH_DB`
//! [bench], `BENCH_ARCHIVER` [target/release/archiver], `BENCH_OUT` [target/bench/results.json],
//! `BENCH_SERVER_PID` [none]: the server's pid, to report its CPU time per order.

mod support;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::{Collection, Database, IndexModel};
use serde::Serialize;

use archiver::commands::watch::delivered_filter;
use archiver::config::Config;
use archiver::pipeline::document::ArchiveSource;
use archiver::pipeline::join::Joiner;
use archiver::pipeline::lookup::{enrichment_stages, finish, ORDER_AS_STORED};
use archiver::pipeline::scan::{delivered_in_range, DateRange};
use archiver::pipeline::sink::delta::DeltaArchive;

use support::load::{self, delivery, undelivery, Updater};
use support::process::{Archiver, CpuMeter, CpuTimes, Resources, WatchProcess};
use support::report::{Goal, Report};
use support::stats::{percentile, rate, summarize, timed, Run, Summary, Throughput};

/// Every delivered order is on or after this date: `batch` archives the whole history.
const BATCH_FROM: &str = "2000-01-01";
/// Where L0 copies the orders to: a plain collection with no secondary index.
const L0_COLLECTION: &str = "Commandes_l0_copy";
/// Where L0e copies the archive documents to, in the archive's database: a collection given the
/// archive's secondary indexes.
const L0E_COLLECTION: &str = "Commandes_l0e_copy";
/// Appended to `BENCH_DB` to name the scaling case's database.
const SCALING_DB_SUFFIX: &str = "_scale";
/// Where the enrichment profile writes.
const STAGE_PROBE_COLLECTION: &str = "Commandes_stage_probe";
/// L0's settings, (cursor and insert batch, inserts in flight): each L0 run tries them all and
/// keeps the fastest, so that the bound is the driver's best rather than one guess.
const L0_SETTINGS: &[(usize, usize)] = &[(1000, 4), (5000, 4), (20_000, 2)];
/// How the throughput cases deliver: ids per `update_many`, updates in flight.
const UPDATER: Updater = Updater { chunk: 500, in_flight: 4 };
/// The naive baseline writes by this many documents.
const NAIVE_INSERT_BATCH: usize = 100;
/// Paced deliveries: orders per update, and updates outstanding at most.
const LATENCY_GROUP: usize = 10;
const LATENCY_IN_FLIGHT: usize = 8;

/// The bench's settings, from the environment.
#[derive(Debug, Clone, Serialize)]
struct Settings {
    #[serde(skip)]
    uri: String,
    database: String,
    orders: u64,
    runs: usize,
    sweep_chunk_sizes: Vec<usize>,
    sweep_concurrency: Vec<usize>,
    sweep_runs: usize,
    watch_orders: u64,
    watch_batch_sizes: Vec<usize>,
    latency_rate: f64,
    latency_secs: f64,
    latency_waits_ms: Vec<u64>,
    naive_orders: u64,
    stage_orders: u64,
    scaling_orders: Vec<u64>,
    cases: Vec<String>,
    server_pid: Option<u32>,
    archiver: PathBuf,
    out: PathBuf,
}

/// A variable's value, or `default` when unset or empty.
fn env_or<T: FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}")),
        _ => Ok(default),
    }
}

/// A comma-separated list, or `default` when unset. Set but empty means an empty list.
fn env_list<T>(name: &str, default: &[T]) -> anyhow::Result<Vec<T>>
where
    T: FromStr + Clone,
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|e| anyhow::anyhow!("{name}: {s:?}: {e}")))
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}

impl Settings {
    fn from_env(uri: String) -> anyhow::Result<Settings> {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        let orders: u64 = env_or("BENCH_ORDERS", 100_000)?;
        let settings = Settings {
            uri,
            database: env_or("BENCH_DB", "bench".to_owned())?,
            orders,
            runs: env_or("BENCH_RUNS", 3)?,
            sweep_chunk_sizes: env_list("BENCH_SWEEP_CHUNK_SIZES", &[500, 1000, 5000])?,
            sweep_concurrency: env_list("BENCH_SWEEP_CONCURRENCY", &[1, 2, 4, 8])?,
            sweep_runs: env_or("BENCH_SWEEP_RUNS", 1)?,
            watch_orders: env_or("BENCH_WATCH_ORDERS", orders / 2)?,
            watch_batch_sizes: env_list("BENCH_WATCH_BATCH_SIZES", &[])?,
            latency_rate: env_or("BENCH_LATENCY_RATE", 1000.0)?,
            latency_secs: env_or("BENCH_LATENCY_SECS", 15.0)?,
            latency_waits_ms: env_list("BENCH_LATENCY_WAITS_MS", &[])?,
            naive_orders: env_or("BENCH_NAIVE_ORDERS", (orders / 10).max(1))?,
            stage_orders: env_or("BENCH_STAGE_ORDERS", orders.min(10_000))?,
            scaling_orders: env_list("BENCH_SCALING_ORDERS", &[10_000, 100_000, 1_000_000])?,
            cases: env_list(
                "BENCH_CASES",
                &["batch", "stages", "sweep", "naive", "watch", "latency", "scaling", "lake"].map(String::from),
            )?,
            server_pid: env_or("BENCH_SERVER_PID", 0).map(|pid| Some(pid).filter(|&p| p != 0))?,
            archiver: env_or("BENCH_ARCHIVER", target.join("release/archiver"))?,
            out: env_or("BENCH_OUT", target.join("bench/results.json"))?,
        };
        if settings.orders == 0 || settings.runs == 0 || settings.latency_rate <= 0.0 {
            bail!("BENCH_ORDERS, BENCH_RUNS and BENCH_LATENCY_RATE must be positive");
        }
        if settings.scaling_orders.contains(&0) {
            bail!("BENCH_SCALING_ORDERS: every size must be positive");
        }
        Ok(settings)
    }

    fn wants(&self, case: &str) -> bool {
        self.cases.iter().any(|c| c == case)
    }

    /// Orders the latency case delivers.
    fn latency_orders(&self) -> u64 {
        (self.latency_rate * self.latency_secs).round() as u64
    }
}

/// The data and connections every case shares.
struct Bench {
    settings: Settings,
    config: Config,
    archiver: Archiver,
    /// The bench database: orders, references and archive.
    database: Database,
    orders: Collection<Document>,
    archive: Collection<Document>,
    /// What `batch` selects: every delivered order.
    delivered_filter: Document,
    /// Delivered orders, all archived by each batch run.
    delivered: u64,
    /// Undelivered orders, delivered by the watch throughput runs (and reset between them).
    watch_ids: Vec<Bson>,
    /// Undelivered orders, delivered by each latency run.
    latency_ids: Vec<Bson>,
}

impl Bench {
    /// Seeds the data with the real `simulate`: `BENCH_ORDERS` delivered orders, then the
    /// undelivered ones the watch cases deliver, in the same database with the same references.
    async fn setup(settings: Settings) -> anyhow::Result<Bench> {
        let scratch = settings.out.parent().context("BENCH_OUT has no directory")?.join("work");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let archiver = Archiver::new(settings.archiver.clone(), &settings.uri, &settings.database, &scratch)?;

        let undelivered =
            settings.watch_orders + settings.latency_orders() * (1 + settings.latency_waits_ms.len() as u64);
        let seeds =
            [("seed-delivered", settings.orders, "1", "1.0", true), ("seed-undelivered", undelivered, "2", "0", false)];
        for (label, count, seed, p_delivered, drop) in seeds {
            let count = count.to_string();
            let mut args = vec!["simulate", "--count", &count, "--seed", seed, "--p-delivered", p_delivered];
            if drop {
                args.push("--drop");
            }
            let elapsed = archiver.run(label, &args, &[]).await?;
            eprintln!("{label}: {count} orders in {:.1} s", elapsed.as_secs_f64());
        }

        let mut config = Config::default();
        config.mongodb.uri = archiver::redact::SecretUri::new(settings.uri.clone());
        config.mongodb.database = settings.database.clone();
        let dbs = archiver::db::connect(&config, &archiver::db::RetryPolicy::bounded(&config.retry)).await?;
        // Built once, untimed, with batch's own definitions: otherwise the first timed run
        // would pay for indexing the orders.
        archiver::pipeline::sink::ensure_indexes(&config, &dbs).await;
        let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
        let archive: Collection<Document> = dbs.archive.collection(&config.archive.collection);
        let delivered_filter = delivered_in_range(&config, DateRange::parse(BATCH_FROM, None, Utc::now())?);
        let delivered = orders.count_documents(delivered_filter.clone()).await?;
        if delivered != settings.orders {
            bail!("simulate seeded {delivered} delivered orders, expected {}", settings.orders);
        }
        let f = &config.orders.fields;
        let mut pending =
            ids(&orders, doc! { f.status.clone(): { "$ne": &config.orders.delivered_status } }, undelivered).await?;
        if (pending.len() as u64) < undelivered {
            bail!("simulate seeded {} undelivered orders, expected {undelivered}", pending.len());
        }
        let latency_ids = pending.split_off(settings.watch_orders as usize);
        let bench = Bench {
            settings,
            config,
            archiver,
            database: dbs.source.clone(),
            orders,
            archive,
            delivered_filter,
            delivered,
            watch_ids: pending,
            latency_ids,
        };
        // Every run starts from the same state: en route, not delivered.
        bench.reset(&bench.watch_ids).await?;
        bench.reset(&bench.latency_ids).await?;
        Ok(bench)
    }

    /// Puts these orders back to undelivered.
    async fn reset(&self, ids: &[Bson]) -> anyhow::Result<()> {
        UPDATER.update_ids(&self.orders, ids, || undelivery(&self.config)).await.map(|_| ())
    }

    async fn drop_archive(&self) -> anyhow::Result<()> {
        self.archive.drop().await.context("dropping the archive")
    }

    /// Fails unless the archive holds exactly `n` documents: a fast wrong run is no figure.
    async fn expect_archived(&self, n: u64) -> anyhow::Result<()> {
        let count = self.archive.count_documents(doc! {}).await?;
        if count != n {
            bail!("the archive holds {count} documents, expected {n}");
        }
        Ok(())
    }

    /// Times `work` on `orders` orders, with the CPU it costs here and on the server.
    async fn measure(&self, orders: u64, work: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<Run> {
        Run::measure(orders, self.settings.server_pid, work).await
    }

    /// `archiver batch ARGS` (with `env`) over every delivered order into an empty archive,
    /// timed by wall clock.
    async fn run_batch(&self, label: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<BatchRun> {
        self.drop_archive().await?;
        let mut command = vec!["batch", "--date-from", BATCH_FROM];
        command.extend_from_slice(args);
        let run = self.measure_batch(self.delivered, label, &command, env).await?;
        self.expect_archived(self.delivered).await?;
        Ok(run)
    }

    /// Times `archiver COMMAND` (with `env`), which handles `orders`, with the CPU it costs and
    /// what the `archiver` process itself used.
    async fn measure_batch(
        &self,
        orders: u64,
        label: &str,
        command: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<BatchRun> {
        let mut archiver = Resources::default();
        let run = self
            .measure(orders, async {
                archiver = self.archiver.run_measured(label, command, env).await?.1;
                Ok(())
            })
            .await?;
        Ok(BatchRun { run, archiver })
    }

    /// An empty archive with the index batch creates on it, for the driver-side references:
    /// they then maintain the same index as batch does.
    async fn empty_archive_with_index(&self) -> anyhow::Result<()> {
        self.drop_archive().await?;
        self.archive.create_index(IndexModel::builder().keys(doc! { "date_commande": 1 }).build()).await?;
        Ok(())
    }

    /// L1: the enrichment as one bare aggregation ending in the same `$merge` as batch's server
    /// path, into an archive with the same index batch creates.
    async fn run_l1(&self) -> anyhow::Result<Run> {
        self.empty_archive_with_index().await?;
        let stages = enrichment_stages(&self.config, ArchiveSource::Batch);
        let pipeline = self.merge_pipeline(vec![], &stages, &self.config.archive.collection);
        let run = self
            .measure(self.delivered, async { self.orders.aggregate(pipeline).await.map(drop).context("running L1") })
            .await?;
        self.expect_archived(self.delivered).await?;
        Ok(run)
    }

    /// The delivered orders, then `limit` stages, then `stages`, then batch's `$merge` into
    /// `into` (in the archive database).
    fn merge_pipeline(&self, limit: Vec<Document>, stages: &[Document], into: &str) -> Vec<Document> {
        let mut pipeline = vec![doc! { "$match": self.delivered_filter.clone() }];
        pipeline.extend(limit);
        pipeline.extend_from_slice(stages);
        // As batch's server path: the order passed through for its digest is not written.
        pipeline.push(doc! { "$project": { ORDER_AS_STORED: 0 } });
        pipeline.push(doc! { "$merge": {
            "into": { "db": self.config.archive_database(), "coll": into },
            "on": "_id",
            "whenMatched": "keepExisting",
            "whenNotMatched": "insert",
        } });
        pipeline
    }

    /// L1 cut after `stages`, on the first `n` delivered orders, into a scratch collection.
    async fn run_stage_prefix(&self, stages: &[Document], n: u64) -> anyhow::Result<Run> {
        let probe = self.database.collection::<Document>(STAGE_PROBE_COLLECTION);
        probe.drop().await?;
        let pipeline = self.merge_pipeline(vec![doc! { "$limit": n as i64 }], stages, STAGE_PROBE_COLLECTION);
        let run = self
            .measure(n, async { self.orders.aggregate(pipeline).await.map(drop).context("running a stage prefix") })
            .await?;
        let count = probe.count_documents(doc! {}).await?;
        probe.drop().await?;
        if count != n {
            bail!("the stage probe wrote {count} documents, expected {n}");
        }
        Ok(run)
    }

    /// L0: the same orders copied unchanged, raw, into a collection with no secondary index,
    /// with each of `L0_SETTINGS`; the fastest copy is the run's figure.
    async fn run_l0(&self) -> anyhow::Result<Run> {
        let target = self.database.collection::<RawDocumentBuf>(L0_COLLECTION);
        let source = self.orders.clone_with_type::<RawDocumentBuf>();
        let mut fastest: Option<Run> = None;
        for &(batch, in_flight) in L0_SETTINGS {
            target.drop().await?;
            let run = self
                .measure(self.delivered, async {
                    let copied =
                        load::copy_raw(&source, self.delivered_filter.clone(), &target, batch, in_flight).await?;
                    if copied != self.delivered {
                        bail!("L0 copied {copied} orders, expected {}", self.delivered);
                    }
                    Ok(())
                })
                .await?;
            eprintln!("    L0 with batches of {batch}, {in_flight} in flight: {:.0} orders/s", run.orders_per_sec());
            if fastest.as_ref().is_none_or(|f| run.orders_per_sec() > f.orders_per_sec()) {
                fastest = Some(run);
            }
        }
        target.drop().await?;
        fastest.context("no L0 settings")
    }

    /// L0e: the archive documents as the last batch run left them, copied unchanged, raw, into
    /// an empty collection with the archive's secondary indexes (read from the archive, so
    /// that L0e follows the product's indexes), with each of `L0_SETTINGS`; the fastest copy
    /// is the run's figure. The archive must hold the `delivered` documents of a batch run.
    async fn run_l0e(&self) -> anyhow::Result<Run> {
        let target = self.archive_database().collection::<RawDocumentBuf>(L0E_COLLECTION);
        let source = self.archive.clone_with_type::<RawDocumentBuf>();
        let indexes: Vec<IndexModel> = self
            .archive
            .list_indexes()
            .await?
            .try_filter(|index| {
                let primary = index.options.as_ref().and_then(|o| o.name.as_deref()) == Some("_id_");
                std::future::ready(!primary)
            })
            .try_collect()
            .await
            .context("listing the archive's indexes")?;
        let mut fastest: Option<Run> = None;
        for &(batch, in_flight) in L0_SETTINGS {
            target.drop().await?;
            if !indexes.is_empty() {
                target.create_indexes(indexes.clone()).await.context("giving the L0e copy the archive's indexes")?;
            }
            let run = self
                .measure(self.delivered, async {
                    let copied = load::copy_raw(&source, doc! {}, &target, batch, in_flight).await?;
                    if copied != self.delivered {
                        bail!("L0e copied {copied} archive documents, expected {}", self.delivered);
                    }
                    Ok(())
                })
                .await?;
            let count = target.count_documents(doc! {}).await?;
            if count != self.delivered {
                bail!("the L0e copy holds {count} documents, expected {}", self.delivered);
            }
            eprintln!("    L0e with batches of {batch}, {in_flight} in flight: {:.0} orders/s", run.orders_per_sec());
            if fastest.as_ref().is_none_or(|f| run.orders_per_sec() > f.orders_per_sec()) {
                fastest = Some(run);
            }
        }
        target.drop().await?;
        eprintln!("    L0e: the copy had the archive's {} secondary index(es)", indexes.len());
        fastest.context("no L0 settings")
    }

    /// Case 9's read limit: the delivered orders read and joined as `batch` reads and joins them
    /// (chunks of `batch.chunk_size`, `batch.concurrency` at once, the reference cache), and
    /// written nowhere.
    async fn run_read_and_join(&self) -> anyhow::Result<Run> {
        let config = &self.config;
        let joiner = Joiner::new(config, &self.database, ArchiveSource::Batch)
            .context("the benchmark's configuration joins on the client")?
            .with_cache(config.enrich.reference_cache_entries);
        let source = self.orders.clone_with_type::<RawDocumentBuf>();
        let chunk_size = config.batch.chunk_size;
        let joined = std::sync::atomic::AtomicU64::new(0);
        let run = self
            .measure(self.delivered, async {
                source
                    .find(self.delivered_filter.clone())
                    .batch_size(chunk_size.min(100_000) as u32)
                    .await?
                    .try_chunks(chunk_size)
                    .map_err(|e| e.1)
                    .map_ok(|chunk| {
                        let (joiner, joined) = (&joiner, &joined);
                        async move {
                            let docs = joiner.enrich(&chunk).await?.context("an order the join cannot do")?;
                            joined.fetch_add(docs.len() as u64, std::sync::atomic::Ordering::Relaxed);
                            anyhow::Ok(())
                        }
                    })
                    .map_err(anyhow::Error::from)
                    .try_buffer_unordered(config.batch.concurrency.max(1))
                    .try_collect::<()>()
                    .await
            })
            .await?;
        let joined = joined.into_inner();
        if joined != self.delivered {
            bail!("the read-and-join reference joined {joined} orders, expected {}", self.delivered);
        }
        Ok(run)
    }

    /// Case 9's sink limit for a Delta table: the finished archive documents, as the last batch
    /// run left them in the collection, read and appended to a new table at `table` (Parquet
    /// encoding, the upload, the commit), with no enrichment: the table's L0e.
    async fn run_delta_limit(&self, table: &std::path::Path) -> anyhow::Result<Run> {
        let mut config = self.config.clone();
        config.archive.sink = archiver::config::ArchiveSink::Delta;
        let uri = table.display().to_string();
        let source = self.archive.clone_with_type::<RawDocumentBuf>();
        let chunk_size = config.batch.chunk_size;
        let mut appended = 0;
        let run = self
            .measure(self.delivered, async {
                let mut lake = DeltaArchive::open(&config, &uri, "archiver-bench").await?;
                let mut chunks = source.find(doc! {}).batch_size(chunk_size as u32).await?.try_chunks(chunk_size);
                while let Some(chunk) = chunks.try_next().await.map_err(|e| e.1)? {
                    appended += lake.append(chunk).await?.inserted;
                }
                lake.commit(None).await?;
                Ok(())
            })
            .await?;
        if appended != self.delivered {
            bail!("the Delta sink limit appended {appended} rows, expected {}", self.delivered);
        }
        Ok(run)
    }

    /// The database the archive is in.
    fn archive_database(&self) -> Database {
        self.archive.client().database(&self.archive.namespace().db)
    }

    /// Case 8's run of one size: a fresh database named `name` seeded with `n` delivered
    /// orders (untimed), `archiver batch` (defaults) over them, then the database dropped,
    /// whether the run succeeded or not, to free the disk.
    async fn run_scaling(&self, name: &str, n: u64) -> anyhow::Result<BatchRun> {
        let database = self.orders.client().database(name);
        database.drop().await?;
        let result = self.run_scaling_on(name, n).await;
        database.drop().await.context("dropping the scaling database")?;
        result
    }

    async fn run_scaling_on(&self, name: &str, n: u64) -> anyhow::Result<BatchRun> {
        // The Archiver helper points every process at BENCH_DB; this variable overrides it.
        let env = [("MONGODB_DB", name.to_owned())];
        let count = n.to_string();
        let seed = ["simulate", "--count", &count, "--seed", "1", "--p-delivered", "1.0", "--drop"];
        let seeding = self.archiver.run(&format!("scale-seed-{n}"), &seed, &env).await?;
        eprintln!("  scaling: seeded {n} orders in {:.1} s (not timed)", seeding.as_secs_f64());

        let mut config = self.config.clone();
        config.mongodb.database = name.to_owned();
        let dbs = archiver::db::connect(&config, &archiver::db::RetryPolicy::bounded(&config.retry)).await?;
        // As in `Bench::setup`: built untimed, otherwise the run would pay for indexing.
        archiver::pipeline::sink::ensure_indexes(&config, &dbs).await;
        let orders: Collection<Document> = dbs.source.collection(&config.orders.collection);
        let delivered = orders.count_documents(self.delivered_filter.clone()).await?;
        if delivered != n {
            bail!("simulate seeded {delivered} delivered orders in {name}, expected {n}");
        }
        let archive: Collection<Document> = dbs.archive.collection(&config.archive.collection);
        archive.drop().await?;

        let run =
            self.measure_batch(n, &format!("scale-batch-{n}"), &["batch", "--date-from", BATCH_FROM], &env).await?;
        let archived = archive.count_documents(doc! {}).await?;
        if archived != n {
            bail!("the archive of {name} holds {archived} documents, expected {n}");
        }
        Ok(run)
    }

    /// The naive baseline: per order, one aggregation; inserts by `NAIVE_INSERT_BATCH`.
    async fn run_naive(&self, ids: &[Bson]) -> anyhow::Result<Run> {
        self.drop_archive().await?;
        let stages = enrichment_stages(&self.config, ArchiveSource::Batch);
        let run = self
            .measure(ids.len() as u64, async {
                let mut pending: Vec<Document> = Vec::with_capacity(NAIVE_INSERT_BATCH);
                for (i, id) in ids.iter().enumerate() {
                    let mut pipeline = vec![doc! { "$match": { "_id": id } }];
                    pipeline.extend(stages.iter().cloned());
                    let mut enriched: Vec<Document> = self.orders.aggregate(pipeline).await?.try_collect().await?;
                    enriched.iter_mut().for_each(finish);
                    pending.extend(enriched);
                    if pending.len() >= NAIVE_INSERT_BATCH || i + 1 == ids.len() {
                        self.archive.insert_many(std::mem::take(&mut pending)).ordered(false).await?;
                    }
                }
                Ok(())
            })
            .await?;
        self.expect_archived(ids.len() as u64).await?;
        Ok(run)
    }

    /// How long the archive may take to catch up with `n` deliveries before a run is failed.
    fn catch_up_timeout(n: u64) -> Duration {
        Duration::from_secs(120 + n / 100)
    }

    /// One watch throughput run: `archiver watch` (with `env`) is started, the watch orders are
    /// delivered as fast as the updater goes, and the run lasts until the archive holds them all.
    async fn run_watch(&self, label: &str, env: &[(&str, String)]) -> anyhow::Result<WatchRun> {
        let ids = &self.watch_ids;
        self.reset(ids).await?;
        self.drop_archive().await?;
        let mut watch = self.archiver.start_watch(label, env).await?;
        let meter = CpuMeter::start(self.settings.server_pid);
        let started = Instant::now();
        let deliver = UPDATER.update_ids(&self.orders, ids, || delivery(&self.config));
        let archived =
            load::wait_for_count(&self.archive, ids.len() as u64, Self::catch_up_timeout(ids.len() as u64), || {
                watch.check_alive()
            });
        let (delivery_time, done) = tokio::try_join!(deliver, archived)?;
        self.end_watch_run(watch, meter, done - started, delivery_time).await
    }

    /// Ends a watch run whose archive was complete `elapsed` after its start: the CPU of the
    /// server and of the still running `watch` (read before it stops), then the stop and a check.
    async fn end_watch_run(
        &self,
        watch: WatchProcess,
        meter: CpuMeter,
        elapsed: Duration,
        delivery_time: Duration,
    ) -> anyhow::Result<WatchRun> {
        let mut cpu = meter.stop();
        let resources = watch.resources()?;
        // The watch process is not waited for yet, so the meter did not count it.
        cpu.client_secs += resources.cpu_secs;
        watch.stop().await?;
        let orders = self.watch_ids.len() as u64;
        self.expect_archived(orders).await?;
        Ok(WatchRun { orders, elapsed, delivery_time, resources, cpu })
    }

    /// One watch catch-up run: the watch orders are delivered while `archiver watch` is stopped
    /// (after it saved its position), then it is started again and the run lasts until the
    /// archive holds them all. The same work per order as `batch`, plus the change stream, without
    /// deliveries sharing the server.
    async fn run_watch_catch_up(&self, label: &str) -> anyhow::Result<WatchRun> {
        let ids = &self.watch_ids;
        self.reset(ids).await?;
        self.drop_archive().await?;
        self.archiver.start_watch(label, &[]).await?.stop().await?;
        let delivery_time = UPDATER.update_ids(&self.orders, ids, || delivery(&self.config)).await?;
        let meter = CpuMeter::start(self.settings.server_pid);
        let started = Instant::now();
        let mut watch = self.archiver.resume_watch(label, &[]).await?;
        let done =
            load::wait_for_count(&self.archive, ids.len() as u64, Self::catch_up_timeout(ids.len() as u64), || {
                watch.check_alive()
            })
            .await?;
        self.end_watch_run(watch, meter, done - started, delivery_time).await
    }

    /// The limit of case 3: the same deliveries, read by a bare change-stream reader with
    /// watch's filter and cursor settings, counting events.
    async fn run_bare_reader(&self) -> anyhow::Result<WatchRun> {
        let ids = &self.watch_ids;
        self.reset(ids).await?;
        let w = &self.config.watch;
        let reader = load::count_stream_events(
            &self.orders,
            delivered_filter(&self.config, &[]),
            ids.len() as u64,
            w.batch_size as u32,
            Duration::from_millis(w.batch_max_wait_ms),
        )
        .await?;
        let meter = CpuMeter::start(self.settings.server_pid);
        let started = Instant::now();
        let delivery_time = UPDATER.update_ids(&self.orders, ids, || delivery(&self.config)).await?;
        let done = tokio::time::timeout(Self::catch_up_timeout(ids.len() as u64), reader)
            .await
            .context("the bare reader did not see every delivery in time")???;
        let cpu = meter.stop();
        Ok(WatchRun {
            orders: ids.len() as u64,
            elapsed: done - started,
            delivery_time,
            resources: Resources::default(),
            cpu,
        })
    }

    /// The updater with nobody reading: the delivery rate itself.
    async fn run_updater_alone(&self) -> anyhow::Result<Run> {
        let ids = &self.watch_ids;
        self.reset(ids).await?;
        self.measure(ids.len() as u64, async {
            UPDATER.update_ids(&self.orders, ids, || delivery(&self.config)).await.map(drop)
        })
        .await
    }

    /// One latency run: `watch` (with `env`) running, `ids` delivered at the paced rate, then
    /// each archived order's `archived_at − date_livraison`, sorted, in milliseconds.
    async fn run_latency(&self, label: &str, ids: &[Bson], env: &[(&str, String)]) -> anyhow::Result<LatencyRun> {
        self.reset(ids).await?;
        self.drop_archive().await?;
        let mut watch = self.archiver.start_watch(label, env).await?;
        let s = &self.settings;
        let delivering =
            load::deliver_paced(&self.orders, &self.config, ids, s.latency_rate, LATENCY_GROUP, LATENCY_IN_FLIGHT)
                .await?;
        load::wait_for_count(&self.archive, ids.len() as u64, Self::catch_up_timeout(ids.len() as u64), || {
            watch.check_alive()
        })
        .await?;
        watch.stop().await?;
        let mut latencies_ms: Vec<f64> = self
            .archive
            .find(doc! {})
            .projection(doc! { "archived_at": 1, "date_livraison": 1 })
            .await?
            .try_collect::<Vec<Document>>()
            .await?
            .iter()
            .map(|d| {
                let at = |field| d.get_datetime(field).map(|t| t.timestamp_millis());
                Ok((at("archived_at")? - at("date_livraison")?) as f64)
            })
            .collect::<Result<_, mongodb::bson::document::ValueAccessError>>()
            .context("an archive document without archived_at or date_livraison")?;
        latencies_ms.sort_by(f64::total_cmp);
        self.reset(ids).await?;
        Ok(LatencyRun { delivery_rate: rate(ids.len() as u64, delivering), latencies_ms })
    }
}

/// The ids of up to `limit` orders matching `filter`, in `_id` order (so, reproducibly).
async fn ids(orders: &Collection<Document>, filter: Document, limit: u64) -> anyhow::Result<Vec<Bson>> {
    let docs: Vec<Document> = orders
        .find(filter)
        .sort(doc! { "_id": 1 })
        .limit(limit as i64)
        .projection(doc! { "_id": 1 })
        .await?
        .try_collect()
        .await?;
    Ok(docs.into_iter().filter_map(|mut d| d.remove("_id")).collect())
}

/// A timed `archiver batch` run, with what the `archiver` process itself used.
struct BatchRun {
    run: Run,
    /// The `archiver` process's own CPU and peak RSS, from its rusage.
    archiver: Resources,
}

impl Throughput for BatchRun {
    fn orders(&self) -> u64 {
        self.run.orders
    }
    fn elapsed(&self) -> Duration {
        self.run.elapsed
    }
    fn cpu(&self) -> CpuTimes {
        self.run.cpu
    }
}

impl BatchRun {
    fn archiver_us_per_order(&self) -> f64 {
        self.archiver.cpu_secs * 1e6 / self.run.orders.max(1) as f64
    }
    fn peak_rss_mb(&self) -> f64 {
        self.archiver.peak_rss_bytes as f64 / 1e6
    }
}

/// What a watch throughput run (or its bare-reader counterpart) measured.
struct WatchRun {
    orders: u64,
    /// From the first delivery to the last order archived (or event read).
    elapsed: Duration,
    /// How long the deliveries themselves took.
    delivery_time: Duration,
    /// The `watch` process's, read just before SIGTERM (zero for the bare reader).
    resources: Resources,
    /// From the first delivery to the end, plus the whole `watch` process's.
    cpu: CpuTimes,
}

impl Throughput for WatchRun {
    fn orders(&self) -> u64 {
        self.orders
    }
    fn elapsed(&self) -> Duration {
        self.elapsed
    }
    fn cpu(&self) -> CpuTimes {
        self.cpu
    }
}

impl WatchRun {
    fn delivery_rate(&self) -> f64 {
        rate(self.orders, self.delivery_time)
    }
    fn peak_rss_mb(&self) -> f64 {
        self.resources.peak_rss_bytes as f64 / 1e6
    }
    fn cpu_secs_per_10k(&self) -> f64 {
        self.resources.cpu_secs * 10_000.0 / self.orders as f64
    }
    fn archiver_us_per_order(&self) -> f64 {
        self.resources.cpu_secs * 1e6 / self.orders.max(1) as f64
    }
}

/// What a latency run measured.
struct LatencyRun {
    /// Deliveries per second actually reached by the paced updater.
    delivery_rate: f64,
    /// Sorted.
    latencies_ms: Vec<f64>,
}

/// The medians the targets are checked against; `None` when the case was not run.
#[derive(Default)]
struct Figures {
    batch: Option<f64>,
    l1: Option<f64>,
    l0: Option<f64>,
    l0e: Option<f64>,
    /// The `archiver` process's own CPU, µs per order, in batch (defaults) and in watch.
    batch_archiver_us: Option<f64>,
    watch_archiver_us: Option<f64>,
    naive: Option<f64>,
    watch: Option<f64>,
    watch_catch_up: Option<f64>,
    bare_reader: Option<f64>,
    latency_p99_ms: Option<f64>,
    watch_peak_rss_mb: Option<f64>,
}

/// Case 1: both batch write paths, and both enrichment modes of the client path, against L1,
/// L0 and L0e.
async fn case_batch(b: &Bench, report: &mut Report, figures: &mut Figures) -> anyhow::Result<()> {
    let runs = b.settings.runs;
    let client_path = ["--write-path", "client"];
    let lookup = [("ENRICH_MODE", "lookup".to_owned())];
    let client = timed("batch client", runs, |_| b.run_batch("batch-client", &client_path, &[])).await?;
    // Right after the default runs, so that L0e copies the very documents they wrote.
    let l0e = timed("L0e archive copy", runs, |_| b.run_l0e()).await?;
    let sizes =
        (mean_raw_size(&b.orders, b.delivered_filter.clone()).await?, mean_raw_size(&b.archive, doc! {}).await?);
    let client_lookup =
        timed("batch client, lookup", runs, |_| b.run_batch("batch-client-lookup", &client_path, &lookup)).await?;
    let server = timed("batch server", runs, |_| b.run_batch("batch-server", &["--write-path", "server"], &[])).await?;
    let l1 = timed("L1 aggregation + $merge", runs, |_| b.run_l1()).await?;
    let l0 = timed("L0 raw copy", runs, |_| b.run_l0()).await?;

    let section = format!("1. batch: {} delivered orders, full enrichment, wall clock", b.delivered);
    let (client_runs, client_lookup_runs, server_runs) = (client, client_lookup, server);
    let client = report.throughput(&section, "archiver batch (defaults: client path, join)", &client_runs);
    let client_lookup =
        report.throughput(&section, "archiver batch, client path, ENRICH_MODE=lookup", &client_lookup_runs);
    let server = report.throughput(&section, "archiver batch --write-path server", &server_runs);
    let l1 = report.throughput(&section, "L1 bare aggregation + $merge (driver)", &l1);
    let l0 = report.throughput(&section, "L0 raw copy, no enrichment (driver)", &l0);
    let l0e = report.throughput(
        &section,
        "L0e: copy the finished archive documents into a collection with the archive's indexes (driver)",
        &l0e,
    );
    let batch_archiver_us = report.row(
        &section,
        "archiver's own CPU, batch (defaults)",
        "µs/order",
        summarize(&client_runs, BatchRun::archiver_us_per_order),
    );
    report.row(
        &section,
        "archiver's own CPU, batch ENRICH_MODE=lookup",
        "µs/order",
        summarize(&client_lookup_runs, BatchRun::archiver_us_per_order),
    );
    report.row(
        &section,
        "archiver's own CPU, batch --write-path server",
        "µs/order",
        summarize(&server_runs, BatchRun::archiver_us_per_order),
    );
    report.row(&section, "archiver peak RSS, batch (defaults)", "MB", summarize(&client_runs, BatchRun::peak_rss_mb));
    report.ratio("batch client (join) / batch client (lookup)", client, client_lookup);
    report.ratio("batch client / L1", client, l1);
    report.ratio("batch client / L0", client, l0);
    report.ratio("batch client / L0e", client, l0e);
    report.ratio("batch server / L1", server, l1);
    report.ratio("batch server / L0", server, l0);
    report.ratio("batch server / L0e", server, l0e);
    report.note(format!(
        "L0 copies orders of {:.0} bytes on average; L0e copies archive documents of {:.0} bytes",
        sizes.0, sizes.1
    ));
    *figures = Figures {
        batch: Some(client),
        l1: Some(l1),
        l0: Some(l0),
        l0e: Some(l0e),
        batch_archiver_us: Some(batch_archiver_us),
        ..std::mem::take(figures)
    };
    Ok(())
}

/// Case 7: what each enrichment stage adds, by cutting L1 after each one (on
/// `BENCH_STAGE_ORDERS` orders, one run each: a profile, not a target).
async fn case_stages(b: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let n = b.settings.stage_orders.min(b.delivered);
    let section = format!(
        "7. $lookup pipeline profile: L1 ($match, $limit {n}, stages…, $merge) cut after each stage, 1 run each"
    );
    let stages = enrichment_stages(&b.config, ArchiveSource::Batch);
    for k in 0..=stages.len() {
        let name = match k {
            0 => "no enrichment ($match + $merge only)".to_owned(),
            k => format!("+ {}", stage_label(k, &stages[k - 1])),
        };
        let runs = timed(&name, 1, |_| b.run_stage_prefix(&stages[..k], n)).await?;
        report.throughput(&section, &name, &runs);
    }
    Ok(())
}

/// `N. $operator [from]`, e.g. `2. $lookup Livreur`.
fn stage_label(number: usize, stage: &Document) -> String {
    let Some((operator, body)) = stage.iter().next() else { return format!("{number}. (empty)") };
    match body.as_document().and_then(|b| b.get_str("from").ok()) {
        Some(from) => format!("{number}. {operator} {from}"),
        None => format!("{number}. {operator}"),
    }
}

/// Case 2: the client path over chunk sizes × concurrency.
async fn case_sweep(b: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let s = &b.settings;
    let section = format!("2. batch client path sweep: {} orders, {} run(s) each", b.delivered, s.sweep_runs);
    let mut best: Option<(f64, String)> = None;
    for chunk in &s.sweep_chunk_sizes {
        for concurrency in &s.sweep_concurrency {
            let (chunk_arg, concurrency_arg) = (chunk.to_string(), concurrency.to_string());
            let args = ["--write-path", "client", "--chunk-size", &chunk_arg, "--concurrency", &concurrency_arg];
            let name = format!("--chunk-size {chunk} --concurrency {concurrency}");
            let runs = timed(&name, s.sweep_runs, |_| b.run_batch("sweep", &args, &[])).await?;
            let median = report.throughput(&section, &name, &runs);
            if best.as_ref().is_none_or(|(rate, _)| median > *rate) {
                best = Some((median, name));
            }
        }
    }
    if let Some((rate, name)) = best {
        report.note(format!(
            "best batch client setting in the sweep: {name} ({} orders/s)",
            support::report::number(rate)
        ));
    }
    Ok(())
}

/// Case 6: the naive per-order baseline.
async fn case_naive(b: &Bench, report: &mut Report, figures: &mut Figures) -> anyhow::Result<()> {
    let ids = ids(&b.orders, b.delivered_filter.clone(), b.settings.naive_orders).await?;
    let runs = timed("naive", b.settings.runs, |_| b.run_naive(&ids)).await?;
    let section = format!(
        "6. naive baseline: one aggregation per order, inserts by {NAIVE_INSERT_BATCH}, sequential, {} orders",
        ids.len()
    );
    let naive = report.throughput(&section, "naive per-order archiving (driver)", &runs);
    if let Some(batch) = figures.batch {
        report.ratio("batch client / naive", batch, naive);
    }
    figures.naive = Some(naive);
    Ok(())
}

/// Cases 3 and 5: watch throughput against the bare reader and the updater, with the watch
/// process's memory and CPU; then the optional batch-size variants.
async fn case_watch(b: &Bench, report: &mut Report, figures: &mut Figures) -> anyhow::Result<()> {
    let runs = b.settings.runs;
    let m = b.watch_ids.len();
    let watch = timed("watch", runs, |i| async move { b.run_watch(&format!("watch-{i}"), &[]).await }).await?;
    let catch_up =
        timed("watch catch-up", runs, |i| async move { b.run_watch_catch_up(&format!("watch-catch-up-{i}")).await })
            .await?;
    let bare = timed("bare change-stream reader", runs, |_| b.run_bare_reader()).await?;
    let alone = timed("updater alone", runs, |_| b.run_updater_alone()).await?;

    let section = format!(
        "3. watch throughput: {m} orders delivered by update_many of {} ids, {} in flight",
        UPDATER.chunk, UPDATER.in_flight
    );
    let watch_rate = report.throughput(&section, "archiver watch (defaults), archived", &watch);
    let bare_rate = report.throughput(&section, "bare change-stream reader, events", &bare);
    report.throughput(&section, "updater alone (nobody reading)", &alone);
    report.row(&section, "updater during the watch runs", "orders/s", summarize(&watch, WatchRun::delivery_rate));
    report.row(&section, "updater during the bare-reader runs", "orders/s", summarize(&bare, WatchRun::delivery_rate));
    report.ratio("watch / bare reader", watch_rate, bare_rate);
    let catch_up_rate = report.throughput(&section, "archiver watch catching up (delivered while stopped)", &catch_up);
    report.row(
        &section,
        "  archiver's own CPU, catching up",
        "µs/order",
        summarize(&catch_up, WatchRun::archiver_us_per_order),
    );

    let section = "5. watch memory and CPU (during case 3)";
    let rss = report.row(section, "peak RSS (VmHWM before SIGTERM)", "MB", summarize(&watch, WatchRun::peak_rss_mb));
    report.row(section, "CPU (user+system) per 10,000 orders", "s", summarize(&watch, WatchRun::cpu_secs_per_10k));
    let own_cpu = report.row(
        section,
        "archiver's own CPU, watch",
        "µs/order",
        summarize(&watch, WatchRun::archiver_us_per_order),
    );

    figures.watch = Some(watch_rate);
    figures.watch_catch_up = Some(catch_up_rate);
    figures.bare_reader = Some(bare_rate);
    figures.watch_peak_rss_mb = Some(rss);
    figures.watch_archiver_us = Some(own_cpu);

    let section = "3b. watch variants (profiling, 1 run each)";
    // Without the reference cache, watch reads the references for every batch (its stream is on
    // the database either way): what the cache is worth.
    let mut variants = vec![("ENRICH_MODE", "lookup".to_owned()), ("REFERENCE_CACHE_ENTRIES", "0".to_owned())];
    variants.extend(b.settings.watch_batch_sizes.iter().map(|size| ("BATCH_SIZE", size.to_string())));
    for (i, (key, value)) in variants.into_iter().enumerate() {
        let name = format!("{key}={value}");
        let run = b.run_watch(&format!("watch-variant-{i}"), &[(key, value)]).await?;
        eprintln!("  watch {name}: {:.0} orders/s", run.orders_per_sec());
        report.throughput(section, &format!("archiver watch {name}"), std::slice::from_ref(&run));
        report.row(section, &format!("  peak RSS with {name}"), "MB", Summary::single(run.peak_rss_mb()));
    }
    b.reset(&b.watch_ids).await
}

/// Case 4: end-to-end latency at a steady delivery rate; then the optional batch-wait variants,
/// each on its own orders.
async fn case_latency(b: &Bench, report: &mut Report, figures: &mut Figures) -> anyhow::Result<()> {
    let s = &b.settings;
    let n = s.latency_orders() as usize;
    let section = format!(
        "4. watch latency: {} orders/s paced for {} s ({} orders), archived_at − date_livraison",
        s.latency_rate, s.latency_secs, n
    );
    let mut variants: Vec<(String, Vec<(&str, String)>)> = vec![("defaults".to_owned(), vec![])];
    for wait in &s.latency_waits_ms {
        variants.push((format!("BATCH_MAX_WAIT_MS={wait}"), vec![("BATCH_MAX_WAIT_MS", wait.to_string())]));
    }
    for (i, (name, env)) in variants.iter().enumerate() {
        let ids = &b.latency_ids[i * n..(i + 1) * n];
        let run = b.run_latency(&format!("watch-latency-{i}"), ids, env).await?;
        let p = |q| percentile(&run.latencies_ms, q);
        eprintln!(
            "  latency {name}: p50 {:.0} ms, p99 {:.0} ms at {:.0} deliveries/s",
            p(50.0),
            p(99.0),
            run.delivery_rate
        );
        report.row(&section, &format!("deliveries reached ({name})"), "orders/s", Summary::single(run.delivery_rate));
        for q in [50.0, 95.0, 99.0, 100.0] {
            let label = if q == 100.0 { "max".to_owned() } else { format!("p{q}") };
            report.row(&section, &format!("latency {label} ({name})"), "ms", Summary::single(p(q)));
        }
        if i == 0 {
            figures.latency_p99_ms = Some(p(99.0));
        }
    }
    report.note(
        "latency is archived_at − date_livraison on one machine clock; archived_at is stamped when a batch \
         is enriched (by archiver with ENRICH_MODE=join, by the server's $$NOW with lookup), before the \
         insert, so it slightly under-counts the final write",
    );
    Ok(())
}

/// Case 8: `archiver batch` (defaults) over histories of growing size, each seeded afresh in
/// its own database, one run per size: whether throughput, CPU per order and memory hold as
/// the history grows.
async fn case_scaling(b: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let name = format!("{}{SCALING_DB_SUFFIX}", b.settings.database);
    let section =
        format!("8. batch scaling: archiver batch (defaults), 1 run per size, each on a fresh database {name}");
    for &n in &b.settings.scaling_orders {
        let run = b.run_scaling(&name, n).await.with_context(|| format!("batch scaling, {n} orders"))?;
        eprintln!(
            "  scaling: {n} orders: {:.0} orders/s, {:.1} µs/order archiver CPU, {:.1} MB peak RSS",
            run.orders_per_sec(),
            run.archiver_us_per_order(),
            run.peak_rss_mb()
        );
        let size = support::report::number(n as f64);
        report.throughput(&section, &format!("{size} orders: archiver batch"), std::slice::from_ref(&run));
        report.row(
            &section,
            &format!("{size} orders: archiver's own CPU"),
            "µs/order",
            Summary::single(run.archiver_us_per_order()),
        );
        report.row(&section, &format!("{size} orders: archiver peak RSS"), "MB", Summary::single(run.peak_rss_mb()));
    }
    Ok(())
}

/// The mean size in bytes of the documents of `collection` matching `filter`, read raw.
/// Case 9: `batch` into a Delta table against `batch` into the collection (see the module's
/// comment).
async fn case_lake(b: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let runs = b.settings.runs;
    let collection = timed("batch into the collection", runs, |_| b.run_batch("batch-collection", &[], &[])).await?;
    let bson_per_order = mean_raw_size(&b.archive, doc! {}).await?;
    let tables = tempfile::tempdir()?;
    let table = |index: usize| tables.path().join(format!("orders-{index}"));
    // The limits, while the archive collection holds the documents of the last run.
    let read = timed("read and join, written nowhere", runs, |_| b.run_read_and_join()).await?;
    let limit_table = |index: usize| tables.path().join(format!("limit-{index}"));
    let sink_limit = timed("Delta sink limit", runs, |index| {
        let path = limit_table(index);
        async move { b.run_delta_limit(&path).await }
    })
    .await?;
    let lake = timed("batch into a Delta table", runs, |index| {
        let env = [("ARCHIVE_SINK", "delta".to_owned()), ("ARCHIVE_TABLE_URI", table(index).display().to_string())];
        async move {
            let command = ["batch", "--date-from", BATCH_FROM];
            b.measure_batch(b.delivered, "batch-delta", &command, &env).await
        }
    })
    .await?;
    let disk_per_order = directory_bytes(&table(0))? as f64 / b.delivered.max(1) as f64;
    // `compact` rewrites each day once for the years it is kept (zstd 9, larger pages); vacuum
    // with no retention then deletes the files it replaced.
    let env = [("ARCHIVE_SINK", "delta".to_owned()), ("ARCHIVE_TABLE_URI", table(0).display().to_string())];
    b.archiver.run_measured("compact", &["compact"], &env).await?;
    b.archiver.run_measured("vacuum", &["vacuum", "--retention-days", "0"], &env).await?;
    let compacted_per_order = directory_bytes(&table(0))? as f64 / b.delivered.max(1) as f64;
    let section = format!("9. lake: {} delivered orders into a Delta table on the local disk", b.delivered);
    let into_collection = report.throughput(&section, "archiver batch into the archive collection", &collection);
    let into_table = report.throughput(&section, "archiver batch into a Delta table (ARCHIVE_SINK=delta)", &lake);
    let read = report.throughput(&section, "the orders read and joined as batch does, written nowhere", &read);
    let sink_limit = report.throughput(
        &section,
        "Delta sink limit: the finished documents read and appended to a table, no enrichment (in-process)",
        &sink_limit,
    );
    report.row(
        &section,
        "archiver's own CPU, batch into the table",
        "µs/order",
        summarize(&lake, BatchRun::archiver_us_per_order),
    );
    report.row(&section, "archiver peak RSS, batch into the table", "MB", summarize(&lake, BatchRun::peak_rss_mb));
    report.row(&section, "table bytes on disk per order (data and log)", "bytes", Summary::of(vec![disk_per_order]));
    report.row(&section, "archive collection BSON bytes per order", "bytes", Summary::of(vec![bson_per_order]));
    report.ratio("batch into a Delta table / batch into the collection", into_table, into_collection);
    report.ratio("batch into a Delta table / read and join, written nowhere", into_table, read);
    report.ratio("batch into a Delta table / Delta sink limit", into_table, sink_limit);
    report.row(&section, "table bytes on disk per order, compacted", "bytes", Summary::of(vec![compacted_per_order]));
    report.ratio("table bytes per order / collection BSON bytes per order", disk_per_order, bson_per_order);
    report.ratio(
        "compacted table bytes per order / collection BSON bytes per order",
        compacted_per_order,
        bson_per_order,
    );
    report.target(
        "lake: batch into a Delta table / into the collection",
        into_table / into_collection,
        Goal::AtLeast,
        1.5,
        "×",
    );
    report.target("lake: batch into a Delta table / read and join", into_table / read, Goal::AtLeast, 0.8, "×");
    report.target(
        "lake: batch into a Delta table / Delta sink limit",
        into_table / sink_limit,
        Goal::AtLeast,
        0.8,
        "×",
    );
    report.target(
        "lake: table bytes per order / collection BSON bytes per order",
        disk_per_order / bson_per_order,
        Goal::AtMost,
        0.25,
        "×",
    );
    Ok(())
}

/// Bytes of the files under `dir`.
fn directory_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() { directory_bytes(&entry.path())? } else { entry.metadata()?.len() };
    }
    Ok(total)
}

async fn mean_raw_size(collection: &Collection<Document>, filter: Document) -> anyhow::Result<f64> {
    let (count, bytes) = collection
        .clone_with_type::<RawDocumentBuf>()
        .find(filter)
        .await?
        .try_fold((0u64, 0u64), |(count, bytes), d| async move { Ok((count + 1, bytes + d.as_bytes().len() as u64)) })
        .await?;
    Ok(bytes as f64 / count.max(1) as f64)
}

/// The targets of the issue, from this run's figures.
fn targets(report: &mut Report, f: &Figures) {
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map_or(f64::NAN, |(a, b)| a / b);
    report.target("batch (client) / L1", ratio(f.batch, f.l1), Goal::AtLeast, 1.2, "×");
    report.target("batch (client) / L0", ratio(f.batch, f.l0), Goal::AtLeast, 0.3, "×");
    report.target("batch (client) / L0e", ratio(f.batch, f.l0e), Goal::AtLeast, 0.6, "×");
    report.target("watch / bare reader", ratio(f.watch, f.bare_reader), Goal::AtLeast, 0.7, "×");
    report.target("watch, live / batch (client)", ratio(f.watch, f.batch), Goal::AtLeast, 0.9, "×");
    report.target("watch, catching up / batch (client)", ratio(f.watch_catch_up, f.batch), Goal::AtLeast, 0.9, "×");
    let figure = |v: Option<f64>| v.unwrap_or(f64::NAN);
    report.target("archiver's own CPU, batch (defaults)", figure(f.batch_archiver_us), Goal::AtMost, 25.0, "µs/order");
    report.target("archiver's own CPU, watch", figure(f.watch_archiver_us), Goal::AtMost, 25.0, "µs/order");
    report.target("watch latency p99 at the paced rate", figure(f.latency_p99_ms), Goal::AtMost, 100.0, "ms");
    report.target("watch peak RSS", figure(f.watch_peak_rss_mb), Goal::AtMost, 40.0, "MB");
    report.target("batch (client) / naive", ratio(f.batch, f.naive), Goal::AtLeast, 5.0, "×");
}

/// Facts about the machine that explain noisy figures.
fn describe_machine(report: &mut Report, when: &str) {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    report.context(&format!("loadavg_{when}"), loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let mut report = Report::default();
    report.context("settings", &settings);
    report.context("cpus", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    report.context("started_at", Utc::now().to_rfc3339());
    describe_machine(&mut report, "start");
    let out = settings.out.clone();
    let started = Instant::now();

    let bench = Bench::setup(settings).await?;
    let server = bench.orders.client().database("admin").run_command(doc! { "buildInfo": 1 }).await?;
    report.context("server_version", server.get_str("version").unwrap_or("unknown"));

    let mut figures = Figures::default();
    let s = &bench.settings;
    if s.wants("batch") {
        case_batch(&bench, &mut report, &mut figures).await?;
    }
    if s.wants("stages") {
        case_stages(&bench, &mut report).await?;
    }
    if s.wants("sweep") {
        case_sweep(&bench, &mut report).await?;
    }
    if s.wants("naive") {
        case_naive(&bench, &mut report, &mut figures).await?;
    }
    if s.wants("watch") {
        case_watch(&bench, &mut report, &mut figures).await?;
    }
    if s.wants("latency") {
        case_latency(&bench, &mut report, &mut figures).await?;
    }
    if s.wants("scaling") {
        case_scaling(&bench, &mut report).await?;
    }
    if s.wants("lake") {
        case_lake(&bench, &mut report).await?;
    }
    targets(&mut report, &figures);
    describe_machine(&mut report, "end");
    report.context("duration_secs", started.elapsed().as_secs_f64());
    let fact =
        |key: &str| report.context.get(key).map(|v| v.to_string().trim_matches('"').to_owned()).unwrap_or_default();
    let load = format!(
        "load average {} at start, {} at end ({} CPUs): figures are only comparable within one run",
        fact("loadavg_start"),
        fact("loadavg_end"),
        fact("cpus")
    );
    report.note(load);

    print!("{}", report.render());
    report.write_json(&out)?;
    println!("\nJSON: {}", out.display());
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let uri = match std::env::var("BENCH_URI") {
        Ok(uri) if !uri.is_empty() => uri,
        // `cargo test --all-targets` runs this harness-less bench too: nothing to do there.
        _ if !std::env::args().any(|a| a == "--bench") => {
            eprintln!("pipeline bench: BENCH_URI is not set; nothing to do (run scripts/bench.sh)");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("pipeline bench: BENCH_URI is not set; run scripts/bench.sh, which starts a server and sets it");
            return ExitCode::from(2);
        }
    };
    let result = match Settings::from_env(uri) {
        Ok(settings) => run(settings).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipeline bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
