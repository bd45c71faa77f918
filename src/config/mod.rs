//! One typed configuration, layered: built-in defaults → `config/archiver.toml` → generic
//! `ARCHIVER_SECTION__KEY` environment variables → the named environment variables and flags
//! (`MONGODB_URI`, `--batch-size`, …). A `.env` file is read into the environment first.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::redact::{has_unencoded_user_info, redact_invalid_uri, SecretUri};

pub mod reference;
pub mod sources;

/// Largest number of partitions (the partition key has 256 values).
pub const MAX_PARTITIONS: u32 = 256;

/// The file read when no `--config` / `ARCHIVER_CONFIG` is given (skipped if absent).
pub const DEFAULT_CONFIG_FILE: &str = "config/archiver.toml";

/// Everything `archiver` needs to know, after all layers are merged.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The source deployment.
    pub mongodb: MongoSettings,
    /// Where archive documents go.
    pub archive: ArchiveSettings,
    /// The orders collection and its field names.
    pub orders: OrderSettings,
    /// The reference collections joined into each archive document.
    pub lookups: Lookups,
    /// `archiver watch` settings.
    pub watch: WatchSettings,
    /// `archiver batch` settings.
    pub batch: BatchSettings,
    /// Retries of transient database errors.
    pub retry: RetrySettings,
    /// Logging.
    pub log: LogSettings,
    /// Connection settings applied over the URI's options.
    pub connection: ConnectionSettings,
    /// Several processes: shared checkpoints, leadership lease, partitions.
    pub coordination: CoordinationSettings,
    /// How orders are enriched.
    pub enrich: EnrichSettings,
    /// The Delta Lake table, when the archive is one (`ARCHIVE_SINK=delta`).
    pub lake: LakeSettings,
}

/// Which store the archive is.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveSink {
    /// A MongoDB collection (`ARCHIVE_COLLECTION`).
    #[default]
    Mongodb,
    /// A Delta Lake table (`ARCHIVE_TABLE_URI`).
    Delta,
}

/// The Delta Lake table of the archive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LakeSettings {
    /// The table's location (`ARCHIVE_TABLE_URI`): `file:///var/lib/archiver/orders`, or a path.
    pub table_uri: Option<String>,
    /// Rows are committed once this many megabytes of them wait (`LAKE_FILE_MB`).
    pub file_mb: usize,
    /// Rows waiting are committed at least this often, in seconds (`LAKE_COMMIT_SECS`).
    pub commit_secs: u64,
}

impl Default for LakeSettings {
    fn default() -> Self {
        LakeSettings { table_uri: None, file_mb: 128, commit_secs: 60 }
    }
}

/// How orders are joined with their references.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EnrichMode {
    /// Batched `_id $in` reads of the references, joined by `archiver` (same documents).
    #[default]
    Join,
    /// The `$lookup` aggregation pipeline, evaluated by the server.
    Lookup,
}

/// Enrichment settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EnrichSettings {
    /// `join` or `lookup` (`ENRICH_MODE`). The server path of `batch` ($merge) always uses the
    /// pipeline.
    pub mode: EnrichMode,
    /// Most references (customers, couriers, restaurants, menu entries) kept once read
    /// (`REFERENCE_CACHE_ENTRIES`): by `batch` for the rest of its run, by `watch` until its
    /// stream says they changed; 0 reads them for every chunk or batch.
    pub reference_cache_entries: usize,
}

impl Default for EnrichSettings {
    fn default() -> Self {
        EnrichSettings { mode: EnrichMode::default(), reference_cache_entries: 100_000 }
    }
}

/// Where `watch` keeps its checkpoint.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointStoreKind {
    /// The local resume token file (one process).
    #[default]
    File,
    /// A collection in the archive database, shared by several processes that elect one
    /// writer through a lease.
    Mongodb,
}

/// Coordination of several `archiver` processes through MongoDB.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinationSettings {
    /// `file` or `mongodb` (`CHECKPOINT_STORE`).
    pub checkpoint_store: CheckpointStoreKind,
    /// Shared checkpoints, in the archive database.
    pub checkpoint_collection: String,
    /// Leadership leases, in the archive database.
    pub lease_collection: String,
    /// What checkpoints and leases are keyed by (`STREAM_NAME`); default: the orders namespace,
    /// plus `#IofN` when partitioned.
    pub stream_name: String,
    /// This process's name in the lease (`INSTANCE_ID`); default: host name and pid.
    pub instance_id: String,
    /// How long a lease lasts without renewal (`LEASE_TTL_MS`): a standby takes over about this
    /// long after the leader dies.
    pub lease_ttl_ms: u64,
    /// Renewal (and standby polling) interval (`LEASE_RENEW_MS`).
    pub lease_renew_ms: u64,
    /// Number of partitions of the order ids (`PARTITIONS`).
    pub partitions: u32,
    /// This worker's partition, from 0 (`PARTITION`).
    pub partition: u32,
}

