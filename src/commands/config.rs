//! `archiver config check`: validates a configuration against the deployment it points at, and
//! says what is missing, one line per check, in the manner of `nginx -t` or `promtool check`. It
//! reads only: nothing is created or changed.

use std::time::Duration;

use mongodb::bson::{doc, Document};
use mongodb::Collection;

use crate::checkpoint::CheckpointFile;
use crate::config::{ArchiveSink, CheckpointStoreKind, Config};
use crate::db::oplog::{read_window, OplogError};
use crate::db::{self, error_code, Databases, UNAUTHORIZED};
use crate::pipeline::sink::{wanted_indexes, Archiver};
use crate::redact::scrub;

/// How a check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// As it should be.
    Ok,
    /// Works, with a limit worth knowing.
    Warn,
    /// Does not work as configured.
    Fail,
}

/// One check and what it found.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// How it went.
    pub status: Status,
    /// What was found, and for a warning or failure, what to do.
    pub detail: String,
}

fn check(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
    Check { name: name.into(), status, detail: scrub(&detail.into()) }
}

/// Runs every check that the configuration allows (those needing the source are skipped when it
/// cannot be reached).
pub async fn run(config: &Config) -> Vec<Check> {
    let mut checks = vec![check("configuration", Status::Ok, "every layer loaded and valid")];
    let mut quick = config.clone();
    // A check answers fast: one attempt, no backoff.
    quick.retry.max_attempts = 0;
    let dbs = match db::connect(&quick, &db::RetryPolicy::bounded(&quick.retry)).await {
        Ok(dbs) => dbs,
        Err(e) => {
            checks.push(check("source", Status::Fail, format!("cannot connect: {e}")));
            return checks;
        }
    };
    checks.push(source(config, &dbs).await);
    checks.push(orders(config, &dbs).await);
    checks.extend(change_streams(config, &dbs).await);
    checks.extend(references(config, &dbs).await);
    checks.push(checkpoint(config, &dbs).await);
    checks.push(oplog(config, &dbs).await);
    checks.extend(archive(config, &dbs).await);
    checks
}

async fn source(config: &Config, dbs: &Databases) -> Check {
    let hello = dbs.source_client.database("admin").run_command(doc! { "hello": 1 }).await;
    match hello {
        Ok(hello) if hello.get_str("setName").is_ok() => check(
            "source",
            Status::Ok,
            format!("{} reached, replica set {}", config.mongodb.uri, hello.get_str("setName").unwrap_or_default()),
        ),
        Ok(_) => check(
            "source",
            Status::Fail,
            format!("{} is not a replica set: watch needs change streams (batch works)", config.mongodb.uri),
        ),
        Err(e) => check("source", Status::Fail, e.to_string()),
    }
}

async fn orders(config: &Config, dbs: &Databases) -> Check {
    let name = format!("orders {}.{}", config.mongodb.database, config.orders.collection);
    match crate::pipeline::scan::source_mismatch(config, dbs).await {
        Ok(Some(mismatch)) => check(name, Status::Fail, mismatch.to_string()),
        Ok(None) => {
            let count = dbs.source.collection::<Document>(&config.orders.collection).estimated_document_count().await;
            check(name, Status::Ok, format!("present ({} orders)", count.unwrap_or_default()))
        }
        Err(e) if error_code(&e) == Some(UNAUTHORIZED) => check(
            name,
            Status::Fail,
            format!("no privilege to list the collections of {}: grant the read role on it", config.mongodb.database),
        ),
        Err(e) => check(name, Status::Fail, e.to_string()),
    }
}

/// Opens, then closes, a change stream on `collection` (or the whole database).
async fn opens_a_stream(dbs: &Databases, collection: Option<&str>) -> mongodb::error::Result<()> {
    let pipeline = [doc! { "$match": { "operationType": "insert" } }];
    match collection {
        Some(name) => dbs.source.collection::<Document>(name).watch().pipeline(pipeline).await.map(drop),
        None => dbs.source.watch().pipeline(pipeline).await.map(drop),
    }
}

