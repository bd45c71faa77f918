//! The Delta Lake adapter of the archive (`ARCHIVE_SINK=delta`): each archive document becomes
//! one typed row of a Delta table (`ARCHIVE_TABLE_URI`), partitioned by its UTC day of delivery,
//! with the whole document also kept as canonical Extended JSON so that nothing is ever lost.
//!
//! One row per order: before rows are committed, each is looked for in the files of its day
//! whose `_id` bounds hold its id ([`ids`]: their `_id` column is read, and kept in memory up to
//! a bound) and rows already there are left out. A commit is made on exactly the table version
//! those ids were read from (no automatic retry on a
//! newer one): when another writer committed in between, the commit fails, the new files' ids
//! are read, and what they hold is left out before trying again. Duplicates are prevented, not
//! cleaned up later. The files a failed attempt wrote are referenced by no commit and are
//! removed by a vacuum.
//!
//! The table's layout (its columns) is fixed by [`LAYOUT_VERSION`], recorded in the table's
//! properties: a table of another layout is refused, never altered. Dead letters go to a second
//! table beside it ([`errors`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{NaiveDate, Utc};
use deltalake::arrow::array::{Array, RecordBatch, StringArray};
use deltalake::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, StructType, Transaction};
// `ParquetObjectReader` is deprecated in parquet 59 for a hand-written `AsyncFileReader`; it
// still reads only the footer and the `_id` column's pages, which is all this needs.
use deltalake::logstore::object_store::ObjectStoreExt;
#[allow(deprecated)]
use deltalake::parquet::arrow::async_reader::ParquetObjectReader;
use deltalake::parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use futures_util::TryStreamExt;
use mongodb::bson::{Bson, RawDocumentBuf};

mod columns;
pub mod errors;
mod ids;

use self::columns::Columns;
use self::errors::ErrorsTable;
use self::ids::{DataFile, IdCache, Listing, OrderKey, SortedIds};
use super::{ArchiveStore, DeadLetter, OpenError, Refusal, StoreFuture, WriteOutcome};
use crate::checkpoint::{Checkpoint, CheckpointKeeper, KeeperFuture, StoreError};
use crate::config::Config;
use crate::pipeline::document::{field, item_field};
use crate::pipeline::order_id::id_text;

/// The layout of the table's columns this version writes. A table recorded with another one is
/// refused: its columns are not what this version reads and writes.
pub const LAYOUT_VERSION: u32 = 1;

/// The table property holding [`LAYOUT_VERSION`].
const LAYOUT_PROPERTY: &str = "archiver.layout";

/// The partition column: the UTC day of `date_livraison` (of `archived_at` when that is not a
/// date).
pub const DELIVERY_DATE: &str = "delivery_date";

/// The column holding the whole archive document as canonical Extended JSON.
pub const DOCUMENT: &str = "document";

/// Attempts of one commit when other writers keep committing first.
const COMMIT_ATTEMPTS: usize = 20;

/// Order ids of the table kept in memory between appends, at most (12 bytes an ObjectId): past
/// it, the ids of the files used least recently are forgotten, and read again when a file of
/// theirs may hold an order that comes (see [`ids`]).
const IDS_KEPT: usize = 2_000_000;

/// Days with a data file being written past which those files are finished: each open file
/// holds a row group, an upload part and its column writers in memory (measured: with all 31
/// days of a batch open at once, its peak RSS was 219 MB instead of 122, and 664 MB with the
/// upload parts of larger files). Finished files wait, referenced by nothing, for the commit,
/// which `LAKE_FILE_MB` or time decides. Rows of the other days are held back
/// ([`HELD_BACK_BYTES`]).
const OPEN_DAYS: usize = 4;

/// Bytes of rows (as columns in memory) of days whose files are not open held back, at most,
/// before they are encoded, a file per day: rows of many days, a few each (orders read in an
/// order unrelated to their days), made a file per day of each chunk, tens of thousands of
/// files for a million orders, each an entry in the table's state in memory (some 2.6 KB).
/// Measured on a million orders of 31 days in random order (`batch`): without holding back,
/// 27,000 files, peak RSS 218 MB, 11,040 orders/s; 8 MB: 5,259 files, 202 MB, 12,407/s; 32 MB:
/// 1,520 files, 249 MB, 13,076/s.
const HELD_BACK_BYTES: usize = 8 * 1024 * 1024;

/// The age under which `vacuum` keeps a data file no commit references, whatever its
/// retention: a writer may still be about to commit it (`watch` between its commits, or a
/// `batch` whose rows of many days wait for the commit size).
const UNREFERENCED_KEPT_HOURS: i64 = 24;

/// Where the positions committed with the data are kept, per writer (application id), by the
/// version of the writer's application transaction. A Delta checkpoint keeps the transaction
/// versions when old log entries (and their commit metadata) are cleaned up; these files keep
/// what each version stands for. Readers and vacuum leave `_`-prefixed directories alone.
const POSITIONS_DIR: &str = "_archiver/positions";

/// How many table versions a start reads the position of, while another writer of its stream
/// keeps committing, before it gives up (an error: `watch` tries again).
const POSITION_READS: usize = 5;

/// The low bits of an application transaction version name the writer process that made it
/// (a random tag drawn at open, and again after a failed commit); the high bits count the
/// commits. Two writers of one stream racing for the same commit so write their positions
/// under different versions: neither can overwrite the position of the version the other
/// commits (two tags alike, one chance in a million, would bring that race back).
const WRITER_BITS: u32 = 20;

/// A writer's tag in its application transaction versions ([`WRITER_BITS`]), drawn at random.
fn new_writer_tag() -> i64 {
    rand::random_range(1..(1_i64 << WRITER_BITS))
}

/// The version of the next commit after `current` (the table's last one for the application),
/// for a writer tagged `writer_tag`: always greater, whoever wrote `current` and whether it was
/// written with tags or not (a table written before tags counts 1, 2, 3…).
fn next_txn_version(current: Option<i64>, writer_tag: i64) -> i64 {
    let commits = current.unwrap_or(0) >> WRITER_BITS;
    ((commits + 1) << WRITER_BITS) | writer_tag
}

/// Where the position a commit of `app_id` at `txn_version` covers is kept.
fn position_location(app_id: &str, txn_version: i64) -> deltalake::Path {
    deltalake::Path::from(format!("{POSITIONS_DIR}/{app_id}/{txn_version:020}.json"))
}

/// Where `purge` records the orders it deleted from the source after verifying their rows.
const PURGED_DIR: &str = "_archiver/purged";

/// Why the table cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    /// The table, its log or its files cannot be read or written.
    #[error("Delta table {uri}: {source}")]
    Table {
        /// The table's location.
        uri: String,
        /// What delta-rs said.
        #[source]
        source: DeltaTableError,
    },
    /// The table exists with columns other than this version's.
    #[error("Delta table {uri}: {reason}")]
    Layout {
        /// The table's location.
        uri: String,
        /// What differs.
        reason: String,
    },
    /// Rows could not be turned into columns or read back.
    #[error("Delta table {uri}: {reason}")]
    Data {
        /// The table's location.
        uri: String,
        /// What failed.
        reason: String,
    },
}

/// A row turned into columns, known by its order id (as text) and its day.
#[derive(Debug)]
struct PreparedRow {
    id: String,
    day: NaiveDate,
    anomalies: bool,
}

/// Archive documents turned into the table's columns ([`RowPreparer::prepare`]), to be
/// appended ([`DeltaArchive::append_prepared`]).
#[derive(Debug)]
pub struct PreparedRows {
    rows: Vec<PreparedRow>,
    /// Their columns (`None` for no rows).
    batch: Option<RecordBatch>,
}

/// Turns archive documents into the columns of one table: the costliest part of an append
/// (reading the BSON, writing the `document` column's Extended JSON), which needs nothing of
/// the table's state, so that the rows of several chunks are prepared at once, on every core,
/// while the table's writer encodes those before them.
#[derive(Debug, Clone)]
pub struct RowPreparer {
    uri: String,
    schema: SchemaRef,
    reference_fields: [Vec<String>; 3],
}

impl RowPreparer {
    /// The rows of `docs`, in their order. Fails whole (no row of them is then appended) when a
    /// document cannot be turned into a row.
    pub fn prepare(&self, docs: Vec<RawDocumentBuf>) -> Result<PreparedRows, LakeError> {
        let data_error = |reason: String| LakeError::Data { uri: self.uri.clone(), reason };
        let mut rows = Vec::with_capacity(docs.len());
        let mut columns = Columns::new(self.schema.clone(), self.reference_fields.clone());
        for document in docs {
            let row = columns.push(&document).map_err(|reason| data_error(format!("an archive document: {reason}")))?;
            rows.push(PreparedRow { id: row.id, day: row.day, anomalies: row.anomalies });
        }
        let batch = if columns.is_empty() { None } else { Some(columns.finish().map_err(data_error)?) };
        Ok(PreparedRows { rows, batch })
    }
}

/// The data files of a table version, each with its day and the bounds of its ids.
type DataFiles = Arc<Listing>;

/// The archive as a Delta table: rows are buffered, then committed.
#[derive(Debug)]
pub struct DeltaArchive {
    uri: String,
    table: DeltaTable,
    schema: SchemaRef,
    reference_fields: [Vec<String>; 3],
    /// The rows waiting for the next commit (already encoded in a data file being written), by
    /// order id, with their day.
    pending: HashMap<OrderKey, NaiveDate>,
    /// The days of the data files being written.
    open_days: HashSet<NaiveDate>,
    /// Rows of days whose files are not open, held back until they are worth files of their
    /// own ([`DeltaArchive::encode_by_days`]), and their size in memory.
    held_back: std::collections::BTreeMap<NaiveDate, Vec<RecordBatch>>,
    held_back_bytes: usize,
    /// [`HELD_BACK_BYTES`].
    held_back_limit: usize,
    /// Encodes the rows waiting into Parquet as they come, streaming the data files to the
    /// store: what waits in memory is at most a row group and an upload part per day.
    /// (The writer is `Send` only; it is reached only through `&mut self`.)
    writer: Option<sync_wrapper::SyncWrapper<RecordBatchWriter>>,
    /// Parquet bytes the writer holds (its last count).
    writer_buffered: usize,
    /// The data files of the rows waiting, once finished, until a commit references them.
    staged: Vec<deltalake::kernel::Add>,
    /// Whether a commit is under way: still true at the next one when it was dropped before
    /// its end.
    committing: bool,
    /// Whether the rows waiting may hold orders of the loaded table version: a lost race
    /// failed before they were left out ([`DeltaArchive::leave_out_committed`]).
    unfiltered: bool,
    /// Why rows appended since the last commit were lost (a data file could not be written):
    /// no later commit may then carry a position, which would cover them. `watch` stops, and
    /// starts again from the table's last commit.
    lost: Option<String>,
    /// The ids of some data files, the latest used.
    ids: IdCache,
    /// How many ids `ids` keeps, at most, between appends ([`IDS_KEPT`]).
    ids_kept: usize,
    /// The data files of the table's loaded version, with their day, and that version: listed
    /// again only when the version changed (an append looks for the files of its days).
    listed: Option<(Option<u64>, DataFiles)>,
    /// Whether a commit is made as soon as the rows waiting reach the commit size (`batch`);
    /// `watch` commits through its checkpoints instead, with the position they cover.
    auto_commit: bool,
    /// Parquet bytes of rows waiting past which they are committed.
    commit_bytes: usize,
    /// The application transaction this writer's commits carry, and its last version.
    app_id: String,
    /// This writer's tag in the versions of its application transaction ([`WRITER_BITS`]).
    writer_tag: i64,
    /// The position of this application's last commit known to this writer (loaded, or
    /// committed), and where it is kept: a commit given no position carries it on, so that the
    /// position of every committed version is the file of that very version.
    committed_position: Option<(String, deltalake::Path)>,
    /// Whether this writer removed the positions of versions before its first commit.
    positions_pruned: bool,
    /// Whether the last commit failed: it may have landed all the same, so the next one reads
    /// the table's last version first.
    unsure: bool,
}

impl DeltaArchive {
    /// Opens the table at `uri`, creating it when there is none; refuses a table of another
    /// layout.
    pub async fn open(config: &Config, uri: &str, app_id: &str) -> Result<DeltaArchive, LakeError> {
        Self::open_or_create(config, uri, app_id, true).await.map(|table| table.expect("created when missing"))
    }

    /// Opens the table at `uri`; `None` when there is none (nothing is created).
    pub async fn open_existing(config: &Config, uri: &str, app_id: &str) -> Result<Option<DeltaArchive>, LakeError> {
        Self::open_or_create(config, uri, app_id, false).await
    }

    async fn open_or_create(
        config: &Config,
        uri: &str,
        app_id: &str,
        create_missing: bool,
    ) -> Result<Option<DeltaArchive>, LakeError> {
        let table_error = |source| LakeError::Table { uri: uri.to_owned(), source };
        let url = deltalake::ensure_table_uri(uri).map_err(table_error)?;
        let reference_fields = [
            config.lookups.client.fields.clone(),
            config.lookups.livreur.fields.clone(),
            config.lookups.restaurant.fields.clone(),
        ];
        let schema = Arc::new(arrow_schema(&reference_fields));
        let table = match deltalake::open_table(url.clone()).await {
            Ok(table) => table,
            Err(DeltaTableError::NotATable(_)) if !create_missing => return Ok(None),
            Err(DeltaTableError::NotATable(_)) => match create(url.as_str(), &schema).await {
                Ok(table) => table,
                // Another writer created it first: open theirs.
                Err(_) => deltalake::open_table(url.clone()).await.map_err(table_error)?,
            },
            Err(e) => return Err(table_error(e)),
        };
        let archive = DeltaArchive {
            uri: uri.to_owned(),
            table,
            schema,
            reference_fields,
            pending: HashMap::new(),
            open_days: HashSet::new(),
            held_back: std::collections::BTreeMap::new(),
            held_back_bytes: 0,
            held_back_limit: HELD_BACK_BYTES,
            listed: None,
            writer: None,
            writer_buffered: 0,
            staged: Vec::new(),
            committing: false,
            unfiltered: false,
            lost: None,
            ids: IdCache::default(),
            ids_kept: IDS_KEPT,
            auto_commit: true,
            commit_bytes: config.lake.file_mb.saturating_mul(1024 * 1024),
            app_id: app_id.to_owned(),
            writer_tag: new_writer_tag(),
            committed_position: None,
            positions_pruned: false,
            unsure: false,
        };
        archive.check_layout()?;
        Ok(Some(archive))
    }

    /// The table's version and how many data files it references.
    pub async fn summary(&mut self) -> Result<(Option<u64>, usize), LakeError> {
        Ok((self.table.version(), self.files().await?.len()))
    }