impl Default for CoordinationSettings {
    fn default() -> Self {
        CoordinationSettings {
            checkpoint_store: CheckpointStoreKind::File,
            checkpoint_collection: "archiver_checkpoints".to_owned(),
            lease_collection: "archiver_leases".to_owned(),
            stream_name: String::new(),
            instance_id: String::new(),
            lease_ttl_ms: 5000,
            lease_renew_ms: 1000,
            partitions: 1,
            partition: 0,
        }
    }
}

/// Driver settings that may also be given outside the URI (`MONGODB_*` variables); when set
/// they override the URI's own options, for both the source and the archive.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionSettings {
    /// Name shown in the server's logs and `currentOp` (`MONGODB_APP_NAME`).
    pub app_name: Option<String>,
    /// Largest connection pool per server (`MONGODB_MAX_POOL_SIZE`).
    pub max_pool_size: Option<u32>,
    /// Smallest connection pool per server (`MONGODB_MIN_POOL_SIZE`).
    pub min_pool_size: Option<u32>,
    /// TCP connect timeout (`MONGODB_CONNECT_TIMEOUT_MS`).
    pub connect_timeout_ms: Option<u64>,
    /// How long one attempt waits for a suitable server (`MONGODB_SERVER_SELECTION_TIMEOUT_MS`).
    pub server_selection_timeout_ms: Option<u64>,
    /// Use TLS (`MONGODB_TLS`).
    pub tls: Option<bool>,
    /// CA bundle to verify the server with (`MONGODB_TLS_CA_FILE`).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key, PEM (`MONGODB_TLS_CERT_KEY_FILE`).
    pub tls_cert_key_file: Option<PathBuf>,
    /// Wire compression, in order of preference: `zstd`, `zlib`, `snappy`
    /// (`MONGODB_COMPRESSORS=zstd,snappy`).
    pub compressors: Option<String>,
}

impl ConnectionSettings {
    /// The compressor names, in order of preference.
    pub fn compressor_names(&self) -> Vec<String> {
        self.compressors
            .iter()
            .flat_map(|list| list.split(','))
            .map(|name| name.trim().to_ascii_lowercase())
            .filter(|name| !name.is_empty())
            .collect()
    }
}

/// The named connection variables and their configuration keys.
pub const CONNECTION_ENV: &[(&str, &str)] = &[
    ("MONGODB_APP_NAME", "connection.app_name"),
    ("MONGODB_MAX_POOL_SIZE", "connection.max_pool_size"),
    ("MONGODB_MIN_POOL_SIZE", "connection.min_pool_size"),
    ("MONGODB_CONNECT_TIMEOUT_MS", "connection.connect_timeout_ms"),
    ("MONGODB_SERVER_SELECTION_TIMEOUT_MS", "connection.server_selection_timeout_ms"),
    ("MONGODB_TLS", "connection.tls"),
    ("MONGODB_TLS_CA_FILE", "connection.tls_ca_file"),
    ("MONGODB_TLS_CERT_KEY_FILE", "connection.tls_cert_key_file"),
    ("MONGODB_COMPRESSORS", "connection.compressors"),
];

/// The source deployment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MongoSettings {
    /// Connection string (`MONGODB_URI`). Never displayed unredacted.
    pub uri: SecretUri,
    /// Database holding the orders and reference collections (`MONGODB_DB`).
    pub database: String,
}

/// Where archive documents go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveSettings {
    /// Another deployment for the archive (`ARCHIVE_URI`); the source one when unset.
    pub uri: Option<SecretUri>,
    /// Archive database (`ARCHIVE_DB`); the source database when unset.
    pub database: Option<String>,
    /// Archive collection (`ARCHIVE_COLLECTION`).
    pub collection: String,
    /// Dead-letter collection for orders the archive refuses (`ARCHIVE_ERRORS_COLLECTION`).
    pub errors_collection: String,
    /// The store: `mongodb` (this collection) or `delta` (a Delta Lake table) (`ARCHIVE_SINK`).
    pub sink: ArchiveSink,
}

/// The orders collection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct OrderSettings {
    /// Collection name (`ORDERS_COLLECTION`).
    pub collection: String,
    /// The `status` value that makes an order delivered (`DELIVERED_STATUS`).
    pub delivered_status: String,
    /// Source field names.
    pub fields: OrderFields,
}

/// Names of the order fields in the source; the archive always uses the names of schema.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct OrderFields {
    /// Order status.
    pub status: String,
    /// Human order number.
    pub numero_commande: String,
    /// When the order was placed: what `batch` selects on.
    pub date_commande: String,
    /// When it was delivered.
    pub date_livraison: String,
    /// Order total.
    pub montant_total: String,
    /// The array of ordered items.
    pub items: String,
    /// In each item, the reference to the menu entry.
    pub item_menu_id: String,
    /// In each item, the quantity.
    pub item_quantite: String,
}

