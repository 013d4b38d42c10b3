//! The refresh logs: one append-only Delta table per slice, `<warehouse>/_system/refreshes/
//! <domain>/<name>/`, with one row per refresh attempt of that slice, successful or not.
//! Together they are `system.refreshes`; a slice's `failed` and `suspended` states and its
//! last error come from its own log, so every process sees them.
//!
//! One log per slice keeps slices isolated here too: recording an attempt of slice A costs
//! the same however many attempts other slices have made, and never contends with them.
//! A log only grows, so [`LogCache`] reads each of its data files once: a process keeps the
//! most recent attempts of a slice and, when its log has new versions, reads only the files
//! those versions added.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};

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
use crate::storage::names::SliceName;
use crate::storage::tracked::TakeBack;
use crate::storage::{Warehouse, FREQUENT_CHECKPOINTS, NO_EXPIRED_LOG_CLEANUP};

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
/// Status of an attempt cancelled before it committed (Ctrl-C, a stopped scheduler).
pub const CANCELLED: &str = "cancelled";
/// Status of an attempt whose process died (or lost its storage) before it ended.
pub const ABANDONED: &str = "abandoned";
/// Status `system.refreshes` shows for an attempt still running (never stored).
pub const RUNNING: &str = "running";
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
    /// The attempt as one row of [`SCHEMA`].
    pub fn to_batch(&self) -> Result<RecordBatch> {
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

/// Appends one attempt to the slice's log (creating the log on first use).
pub async fn append(warehouse: &Warehouse, slice: &SliceName, attempt: &Attempt) -> Result<()> {
    let batch = attempt.to_batch()?;
    let rel = Warehouse::refreshes_path(slice);
    // Two processes may both find no log and race to create it; the loser appends after.
    for round in 0..3 {
        let existing = warehouse.load(&rel, None).await?;
        let base = warehouse.write_base(&rel, existing.as_ref())?;
        let write = WriteBuilder::new(base.log_store, base.snapshot)
            .with_input_batches([batch.clone()])
            .with_save_mode(SaveMode::Append)
            .with_configuration([
                ("delta.appendOnly", Some("true")),
                NO_EXPIRED_LOG_CLEANUP,
                FREQUENT_CHECKPOINTS,
            ])
            .with_commit_properties(CommitProperties::default());
        let tracked = base.tracked.clone();
        let guard = TakeBack::new(base.tracked);
        let result = write.await;
        guard.finish(&result).await;
        if result.is_err() && tracked.committed() {
            return Ok(());
        }
        match result {
            Ok(table) => {
                compact(table).await;
                return Ok(());
            }
            Err(_) if existing.is_none() && round < 2 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A refresh log holding this many files is compacted.
pub const COMPACT_AT: usize = 32;

/// Files of a refresh log stop being compacted again once this big.
const COMPACTED_SIZE: u64 = 1 << 20;

/// Compacts a refresh log grown to [`COMPACT_AT`] files into files of up to
/// [`COMPACTED_SIZE`] (Delta's OPTIMIZE: the commit changes no data, `dataChange=false`), so
/// that a process reading a slice's history reads a few files, however many attempts it has.
/// Best effort: a compaction that fails or loses a race leaves the log as it was, and its
/// output, if any, is deleted by VACUUM.
async fn compact(table: deltalake::DeltaTable) {
    let files = table
        .snapshot()
        .map(|s| s.log_data().num_files())
        .unwrap_or(0);
    if files < COMPACT_AT {
        return;
    }
    let target = std::num::NonZeroU64::new(COMPACTED_SIZE).expect("non-zero");
    let _ = table.optimize().with_target_size(target).await;
}

/// What the log says of one attempt, as far as slice states need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptSummary {
    /// The attempt's id (as its marker names it).
    pub attempt_id: String,
    /// `create`, `refresh` or `replace`.
    pub kind: String,
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
    /// Failed refreshes that started after the slice's latest commit, in a row (failed
    /// replaces not counted).
    pub count: u32,
    /// The latest of them.
    pub last: Option<AttemptSummary>,
}

/// Attempts kept per slice: enough to count failures in a row up to any sensible
/// `max_failures`.
pub const KEPT_PER_SLICE: usize = 128;

/// Failed attempts among `attempts` (oldest first) that started at or after `since` (ms),
/// the slice's latest commit. A failed `CREATE OR REPLACE` is shown (it is the latest error)
/// but not counted: the slice still serves its definition as before, so a user's bad new
/// definition never brings it nearer to suspension.
pub fn failures_since(attempts: &[AttemptSummary], since: i64) -> Failures {
    let mut out = Failures::default();
    for a in attempts {
        if a.started_at >= since && a.status == FAILED {
            if a.kind != "replace" {
                out.count += 1;
            }
            out.last = Some(a.clone());
        }
    }
    out
}

/// What this process has read of the slices' refresh logs.
#[derive(Debug, Default)]
pub(crate) struct LogCache {
    /// One lock per slice: reading one slice's long log never holds up another's.
    slices: Mutex<HashMap<SliceName, Arc<tokio::sync::Mutex<SliceLog>>>>,
}

/// The recent attempts of one slice, as read up to `version` of its log.
#[derive(Debug, Default)]
struct SliceLog {
    version: Option<u64>,
    attempts: VecDeque<AttemptSummary>,
}

/// The data files a commit of the log added with new rows, from the commit file's `add`
/// actions: a compaction's files (`dataChange: false`) hold rows read before.
fn added_files(commit: &[u8]) -> Vec<Path> {
    commit
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .filter_map(|action| {
            let add = action.get("add")?;
            if add.get("dataChange").and_then(|d| d.as_bool()) == Some(false) {
                return None;
            }
            let path = add.get("path")?.as_str()?.to_string();
            // Paths in the Delta log are URL-encoded.
            Path::from_url_path(path).ok()
        })
        .collect()
}

impl LogCache {
    /// The recent attempts of `slice`, oldest first, reading what its log gained since the
    /// last call: the commits since then and their files. Only when those commits are gone
    /// (Delta's log clean-up) is the whole log read again.
    pub async fn attempts(
        &self,
        warehouse: &Warehouse,
        slice: &SliceName,
    ) -> Result<Vec<AttemptSummary>> {
        let rel = Warehouse::refreshes_path(slice);
        let Some(latest) = warehouse.latest_version(&rel).await? else {
            self.slices.lock().expect("log cache").remove(slice);
            return Ok(Vec::new());
        };
        let latest = latest as u64;
        let log = warehouse.handle(&rel)?;
        let entry = self
            .slices
            .lock()
            .expect("log cache")
            .entry(slice.clone())
            .or_default()
            .clone();
        let mut cached = entry.lock().await;
        if cached.version != Some(latest) {
            cached.catch_up(warehouse, &rel, &log, latest).await?;
        }
        Ok(cached.attempts.iter().cloned().collect())
    }
}

impl SliceLog {
    async fn catch_up(
        &mut self,
        warehouse: &Warehouse,
        rel: &str,
        log: &deltalake::DeltaTable,
        latest: u64,
    ) -> Result<()> {
        // Only what the commits since the last read added, into a copy kept only if every
        // commit and file could be read: commits or files may be gone (log clean-up, files a
        // compaction replaced and VACUUM deleted).
        if let Some(read) = self.version.filter(|v| *v < latest) {
            let mut ahead = SliceLog {
                version: Some(latest),
                attempts: self.attempts.clone(),
            };
            if let Ok(true) = ahead.read_since(warehouse, rel, log, read, latest).await {
                *self = ahead;
                return Ok(());
            }
        }
        // First read, a log made anew, or the above failed: every file of the latest version.
        let Some(table) = warehouse.load(rel, None).await? else {
            return Ok(());
        };
        let mut anew = SliceLog::default();
        let files: Vec<Path> = table
            .snapshot()?
            .log_data()
            .iter()
            .map(|f| f.object_store_path())
            .collect();
        for file in files {
            anew.read_file(warehouse, rel, &file).await?;
        }
        anew.version = table.version();
        *self = anew;
        Ok(())
    }

    /// Reads the files the commits after `read` up to `latest` added; false when a commit
    /// is gone.
    async fn read_since(
        &mut self,
        warehouse: &Warehouse,
        rel: &str,
        log: &deltalake::DeltaTable,
        read: u64,
        latest: u64,
    ) -> Result<bool> {
        let mut files = Vec::new();
        for version in read + 1..=latest {
            match log.log_store().read_commit_entry(version).await? {
                Some(commit) => files.extend(added_files(&commit)),
                None => return Ok(false),
            }
        }
        for file in files {
            self.read_file(warehouse, rel, &file).await?;
        }
        Ok(true)
    }

    async fn read_file(&mut self, warehouse: &Warehouse, rel: &str, path: &Path) -> Result<()> {
        let full =
            Path::parse(format!("{rel}{path}")).map_err(|e| IcePieError::CorruptMetadata {
                what: "the refresh log".into(),
                reason: format!("bad file path {path}: {e}"),
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
        let (Some(started), Some(duration), Some(status), Some(kind), error) = (
            column("started_at"),
            column("duration_ms"),
            column("status"),
            column("kind"),
            column("error"),
        ) else {
            return;
        };
        let status = strings(&status);
        let kind = strings(&kind);
        let ids = column("attempt_id")
            .map(|c| strings(&c))
            .unwrap_or_else(|| vec![None; batch.num_rows()]);
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
            let Some(status) = status[row].clone() else {
                continue;
            };
            let started_at = started.value(row) / 1000;
            let summary = AttemptSummary {
                attempt_id: ids[row].clone().unwrap_or_default(),
                kind: kind[row].clone().unwrap_or_default(),
                status,
                started_at,
                ended_at: started_at + duration.value(row),
                error: error[row].clone(),
            };
            let at = self
                .attempts
                .partition_point(|a| a.started_at <= started_at);
            self.attempts.insert(at, summary);
            if self.attempts.len() > KEPT_PER_SLICE {
                self.attempts.pop_front();
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
        let mut log = SliceLog::default();
        // Out of order on purpose: files are read in no particular order.
        for a in [
            attempt(FAILED, 300),
            attempt(SUCCESS, 100),
            attempt(FAILED, 50),
            attempt(CONFLICT, 250),
            attempt(FAILED, 200),
        ] {
            log.add_batch(&a.to_batch().unwrap());
        }
        let attempts: Vec<AttemptSummary> = log.attempts.iter().cloned().collect();
        let f = failures_since(&attempts, 150);
        assert_eq!(f.count, 2);
        let last = f.last.unwrap();
        assert_eq!((last.started_at, last.ended_at), (300, 305));
        assert_eq!(last.error.as_deref(), Some("boom at 300"));
        assert_eq!(failures_since(&attempts, 301).count, 0);
        assert_eq!(failures_since(&[], 0), Failures::default());

        // A failed replace is the latest error but not counted.
        let mut replace = attempt(FAILED, 310);
        replace.kind = "replace".into();
        log.add_batch(&replace.to_batch().unwrap());
        let attempts: Vec<AttemptSummary> = log.attempts.iter().cloned().collect();
        let f = failures_since(&attempts, 150);
        assert_eq!(f.count, 2);
        assert_eq!(f.last.unwrap().started_at, 310);
    }

    #[test]
    fn only_the_most_recent_attempts_are_kept() {
        let mut log = SliceLog::default();
        for i in 0..(KEPT_PER_SLICE as i64 + 10) {
            log.add_batch(&attempt(FAILED, i).to_batch().unwrap());
        }
        assert_eq!(log.attempts.len(), KEPT_PER_SLICE);
        assert_eq!(log.attempts.front().unwrap().started_at, 10);
    }
}

#[cfg(test)]
mod added_files_tests {
    use super::added_files;

    #[test]
    fn commits_name_their_added_files_url_encoded() {
        let commit = b"{\"commitInfo\":{\"timestamp\":1}}\n\
            {\"add\":{\"path\":\"part-0001.parquet\",\"size\":10}}\n\
            {\"add\":{\"path\":\"k=a%20b/part-0002.parquet\",\"size\":10}}\n";
        let files: Vec<String> = added_files(commit).iter().map(|p| p.to_string()).collect();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0], "part-0001.parquet");
        assert!(files[1].starts_with("k=a"), "{}", files[1]);
    }

    #[test]
    fn a_compaction_adds_no_new_rows() {
        let commit = b"{\"commitInfo\":{\"operation\":\"OPTIMIZE\"}}\n\
            {\"remove\":{\"path\":\"part-0001.parquet\",\"dataChange\":false}}\n\
            {\"add\":{\"path\":\"part-0009.parquet\",\"size\":10,\"dataChange\":false}}\n";
        assert!(added_files(commit).is_empty());
    }
}
