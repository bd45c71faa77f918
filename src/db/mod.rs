//! Connections, the classification of database errors into transient (retry with backoff) and
//! permanent (fail clearly), time bounds on operations, the one retry helper ([`retry`]), and the
//! source's oplog window ([`oplog`]).

pub mod oplog;
pub mod retry;

use std::time::Duration;

use mongodb::bson::doc;
use mongodb::error::{Error, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, Compressor, Tls, TlsOptions};
use mongodb::{Client, Database};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConnectionSettings};
use crate::redact::{redact_invalid_uri, register_uri, scrub};
pub use retry::{retry, Exhausted, RetryPolicy};

/// Server error codes that mean "try again": network trouble, elections, shutdowns, killed
/// cursors. From the server's error_codes.yml.
const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    43,    // CursorNotFound (a resumed stream opens a new cursor)
    50,    // MaxTimeMSExpired
    63,    // StaleShardVersion
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    150,   // StaleEpoch
    112,   // WriteConflict
    189,   // PrimarySteppedDown
    234,   // RetryChangeStream
    237,   // CursorKilled
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11601, // Interrupted (killOp: the operation, not the data, was refused)
    11602, // InterruptedDueToReplStateChange
    13388, // StaleConfig
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
];

/// Server code of a resume point that fell out of the oplog.
pub const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
/// Older servers' code for the same condition ("resume of change stream was not possible").
pub const CHANGE_STREAM_FATAL: i32 = 280;

/// The server error code carried by `err`, if any.
pub fn error_code(err: &Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        ErrorKind::InsertMany(e) => e
            .write_concern_error
            .as_ref()
            .map(|w| w.code)
            .or_else(|| e.write_errors.as_ref().and_then(|w| w.first()).map(|w| w.code)),
        _ => None,
    }
}

/// Whether retrying the same operation later may succeed.
pub fn is_transient(err: &Error) -> bool {
    const LABELS: &[&str] = &[
        "RetryableWriteError",
        "ResumableChangeStreamError",
        "TransientTransactionError",
        "RetryableError",
        "SystemOverloadedError",
    ];
    if LABELS.iter().any(|l| err.contains_label(l)) {
        return true;
    }
    match err.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::DnsResolve { .. } => true,
        // A write concern error says the write was not yet acknowledged by enough members (a
        // timeout, an election): retried, the idempotent write completes or finds it done.
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => true,
        // Per-document errors with a transient code: a shard failing over mid-batch.
        ErrorKind::InsertMany(e) => {
            e.write_concern_error.is_some()
                || e.write_errors.as_ref().is_some_and(|w| w.iter().any(|w| TRANSIENT_CODES.contains(&w.code)))
        }
        _ => error_code(err).is_some_and(|c| TRANSIENT_CODES.contains(&c)),
    }
}

/// Whether `err` says the change stream cannot resume from the given token any more.
pub fn is_history_lost(err: &Error) -> bool {
    if matches!(error_code(err), Some(CHANGE_STREAM_HISTORY_LOST | CHANGE_STREAM_FATAL)) {
        return true;
    }
    let text = err.to_string().to_lowercase();
    text.contains("resume point may no longer be in the oplog")
        || text.contains("resume token was not found")
        || text.contains("resume of change stream was not possible")
}

/// Server codes that say the archive refuses a write for reasons of its own — its rules, its
/// privileges, its state — never because of the document written: a validator (which applies to
/// every document alike, whatever it holds), a missing privilege, a refused operation, a full
/// disk, a member that is not (or no longer) the primary. Such a write is retried until the
/// archive is fixed, never narrowed down to orders and dead-lettered.
pub const ARCHIVE_REFUSALS: &[i32] = &[
    13,    // Unauthorized
    18,    // AuthenticationFailed
    20,    // IllegalOperation
    121,   // DocumentValidationFailure
    166,   // CommandNotSupportedOnView
    8000,  // AtlasError (quota, tier limits)
    10107, // NotWritablePrimary
    13435, // NotPrimaryNoSecondaryOk
    14031, // OutOfDiskSpace
];

