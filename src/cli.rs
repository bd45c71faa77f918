//! Command-line definitions (clap) and their translation into configuration overrides.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, LogFormat, Overrides, WritePath};

const EXIT_CODES: &str = "\
Exit codes:
  0  success (watch: stopped by SIGINT/SIGTERM after saving its position)
  1  failure (database unreachable after retries, unexpected error)
  2  usage or configuration error (nothing was done)
  3  resume token file corrupt, unreadable or unwritable (the file is left untouched)
  4  watch: the orders collection was dropped or renamed (change stream invalidated)
  5  watch: another instance holds the resume token file";

/// Archives delivered orders out of MongoDB, in real time or by date range, enriched with their
/// customer, courier, restaurant and menu items, exactly once.
#[derive(Debug, Parser)]
#[command(name = "archiver", version, after_long_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    /// Options shared by every command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Configuration file [default: config/archiver.toml when present].
    #[arg(long, env = "ARCHIVER_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Source MongoDB connection string [default: mongodb://localhost:27017].
    #[arg(long, env = "MONGODB_URI", global = true, hide_env_values = true, value_name = "URI")]
    pub uri: Option<String>,
    /// A file holding the source connection string (systemd's `LoadCredential=`, a Kubernetes or
    /// Docker secret), so that it never sits in the environment or on the command line.
    #[arg(long, env = "MONGODB_URI_FILE", global = true, value_name = "FILE", conflicts_with = "uri")]
    pub uri_file: Option<PathBuf>,
    /// Source database [default: livraison].
    #[arg(long = "db", env = "MONGODB_DB", global = true, value_name = "NAME")]
    pub database: Option<String>,
    /// Orders collection [default: Commandes].
    #[arg(long, env = "ORDERS_COLLECTION", global = true, value_name = "NAME")]
    pub orders_collection: Option<String>,
    /// Status value of a delivered order [default: livrée].
    #[arg(long, env = "DELIVERED_STATUS", global = true, value_name = "VALUE")]
    pub delivered_status: Option<String>,
    /// Archive deployment, when not the source one.
    #[arg(long, env = "ARCHIVE_URI", global = true, hide_env_values = true, value_name = "URI")]
    pub archive_uri: Option<String>,
    /// A file holding the archive's connection string (as `--uri-file`).
    #[arg(long, env = "ARCHIVE_URI_FILE", global = true, value_name = "FILE", conflicts_with = "archive_uri")]
    pub archive_uri_file: Option<PathBuf>,
    /// Archive database [default: the source database].
    #[arg(long, env = "ARCHIVE_DB", global = true, value_name = "NAME")]
    pub archive_db: Option<String>,
    /// Archive collection [default: Commandes_archive].
    #[arg(long, env = "ARCHIVE_COLLECTION", global = true, value_name = "NAME")]
    pub archive_collection: Option<String>,
    /// Dead-letter collection for orders the archive refuses [default: Commandes_archive_errors].
    #[arg(long, env = "ARCHIVE_ERRORS_COLLECTION", global = true, value_name = "NAME")]
    pub archive_errors_collection: Option<String>,
    /// Customer collection [default: Client].
    #[arg(long, env = "CLIENT_COLLECTION", global = true, value_name = "NAME")]
    pub client_collection: Option<String>,
    /// Courier collection [default: Livreur].
    #[arg(long, env = "LIVREUR_COLLECTION", global = true, value_name = "NAME")]
    pub livreur_collection: Option<String>,
    /// Restaurant collection [default: Restaurants].
    #[arg(long, env = "RESTAURANTS_COLLECTION", global = true, value_name = "NAME")]
    pub restaurants_collection: Option<String>,
    /// Menu collection [default: Menu].
    #[arg(long, env = "MENU_COLLECTION", global = true, value_name = "NAME")]
    pub menu_collection: Option<String>,
    /// Retries of a transient database error before giving up (`watch` keeps trying database
    /// outages) [default: 10].
    #[arg(long, env = "RETRY_MAX_ATTEMPTS", global = true, value_name = "N")]
    pub retry_max_attempts: Option<usize>,
    /// Longest delay between two retries, jitter included, in milliseconds [default: 30000].
    #[arg(long, env = "RETRY_MAX_DELAY_MS", global = true, value_name = "MS")]
    pub retry_max_delay_ms: Option<u64>,
    /// No retry starts after this long since the first attempt, in milliseconds; 0: no limit
    /// [default: 60000]. Bounds `batch`, `verify`, `health`, `simulate` (`watch` keeps trying).
    #[arg(long, env = "RETRY_MAX_ELAPSED_MS", global = true, value_name = "MS")]
    pub retry_max_elapsed_ms: Option<u64>,
    /// Directory of the daily log files; empty disables them [default: logs, or none when
    /// standard error goes to the systemd journal].
    #[arg(long, env = "LOG_DIR", global = true, value_name = "DIR")]
    pub log_dir: Option<String>,
    /// Daily log files kept, today's included; older ones are deleted; 0 keeps them all
    /// [default: 14].
    #[arg(long, env = "LOG_RETENTION_DAYS", global = true, value_name = "DAYS")]
    pub log_retention_days: Option<usize>,
    /// Log format [default: text].
    #[arg(long, env = "LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// How orders are joined with their references: `join` (batched reads, joined by archiver)
    /// or `lookup` (the server's $lookup pipeline) [default: join].
    #[arg(long, env = "ENRICH_MODE", global = true, value_enum)]
    pub enrich_mode: Option<crate::config::EnrichMode>,
    /// Most references kept once read (batch: for the run; watch: until its stream says they
    /// changed); 0: read them for every chunk or batch [default: 100000].
    #[arg(long, env = "REFERENCE_CACHE_ENTRIES", global = true, value_name = "N")]
    pub reference_cache_entries: Option<usize>,
    /// Split the orders into N partitions by id; this worker handles --partition (watch, batch).
    #[arg(long, env = "PARTITIONS", global = true, value_name = "N")]
    pub partitions: Option<u32>,
    /// This worker's partition, from 0 to N-1.
    #[arg(long, env = "PARTITION", global = true, value_name = "I")]
    pub partition: Option<u32>,
    /// The archive's store: `mongodb` (a collection) or `delta` (a Delta Lake table at
    /// ARCHIVE_TABLE_URI) [default: mongodb].
    #[arg(long, env = "ARCHIVE_SINK", global = true, value_enum)]
    pub archive_sink: Option<crate::config::ArchiveSink>,
    /// The Delta table of the archive: `file:///var/lib/archiver/orders` or a local path.
    #[arg(long, env = "ARCHIVE_TABLE_URI", global = true, value_name = "URI")]
    pub archive_table_uri: Option<String>,
    /// Rows are committed to the Delta table once this many megabytes of them wait [default: 128].
    #[arg(long, env = "LAKE_FILE_MB", global = true, value_name = "MB")]
    pub lake_file_mb: Option<usize>,
    /// Rows waiting are committed to the Delta table at least this often [default: 60].
    #[arg(long, env = "LAKE_COMMIT_SECS", global = true, value_name = "SECS")]
    pub lake_commit_secs: Option<u64>,
    /// Log level or filter, used when RUST_LOG is unset [default: info].
    #[arg(long, env = "LOG_LEVEL", global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Archive delivered orders in real time from a change stream (a long-running service).
    Watch(WatchArgs),
    /// Archive the delivered orders of a date range (for cron); safe to run twice.
    #[command(after_long_help = BATCH_HELP)]
    Batch(BatchArgs),
    /// Seed realistic fake data, or keep delivering orders live, for development and demos.
    Simulate(SimulateArgs),
    /// Compare the delivered orders of a date range with the archive; --repair archives what is
    /// missing. Exit codes: 0 consistent, 1 different (or failed), 2 usage error.
    Verify(VerifyArgs),
    /// Check the source, the archive and the token file once; print a JSON report. Exit codes:
    /// 0 healthy, 1 not.
    Health(HealthArgs),
    /// Delete from the orders collection the delivered orders older than a bound whose archive
    /// copy exists and still matches them (a verified move). Exit codes: 0 done, 6 done but some
    /// orders were kept (changed since archived, or missing from the archive), 1 failure, 2 usage
    /// error. Run it with --dry-run first.
    #[command(after_long_help = PURGE_HELP)]
    Purge(PurgeArgs),
    /// Delta table (ARCHIVE_SINK=delta): rewrite each day's small files into one, data
    /// unchanged, and checkpoint the table's log. Safe while watch and batch write.
    Compact(CompactArgs),
    /// Delta table (ARCHIVE_SINK=delta): delete the data files no longer referenced (replaced by
    /// a compaction, or left by a commit that lost a race) once older than the retention.
    Vacuum(VacuumArgs),
    /// Check the configuration and the deployment it points at, show the values in effect, or
    /// print the reference of every setting.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `archiver config`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and the deployment it points at, reading only: the source, the
    /// orders collection and status, the privileges for change streams and the references, the
    /// checkpoint, the oplog window, the archive's indexes or table. One line per check (ok, warn,
    /// FAIL). Exit codes: 0 no check failed (warnings allowed), 1 a check failed, 2 configuration
    /// error.
    Check,
    /// Print the configuration in effect, every layer applied, each value with where it comes
    /// from (default, the file, an ARCHIVER_* or named variable, a flag); passwords masked.
    Show,
    /// Print the reference of every setting (key, variables, type, default, meaning) as Markdown.
    Reference,
}

