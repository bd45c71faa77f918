//! The dead letters of a Delta archive: a second Delta table beside it, `<table>_errors`, with
//! one row per attempt (an append-only log, as a table is read: group by `order_id` or
//! `event_position` for the attempts of one). Created by the first dead letter; a table there
//! of other columns is refused, never altered.

use std::collections::HashSet;
use std::sync::Arc;

use deltalake::arrow::array::{
    Array, ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::StructType;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};
use futures_util::TryStreamExt;

use super::{projected, text_columns, LakeError, LAYOUT_PROPERTY};
use crate::pipeline::order_id::id_text;
use crate::pipeline::sink::DeadLetter;

/// The layout of the dead-letter table's columns (recorded as [`LAYOUT_PROPERTY`]).
pub const ERRORS_LAYOUT: &str = "errors-1";

/// The columns of the dead-letter table.
pub mod column {
    /// The order's id as text (as the archive's `_id` column); null for an event.
    pub const ORDER_ID: &str = "order_id";
    /// The change event's position, for an event whose order id cannot be read.
    pub const EVENT_POSITION: &str = "event_position";
    /// Why the order or event could not be archived.
    pub const REASON: &str = "reason";
    /// The error's code, when it had one.
    pub const ERROR_CODE: &str = "error_code";
    /// The archive document's size, when that is why.
    pub const SIZE_BYTES: &str = "size_bytes";
    /// When the delivery event happened (`watch`).
    pub const EVENT_TIME: &str = "event_time";
    /// `watch` or `batch`.
    pub const SOURCE: &str = "source";
    /// When this attempt was made.
    pub const ATTEMPTED_AT: &str = "attempted_at";
}

/// Where the dead letters of the table at `table_uri` go: the sibling `<table>_errors` (or, for
/// a table at the root of a bucket, which has no sibling, `_errors` inside it, where readers of
/// the table do not look).
pub fn errors_uri(table_uri: &str) -> String {
    let trimmed = table_uri.trim_end_matches('/');
    let at_bucket_root = trimmed.split_once("://").is_some_and(|(_, rest)| !rest.contains('/'));
    if at_bucket_root {
        format!("{trimmed}/_errors")
    } else {
        format!("{trimmed}_errors")
    }
}

/// The Arrow schema of the dead-letter table.
pub fn errors_schema() -> Schema {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    let time = |name: &str, nullable: bool| {
        Field::new(name, DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), nullable)
    };
    Schema::new(vec![
        text(column::ORDER_ID, true),
        text(column::EVENT_POSITION, true),
        text(column::REASON, false),
        Field::new(column::ERROR_CODE, DataType::Int32, true),
        Field::new(column::SIZE_BYTES, DataType::Int64, true),
        time(column::EVENT_TIME, true),
        text(column::SOURCE, false),
        time(column::ATTEMPTED_AT, false),
    ])
}

/// The dead-letter table beside an archive table, opened (or created) when first needed.
#[derive(Debug)]
pub struct ErrorsTable {
    uri: String,
    table: Option<DeltaTable>,
}

impl ErrorsTable {
    /// The dead-letter table of the archive table at `table_uri` (nothing is read yet).
    pub fn beside(table_uri: &str) -> Self {
        ErrorsTable { uri: errors_uri(table_uri), table: None }
    }

