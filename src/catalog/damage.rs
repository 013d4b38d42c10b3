//! Noticing damaged files while reading them.
//!
//! The Parquet scan of a core table or slice reads its files through [`WatchedReaders`], a
//! `ParquetFileReaderFactory` around DataFusion's own (footer caching included), so the plan
//! keeps its shape and every optimization of DataFusion's scan. When reading a file fails,
//! the file is checked ([`quarantine::check_files`]'s check: present, of the recorded size,
//! with a readable footer): a damaged file is recorded (see [`quarantine`]) and the query
//! fails with an error naming the table, the file and the fix; an error of another kind (a
//! network fault, say) is passed on as it was, and quarantines nothing.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::ParquetFileReaderFactory;
use datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions;
use datafusion::parquet::arrow::async_reader::AsyncFileReader;
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::metadata::ParquetMetaData;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use futures::future::BoxFuture;
use futures::FutureExt;
use object_store::path::Path;
use object_store::ObjectStore;

use super::table::TableKind;
use crate::slice::meta;
use crate::slice::quarantine::{self, check_file};
use crate::storage::names::SliceName;
use crate::storage::{Warehouse, SLICES_DIR};

/// Which table a scan reads, and where to record what is wrong with it.
#[derive(Debug)]
pub(crate) struct DamageWatch {
    pub warehouse: Warehouse,
    /// The table's path in the warehouse.
    pub rel: String,
    pub kind: TableKind,
    /// Qualified name (`core.events`, `finance.revenue`).
    pub name: String,
}

impl DamageWatch {
    /// Turns the failed read of `file` (relative to the table) into a damage report when the
    /// file is damaged; otherwise gives the error back unchanged.
    async fn diagnose(
        &self,
        store: Arc<dyn ObjectStore>,
        location: Path,
        file: String,
        bytes: u64,
        error: ParquetError,
    ) -> ParquetError {
        let size = i64::try_from(bytes).unwrap_or(i64::MAX);
        let check = check_file(store, location, size, false).await;
        if check.ok() {
            return error;
        }
        let problem = format!(
            "{}: {}",
            check.status,
            check.detail.unwrap_or_else(|| error.to_string())
        );
        // Reporting matters more than recording; a failed record is found again next read.
        let _ = quarantine::record(&self.warehouse, &self.rel, &file, &problem).await;
        let damaged = match self.kind {
            TableKind::Core => {
                let readers = readers_of(&self.warehouse, &self.name).await;
                quarantine::core_damaged(&self.name, &file, &problem, &readers)
            }
            _ => quarantine::slice_damaged(&self.name, &file, &problem),
        };
        ParquetError::External(Box::new(damaged))
    }
}

/// The slices whose latest version reads `table` (a qualified name); those that cannot be
/// read are left out.
pub(crate) async fn readers_of(warehouse: &Warehouse, table: &str) -> Vec<String> {
    let mut readers = Vec::new();
    let Ok(domains) = warehouse.list_children(SLICES_DIR).await else {
        return readers;
    };
    for domain in domains {
        let Ok(names) = warehouse
            .list_children(&format!("{SLICES_DIR}/{domain}"))
            .await
        else {
            continue;
        };
        for name in names {
            let Ok(slice) = SliceName::new(domain.clone(), &name) else {
                continue;
            };
            let Ok(Some(t)) = warehouse.load(&Warehouse::slice_path(&slice), None).await else {
                continue;
            };
            if let Ok((m, _)) = meta::latest_meta(&t, &slice.to_string()).await {
                if m.inputs.iter().any(|i| i.table == table) {
                    readers.push(slice.to_string());
                }
            }
        }
    }
    readers
}

/// DataFusion's reader factory, watched for damaged files.
#[derive(Debug)]
pub(crate) struct WatchedReaders {
    pub inner: Arc<dyn ParquetFileReaderFactory>,
    pub store: Arc<dyn ObjectStore>,
    /// The table's root, to name files relative to it.
    pub root: Path,
    pub watch: Arc<DamageWatch>,
}

impl ParquetFileReaderFactory for WatchedReaders {
    fn create_reader(
        &self,
        partition_index: usize,
        partitioned_file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> datafusion::common::Result<Box<dyn AsyncFileReader + Send>> {
        let location = partitioned_file.object_meta.location.clone();
        let bytes = partitioned_file.object_meta.size;
        let file =
            Path::from_iter(location.prefix_match(&self.root).into_iter().flatten()).to_string();
        let inner = self.inner.create_reader(
            partition_index,
            partitioned_file,
            metadata_size_hint,
            metrics,
        )?;
        Ok(Box::new(WatchedReader {
            inner,
            store: self.store.clone(),
            location,
            file,
            bytes,
            watch: self.watch.clone(),
        }))
    }
}

/// One file's reader, watched.
struct WatchedReader {
    inner: Box<dyn AsyncFileReader + Send>,
    store: Arc<dyn ObjectStore>,
    location: Path,
    file: String,
    bytes: u64,
    watch: Arc<DamageWatch>,
}

type Parts = (Arc<dyn ObjectStore>, Path, String, u64, Arc<DamageWatch>);

impl WatchedReader {
    /// What a failed read needs to be diagnosed, cloned so `inner` can be borrowed.
    fn parts(&self) -> Parts {
        (
            self.store.clone(),
            self.location.clone(),
            self.file.clone(),
            self.bytes,
            self.watch.clone(),
        )
    }
}

/// `read`, with its error diagnosed.
fn watched<'a, T: Send + 'a>(
    read: BoxFuture<'a, Result<T, ParquetError>>,
    (store, location, file, bytes, watch): Parts,
) -> BoxFuture<'a, Result<T, ParquetError>> {
    async move {
        match read.await {
            Ok(v) => Ok(v),
            Err(e) => Err(watch.diagnose(store, location, file, bytes, e).await),
        }
    }
    .boxed()
}

impl AsyncFileReader for WatchedReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, ParquetError>> {
        let parts = self.parts();
        watched(self.inner.get_bytes(range), parts)
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, Result<Vec<Bytes>, ParquetError>> {
        let parts = self.parts();
        watched(self.inner.get_byte_ranges(ranges), parts)
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, Result<Arc<ParquetMetaData>, ParquetError>> {
        let parts = self.parts();
        watched(self.inner.get_metadata(options), parts)
    }
}