async fn change_streams(config: &Config, dbs: &Databases) -> Vec<Check> {
    let db = &config.mongodb.database;
    let orders = &config.orders.collection;
    let on_orders = match opens_a_stream(dbs, Some(orders)).await {
        Ok(()) => check("change stream on the orders", Status::Ok, format!("{db}.{orders} can be watched")),
        Err(e) if error_code(&e) == Some(UNAUTHORIZED) => check(
            "change stream on the orders",
            Status::Fail,
            format!(
                "no privilege to watch {db}.{orders}: grant the changeStream and find actions on it \
                 (the read role on {db}); watch cannot run"
            ),
        ),
        Err(e) => check("change stream on the orders", Status::Fail, e.to_string()),
    };
    let on_database = match opens_a_stream(dbs, None).await {
        Ok(()) => check(
            "change stream on the database",
            Status::Ok,
            format!("{db} can be watched: watch keeps references cached until they change"),
        ),
        Err(e) if error_code(&e) == Some(UNAUTHORIZED) => check(
            "change stream on the database",
            Status::Warn,
            format!(
                "no privilege to watch the whole of {db}: watch follows the orders alone and reads the \
                 references afresh for every batch; grant changeStream and find on {db} (the read role)"
            ),
        ),
        Err(e) => check("change stream on the database", Status::Warn, e.to_string()),
    };
    vec![on_orders, on_database]
}

async fn references(config: &Config, dbs: &Databases) -> Vec<Check> {
    let names = match dbs.source.list_collection_names().await {
        Ok(names) => names,
        Err(_) => return Vec::new(),
    };
    let l = &config.lookups;
    let mut checks = Vec::new();
    for collection in [&l.client.collection, &l.livreur.collection, &l.restaurant.collection, &l.menu.collection] {
        let name = format!("references {collection}");
        let found = dbs.source.collection::<Document>(collection).find_one(doc! {}).projection(doc! { "_id": 1 }).await;
        checks.push(match found {
            Err(e) if error_code(&e) == Some(UNAUTHORIZED) => check(
                name,
                Status::Fail,
                format!("no privilege to read {collection}: grant find on it (the read role)"),
            ),
            Err(e) => check(name, Status::Fail, e.to_string()),
            Ok(_) if !names.contains(collection) => check(
                name,
                Status::Warn,
                format!("{collection} does not exist: every order will carry the anomaly of a missing reference"),
            ),
            Ok(_) => check(name, Status::Ok, "readable"),
        });
    }
    checks
}

async fn checkpoint(config: &Config, dbs: &Databases) -> Check {
    let stream = crate::coordination::stream_name(config);
    if config.archive.sink == ArchiveSink::Delta {
        return check("checkpoint", Status::Ok, "kept in the Delta table, with the rows it covers");
    }
    match config.coordination.checkpoint_store {
        CheckpointStoreKind::File => {
            let path = &config.watch.resume_token_file;
            // watch creates the missing directories: the nearest existing one must be writable.
            let mut directory = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) => parent.to_path_buf(),
                None => std::path::PathBuf::from("."),
            };
            while !directory.is_dir() {
                match directory.parent().filter(|p| !p.as_os_str().is_empty()) {
                    Some(parent) => directory = parent.to_path_buf(),
                    None => directory = std::path::PathBuf::from("."),
                }
            }
            if let Err(e) = CheckpointFile::new(path).load(&stream) {
                return check("checkpoint", Status::Fail, e.to_string());
            }
            let probe = directory.join(format!(".archiver-config-check-{}", std::process::id()));
            match std::fs::write(&probe, b"") {
                Ok(()) => {
                    let _ = std::fs::remove_file(&probe);
                    check("checkpoint", Status::Ok, format!("{} can be written", path.display()))
                }
                Err(e) => check(
                    "checkpoint",
                    Status::Fail,
                    format!(
                        "{} cannot be written ({e}): fix the directory's owner or RESUME_TOKEN_FILE",
                        path.display()
                    ),
                ),
            }
        }
        CheckpointStoreKind::Mongodb => {
            let collection = &config.coordination.checkpoint_collection;
            let found = dbs.archive.collection::<Document>(collection).find_one(doc! { "_id": &stream }).await;
            match found {
                Ok(_) => check("checkpoint", Status::Ok, format!("{collection} readable (stream {stream})")),
                Err(e) if error_code(&e) == Some(UNAUTHORIZED) => check(
                    "checkpoint",
                    Status::Fail,
                    format!("no privilege on {collection}: grant find, insert and update on it (readWrite)"),
                ),
                Err(e) => check("checkpoint", Status::Fail, e.to_string()),
            }
        }
    }
}