/// Whether `err` is the archive refusing a write on its own account (see [`ARCHIVE_REFUSALS`]):
/// for a bulk insert, when any of its per-document errors is.
pub fn is_archive_refusal(err: &Error) -> bool {
    if matches!(err.kind.as_ref(), ErrorKind::Authentication { .. }) || err.get_custom::<StoreFailure>().is_some() {
        return true;
    }
    match err.kind.as_ref() {
        ErrorKind::InsertMany(e) => {
            e.write_errors.as_ref().is_some_and(|w| w.iter().any(|w| ARCHIVE_REFUSALS.contains(&w.code)))
        }
        _ => error_code(err).is_some_and(|c| ARCHIVE_REFUSALS.contains(&c)),
    }
}

/// A failure of an archive that is not a MongoDB collection (a Delta table): never an order's
/// fault, so never dead-lettered; carried in a driver error so that the write paths stay one.
#[derive(Debug, Clone)]
pub struct StoreFailure(pub String);

impl StoreFailure {
    /// A driver error carrying `message`.
    pub fn error(message: impl Into<String>) -> Error {
        Error::custom(StoreFailure(message.into()))
    }
}

impl std::fmt::Display for StoreFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The server's code for a duplicate key.
pub const DUPLICATE_KEY: i32 = 11000;

/// The server's code for a command the user has no privilege to run.
pub const UNAUTHORIZED: i32 = 13;

/// Whether `err` is (or, for a bulk write, contains only) duplicate-key errors.
pub fn is_duplicate_key(err: &Error) -> bool {
    match err.kind.as_ref() {
        ErrorKind::InsertMany(e) => {
            e.write_concern_error.is_none()
                && e.write_errors.as_ref().is_some_and(|w| !w.is_empty() && w.iter().all(|w| w.code == DUPLICATE_KEY))
        }
        _ => error_code(err) == Some(DUPLICATE_KEY),
    }
}

/// The cause of `err` in one line a person can read: for a server that could not be selected,
/// what the servers themselves failed with ("connection refused"), not the driver's description
/// of the whole topology.
pub fn cause_in_one_line(err: &Error) -> String {
    let text = match err.kind.as_ref() {
        ErrorKind::ServerSelection { message, .. } => servers_failures(message),
        ErrorKind::Io(e) => lowercase_first(&e.to_string()),
        // The driver describes a custom error without its text.
        ErrorKind::Custom(_) if err.get_custom::<StoreFailure>().is_some() => {
            err.get_custom::<StoreFailure>().map(ToString::to_string).unwrap_or_default()
        }
        ErrorKind::Command(e) => format!("{} (code {} {})", e.message, e.code, e.code_name),
        ErrorKind::Write(WriteFailure::WriteError(e)) => format!("{} (code {})", e.message, e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => {
            format!("write concern error: {} (code {})", e.message, e.code)
        }
        ErrorKind::InsertMany(e) => match (&e.write_concern_error, e.write_errors.as_deref()) {
            (Some(w), _) => format!("write concern error: {} (code {})", w.message, w.code),
            (None, Some([first, rest @ ..])) => {
                let alike = rest.iter().filter(|w| w.code == first.code).count();
                let others = rest.len() - alike;
                let mut text =
                    format!("{} of the documents refused: {} (code {})", 1 + alike, first.message, first.code);
                if others > 0 {
                    text.push_str(&format!(", and {others} with other errors"));
                }
                text
            }
            (None, _) => err.to_string(),
        },
        _ => err.to_string(),
    };
    scrub(text.lines().next().unwrap_or_default())
}

/// What the servers failed with, from the driver's server selection message (which describes
/// the whole topology, one `Error: …` per server).
fn servers_failures(message: &str) -> String {
    let mut causes: Vec<String> = message
        .split("Error: ")
        .skip(1)
        .map(|cause| {
            let cause = cause.split(", labels").next().unwrap_or(cause);
            let cause = cause.trim_start_matches("Kind: ").trim_end_matches([' ', '}', ']', ',']);
            let cause = cause.strip_prefix("I/O error: ").unwrap_or(cause);
            let cause = cause.split(" (os error").next().unwrap_or(cause);
            lowercase_first(cause)
        })
        .collect();
    causes.dedup();
    if causes.is_empty() {
        "no server answered within the server selection timeout".to_owned()
    } else {
        causes.join("; ")
    }
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_lowercase().chain(chars).collect()).unwrap_or_default()
}

