//! `archiver health`: a one-shot report on the source, the archive and the checkpoint that
//! `watch` would resume from — the token file, or with `CHECKPOINT_STORE=mongodb` the shared
//! checkpoint document and the lease of the stream, for the configured partition — and the source
//! oplog's window with the checkpoint's headroom in it.

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};

use crate::checkpoint::MongoCheckpoints;
use crate::checkpoint::{Checkpoint, CheckpointFile, StoreError};
use crate::config::{ArchiveSink, CheckpointStoreKind, Config, Probe};
use crate::coordination::{self, Lease};
use crate::db;
use crate::db::oplog::{read_window, OplogError};
use crate::pipeline::sink::Archiver;
use crate::redact::scrub;

/// What the one-shot check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Everything answered as it should.
    Healthy,
    /// Something is down or wrong.
    Unhealthy,
    /// The configuration cannot work (an invalid connection string): a usage error.
    Misconfigured,
}

/// Runs every check; returns the JSON report and the verdict.
pub async fn run(config: &Config) -> (Value, Verdict) {
    let mut quick = config.clone();
    // A probe answers fast: one attempt, no backoff.
    quick.retry.max_attempts = 0;
    let mut healthy = true;
    let mut misconfigured = false;
    let (source, archive, dbs) = match db::connect(&quick, &db::RetryPolicy::bounded(&quick.retry)).await {
        Ok(dbs) => {
            let mut source = source_report(config, &dbs.source, &mut healthy).await;
            match crate::pipeline::scan::source_mismatch(config, &dbs).await {
                Ok(Some(mismatch)) => {
                    healthy = false;
                    source["status"] = Value::from("error");
                    source["error"] = Value::from(mismatch.to_string());
                }
                Ok(None) => {}
                Err(e) => source["warning"] = Value::from(scrub(&e.to_string())),
            }
            let archive = archive_report(config, &dbs.archive, &mut healthy).await;
            (source, archive, Some(dbs))
        }
        Err(e) => {
            healthy = false;
            misconfigured = matches!(e, db::ConnectError::InvalidUri { .. });
            let error = json!({ "status": "error", "error": scrub(&e.to_string()) });
            (error.clone(), error, None)
        }
    };
    let mut position = None;
    let (archive, token) = match (&dbs, config.archive.sink) {
        // The archive is a table, which keeps watch's position too.
        (Some(dbs), ArchiveSink::Delta) => table_report(config, dbs, &mut healthy, &mut position).await,
        _ => (archive, token_report(config, dbs.as_ref(), &mut healthy, &mut position).await),
    };
    let oplog = match &dbs {
        Some(dbs) => oplog_report(config, &dbs.source_client, position).await,
        None => json!({ "status": "error", "error": "the source is unreachable" }),
    };
    let report = json!({
        "status": if healthy { "healthy" } else { "unhealthy" },
        "version": env!("CARGO_PKG_VERSION"),
        "source": source,
        "archive": archive,
        "resume_token": token,
        "oplog": oplog,
    });
    let verdict = match (healthy, misconfigured) {
        (_, true) => Verdict::Misconfigured,
        (true, false) => Verdict::Healthy,
        (false, false) => Verdict::Unhealthy,
    };
    (report, verdict)
}

async fn source_report(config: &Config, source: &mongodb::Database, healthy: &mut bool) -> Value {
    let admin = source.client().database("admin");
    let hello = admin.run_command(doc! { "hello": 1 }).await;
    let build = admin.run_command(doc! { "buildInfo": 1 }).await;
    let names = source.list_collection_names().await;
    let (hello, names) = match (hello, names) {
        (Ok(h), Ok(n)) => (h, n),
        (Err(e), _) | (_, Err(e)) => {
            *healthy = false;
            return json!({ "status": "error", "uri": config.mongodb.uri.to_string(), "error": scrub(&e.to_string()) });
        }
    };
    let set_name = hello.get_str("setName").ok().map(str::to_owned);
    if set_name.is_none() {
        *healthy = false;
    }
    let wanted = [
        &config.orders.collection,
        &config.lookups.client.collection,
        &config.lookups.livreur.collection,
        &config.lookups.restaurant.collection,
        &config.lookups.menu.collection,
    ];
    let collections: serde_json::Map<String, Value> =
        wanted.iter().map(|c| ((*c).clone(), Value::Bool(names.contains(c)))).collect();
    json!({
        "status": if set_name.is_some() { "ok" } else { "error" },
        "uri": config.mongodb.uri.to_string(),
        "database": config.mongodb.database,
        "server_version": build.ok().and_then(|b: Document| b.get_str("version").ok().map(str::to_owned)),
        "replica_set": set_name,
        "change_streams": if hello.get_str("setName").is_ok() { "supported" } else { "unsupported: not a replica set" },
        "writable_primary": hello.get_bool("isWritablePrimary").unwrap_or(false),
        "collections": collections,
    })
}