    /// The table's location.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn check_layout(&self) -> Result<(), LakeError> {
        let layout_error = |reason: String| LakeError::Layout { uri: self.uri.clone(), reason };
        let snapshot = self.table.snapshot().map_err(|source| LakeError::Table { uri: self.uri.clone(), source })?;
        let recorded = snapshot.metadata().configuration().get(LAYOUT_PROPERTY).cloned();
        match recorded.as_deref().map(str::parse::<u32>) {
            Some(Ok(LAYOUT_VERSION)) => {}
            Some(Ok(newer)) if newer > LAYOUT_VERSION => {
                return Err(layout_error(format!(
                    "written with table layout {newer}, newer than this archiver's ({LAYOUT_VERSION}): upgrade archiver"
                )))
            }
            _ => {
                return Err(layout_error(format!(
                "not an archiver table of layout {LAYOUT_VERSION} (table property {LAYOUT_PROPERTY} is {recorded:?}): \
                     choose another ARCHIVE_TABLE_URI"
            )))
            }
        }
        let expected = StructType::try_from_arrow(self.schema.as_ref())
            .map_err(|e| layout_error(format!("the expected columns cannot be described: {e}")))?;
        let actual = snapshot.schema();
        if actual.fields().map(|f| (f.name(), f.data_type())).ne(expected.fields().map(|f| (f.name(), f.data_type()))) {
            return Err(layout_error(
                "its columns differ from those this configuration writes (the reference fields of \
                 lookups.*.fields are columns): keep the configuration the table was created with, \
                 or choose another ARCHIVE_TABLE_URI"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Adds archive documents to the rows of the next commit, leaving out the orders already in
    /// the table (or already waiting); commits when the rows waiting reach the commit size.
    pub async fn append(&mut self, docs: Vec<RawDocumentBuf>) -> Result<WriteOutcome, LakeError> {
        let rows = self.preparer().prepare(docs)?;
        self.append_prepared(rows).await
    }

    /// What turns archive documents into this table's columns, away from the table (see
    /// [`RowPreparer`]).
    pub fn preparer(&self) -> RowPreparer {
        RowPreparer {
            uri: self.uri.clone(),
            schema: self.schema.clone(),
            reference_fields: self.reference_fields.clone(),
        }
    }

    /// [`DeltaArchive::append`] of rows already turned into columns: the orders already in the
    /// table, already waiting, or twice among the rows, are left out of the rows encoded.
    pub async fn append_prepared(&mut self, prepared: PreparedRows) -> Result<WriteOutcome, LakeError> {
        let PreparedRows { rows, batch } = prepared;
        let Some(batch) = batch else { return Ok(WriteOutcome::default()) };
        let orders: Vec<(OrderKey, NaiveDate)> = rows.iter().map(|row| (OrderKey::new(&row.id), row.day)).collect();
        let committed = self.committed_among(&orders).await?;
        let mut outcome = WriteOutcome::default();
        let mut keep = Vec::with_capacity(rows.len());
        let mut kept_days = Vec::with_capacity(rows.len());
        for ((row, (id, _)), present) in rows.into_iter().zip(orders).zip(committed) {
            if present || self.pending.contains_key(&id) {
                outcome.already_archived += 1;
                keep.push(false);
                continue;
            }
            outcome.inserted += 1;
            outcome.anomalies += u64::from(row.anomalies);
            keep.push(true);
            kept_days.push(row.day);
            self.pending.insert(id, row.day);
        }
        // The rows kept wait for the next commit from here: if they cannot be encoded, they are
        // lost, and no commit may cover them.
        let encoded = if keep.iter().all(|k| *k) {
            self.encode_by_days(batch, &kept_days).await
        } else {
            let keep = deltalake::arrow::array::BooleanArray::from(keep);
            match deltalake::arrow::compute::filter_record_batch(&batch, &keep) {
                Ok(batch) => self.encode_by_days(batch, &kept_days).await,
                Err(e) => Err(LakeError::Data { uri: self.uri.clone(), reason: e.to_string() }),
            }
        };
        self.discarded_on_failure(encoded)?;
        if self.auto_commit && self.commit_due() {
            self.commit(None).await?;
        }
        Ok(outcome)
    }

    /// Encodes rows (of the given days, one per row) into the data files being written, with
    /// the files of at most [`OPEN_DAYS`] days open at once. Rows of other days are held back,
    /// as columns, until they reach [`HELD_BACK_BYTES`] (or the commit): then the files open are
    /// finished, and the rows held back are encoded a few days at a time, a file per day. Rows
    /// of many days, a few each, so make files of many rows, not a file per day of each chunk.
    async fn encode_by_days(&mut self, batch: RecordBatch, days: &[NaiveDate]) -> Result<(), LakeError> {
        let new: Vec<NaiveDate> = days
            .iter()
            .filter(|day| !self.open_days.contains(day))
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let room = OPEN_DAYS.saturating_sub(self.open_days.len()).min(new.len());
        self.open_days.extend(&new[..room]);
        if room == new.len() {
            return if batch.num_rows() > 0 { self.encode(batch).await } else { Ok(()) };
        }
        let data_error =
            |e: deltalake::arrow::error::ArrowError| LakeError::Data { uri: self.uri.clone(), reason: e.to_string() };
        let rows_of = |keep: &dyn Fn(&NaiveDate) -> bool| -> Result<RecordBatch, LakeError> {
            let mask: deltalake::arrow::array::BooleanArray = days.iter().map(|day| Some(keep(day))).collect();
            deltalake::arrow::compute::filter_record_batch(&batch, &mask).map_err(data_error)
        };
        for day in &new[room..] {
            let rows = rows_of(&|d| d == day)?;
            self.held_back_bytes += rows.get_array_memory_size();
            self.held_back.entry(*day).or_default().push(rows);
        }
        let open = rows_of(&|day| self.open_days.contains(day))?;
        if open.num_rows() > 0 {
            self.encode(open).await?;
        }
        if self.held_back_bytes > self.held_back_limit {
            self.encode_held_back().await?;
        }
        Ok(())
    }

    /// Encodes the rows held back, the files of [`OPEN_DAYS`] days at a time: a file per day.
    async fn encode_held_back(&mut self) -> Result<(), LakeError> {
        if self.held_back.is_empty() {
            return Ok(());
        }
        // Until this ends, the rows taken are in no finished file: if this future is dropped
        // meanwhile (a caller's timeout), they are lost, and no later commit may carry a
        // position that covers them. (On a failure, the rows waiting are lost anyway.)
        let before = self.lost.replace("a commit was interrupted while rows held back were being written".to_owned());
        let written = self.write_held_back().await;
        self.lost = match &written {
            Ok(()) => before,
            Err(e) => before.or_else(|| Some(e.to_string())),
        };
        written
    }

    async fn write_held_back(&mut self) -> Result<(), LakeError> {
        let mut held_back = std::mem::take(&mut self.held_back);
        self.held_back_bytes = 0;
        let days: Vec<NaiveDate> = held_back.keys().copied().collect();
        for group in days.chunks(OPEN_DAYS) {
            let flushed = self.flush_writer().await;
            self.discarded_on_failure(flushed)?;
            self.open_days = group.iter().copied().collect();
            for day in group {
                for rows in held_back.remove(day).unwrap_or_default() {
                    self.encode(rows).await?;
                }
            }
        }
        Ok(())
    }

    /// Encodes rows into the data files being written.
    async fn encode(&mut self, batch: RecordBatch) -> Result<(), LakeError> {
        let uri = self.uri.clone();
        let table_error = |source| LakeError::Table { uri: uri.clone(), source };
        if self.writer.is_none() {
            let writer = RecordBatchWriter::for_table(&self.table)
                .map_err(table_error)?
                .with_writer_properties(writer_properties());
            self.writer = Some(sync_wrapper::SyncWrapper::new(writer));
        }
        let writer = self.writer.as_mut().expect("a writer was just made").get_mut();
        if let Err(e) = contained(writer.write(batch)).await {
            // What the writer holds is lost with it: the rows waiting are in no data file.
            self.discard_pending(&e.to_string());
            return Err(table_error(e));
        }
        self.writer_buffered = writer.buffer_len();
        Ok(())
    }

    /// Forgets the rows waiting and their files (which no commit references; a vacuum removes
    /// them) after a failure that leaves them incomplete, and refuses every later commit.
    fn discard_pending(&mut self, reason: &str) {
        if let Some(writer) = self.writer.take() {
            writer.into_inner().reset();
        }
        self.pending.clear();
        self.open_days.clear();
        self.held_back.clear();
        self.held_back_bytes = 0;
        self.staged.clear();
        self.writer_buffered = 0;
        self.lost.get_or_insert_with(|| reason.to_owned());
    }

    /// Whether the rows waiting reached the commit size.
    pub fn commit_due(&self) -> bool {
        let staged: i64 = self.staged.iter().map(|add| add.size).sum();
        self.writer_buffered + self.held_back_bytes + staged.max(0) as usize >= self.commit_bytes
    }

    /// The position committed last by this writer: the one kept for its latest application
    /// transaction version. Every commit of a version writes its position first (a commit
    /// given none carries the last one on), so a position kept for another version is never
    /// taken: it may be the leftover of a writer stopped between that write and its commit,
    /// ahead of the rows the table holds. Only a table whose last commit has no position of
    /// its own (written by an earlier version of `archiver`, or before any position was
    /// saved) falls back to the latest position of an earlier version.
    pub async fn last_position(&mut self) -> Result<Option<String>, LakeError> {
        // Read from the table's latest version: another writer of the stream (a leader that
        // lost its lease and commits its last rows) may have committed since this one loaded
        // it, and removed the position of the version loaded. The position of a version is
        // removed only after a later version is committed: a missing one whose version moved
        // on is looked for again at the new version.
        let mut version = self.committed_txn_version().await?;
        let mut reads = 0;
        let version = loop {
            let Some(current) = version else { return Ok(None) };
            let exact = position_location(&self.app_id, current);
            if let Some(text) = self.read_position(&exact).await? {
                self.committed_position = Some((text.clone(), exact));
                return Ok(Some(text));
            }
            let now = self.committed_txn_version().await?;
            if now == version {
                break current;
            }
            reads += 1;
            if reads >= POSITION_READS {
                return Err(LakeError::Data {
                    uri: self.uri.clone(),
                    reason: format!(
                        "the position of stream {} moved on {reads} times while it was read:                          another process commits to it; try again",
                        self.app_id
                    ),
                });
            }
            version = now;
        };
        let earlier = self
            .positions()
            .await?
            .into_iter()
            .filter_map(|meta| {
                let number = meta.location.filename()?.strip_suffix(".json")?.parse::<i64>().ok()?;
                (number < version).then_some((number, meta.location))
            })
            .max_by_key(|(number, _)| *number);
        let found = match earlier {
            Some((_, location)) => self.read_position(&location).await?.map(|text| (text, location)),
            None => None,
        };
        self.committed_position = found.clone();
        Ok(found.map(|(text, _)| text))
    }

    /// This writer's application transaction version in the table's latest version (loaded
    /// anew).
    async fn committed_txn_version(&mut self) -> Result<Option<i64>, LakeError> {
        let uri = self.uri.clone();
        let table_error = |source| LakeError::Table { uri: uri.clone(), source };
        self.table.update_state().await.map_err(table_error)?;
        let snapshot = self.table.snapshot().map_err(table_error)?;
        snapshot.transaction_version(self.table.log_store().as_ref(), &self.app_id).await.map_err(table_error)
    }

    /// The position kept at `location`; `None` when there is none.
    async fn read_position(&self, location: &deltalake::Path) -> Result<Option<String>, LakeError> {
        let data_error = |reason: String| LakeError::Data { uri: self.uri.clone(), reason };
        let read = match self.table.object_store().get(location).await {
            Ok(read) => read,
            Err(deltalake::ObjectStoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(data_error(format!("reading the position {location}: {e}"))),
        };
        let bytes = read.bytes().await.map_err(|e| data_error(format!("reading the position {location}: {e}")))?;
        String::from_utf8(bytes.to_vec()).map(Some).map_err(|e| data_error(format!("the position {location}: {e}")))
    }

    /// Removes this writer's positions kept for versions before `committed` (now useless: a
    /// restart reads the position of the last committed version): those of its earlier
    /// commits; and at its first commit, or after a failed one, every earlier one and every
    /// other of the same count, leftovers of stopped writers and of its failed attempts
    /// included. A failure leaves files that a later commit removes; it is only logged.
    async fn prune_positions(&mut self, previous: Option<deltalake::Path>, committed: i64) {
        use futures_util::StreamExt;
        let store = self.table.object_store();
        let obsolete: Vec<deltalake::Path> = if self.positions_pruned {
            previous.into_iter().collect()
        } else {
            match self.positions().await {
                Ok(listed) => {
                    self.positions_pruned = true;
                    listed
                        .into_iter()
                        .map(|meta| meta.location)
                        .filter(|location| {
                            let number = location.filename().and_then(|name| name.strip_suffix(".json"));
                            // Of the commit's own count, only one version is ever committed:
                            // the others are of attempts that lost or failed.
                            number
                                .and_then(|n| n.parse::<i64>().ok())
                                .is_some_and(|n| n != committed && (n >> WRITER_BITS) <= (committed >> WRITER_BITS))
                        })
                        .collect()
                }
                Err(e) => {
                    tracing::warn!(table = %self.uri, error = %e, "cannot list the positions of earlier commits");
                    previous.into_iter().collect()
                }
            }
        };
        let locations = futures_util::stream::iter(obsolete.into_iter().map(Ok)).boxed();
        let mut deleted = store.delete_stream(locations);
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) | Err(deltalake::ObjectStoreError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(table = %self.uri, error = %e, "cannot remove the position of an earlier commit");
                    self.positions_pruned = false;
                }
            }
        }
    }

    /// The position files of this writer.
    async fn positions(&self) -> Result<Vec<deltalake::ObjectMeta>, LakeError> {
        let prefix = deltalake::Path::from(format!("{POSITIONS_DIR}/{}", self.app_id));
        self.table
            .object_store()
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| LakeError::Data { uri: self.uri.clone(), reason: format!("listing the positions: {e}") })
    }

    /// Forgets this writer's positions: the next start begins from now.
    pub async fn forget_positions(&mut self) -> Result<(), LakeError> {
        self.committed_position = None;
        let data_error = |reason: String| LakeError::Data { uri: self.uri.clone(), reason };
        let store = self.table.object_store();
        for meta in self.positions().await? {
            store.delete(&meta.location).await.map_err(|e| data_error(format!("removing {}: {e}", meta.location)))?;
        }
        Ok(())
    }