/// After a shutdown request, how long an operation in flight may still take before it is
/// abandoned (its checkpoint is not saved, so it is replayed at the next start).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// An error that says a server did not answer in time; transient, so the operation is retried.
pub fn timed_out(what: &str, limit: Duration) -> Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {} ms while {what}", limit.as_millis()))
        .into()
}

/// Runs a database operation, abandoning it when it goes unanswered for `limit` (a silent
/// network: the driver may wait forever for a reply) or when shutdown was requested more than
/// [`SHUTDOWN_GRACE`] ago. Only for idempotent operations, which are then retried.
pub async fn bounded<T>(
    operation: impl std::future::Future<Output = Result<T, Error>>,
    what: &str,
    limit: Duration,
    shutdown: &CancellationToken,
) -> Result<T, Error> {
    let grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = operation => result,
        _ = tokio::time::sleep(limit) => Err(timed_out(what, limit)),
        _ = grace_over => Err(timed_out(what, SHUTDOWN_GRACE)),
    }
}

/// The source and archive databases.
#[derive(Debug, Clone)]
pub struct Databases {
    /// The database of the orders and references.
    pub source: Database,
    /// The database of the archive (same client when on the same deployment).
    pub archive: Database,
    /// The source client.
    pub source_client: Client,
}

impl Databases {
    /// The same databases with the source read from its primary, whatever the URI's read
    /// preference: what `watch` reads must be at least as recent as its change stream.
    pub fn reading_from_primary(&self) -> Databases {
        Databases { source: on_primary(&self.source), ..self.clone() }
    }
}

/// `db` again, read from the primary only (its read and write concerns kept).
pub fn on_primary(db: &Database) -> Database {
    let mut options = mongodb::options::DatabaseOptions::default();
    options.selection_criteria =
        Some(mongodb::options::SelectionCriteria::ReadPreference(mongodb::options::ReadPreference::Primary));
    options.read_concern = db.read_concern().cloned();
    options.write_concern = db.write_concern().cloned();
    db.client().database_with_options(db.name(), options)
}

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URI or its options are invalid: a configuration error.
    #[error("invalid connection string {var} ({uri}): {message}")]
    InvalidUri {
        /// The variable that holds it (`MONGODB_URI`, `ARCHIVE_URI`).
        var: &'static str,
        /// The URI's scheme and hosts, nothing else.
        uri: String,
        /// What is wrong (the driver's words, scrubbed of credentials).
        message: String,
    },
    /// The server did not answer within the retry bounds.
    #[error("cannot reach MongoDB at {hosts} ({cause}) after {attempts} attempts over {elapsed}", elapsed = retry::human_duration(*.elapsed))]
    Unreachable {
        /// The URI's scheme and hosts, nothing else.
        hosts: String,
        /// The last failure in one line.
        cause: String,
        /// Attempts made.
        attempts: usize,
        /// From the first attempt to the last.
        elapsed: Duration,
        /// The driver's last error.
        #[source]
        source: Error,
    },
}

/// What is wrong with a connection string, for a person: which part (hosts, user, options) and
/// the driver's reason alone, without its error's debugging fields.
fn invalid_uri_message(error: &Error) -> String {
    let reason = match error.kind.as_ref() {
        ErrorKind::InvalidArgument { message, .. } => message.clone(),
        _ => cause_in_one_line(error),
    };
    let lower = reason.to_lowercase();
    let part = if lower.contains("seed") {
        "the host list and the options do not go together"
    } else if lower.contains("server address") || lower.contains("port") || lower.contains("host") {
        "in the host list"
    } else if lower.contains("password") || lower.contains("username") || lower.contains("credential") {
        "in the user name or password"
    } else if lower.contains("option") || lower.contains("mechanism") {
        "in the options (after ?)"
    } else {
        "in the connection string"
    };
    scrub(&format!("{part}: {reason}"))
}

