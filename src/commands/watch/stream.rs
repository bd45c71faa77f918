//! The change stream: its server-side filter, where it starts, and the reader that cuts its
//! events into batches for the writer. It knows nothing of how a batch is archived.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::DateTime;
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::error::Error;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::coordination;
use crate::db::{error_code, timed_out, Databases, UNAUTHORIZED};
use crate::error::UsageError;
use crate::telemetry::Telemetry;

/// Operation types after which a change stream cannot continue (`drop` and `rename` when they
/// concern the orders collection).
pub(super) const INVALIDATING_OPERATIONS: &[&str] = &["drop", "rename", "dropDatabase", "invalidate"];

/// Operation types that change one reference document, named by its `_id`; any other event on a
/// reference collection (drop, rename) may change any of them.
const DOCUMENT_OPERATIONS: &[&str] = &["insert", "update", "replace", "delete"];

/// Shortest `maxAwaitTimeMS`, so a zero batch wait does not turn into a busy loop.
const MIN_AWAIT: Duration = Duration::from_millis(50);

/// How often an idle stream's advancing position is saved.
const IDLE_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// The fields of a change event that `watch` uses; the server projects away the rest.
#[derive(Debug, Deserialize)]
pub(super) struct StreamEvent {
    #[serde(rename = "_id")]
    pub(super) token: ResumeToken,
    #[serde(rename = "operationType")]
    pub(super) operation: String,
    #[serde(rename = "documentKey", default)]
    pub(super) document_key: Option<RawDocumentBuf>,
    #[serde(rename = "clusterTime", default)]
    pub(super) cluster_time: Option<Timestamp>,
    #[serde(rename = "wallTime", default)]
    pub(super) wall_time: Option<mongodb::bson::DateTime>,
    #[serde(default)]
    ns: Option<Namespace>,
    #[serde(default)]
    to: Option<Namespace>,
    /// The session of the transaction the event belongs to, if any.
    #[serde(default)]
    lsid: Option<RawDocumentBuf>,
    /// The transaction's number within its session.
    #[serde(rename = "txnNumber", default)]
    txn_number: Option<i64>,
}

/// The collection of an event (and, for a rename, its new name).
#[derive(Debug, Deserialize)]
struct Namespace {
    #[serde(default)]
    db: Option<String>,
    #[serde(default)]
    coll: Option<String>,
}

/// What an event of the stream means for `watch`.
enum Meaning {
    /// An order was delivered.
    Delivery,
    /// The stream cannot go on (the orders collection or the database went away).
    End,
    /// Reference documents changed (for a rename: the collections on both sides): the joiner
    /// forgets what it read of them.
    References(Vec<ReferenceChange>),
}

impl StreamEvent {
    /// The transaction the event belongs to (its session and number), if any.
    fn transaction(&self) -> Option<(Vec<u8>, i64)> {
        Some((self.lsid.as_ref()?.as_bytes().to_vec(), self.txn_number?))
    }

    /// The `_id` of the changed document, when the event names one.
    pub(super) fn id(&self) -> Option<Bson> {
        self.order_id().ok()
    }

    /// The `_id` of the changed document, or why it cannot be read.
    pub(super) fn order_id(&self) -> Result<Bson, String> {
        let key = self.document_key.as_ref().ok_or("the event has no documentKey")?;
        let id = key.get("_id").map_err(|e| format!("documentKey cannot be read: {e}"))?;
        let id = id.ok_or("documentKey has no _id")?;
        Bson::try_from(id).map_err(|e| format!("documentKey._id cannot be read: {e}"))
    }

    /// The position of the event, in the server's words (the `_data` of its resume token).
    pub(super) fn position(&self) -> String {
        mongodb::bson::to_bson(&self.token)
            .ok()
            .and_then(|token| token.as_document().and_then(|d| d.get_str("_data").ok().map(str::to_owned)))
            .unwrap_or_else(|| format!("{:?}", self.token))
    }

    fn collection(&self) -> Option<&str> {
        self.ns.as_ref().and_then(|ns| ns.coll.as_deref())
    }