const PURGE_HELP: &str = "Examples:
  archiver purge --older-than 90d --dry-run          # what would be deleted, and what kept
  archiver purge --older-than 90d --backup purged.jsonl
  archiver purge --older-than 2026-01-01 --date-from 2025-01-01 --max-per-sec 200
The bound applies to date_commande, like batch's range. Only orders whose archive document
exists and matches them are deleted, each re-checked in its own delete filter; the others are
reported, never deleted (verify --repair archives the missing ones, --rearchive replaces the
archive copy of changed ones first).";

/// `archiver purge`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Delete orders placed before this: a span before now (90d, 24h) or a date (YYYY-MM-DD,
    /// RFC 3339). Never in the future.
    #[arg(long, value_name = "SPAN|DATE")]
    pub older_than: String,
    /// Only orders placed on or after this date [default: no lower bound].
    #[arg(long, value_name = "DATE")]
    pub date_from: Option<String>,
    /// Count and list what would be deleted and what kept; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Orders verified and deleted at once.
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub batch_size: usize,
    /// Most deletions per second, on average (0: no limit), so that the primary is not hammered.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_per_sec: u64,
    /// Append the deleted orders to FILE first, as JSON Lines in canonical extended JSON,
    /// fsynced before each delete.
    #[arg(long, value_name = "FILE")]
    pub backup: Option<PathBuf>,
    /// Replace the archive copy of an order changed since it was archived, then purge it.
    #[arg(long)]
    pub rearchive: bool,
}