/// One `$lookup` of a referenced document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LookupDef {
    /// The referenced collection.
    pub collection: String,
    /// The order field holding the reference (matched against the referenced `_id`).
    pub local_field: String,
    /// Fields copied from the referenced document into the archive.
    pub fields: Vec<String>,
}

/// The menu lookup, joined per item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MenuLookup {
    /// The menu collection.
    pub collection: String,
    /// Field of the dish name.
    pub nom_field: String,
    /// Field of the unit price.
    pub prix_field: String,
}

/// The reference collections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Lookups {
    /// Customer.
    pub client: LookupDef,
    /// Courier.
    pub livreur: LookupDef,
    /// Restaurant.
    pub restaurant: LookupDef,
    /// Menu entries of the items.
    pub menu: MenuLookup,
}

/// `archiver watch` settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct WatchSettings {
    /// Most events enriched and written together (`BATCH_SIZE`).
    pub batch_size: usize,
    /// Longest time the first event of a batch waits for others (`BATCH_MAX_WAIT_MS`).
    pub batch_max_wait_ms: u64,
    /// Most bytes of archive documents enriched and written at once (`BATCH_MAX_BYTES`); a
    /// larger batch is written in slices, its checkpoint saved after the last.
    pub batch_max_bytes: u64,
    /// The checkpoint file (`RESUME_TOKEN_FILE`).
    pub resume_token_file: PathBuf,
    /// When history is lost, the gap-fill re-examines orders delivered this long before the
    /// last checkpoint too, to absorb clock skew between the servers and `archiver`.
    pub gap_fill_margin_secs: u64,
    /// Address of the health and metrics endpoints (`HTTP_ADDR`); `off` disables them.
    pub http_addr: String,
    /// How long the change stream may stay silent beyond its await time before readiness turns
    /// 503; silent six times as long, it is reopened (`STREAM_TIMEOUT_MS`).
    pub stream_timeout_ms: u64,
    /// Longest an archive write or a checkpoint save may go unanswered before it is abandoned
    /// and retried; both are idempotent (`WRITE_TIMEOUT_MS`).
    pub write_timeout_ms: u64,
    /// With work pending, how long without progress before `/health/live` answers 503 and the
    /// systemd watchdog is no longer pinged, so that the service manager restarts a stuck
    /// process (`LIVENESS_TIMEOUT_MS`). Keep it above `write_timeout_ms` and the retry delay
    /// cap, which bound the time between two steps of a healthy pipeline.
    pub liveness_timeout_ms: u64,
    /// Below this much oplog headroom (how much longer `watch` could stop before its saved
    /// position leaves the source oplog), `watch` logs a warning and `health` reports it
    /// (`OPLOG_HEADROOM_WARN_SECS`).
    pub oplog_headroom_warn_secs: u64,
}

/// How `batch` writes the archive.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, schemars::JsonSchema, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WritePath {
    /// Stream the enriched documents to `archiver` and bulk-write them (works across clusters).
    Client,
    /// Let the server write them with `$merge` (same cluster only).
    Server,
}

/// `archiver batch` settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BatchSettings {
    /// Orders per chunk.
    pub chunk_size: usize,
    /// Chunks in flight at once.
    pub concurrency: usize,
    /// Default write path.
    pub write_path: WritePath,
    /// Whether to create the indexes `archiver` relies on (`SKIP_INDEXES=true` sets it to false).
    pub create_indexes: bool,
    /// A Prometheus text file where each run records its outcome and the last success, for
    /// node_exporter's textfile collector (`BATCH_METRICS_FILE`); unset: none.
    pub metrics_file: Option<String>,
}

/// Retries of transient errors: exponential backoff with jitter, bounded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts after the first failure before giving up (`RETRY_MAX_ATTEMPTS`).
    pub max_attempts: usize,
    /// First delay.
    pub initial_delay_ms: u64,
    /// Longest delay between two attempts, jitter included (`RETRY_MAX_DELAY_MS`).
    pub max_delay_ms: u64,
    /// No retry starts after this long since the first attempt (`RETRY_MAX_ELAPSED_MS`); 0: no
    /// limit. `watch` keeps retrying database outages regardless, as a service should.
    pub max_elapsed_ms: u64,
}

/// Console and file logging.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// Directory of the daily log files (`LOG_DIR`); empty disables file logging. Unset: `logs`,
    /// or no files when standard error goes to the systemd journal (`JOURNAL_STREAM`), which
    /// keeps the logs already.
    pub dir: Option<String>,
    /// Daily log files kept, today's included; older ones are deleted at start and at each
    /// rotation (`LOG_RETENTION_DAYS`); 0 keeps them all.
    pub retention_days: usize,
    /// `text` or `json` (`LOG_FORMAT`).
    pub format: LogFormat,
    /// Level or filter when `RUST_LOG` is unset (`LOG_LEVEL`).
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, schemars::JsonSchema, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl Default for MongoSettings {
    fn default() -> Self {
        MongoSettings { uri: SecretUri::new("mongodb://localhost:27017"), database: "livraison".to_owned() }
    }
}

