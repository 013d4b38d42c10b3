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

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::{SchemaMode, WriteBuilder};
use deltalake::protocol::SaveMode;

use super::meta::{format_reads, Built};
use crate::error::Result;
use crate::storage::names::SliceName;
use crate::storage::tracked::TakeBack;
use crate::storage::{Warehouse, FREQUENT_CHECKPOINTS, NO_EXPIRED_LOG_CLEANUP};

mod cache;
pub(crate) use cache::LogCache;

/// Schema of `system.refreshes`.
pub(crate) static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
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
        // Added with incremental refresh: NULL in rows logged before, and for attempts that
        // failed before deciding how to build (a failed attempt logs what it set out to do).
        Field::new("mode", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
        Field::new("read", DataType::Utf8, true),
        // Added with per-slice identity: the Delta table id of the slice the attempt was for
        // (NULL for a first build that failed, and in rows logged before). A slice dropped
        // and made again under its name has a new id.
        Field::new("slice_id", DataType::Utf8, true),
    ]))
});

/// Status of a successful attempt.
pub(crate) const SUCCESS: &str = "success";
/// Status of a refresh that found its inputs at the very versions its slice was built from:
/// it committed nothing (`REFRESH SLICE` answered "nothing to do").
pub(crate) const NO_CHANGE: &str = "no_change";
/// Status of a failed attempt.
pub(crate) const FAILED: &str = "failed";
/// Status of an attempt cancelled before it committed (Ctrl-C, a stopped scheduler).
pub(crate) const CANCELLED: &str = "cancelled";
/// Status of an attempt whose process died (or lost its storage) before it ended.
pub(crate) const ABANDONED: &str = "abandoned";
/// Status `system.refreshes` shows for an attempt still running (never stored).
pub(crate) const RUNNING: &str = "running";
/// Status of an attempt that lost a race: another writer committed the slice while it ran.
/// It is not a failure of the slice: the winner's version is served.
pub(crate) const CONFLICT: &str = "conflict";

/// One refresh attempt.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
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
    /// How the version committed was built: mode, why, and what was read of each input; for
    /// a failure or a conflict, how it set out to run (none when it failed before deciding).
    pub built: Option<Built>,
    /// The Delta table id of the slice it was for; `None` for a first build that failed.
    pub slice_id: Option<String>,
}

impl Attempt {
    /// The attempt as one row of [`SCHEMA`].
    pub(crate) fn to_batch(&self) -> Result<RecordBatch> {
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
            Arc::new(StringArray::from(vec![self
                .built
                .as_ref()
                .map(|b| b.mode.to_string())])),
            Arc::new(StringArray::from(vec![self
                .built
                .as_ref()
                .map(|b| b.reason.clone())])),
            Arc::new(StringArray::from(vec![self
                .built
                .as_ref()
                .map(|b| format_reads(&b.reads))])),
            Arc::new(StringArray::from(vec![self.slice_id.as_deref()])),
        ];
        Ok(RecordBatch::try_new(SCHEMA.clone(), columns)?)
    }
}

/// Appends one attempt to the slice's log (creating the log on first use).
pub(crate) async fn append(
    warehouse: &Warehouse,
    slice: &SliceName,
    attempt: &Attempt,
) -> Result<()> {
    let batch = attempt.to_batch()?;
    let rel = Warehouse::refreshes_path(slice);
    // Two processes may both find no log and race to create it; the loser appends after.
    for round in 0..3 {
        let existing = warehouse.load(&rel, None).await?;
        let base = warehouse.write_base(&rel, existing.as_ref())?;
        let write = WriteBuilder::new(base.log_store, base.snapshot)
            .with_input_batches([batch.clone()])
            .with_save_mode(SaveMode::Append)
            // Logs written before a column was added gain it.
            .with_schema_mode(SchemaMode::Merge)
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
                if table
                    .snapshot()
                    .is_ok_and(|s| s.log_data().num_files() >= COMPACT_AT)
                {
                    compact(warehouse, &rel).await;
                }
                return Ok(());
            }
            Err(_) if existing.is_none() && round < 2 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A refresh log holding this many files is compacted.
pub(crate) const COMPACT_AT: usize = 32;

/// Files of a refresh log stop being compacted again once this big.
const COMPACTED_SIZE: u64 = 1 << 20;

/// Logs being compacted by this process, by URL.
static COMPACTING: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Mutex::default);

/// A compaction of this process, until dropped.
struct Compacting(String);

impl Drop for Compacting {
    fn drop(&mut self) {
        if let Ok(mut logs) = COMPACTING.lock() {
            logs.remove(&self.0);
        }
    }
}

