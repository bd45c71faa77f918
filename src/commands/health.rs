//! `archiver health`: a one-shot report on the source, the archive and the checkpoint that
//! `watch` would resume from — the token file, or with `CHECKPOINT_STORE=mongodb` the shared
//! checkpoint document and the lease of the stream, for the configured partition.

use mongodb::bson::{doc, Document};
use serde_json::{json, Value};

use crate::checkpoint::MongoCheckpoints;
use crate::checkpoint::{Checkpoint, CheckpointFile, StoreError};
use crate::config::{CheckpointStoreKind, Config};
use crate::coordination::{self, Lease};
use crate::db;
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
            let source = source_report(config, &dbs.source, &mut healthy).await;
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
    let token = token_report(config, dbs.as_ref(), &mut healthy).await;
    let report = json!({
        "status": if healthy { "healthy" } else { "unhealthy" },
        "version": env!("CARGO_PKG_VERSION"),
        "source": source,
        "archive": archive,
        "resume_token": token,
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

/// The checkpoint `watch` resumes from: the same store and the same stream name (with the
/// partition) as `watch` itself, so a partitioned worker's checkpoint is found and checked.
async fn token_report(config: &Config, dbs: Option<&db::Databases>, healthy: &mut bool) -> Value {
    let stream = coordination::stream_name(config);
    let mut report = match config.coordination.checkpoint_store {
        CheckpointStoreKind::File => file_token(config, &stream, healthy),
        CheckpointStoreKind::Mongodb => match dbs {
            Some(dbs) => shared_token(config, dbs, &stream, healthy).await,
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

fn file_token(config: &Config, stream: &str, healthy: &mut bool) -> Value {
    let path = &config.watch.resume_token_file;
    let file = path.display().to_string();
    // `watch` records its stream name in the file and refuses a file of another stream.
    let mut report = checkpoint_report(CheckpointFile::new(path).load(stream), healthy);
    report["store"] = Value::from("file");
    report["file"] = Value::from(file);
    report
}

async fn shared_token(config: &Config, dbs: &db::Databases, stream: &str, healthy: &mut bool) -> Value {
    // The epoch only matters to writers; this store is only read.
    let mut store = MongoCheckpoints::new(&dbs.archive, config, stream, 0);
    let mut report = checkpoint_report(store.load().await, healthy);
    report["store"] = Value::from("mongodb");
    report["collection"] = Value::from(config.coordination.checkpoint_collection.clone());
    let leases = Lease::collection(&dbs.archive, config);
    report["lease"] = match Lease::current(&leases, stream).await {
        Ok(Some(lease)) => json!({
            "holder": lease.holder,
            "epoch": lease.epoch,
            "expires_at": lease.expires_at,
            // An expired lease: no process is writing this stream right now.
            "expired": lease.expires_at < chrono::Utc::now(),
        }),
        Ok(None) => json!({ "holder": null, "note": "no process has led this stream yet" }),
        Err(e) => {
            *healthy = false;
            json!({ "error": scrub(&e.to_string()) })
        }
    };
    report
}

fn checkpoint_report(loaded: Result<Option<Checkpoint>, StoreError>, healthy: &mut bool) -> Value {
    match loaded {
        Ok(Some(cp)) => {
            let position = cp.last_event_wall_time.unwrap_or(cp.saved_at);
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