/// `archiver health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The resume token file to inspect [default: .resume_token.json].
    #[arg(long, env = "RESUME_TOKEN_FILE", value_name = "FILE")]
    pub resume_token_file: Option<PathBuf>,
    /// Where `watch` keeps its checkpoint: `file` or `mongodb` (the shared collection, with
    /// the lease) [default: file].
    #[arg(long, env = "CHECKPOINT_STORE", value_enum)]
    pub checkpoint_store: Option<crate::config::CheckpointStoreKind>,
    /// Name of the stream in the shared store, as given to `watch`.
    #[arg(long, env = "STREAM_NAME", value_name = "NAME")]
    pub stream_name: Option<String>,
    /// Report a warning when the saved position would leave the source oplog within this many
    /// seconds [default: 21600].
    #[arg(long, env = "OPLOG_HEADROOM_WARN_SECS", value_name = "SECS")]
    pub oplog_headroom_warn_secs: Option<u64>,
    /// Ask the running `watch` instead, at its `HTTP_ADDR`: `live` (its `/health/live`) or
    /// `ready` (`/health/ready`). Exit 0 when it answers 200, 1 otherwise (no answer within 5 s
    /// included); the deployments are not checked. For a container's health check, which must
    /// judge the process, not the databases it rides out.
    #[arg(long, value_enum, value_name = "PROBE")]
    pub probe: Option<crate::config::Probe>,
    /// Where the running `watch` serves its probes [default: 127.0.0.1:9464].
    #[arg(long, env = "HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<String>,
}

/// `archiver verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// First order date to check (inclusive); same forms as `batch`.
    #[arg(long, value_name = "DATE")]
    pub date_from: String,
    /// End of the range (exclusive) [default: no end].
    #[arg(long, value_name = "DATE")]
    pub date_to: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Archive the delivered orders found missing.
    #[arg(long)]
    pub repair: bool,
}