    /// Whether rows wait for a commit.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Commits the rows waiting, in one atomic commit carrying this writer's application
    /// transaction and, when given, the position it covers. Returns the table version written
    /// (`None` when there was nothing to commit).
    pub async fn commit(&mut self, position: Option<&str>) -> Result<Option<u64>, LakeError> {
        if self.committing {
            // The last commit was dropped before its end (a caller's timeout): the files of the
            // rows waiting may be gone with it, and no commit may cover those rows.
            self.lost.get_or_insert_with(|| "a commit was interrupted before its end".to_owned());
        }
        self.committing = true;
        let committed = self.commit_once(position).await;
        self.committing = false;
        if committed.is_err() {
            self.unsure = true;
        }
        if matches!(committed, Ok(Some(_))) {
            release_freed_memory();
        }
        committed
    }

    async fn commit_once(&mut self, position: Option<&str>) -> Result<Option<u64>, LakeError> {
        if self.pending.is_empty() && position.is_none() {
            return Ok(None);
        }
        let uri = self.uri.clone();
        let table_error = |source| LakeError::Table { uri: uri.clone(), source };
        if let Some(reason) = &self.lost {
            return Err(LakeError::Data {
                uri: self.uri.clone(),
                reason: format!(
                    "rows not committed yet were lost ({reason}); \
                     nothing more is committed by this process, which must start again from the table's last commit"
                ),
            });
        }
        self.finish_or_discard().await?;
        if self.unsure {
            // The last commit failed, and may have landed all the same (its log entry written, the
            // reply lost). Were its version taken again, this commit would write its position
            // over the one of that committed version. Read the table's last version, its
            // position and its rows first; and take a new tag, so that not even a commit landing
            // late (after this read) can have its position written over.
            self.writer_tag = new_writer_tag();
            if position.is_some() || self.committed_position.is_some() {
                self.last_position().await?;
            } else {
                // A writer that keeps no position (`batch`) reads the rows only.
                self.table.update_state().await.map_err(table_error)?;
            }
            self.positions_pruned = false;
            self.unfiltered = true;
            self.unsure = false;
        }
        if self.unfiltered {
            // The last commit lost a race, or failed, before it left out the rows the table
            // holds now.
            self.leave_out_committed().await?;
            if self.pending.is_empty() && position.is_none() {
                return Ok(None);
            }
        }
        let given = position.is_some();
        let carried = self.committed_position.as_ref().map(|(text, _)| text.clone());
        let position = position.or(carried.as_deref());
        for _ in 0..COMMIT_ATTEMPTS {
            let adds: Vec<Action> = self.staged.iter().cloned().map(Action::Add).collect();
            let snapshot = self.table.snapshot().map_err(table_error)?.clone();
            let version = snapshot
                .transaction_version(self.table.log_store().as_ref(), &self.app_id)
                .await
                .map_err(table_error)?;
            let txn_version = next_txn_version(version, self.writer_tag);
            let location = position_location(&self.app_id, txn_version);
            let properties = CommitProperties::default()
                .with_application_transaction(Transaction::new(&self.app_id, txn_version))
                .with_max_retries(0);
            if let Some(position) = position {
                // Written before the commit that makes it current: a position is never read
                // for a version whose rows are not committed.
                self.table.object_store().put(&location, position.to_owned().into_bytes().into()).await.map_err(
                    |e| LakeError::Data {
                        uri: self.uri.clone(),
                        reason: format!("writing the position {location}: {e}"),
                    },
                )?;
            }
            let operation = DeltaOperation::Write {
                mode: SaveMode::Append,
                partition_by: Some(vec![DELIVERY_DATE.to_owned()]),
                predicate: None,
            };
            let committed = CommitBuilder::from(properties)
                .with_actions(adds)
                .build(Some(&snapshot), self.table.log_store(), operation)
                .await;
            match committed {
                Ok(finalized) => {
                    let version = finalized.version();
                    self.table.state = Some(finalized.snapshot());
                    self.remember_committed();
                    if let Some(position) = position {
                        let previous = self.committed_position.replace((position.to_owned(), location));
                        self.prune_positions(previous.map(|(_, location)| location), txn_version).await;
                    }
                    return Ok(Some(version));
                }
                Err(e) if is_conflict(&e) => {
                    // Another writer committed first: read what it added, leave that out, and
                    // write again on the new version.
                    tracing::info!(table = %self.uri, error = %e, "another writer committed first; reading its rows and trying again");
                    self.table.update_state().await.map_err(table_error)?;
                    self.leave_out_committed().await?;
                    if self.pending.is_empty() && !given {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(table_error(e)),
            }
        }
        Err(LakeError::Data {
            uri: self.uri.clone(),
            reason: format!("other writers committed first {COMMIT_ATTEMPTS} times in a row; run again"),
        })
    }

    /// The rows whose `date_commande` is in `[from, to)`: their order id (as the `_id` column
    /// holds it), the UTC day of `date_commande`, and whether `purge` marked them purged. Read
    /// from the table's latest committed version, three columns of each file.
    pub async fn rows_in(
        &mut self,
        from: chrono::DateTime<Utc>,
        to: Option<chrono::DateTime<Utc>>,
    ) -> Result<Vec<ArchivedRow>, LakeError> {
        use deltalake::arrow::array::TimestampMicrosecondArray;
        let uri = self.uri.clone();
        let table_error = |source| LakeError::Table { uri: uri.clone(), source };
        let data_error = |reason: String| LakeError::Data { uri: uri.clone(), reason };
        self.table.update_state().await.map_err(table_error)?;
        let (from_us, to_us) = (from.timestamp_micros(), to.map(|t| t.timestamp_micros()));
        let purged_ids = self.purged_ids().await?;
        let store = self.table.object_store();
        let mut rows = Vec::new();
        for DataFile { path, .. } in &self.files().await?.files {
            let mut batches = projected(store.clone(), path, &[field::ID, field::DATE_COMMANDE, field::PURGED_AT])
                .await
                .map_err(data_error)?;
            while let Some(batch) = batches.try_next().await.map_err(|e| data_error(e.to_string()))? {
                let column =
                    |name: &str| batch.column_by_name(name).ok_or_else(|| data_error(format!("{path}: no {name}")));
                let ids = column(field::ID)?.as_any().downcast_ref::<StringArray>().cloned();
                let dates = column(field::DATE_COMMANDE)?.as_any().downcast_ref::<TimestampMicrosecondArray>().cloned();
                let purged = column(field::PURGED_AT)?.as_any().downcast_ref::<TimestampMicrosecondArray>().cloned();
                let (Some(ids), Some(dates), Some(purged)) = (ids, dates, purged) else {
                    return Err(data_error(format!("{path}: unexpected column types")));
                };
                for i in 0..batch.num_rows() {
                    let date = dates.is_valid(i).then(|| dates.value(i));
                    let in_range = date.is_some_and(|d| d >= from_us && to_us.is_none_or(|to| d < to));
                    if !in_range {
                        continue;
                    }
                    let day = date
                        .and_then(chrono::DateTime::from_timestamp_micros)
                        .map_or_else(|| "unknown".to_owned(), |d| d.date_naive().to_string());
                    let id = ids.value(i).to_owned();
                    let purged = purged.is_valid(i) || purged_ids.contains(&id);
                    rows.push(ArchivedRow { id, day, purged });
                }
            }
        }
        Ok(rows)
    }

    /// The `source_digest` of the rows of these orders, by order id text, read from the latest
    /// committed version: `wanted` gives each id with the day its row is in (its UTC day of
    /// delivery), or `None` when unknown (then every day's files are read). An order absent from
    /// the result has no row.
    pub async fn digests_of(
        &mut self,
        wanted: &[(String, Option<NaiveDate>)],
    ) -> Result<HashMap<String, Option<String>>, LakeError> {
        let uri = self.uri.clone();
        let table_error = |source| LakeError::Table { uri: uri.clone(), source };
        let data_error = |reason: String| LakeError::Data { uri: uri.clone(), reason };
        self.table.update_state().await.map_err(table_error)?;
        let ids: HashSet<&str> = wanted.iter().map(|(id, _)| id.as_str()).collect();
        let days: Option<HashSet<NaiveDate>> = wanted.iter().map(|(_, day)| *day).collect();
        let store = self.table.object_store();
        let mut digests = HashMap::new();
        for DataFile { path, day, .. } in &self.files().await?.files {
            if days.as_ref().is_some_and(|days| !days.contains(day)) {
                continue;
            }
            let mut batches =
                projected(store.clone(), path, &[field::ID, field::SOURCE_DIGEST]).await.map_err(data_error)?;
            while let Some(batch) = batches.try_next().await.map_err(|e| data_error(e.to_string()))? {
                let [row_ids, row_digests] =
                    text_columns(&batch, [field::ID, field::SOURCE_DIGEST], path).map_err(data_error)?;
                for i in 0..batch.num_rows() {
                    if ids.contains(row_ids.value(i)) {
                        let digest = row_digests.is_valid(i).then(|| row_digests.value(i).to_owned());
                        digests.insert(row_ids.value(i).to_owned(), digest);
                    }
                }
            }
        }
        Ok(digests)
    }

    /// Records that `purge` deleted these orders from the source, after verifying their rows:
    /// appended as a file of ids under `_archiver/purged/` (rows are not rewritten), which
    /// `verify` reads so as not to count them as orphans.
    pub async fn mark_purged(&mut self, ids: &[String]) -> Result<(), LakeError> {
        if ids.is_empty() {
            return Ok(());
        }
        let name = format!("{PURGED_DIR}/{}-{}.json", Utc::now().format("%Y%m%dT%H%M%S%.9f"), std::process::id());
        let location = deltalake::Path::from(name);
        let body = serde_json::to_vec(ids).expect("ids serialize");
        self.table.object_store().put(&location, body.into()).await.map_err(|e| LakeError::Data {
            uri: self.uri.clone(),
            reason: format!("recording purged orders in {location}: {e}"),
        })?;
        Ok(())
    }

    /// The ids `purge` recorded ([`DeltaArchive::mark_purged`]).
    async fn purged_ids(&self) -> Result<HashSet<String>, LakeError> {
        let data_error = |reason: String| LakeError::Data { uri: self.uri.clone(), reason };
        let store = self.table.object_store();
        let listed: Vec<deltalake::ObjectMeta> = store
            .list(Some(&deltalake::Path::from(PURGED_DIR)))
            .try_collect()
            .await
            .map_err(|e| data_error(format!("listing the purged orders: {e}")))?;
        let mut ids = HashSet::new();
        for meta in listed {
            let bytes = store
                .get(&meta.location)
                .await
                .map_err(|e| data_error(format!("reading {}: {e}", meta.location)))?
                .bytes()
                .await
                .map_err(|e| data_error(format!("reading {}: {e}", meta.location)))?;
            let listed: Vec<String> =
                serde_json::from_slice(&bytes).map_err(|e| data_error(format!("{}: {e}", meta.location)))?;
            ids.extend(listed);
        }
        Ok(ids)
    }

    /// Rewrites the files of each day (between `from` and `to`, inclusive, when given) that
    /// has more than one into one file per day, data unchanged (`dataChange: false`, so
    /// streaming readers see no new rows), in one commit; then writes a Delta checkpoint of the
    /// log, so that readers stop replaying its entries. Rows waiting to be committed are
    /// committed first.
    pub async fn compact(&mut self, from: Option<NaiveDate>, to: Option<NaiveDate>) -> Result<Compaction, LakeError> {
        self.commit(None).await?;
        let uri = self.uri.clone();
        let table_error = |source| LakeError::Table { uri: uri.clone(), source };
        let data_error = |reason: String| LakeError::Data { uri: uri.clone(), reason };
        self.table.update_state().await.map_err(table_error)?;
        let views: Vec<_> =
            self.table.get_active_add_actions_by_partitions(&[]).try_collect().await.map_err(table_error)?;
        let mut by_day: std::collections::BTreeMap<NaiveDate, Vec<_>> = std::collections::BTreeMap::new();
        for view in &views {
            let Some(day) = view.partition_values_map().get(DELIVERY_DATE).cloned().flatten() else { continue };
            let Ok(day) = day.parse::<NaiveDate>() else { continue };
            if from.is_some_and(|from| day < from) || to.is_some_and(|to| day > to) {
                continue;
            }
            by_day.entry(day).or_default().push(view);
        }
        let mut report = Compaction::default();
        let mut actions = Vec::new();
        let store = self.table.object_store();
        for (day, files) in by_day.into_iter().filter(|(_, files)| files.len() > 1) {
            let mut writer = RecordBatchWriter::for_table(&self.table)
                .map_err(table_error)?
                .with_writer_properties(compacted_properties())
                .with_target_file_size(u64::MAX);
            for view in &files {
                let reader = object_reader(store.clone(), view.object_store_path());
                let builder =
                    ParquetRecordBatchStreamBuilder::new(reader).await.map_err(|e| data_error(e.to_string()))?;
                let mut batches = builder.build().map_err(|e| data_error(e.to_string()))?;
                while let Some(batch) = batches.try_next().await.map_err(|e| data_error(e.to_string()))? {
                    report.rows += batch.num_rows() as u64;
                    let batch = with_day(&self.schema, batch, day)
                        .map_err(|e| data_error(format!("the rows of {}: {e}", view.path())))?;
                    writer.write(batch).await.map_err(table_error)?;
                }
                actions.push(Action::Remove(view.remove_action(false)));
            }
            let adds = writer.flush().await.map_err(table_error)?;
            report.days += 1;
            report.files_removed += files.len();
            report.files_added += adds.len();
            actions.extend(adds.into_iter().map(|mut add| {
                add.data_change = false;
                Action::Add(add)
            }));
        }
        if !actions.is_empty() {
            let snapshot = self.table.snapshot().map_err(table_error)?.clone();
            let operation = DeltaOperation::Optimize { predicate: None, target_size: self.commit_bytes as i64 };
            // The default retries: a commit made meanwhile by `watch` or `batch` only adds files,
            // which the conflict check lets through; one that removed a file compacted here
            // (another compaction) fails this one, and nothing is lost.
            let finalized = CommitBuilder::from(CommitProperties::default())
                .with_actions(actions)
                .build(Some(&snapshot), self.table.log_store(), operation)
                .await
                .map_err(table_error)?;
            report.version = Some(finalized.version());
            self.table.state = Some(finalized.snapshot());
        }
        deltalake::checkpoints::create_checkpoint(&self.table, None).await.map_err(table_error)?;
        Ok(report)
    }

    /// Deletes the data files removed from the table (by a compaction) longer than `retention`
    /// ago, and those no commit ever referenced (left by a commit that lost a race, or by a
    /// writer that stopped before its commit) once older than `retention` and than
    /// [`UNREFERENCED_KEPT_HOURS`]: younger, they may be a commit in progress. Returns how many.
    pub async fn vacuum(&mut self, retention: chrono::Duration) -> Result<usize, LakeError> {
        use deltalake::operations::vacuum::VacuumMode;
        let uri = self.uri.clone();
        let table_error = |source| LakeError::Table { uri: uri.clone(), source };
        self.table.update_state().await.map_err(table_error)?;
        let unreferenced = retention.max(chrono::Duration::hours(UNREFERENCED_KEPT_HOURS));
        let mut deleted = 0;
        for (mode, retention) in [(VacuumMode::Lite, retention), (VacuumMode::Full, unreferenced)] {
            let (table, metrics) = self
                .table
                .clone()
                .vacuum()
                .with_retention_period(retention)
                .with_enforce_retention_duration(false)
                .with_mode(mode)
                .await
                .map_err(table_error)?;
            self.table = table;
            deleted += metrics.files_deleted.len();
        }
        Ok(deleted)
    }

    /// Finishes the data files of the rows waiting (those held back included), which the next
    /// commit references.
    async fn finish_files(&mut self) -> Result<(), LakeError> {
        self.encode_held_back().await?;
        self.flush_writer().await
    }

    /// Finishes the data files being written (not the rows held back).
    async fn flush_writer(&mut self) -> Result<(), LakeError> {
        let Some(writer) = self.writer.take() else { return Ok(()) };
        self.writer_buffered = 0;
        self.open_days.clear();
        let mut writer = writer.into_inner();
        // Until the flush ends, the rows waiting are in no finished file: if this future is
        // dropped meanwhile (a caller's timeout), they are lost with the writer, and no later
        // commit may carry a position that covers them.
        let before = self.lost.replace("a commit was interrupted while its data files were being written".to_owned());
        let flushed = contained(writer.flush()).await;
        self.lost = before;
        let adds = flushed.map_err(|source| LakeError::Table { uri: self.uri.clone(), source })?;
        self.staged.extend(adds);
        Ok(())
    }

    /// [`DeltaArchive::finish_files`]; on a failure, the rows waiting are lost
    /// ([`DeltaArchive::discard_pending`]).
    async fn finish_or_discard(&mut self) -> Result<(), LakeError> {
        let finished = self.finish_files().await;
        self.discarded_on_failure(finished)
    }

    /// `result`; when it is a failure, the rows waiting are lost
    /// ([`DeltaArchive::discard_pending`]).
    fn discarded_on_failure(&mut self, result: Result<(), LakeError>) -> Result<(), LakeError> {
        if let Err(e) = &result {
            self.discard_pending(&e.to_string());
        }
        result
    }

    /// Leaves out of the rows waiting those the loaded table version holds (after a lost race,
    /// the winner's), writing the staged files again without them. Until it ends, the rows
    /// waiting stay marked unfiltered: a commit first does it again.
    async fn leave_out_committed(&mut self) -> Result<(), LakeError> {
        self.unfiltered = true;
        let orders: Vec<(OrderKey, NaiveDate)> = self.pending.iter().map(|(id, day)| (id.clone(), *day)).collect();
        let committed = self.committed_among(&orders).await?;
        let before = self.pending.len();
        for ((id, _), present) in orders.iter().zip(committed) {
            if present {
                self.pending.remove(id);
            }
        }
        if self.pending.len() < before {
            // Their rows and ours overlap: write ours again without them. The files written
            // first are referenced by no commit; a vacuum removes them.
            if let Err(e) = self.rewrite_staged().await {
                self.discard_pending(&e.to_string());
                return Err(e);
            }
        }
        self.unfiltered = false;
        Ok(())
    }

    /// Writes the staged files again with only the rows still waiting (those another writer
    /// committed meanwhile left out).
    async fn rewrite_staged(&mut self) -> Result<(), LakeError> {
        let uri = self.uri.clone();
        let data_error = |reason: String| LakeError::Data { uri: uri.clone(), reason };
        let store = self.table.object_store();
        let mut batches = Vec::new();
        for add in std::mem::take(&mut self.staged) {
            let day = add
                .partition_values
                .get(DELIVERY_DATE)
                .cloned()
                .flatten()
                .and_then(|day| day.parse::<NaiveDate>().ok())
                .ok_or_else(|| data_error(format!("{}: no delivery day", add.path)))?;
            let location = deltalake::Path::parse(&add.path).map_err(|e| data_error(format!("{}: {e}", add.path)))?;
            let builder = ParquetRecordBatchStreamBuilder::new(object_reader(store.clone(), location))
                .await
                .map_err(|e| data_error(format!("{}: {e}", add.path)))?;
            let mut stream = builder.build().map_err(|e| data_error(format!("{}: {e}", add.path)))?;
            while let Some(batch) = stream.try_next().await.map_err(|e| data_error(format!("{}: {e}", add.path)))? {
                let ids = batch
                    .column_by_name(field::ID)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                    .ok_or_else(|| data_error(format!("{}: no _id column", add.path)))?;
                let keep: deltalake::arrow::array::BooleanArray = (0..ids.len())
                    .map(|i| Some(ids.is_valid(i) && self.pending.contains_key(&OrderKey::new(ids.value(i)))))
                    .collect();
                let kept = deltalake::arrow::compute::filter_record_batch(&batch, &keep)
                    .map_err(|e| data_error(e.to_string()))?;
                if kept.num_rows() > 0 {
                    batches.push((with_day(&self.schema, kept, day).map_err(&data_error)?, day));
                }
            }
        }
        for (batch, day) in batches {
            let days = vec![day; batch.num_rows()];
            self.encode_by_days(batch, &days).await?;
        }
        self.finish_files().await
    }

    /// Keeps the ids of the rows just committed as those of their files (of each day, the
    /// ids of its rows, for the files of that day this writer committed).
    fn remember_committed(&mut self) {
        let mut days: HashMap<NaiveDate, (Vec<String>, Vec<OrderKey>)> = HashMap::new();
        for add in self.staged.drain(..) {
            if let Some(day) = add.partition_values.get(DELIVERY_DATE).cloned().flatten().and_then(|d| d.parse().ok()) {
                days.entry(day).or_default().0.push(add.path);
            }
        }
        for (id, day) in self.pending.drain() {
            days.entry(day).or_default().1.push(id);
        }
        for (day, (files, ids)) in days {
            let day = (!files.is_empty()).then_some(day);
            // (Rows of a day without a file of that day cannot be: they are in a file of their
            // day. Were it so, their ids are only not kept, and read from their file.)
            if let Some(day) = day {
                self.ids.insert(day, files, SortedIds::new(ids));
                self.ids.merge_runs(day, self.ids_kept / 4);
            }
        }
        self.ids.shrink_to(self.ids_kept);
    }

    /// The data files of the loaded version, with their day.
    async fn files(&mut self) -> Result<DataFiles, LakeError> {
        let version = self.table.version();
        if let Some((listed_at, files)) = &self.listed {
            if *listed_at == version {
                return Ok(files.clone());
            }
        }
        let table_error = |source| LakeError::Table { uri: self.uri.clone(), source };
        let views: Vec<_> =
            self.table.get_active_add_actions_by_partitions(&[]).try_collect().await.map_err(table_error)?;
        let files: DataFiles = Arc::new(Listing::new(
            views
                .iter()
                .filter_map(|view| {
                    let day = view.partition_values_map().get(DELIVERY_DATE).cloned().flatten()?;
                    Some(DataFile::new(
                        view.object_store_path().to_string(),
                        day.parse().ok()?,
                        view.stats().as_deref(),
                    ))
                })
                .collect(),
        ));
        let paths: HashSet<&str> = files.files.iter().map(|file| file.path.as_str()).collect();
        self.ids.keep_files(|path| paths.contains(path));
        drop(paths);
        self.listed = Some((version, files.clone()));
        Ok(files)
    }

    /// Which of these orders (each with its day) the loaded table version holds, whatever the
    /// day of its row there: an order archived under another day (its `date_livraison` changed
    /// in the source since, or its row's day was that of its `archived_at`, on another day) is
    /// in the table all the same. Each is looked for in the files whose bounds hold its id, of
    /// its day first, whose ids are read when they are not in memory; in the few sets of a
    /// day's ids when all its files' are in memory.
    async fn committed_among(&mut self, orders: &[(OrderKey, NaiveDate)]) -> Result<Vec<bool>, LakeError> {
        let listing = self.files().await?;
        let version = self.table.version();
        let texts: Vec<std::borrow::Cow<'_, str>> = orders.iter().map(|(id, _)| id.text()).collect();
        // The days each order may be in, its own first.
        let days_of: Vec<Vec<NaiveDate>> = orders
            .iter()
            .zip(&texts)
            .map(|((_, day), text)| {
                let others = listing.days_of(text).filter(|other| other != day);
                let own = listing.days_of(text).any(|other| other == *day).then_some(*day);
                own.into_iter().chain(others).collect()
            })
            .collect();
        let days: HashSet<NaiveDate> = days_of.iter().flatten().copied().collect();
        let partial: HashSet<NaiveDate> =
            days.iter().copied().filter(|day| !self.ids.holds_day(&listing, version, *day)).collect();
        // First in the ids held: of a day wholly held, its runs hold every id of its files; of
        // another day, the candidate files held.
        let mut found: Vec<bool> = orders
            .iter()
            .zip(&texts)
            .zip(&days_of)
            .map(|(((id, _), text), days)| {
                days.iter().any(|day| match partial.contains(day) {
                    false => self.ids.day_has(*day, id),
                    true => listing.candidates(*day, text).any(|i| self.ids.file_has(&listing.files[i].path, id)),
                })
            })
            .collect();
        // Then in the files not held that may hold an order not found yet, read one at a time,
        // the ids kept trimmed to their bound after each: ids unrelated to the files' order
        // (every file's bounds hold them) would else read the whole table's ids at once.
        let mut unread: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
        for (k, (days, text)) in days_of.iter().zip(&texts).enumerate().filter(|(k, _)| !found[*k]) {
            for i in days.iter().filter(|day| partial.contains(day)).flat_map(|day| listing.candidates(*day, text)) {
                if !self.ids.holds(&listing.files[i].path) {
                    unread.entry(i).or_default().push(k);
                }
            }
        }
        let store = self.table.object_store();
        for (i, looked_for) in unread {
            if looked_for.iter().all(|k| found[*k]) {
                continue;
            }
            let DataFile { path, day, .. } = &listing.files[i];
            let ids = read_ids(store.clone(), deltalake::Path::from(path.as_str())).await.map_err(|reason| {
                LakeError::Data { uri: self.uri.clone(), reason: format!("reading the ids of {path}: {reason}") }
            })?;
            let ids = SortedIds::new(ids);
            for k in looked_for {
                found[k] = found[k] || ids.contains(&orders[k].0);
            }
            self.ids.insert(*day, vec![path.clone()], ids);
            self.ids.shrink_to(self.ids_kept);
        }
        for day in &days {
            self.ids.merge_runs(*day, self.ids_kept / 4);
        }
        self.ids.shrink_to(self.ids_kept);
        Ok(found)
    }
}

/// Hands the memory freed since the last commit (the rows' buffers, the data files' encoders)
/// back to the system. glibc's allocator keeps freed memory in its arenas, where it stays when
/// the next allocations do not fit it: `watch` committing every second grew from 85 to 114 MB
/// in 2 minutes with a live heap of 11 to 15 MB, and went down to 65 MB after one trim.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas to the system;
    // it touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The position of `watch` kept in the table: each save records the checkpoint, and the rows
/// written so far are committed with it once `LAKE_COMMIT_SECS` passed since the last commit
/// (checked at each save, and by a timer while the stream is quiet) or `LAKE_FILE_MB` of rows
/// wait, and at a stop. A crash loses the rows not committed and the position that covers them
/// together: the next start replays them from the last commit, and rows already in the table
/// are left out.
#[derive(Debug)]
pub struct DeltaCheckpoints {
    inner: Arc<KeeperState>,
}

#[derive(Debug)]
struct KeeperState {
    archive: Arc<tokio::sync::Mutex<DeltaArchive>>,
    uri: String,
    commit_every: std::time::Duration,
    /// The last commit, and the checkpoint recorded since, not committed yet.
    last: std::sync::Mutex<(std::time::Instant, Option<String>)>,
}

impl KeeperState {
    fn failure(&self, error: LakeError) -> StoreError {
        StoreError::Table { uri: self.uri.clone(), reason: error.to_string() }
    }

    fn lock_last(&self) -> std::sync::MutexGuard<'_, (std::time::Instant, Option<String>)> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits the rows waiting with `position` (the last one recorded when `None`).
    async fn commit(&self, position: Option<String>) -> Result<bool, StoreError> {
        let position = position.or_else(|| self.lock_last().1.clone());
        let committed = self.archive.lock().await.commit(position.as_deref()).await.map_err(|e| self.failure(e))?;
        let mut last = self.lock_last();
        last.0 = std::time::Instant::now();
        if last.1 == position {
            last.1 = None;
        }
        Ok(committed.is_some())
    }

    /// Whether a commit is due by time and something waits for one.
    async fn due_by_time(&self) -> bool {
        let (elapsed, position_waits) = {
            let last = self.lock_last();
            (last.0.elapsed(), last.1.is_some())
        };
        elapsed >= self.commit_every && (position_waits || self.archive.lock().await.has_pending())
    }
}

impl DeltaCheckpoints {
    /// The position keeper of `archive`, whose commits it makes from now on.
    /// `on_loss` is cancelled when rows waiting are lost before their commit (a data file could
    /// not be written): what runs must then stop, and start again from the table's last commit;
    /// no later commit of this keeper succeeds.
    pub async fn new(
        archive: Arc<tokio::sync::Mutex<DeltaArchive>>,
        commit_every: std::time::Duration,
        on_loss: tokio_util::sync::CancellationToken,
    ) -> Self {
        let uri = {
            let mut table = archive.lock().await;
            table.auto_commit = false;
            table.uri.clone()
        };
        let inner = Arc::new(KeeperState {
            archive,
            uri,
            commit_every,
            last: std::sync::Mutex::new((std::time::Instant::now(), None)),
        });
        // A quiet stream saves nothing: the timer commits what waits. It ends with the keeper.
        let timer = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(commit_every.min(std::time::Duration::from_secs(1))).await;
                let Some(keeper) = timer.upgrade() else { return };
                if keeper.due_by_time().await {
                    if let Err(e) = keeper.commit(None).await {
                        if keeper.archive.lock().await.lost.is_some() {
                            tracing::error!(error = %e, "rows were lost before their commit: stopping, to start again from the table's last commit");
                            on_loss.cancel();
                            return;
                        }
                        tracing::warn!(error = %e, "cannot commit to the Delta table; trying again at the next save");
                    }
                }
            }
        });
        DeltaCheckpoints { inner }
    }
}