impl Default for ArchiveSettings {
    fn default() -> Self {
        ArchiveSettings {
            uri: None,
            database: None,
            collection: "Commandes_archive".to_owned(),
            errors_collection: "Commandes_archive_errors".to_owned(),
            sink: ArchiveSink::Mongodb,
        }
    }
}

impl Default for OrderSettings {
    fn default() -> Self {
        OrderSettings {
            collection: "Commandes".to_owned(),
            delivered_status: "livrée".to_owned(),
            fields: OrderFields::default(),
        }
    }
}

impl Default for OrderFields {
    fn default() -> Self {
        OrderFields {
            status: "status".to_owned(),
            numero_commande: "numero_commande".to_owned(),
            date_commande: "date_commande".to_owned(),
            date_livraison: "date_livraison".to_owned(),
            montant_total: "montant_total".to_owned(),
            items: "items".to_owned(),
            item_menu_id: "menu_id".to_owned(),
            item_quantite: "quantite".to_owned(),
        }
    }
}

fn lookup(collection: &str, local_field: &str, fields: &[&str]) -> LookupDef {
    LookupDef {
        collection: collection.to_owned(),
        local_field: local_field.to_owned(),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
    }
}

impl Default for Lookups {
    fn default() -> Self {
        Lookups {
            client: lookup("Client", "client_id", &["nom", "prenom", "email", "telephone", "adresse"]),
            livreur: lookup("Livreur", "livreur_id", &["nom", "prenom", "telephone", "vehicule"]),
            restaurant: lookup("Restaurants", "restaurant_id", &["nom", "cuisine", "adresse"]),
            menu: MenuLookup::default(),
        }
    }
}

impl Default for MenuLookup {
    fn default() -> Self {
        MenuLookup { collection: "Menu".to_owned(), nom_field: "nom".to_owned(), prix_field: "prix".to_owned() }
    }
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            batch_size: 500,
            batch_max_wait_ms: 100,
            batch_max_bytes: 16 * 1024 * 1024,
            resume_token_file: PathBuf::from(".resume_token.json"),
            gap_fill_margin_secs: 3600,
            http_addr: "127.0.0.1:9464".to_owned(),
            stream_timeout_ms: 10_000,
            write_timeout_ms: 60_000,
            liveness_timeout_ms: 120_000,
            oplog_headroom_warn_secs: 6 * 3600,
        }
    }
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            chunk_size: 1000,
            concurrency: 4,
            write_path: WritePath::Client,
            create_indexes: true,
            metrics_file: None,
        }
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings { max_attempts: 10, initial_delay_ms: 250, max_delay_ms: 30_000, max_elapsed_ms: 60_000 }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { dir: None, retention_days: 14, format: LogFormat::Text, level: "info".to_owned() }
    }
}

/// A configuration that cannot be used; exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

/// The table locations this build writes: the local disk, S3 (and S3-compatible stores), Google
/// Cloud Storage and Azure (delta-rs's `s3`, `gcs` and `azure` features; only the first two are
/// tested here).
const TABLE_SCHEMES: &[&str] =
    &["file://", "s3://", "s3a://", "gs://", "az://", "adl://", "azure://", "abfs://", "abfss://"];

