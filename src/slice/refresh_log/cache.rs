//! [`LogCache`]: what a process has read of the slices' refresh logs, each data file read
//! once.
//!
//! # Invariants
//!
//! - Reading a slice's attempts costs what its log gained since the last read, not the length
//!   of its history (invariant 8; `budgets::a_long_refresh_history_reads_as_few_files_as_a_short_one`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, TimestampMicrosecondType};
use datafusion::error::DataFusionError;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use object_store::path::Path;
use object_store::ObjectStoreExt;

use crate::error::{IcePieError, Result};
use crate::storage::names::SliceName;
use crate::storage::Warehouse;

use super::{AttemptSummary, KEPT_PER_SLICE};

/// What this process has read of the slices' refresh logs.
#[derive(Debug, Default)]
pub(crate) struct LogCache {
    /// One lock per slice: reading one slice's long log never holds up another's.
    slices: Mutex<HashMap<SliceName, Arc<tokio::sync::Mutex<SliceLog>>>>,
}

/// The recent attempts of one slice, as read up to `version` of its log.
#[derive(Debug, Default)]
pub(super) struct SliceLog {
    version: Option<u64>,
    pub(super) attempts: VecDeque<AttemptSummary>,
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
    /// (Delta's log clean-up) is the whole log read again. With `upto`, as of that version
    /// of the log, unless this process has already read further.
    pub(crate) async fn attempts(
        &self,
        warehouse: &Warehouse,
        slice: &SliceName,
        upto: Option<u64>,
    ) -> Result<Vec<AttemptSummary>> {
        let rel = Warehouse::refreshes_path(slice);
        let latest = match upto {
            Some(v) => v,
            None => match warehouse.latest_version(&rel).await? {
                Some(latest) => latest as u64,
                None => {
                    self.slices.lock().expect("log cache").remove(slice);
                    return Ok(Vec::new());
                }
            },
        };
        let log = warehouse.handle(&rel)?;
        let entry = self
            .slices
            .lock()
            .expect("log cache")
            .entry(slice.clone())
            .or_default()
            .clone();
        let mut cached = entry.lock().await;
        // Behind, or (without `upto`) a log made anew since: read.
        let stale = match upto {
            Some(_) => cached.version.is_none_or(|v| v < latest),
            None => cached.version != Some(latest),
        };
        if stale {
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
        let Some(table) = warehouse.load(rel, Some(latest as i64)).await? else {
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

    pub(super) fn add_batch(&mut self, batch: &RecordBatch) {
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
        let slice_ids = column("slice_id")
            .map(|c| strings(&c))
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
            let attempt_id = ids[row].clone().unwrap_or_default();
            // A row read twice (two compactions of one log by two processes at once both
            // commit: delta-rs does not see them conflict) counts once.
            if !attempt_id.is_empty() && self.attempts.iter().any(|a| a.attempt_id == attempt_id) {
                continue;
            }
            let summary = AttemptSummary {
                attempt_id,
                kind: kind[row].clone().unwrap_or_default(),
                status,
                started_at,
                ended_at: started_at + duration.value(row),
                error: error[row].clone(),
                slice_id: slice_ids[row].clone(),
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