    /// Its location.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn table_error(&self, source: DeltaTableError) -> LakeError {
        LakeError::Table { uri: self.uri.clone(), source }
    }

    /// The table, opened (and brought to its latest version) or, with `create`, created when
    /// missing; `None` when it does not exist and is not to be created.
    async fn table(&mut self, create: bool) -> Result<Option<&mut DeltaTable>, LakeError> {
        if let Some(table) = self.table.as_mut() {
            table.update_state().await.map_err(|source| LakeError::Table { uri: self.uri.clone(), source })?;
            return Ok(self.table.as_mut());
        }
        let url = deltalake::ensure_table_uri(&self.uri).map_err(|e| self.table_error(e))?;
        let table = match deltalake::open_table(url.clone()).await {
            Ok(table) => table,
            Err(DeltaTableError::NotATable(_)) if !create => return Ok(None),
            Err(DeltaTableError::NotATable(_)) => match create_errors_table(url.as_str()).await {
                Ok(table) => table,
                // Another process created it first: open theirs.
                Err(_) => deltalake::open_table(url).await.map_err(|e| self.table_error(e))?,
            },
            Err(e) => return Err(self.table_error(e)),
        };
        self.check_layout(&table)?;
        Ok(Some(self.table.insert(table)))
    }

    fn check_layout(&self, table: &DeltaTable) -> Result<(), LakeError> {
        let layout_error = |reason: String| LakeError::Layout { uri: self.uri.clone(), reason };
        let snapshot = table.snapshot().map_err(|e| self.table_error(e))?;
        let recorded = snapshot.metadata().configuration().get(LAYOUT_PROPERTY).cloned();
        if recorded.as_deref() != Some(ERRORS_LAYOUT) {
            return Err(layout_error(format!(
                "not an archiver dead-letter table of layout {ERRORS_LAYOUT} (table property {LAYOUT_PROPERTY} is \
                 {recorded:?}): move it away, or choose another ARCHIVE_TABLE_URI"
            )));
        }
        let expected = StructType::try_from_arrow(&errors_schema())
            .map_err(|e| layout_error(format!("the expected columns cannot be described: {e}")))?;
        let actual = snapshot.schema();
        if actual.fields().map(|f| (f.name(), f.data_type())).ne(expected.fields().map(|f| (f.name(), f.data_type()))) {
            return Err(layout_error("its columns differ from those of a dead-letter table".to_owned()));
        }
        Ok(())
    }

    /// Appends one row for this attempt, in a commit of its own.
    pub async fn record(&mut self, letter: &DeadLetter) -> Result<(), LakeError> {
        let uri = self.uri.clone();
        let table_error = |source| LakeError::Table { uri: uri.clone(), source };
        let batch = letter_batch(letter).map_err(|reason| LakeError::Data { uri: uri.clone(), reason })?;
        let table = self.table(true).await?.expect("created when missing");
        let mut writer = RecordBatchWriter::for_table(table).map_err(table_error)?;
        writer.write(batch).await.map_err(table_error)?;
        writer.flush_and_commit(table).await.map_err(table_error)?;
        Ok(())
    }

    /// How many orders and events have dead letters (each counted once, whatever its attempts);
    /// zero when the table does not exist.
    pub async fn count(&mut self) -> Result<u64, LakeError> {
        let uri = self.uri.clone();
        let table_error = |source| LakeError::Table { uri: uri.clone(), source };
        let data_error = |reason: String| LakeError::Data { uri: uri.clone(), reason };
        let Some(table) = self.table(false).await? else { return Ok(0) };
        let views: Vec<_> = table.get_active_add_actions_by_partitions(&[]).try_collect().await.map_err(table_error)?;
        let store = table.object_store();
        let mut keys = HashSet::new();
        for view in &views {
            let path = view.object_store_path().to_string();
            let mut batches = projected(store.clone(), &path, &[column::ORDER_ID, column::EVENT_POSITION])
                .await
                .map_err(data_error)?;
            while let Some(batch) = batches.try_next().await.map_err(|e| data_error(e.to_string()))? {
                let [orders, events] =
                    text_columns(&batch, [column::ORDER_ID, column::EVENT_POSITION], &path).map_err(data_error)?;
                for i in 0..batch.num_rows() {
                    keys.insert(match (orders.is_valid(i), events.is_valid(i)) {
                        (true, _) => format!("order:{}", orders.value(i)),
                        (false, true) => format!("event:{}", events.value(i)),
                        (false, false) => "event:".to_owned(),
                    });
                }
            }
        }
        Ok(keys.len() as u64)
    }
}

async fn create_errors_table(location: &str) -> Result<DeltaTable, DeltaTableError> {
    let columns = StructType::try_from_arrow(&errors_schema())?;
    deltalake::operations::create::CreateBuilder::new()
        .with_location(location)
        .with_columns(columns.fields().cloned())
        .with_configuration_property(deltalake::TableProperty::CheckpointInterval, Some("100"))
        .with_configuration([(LAYOUT_PROPERTY, Some(ERRORS_LAYOUT.to_owned()))])
        .with_raise_if_key_not_exists(false)
        .with_comment("orders and change events archiver could not archive, one row per attempt")
        .await
}

