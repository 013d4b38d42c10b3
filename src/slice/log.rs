//! The refresh log: `<warehouse>/_system/refreshes/`, an append-only Delta table with one row
//! per refresh attempt, successful or not. It is what `system.refreshes` shows and where a
//! slice's `failed` and `suspended` states and its last error come from, so every process
//! sees them.
//!
//! The log only grows, so [`LogCache`] reads each of its data files once: a process keeps the
//! most recent attempts of every slice and, when the log has a new version, reads only the
//! files that version added. The scheduler consults it on every tick at the cost of one
//! listing when nothing changed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use datafusion::error::DataFusionError;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::WriteBuilder;
use deltalake::protocol::SaveMode;
use object_store::path::Path;
use object_store::ObjectStoreExt;

use crate::error::{IcePieError, Result};
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
/// Status of an attempt that lost a race: another writer committed the slice while it ran.
/// It is not a failure of the slice: the winner's version is served.
pub const CONFLICT: &str = "conflict";

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
    /// [`SUCCESS`], [`FAILED`] or [`CONFLICT`].
    pub status: &'static str,
    /// Version committed (successes only).
    pub version: Option<i64>,
    /// Rows in the version committed.
    pub rows: Option<i64>,
    /// Bytes of the version committed.
    pub bytes: Option<i64>,
    /// Inputs with the versions read, e.g. `core.orders@3`.
    pub inputs: String,
    /// The error (failures and conflicts only).
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

/// What the log says of one attempt, as far as slice states need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptSummary {
    /// [`SUCCESS`], [`FAILED`] or [`CONFLICT`].
    pub status: String,
    /// When it started (ms since the epoch).
    pub started_at: i64,
    /// When it ended (ms since the epoch).
    pub ended_at: i64,
    /// Its error, if it failed.
    pub error: Option<String>,
}

/// Attempts of one slice that matter to its state: failures since its latest commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failures {
    /// Failed attempts that started after the slice's latest commit, in a row.
    pub count: u32,
    /// The latest of them.
    pub last: Option<AttemptSummary>,
}

/// Attempts kept per slice: enough to count failures in a row up to any sensible
/// `max_failures`.
pub const KEPT_PER_SLICE: usize = 128;

/// The most recent attempts of every slice, oldest first.
#[derive(Debug, Clone, Default)]
pub struct RecentAttempts(HashMap<String, Vec<AttemptSummary>>);

impl RecentAttempts {
    /// Failed attempts of `slice` that started at or after `since` (ms), its latest commit.
    pub fn failures_since(&self, slice: &str, since: i64) -> Failures {
        let mut out = Failures::default();
        for a in self.0.get(slice).into_iter().flatten() {
            if a.started_at >= since && a.status == FAILED {
                out.count += 1;
                out.last = Some(a.clone());
            }
        }
        out
    }
}

/// What this process has read of the refresh log.
#[derive(Debug, Default)]
pub(crate) struct LogCache {
    version: Option<u64>,
    files: HashSet<Path>,
    attempts: HashMap<String, VecDeque<AttemptSummary>>,
}

impl LogCache {
    /// Reads what the log gained since the last call and returns the recent attempts.
    pub async fn recent(&mut self, warehouse: &Warehouse) -> Result<RecentAttempts> {
        if let Some(table) = warehouse.load(REFRESHES_PATH, None).await? {
            if table.version() != self.version {
                let mut new = Vec::new();
                for file in table.snapshot()?.log_data().iter() {
                    let path = file.object_store_path();
                    if !self.files.contains(&path) {
                        new.push(path);
                    }
                }
                for path in new {
                    self.read_file(warehouse, &path).await?;
                    self.files.insert(path);
                }
                self.version = table.version();
            }
        }
        Ok(RecentAttempts(
            self.attempts
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
                .collect(),
        ))
    }