impl CheckpointKeeper for DeltaCheckpoints {
    fn describe(&self) -> String {
        format!("the commits of the Delta table {}", self.inner.uri)
    }

    fn load(&self) -> KeeperFuture<'_, Option<Checkpoint>> {
        Box::pin(async move {
            let inner = &self.inner;
            let text = inner.archive.lock().await.last_position().await.map_err(|e| inner.failure(e))?;
            text.map(|text| {
                Checkpoint::from_json(&text).map_err(|reason| StoreError::Table {
                    uri: inner.uri.clone(),
                    reason: format!("its position: {reason}"),
                })
            })
            .transpose()
        })
    }

    fn save<'a>(&'a self, checkpoint: &'a Checkpoint) -> KeeperFuture<'a, bool> {
        Box::pin(async move {
            let inner = &self.inner;
            let position = checkpoint.to_json();
            inner.lock_last().1 = Some(position.clone());
            if inner.due_by_time().await || inner.archive.lock().await.commit_due() {
                return inner.commit(Some(position)).await;
            }
            Ok(false)
        })
    }

    fn flush(&self) -> KeeperFuture<'_, bool> {
        Box::pin(async move {
            let inner = &self.inner;
            let waits = inner.lock_last().1.is_some() || inner.archive.lock().await.has_pending();
            if waits {
                return inner.commit(None).await;
            }
            Ok(false)
        })
    }

    fn remove(&self) -> KeeperFuture<'_, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.lock_last().1 = None;
            inner.archive.lock().await.forget_positions().await.map_err(|e| inner.failure(e))
        })
    }
}