async fn oplog(config: &Config, dbs: &Databases) -> Check {
    match read_window(&dbs.source_client).await {
        Ok(Some(window)) => {
            let seconds = window.seconds();
            let warn_below = config.watch.oplog_headroom_warn_secs as f64;
            let hours = seconds / 3600.0;
            if seconds < warn_below {
                check(
                    "oplog window",
                    Status::Warn,
                    format!(
                        "{hours:.1} h, below OPLOG_HEADROOM_WARN_SECS ({warn_below} s): a longer stop of watch \
                         loses history (filled from the orders collection); enlarge the oplog"
                    ),
                )
            } else {
                check("oplog window", Status::Ok, format!("{hours:.1} h"))
            }
        }
        Ok(None) => check("oplog window", Status::Warn, "the source has no oplog"),
        Err(OplogError::Refused { reason, .. }) => check(
            "oplog window",
            Status::Warn,
            format!("not readable ({reason}): grant read on the local database to see it"),
        ),
        Err(e) => check("oplog window", Status::Warn, e.to_string()),
    }
}

async fn archive(config: &Config, dbs: &Databases) -> Vec<Check> {
    let mut checks = Vec::new();
    if config.archive.sink == ArchiveSink::Delta {
        let uri = config.lake.table_uri.clone().unwrap_or_default();
        let opened = tokio::time::timeout(Duration::from_secs(60), Archiver::open_existing_table(config, dbs)).await;
        checks.push(match opened {
            Ok(Ok(Some(_))) => check("archive table", Status::Ok, format!("{uri} readable, of this layout")),
            Ok(Ok(None)) => {
                check("archive table", Status::Ok, format!("{uri}: no table yet, created by the first write"))
            }
            Ok(Err(e)) => check("archive table", Status::Fail, format!("{uri}: {e}")),
            Err(_) => check("archive table", Status::Fail, format!("{uri}: no answer within 60 s")),
        });
    }
    for (collection, model) in wanted_indexes(config, dbs) {
        checks.push(index(collection, model.keys).await);
    }
    checks
}

/// Whether `collection` has an index on `keys`.
async fn index(collection: Collection<Document>, keys: Document) -> Check {
    let name = format!("index {} {keys}", collection.name());
    let found = match collection.list_indexes().await {
        Ok(cursor) => {
            use futures_util::TryStreamExt;
            cursor.try_collect::<Vec<_>>().await.map(|indexes| indexes.iter().any(|i| i.keys == keys))
        }
        // A collection not created yet has no indexes.
        Err(e) if error_code(&e) == Some(26) => Ok(false),
        Err(e) => Err(e),
    };
    match found {
        Ok(true) => check(name, Status::Ok, "present"),
        Ok(false) => check(
            name,
            Status::Warn,
            format!("missing: batch creates it (unless SKIP_INDEXES), or createIndex({keys}) on {}", collection.name()),
        ),
        Err(e) if error_code(&e) == Some(UNAUTHORIZED) => {
            check(name, Status::Warn, format!("cannot list the indexes of {}: no privilege", collection.name()))
        }
        Err(e) => check(name, Status::Warn, e.to_string()),
    }
}

/// The checks as lines, `ok`, `warn` or `FAIL` first, and a last line with the verdict.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let status = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("{status}  {}: {}\n", c.name, c.detail));
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    if failed == 0 {
        out.push_str(&format!("config check: ok ({} checks, {warned} warnings)\n", checks.len()));
    } else {
        out.push_str(&format!("config check: FAILED ({failed} of {} checks failed)\n", checks.len()));
    }
    out
}

/// Whether a check failed.
pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}
