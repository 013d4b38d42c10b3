//! Damaged files: detect, quarantine, heal.
//!
//! A data file of a table's current version can be missing, truncated or not Parquet at all
//! (a disk fault, a hand-made `rm`, a half-copied restore). A scan that fails on a table's
//! file checks that version's files ([`check_files`]); when it finds a damaged one it records
//! it, `<warehouse>/_system/quarantine/<table path>/record.json`, and the query fails with an
//! error naming the table, the file and the fix. While the record names a file of the slice's
//! current version, the slice is `quarantined`: `system.slices` shows it with the file and
//! the error, and its queries fail at once with that error, while every other slice answers.
//! A successful refresh or rollback (whose version no longer holds the file) clears it, as
//! does a `VERIFY SLICE` that finds every file sound again.
//!
//! A damaged core file is reported the same way, naming the core table, the file and the
//! slices that read it; the core is never rewritten, so the fix is to restore the file.
//!
//! ## Invariants
//! - A quarantine is in force only while the damaged file belongs to the version served
//!   (guarded by `lifetime::a_damaged_slice_is_quarantined_alone_and_healed_by_refresh`).

use std::sync::Arc;

use chrono::Utc;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::{
    DefaultParquetFileReaderFactory, ParquetFileReaderFactory,
};
use datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions;
use datafusion::parquet::arrow::async_reader::AsyncFileReader;
use datafusion::parquet::arrow::ParquetRecordBatchStreamBuilder;
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::metadata::ParquetMetaData;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use deltalake::DeltaTable;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use crate::error::{IcePieError, Result};
use crate::storage::names::SliceName;
use crate::storage::Warehouse;

/// Folder of the quarantine records, one per table under the table's own path.
pub(crate) const QUARANTINE_PATH: &str = "_system/quarantine/";

/// Files checked at once.
const PARALLEL_CHECKS: usize = 8;

/// A damaged file of a table, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Quarantine {
    /// The file, relative to the table.
    pub file: String,
    /// What is wrong with it.
    pub problem: String,
    /// When it was found (ms since the epoch).
    pub since: i64,
}

/// What a check found of one file of a table's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    /// The file, relative to the table.
    pub file: String,
    /// Its size as the Delta log records it.
    pub bytes: i64,
    /// `ok`, `missing`, `wrong size` or `unreadable`.
    pub status: &'static str,
    /// What is wrong, when something is.
    pub detail: Option<String>,
}