/// `archiver compact`.
#[derive(Debug, Args)]
pub struct CompactArgs {
    /// First delivery day to compact (YYYY-MM-DD, UTC) [default: the first].
    #[arg(long, value_name = "DATE")]
    pub date_from: Option<chrono::NaiveDate>,
    /// Last delivery day to compact, inclusive [default: the last].
    #[arg(long, value_name = "DATE")]
    pub date_to: Option<chrono::NaiveDate>,
}

/// `archiver vacuum`.
#[derive(Debug, Args)]
pub struct VacuumArgs {
    /// Keep files a compaction replaced for this many days after it (readers of an older
    /// version may still need them). Files no commit references are kept at least 24 hours
    /// whatever the retention: they may be a commit in progress.
    #[arg(long, value_name = "DAYS", default_value_t = 7)]
    pub retention_days: u32,
}

const BATCH_HELP: &str = "\
Dates (--date-from, --date-to; UTC):
  YYYY-MM-DD             midnight at the start of that day
  RFC 3339 date-time     e.g. 2026-11-20T08:00:00Z or 2026-11-20T09:00:00+01:00
  today, yesterday       midnight at the start of that day
  7d, 24h, 30m           that long before now

Examples:
  archiver batch --date-from yesterday --date-to today     # every night from cron
  archiver batch --date-from 2020-01-01                    # the whole history, once
  archiver batch --date-from 7d --dry-run                  # what would be archived

Exit codes: 0 success, 1 failure, 2 usage or configuration error (nothing written).";

/// `archiver watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Most events enriched and written together [default: 500].
    #[arg(long, env = "BATCH_SIZE", value_name = "N")]
    pub batch_size: Option<usize>,
    /// Longest time, in milliseconds, a batch waits to fill up [default: 100].
    #[arg(long, env = "BATCH_MAX_WAIT_MS", value_name = "MS")]
    pub batch_max_wait_ms: Option<u64>,
    /// Most bytes of archive documents enriched and written at once; a larger batch is written
    /// in slices [default: 16777216].
    #[arg(long, env = "BATCH_MAX_BYTES", value_name = "BYTES")]
    pub batch_max_bytes: Option<u64>,
    /// The resume token file [default: .resume_token.json].
    #[arg(long, env = "RESUME_TOKEN_FILE", value_name = "FILE")]
    pub resume_token_file: Option<PathBuf>,
    /// Address of /health/live, /health/ready, /health/startup and /metrics; `off` disables
    /// them [default: 127.0.0.1:9464].
    #[arg(long, env = "HTTP_ADDR", value_name = "HOST:PORT|off")]
    pub http_addr: Option<String>,
    /// Where checkpoints live: `file` (RESUME_TOKEN_FILE, one process) or `mongodb` (shared by
    /// several processes, one of which leads through a lease) [default: file].
    #[arg(long, env = "CHECKPOINT_STORE", value_enum)]
    pub checkpoint_store: Option<crate::config::CheckpointStoreKind>,
    /// Name of the stream in the shared store, plus #IofN when partitioned [default:
    /// db.collection].
    #[arg(long, env = "STREAM_NAME", value_name = "NAME")]
    pub stream_name: Option<String>,
    /// This process's name in the lease [default: host:pid].
    #[arg(long, env = "INSTANCE_ID", value_name = "NAME")]
    pub instance_id: Option<String>,
    /// Lease time to live, in milliseconds: a standby takes over about this long after the
    /// leader dies [default: 5000].
    #[arg(long, env = "LEASE_TTL_MS", value_name = "MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Lease renewal interval, in milliseconds [default: 1000].
    #[arg(long, env = "LEASE_RENEW_MS", value_name = "MS")]
    pub lease_renew_ms: Option<u64>,
    /// How long the change stream may stay silent beyond its await time before readiness turns
    /// 503 (six times as long: reopened), in milliseconds [default: 10000].
    #[arg(long, env = "STREAM_TIMEOUT_MS", value_name = "MS")]
    pub stream_timeout_ms: Option<u64>,
    /// Longest an archive write or checkpoint save may go unanswered before it is abandoned and
    /// retried, in milliseconds [default: 60000].
    #[arg(long, env = "WRITE_TIMEOUT_MS", value_name = "MS")]
    pub write_timeout_ms: Option<u64>,
    /// With work pending, how long without progress before /health/live answers 503 and the
    /// systemd watchdog stops being pinged, in milliseconds [default: 120000].
    #[arg(long, env = "LIVENESS_TIMEOUT_MS", value_name = "MS")]
    pub liveness_timeout_ms: Option<u64>,
    /// Warn when the saved position would leave the source oplog within this many seconds of a
    /// stop [default: 21600].
    #[arg(long, env = "OPLOG_HEADROOM_WARN_SECS", value_name = "SECS")]
    pub oplog_headroom_warn_secs: Option<u64>,
    /// Where to start when there is no resume token: `now` or an RFC 3339 time (within the
    /// oplog window). Refused when a token exists, unless --reset-token is given too.
    #[arg(long, value_name = "now|TIME")]
    pub start_at: Option<String>,
    /// Before streaming, archive every delivered order not yet in the archive.
    #[arg(long)]
    pub catch_up: bool,
    /// Delete the resume token file before starting. Never done otherwise.
    #[arg(long)]
    pub reset_token: bool,
}