async fn archive_report(config: &Config, archive: &mongodb::Database, healthy: &mut bool) -> Value {
    let names = match archive.list_collection_names().await {
        Ok(names) => names,
        Err(e) => {
            *healthy = false;
            return json!({ "status": "error", "error": scrub(&e.to_string()) });
        }
    };
    let dead_letters =
        archive.collection::<Document>(&config.archive.errors_collection).estimated_document_count().await.unwrap_or(0);
    json!({
        "status": "ok",
        "uri": config.archive.uri.as_ref().unwrap_or(&config.mongodb.uri).to_string(),
        "database": config.archive_database(),
        "collection": config.archive.collection,
        "present": names.contains(&config.archive.collection),
        "dead_letters": dead_letters,
    })
}

/// The archive table and the position `watch` keeps in it.
async fn table_report(
    config: &Config,
    dbs: &db::Databases,
    healthy: &mut bool,
    position: &mut Option<DateTime<Utc>>,
) -> (Value, Value) {
    let uri = config.lake.table_uri.clone().unwrap_or_default();
    let stream = coordination::stream_name(config);
    let archiver = match Archiver::open_existing_table(config, dbs).await {
        Ok(Some(archiver)) => archiver,
        Ok(None) => {
            let table = json!({ "status": "missing", "sink": "delta", "table": uri,
                "note": "batch and watch create the table when they first write" });
            let token = json!({ "status": "missing", "store": "table", "stream": stream,
                "note": "watch starts from now (or --catch-up) when it has no position" });
            return (table, token);
        }
        Err(e) => {
            *healthy = false;
            let error = json!({ "status": "error", "sink": "delta", "table": uri, "error": scrub(&e.to_string()) });
            return (error.clone(), error);
        }
    };
    let mut table = match archiver.table_summary().await {
        Ok(Some((version, files))) => {
            json!({ "status": "ok", "sink": "delta", "table": uri, "version": version, "files": files })
        }
        Ok(None) => json!({ "status": "ok", "sink": "delta", "table": uri }),
        Err(e) => {
            *healthy = false;
            json!({ "status": "error", "sink": "delta", "table": uri, "error": scrub(&e.to_string()) })
        }
    };
    // The dead letters, in the table beside it: an unreadable one is said, not fatal.
    table["dead_letters_in"] = Value::from(archiver.dead_letter_location());
    match archiver.dead_letter_count().await {
        Ok(count) => table["dead_letters"] = Value::from(count),
        Err(e) => table["dead_letters_error"] = Value::from(scrub(&e.to_string())),
    }
    let loaded = match archiver.checkpoint_keeper(config, &tokio_util::sync::CancellationToken::new()).await {
        Some(keeper) => keeper.load().await,
        None => Ok(None),
    };
    let mut token = checkpoint_report(loaded, healthy, position);
    token["store"] = Value::from("table");
    token["stream"] = Value::from(stream);
    (table, token)
}

/// The checkpoint `watch` resumes from: the same store and the same stream name (with the
/// partition) as `watch` itself, so a partitioned worker's checkpoint is found and checked.
/// `position` receives the time the checkpoint stands for, when there is one.
async fn token_report(
    config: &Config,
    dbs: Option<&db::Databases>,
    healthy: &mut bool,
    position: &mut Option<DateTime<Utc>>,
) -> Value {
    let stream = coordination::stream_name(config);
    let mut report = match config.coordination.checkpoint_store {
        CheckpointStoreKind::File => file_token(config, &stream, healthy, position),
        CheckpointStoreKind::Mongodb => match dbs {
            Some(dbs) => shared_token(config, dbs, &stream, healthy, position).await,
            None => {
                *healthy = false;
                json!({ "status": "error", "error": "the archive database is unreachable" })
            }
        },
    };
    if let Value::Object(fields) = &mut report {
        fields.insert("stream".to_owned(), Value::from(stream));
    }
    report
}

fn file_token(config: &Config, stream: &str, healthy: &mut bool, position: &mut Option<DateTime<Utc>>) -> Value {
    let path = &config.watch.resume_token_file;
    let file = path.display().to_string();
    // `watch` records its stream name in the file and refuses a file of another stream.
    let mut report = checkpoint_report(CheckpointFile::new(path).load(stream), healthy, position);
    report["store"] = Value::from("file");
    report["file"] = Value::from(file);
    report
}