impl FileCheck {
    /// True when the file is sound.
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// The error a read of a damaged slice gets: what is wrong, and the two ways to heal it.
pub(crate) fn slice_damaged(slice: &str, file: &str, problem: &str) -> IcePieError {
    IcePieError::Damaged {
        what: format!("slice '{slice}'"),
        file: file.to_string(),
        problem: problem.to_string(),
        fix: format!(
            "The slice is quarantined: REFRESH SLICE {slice} rebuilds it from its inputs, or \
             ROLLBACK SLICE {slice} TO VERSION n returns to a version whose files are intact \
             (VERIFY SLICE {slice} checks every file)"
        ),
    }
}

/// The error a read of a damaged core table gets, naming the slices that read it.
pub(crate) fn core_damaged(
    table: &str,
    file: &str,
    problem: &str,
    readers: &[String],
) -> IcePieError {
    let readers = if readers.is_empty() {
        "none".to_string()
    } else {
        readers.join(", ")
    };
    IcePieError::Damaged {
        what: format!("core table '{table}'"),
        file: file.to_string(),
        problem: problem.to_string(),
        fix: format!(
            "The core is never rewritten: restore the file from a backup or replica. Slices \
             reading it ({readers}) keep serving the version they have"
        ),
    }
}

fn record_path(rel: &str) -> Path {
    Path::from(format!("{QUARANTINE_PATH}{rel}record.json"))
}

/// The quarantine record of the table at `rel`, if any.
pub(crate) async fn read(warehouse: &Warehouse, rel: &str) -> Result<Option<Quarantine>> {
    match warehouse.store().get(&record_path(rel)).await {
        Ok(got) => Ok(serde_json::from_slice(&got.bytes().await?).ok()),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The record of `rel` when it names a file of `table`'s loaded version.
pub(crate) async fn in_force(
    warehouse: &Warehouse,
    rel: &str,
    table: &DeltaTable,
) -> Result<Option<Quarantine>> {
    let Some(q) = read(warehouse, rel).await? else {
        return Ok(None);
    };
    let current = table
        .snapshot()?
        .log_data()
        .iter()
        .any(|f| f.object_store_path().as_ref() == q.file);
    Ok(current.then_some(q))
}

/// Records `problem` of `file` for the table at `rel`.
pub(crate) async fn record(
    warehouse: &Warehouse,
    rel: &str,
    file: &str,
    problem: &str,
) -> Result<()> {
    let q = Quarantine {
        file: file.to_string(),
        problem: problem.to_string(),
        since: Utc::now().timestamp_millis(),
    };
    let body = serde_json::to_vec(&q).expect("a record serializes");
    warehouse
        .store()
        .put(&record_path(rel), body.into())
        .await?;
    warehouse.journal().note(rel).await;
    Ok(())
}

/// Lifts the quarantine of the table at `rel` (nothing when there is none).
pub(crate) async fn clear(warehouse: &Warehouse, rel: &str) -> Result<()> {
    match warehouse.store().delete(&record_path(rel)).await {
        Ok(()) => {
            warehouse.journal().note(rel).await;
            Ok(())
        }
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Checks every file of `table`'s loaded version: present, of the size the log records, and
/// readable as Parquet (its footer; with `full`, every row too). In the log's file order.
pub(crate) async fn check_files(table: &DeltaTable, full: bool) -> Result<Vec<FileCheck>> {
    let store = table.log_store().object_store(None);
    let files: Vec<(Path, i64)> = table
        .snapshot()?
        .log_data()
        .iter()
        .map(|f| (f.object_store_path(), f.size()))
        .collect();
    let checks = futures::stream::iter(files)
        .map(|(path, bytes)| check_file(store.clone(), path, bytes, full))
        .buffered(PARALLEL_CHECKS)
        .collect::<Vec<_>>()
        .await;
    Ok(checks)
}

/// Checks one file at `path` in `store`, whose log records `bytes` bytes.
pub(crate) async fn check_file(
    store: Arc<dyn ObjectStore>,
    path: Path,
    bytes: i64,
    full: bool,
) -> FileCheck {
    let mut check = FileCheck {
        file: path.to_string(),
        bytes,
        status: "ok",
        detail: None,
    };
    let mut fail = |status, detail: String| {
        check.status = status;
        check.detail = Some(detail);
    };
    let meta = match store.head(&path).await {
        Ok(m) => m,
        Err(object_store::Error::NotFound { .. }) => {
            fail("missing", "the file is gone".into());
            return check;
        }
        Err(e) => {
            fail("unreadable", format!("cannot reach it: {e}"));
            return check;
        }
    };
    if i64::try_from(meta.size).ok() != Some(bytes) {
        fail(
            "wrong size",
            format!("it has {} bytes, the Delta log records {bytes}", meta.size),
        );
        return check;
    }
    // DataFusion's own reader of a file, as its scans read them.
    let reader = DefaultParquetFileReaderFactory::new(store).create_reader(
        0,
        // The path as asked: a prefixed store may report its full location.
        PartitionedFile::new_from_meta(ObjectMeta {
            location: path,
            ..meta
        }),
        None,
        &ExecutionPlanMetricsSet::new(),
    );
    let read = async {
        let reader = Reader(reader.map_err(|e| ParquetError::External(Box::new(e)))?);
        let builder = ParquetRecordBatchStreamBuilder::new(reader).await?;
        if full {
            let mut rows = builder.build()?;
            while rows.try_next().await?.is_some() {}
        }
        Ok::<_, ParquetError>(())
    };
    if let Err(e) = read.await {
        fail("unreadable", format!("not readable as Parquet: {e}"));
    }
    check
}

/// What `VERIFY SLICE` found of one slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The slice.
    pub slice: SliceName,
    /// The version checked (the one served).
    pub version: i64,
    /// Every file of that version.
    pub files: Vec<FileCheck>,
}

/// `VERIFY SLICE`: checks every file of the version `name` serves, reading every row, and
/// quarantines the slice when one is damaged or lifts its quarantine when all are sound.
pub(crate) async fn verify(warehouse: &Warehouse, name: &SliceName) -> Result<Verified> {
    let rel = Warehouse::slice_path(name);
    let table = warehouse
        .load(&rel, None)
        .await?
        .ok_or_else(|| IcePieError::SliceNotFound(name.to_string()))?;
    let files = check_files(&table, true).await?;
    match files.iter().find(|f| !f.ok()) {
        Some(bad) => {
            let problem = format!("{}: {}", bad.status, bad.detail.clone().unwrap_or_default());
            record(warehouse, &rel, &bad.file, &problem).await?;
        }
        None => clear(warehouse, &rel).await?,
    }
    Ok(Verified {
        slice: name.clone(),
        version: table.version().unwrap_or_default() as i64,
        files,
    })
}

/// A boxed reader the Parquet stream builder accepts (parquet implements its trait for
/// `Box<dyn AsyncFileReader>` only, not for the `Send` one DataFusion hands out).
struct Reader(Box<dyn AsyncFileReader + Send>);

impl AsyncFileReader for Reader {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, datafusion::parquet::errors::Result<bytes::Bytes>> {
        self.0.get_bytes(range)
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> BoxFuture<'_, datafusion::parquet::errors::Result<Vec<bytes::Bytes>>> {
        self.0.get_byte_ranges(ranges)
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, datafusion::parquet::errors::Result<Arc<ParquetMetaData>>> {
        self.0.get_metadata(options)
    }
}