async fn client_for(var: &'static str, uri: &str, settings: &ConnectionSettings) -> Result<Client, ConnectError> {
    register_uri(uri);
    let invalid =
        |e: Error| ConnectError::InvalidUri { var, uri: redact_invalid_uri(uri), message: invalid_uri_message(&e) };
    let mut options = ClientOptions::parse(uri).await.map_err(invalid)?;
    apply_settings(&mut options, settings).map_err(invalid)?;
    if options.app_name.is_none() {
        options.app_name = Some(format!("archiver/{}", env!("CARGO_PKG_VERSION")));
    }
    if options.server_selection_timeout.is_none() {
        // Fail an attempt quickly and let our own backoff decide how long to keep trying.
        options.server_selection_timeout = Some(Duration::from_secs(10));
    }
    Client::with_options(options).map_err(invalid)
}

/// Applies the settings given outside the URI over the URI's own options.
fn apply_settings(options: &mut ClientOptions, s: &ConnectionSettings) -> Result<(), Error> {
    if let Some(name) = &s.app_name {
        options.app_name = Some(name.clone());
    }
    if s.max_pool_size.is_some() {
        options.max_pool_size = s.max_pool_size;
    }
    if s.min_pool_size.is_some() {
        options.min_pool_size = s.min_pool_size;
    }
    if let Some(ms) = s.connect_timeout_ms {
        options.connect_timeout = Some(Duration::from_millis(ms));
    }
    if let Some(ms) = s.server_selection_timeout_ms {
        options.server_selection_timeout = Some(Duration::from_millis(ms));
    }
    if s.compressors.is_some() {
        let compressors = s.compressor_names().iter().map(|n| n.parse()).collect::<Result<Vec<Compressor>, _>>()?;
        options.compressors = Some(compressors);
    }
    let wants_tls = s.tls.unwrap_or(false) || s.tls_ca_file.is_some() || s.tls_cert_key_file.is_some();
    if s.tls == Some(false) {
        options.tls = Some(Tls::Disabled);
    } else if wants_tls {
        let mut tls = match options.tls.take() {
            Some(Tls::Enabled(tls)) => tls,
            _ => TlsOptions::default(),
        };
        if let Some(ca) = &s.tls_ca_file {
            tls.ca_file_path = Some(ca.clone());
        }
        if let Some(cert) = &s.tls_cert_key_file {
            tls.cert_key_file_path = Some(cert.clone());
        }
        options.tls = Some(Tls::Enabled(tls));
    }
    Ok(())
}

/// Pings `client` until it answers, retrying transient failures as `policy` allows.
pub async fn ping_with_retry(client: &Client, uri: &str, policy: &RetryPolicy) -> Result<(), ConnectError> {
    let ping = async || client.database("admin").run_command(doc! { "ping": 1 }).await.map(|_| ());
    let hosts = redact_invalid_uri(uri);
    let what = format!("MongoDB at {hosts} not reachable yet");
    retry(policy, &what, is_transient, None, ping).await.map_err(|failed| ConnectError::Unreachable {
        hosts,
        cause: cause_in_one_line(&failed.error),
        attempts: failed.attempts,
        elapsed: failed.elapsed,
        source: failed.error,
    })
}

/// The wire version from which `$convert` turns binary data into a string (with a `format`):
/// MongoDB 8.0.
const BINARY_TO_STRING_WIRE_VERSION: i32 = 25;