/// `archiver batch`.
#[derive(Debug, Args)]
pub struct BatchArgs {
    /// First order date to archive (inclusive), on the orders' `date_commande`.
    #[arg(long, value_name = "DATE")]
    pub date_from: String,
    /// End of the range (exclusive) [default: no end].
    #[arg(long, value_name = "DATE")]
    pub date_to: Option<String>,
    /// How the archive is written: `client` (bulk writes; also to another cluster) or `server`
    /// (`$merge`, same cluster only) [default: from config, client].
    #[arg(long, value_enum, env = "BATCH_WRITE_PATH")]
    pub write_path: Option<WritePath>,
    /// Orders per chunk [default: 1000].
    #[arg(long, env = "BATCH_CHUNK_SIZE", value_name = "N")]
    pub chunk_size: Option<usize>,
    /// Chunks processed at once [default: 4].
    #[arg(long, env = "BATCH_CONCURRENCY", value_name = "N")]
    pub concurrency: Option<usize>,
    /// Count what would be archived and show a few enriched samples; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also write --sample-size enriched documents to FILE, as a JSON array in canonical extended
    /// JSON, for inspection (with --dry-run, the archive is left untouched).
    #[arg(long, value_name = "FILE")]
    pub export_samples: Option<PathBuf>,
    /// How many samples to show or export.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub sample_size: usize,
    /// Do not create the indexes archiver relies on (for users without createIndex rights).
    #[arg(long, env = "SKIP_INDEXES")]
    pub skip_indexes: bool,
    /// Record each run's outcome (and the last success) in this Prometheus text file, for
    /// node_exporter's textfile collector: `<dir>/archiver_batch.prom`.
    #[arg(long, env = "BATCH_METRICS_FILE", value_name = "FILE")]
    pub metrics_file: Option<String>,
}

/// `archiver simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Orders to create when seeding (0: only the reference collections, when missing).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub count: u64,
    /// Random seed: the same seed (with the same --end-date) gives the same data, ids included
    /// [default: random, logged].
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,
    /// Fraction of seeded orders already delivered (0 to 1).
    #[arg(long, value_name = "P", default_value_t = 0.4)]
    pub p_delivered: f64,
    /// Order dates are spread over this many days, ending at --end-date.
    #[arg(long, value_name = "DAYS", default_value_t = 30)]
    pub days: u32,
    /// End of the order dates (exclusive, midnight UTC) [default: the start of today, UTC].
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub end_date: Option<chrono::NaiveDate>,
    /// Drop the simulated collections first: the orders, the four reference collections, the
    /// archive and its dead-letter collection (never done unless asked).
    #[arg(long)]
    pub drop: bool,
    /// After seeding, keep moving orders through their statuses, creating new ones as it goes.
    #[arg(long)]
    pub live: bool,
    /// Live mode: status changes per second, about.
    #[arg(long, value_name = "N", default_value_t = 10.0)]
    pub rate: f64,
    /// Live mode: stop after this many seconds [default: until Ctrl-C].
    #[arg(long, value_name = "SECS", requires = "live")]
    pub duration: Option<u64>,
}