    /// What the event means for a stream of the orders collection `orders` of database `db`.
    fn meaning(&self, db: &str, orders: &str) -> Meaning {
        let operation = self.operation.as_str();
        let renamed_to = self.to.as_ref().filter(|to| to.db.as_deref().is_none_or(|d| d == db));
        let renamed_to = renamed_to.and_then(|to| to.coll.as_deref());
        let collection = self.collection();
        if INVALIDATING_OPERATIONS.contains(&operation)
            && (collection.is_none_or(|c| c == orders) || renamed_to == Some(orders))
        {
            return Meaning::End;
        }
        match collection {
            Some(c) if c != orders => {
                let id = DOCUMENT_OPERATIONS.contains(&operation).then(|| self.id()).flatten();
                let mut changes = vec![ReferenceChange { collection: c.to_owned(), id }];
                // Renamed onto a reference collection (as `$out` does): all of it changed.
                changes.extend(renamed_to.map(|to| ReferenceChange { collection: to.to_owned(), id: None }));
                Meaning::References(changes)
            }
            _ => Meaning::Delivery,
        }
    }
}

/// What the reader hands the writer.
#[derive(Debug)]
pub(super) struct StreamBatch {
    pub(super) events: Vec<StreamEvent>,
    /// Resume after this once the events are archived.
    pub(super) token: Option<ResumeToken>,
    /// Set when the stream ended on a drop/rename/invalidate event.
    pub(super) invalidated: Option<String>,
    /// Reference documents changed before the last of these events, in stream order: what the
    /// joiner read of them is forgotten before the batch is enriched.
    pub(super) references_changed: Vec<ReferenceChange>,
}

/// The change stream pipeline: only changes that leave an order delivered, plus the events that
/// end the stream, with only the fields `watch` reads. With `references`, also every change of
/// these reference collections (the stream is then opened on the database).
pub fn delivered_filter(config: &Config, references: &[String]) -> Vec<Document> {
    let status = &config.orders.fields.status;
    let delivered = &config.orders.delivered_status;
    let deliveries = doc! { "$or": [
        {
            "operationType": { "$in": ["insert", "replace"] },
            format!("fullDocument.{status}"): delivered,
        },
        { "operationType": "update", "$or": status_set_by_update(status, delivered) },
    ] };
    filter_of(config, deliveries, references)
}

/// The stream pipeline that reads past change events too large for the server to send: every
/// insert, update and replace of an order, matched without reading the document or the update
/// (whether it delivers the order is asked of the orders collection), and the same other events
/// as [`delivered_filter`].
fn changes_filter(config: &Config, references: &[String]) -> Vec<Document> {
    filter_of(config, doc! { "operationType": { "$in": ["insert", "update", "replace"] } }, references)
}

/// The stream pipeline of the order changes `deliveries` matches.
fn filter_of(config: &Config, deliveries: Document, references: &[String]) -> Vec<Document> {
    let orders = &config.orders.collection;
    // A partitioned worker only receives its share, filtered by the server.
    let deliveries = coordination::restrict_to_partition(config, deliveries, "$documentKey._id");
    let mut events = vec![
        Bson::Document(doc! { "$and": [{ "ns.coll": orders }, deliveries] }),
        Bson::Document(doc! { "operationType": { "$in": ["drop", "rename"] }, "ns.coll": orders }),
        Bson::Document(doc! { "operationType": "rename", "to.coll": orders }),
        Bson::Document(doc! { "operationType": { "$in": ["dropDatabase", "invalidate"] } }),
    ];
    if !references.is_empty() {
        events.push(Bson::Document(doc! { "ns.coll": { "$in": references } }));
        events.push(Bson::Document(doc! { "operationType": "rename", "to.coll": { "$in": references } }));
    }
    vec![
        doc! { "$match": { "$or": events } },
        doc! { "$project": {
            "operationType": 1, "documentKey": 1, "clusterTime": 1, "wallTime": 1, "ns.coll": 1, "to": 1,
            "lsid": 1, "txnNumber": 1,
        } },
    ]
}