/// Compacts the refresh log at `rel`, grown to [`COMPACT_AT`] files, into files of up to
/// [`COMPACTED_SIZE`] (Delta's OPTIMIZE: the commit changes no data, `dataChange=false`), so
/// that a process reading a slice's history reads a few files, however many attempts it has.
/// Best effort: a compaction that fails or loses a race leaves the log as it was, and its
/// output, if any, is deleted by VACUUM.
///
/// One compaction of a log at a time, from its latest version: delta-rs does not count two
/// compactions removing the same files as a conflict, so two at once would both commit and
/// the rows of those files would be read twice.
async fn compact(warehouse: &Warehouse, rel: &str) {
    let key = format!("{}{rel}", warehouse.url());
    // Another task of this process is compacting it: the next append will, if need be.
    if !COMPACTING
        .lock()
        .expect("compacting lock")
        .insert(key.clone())
    {
        return;
    }
    let _done = Compacting(key);
    let Ok(Some(table)) = warehouse.load(rel, None).await else {
        return;
    };
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
pub(crate) struct AttemptSummary {
    /// The attempt's id (as its marker names it).
    pub attempt_id: String,
    /// `create`, `refresh` or `replace`.
    pub kind: String,
    /// [`SUCCESS`], [`NO_CHANGE`], [`FAILED`], [`CONFLICT`], ...
    pub status: String,
    /// When it started (ms since the epoch).
    pub started_at: i64,
    /// When it ended (ms since the epoch).
    pub ended_at: i64,
    /// Its error, if it failed.
    pub error: Option<String>,
    /// The Delta table id of the slice it was for (see [`Attempt::slice_id`]).
    pub slice_id: Option<String>,
}

/// Of `attempts` (of every slice that had the name), those of the slice whose Delta table id
/// is `id` and that was created at `created_ms`: a slice made again under a dropped slice's
/// name inherits none of its attempts. Attempts logged without an id (before ids were logged,
/// or a first build that failed) count when they started after the slice was created.
pub(crate) fn of_slice(
    attempts: Vec<AttemptSummary>,
    id: Option<&str>,
    created_ms: Option<i64>,
) -> Vec<AttemptSummary> {
    attempts
        .into_iter()
        .filter(|a| match &a.slice_id {
            Some(of) => Some(of.as_str()) == id,
            None => created_ms.is_none_or(|c| a.started_at >= c),
        })
        .collect()
}

/// Attempts of one slice that matter to its state: failures since its latest commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Failures {
    /// Failed refreshes that started after the slice's latest commit, in a row (failed
    /// replaces not counted).
    pub count: u32,
    /// The latest of them.
    pub last: Option<AttemptSummary>,
}

/// Attempts kept per slice: enough to count failures in a row up to any sensible
/// `max_failures`.
pub(crate) const KEPT_PER_SLICE: usize = 128;

/// Failed attempts among `attempts` (oldest first) that started at or after `since` (ms),
/// the slice's latest commit. A failed `CREATE OR REPLACE` is shown (it is the latest error)
/// but not counted: the slice still serves its definition as before, so a user's bad new
/// definition never brings it nearer to suspension.
pub(crate) fn failures_since(attempts: &[AttemptSummary], since: i64) -> Failures {
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

#[cfg(test)]
mod tests {
    use super::cache::SliceLog;
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
            built: None,
            slice_id: Some("one".into()),
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
    fn a_slice_made_again_owns_none_of_its_predecessors_attempts() {
        let mut log = SliceLog::default();
        let mut legacy = attempt(FAILED, 100);
        legacy.slice_id = None;
        let mut failed_create = attempt(FAILED, 250);
        failed_create.slice_id = None;
        let mut again = attempt(SUCCESS, 300);
        again.slice_id = Some("two".into());
        for a in [legacy, attempt(FAILED, 200), failed_create, again] {
            log.add_batch(&a.to_batch().unwrap());
        }
        let all: Vec<AttemptSummary> = log.attempts.iter().cloned().collect();
        let started = |v: Vec<AttemptSummary>| v.iter().map(|a| a.started_at).collect::<Vec<_>>();
        // The first slice (created at 50): its own attempt, and those logged without an id
        // since it was created.
        assert_eq!(
            started(of_slice(all.clone(), Some("one"), Some(50))),
            [100, 200, 250]
        );
        // The slice made again at 280: only its own.
        assert_eq!(started(of_slice(all, Some("two"), Some(280))), [300]);
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