impl Cli {
    /// The flags and named environment variables as the top configuration layer; a connection
    /// string given by a file is read here.
    pub fn overrides(&self) -> Result<Overrides, ConfigError> {
        let g = &self.global;
        let mut o = Overrides::default();
        let uri = match &g.uri_file {
            Some(path) => Some(read_secret_file("MONGODB_URI_FILE", path)?),
            None => g.uri.clone(),
        };
        let archive_uri = match &g.archive_uri_file {
            Some(path) => Some(read_secret_file("ARCHIVE_URI_FILE", path)?),
            None => g.archive_uri.clone(),
        };
        o.named("MONGODB_URI", uri);
        o.named("MONGODB_DB", g.database.clone());
        o.named("ORDERS_COLLECTION", g.orders_collection.clone());
        o.named("DELIVERED_STATUS", g.delivered_status.clone());
        o.named("ARCHIVE_URI", archive_uri);
        o.named("ARCHIVE_DB", g.archive_db.clone());
        o.named("ARCHIVE_COLLECTION", g.archive_collection.clone());
        o.named("ARCHIVE_ERRORS_COLLECTION", g.archive_errors_collection.clone());
        o.named("CLIENT_COLLECTION", g.client_collection.clone());
        o.named("LIVREUR_COLLECTION", g.livreur_collection.clone());
        o.named("RESTAURANTS_COLLECTION", g.restaurants_collection.clone());
        o.named("MENU_COLLECTION", g.menu_collection.clone());
        o.named("RETRY_MAX_ATTEMPTS", g.retry_max_attempts);
        o.named("RETRY_MAX_DELAY_MS", g.retry_max_delay_ms);
        o.named("RETRY_MAX_ELAPSED_MS", g.retry_max_elapsed_ms);
        o.named("LOG_DIR", g.log_dir.clone());
        o.named("LOG_RETENTION_DAYS", g.log_retention_days);
        o.named("ARCHIVE_SINK", g.archive_sink);
        o.named("ARCHIVE_TABLE_URI", g.archive_table_uri.clone());
        o.named("LAKE_FILE_MB", g.lake_file_mb);
        o.named("LAKE_COMMIT_SECS", g.lake_commit_secs);
        o.named("LOG_FORMAT", g.log_format);
        o.named("LOG_LEVEL", g.log_level.clone());
        o.named("ENRICH_MODE", g.enrich_mode);
        o.named("REFERENCE_CACHE_ENTRIES", g.reference_cache_entries);
        o.named("PARTITIONS", g.partitions);
        o.named("PARTITION", g.partition);
        match &self.command {
            Command::Watch(w) => {
                o.named("BATCH_SIZE", w.batch_size);
                o.named("BATCH_MAX_WAIT_MS", w.batch_max_wait_ms);
                o.named("BATCH_MAX_BYTES", w.batch_max_bytes);
                o.named("RESUME_TOKEN_FILE", w.resume_token_file.clone());
                o.named("HTTP_ADDR", w.http_addr.clone());
                o.named("STREAM_TIMEOUT_MS", w.stream_timeout_ms);
                o.named("WRITE_TIMEOUT_MS", w.write_timeout_ms);
                o.named("LIVENESS_TIMEOUT_MS", w.liveness_timeout_ms);
                o.named("OPLOG_HEADROOM_WARN_SECS", w.oplog_headroom_warn_secs);
                o.named("CHECKPOINT_STORE", w.checkpoint_store);
                o.named("STREAM_NAME", w.stream_name.clone());
                o.named("INSTANCE_ID", w.instance_id.clone());
                o.named("LEASE_TTL_MS", w.lease_ttl_ms);
                o.named("LEASE_RENEW_MS", w.lease_renew_ms);
            }
            Command::Batch(b) => {
                o.named("BATCH_WRITE_PATH", b.write_path);
                o.named("BATCH_CHUNK_SIZE", b.chunk_size);
                o.named("BATCH_CONCURRENCY", b.concurrency);
                o.named("SKIP_INDEXES", b.skip_indexes.then_some(false));
                o.named("BATCH_METRICS_FILE", b.metrics_file.clone());
            }
            Command::Health(h) => {
                o.named("RESUME_TOKEN_FILE", h.resume_token_file.clone());
                o.named("CHECKPOINT_STORE", h.checkpoint_store);
                o.named("STREAM_NAME", h.stream_name.clone());
                o.named("OPLOG_HEADROOM_WARN_SECS", h.oplog_headroom_warn_secs);
                o.named("HTTP_ADDR", h.http_addr.clone());
            }
            Command::Simulate(_)
            | Command::Verify(_)
            | Command::Purge(_)
            | Command::Compact(_)
            | Command::Vacuum(_) => {}
            Command::Config(_) => {
                // What the service would read: the variables of `watch` and `batch` too, parsed
                // by their own definitions.
                for args in [&["archiver", "watch"][..], &["archiver", "batch", "--date-from", "today"]] {
                    let other = Cli::try_parse_from(args).map_err(|e| {
                        ConfigError(
                            e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_owned(),
                        )
                    })?;
                    merge_missing(&mut o.0, other.overrides()?.0);
                }
            }
        }
        Ok(o)
    }
}

