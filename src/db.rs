//! Connections and the classification of database errors into transient (retry with backoff)
//! and permanent (fail clearly).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use mongodb::bson::doc;
use mongodb::error::{Error, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, Compressor, Tls, TlsOptions};
use mongodb::{Client, Database};

use crate::config::{Config, ConnectionSettings, RetrySettings};
use crate::redact::{redact_uri, register_uri, scrub};

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

/// The retry schedule: exponential from `initial_delay_ms`, capped, with jitter, bounded.
pub fn backoff(retry: &RetrySettings) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(retry.initial_delay_ms.max(1)))
        .with_max_delay(Duration::from_millis(retry.max_delay_ms.max(retry.initial_delay_ms)))
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(retry.max_attempts)
        .build()
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

/// `db` again, read from the primary only.
pub fn on_primary(db: &Database) -> Database {
    db.client().database_with_options(
        db.name(),
        mongodb::options::DatabaseOptions::builder()
            .selection_criteria(mongodb::options::SelectionCriteria::ReadPreference(
                mongodb::options::ReadPreference::Primary,
            ))
            .build(),
    )
}

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URI or its options are invalid: a configuration error.
    #[error("invalid connection string {uri}: {message}")]
    InvalidUri {
        /// The redacted URI.
        uri: String,
        /// What is wrong.
        message: String,
    },
    /// The server did not answer within the retry bound.
    #[error("cannot reach MongoDB at {uri} after {attempts} attempts: {message}")]
    Unreachable {
        /// The redacted URI.
        uri: String,
        /// Attempts made.
        attempts: usize,
        /// The last error.
        message: String,
    },
}

async fn client_for(uri: &str, settings: &ConnectionSettings) -> Result<Client, ConnectError> {
    register_uri(uri);
    let invalid = |e: Error| ConnectError::InvalidUri {
        uri: crate::redact::redact_invalid_uri(uri),
        message: scrub(&e.to_string()),
    };
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

/// Pings `client` until it answers, retrying transient failures with backoff.
pub async fn ping_with_retry(client: &Client, uri: &str, retry: &RetrySettings) -> Result<(), ConnectError> {
    let mut delays = backoff(retry);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match client.database("admin").run_command(doc! { "ping": 1 }).await {
            Ok(_) => return Ok(()),
            Err(e) if is_transient(&e) => match delays.next() {
                Some(delay) => {
                    tracing::warn!(
                        uri = %redact_uri(uri), attempt = attempts, retry_in_ms = delay.as_millis() as u64,
                        error = %scrub(&e.to_string()), "MongoDB not reachable yet, retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                None => {
                    return Err(ConnectError::Unreachable {
                        uri: redact_uri(uri),
                        attempts,
                        message: scrub(&e.to_string()),
                    })
                }
            },
            Err(e) => {
                return Err(ConnectError::Unreachable {
                    uri: redact_uri(uri),
                    attempts,
                    message: scrub(&e.to_string()),
                })
            }
        }
    }
}

/// Connects to the source and archive deployments and checks that both answer.
pub async fn connect(config: &Config) -> Result<Databases, ConnectError> {
    let source_client = client_for(&config.mongodb.uri, &config.connection).await?;
    ping_with_retry(&source_client, &config.mongodb.uri, &config.retry).await?;
    let archive_client = match &config.archive.uri {
        Some(uri) if !config.archive_on_source_cluster() => {
            let client = client_for(uri, &config.connection).await?;
            ping_with_retry(&client, uri, &config.retry).await?;
            client
        }
        _ => source_client.clone(),
    };
    Ok(Databases {
        source: source_client.database(&config.mongodb.database),
        archive: archive_client.database(config.archive_database()),
        source_client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_capped() {
        let retry = RetrySettings { max_attempts: 5, initial_delay_ms: 100, max_delay_ms: 300 };
        let delays: Vec<Duration> = backoff(&retry).collect();
        assert_eq!(delays.len(), 5);
        // Jitter adds at most one more `min_delay`.
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(600)), "{delays:?}");
    }

    #[test]
    fn io_errors_are_transient_and_others_not() {
        let io: Error = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into();
        assert!(is_transient(&io));
        let arg = Error::custom("nope");
        assert!(!is_transient(&arg));
    }
}