/// The Delta Lake adapter of the archive's port: the table, and its dead letters in the table
/// beside it ([`errors`]).
#[derive(Debug)]
pub struct TableStore {
    archive: Arc<tokio::sync::Mutex<DeltaArchive>>,
    preparer: RowPreparer,
    errors: tokio::sync::Mutex<ErrorsTable>,
    uri: String,
}

impl TableStore {
    /// The table of the configuration (`lake.table_uri`), writing as `app_id`: opened, or
    /// created when there is none and `create_missing` (`None` when there is none and it is not
    /// to be created). A table of another layout is a configuration error.
    pub async fn open(config: &Config, app_id: &str, create_missing: bool) -> Result<Option<Self>, OpenError> {
        let uri = config.lake.table_uri.as_deref().unwrap_or_default();
        let opened = DeltaArchive::open_or_create(config, uri, app_id, create_missing).await.map_err(|e| match e {
            LakeError::Layout { .. } => OpenError::Misconfigured(e.to_string()),
            other => OpenError::Unavailable(other.to_string()),
        })?;
        Ok(opened.map(|archive| TableStore {
            preparer: archive.preparer(),
            archive: Arc::new(tokio::sync::Mutex::new(archive)),
            errors: tokio::sync::Mutex::new(ErrorsTable::beside(uri)),
            uri: uri.to_owned(),
        }))
    }
}

/// A table's error as one the archiver classifies: the store's own failure, never an order's.
fn store_failure(error: LakeError) -> mongodb::error::Error {
    crate::db::StoreFailure::error(error.to_string())
}

impl ArchiveStore for TableStore {
    fn describe(&self) -> String {
        self.uri.clone()
    }

    fn write<'a>(&'a self, docs: Vec<RawDocumentBuf>, _refused: &'a mut Vec<Refusal>) -> StoreFuture<'a, WriteOutcome> {
        // A table has no per-document limit nor validator: it takes every row, or fails whole.
        // A write runs as a task of its own, so that the caller's other chunks are read and
        // joined meanwhile, on another core; its rows are turned into columns before it waits
        // for the table, so that several chunks are prepared at once while the table's writer
        // encodes those before them.
        let (archive, preparer) = (self.archive.clone(), self.preparer.clone());
        Box::pin(async move {
            let appended = tokio::spawn(async move {
                let rows = preparer.prepare(docs)?;
                archive.lock().await.append_prepared(rows).await
            });
            match appended.await {
                Ok(appended) => appended.map_err(store_failure),
                Err(e) => Err(crate::db::StoreFailure::error(format!("writing rows to the table failed: {e}"))),
            }
        })
    }

    fn archived_among<'a>(&'a self, _ids: &'a [Bson]) -> StoreFuture<'a, HashSet<String>> {
        // Rows already in the table are left out when they are appended.
        Box::pin(async { Ok(HashSet::new()) })
    }

    fn dead_letter_location(&self) -> String {
        errors::errors_uri(&self.uri)
    }

    fn record_dead_letter<'a>(&'a self, letter: &'a DeadLetter) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.errors.lock().await.record(letter).await.map_err(store_failure) })
    }

    fn finish(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.archive.lock().await.commit(None).await.map(drop).map_err(store_failure) })
    }

    fn copies_of<'a>(
        &'a self,
        orders: &'a [mongodb::bson::Document],
        delivered_on: &'a str,
    ) -> StoreFuture<'a, HashMap<String, mongodb::bson::Document>, anyhow::Error> {
        Box::pin(async move {
            let wanted: Vec<(String, Option<NaiveDate>)> = orders
                .iter()
                .map(|order| {
                    let id = order.get("_id").cloned().unwrap_or(Bson::Null);
                    let day = order.get_datetime(delivered_on).ok().map(|d| d.to_chrono().date_naive());
                    (id_text(&id), day)
                })
                .collect();
            let digests = self.archive.lock().await.digests_of(&wanted).await?;
            Ok(orders
                .iter()
                .filter_map(|order| {
                    let id = order.get("_id")?;
                    let digest = digests.get(&id_text(id))?;
                    let copy = mongodb::bson::doc! {
                        field::SOURCE_DIGEST: digest.clone().map_or(Bson::Null, Bson::String),
                    };
                    Some((crate::pipeline::order_id::equality_key(id), copy))
                })
                .collect())
        })
    }

    fn mark_purged<'a>(&'a self, ids: &'a [Bson]) -> StoreFuture<'a, (), anyhow::Error> {
        Box::pin(async move {
            let texts: Vec<String> = ids.iter().map(id_text).collect();
            Ok(self.archive.lock().await.mark_purged(&texts).await?)
        })
    }

    fn dead_letter_count(&self) -> StoreFuture<'_, u64, anyhow::Error> {
        Box::pin(async move { Ok(self.errors.lock().await.count().await?) })
    }

    fn rows_in(
        &self,
        from: chrono::DateTime<Utc>,
        to: Option<chrono::DateTime<Utc>>,
    ) -> StoreFuture<'_, Option<Vec<ArchivedRow>>, anyhow::Error> {
        Box::pin(async move { Ok(Some(self.archive.lock().await.rows_in(from, to).await?)) })
    }

    fn checkpoint_keeper(
        &self,
        commit_every: std::time::Duration,
        on_loss: tokio_util::sync::CancellationToken,
    ) -> StoreFuture<'_, Option<Arc<dyn CheckpointKeeper>>, std::convert::Infallible> {
        Box::pin(async move {
            let keeper = DeltaCheckpoints::new(self.archive.clone(), commit_every, on_loss).await;
            Ok(Some(Arc::new(keeper) as Arc<dyn CheckpointKeeper>))
        })
    }

    fn summary(&self) -> StoreFuture<'_, Option<(Option<u64>, usize)>, anyhow::Error> {
        Box::pin(async move { Ok(Some(self.archive.lock().await.summary().await?)) })
    }

    fn compact(&self, from: Option<NaiveDate>, to: Option<NaiveDate>) -> StoreFuture<'_, Compaction, anyhow::Error> {
        Box::pin(async move { Ok(self.archive.lock().await.compact(from, to).await?) })
    }

    fn vacuum(&self, retention: chrono::Duration) -> StoreFuture<'_, usize, anyhow::Error> {
        Box::pin(async move { Ok(self.archive.lock().await.vacuum(retention).await?) })
    }
}

/// The Arrow schema of the table for these reference fields (customer, courier, restaurant).
pub fn arrow_schema(reference_fields: &[Vec<String>; 3]) -> Schema {
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    let time = |name: &str| Field::new(name, DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true);
    let double = |name: &str| Field::new(name, DataType::Float64, true);
    let reference = |name: &str, fields: &[String]| {
        Field::new(name, DataType::Struct(Fields::from(fields.iter().map(|f| text(f)).collect::<Vec<_>>())), true)
    };
    let item = DataType::Struct(Fields::from(vec![
        text(item_field::MENU_ID),
        text(item_field::NOM),
        double(item_field::PRIX),
        Field::new(item_field::QUANTITE, DataType::Int64, true),
        double(item_field::SOUS_TOTAL),
    ]));
    let [client, livreur, restaurant] = reference_fields;
    Schema::new(vec![
        Field::new(field::ID, DataType::Utf8, false),
        text(field::NUMERO_COMMANDE),
        text(field::STATUS),
        time(field::DATE_COMMANDE),
        time(field::DATE_LIVRAISON),
        double(field::MONTANT_TOTAL),
        reference(field::CLIENT, client),
        reference(field::LIVREUR, livreur),
        reference(field::RESTAURANT, restaurant),
        Field::new(field::ITEMS, DataType::List(Arc::new(Field::new("element", item, true))), true),
        time(field::ARCHIVED_AT),
        text(field::ARCHIVE_SOURCE),
        Field::new(field::ANOMALIES, DataType::List(Arc::new(Field::new("element", DataType::Utf8, true))), true),
        text(field::SOURCE_DIGEST),
        time(field::PURGED_AT),
        Field::new(DOCUMENT, DataType::Utf8, false),
        Field::new(DELIVERY_DATE, DataType::Date32, false),
    ])
}

/// Creates the table, partitioned by delivery day, with its layout recorded.
async fn create(location: &str, schema: &Schema) -> Result<DeltaTable, DeltaTableError> {
    let columns = StructType::try_from_arrow(schema)?;
    deltalake::operations::create::CreateBuilder::new()
        .with_location(location)
        .with_columns(columns.fields().cloned())
        .with_partition_columns([DELIVERY_DATE])
        .with_configuration_property(deltalake::TableProperty::CheckpointInterval, Some("100"))
        .with_configuration_property(deltalake::TableProperty::DataSkippingStatsColumns, Some(STATS_COLUMNS.join(",")))
        .with_configuration([(LAYOUT_PROPERTY, Some(LAYOUT_VERSION.to_string()))])
        .with_raise_if_key_not_exists(false)
        .with_comment("delivered orders archived by archiver")
        .await
}

/// The columns whose minimum and maximum each data file's entry in the log records, for
/// engines to skip files: those a query filters on. Not the whole document, the references,
/// the items nor the digest: their bounds (some 1.5 KB a file) would only weigh on the log and
/// on every reader's, and this writer's, memory, which holds an entry per data file.
const STATS_COLUMNS: [&str; 9] = [
    field::ID,
    field::NUMERO_COMMANDE,
    field::STATUS,
    field::DATE_COMMANDE,
    field::DATE_LIVRAISON,
    field::MONTANT_TOTAL,
    field::ARCHIVED_AT,
    field::ARCHIVE_SOURCE,
    field::PURGED_AT,
];

/// Whether a commit failed because another writer committed that version first.
fn is_conflict(error: &DeltaTableError) -> bool {
    use deltalake::kernel::transaction::TransactionError;
    match error {
        DeltaTableError::VersionAlreadyExists(_) => true,
        DeltaTableError::Transaction { source } => matches!(
            source,
            TransactionError::VersionAlreadyExists(_)
                | TransactionError::CommitConflict(_)
                | TransactionError::MaxCommitAttempts(_)
        ),
        _ => false,
    }
}

/// A row of the table, as `verify` compares it with the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedRow {
    /// The `_id` column: the order id as text ([`id_text`](crate::pipeline::order_id::id_text)).
    pub id: String,
    /// The UTC day of `date_commande`.
    pub day: String,
    /// Whether `purge` deleted the order from the source after verifying this row.
    pub purged: bool,
}

/// What a compaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// Days rewritten.
    pub days: usize,
    /// Files replaced.
    pub files_removed: usize,
    /// Files written instead.
    pub files_added: usize,
    /// Rows rewritten.
    pub rows: u64,
    /// The table version of the compaction, when there was anything to compact.
    pub version: Option<u64>,
}

/// How data files are written as rows come: zstd, level 3, in row groups of at most 2 MB, so
/// that a file being written holds little in memory; no dictionary for the columns whose values
/// are all different (it would only be built and dropped).
fn writer_properties() -> WriterProperties {
    unique_columns(WriterProperties::builder())
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("a valid zstd level")))
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        .build()
}

/// How `compact` rewrites a day, once, for the years it is kept: zstd level 9 in pages of up
/// to 8 MB (measured on the benchmark's orders: 7 % and 14 % fewer bytes than level 3 in 1 MB
/// pages).
fn compacted_properties() -> WriterProperties {
    unique_columns(WriterProperties::builder())
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(9).expect("a valid zstd level")))
        .set_data_page_size_limit(8 * 1024 * 1024)
        .set_max_row_group_bytes(Some(4 * ROW_GROUP_BYTES))
        .build()
}

/// No dictionary for the columns of values all different.
fn unique_columns(
    builder: deltalake::parquet::file::properties::WriterPropertiesBuilder,
) -> deltalake::parquet::file::properties::WriterPropertiesBuilder {
    use deltalake::parquet::schema::types::ColumnPath;
    [field::ID, DOCUMENT, field::SOURCE_DIGEST, field::NUMERO_COMMANDE]
        .into_iter()
        .fold(builder, |builder, column| builder.set_column_dictionary_enabled(ColumnPath::from(column), false))
}

/// The largest row group of a data file, encoded.
const ROW_GROUP_BYTES: usize = 2 * 1024 * 1024;

/// Runs a step of delta-rs's writer, its panics made errors: on some failed uploads its cleanup
/// panics (object_store's `BufWriter` refuses an abort once its shutdown began), which must not
/// take the task holding the table down, nor leave the failure unsaid.
async fn contained<T>(
    step: impl std::future::Future<Output = Result<T, DeltaTableError>>,
) -> Result<T, DeltaTableError> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(step).catch_unwind().await {
        Ok(result) => result,
        Err(_) => {
            Err(DeltaTableError::Generic("the Parquet writer failed while cleaning up a failed upload".to_owned()))
        }
    }
}

/// The rows of a data file (which holds no partition column) with their day, as rows of the
/// table's `schema`.
fn with_day(schema: &SchemaRef, batch: RecordBatch, day: NaiveDate) -> Result<RecordBatch, String> {
    let days = deltalake::arrow::array::Date32Array::from(vec![date32(day); batch.num_rows()]);
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(days));
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