/// The conditions under which an update event sets `status` (a field path) to `delivered`. An
/// update names what it set in `updatedFields` by path: `{"suivi": {"etat": …}}` when the parent
/// was set whole, which a query path reaches, but `{"suivi.etat": …}` — one field whose name
/// holds the dot — when the path itself was set, which no query path reaches: for each such
/// split of the path, the field is found by name (`$objectToArray`, on every supported server).
fn status_set_by_update(status: &str, delivered: &str) -> Vec<Bson> {
    let mut conditions = vec![Bson::Document(doc! { format!("updateDescription.updatedFields.{status}"): delivered })];
    let parts: Vec<&str> = status.split('.').collect();
    for split in 2..=parts.len() {
        let name = parts[..split].join(".");
        let field = doc! { "$arrayElemAt": [
            { "$filter": {
                "input": { "$objectToArray": "$updateDescription.updatedFields" },
                "cond": { "$eq": ["$$this.k", &name] },
            } },
            0,
        ] };
        let value = match parts[split..].join(".") {
            rest if rest.is_empty() => "$$field.v".to_owned(),
            rest => format!("$$field.v.{rest}"),
        };
        let set = doc! { "$let": { "vars": { "field": field }, "in": value } };
        conditions.push(Bson::Document(doc! { "$expr": { "$eq": [set, delivered] } }));
    }
    conditions
}

/// Where a stream without a saved token starts.
#[derive(Debug, Clone, Copy)]
pub enum StartPosition {
    /// Changes from the moment the stream opens.
    Now,
    /// Changes from this cluster time.
    At(Timestamp),
}

impl StartPosition {
    /// Parses `--start-at`: `now` or an RFC 3339 time.
    pub fn parse(value: &str) -> Result<Self, UsageError> {
        if value.eq_ignore_ascii_case("now") {
            return Ok(StartPosition::Now);
        }
        let time = DateTime::parse_from_rfc3339(value)
            .map_err(|e| UsageError(format!("--start-at {value:?}: expected `now` or an RFC 3339 time ({e})")))?;
        let secs =
            u32::try_from(time.timestamp()).map_err(|_| UsageError(format!("--start-at {value:?} is out of range")))?;
        Ok(StartPosition::At(Timestamp { time: secs, increment: 0 }))
    }
}

/// How long the server holds an idle getMore of the stream open.
pub(super) fn open_stream_await(config: &Config) -> Duration {
    Duration::from_millis(config.watch.batch_max_wait_ms).max(MIN_AWAIT)
}

/// A change of a reference document (`id`), or of any document of its collection (`None`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ReferenceChange {
    pub(super) collection: String,
    pub(super) id: Option<Bson>,
}

/// An open stream, and whether it also carries the changes of the reference collections.
pub(super) struct OpenStream {
    pub(super) stream: ChangeStream<StreamEvent>,
    pub(super) follows_references: bool,
}

/// Opens the filtered stream after `resume`, or else at `start`. The stream is opened on the
/// source database whenever the user may watch it, and then carries the changes of the
/// reference collections too, whether the writer keeps references (`keep_references`) or not:
/// one filter for every stream on the database, so that any position one saved, a reference
/// change's included, resumes any other (a server may look for the resumed event behind the
/// filter), and the saved position advances whatever the traffic. A user without the privilege
/// to watch the whole database gets the stream of the orders collection alone (logged), and
/// references are then read for every batch.
pub(super) async fn open_stream(
    config: &Config,
    dbs: &Databases,
    resume: Option<&ResumeToken>,
    start: StartPosition,
    keep_references: bool,
) -> Result<OpenStream, Error> {
    let references = reference_collections(config);
    match open(config, dbs, resume, start, Scope::Database(&references), delivered_filter).await {
        Err(e) if error_code(&e) == Some(UNAUTHORIZED) => {
            let error = crate::redact::scrub(&e.to_string());
            // Said once per process, not at each reopening; the metric
            // `archiver_reference_cache_enabled` stays at 0 meanwhile.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::debug!(database = %dbs.source.name(), error = %error,
                    "no privilege to watch the whole source database: watching the orders collection alone");
            } else if keep_references {
                tracing::warn!(
                    database = %dbs.source.name(), error = %error,
                    "no privilege to watch the whole source database (changeStream and find on it, \
                     e.g. the read role): watching the orders collection alone, and reading the \
                     references afresh for every batch"
                );
            } else {
                tracing::info!(database = %dbs.source.name(), error = %error,
                    "no privilege to watch the whole source database: watching the orders collection alone");
            }
        }
        opened => return opened.map(|stream| OpenStream { stream, follows_references: keep_references }),
    }
    let stream = open(config, dbs, resume, start, Scope::Collection, delivered_filter).await?;
    Ok(OpenStream { stream, follows_references: false })
}