/// The named environment variables (each also a flag of the same meaning) and the configuration
/// key each sets, in the top layer. The `MONGODB_*` connection variables of [`CONNECTION_ENV`]
/// are read from the environment by the loader itself.
pub const NAMED_VARIABLES: &[(&str, &str)] = &[
    ("MONGODB_URI", "mongodb.uri"),
    ("MONGODB_URI_FILE", "mongodb.uri"),
    ("MONGODB_DB", "mongodb.database"),
    ("ORDERS_COLLECTION", "orders.collection"),
    ("DELIVERED_STATUS", "orders.delivered_status"),
    ("ARCHIVE_URI", "archive.uri"),
    ("ARCHIVE_URI_FILE", "archive.uri"),
    ("ARCHIVE_DB", "archive.database"),
    ("ARCHIVE_COLLECTION", "archive.collection"),
    ("ARCHIVE_ERRORS_COLLECTION", "archive.errors_collection"),
    ("ARCHIVE_SINK", "archive.sink"),
    ("ARCHIVE_TABLE_URI", "lake.table_uri"),
    ("LAKE_FILE_MB", "lake.file_mb"),
    ("LAKE_COMMIT_SECS", "lake.commit_secs"),
    ("CLIENT_COLLECTION", "lookups.client.collection"),
    ("LIVREUR_COLLECTION", "lookups.livreur.collection"),
    ("RESTAURANTS_COLLECTION", "lookups.restaurant.collection"),
    ("MENU_COLLECTION", "lookups.menu.collection"),
    ("RETRY_MAX_ATTEMPTS", "retry.max_attempts"),
    ("RETRY_MAX_DELAY_MS", "retry.max_delay_ms"),
    ("RETRY_MAX_ELAPSED_MS", "retry.max_elapsed_ms"),
    ("LOG_DIR", "log.dir"),
    ("LOG_RETENTION_DAYS", "log.retention_days"),
    ("LOG_FORMAT", "log.format"),
    ("LOG_LEVEL", "log.level"),
    ("ENRICH_MODE", "enrich.mode"),
    ("REFERENCE_CACHE_ENTRIES", "enrich.reference_cache_entries"),
    ("PARTITIONS", "coordination.partitions"),
    ("PARTITION", "coordination.partition"),
    ("BATCH_SIZE", "watch.batch_size"),
    ("BATCH_MAX_WAIT_MS", "watch.batch_max_wait_ms"),
    ("BATCH_MAX_BYTES", "watch.batch_max_bytes"),
    ("RESUME_TOKEN_FILE", "watch.resume_token_file"),
    ("HTTP_ADDR", "watch.http_addr"),
    ("STREAM_TIMEOUT_MS", "watch.stream_timeout_ms"),
    ("WRITE_TIMEOUT_MS", "watch.write_timeout_ms"),
    ("LIVENESS_TIMEOUT_MS", "watch.liveness_timeout_ms"),
    ("OPLOG_HEADROOM_WARN_SECS", "watch.oplog_headroom_warn_secs"),
    ("CHECKPOINT_STORE", "coordination.checkpoint_store"),
    ("STREAM_NAME", "coordination.stream_name"),
    ("INSTANCE_ID", "coordination.instance_id"),
    ("LEASE_TTL_MS", "coordination.lease_ttl_ms"),
    ("LEASE_RENEW_MS", "coordination.lease_renew_ms"),
    ("BATCH_WRITE_PATH", "batch.write_path"),
    ("BATCH_CHUNK_SIZE", "batch.chunk_size"),
    ("BATCH_CONCURRENCY", "batch.concurrency"),
    ("SKIP_INDEXES", "batch.create_indexes"),
    ("BATCH_METRICS_FILE", "batch.metrics_file"),
];

/// The configuration key a named variable sets.
pub fn key_of_variable(variable: &str) -> Option<&'static str> {
    NAMED_VARIABLES.iter().find(|(v, _)| *v == variable).map(|(_, key)| *key)
}

/// Values given on the command line or by the named environment variables, the top layer.
/// `None` leaves the lower layers' value.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides(pub serde_json::Map<String, serde_json::Value>);

impl Overrides {
    /// Sets the key of the named variable `variable` (see [`NAMED_VARIABLES`]) when `value` is
    /// given.
    pub fn named<T: Serialize>(&mut self, variable: &str, value: Option<T>) {
        let key = key_of_variable(variable).unwrap_or_else(|| panic!("{variable} is not in NAMED_VARIABLES"));
        self.set(key, value);
    }

    /// Sets `path` (dotted, e.g. `watch.batch_size`) when `value` is given.
    pub fn set<T: Serialize>(&mut self, path: &str, value: Option<T>) {
        let Some(value) = value else { return };
        let value = serde_json::to_value(value).expect("override values serialize");
        let mut map = &mut self.0;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                map.insert(part.to_owned(), value);
                return;
            }
            map = map
                .entry(part.to_owned())
                .or_insert_with(|| serde_json::Value::Object(Default::default()))
                .as_object_mut()
                .expect("override paths do not collide");
        }
    }
}

/// Checks the shape of a connection string before the driver sees it. A rejected URI is shown
/// as its scheme and host list only (nothing at all without a scheme): how it splits into user
/// info, path and options is exactly what is in doubt, so any other part could be a password.
fn check_uri(var: &str, uri: &str) -> Result<(), ConfigError> {
    if !uri.starts_with("mongodb://") && !uri.starts_with("mongodb+srv://") {
        return Err(ConfigError(format!(
            "{var} must start with mongodb:// or mongodb+srv:// (got {})",
            redact_invalid_uri(uri)
        )));
    }
    // The driver would split such a URI elsewhere than meant, and its error could quote a piece
    // of the password.
    if has_unencoded_user_info(uri) {
        return Err(ConfigError(format!(
            "{var} ({}): the user name and password must be percent-encoded \
             (@ as %40, : as %3A, / as %2F, ? as %3F, # as %23)",
            redact_invalid_uri(uri)
        )));
    }
    Ok(())
}

/// Which probe of the running `watch` `archiver health --probe` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Probe {
    /// `/health/live`: the process makes progress on its work (or has none).
    Live,
    /// `/health/ready`: the stream is open and the last write succeeded.
    Ready,
}

/// The largest `watch.gap_fill_margin_secs` accepted: 366 days.
pub const MAX_GAP_FILL_MARGIN_SECS: u64 = 366 * 24 * 3600;