/// Whether every server connected to converts binary data to strings (MongoDB 8.0 and later),
/// which the partition of a binary order id relies on. Set by [`connect`], once per process.
static BINARY_TO_STRING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the servers this process connected to all convert binary data to strings.
pub fn servers_convert_binary_to_string() -> bool {
    BINARY_TO_STRING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The highest wire version `client`'s server speaks, if it says.
async fn wire_version(client: &Client) -> Option<i32> {
    let hello = client.database("admin").run_command(doc! { "hello": 1 }).await.ok()?;
    match hello.get("maxWireVersion")? {
        mongodb::bson::Bson::Int32(v) => Some(*v),
        mongodb::bson::Bson::Int64(v) => i32::try_from(*v).ok(),
        _ => None,
    }
}

/// Connects to the source and archive deployments and checks that both answer, retrying as
/// `policy` allows.
pub async fn connect(config: &Config, policy: &RetryPolicy) -> Result<Databases, ConnectError> {
    let source_client = client_for("MONGODB_URI", config.mongodb.uri.expose(), &config.connection).await?;
    ping_with_retry(&source_client, config.mongodb.uri.expose(), policy).await?;
    let mut lowest_wire_version = wire_version(&source_client).await;
    let archive_client = match &config.archive.uri {
        Some(uri) if !config.archive_on_source_cluster() => {
            let client = client_for("ARCHIVE_URI", uri.expose(), &config.connection).await?;
            ping_with_retry(&client, uri.expose(), policy).await?;
            lowest_wire_version = lowest_wire_version.min(wire_version(&client).await);
            client
        }
        _ => source_client.clone(),
    };
    BINARY_TO_STRING.store(
        lowest_wire_version.is_some_and(|v| v >= BINARY_TO_STRING_WIRE_VERSION),
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(Databases {
        source: source_client.database(&config.mongodb.database),
        archive: archive_database(&archive_client, config.archive_database()),
        source_client,
    })
}

/// The archive database of `client`, written with majority write concern: an archive write
/// acknowledged by the primary alone may be rolled back by a failover, while the checkpoint
/// saved after it survives, and the order would be lost without a trace. A `w` the connection
/// string sets explicitly is kept, with a warning.
pub fn archive_database(client: &Client, name: &str) -> Database {
    let database = client.database(name);
    match database.write_concern().and_then(|wc| wc.w.clone()) {
        Some(mongodb::options::Acknowledgment::Majority) => database,
        Some(w) => {
            tracing::warn!(w = ?w, "the connection string of the archive sets its write concern: archive \
                writes are acknowledged with it, not by a majority; a failover may roll back orders \
                whose position is already saved");
            database
        }
        None => {
            // `j` or `wtimeoutMS` without `w` are kept, with `w: majority`.
            let mut write_concern =
                database.write_concern().cloned().unwrap_or_else(mongodb::options::WriteConcern::majority);
            write_concern.w = Some(mongodb::options::Acknowledgment::Majority);
            client.database_with_options(
                name,
                mongodb::options::DatabaseOptions::builder().write_concern(write_concern).build(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn archive_writes_are_acknowledged_by_a_majority_unless_the_uri_says_otherwise() {
        use mongodb::options::Acknowledgment;
        // No server is contacted: the client only connects on first use.
        let w = |uri: &'static str| async move {
            let client = Client::with_uri_str(uri).await.unwrap();
            let archive = archive_database(&client, "livraison");
            archive.collection::<mongodb::bson::Document>("a").write_concern().and_then(|wc| wc.w.clone())
        };
        assert_eq!(w("mongodb://127.0.0.1:9/").await, Some(Acknowledgment::Majority));
        assert_eq!(w("mongodb://127.0.0.1:9/?journal=true").await, Some(Acknowledgment::Majority));
        assert_eq!(w("mongodb://127.0.0.1:9/?w=1").await, Some(Acknowledgment::Nodes(1)));
        assert_eq!(w("mongodb://127.0.0.1:9/?w=majority").await, Some(Acknowledgment::Majority));
    }

    #[test]
    fn io_errors_are_transient_and_others_not() {
        let io: Error = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into();
        assert!(is_transient(&io));
        let arg = Error::custom("nope");
        assert!(!is_transient(&arg));
    }

    #[test]
    fn a_refused_connection_reads_in_one_line() {
        let message = "Server selection timeout: No available servers. Topology: { Type: Unknown, Servers: [ \
            { Address: 127.0.0.1:1, Type: Unknown, Error: Kind: I/O error: Connection refused (os error 111), \
            labels: {} } ] }";
        assert_eq!(servers_failures(message), "connection refused");
        assert_eq!(
            servers_failures("Server selection timeout"),
            "no server answered within the server selection timeout"
        );
    }
}
