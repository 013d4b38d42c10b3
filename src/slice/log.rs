//! The refresh log: `<warehouse>/_system/refreshes/`, an append-only Delta table with one row
//! per refresh attempt, successful or not. It is what `system.refreshes` shows and where a
//! slice's `failed` state and last error come from, so every process sees them.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use datafusion::prelude::SessionContext;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::WriteBuilder;
use deltalake::protocol::SaveMode;
use futures::TryStreamExt;

use crate::error::Result;
use crate::storage::{Warehouse, REFRESHES_PATH};

/// Schema of `system.refreshes`.
pub static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("slice", DataType::Utf8, false),
        Field::new("attempt_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("started_at", ts, false),
        Field::new("duration_ms", DataType::Int64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("version", DataType::Int64, true),
        Field::new("rows", DataType::Int64, true),
        Field::new("bytes", DataType::Int64, true),
        Field::new("inputs", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
    ]))
});

/// Status of a successful attempt.
pub const SUCCESS: &str = "success";
/// Status of a failed attempt.
pub const FAILED: &str = "failed";

/// One refresh attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// `domain.name`.
    pub slice: String,
    /// Unique id of the attempt.
    pub attempt_id: String,
    /// `create`, `refresh` or `replace`.
    pub kind: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it ran.
    pub duration_ms: i64,
    /// [`SUCCESS`] or [`FAILED`].
    pub status: &'static str,
    /// Version committed (successes only).
    pub version: Option<i64>,
    /// Rows in the version committed.
    pub rows: Option<i64>,
    /// Bytes of the version committed.
    pub bytes: Option<i64>,
    /// Inputs with the versions read, e.g. `core.orders@3`.
    pub inputs: String,
    /// The error (failures only).
    pub error: Option<String>,
}

impl Attempt {
    fn to_batch(&self) -> Result<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![self.slice.as_str()])),
            Arc::new(StringArray::from(vec![self.attempt_id.as_str()])),
            Arc::new(StringArray::from(vec![self.kind.as_str()])),
            Arc::new(
                TimestampMicrosecondArray::from(vec![self.started_at.timestamp_micros()])
                    .with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from(vec![self.duration_ms])),
            Arc::new(StringArray::from(vec![self.status])),
            Arc::new(Int64Array::from(vec![self.version])),
            Arc::new(Int64Array::from(vec![self.rows])),
            Arc::new(Int64Array::from(vec![self.bytes])),
            Arc::new(StringArray::from(vec![self.inputs.as_str()])),
            Arc::new(StringArray::from(vec![self.error.as_deref()])),
        ];
        Ok(RecordBatch::try_new(SCHEMA.clone(), columns)?)
    }
}

/// Appends one attempt to the log (creating the log table on first use).
pub async fn append(warehouse: &Warehouse, attempt: &Attempt) -> Result<()> {
    let batch = attempt.to_batch()?;
    // Two processes may both find no log and race to create it; the loser appends after.
    for round in 0..2 {
        let existing = warehouse.load(REFRESHES_PATH, None).await?;
        let (log_store, snapshot) = warehouse.write_base(REFRESHES_PATH, existing.as_ref())?;
        let write = WriteBuilder::new(log_store, snapshot)
            .with_input_batches([batch.clone()])
            .with_save_mode(SaveMode::Append)
            .with_configuration([("delta.appendOnly", Some("true"))])
            .with_commit_properties(CommitProperties::default());
        match write.await {
            Ok(_) => return Ok(()),
            Err(_) if existing.is_none() && round == 0 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The latest attempt of a slice.
#[derive(Debug, Clone)]
pub struct LastAttempt {
    /// [`SUCCESS`] or [`FAILED`].
    pub status: String,
    /// Its error, if it failed.
    pub error: Option<String>,
    /// When it started.
    pub started_at: i64,
}

/// The latest attempt of every slice that has one, streaming through the log.
pub async fn last_attempts(warehouse: &Warehouse) -> Result<HashMap<String, LastAttempt>> {
    let mut out: HashMap<String, LastAttempt> = HashMap::new();
    let Some(table) = warehouse.load(REFRESHES_PATH, None).await? else {
        return Ok(out);
    };
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state())?;
    let provider = table.table_provider().await?;
    let mut stream = ctx
        .read_table(provider)?
        .select_columns(&["slice", "started_at", "status", "error"])?
        .execute_stream()
        .await?;
    while let Some(batch) = stream.try_next().await? {
        let slice = string_column(&batch, 0);
        let started = batch.column(1).as_primitive::<TimestampMicrosecondType>();
        let status = string_column(&batch, 2);
        let error = string_column(&batch, 3);
        for row in 0..batch.num_rows() {
            let (Some(slice), Some(status)) = (slice[row].clone(), status[row].clone()) else {
                continue;
            };
            let at = started.value(row);
            if out.get(&slice).is_none_or(|a| a.started_at <= at) {
                out.insert(
                    slice,
                    LastAttempt {
                        status,
                        error: error[row].clone(),
                        started_at: at,
                    },
                );
            }
        }
    }
    Ok(out)
}

/// A string column of any string type, as owned values.
fn string_column(batch: &RecordBatch, i: usize) -> Vec<Option<String>> {
    let col = batch.column(i);
    let col =
        datafusion::arrow::compute::cast(col, &DataType::Utf8).unwrap_or_else(|_| col.clone());
    let Some(arr) = col.as_string_opt::<i32>() else {
        return vec![None; batch.num_rows()];
    };
    (0..arr.len())
        .map(|r| (!arr.is_null(r)).then(|| arr.value(r).to_string()))
        .collect()
}