/// The stream of [`changes_filter`] after `resume`, on the database when the user may watch it
/// (as [`open_stream`] decides), else on the orders collection.
async fn open_changes(
    config: &Config,
    dbs: &Databases,
    resume: Option<&ResumeToken>,
) -> Result<ChangeStream<StreamEvent>, Error> {
    let references = reference_collections(config);
    match open(config, dbs, resume, StartPosition::Now, Scope::Database(&references), changes_filter).await {
        Err(e) if error_code(&e) == Some(UNAUTHORIZED) => {
            open(config, dbs, resume, StartPosition::Now, Scope::Collection, changes_filter).await
        }
        opened => opened,
    }
}

/// The server's code for a document, here a change event, over 16 MB.
const BSON_OBJECT_TOO_LARGE: i32 = 10334;

/// Whether `err` says the stream's next event is too large for the server to send: every
/// resume from the same position would meet it again.
pub(super) fn is_event_too_large(err: &Error) -> bool {
    error_code(err) == Some(BSON_OBJECT_TOO_LARGE)
}

/// What [`read_past_large_events`] found.
pub(super) struct ChangesRead {
    /// The orders changed, with the time of their change.
    pub(super) orders: Vec<(Bson, Option<mongodb::bson::DateTime>)>,
    /// Order changes whose order id cannot be read: their position and why.
    pub(super) unreadable: Vec<(String, String)>,
    /// References changed among them.
    pub(super) references_changed: Vec<ReferenceChange>,
    /// The position after the last change read, once the stream has caught up (then it is a
    /// position past every event, which any stream resumes from, whatever its filter); none if
    /// nothing was read, or if the stream did not catch up within the limit.
    pub(super) token: Option<ResumeToken>,
    /// The last change's cluster time.
    pub(super) cluster_time: Option<Timestamp>,
}

/// Reads the changes after `resume` with a stream that never ships an order's content (see
/// [`changes_filter`]) until it has caught up, up to `limit` of them, stopping before an event
/// that ends the stream: the orders they name are then archived if the orders collection says
/// they are delivered. This reads past a change event that the delivered-orders stream cannot
/// get from the server (over 16 MB). The position is only given once caught up: the token of an
/// event this stream matches and the delivered-orders stream does not would not resume the
/// latter (a server looks for the resumed event behind the filter).
pub(super) async fn read_past_large_events(
    config: &Config,
    dbs: &Databases,
    resume: Option<&ResumeToken>,
    limit: usize,
) -> Result<ChangesRead, Error> {
    let mut stream = open_changes(config, dbs, resume).await?;
    let db = dbs.source.name().to_owned();
    let mut read = ChangesRead {
        orders: Vec::new(),
        unreadable: Vec::new(),
        references_changed: Vec::new(),
        token: None,
        cluster_time: None,
    };
    let mut seen = 0;
    while seen < limit {
        let Some(event) = stream.next_if_any().await? else {
            // Caught up: the stream's position is past every event read.
            read.token = (seen > 0).then(|| stream.resume_token()).flatten();
            return Ok(read);
        };
        seen += 1;
        match event.meaning(&db, &config.orders.collection) {
            Meaning::End => return Ok(read),
            Meaning::References(changes) => read.references_changed.extend(changes),
            Meaning::Delivery => match event.order_id() {
                Ok(id) => read.orders.push((id, event.wall_time)),
                Err(reason) => read.unreadable.push((event.position(), reason)),
            },
        }
        read.cluster_time = event.cluster_time;
    }
    Ok(read)
}