/// The row of one attempt.
fn letter_batch(letter: &DeadLetter) -> Result<RecordBatch, String> {
    let micros = |t: mongodb::bson::DateTime| t.timestamp_millis().saturating_mul(1000);
    let utc = |values: TimestampMicrosecondArray| values.with_timezone("UTC");
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![letter.order_id.as_ref().map(id_text)])),
        Arc::new(StringArray::from(vec![letter.event_position.clone()])),
        Arc::new(StringArray::from(vec![letter.reason.clone()])),
        Arc::new(Int32Array::from(vec![letter.code])),
        Arc::new(Int64Array::from(vec![letter.size.map(|bytes| bytes as i64)])),
        Arc::new(utc(TimestampMicrosecondArray::from(vec![letter.event_time.map(micros)]))),
        Arc::new(StringArray::from(vec![letter.source.as_str().to_owned()])),
        Arc::new(utc(TimestampMicrosecondArray::from(vec![micros(mongodb::bson::DateTime::now())]))),
    ];
    RecordBatch::try_new(Arc::new(errors_schema()), columns).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::document::ArchiveSource;
    use mongodb::bson::{oid::ObjectId, Bson};

    fn letter(order_id: Option<Bson>, event_position: Option<&str>) -> DeadLetter {
        DeadLetter {
            order_id,
            event_position: event_position.map(str::to_owned),
            reason: "refused".to_owned(),
            code: Some(11000),
            size: Some(17_000_000),
            event_time: Some(mongodb::bson::DateTime::from_millis(1_772_000_000_000)),
            source: ArchiveSource::Watch,
        }
    }

    #[tokio::test]
    async fn each_attempt_is_a_row_and_each_order_or_event_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let uri = dir.path().join("orders").display().to_string();
        let mut errors = ErrorsTable::beside(&uri);
        assert_eq!(errors.count().await.unwrap(), 0, "no table, no dead letter");
        assert!(!dir.path().join("orders_errors/_delta_log").exists(), "no table is created by reading");
        let order = Bson::ObjectId(ObjectId::new());
        errors.record(&letter(Some(order.clone()), None)).await.unwrap();
        errors.record(&letter(Some(order), None)).await.unwrap();
        errors.record(&letter(None, Some("8263a1"))).await.unwrap();
        assert!(dir.path().join("orders_errors/_delta_log").is_dir(), "the table beside the archive's");
        // Read by another instance, as `health` does.
        let mut other = ErrorsTable::beside(&uri);
        assert_eq!(other.count().await.unwrap(), 2);
        let table = other.table(false).await.unwrap().unwrap();
        assert_eq!(table.version(), Some(3), "created, then one commit per attempt");
    }

    #[tokio::test]
    async fn a_table_of_other_columns_in_its_place_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uri = dir.path().join("orders").display().to_string();
        let schema = Schema::new(vec![Field::new("x", DataType::Utf8, true)]);
        let columns = StructType::try_from_arrow(&schema).unwrap();
        deltalake::operations::create::CreateBuilder::new()
            .with_location(errors_uri(&uri))
            .with_columns(columns.fields().cloned())
            .await
            .unwrap();
        let refused = ErrorsTable::beside(&uri).record(&letter(None, Some("1"))).await.unwrap_err();
        assert!(matches!(refused, LakeError::Layout { .. }), "{refused}");
        assert!(refused.to_string().contains("not an archiver dead-letter table"), "{refused}");
    }

    #[test]
    fn the_dead_letter_table_is_the_sibling_of_the_archive_table() {
        assert_eq!(errors_uri("s3://bucket/lake/orders"), "s3://bucket/lake/orders_errors");
        assert_eq!(errors_uri("s3://bucket/lake/orders/"), "s3://bucket/lake/orders_errors");
        assert_eq!(errors_uri("file:///var/lib/archiver/orders"), "file:///var/lib/archiver/orders_errors");
        assert_eq!(errors_uri("/var/lib/archiver/orders"), "/var/lib/archiver/orders_errors");
        assert_eq!(errors_uri("s3://bucket"), "s3://bucket/_errors");
        assert_eq!(errors_uri("s3://bucket/"), "s3://bucket/_errors");
    }
}