/// Adds to `into` what `from` sets and `into` does not.
fn merge_missing(
    into: &mut serde_json::Map<String, serde_json::Value>,
    from: serde_json::Map<String, serde_json::Value>,
) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(serde_json::Value::Object(inner)), serde_json::Value::Object(more)) => merge_missing(inner, more),
            (Some(_), _) => {}
            (None, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// For each configuration key set by a named variable or a flag in `matches` (parsed from
/// [`Cli`]), which one: `MONGODB_DB`, or `flag --db`.
pub fn named_sources(matches: &clap::ArgMatches) -> std::collections::BTreeMap<String, String> {
    use clap::parser::ValueSource;
    use clap::CommandFactory;
    let mut sources = std::collections::BTreeMap::new();
    let mut command = Cli::command();
    command.build();
    let mut level = Some((matches, &command));
    while let Some((found, definition)) = level {
        for arg in definition.get_arguments() {
            let Some(variable) = arg.get_env().and_then(|v| v.to_str()) else { continue };
            let Some(key) = crate::config::key_of_variable(variable) else { continue };
            let source = match found.value_source(arg.get_id().as_str()) {
                Some(ValueSource::CommandLine) => format!("flag --{}", arg.get_long().unwrap_or_default()),
                Some(ValueSource::EnvVariable) => variable.to_owned(),
                _ => continue,
            };
            sources.insert(key.to_owned(), source);
        }
        level = found.subcommand().and_then(|(name, sub)| definition.find_subcommand(name).map(|def| (sub, def)));
    }
    // `config` reads the variables of the other commands too (see `Cli::overrides`).
    if matches.subcommand_name() == Some("config") {
        for (variable, key) in crate::config::NAMED_VARIABLES {
            if std::env::var_os(variable).is_some() && !sources.contains_key(*key) {
                sources.insert((*key).to_owned(), (*variable).to_owned());
            }
        }
    }
    sources
}

/// The connection string in the file `path` named by `var`, without its final line break. The
/// errors name the file, never what it holds.
fn read_secret_file(var: &str, path: &std::path::Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{var}: cannot read {}: {}", path.display(), e.kind())))?;
    let value = text.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&text);
    if value.trim().is_empty() {
        return Err(ConfigError(format!("{var}: {} is empty", path.display())));
    }
    if value.contains('\n') {
        return Err(ConfigError(format!("{var}: {} holds more than one line (content not shown)", path.display())));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Every variable of a flag sets a key of the configuration (and so is in its reference),
    /// but for the configuration file's own.
    #[test]
    fn every_variable_of_a_flag_is_a_named_variable() {
        fn variables(command: &clap::Command, out: &mut Vec<String>) {
            for arg in command.get_arguments() {
                out.extend(arg.get_env().and_then(|v| v.to_str()).map(str::to_owned));
            }
            for sub in command.get_subcommands() {
                variables(sub, out);
            }
        }
        let mut found = Vec::new();
        variables(&Cli::command(), &mut found);
        for variable in found.iter().filter(|v| *v != "ARCHIVER_CONFIG") {
            assert!(crate::config::key_of_variable(variable).is_some(), "{variable} is not in NAMED_VARIABLES");
        }
        for (variable, _) in crate::config::NAMED_VARIABLES {
            assert!(found.iter().any(|v| v == variable), "{variable} is no flag's variable");
        }
    }
}