    async fn read_file(&mut self, warehouse: &Warehouse, path: &Path) -> Result<()> {
        let full = Path::parse(format!("{REFRESHES_PATH}{path}")).map_err(|e| {
            IcePieError::CorruptMetadata {
                what: "the refresh log".into(),
                reason: format!("bad file path {path}: {e}"),
            }
        })?;
        // One attempt per file: small enough to read whole.
        let data = warehouse.store().get(&full).await?.bytes().await?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(data)
            .and_then(|b| b.build())
            .map_err(DataFusionError::from)?;
        for batch in reader {
            self.add_batch(&batch?);
        }
        Ok(())
    }

    fn add_batch(&mut self, batch: &RecordBatch) {
        let column = |name: &str| batch.column_by_name(name).cloned();
        let (Some(slice), Some(started), Some(duration), Some(status), error) = (
            column("slice"),
            column("started_at"),
            column("duration_ms"),
            column("status"),
            column("error"),
        ) else {
            return;
        };
        let slice = strings(&slice);
        let status = strings(&status);
        let error = error
            .map(|e| strings(&e))
            .unwrap_or_else(|| vec![None; batch.num_rows()]);
        let Some(started) = started.as_primitive_opt::<TimestampMicrosecondType>() else {
            return;
        };
        let Some(duration) = duration.as_primitive_opt::<datafusion::arrow::datatypes::Int64Type>()
        else {
            return;
        };
        for row in 0..batch.num_rows() {
            let (Some(slice), Some(status)) = (slice[row].clone(), status[row].clone()) else {
                continue;
            };
            let started_at = started.value(row) / 1000;
            let summary = AttemptSummary {
                status,
                started_at,
                ended_at: started_at + duration.value(row),
                error: error[row].clone(),
            };
            let list = self.attempts.entry(slice).or_default();
            let at = list.partition_point(|a| a.started_at <= started_at);
            list.insert(at, summary);
            if list.len() > KEPT_PER_SLICE {
                list.pop_front();
            }
        }
    }
}

/// A string column of any string type, as owned values.
fn strings(col: &ArrayRef) -> Vec<Option<String>> {
    let col =
        datafusion::arrow::compute::cast(col, &DataType::Utf8).unwrap_or_else(|_| col.clone());
    let Some(arr) = col.as_string_opt::<i32>() else {
        return vec![None; col.len()];
    };
    (0..arr.len())
        .map(|r| (!arr.is_null(r)).then(|| arr.value(r).to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(status: &'static str, at_ms: i64) -> Attempt {
        Attempt {
            slice: "d.s".into(),
            attempt_id: format!("a{at_ms}"),
            kind: "refresh".into(),
            started_at: DateTime::from_timestamp_millis(at_ms).unwrap(),
            duration_ms: 5,
            status,
            version: None,
            rows: None,
            bytes: None,
            inputs: String::new(),
            error: (status != SUCCESS).then(|| format!("boom at {at_ms}")),
        }
    }

    #[test]
    fn failures_count_only_failed_attempts_since_the_latest_commit() {
        let mut cache = LogCache::default();
        // Out of order on purpose: files are read in no particular order.
        for a in [
            attempt(FAILED, 300),
            attempt(SUCCESS, 100),
            attempt(FAILED, 50),
            attempt(CONFLICT, 250),
            attempt(FAILED, 200),
        ] {
            cache.add_batch(&a.to_batch().unwrap());
        }
        let recent = RecentAttempts(
            cache
                .attempts
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
                .collect(),
        );
        let f = recent.failures_since("d.s", 150);
        assert_eq!(f.count, 2);
        let last = f.last.unwrap();
        assert_eq!((last.started_at, last.ended_at), (300, 305));
        assert_eq!(last.error.as_deref(), Some("boom at 300"));
        assert_eq!(recent.failures_since("d.s", 301).count, 0);
        assert_eq!(recent.failures_since("other.s", 0), Failures::default());
    }

    #[test]
    fn only_the_most_recent_attempts_are_kept() {
        let mut cache = LogCache::default();
        for i in 0..(KEPT_PER_SLICE as i64 + 10) {
            cache.add_batch(&attempt(FAILED, i).to_batch().unwrap());
        }
        let kept = &cache.attempts["d.s"];
        assert_eq!(kept.len(), KEPT_PER_SLICE);
        assert_eq!(kept.front().unwrap().started_at, 10);
    }
}