impl Config {
    /// Merges the layers. `file` is the explicit `--config`; without it the default file is
    /// read when present.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = Self::file_read(file)? {
            figment = figment.merge(Toml::file_exact(path));
        }
        // figment's parser of environment values panics on some malformed escapes (a `\`
        // before a multi-byte character): a bad value must be a clear error, not a crash.
        let extracted = crate::redact::quietly(|| {
            figment
                .merge(Env::prefixed("ARCHIVER_").ignore(&["CONFIG"]).split("__"))
                .merge(Env::raw().only(&CONNECTION_ENV.iter().map(|(var, _)| *var).collect::<Vec<_>>()).map(|var| {
                    let key = CONNECTION_ENV
                        .iter()
                        .find(|(v, _)| var.as_str().eq_ignore_ascii_case(v))
                        .map_or("", |(_, key)| key);
                    key.into()
                }))
                .merge(Serialized::defaults(overrides.0))
                .extract::<Config>()
                .map_err(|e| ConfigError(crate::redact::scrub(&e.to_string())))
        });
        let config = extracted.map_err(|_| {
            ConfigError(
                "a configuration value cannot be parsed (check the escapes in the ARCHIVER_* and MONGODB_* variables)"
                    .to_owned(),
            )
        })??;
        config.validate()?;
        Ok(config)
    }

    /// The configuration file read: `file` (which must exist), else the default one when present.
    pub fn file_read(file: Option<&Path>) -> Result<Option<&Path>, ConfigError> {
        match file {
            Some(path) if !path.is_file() => {
                Err(ConfigError(format!("the configuration file {} does not exist", path.display())))
            }
            Some(path) => Ok(Some(path)),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => Ok(Some(Path::new(DEFAULT_CONFIG_FILE))),
            None => Ok(None),
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        check_uri("MONGODB_URI", self.mongodb.uri.expose())?;
        if let Some(uri) = &self.archive.uri {
            check_uri("ARCHIVE_URI", uri.expose())?;
        }
        let names = [
            ("mongodb.database", &self.mongodb.database),
            ("archive.collection", &self.archive.collection),
            ("archive.errors_collection", &self.archive.errors_collection),
            ("orders.collection", &self.orders.collection),
            ("orders.delivered_status", &self.orders.delivered_status),
            ("lookups.client.collection", &self.lookups.client.collection),
            ("lookups.livreur.collection", &self.lookups.livreur.collection),
            ("lookups.restaurant.collection", &self.lookups.restaurant.collection),
            ("lookups.menu.collection", &self.lookups.menu.collection),
        ];
        for (key, value) in names {
            if value.trim().is_empty() {
                return fail(format!("{key} must not be empty"));
            }
        }
        let fields = &self.orders.fields;
        for (key, value) in [
            ("orders.fields.status", &fields.status),
            ("orders.fields.items", &fields.items),
            ("orders.fields.item_menu_id", &fields.item_menu_id),
            ("orders.fields.item_quantite", &fields.item_quantite),
            ("orders.fields.date_commande", &fields.date_commande),
        ] {
            if value.is_empty() || value.starts_with('$') {
                return fail(format!("{key} must be a field name, got {value:?}"));
            }
        }
        if self.archive.sink == ArchiveSink::Delta {
            match self.lake.table_uri.as_deref().map(str::trim) {
                None | Some("") => {
                    return fail("ARCHIVE_SINK=delta needs ARCHIVE_TABLE_URI (lake.table_uri)".to_owned())
                }
                Some(uri) if uri.contains("://") && !TABLE_SCHEMES.iter().any(|s| uri.starts_with(s)) => {
                    return fail(format!(
                        "ARCHIVE_TABLE_URI: {}:// tables are not supported by this build (a path, file://, s3://, \
                         gs://, or az://, abfss:// and the other Azure schemes)",
                        uri.split("://").next().unwrap_or_default()
                    ))
                }
                Some(_) => {}
            }
            if self.lake.file_mb == 0 || self.lake.commit_secs == 0 {
                return fail("LAKE_FILE_MB and LAKE_COMMIT_SECS must be at least 1".to_owned());
            }
        }
        if self.watch.batch_size == 0 || self.watch.batch_size > 100_000 {
            return fail(format!(
                "watch.batch_size (BATCH_SIZE) must be between 1 and 100000, got {}",
                self.watch.batch_size
            ));
        }
        let w = &self.watch;
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&w.batch_max_bytes) {
            return fail(format!(
                "watch.batch_max_bytes (BATCH_MAX_BYTES) must be between 65536 and 1073741824, got {}",
                w.batch_max_bytes
            ));
        }
        // A year is far beyond any oplog window; past about 292 billion years the subtraction
        // from a date would overflow.
        if w.gap_fill_margin_secs > MAX_GAP_FILL_MARGIN_SECS {
            return fail(format!(
                "watch.gap_fill_margin_secs must be at most {MAX_GAP_FILL_MARGIN_SECS} (366 days), got {}",
                w.gap_fill_margin_secs
            ));
        }
        for (var, ms) in [
            ("STREAM_TIMEOUT_MS", w.stream_timeout_ms),
            ("WRITE_TIMEOUT_MS", w.write_timeout_ms),
            ("LIVENESS_TIMEOUT_MS", w.liveness_timeout_ms),
        ] {
            if !(100..=86_400_000).contains(&ms) {
                return fail(format!("{var} must be between 100 and 86400000 milliseconds, got {ms}"));
            }
        }
        if self.batch.chunk_size == 0 || self.batch.concurrency == 0 {
            return fail("batch.chunk_size and batch.concurrency must be at least 1".to_owned());
        }
        let c = &self.connection;
        if let (Some(min), Some(max)) = (c.min_pool_size, c.max_pool_size) {
            if min > max {
                return fail(format!("MONGODB_MIN_POOL_SIZE ({min}) must not exceed MONGODB_MAX_POOL_SIZE ({max})"));
            }
        }
        if c.max_pool_size == Some(0) {
            return fail("MONGODB_MAX_POOL_SIZE must be at least 1".to_owned());
        }
        for compressor in c.compressor_names() {
            if !["zstd", "zlib", "snappy"].contains(&compressor.as_str()) {
                return fail(format!(
                    "MONGODB_COMPRESSORS: unknown compressor {compressor:?} (use zstd, zlib or snappy)"
                ));
            }
        }
        for (var, file) in
            [("MONGODB_TLS_CA_FILE", &c.tls_ca_file), ("MONGODB_TLS_CERT_KEY_FILE", &c.tls_cert_key_file)]
        {
            if let Some(file) = file.as_ref().filter(|f| !f.is_file()) {
                return fail(format!("{var}: {} is not a readable file", file.display()));
            }
        }
        let co = &self.coordination;
        if co.partitions == 0 || co.partitions > MAX_PARTITIONS {
            return fail(format!("--partitions must be between 1 and {}, got {}", MAX_PARTITIONS, co.partitions));
        }
        if co.partition >= co.partitions {
            return fail(format!("--partition must be below --partitions ({}), got {}", co.partitions, co.partition));
        }
        if co.lease_renew_ms == 0 || co.lease_renew_ms * 2 > co.lease_ttl_ms {
            return fail(format!(
                "LEASE_RENEW_MS ({}) must be at least 1 and at most half of LEASE_TTL_MS ({})",
                co.lease_renew_ms, co.lease_ttl_ms
            ));
        }
        if self.http_addr().is_err() {
            return fail(format!(
                "HTTP_ADDR must be HOST:PORT (e.g. 127.0.0.1:9464) or `off`, got {:?}",
                self.watch.http_addr
            ));
        }
        if self.watch.resume_token_file.as_os_str().is_empty() {
            return fail("RESUME_TOKEN_FILE must not be empty".to_owned());
        }
        Ok(())
    }

    /// The health endpoint address, `None` when disabled.
    pub fn http_addr(&self) -> Result<Option<std::net::SocketAddr>, std::net::AddrParseError> {
        match self.watch.http_addr.trim() {
            "" | "off" | "none" | "disabled" => Ok(None),
            addr => addr.parse().map(Some),
        }
    }

    /// Whether the archive lives on the source deployment.
    pub fn archive_on_source_cluster(&self) -> bool {
        self.archive.uri.as_ref().is_none_or(|uri| uri == &self.mongodb.uri)
    }

    /// The archive database name.
    pub fn archive_database(&self) -> &str {
        self.archive.database.as_deref().unwrap_or(&self.mongodb.database)
    }

    /// `database.collection` of the orders, as recorded in checkpoints.
    pub fn orders_namespace(&self) -> String {
        format!("{}.{}", self.mongodb.database, self.orders.collection)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment's own error type
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_data_model() {
        let config = Config::default();
        assert_eq!(config.mongodb.database, "livraison");
        assert_eq!(config.orders.collection, "Commandes");
        assert_eq!(config.orders.delivered_status, "livr\u{e9}e");
        assert_eq!(config.archive.collection, "Commandes_archive");
        assert_eq!(config.archive_database(), "livraison");
        assert!(config.archive_on_source_cluster());
        config.validate().unwrap();
    }

    #[test]
    fn a_gap_fill_margin_that_would_overflow_is_refused_at_load() {
        // It used to pass validation and panic when history was lost (date minus the margin).
        let mut config = Config::default();
        config.watch.gap_fill_margin_secs = u64::MAX;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("gap_fill_margin_secs"), "{error}");
        config.watch.gap_fill_margin_secs = MAX_GAP_FILL_MARGIN_SECS;
        config.validate().unwrap();
    }

    #[test]
    fn a_table_on_the_stores_of_this_build_is_accepted_and_another_refused() {
        let mut config = Config::default();
        config.archive.sink = ArchiveSink::Delta;
        for uri in
            ["/var/lib/archiver/orders", "file:///var/lib/archiver/orders", "s3://lake/orders", "gs://lake/orders"]
                .into_iter()
                .chain(["az://lake/orders", "abfss://lake@account.dfs.core.windows.net/orders"])
        {
            config.lake.table_uri = Some(uri.to_owned());
            config.validate().unwrap_or_else(|e| panic!("{uri}: {e}"));
        }
        config.lake.table_uri = Some("hdfs://namenode/orders".to_owned());
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("hdfs:// tables are not supported by this build"), "{error}");
    }

    #[test]
    fn shipped_config_file_parses_to_the_defaults() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_FILE);
        figment::Jail::expect_with(|_| {
            let config = Config::load(Some(&file), Overrides::default()).unwrap();
            assert_eq!(config, Config::default());
            Ok(())
        });
    }

    #[test]
    fn layers_override_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "custom.toml",
                r#"
                [orders]
                collection = "Orders"
                [orders.fields]
                status = "etat"
                [watch]
                batch_size = 50
                "#,
            )?;
            jail.set_env("ARCHIVER_WATCH__BATCH_SIZE", "60");
            jail.set_env("ARCHIVER_ORDERS__FIELDS__ITEMS", "lignes");
            let mut overrides = Overrides::default();
            overrides.set("watch.batch_size", Some(70));
            overrides.set::<String>("mongodb.database", None);
            let config = Config::load(Some(Path::new("custom.toml")), overrides).unwrap();
            assert_eq!(config.orders.collection, "Orders");
            assert_eq!(config.orders.fields.status, "etat");
            assert_eq!(config.orders.fields.items, "lignes");
            assert_eq!(config.watch.batch_size, 70);
            assert_eq!(config.mongodb.database, "livraison");
            Ok(())
        });
    }

    #[test]
    fn connection_settings_come_from_named_variables_and_are_validated() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MONGODB_MAX_POOL_SIZE", "20");
            jail.set_env("MONGODB_APP_NAME", "archiver-eu");
            jail.set_env("MONGODB_COMPRESSORS", "zstd, snappy");
            let config = Config::load(None, Overrides::default()).unwrap();
            assert_eq!(config.connection.max_pool_size, Some(20));
            assert_eq!(config.connection.app_name.as_deref(), Some("archiver-eu"));
            assert_eq!(config.connection.compressor_names(), ["zstd", "snappy"]);
            jail.set_env("MONGODB_MIN_POOL_SIZE", "30");
            let err = Config::load(None, Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("MONGODB_MIN_POOL_SIZE"), "{err}");
            jail.set_env("MONGODB_MIN_POOL_SIZE", "1");
            jail.set_env("MONGODB_COMPRESSORS", "lz4");
            let err = Config::load(None, Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("lz4"), "{err}");
            jail.set_env("MONGODB_COMPRESSORS", "zlib");
            jail.set_env("MONGODB_MAX_POOL_SIZE", "lots");
            let err = Config::load(None, Overrides::default()).unwrap_err();
            assert!(err.to_string().to_lowercase().contains("max_pool_size"), "{err}");
            assert!(err.to_string().contains("lots"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_clear_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[watch]\nbatch_size = 0\n")?;
            let err = Config::load(Some(Path::new("bad.toml")), Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("BATCH_SIZE"), "{err}");
            jail.create_file("typo.toml", "[watch]\nbatch_sise = 3\n")?;
            let err = Config::load(Some(Path::new("typo.toml")), Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("batch_sise"), "{err}");
            let err = Config::load(Some(Path::new("missing.toml")), Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("missing.toml"), "{err}");
            let mut overrides = Overrides::default();
            overrides.set("mongodb.uri", Some("postgres://u:pw@h"));
            let err = Config::load(None, overrides).unwrap_err();
            assert!(!err.to_string().contains("pw"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn rejected_uris_show_no_credentials() {
        for (uri, secrets) in [
            ("alice:Pw9xQz@h:27017/db", &["Pw9xQz", "alice"][..]),
            ("mongodb://u:Pw9?xQz@h:1/db?proxyPassword=Px7Rk2", &["Pw9", "xQz", "Px7Rk2", "/db"][..]),
            ("mongodb://u:Pw9@xQz@h:1/db", &["Pw9", "xQz"][..]),
            (
                "mongodb://u:Pw9:xQz@h:1/?authMechanismProperties=AWS_SESSION_TOKEN:Tk4Lm8",
                &["Pw9", "xQz", "Tk4Lm8"][..],
            ),
        ] {
            let mut config = Config::default();
            config.mongodb.uri = SecretUri::new(uri);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("MONGODB_URI"), "{err}");
            for secret in secrets {
                assert!(!err.contains(secret), "{secret} shown in {err}");
            }
            let mut config = Config::default();
            config.archive.uri = Some(SecretUri::new(uri));
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("ARCHIVE_URI") && !err.contains(secrets[0]), "{err}");
        }
        let mut config = Config::default();
        config.mongodb.uri = SecretUri::new("mongodb://u:Pw9?xQz@h:1/db");
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("mongodb://h:1") && err.contains("percent-encoded"), "{err}");
    }
}