/// Days since 1970-01-01, as Arrow's `Date32`.
fn date32(day: NaiveDate) -> i32 {
    (day - NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date")).num_days() as i32
}

/// Two text columns of a batch read from the data file `path`.
fn text_columns(batch: &RecordBatch, names: [&str; 2], path: &str) -> Result<[StringArray; 2], String> {
    let column =
        |name: &str| batch.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
    match names.map(column) {
        [Some(first), Some(second)] => Ok([first, second]),
        _ => Err(format!("{path}: unexpected column types")),
    }
}

/// A reader of one data file.
#[allow(deprecated)]
fn object_reader(store: deltalake::logstore::ObjectStoreRef, location: deltalake::Path) -> ParquetObjectReader {
    #[allow(deprecated)]
    ParquetObjectReader::new(store, location)
}

/// The batches of `columns` (top-level, of a single leaf each) of the data file at `path`.
#[allow(deprecated)]
async fn projected(
    store: deltalake::logstore::ObjectStoreRef,
    path: &str,
    columns: &[&str],
) -> Result<deltalake::parquet::arrow::async_reader::ParquetRecordBatchStream<ParquetObjectReader>, String> {
    let builder = ParquetRecordBatchStreamBuilder::new(object_reader(store, deltalake::Path::from(path)))
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    let leaves: Vec<usize> = columns
        .iter()
        .map(|name| builder.parquet_schema().columns().iter().position(|c| c.name() == *name))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("{path}: a column is missing"))?;
    let mask = ProjectionMask::leaves(builder.parquet_schema(), leaves);
    builder.with_projection(mask).build().map_err(|e| format!("{path}: {e}"))
}