async fn shared_token(
    config: &Config,
    dbs: &db::Databases,
    stream: &str,
    healthy: &mut bool,
    position: &mut Option<DateTime<Utc>>,
) -> Value {
    // The epoch only matters to writers; this store is only read.
    let mut store = MongoCheckpoints::new(&dbs.archive, config, stream, 0);
    let mut report = checkpoint_report(store.load().await, healthy, position);
    report["store"] = Value::from("mongodb");
    report["collection"] = Value::from(config.coordination.checkpoint_collection.clone());
    let leases = Lease::collection(&dbs.archive, config);
    report["lease"] = match Lease::current(&leases, stream).await {
        Ok(Some(lease)) => {
            // An expired lease: no process is writing this stream right now, and deliveries
            // wait (none leads, or the leader is cut off from the store).
            let expired = lease.expires_at < chrono::Utc::now();
            let mut lease = json!({
                "holder": lease.holder,
                "epoch": lease.epoch,
                "expires_at": lease.expires_at,
                "expired": expired,
            });
            if expired {
                *healthy = false;
                lease["error"] = Value::from("no instance leads this stream: its lease has expired");
            }
            lease
        }
        Ok(None) => json!({ "holder": null, "note": "no process has led this stream yet" }),
        Err(e) => {
            *healthy = false;
            json!({ "error": scrub(&e.to_string()) })
        }
    };
    report
}

fn checkpoint_report(
    loaded: Result<Option<Checkpoint>, StoreError>,
    healthy: &mut bool,
    position_out: &mut Option<DateTime<Utc>>,
) -> Value {
    match loaded {
        Ok(Some(cp)) => {
            let position = cp.position();
            *position_out = Some(position);
            let now = chrono::Utc::now();
            json!({
                "status": "ok",
                "saved_at": cp.saved_at,
                "age_seconds": (now - cp.saved_at).num_milliseconds() as f64 / 1000.0,
                "position_age_seconds": (now - position).num_milliseconds() as f64 / 1000.0,
            })
        }
        Ok(None) => json!({ "status": "missing",
            "note": "watch starts from now (or --catch-up) when it has no token" }),
        Err(e) => {
            *healthy = false;
            json!({ "status": "error", "error": scrub(&e.to_string()) })
        }
    }
}

/// The source oplog's window, and how much longer `watch` could stay stopped before the
/// checkpoint's position leaves it. Advisory: it never makes the report unhealthy, because the
/// archive does not depend on it (lost history is filled), and a user may lack the privilege.
async fn oplog_report(config: &Config, source: &mongodb::Client, position: Option<DateTime<Utc>>) -> Value {
    let window = match read_window(source).await {
        Ok(Some(window)) => window,
        Ok(None) => return json!({ "status": "unavailable", "reason": "the source has no oplog" }),
        Err(OplogError::Refused { reason, .. }) => {
            return json!({
                "status": "unavailable",
                "reason": scrub(&reason),
                "note": "grant the user read access to the local database to see the oplog window",
            })
        }
        Err(e @ OplogError::Transient(_)) => {
            let cause = std::error::Error::source(&e).map(|c| scrub(&c.to_string())).unwrap_or_default();
            return json!({ "status": "error", "error": format!("{e}: {cause}") });
        }
    };
    let warn_below = config.watch.oplog_headroom_warn_secs;
    let headroom = position.map(|p| window.headroom_seconds(p));
    let mut report = json!({
        "status": "ok",
        "first": window.first,
        "last": window.last,
        "window_seconds": window.seconds(),
        "seconds_until_full": window.seconds_until_full(),
        "headroom_seconds": headroom,
        "warn_below_seconds": warn_below,
    });
    match headroom {
        Some(h) if h < 0.0 => {
            report["status"] = Value::from("warning");
            report["warning"] = Value::from(
                "the checkpoint's position has left the oplog: at its next start watch fills the gap \
                 from the orders collection (lost history)",
            );
        }
        Some(h) if h < warn_below as f64 => {
            report["status"] = Value::from("warning");
            report["warning"] = Value::from(format!(
                "a stop longer than {} s would take the checkpoint's position out of the oplog",
                h.floor()
            ));
        }
        Some(_) => {}
        None => report["note"] = Value::from("no checkpoint: no headroom to measure"),
    }
    report
}

/// How long the running `watch` has to answer a probe.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks the running `watch` at `HTTP_ADDR` for `probe`: whether it answered 200, and what to
/// print (its answer, or why there was none).
pub async fn ask_running_watch(config: &Config, probe: Probe) -> (bool, String) {
    let addr = match config.http_addr() {
        Ok(Some(addr)) => addr,
        Ok(None) => return (false, "HTTP_ADDR is off: watch serves no probe to ask".to_owned()),
        Err(e) => return (false, format!("HTTP_ADDR {:?} is not an address: {e}", config.watch.http_addr)),
    };
    // A server listening on every interface is asked on the loopback one.
    let addr = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())),
        ip if ip.is_unspecified() => std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    };
    let path = match probe {
        Probe::Live => "/health/live",
        Probe::Ready => "/health/ready",
    };
    match tokio::time::timeout(PROBE_TIMEOUT, http_get(addr, path)).await {
        Ok(Ok((status, body))) => (status == 200, format!("{status} {}", body.trim())),
        Ok(Err(e)) => (false, format!("watch does not answer at {addr}: {e}")),
        Err(_) => (false, format!("watch did not answer {path} at {addr} within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

/// One HTTP/1.1 GET: the status code and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))?;
    Ok((status, response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()))
}