/// The reference collections named by the configuration, the orders collection left out.
fn reference_collections(config: &Config) -> Vec<String> {
    let l = &config.lookups;
    let mut names: Vec<String> = [&l.client, &l.livreur, &l.restaurant]
        .iter()
        .map(|d| d.collection.clone())
        .chain([l.menu.collection.clone()])
        .filter(|name| name != &config.orders.collection)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// What a stream watches.
enum Scope<'a> {
    /// The source database: the orders collection's events, and every change of these
    /// reference collections.
    Database(&'a [String]),
    /// The orders collection alone.
    Collection,
}

async fn open(
    config: &Config,
    dbs: &Databases,
    resume: Option<&ResumeToken>,
    start: StartPosition,
    scope: Scope<'_>,
    filter: fn(&Config, &[String]) -> Vec<Document>,
) -> Result<ChangeStream<StreamEvent>, Error> {
    let orders = dbs.source.collection::<Document>(&config.orders.collection);
    let (watch, references) = match scope {
        Scope::Database(references) => (dbs.source.watch(), references),
        Scope::Collection => (orders.watch(), &[][..]),
    };
    let watch = watch
        .pipeline(filter(config, references))
        .max_await_time(open_stream_await(config))
        .batch_size(config.watch.batch_size.min(u32::MAX as usize) as u32);
    let stream = match (resume, start) {
        (Some(token), _) => watch.resume_after(token.clone()).await?,
        (None, StartPosition::At(ts)) => watch.start_at_operation_time(ts).await?,
        (None, StartPosition::Now) => watch.await?,
    };
    Ok(stream.with_type::<StreamEvent>())
}

/// Hands `message` to the writer unless stopped first; false when the reader should end (stopped,
/// or the writer is gone). Every send races `stop`: a writer that failed stops reading the
/// channel, and a reader parked on a full channel would otherwise never return.
async fn hand_over(
    tx: &mpsc::Sender<Result<StreamBatch, Error>>,
    message: Result<StreamBatch, Error>,
    stop: &CancellationToken,
) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        sent = tx.send(message) => sent.is_ok(),
    }
}

/// How many times the silence limit a stream may stay silent before it is reopened.
const SILENT_STREAM_REOPEN_AFTER: u32 = 6;

/// The stream's next answer. Silent for `silence_limit`, the stream is reported not ready (a
/// network that went quiet, or a server too busy to answer); silent for
/// [`SILENT_STREAM_REOPEN_AFTER`] times that, it fails with a transient error and is reopened. A
/// late answer in between makes it ready again: reopening a slow stream would only repeat the
/// slow read.
async fn next_within(
    stream: &mut ChangeStream<StreamEvent>,
    silence_limit: Duration,
    telemetry: &Telemetry,
) -> Result<Option<StreamEvent>, Error> {
    let next = stream.next_if_any();
    tokio::pin!(next);
    if let Ok(answer) = tokio::time::timeout(silence_limit, &mut next).await {
        return answer;
    }
    tracing::warn!(silent_ms = silence_limit.as_millis() as u64, "the change stream does not answer; not ready");
    telemetry.stream_lost("change stream silent");
    let reopen_after = silence_limit * SILENT_STREAM_REOPEN_AFTER;
    match tokio::time::timeout(reopen_after - silence_limit, &mut next).await {
        Ok(answer) => {
            if answer.is_ok() {
                tracing::info!("the change stream answers again");
                telemetry.stream_opened();
            }
            answer
        }
        Err(_) => Err(timed_out("reading the change stream", reopen_after)),
    }
}