/// The `_id` column of one data file.
async fn read_ids(
    store: deltalake::logstore::ObjectStoreRef,
    location: deltalake::Path,
) -> Result<Vec<OrderKey>, String> {
    let builder =
        ParquetRecordBatchStreamBuilder::new(object_reader(store, location)).await.map_err(|e| e.to_string())?;
    let column = builder
        .parquet_schema()
        .columns()
        .iter()
        .position(|c| c.name() == field::ID)
        .ok_or_else(|| "no _id column".to_owned())?;
    let mask = ProjectionMask::leaves(builder.parquet_schema(), [column]);
    let batches: Vec<RecordBatch> = builder
        .with_projection(mask)
        .build()
        .map_err(|e| e.to_string())?
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    for batch in batches {
        let column = batch.column(0);
        let strings =
            column.as_any().downcast_ref::<StringArray>().ok_or_else(|| "_id is not a string column".to_owned())?;
        ids.extend((0..strings.len()).filter(|i| strings.is_valid(*i)).map(|i| OrderKey::new(strings.value(i))));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::logstore::object_store;
    use mongodb::bson::{doc, oid::ObjectId, RawBsonRef};

    /// A new table of the default configuration in a temporary directory (`orders` in it),
    /// opened by a writer of `app_id`.
    async fn new_table(app_id: &str) -> (tempfile::TempDir, DeltaArchive) {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().join("orders").display());
        let archive = DeltaArchive::open(&Config::default(), &uri, app_id).await.unwrap();
        (dir, archive)
    }

    /// A directory for a table, and the table's URI in it.
    fn temp_table() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().join("orders").display());
        (dir, uri)
    }

    fn archive_document(id: ObjectId, day: u32) -> RawDocumentBuf {
        let delivered = mongodb::bson::DateTime::parse_rfc3339_str(format!("2026-03-{day:02}T11:30:00Z")).unwrap();
        let document = doc! {
            "_id": id, "numero_commande": id.to_hex(), "status": "livrée", "date_commande": delivered,
            "date_livraison": delivered, "montant_total": 12, "client": { "nom": "Martin", "adresse": { "ville": "Lyon" } },
            "livreur": Bson::Null, "restaurant": Bson::Null,
            "items": [{ "menu_id": ObjectId::new(), "nom": "Pizza", "prix": 11.5, "quantite": 2.0, "sous_total": 23.0 }],
            "archived_at": delivered, "archive_source": "batch", "anomalies": ["livreur_introuvable"],
        };
        RawDocumentBuf::from_document(&document).unwrap()
    }

    /// An order whose row is in the table under one day is archived whatever its day when it
    /// comes again (its `date_livraison` changed in the source since, or its row's day was that
    /// of its `archived_at`, and it is archived again on another day): no second row.
    #[tokio::test]
    async fn an_order_archived_under_another_day_gets_no_second_row() {
        let (_dir, uri) = temp_table();
        let config = Config::default();
        let ids: Vec<ObjectId> = (0..4).map(|_| ObjectId::new()).collect();
        let mut first = DeltaArchive::open(&config, &uri, "batch").await.unwrap();
        assert_eq!(
            first.append(ids[..3].iter().map(|id| archive_document(*id, 1)).collect()).await.unwrap().inserted,
            3
        );
        first.commit(None).await.unwrap();
        // The writer that committed them, their ids in memory; then another, reading the files.
        let again = first.append(vec![archive_document(ids[0], 2)]).await.unwrap();
        assert_eq!((again.inserted, again.already_archived), (0, 1));
        let mut second = DeltaArchive::open(&config, &uri, "batch").await.unwrap();
        let again = second.append(vec![archive_document(ids[1], 3), archive_document(ids[3], 3)]).await.unwrap();
        assert_eq!((again.inserted, again.already_archived), (1, 1));
        second.commit(None).await.unwrap();
        let mut reader = DeltaArchive::open(&config, &uri, "reader").await.unwrap();
        assert_eq!(rows_of(&mut reader).await, 4);
    }

    /// Rows reaching the commit size (`LAKE_FILE_MB`) are committed without waiting: by the
    /// append itself for `batch`, by the next position saved for `watch`, whatever the time
    /// left before a commit is due (`LAKE_COMMIT_SECS`).
    #[tokio::test]
    async fn rows_reaching_the_commit_size_are_committed_at_once() {
        use crate::checkpoint::Checkpoint;
        let (_dir, uri) = temp_table();
        let config = Config::default();
        let docs = |n: usize| (0..n).map(|_| archive_document(ObjectId::new(), 1)).collect::<Vec<_>>();
        let mut archive = DeltaArchive::open(&config, &uri, "batch").await.unwrap();
        archive.append(docs(10)).await.unwrap();
        assert_eq!(archive.table.version(), Some(0), "below the commit size: nothing committed");
        archive.commit_bytes = 1;
        archive.append(docs(10)).await.unwrap();
        assert_eq!(archive.table.version(), Some(1), "the append reaching the size commits");
        assert_eq!(rows_of(&mut archive).await, 20);

        let mut watched = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        watched.commit_bytes = 1;
        let watched = Arc::new(tokio::sync::Mutex::new(watched));
        let keeper = DeltaCheckpoints::new(
            watched.clone(),
            std::time::Duration::from_secs(3600),
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
        watched.lock().await.append(docs(5)).await.unwrap();
        assert_eq!(watched.lock().await.table.version(), Some(1), "watch commits only with a position");
        let token = mongodb::bson::from_bson(Bson::Document(doc! { "_data": "8267A1B2C3000000012B0429" })).unwrap();
        let checkpoint = Checkpoint::now(token, "livraison.Commandes", None, None);
        assert!(keeper.save(&checkpoint).await.unwrap(), "the save of a position past rows of the size commits");
        let mut watched = watched.lock().await;
        assert_eq!(watched.table.version(), Some(2));
        assert_eq!(rows_of(&mut watched).await, 25);
        assert_eq!(watched.last_position().await.unwrap(), Some(checkpoint.to_json()));
    }

    /// Two writers on one table, each unaware of the other's rows: the second to commit finds
    /// its table version taken, reads the first's rows, and commits only the others.
    #[tokio::test]
    async fn a_writer_that_loses_the_race_for_a_version_commits_only_the_rows_the_winner_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().join("orders").display());
        let config = Config::default();
        let ids: Vec<ObjectId> = (0..30).map(|_| ObjectId::new()).collect();
        let mut first = DeltaArchive::open(&config, &uri, "first").await.unwrap();
        let mut second = DeltaArchive::open(&config, &uri, "second").await.unwrap();
        let docs =
            |range: std::ops::Range<usize>| range.map(|i| archive_document(ids[i], 1 + (i % 3) as u32)).collect();
        assert_eq!(first.append(docs(0..20)).await.unwrap().inserted, 20);
        assert_eq!(second.append(docs(10..30)).await.unwrap().inserted, 20, "the second has not seen the first's rows");
        assert_eq!(first.commit(None).await.unwrap(), Some(1));
        assert_eq!(second.commit(None).await.unwrap(), Some(2), "committed after the first, on the next table version");

        let mut reader = DeltaArchive::open(&config, &uri, "reader").await.unwrap();
        let outcome = reader.append(docs(0..30)).await.unwrap();
        assert_eq!((outcome.inserted, outcome.already_archived), (0, 30), "each order once");
        assert_eq!(rows_of(&mut reader).await, 30, "no row twice");
        let log_store = reader.table.log_store();
        let version = reader.table.snapshot().unwrap().transaction_version(log_store.as_ref(), "second").await;
        assert_eq!(
            version.unwrap(),
            Some(next_txn_version(None, second.writer_tag)),
            "the commit carries its writer's application transaction"
        );
    }

    /// A writer loses a commit race, then cannot read the winner's rows (a store error): its
    /// next commit reads them first, and leaves them out.
    #[tokio::test]
    async fn a_lost_race_whose_winners_rows_could_not_be_read_reads_them_before_the_next_commit() {
        let (dir, mut first) = new_table("first").await;
        let uri = first.uri.clone();
        let mut second = DeltaArchive::open(&Config::default(), &uri, "second").await.unwrap();
        let ids: Vec<ObjectId> = (0..4).map(|_| ObjectId::new()).collect();
        first.append(ids[..3].iter().map(|id| archive_document(*id, 3)).collect()).await.unwrap();
        second.append(ids[1..].iter().map(|id| archive_document(*id, 3)).collect()).await.unwrap();
        assert_eq!(first.commit(None).await.unwrap(), Some(1));
        let winners = first.files().await.unwrap();
        let file = dir.path().join("orders").join(&winners.files[0].path);
        let aside = dir.path().join("aside");
        std::fs::rename(&file, &aside).unwrap();
        let failed = second.commit(None).await.unwrap_err();
        assert!(failed.to_string().contains("reading the ids"), "{failed}");
        std::fs::rename(&aside, &file).unwrap();
        assert_eq!(second.commit(None).await.unwrap(), Some(2));
        assert_eq!(rows_of(&mut second).await, 4, "each of the 4 orders once");
    }

    /// `vacuum` with no retention while a writer's files wait for their commit: it keeps them.
    #[tokio::test]
    async fn vacuum_keeps_the_files_of_a_commit_in_progress_whatever_the_retention() {
        let (_dir, mut writer) = new_table("watch").await;
        writer.append(vec![archive_document(ObjectId::new(), 3), archive_document(ObjectId::new(), 4)]).await.unwrap();
        writer.finish_or_discard().await.unwrap();
        let mut maintenance = DeltaArchive::open(&Config::default(), &writer.uri, "vacuum").await.unwrap();
        assert_eq!(maintenance.vacuum(chrono::Duration::zero()).await.unwrap(), 0);
        assert_eq!(writer.commit(None).await.unwrap(), Some(1));
        assert_eq!(rows_of(&mut writer).await, 2);
    }

    impl DeltaArchive {
        /// The data files of the table at `uri` at `version`.
        async fn files_at(uri: &str, version: u64) -> DataFiles {
            let mut archive = DeltaArchive::open(&Config::default(), uri, "reader").await.unwrap();
            archive.table.load_version(version).await.unwrap();
            archive.files().await.unwrap()
        }
    }

    /// The rows of the loaded table version.
    async fn rows_of(archive: &mut DeltaArchive) -> usize {
        let mut rows = 0;
        for DataFile { path, .. } in &archive.files().await.unwrap().files {
            rows += read_ids(archive.table.object_store(), deltalake::Path::from(path.as_str())).await.unwrap().len();
        }
        rows
    }

    /// A commit dropped while its data files are being finished (a caller's timeout) loses the
    /// rows in them: a later commit carries no position past them, nor counts them committed.
    #[tokio::test]
    async fn a_commit_dropped_while_its_files_are_finished_lets_no_later_commit_skip_its_rows() {
        // Rows of one day, in a file open; rows of more days than files are kept open for, some
        // held back.
        for days in [vec![3, 3], (1..=2 * OPEN_DAYS as u32).collect()] {
            let (_dir, mut archive) = new_table("watch").await;
            let rows = days.len();
            archive.append(days.into_iter().map(|day| archive_document(ObjectId::new(), day)).collect()).await.unwrap();
            let dropped = tokio::time::timeout(std::time::Duration::ZERO, archive.commit(Some("first"))).await;
            assert!(dropped.is_err(), "the commit waits for the store");
            match archive.commit(Some("second")).await {
                Err(refused) => assert!(refused.to_string().contains("interrupted"), "{refused}"),
                Ok(version) => {
                    let committed = rows_of(&mut archive).await;
                    panic!(
                        "committed (version {version:?}) with {committed} rows of {rows} and the position past them"
                    );
                }
            }
            assert_eq!(archive.last_position().await.unwrap(), None, "no position committed");
        }
    }

    /// A commit dropped after its files were finished, while it writes to the log: what it left
    /// is unknown, so no later commit of this writer is made.
    #[tokio::test]
    async fn a_commit_dropped_while_it_writes_to_the_log_refuses_the_next_one() {
        let (_dir, mut archive) = new_table("watch").await;
        archive.append(vec![archive_document(ObjectId::new(), 3)]).await.unwrap();
        archive.finish_or_discard().await.unwrap();
        let dropped = tokio::time::timeout(std::time::Duration::ZERO, archive.commit(Some("first"))).await;
        assert!(dropped.is_err(), "the commit waits for the store");
        let refused = archive.commit(Some("second")).await.unwrap_err();
        assert!(refused.to_string().contains("interrupted before its end"), "{refused}");
    }

    /// A writer that loses a commit race reads only the winner's files that may hold its rows
    /// (of their days, with bounds that hold their ids): the others stay unread, and an order of
    /// theirs that comes to it later is found there.
    #[tokio::test]
    async fn after_a_lost_race_the_winners_files_of_other_days_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().join("orders").display());
        let config = Config::default();
        let [x, y, z, w] = [(); 4].map(|_| ObjectId::new());
        let mut first = DeltaArchive::open(&config, &uri, "first").await.unwrap();
        first.append(vec![archive_document(x, 3)]).await.unwrap();
        assert_eq!(first.commit(None).await.unwrap(), Some(1));
        let mut second = DeltaArchive::open(&config, &uri, "second").await.unwrap();
        second.append(vec![archive_document(y, 3), archive_document(z, 4)]).await.unwrap();
        assert_eq!(second.commit(None).await.unwrap(), Some(2));
        first.append(vec![archive_document(w, 4)]).await.unwrap();
        assert_eq!(first.commit(None).await.unwrap(), Some(3), "after reading the second's rows of day 4");
        let paths = |listing: DataFiles| listing.files.iter().map(|f| f.path.clone()).collect::<HashSet<_>>();
        let seconds = &paths(second.files().await.unwrap()) - &paths(DeltaArchive::files_at(&uri, 1).await);
        let held: HashSet<String> = first.ids.files().into_iter().map(str::to_owned).collect();
        assert_eq!(held.len(), 2, "its own two files: {held:?}");
        assert!(held.is_disjoint(&seconds), "the second's file of day 4 holds no id after w: not read");
        let outcome = first.append(vec![archive_document(y, 3)]).await.unwrap();
        assert_eq!((outcome.inserted, outcome.already_archived), (0, 1), "the second's row of day 3 is found");
    }

    /// Past the ids it keeps, a writer forgets those of the files it used least recently: an
    /// order of theirs that comes back is found by reading them again, and a new order, which
    /// the bounds of no file hold, reads none.
    #[tokio::test]
    async fn ids_forgotten_past_the_bound_are_read_again_when_an_order_of_theirs_comes_back() {
        let (_dir, mut archive) = new_table("watch").await;
        archive.ids_kept = 3;
        let ids: Vec<ObjectId> = (0..6).map(|_| ObjectId::new()).collect();
        for pair in ids.chunks(2) {
            archive.append(pair.iter().map(|id| archive_document(*id, 3)).collect()).await.unwrap();
            archive.commit(None).await.unwrap();
            assert!(archive.ids.held() <= 3, "{} ids held", archive.ids.held());
        }
        let last = archive.ids.files().into_iter().map(str::to_owned).collect::<HashSet<_>>();
        assert_eq!(last.len(), 1, "the last commit's file only");
        let outcome = archive.append(vec![archive_document(ObjectId::new(), 3)]).await.unwrap();
        assert_eq!(outcome.inserted, 1);
        assert_eq!(archive.ids.files().into_iter().map(str::to_owned).collect::<HashSet<_>>(), last, "nothing read");
        let outcome = archive.append(ids.iter().map(|id| archive_document(*id, 3)).collect()).await.unwrap();
        assert_eq!((outcome.inserted, outcome.already_archived), (0, 6));
        archive.commit(None).await.unwrap();
        assert_eq!(rows_of(&mut archive).await, 7);
    }

    /// Files whose bounds all hold the orders looked for (ids unrelated to the files' order, such
    /// as random strings) are read one at a time, the ids kept trimmed to their bound after each:
    /// what one append reads is bounded by `IDS_KEPT`, not by the size of the table.
    #[tokio::test]
    async fn the_ids_read_to_look_for_orders_stay_within_their_bound_whatever_the_table_holds() {
        let (_dir, uri) = temp_table();
        let config = Config::default();
        let ids: Vec<ObjectId> = (0..40).map(|_| ObjectId::new()).collect();
        let (committed, new): (Vec<usize>, Vec<usize>) = (0..40).partition(|i| i % 4 != 3);
        let mut first = DeltaArchive::open(&config, &uri, "batch").await.unwrap();
        // Ten files of three rows, each spanning most of the ids.
        for file in 0..10 {
            let rows = [file, file + 10, file + 20].map(|k| archive_document(ids[committed[k]], 3));
            first.append(rows.to_vec()).await.unwrap();
            first.commit(None).await.unwrap();
        }
        assert_eq!(first.files().await.unwrap().len(), 10);

        let mut writer = DeltaArchive::open(&config, &uri, "batch").await.unwrap();
        writer.ids_kept = 6;
        let again = new.iter().chain(&committed[12..13]).map(|i| archive_document(ids[*i], 3)).collect();
        let outcome = writer.append(again).await.unwrap();
        assert_eq!((outcome.inserted, outcome.already_archived), (new.len() as u64, 1));
        assert!(writer.ids.peak() <= 6 + 3, "{} ids held at once", writer.ids.peak());
        writer.commit(None).await.unwrap();
        assert_eq!(rows_of(&mut writer).await, 40);
    }

    /// Rows deleted from the table by another tool (a commit removing their file): their orders,
    /// coming again, are archived again, even after the writer merged their ids with others'.
    #[tokio::test]
    async fn an_order_whose_row_another_tool_deleted_is_archived_again() {
        let (_dir, mut archive) = new_table("watch").await;
        let ids: Vec<ObjectId> = (0..=ids::RUNS_PER_DAY).map(|_| ObjectId::new()).collect();
        for id in &ids {
            archive.append(vec![archive_document(*id, 3)]).await.unwrap();
            archive.commit(None).await.unwrap();
        }
        let mut other = DeltaArchive::open(&Config::default(), &archive.uri, "other").await.unwrap();
        let views: Vec<_> = other.table.get_active_add_actions_by_partitions(&[]).try_collect().await.unwrap();
        let mut removed = None;
        for view in &views {
            let held = read_ids(other.table.object_store(), view.object_store_path()).await.unwrap();
            if held.contains(&OrderKey::new(&ids[0].to_hex())) {
                removed = Some(Action::Remove(view.remove_action(true)));
            }
        }
        let snapshot = other.table.snapshot().unwrap().clone();
        CommitBuilder::from(CommitProperties::default())
            .with_actions(vec![removed.expect("the file of the first order")])
            .build(Some(&snapshot), other.table.log_store(), DeltaOperation::Delete { predicate: None })
            .await
            .unwrap();
        other.table.update_state().await.unwrap();
        archive.table.update_state().await.unwrap();
        let outcome = archive.append(ids.iter().map(|id| archive_document(*id, 3)).collect()).await.unwrap();
        assert_eq!((outcome.inserted, outcome.already_archived), (1, ids.len() as u64 - 1));
    }

    /// Two `watch` processes of one stream on one table (no lease): the one that commits second
    /// first tries the version the first one commits. Each committed version keeps the position
    /// of the writer that committed it, so that a restart never resumes from a position whose
    /// rows the table does not hold.
    #[tokio::test]
    async fn writers_of_one_stream_racing_never_overwrite_a_committed_position() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().join("orders").display());
        let config = Config::default();
        let ids: Vec<ObjectId> = (0..20).map(|_| ObjectId::new()).collect();
        let docs = |range: std::ops::Range<usize>| range.map(|i| archive_document(ids[i], 1)).collect();
        let mut first = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        let mut second = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        // (A first commit removes the positions of earlier versions, the first's included, as
        // the second's is the one a restart reads: left here, to show it was not overwritten.)
        second.positions_pruned = true;
        first.append(docs(0..10)).await.unwrap();
        second.append(docs(10..20)).await.unwrap();
        first.commit(Some("first's position")).await.unwrap();
        let log_store = first.table.log_store();
        let committed_first = first.table.snapshot().unwrap().transaction_version(log_store.as_ref(), "watch").await;
        let committed_first = committed_first.unwrap().unwrap();
        // The second still sees the table before the first's commit.
        second.commit(Some("second's position")).await.unwrap();

        let position_of = |version: i64| {
            let store = second.table.object_store();
            async move {
                let read = store.get(&position_location("watch", version)).await.unwrap();
                String::from_utf8(read.bytes().await.unwrap().to_vec()).unwrap()
            }
        };
        assert_eq!(position_of(committed_first).await, "first's position", "the second overwrote it");
        let mut reader = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        assert_eq!(reader.last_position().await.unwrap().as_deref(), Some("second's position"));
    }

    /// A writer killed between writing its position and committing leaves the position of a
    /// version the table never had. A later writer's commit without a new position (rows a timer
    /// commits before their position is saved) must not make that leftover the one a restart
    /// resumes from: it is ahead of the rows the table holds.
    #[tokio::test]
    async fn a_position_left_by_a_writer_killed_before_its_commit_is_never_resumed_from() {
        let (_dir, uri) = temp_table();
        let config = Config::default();
        let ids: Vec<ObjectId> = (0..3).map(|_| ObjectId::new()).collect();
        let mut writer = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        writer.writer_tag = 1;
        // The dead writer's leftover, for the first commit, with the largest tag.
        let leftover = position_location("watch", next_txn_version(None, (1 << WRITER_BITS) - 1));
        writer.table.object_store().put(&leftover, "dead writer's position".as_bytes().to_vec().into()).await.unwrap();

        writer.append(vec![archive_document(ids[0], 1)]).await.unwrap();
        writer.commit(Some("committed position")).await.unwrap();
        writer.append(vec![archive_document(ids[1], 1)]).await.unwrap();
        writer.commit(None).await.unwrap();
        let mut reader = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        assert_eq!(reader.last_position().await.unwrap().as_deref(), Some("committed position"));

        // The same after a restart: a writer that loaded the position carries it on.
        let mut restarted = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        assert_eq!(restarted.last_position().await.unwrap().as_deref(), Some("committed position"));
        restarted.append(vec![archive_document(ids[2], 1)]).await.unwrap();
        restarted.commit(None).await.unwrap();
        let mut reader = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        assert_eq!(reader.last_position().await.unwrap().as_deref(), Some("committed position"));
        // The positions of earlier versions, the leftover's included, are gone.
        assert_eq!(reader.positions().await.unwrap().len(), 1);
    }

    /// A new leader opens the table, then the old one (its lease lost) commits its last rows and
    /// removes the position of the version the new one loaded: the new one resumes from the
    /// position committed last, never from nothing.
    #[tokio::test]
    async fn a_start_reads_the_position_another_writer_committed_since_it_opened_the_table() {
        let (_dir, uri) = temp_table();
        let config = Config::default();
        let mut old_leader = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        old_leader.append(vec![archive_document(ObjectId::new(), 1)]).await.unwrap();
        old_leader.commit(Some("p1")).await.unwrap();
        let mut new_leader = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        old_leader.append(vec![archive_document(ObjectId::new(), 1)]).await.unwrap();
        old_leader.commit(Some("p2")).await.unwrap();
        assert_eq!(old_leader.positions().await.unwrap().len(), 1, "p1's file is removed");
        assert_eq!(new_leader.last_position().await.unwrap().as_deref(), Some("p2"));
    }

    /// A commit whose log entry is written but whose reply is lost (a reset connection, a
    /// failed read of the version it made) reports an error though it is committed. The next
    /// commit must not take that version for free again: it would write its newer position over
    /// the committed one's, and a crash before it lands would resume past rows never committed.
    #[tokio::test]
    async fn a_commit_that_landed_but_reported_an_error_keeps_its_position_until_the_next_one_lands() {
        let (dir, uri) = temp_table();
        let config = Config::default();
        let (store, mut archive) = FaultyLog::table(&config, &uri, "watch").await;
        let ids: Vec<ObjectId> = (0..4).map(|_| ObjectId::new()).collect();
        archive.append(vec![archive_document(ids[0], 1)]).await.unwrap();
        store.fail(&[Fault::AfterWrite]);
        archive.commit(Some("p1")).await.expect_err("the reply is lost");
        archive.append(vec![archive_document(ids[1], 1)]).await.unwrap();
        // The process dies while it writes the next commit to the log.
        store.fail(&[Fault::BeforeWrite]);
        archive.commit(Some("p2")).await.expect_err("the log write fails");
        drop(archive);
        let mut restarted = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        assert_eq!(
            restarted.last_position().await.unwrap().as_deref(),
            Some("p1"),
            "the position of the rows committed, not of those lost with the process"
        );
        assert_eq!(rows_of(&mut restarted).await, 1);

        // Once the store answers again, the rows waiting are committed once, with their position.
        let (store, mut archive) = FaultyLog::table(&config, &uri, "watch").await;
        archive.append(vec![archive_document(ids[2], 1)]).await.unwrap();
        store.fail(&[Fault::AfterWrite]);
        archive.commit(Some("p3")).await.expect_err("the reply is lost");
        let landed = archive.staged.iter().map(|add| add.path.clone()).collect::<Vec<_>>();
        archive.append(vec![archive_document(ids[3], 1)]).await.unwrap();
        archive.commit(Some("p4")).await.unwrap();
        let mut restarted = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        assert_eq!(restarted.last_position().await.unwrap().as_deref(), Some("p4"));
        assert_eq!(rows_of(&mut restarted).await, 3, "one row per order");
        let log: Vec<String> = std::fs::read_dir(dir.path().join("orders/_delta_log"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "json"))
            .map(|path| std::fs::read_to_string(path).unwrap())
            .collect();
        let adds =
            |file: &String| log.iter().flat_map(|entry| entry.lines()).filter(|l| l.contains(file.as_str())).count();
        assert_eq!(landed.iter().map(adds).collect::<Vec<_>>(), vec![1], "the landed commit's file is added once");
        assert_eq!(restarted.positions().await.unwrap().len(), 1, "the positions of earlier versions are removed");
    }

    /// A commit that fails, and lands later, after the next commit of its writer read the table:
    /// that next commit writes its position under another version, so a crash before it lands
    /// resumes from the late commit's position, which covers its rows.
    #[tokio::test]
    async fn a_commit_landing_late_keeps_its_position() {
        let (_dir, uri, store, mut archive) = FaultyLog::table_with_a_row("watch").await;
        let config = Config::default();
        // Its log entry lands once the next commit has written its position; that commit then
        // loses the race to it, and the process dies while it writes to the log.
        store.fail(&[Fault::Late, Fault::BeforeWrite]);
        archive.commit(Some("p1")).await.expect_err("no reply");
        archive.append(vec![archive_document(ObjectId::new(), 1)]).await.unwrap();
        archive.commit(Some("p2")).await.expect_err("the log write fails");
        let mut restarted = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        assert_eq!(rows_of(&mut restarted).await, 1, "the late commit's row");
        assert_eq!(restarted.last_position().await.unwrap().as_deref(), Some("p1"));
    }

    /// A writer whose commits fail again and again (the log cannot be written) leaves the
    /// positions of those attempts; its first commit that lands removes them.
    #[tokio::test]
    async fn the_positions_of_commits_that_failed_are_removed_by_the_next_that_lands() {
        let (_dir, _, store, mut archive) = FaultyLog::table_with_a_row("watch").await;
        for attempt in 0..4 {
            store.fail(&[Fault::BeforeWrite]);
            archive.commit(Some(&format!("p{attempt}"))).await.expect_err("the log write fails");
        }
        archive.commit(Some("p")).await.unwrap();
        assert_eq!(archive.positions().await.unwrap().len(), 1);
        assert_eq!(archive.last_position().await.unwrap().as_deref(), Some("p"));
    }

    /// A `batch` commit that failed but landed: the next commit finds its rows there, and makes
    /// no empty version.
    #[tokio::test]
    async fn after_a_commit_that_landed_unreported_nothing_left_makes_no_version() {
        let (_dir, _, store, mut archive) = FaultyLog::table_with_a_row("batch").await;
        store.fail(&[Fault::AfterWrite]);
        archive.commit(None).await.expect_err("the reply is lost");
        assert_eq!(archive.commit(None).await.unwrap(), None);
        assert_eq!(rows_of(&mut archive).await, 1);
        assert_eq!(archive.table.version(), Some(1), "the table's creation and the commit that landed");
    }

    /// What [`FaultyLog`] does to a log entry written (others are written).
    #[derive(Debug, Clone, Copy)]
    enum Fault {
        /// Writes it, then reports a failure.
        AfterWrite,
        /// Reports a failure without writing it.
        BeforeWrite,
        /// Reports a failure, and writes it after the next position written (a request that
        /// arrives late).
        Late,
    }

    /// The local file system, doing to the next log entries written what it is told.
    #[derive(Debug, Default)]
    struct FaultyLog {
        faults: std::sync::Mutex<std::collections::VecDeque<Fault>>,
        late: std::sync::Mutex<Option<(deltalake::Path, object_store::PutPayload)>>,
    }

    impl FaultyLog {
        /// The table at `uri` opened through a new faulty store, and that store.
        async fn table(config: &Config, uri: &str, app_id: &str) -> (Arc<FaultyLog>, DeltaArchive) {
            let store = Arc::new(FaultyLog::default());
            let mut archive = DeltaArchive::open(config, uri, app_id).await.unwrap();
            let url = deltalake::ensure_table_uri(uri).unwrap();
            archive.table = deltalake::DeltaTableBuilder::from_url(url.clone())
                .unwrap()
                .with_storage_backend(store.clone(), url)
                .load()
                .await
                .unwrap();
            (store, archive)
        }

        /// A new table, opened by `app_id` through a new faulty store, with a row waiting: its
        /// directory, its URI, the store and the writer.
        async fn table_with_a_row(app_id: &str) -> (tempfile::TempDir, String, Arc<FaultyLog>, DeltaArchive) {
            let (dir, uri) = temp_table();
            let (store, mut archive) = FaultyLog::table(&Config::default(), &uri, app_id).await;
            archive.append(vec![archive_document(ObjectId::new(), 1)]).await.unwrap();
            (dir, uri, store, archive)
        }

        /// What to do to the next log entries written, in turn.
        fn fail(&self, faults: &[Fault]) {
            *self.faults.lock().unwrap() = faults.iter().copied().collect();
        }

        fn local() -> object_store::local::LocalFileSystem {
            object_store::local::LocalFileSystem::new()
        }
    }

    impl std::fmt::Display for FaultyLog {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "FaultyLog")
        }
    }

    #[async_trait::async_trait]
    impl deltalake::ObjectStore for FaultyLog {
        async fn put_opts(
            &self,
            location: &deltalake::Path,
            payload: object_store::PutPayload,
            options: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let entry = location.as_ref().contains("_delta_log/") && location.as_ref().ends_with(".json");
            let fault = if entry { self.faults.lock().unwrap().pop_front() } else { None };
            let failure = || deltalake::ObjectStoreError::Generic { store: "test", source: "connection reset".into() };
            match fault {
                Some(Fault::BeforeWrite) => return Err(failure()),
                Some(Fault::Late) => {
                    *self.late.lock().unwrap() = Some((location.clone(), payload));
                    return Err(failure());
                }
                _ => {}
            }
            let written = Self::local().put_opts(location, payload, options.clone()).await?;
            if location.as_ref().contains(POSITIONS_DIR) {
                let late = self.late.lock().unwrap().take();
                if let Some((entry, payload)) = late {
                    Self::local().put_opts(&entry, payload, object_store::PutMode::Create.into()).await?;
                }
            }
            match fault {
                Some(Fault::AfterWrite) => Err(failure()),
                _ => Ok(written),
            }
        }

        async fn put_multipart_opts(
            &self,
            location: &deltalake::Path,
            options: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            Self::local().put_multipart_opts(location, options).await
        }

        async fn get_opts(
            &self,
            location: &deltalake::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            Self::local().get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures_util::stream::BoxStream<'static, object_store::Result<deltalake::Path>>,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<deltalake::Path>> {
            Self::local().delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&deltalake::Path>,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<deltalake::ObjectMeta>> {
            Self::local().list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&deltalake::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            Self::local().list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &deltalake::Path,
            to: &deltalake::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            Self::local().copy_opts(from, to, options).await
        }
    }

    #[test]
    fn versions_of_an_application_transaction_increase_whoever_wrote_the_last() {
        let tag = (1 << WRITER_BITS) - 1;
        assert_eq!(next_txn_version(None, 5), (1 << WRITER_BITS) | 5);
        assert!(next_txn_version(Some(57), 1) > 57, "a table written before tags");
        assert!(next_txn_version(Some(next_txn_version(None, tag)), 1) > next_txn_version(None, tag));
    }

    /// Rows prepared before the table is read: those already in the table, already waiting, or
    /// twice among the documents, are left out of what is encoded.
    #[tokio::test]
    async fn an_order_twice_in_one_append_or_already_committed_makes_one_row() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().join("orders").display());
        let config = Config::default();
        let ids: Vec<ObjectId> = (0..4).map(|_| ObjectId::new()).collect();
        let mut table = DeltaArchive::open(&config, &uri, "batch").await.unwrap();
        let first = table.append(vec![archive_document(ids[0], 1), archive_document(ids[0], 1)]).await.unwrap();
        assert_eq!((first.inserted, first.already_archived, first.anomalies), (1, 1, 1));
        table.commit(None).await.unwrap();
        let docs = vec![archive_document(ids[1], 2), archive_document(ids[0], 1), archive_document(ids[2], 1)];
        let second = table.append(docs).await.unwrap();
        assert_eq!((second.inserted, second.already_archived), (2, 1));
        table.commit(None).await.unwrap();
        let mut rows = Vec::new();
        for DataFile { path, .. } in &table.files().await.unwrap().files {
            let ids = read_ids(table.table.object_store(), deltalake::Path::from(path.as_str())).await.unwrap();
            rows.extend(ids.iter().map(|id| id.text().into_owned()));
        }
        rows.sort();
        let mut expected: Vec<String> = ids[..3].iter().map(|id| id.to_hex()).collect();
        expected.sort();
        assert_eq!(rows, expected);
    }

    /// Rows of more days than files are kept open for: the files of at most OPEN_DAYS days are
    /// open at once, the other days' rows held back until they reach their limit, then encoded
    /// a file per day; all are committed only when the commit is due, in one commit.
    #[tokio::test]
    async fn rows_of_many_days_are_held_back_then_make_a_file_per_day() {
        let (_dir, mut archive) = new_table("batch").await;
        let days = 1..=(3 * OPEN_DAYS as u32 + 1);
        // Days interleaved, as orders read in `_id` order come.
        let docs = days.clone().chain(days.clone()).map(|day| archive_document(ObjectId::new(), day)).collect();
        let outcome = archive.append(docs).await.unwrap();
        assert_eq!(outcome.inserted, 2 * (3 * OPEN_DAYS as u64 + 1));
        assert_eq!(archive.table.version(), Some(0), "no commit yet");
        assert_eq!(archive.open_days.len(), OPEN_DAYS, "the first days' files open: {:?}", archive.open_days);
        assert_eq!(archive.held_back.len(), 2 * OPEN_DAYS + 1, "the other days' rows held back");
        assert!(archive.staged.is_empty(), "no file finished");
        archive.held_back_limit = 0;
        archive.append(vec![archive_document(ObjectId::new(), 20)]).await.unwrap();
        assert!(archive.held_back.is_empty(), "past the limit, encoded");
        assert_eq!(archive.staged.len(), 3 * OPEN_DAYS, "a finished file per day but the last two");
        assert_eq!(archive.open_days.len(), 2, "room for more open days: {:?}", archive.open_days);
        assert_eq!(archive.commit(None).await.unwrap(), Some(1));
        assert_eq!(archive.files().await.unwrap().len(), 3 * OPEN_DAYS + 2, "a file per day");
        assert_eq!(rows_of(&mut archive).await, 2 * (3 * OPEN_DAYS + 1) + 1);
    }

    #[tokio::test]
    async fn a_data_files_log_entry_bounds_only_the_columns_queries_filter_on() {
        let (dir, mut archive) = new_table("batch").await;
        archive.append(vec![archive_document(ObjectId::new(), 3), archive_document(ObjectId::new(), 3)]).await.unwrap();
        assert_eq!(archive.commit(None).await.unwrap(), Some(1));
        let commit = std::fs::read_to_string(dir.path().join("orders/_delta_log/00000000000000000001.json")).unwrap();
        let add = commit
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .find_map(|action| action.get("add").cloned())
            .expect("an add action");
        let stats: serde_json::Value = serde_json::from_str(add["stats"].as_str().unwrap()).unwrap();
        let bounded: HashSet<&str> = stats["maxValues"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(stats["numRecords"], 2);
        assert!(bounded.contains(field::ID) && bounded.contains(field::DATE_LIVRAISON), "{stats}");
        assert!(bounded.iter().all(|column| STATS_COLUMNS.contains(column)), "{stats}");
        assert!(!bounded.contains(DOCUMENT) && !bounded.contains(field::CLIENT), "{stats}");
    }

    #[tokio::test]
    async fn a_table_of_another_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file://{}", dir.path().join("orders").display());
        let mut config = Config::default();
        DeltaArchive::open(&config, &uri, "batch").await.unwrap();
        config.lookups.client.fields = vec!["nom".to_owned()];
        let refused = DeltaArchive::open(&config, &uri, "batch").await.unwrap_err();
        assert!(matches!(&refused, LakeError::Layout { reason, .. } if reason.contains("columns differ")), "{refused}");
    }

    /// A table whose layout is newer than this build's is refused with a clear error, and
    /// left as it is.
    #[tokio::test]
    async fn a_table_of_a_newer_layout_is_refused_and_left_unchanged() {
        let (_dir, uri) = temp_table();
        let config = Config::default();
        let fields = [
            config.lookups.client.fields.clone(),
            config.lookups.livreur.fields.clone(),
            config.lookups.restaurant.fields.clone(),
        ];
        let columns = StructType::try_from_arrow(&arrow_schema(&fields)).unwrap();
        let newer = (LAYOUT_VERSION + 1).to_string();
        let created = deltalake::operations::create::CreateBuilder::new()
            .with_location(uri.as_str())
            .with_columns(columns.fields().cloned())
            .with_partition_columns([DELIVERY_DATE])
            .with_configuration([(LAYOUT_PROPERTY, Some(newer.clone()))])
            .with_raise_if_key_not_exists(false)
            .await
            .unwrap();
        let refused = DeltaArchive::open(&config, &uri, "batch").await.unwrap_err();
        let LakeError::Layout { reason, .. } = &refused else { panic!("{refused}") };
        assert!(reason.contains(&format!("table layout {newer}")) && reason.contains("upgrade archiver"), "{reason}");
        let table = deltalake::open_table(deltalake::table::builder::ensure_table_uri(&uri).unwrap()).await.unwrap();
        assert_eq!((table.version(), created.version()), (Some(0), Some(0)), "the table was changed");
    }

    /// Once the log entries before a Delta checkpoint are cleaned up (log retention), their
    /// commit metadata is gone: `watch`'s position, kept by transaction version, still is the
    /// last one committed.
    #[tokio::test]
    async fn the_position_survives_the_clean_up_of_old_log_entries() {
        let (dir, uri) = temp_table();
        let config = Config::default();
        let mut writer = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        for position in ["p1", "p2", "p3"] {
            writer.append(vec![archive_document(ObjectId::new(), 1)]).await.unwrap();
            writer.commit(Some(position)).await.unwrap();
        }
        deltalake::checkpoints::create_checkpoint(&writer.table, None).await.unwrap();
        let log = dir.path().join("orders/_delta_log");
        for version in 0..3 {
            std::fs::remove_file(log.join(format!("{version:020}.json"))).unwrap();
        }
        let mut reopened = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        assert_eq!(reopened.last_position().await.unwrap().as_deref(), Some("p3"));
        reopened.append(vec![archive_document(ObjectId::new(), 2)]).await.unwrap();
        reopened.commit(None).await.unwrap();
        let mut reader = DeltaArchive::open(&config, &uri, "watch").await.unwrap();
        assert_eq!(reader.last_position().await.unwrap().as_deref(), Some("p3"));
        assert_eq!(rows_of(&mut reader).await, 4);
    }

    /// An order that vanished before it could be enriched gets the row the collection gets: its
    /// id, flagged `commande_introuvable`, with no digest (no purge deletes against it), under
    /// the day it was archived; once, however often it comes.
    #[tokio::test]
    async fn a_vanished_order_gets_one_flagged_row_of_its_id_under_the_day_it_was_archived() {
        use crate::pipeline::document::{vanished_order_document, ArchiveSource};
        let (_dir, mut archive) = new_table("watch").await;
        let document = vanished_order_document(&Bson::Int32(7), "livrée", ArchiveSource::Watch);
        let archived_at = document.get_datetime(field::ARCHIVED_AT).unwrap().to_chrono();
        let first = archive.append(vec![document.clone()]).await.unwrap();
        assert_eq!((first.inserted, first.anomalies), (1, 1));
        archive.commit(None).await.unwrap();
        let again = archive.append(vec![document]).await.unwrap();
        assert_eq!((again.inserted, again.already_archived), (0, 1));
        archive.commit(None).await.unwrap();
        let digests = archive.digests_of(&[("7".to_owned(), None)]).await.unwrap();
        assert_eq!(digests, HashMap::from([("7".to_owned(), None)]), "one row, with no digest");
        let days: Vec<NaiveDate> = archive.files().await.unwrap().files.iter().map(|file| file.day).collect();
        assert_eq!(days, vec![archived_at.date_naive()]);
    }

    #[test]
    fn values_that_do_not_fit_their_column_are_null_there_and_kept_in_the_document() {
        let config = Config::default();
        let fields = [
            config.lookups.client.fields.clone(),
            config.lookups.livreur.fields.clone(),
            config.lookups.restaurant.fields.clone(),
        ];
        assert_eq!(arrow_schema(&fields).fields().len(), 17);
        use columns::{as_double, as_integer, as_text};
        assert_eq!(as_double(RawBsonRef::String("trente")), None);
        assert_eq!(as_double(RawBsonRef::Int64(7)), Some(7.0));
        assert_eq!(as_integer(RawBsonRef::Double(2.5)), None);
        assert_eq!(as_integer(RawBsonRef::Double(2.0)), Some(2));
        assert_eq!(id_text(&Bson::Int32(7)), "7");
        let address = RawDocumentBuf::from_document(&doc! { "ville": "Lyon" }).unwrap();
        assert_eq!(as_text(RawBsonRef::Document(&address)).as_deref(), Some("{\"ville\":\"Lyon\"}"));
    }
}