/// Pulls events and cuts them into batches until stopped or the stream fails. A batch is cut
/// as soon as the writer waits for one (`writer_idle`): a delivery is archived without waiting
/// for others when there is capacity to spare, and batches grow by themselves while the writer
/// is busy. Otherwise it is cut at `batch_size` events or `max_wait` after its first. A stream
/// that stays silent for `silence_limit` (beyond the server's await time, which already bounds
/// an idle getMore) is taken for a network fault and reported as a transient error.
#[allow(clippy::too_many_arguments)]
pub(super) async fn read_batches(
    mut stream: ChangeStream<StreamEvent>,
    tx: mpsc::Sender<Result<StreamBatch, Error>>,
    batch_size: usize,
    max_wait: Duration,
    silence_limit: Duration,
    writer_idle: Arc<AtomicBool>,
    [db, orders]: [String; 2],
    telemetry: Arc<Telemetry>,
    stop: CancellationToken,
) {
    let mut last_token = stream.resume_token();
    let mut last_idle_save = Instant::now();
    // An event read past the end of a batch (it belongs to the next one).
    let mut carried: Option<StreamEvent> = None;
    loop {
        let mut events: Vec<StreamEvent> = Vec::new();
        let mut references_changed = Vec::new();
        let mut first_event_at: Option<Instant> = None;
        let mut invalidated = None;
        // The transaction of the last event read, and where its deliveries start in `events`:
        // a batch is never cut inside a transaction, or an order it delivers could be enriched
        // before the reference changes it commits with are read (and forgotten from the cache).
        let mut open_transaction: Option<(Vec<u8>, i64)> = None;
        let mut transaction_start = 0;
        let mut cut = false;
        // The position of the last event of the batch, and whether an event was read past it.
        let mut last_read: Option<ResumeToken> = None;
        let mut read_past = false;
        loop {
            let next = match carried.take() {
                Some(event) => Ok(Some(event)),
                None => tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    next = next_within(&mut stream, silence_limit, &telemetry) => next,
                },
            };
            match next {
                Err(e) => {
                    // Not ready from now on, even while the writer is still busy with (or stuck
                    // on) the batch before: readiness tells the stream's state, not the writer's.
                    telemetry.stream_lost("reconnecting");
                    // Hand over what was read first: it is valid, only unsaved; but not the
                    // deliveries of a transaction whose end was not read (replayed after reopening).
                    if open_transaction.is_some() {
                        events.truncate(transaction_start);
                    }
                    if !events.is_empty() {
                        let token = events.last().map(|e| e.token.clone());
                        let batch = StreamBatch { events, token, invalidated: None, references_changed };
                        if !hand_over(&tx, Ok(batch), &stop).await {
                            return;
                        }
                    }
                    hand_over(&tx, Err(e), &stop).await;
                    return;
                }
                Ok(Some(event)) => {
                    let transaction = event.transaction();
                    if transaction != open_transaction {
                        if cut {
                            // The transaction the batch was held open for ended with the event before.
                            read_past = true;
                            carried = Some(event);
                            break;
                        }
                        open_transaction = transaction;
                        transaction_start = events.len();
                    }
                    match event.meaning(&db, &orders) {
                        Meaning::End => {
                            invalidated = Some(event.operation);
                            break;
                        }
                        Meaning::References(changes) => {
                            references_changed.extend(changes);
                            last_read = Some(event.token);
                        }
                        Meaning::Delivery => {
                            last_read = Some(event.token.clone());
                            events.push(event);
                        }
                    }
                    first_event_at.get_or_insert_with(Instant::now);
                    cut = cut
                        || events.len() >= batch_size
                        || references_changed.len() >= batch_size
                        || writer_idle.load(Ordering::Acquire)
                        || first_event_at.is_some_and(|t| t.elapsed() >= max_wait);
                    if cut && open_transaction.is_none() {
                        break;
                    }
                }
                // Nothing more for now: a transaction's events become visible together, so any
                // transaction read is complete.
                Ok(None) => break,
            }
        }
        let token = if invalidated.is_some() {
            // Never save the invalidating event's own token: it cannot be resumed after.
            events.last().map(|e| e.token.clone()).or_else(|| last_token.clone())
        } else if read_past {
            last_read
        } else {
            // After a reference change too: a stream that carries reference changes is opened on
            // the database, and any stream opened on it resumes from any of its positions.
            stream.resume_token()
        };
        if events.is_empty() && invalidated.is_none() {
            // No delivery: pass the advancing position on now and then, so a quiet collection's
            // token stays inside the oplog window; changed references go on at once, without it.
            // A reference collection dropped or renamed reopens the stream (see `run_stream`):
            // its position is saved at once, or the reopened stream would read it again.
            let replaced = references_changed.iter().any(|change: &ReferenceChange| change.id.is_none());
            if token == last_token || (last_idle_save.elapsed() < IDLE_CHECKPOINT_EVERY && !replaced) {
                if !references_changed.is_empty() {
                    let batch = StreamBatch { events, token: None, invalidated, references_changed };
                    if !hand_over(&tx, Ok(batch), &stop).await {
                        return;
                    }
                }
                continue;
            }
            last_idle_save = Instant::now();
        }
        last_token = token.clone();
        let done = invalidated.is_some();
        let batch = StreamBatch { events, token, invalidated, references_changed };
        if !hand_over(&tx, Ok(batch), &stop).await || done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matches_delivered_transitions_only() {
        let mut config = Config::default();
        config.orders.fields.status = "etat".into();
        config.orders.delivered_status = "done".into();
        let pipeline = delivered_filter(&config, &[]);
        let or = pipeline[0].get_document("$match").unwrap().get_array("$or").unwrap();
        assert_eq!(or.len(), 4, "deliveries and the three kinds of end, no reference");
        let and = or[0].as_document().unwrap().get_array("$and").unwrap();
        assert_eq!(and[0].as_document().unwrap().get_str("ns.coll").unwrap(), config.orders.collection);
        let deliveries = and[1].as_document().unwrap().get_array("$or").unwrap();
        let insert = deliveries[0].as_document().unwrap();
        assert_eq!(insert.get_str("fullDocument.etat").unwrap(), "done");
        let update = deliveries[1].as_document().unwrap();
        assert_eq!(update.get_str("operationType").unwrap(), "update");
        let set = update.get_array("$or").unwrap();
        assert_eq!(set.len(), 1, "a plain field name needs no lookup by name");
        assert_eq!(set[0].as_document().unwrap().get_str("updateDescription.updatedFields.etat").unwrap(), "done");
        // A dotted status: the path, and each of its prefixes named as one field.
        assert_eq!(status_set_by_update("a.b.c", "done").len(), 3);
        let project = pipeline[1].get_document("$project").unwrap();
        assert!(!project.contains_key("fullDocument"), "full documents are not shipped");

        let references = ["Client".to_owned(), "Menu".to_owned()];
        let pipeline = delivered_filter(&config, &references);
        let or = pipeline[0].get_document("$match").unwrap().get_array("$or").unwrap();
        let followed = or[4].as_document().unwrap().get_document("ns.coll").unwrap().get_array("$in").unwrap();
        assert_eq!(followed, &vec![Bson::from("Client"), Bson::from("Menu")]);
    }

    fn event(operation: &str, collection: Option<&str>, renamed_to: Option<&str>) -> StreamEvent {
        let namespace = |coll: Option<&str>| coll.map(|c| doc! { "db": "d", "coll": c });
        let mut event = doc! { "_id": { "_data": "00" }, "operationType": operation, "documentKey": { "_id": 7 } };
        if let Some(ns) = namespace(collection) {
            event.insert("ns", ns);
        }
        if let Some(to) = namespace(renamed_to) {
            event.insert("to", to);
        }
        mongodb::bson::from_document(event).unwrap()
    }

    #[test]
    fn an_event_without_a_readable_order_id_says_why() {
        // Such a delivery is dead-lettered by the writer under its position; it used to be
        // skipped without a word.
        let mut e = event("update", Some("Commandes"), None);
        assert_eq!(e.order_id(), Ok(Bson::Int32(7)));
        e.document_key = None;
        assert!(e.order_id().unwrap_err().contains("no documentKey"));
        e.document_key = Some(RawDocumentBuf::from_document(&doc! { "x": 1 }).unwrap());
        assert!(e.order_id().unwrap_err().contains("no _id"));
        assert_eq!(e.position(), "00");
    }

    #[test]
    fn events_are_told_apart_by_collection_and_operation() {
        let orders = "Commandes";
        let reference = |e: &StreamEvent| match e.meaning("d", orders) {
            Meaning::References(changes) => Some(changes),
            _ => None,
        };
        let ends = |e: &StreamEvent| matches!(e.meaning("d", orders), Meaning::End);
        assert!(matches!(event("update", Some(orders), None).meaning("d", orders), Meaning::Delivery));
        // A collection's own stream: the invalidate event names no collection.
        assert!(ends(&event("invalidate", None, None)));
        assert!(ends(&event("drop", Some(orders), None)));
        assert!(ends(&event("rename", Some(orders), Some("Old"))));
        assert!(ends(&event("rename", Some("Other"), Some(orders))));
        assert!(ends(&event("dropDatabase", None, None)));
        for operation in ["insert", "update", "replace", "delete"] {
            let changes = reference(&event(operation, Some("Client"), None)).unwrap();
            assert_eq!(changes, [ReferenceChange { collection: "Client".into(), id: Some(Bson::Int32(7)) }]);
        }
        // Drop of a reference collection: all of its documents; a rename: both sides (a
        // collection renamed onto a reference collection, as `$out` does, replaces it).
        let whole = |c: &str| ReferenceChange { collection: c.into(), id: None };
        assert_eq!(reference(&event("drop", Some("Menu"), None)).unwrap(), [whole("Menu")]);
        assert_eq!(reference(&event("rename", Some("Menu"), Some("Carte"))).unwrap(), [whole("Menu"), whole("Carte")]);
        let out = reference(&event("rename", Some("tmp.agg_out"), Some("Menu"))).unwrap();
        assert_eq!(out, [whole("tmp.agg_out"), whole("Menu")]);
        // A collection renamed to the orders' name in another database ends nothing here.
        let mut elsewhere = event("rename", Some("Other"), None);
        elsewhere.to = Some(Namespace { db: Some("e".into()), coll: Some(orders.into()) });
        assert!(!ends(&elsewhere));
    }
}
