//! Noticing damaged files while reading them.
//!
//! The Parquet scan of a core table or slice reads its files through [`WatchedReaders`], a
//! `ParquetFileReaderFactory` around DataFusion's own (footer caching included), so the plan
//! keeps its shape and every optimization of DataFusion's scan. When reading a file fails,
//! the failure goes to the table's [`Diagnose`] (the slice layer's damage watch checks the
//! file and records a damaged one); what it returns is the error the query fails with.

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

/// What a scan does with a file it failed to read.
pub(crate) trait Diagnose: std::fmt::Debug + Send + Sync {
    /// Turns the failed read of `file` (relative to the table; `bytes` long at `location` in
    /// `store`) into the error the query fails with: a damage report when the file is
    /// damaged, `error` unchanged otherwise.
    fn diagnose(
        &self,
        store: Arc<dyn ObjectStore>,
        location: Path,
        file: String,
        bytes: u64,
        error: ParquetError,
    ) -> BoxFuture<'_, ParquetError>;
}

/// DataFusion's reader factory, watched for damaged files.
#[derive(Debug)]
pub(crate) struct WatchedReaders {
    pub inner: Arc<dyn ParquetFileReaderFactory>,
    pub store: Arc<dyn ObjectStore>,
    /// The table's root, to name files relative to it.
    pub root: Path,
    pub watch: Arc<dyn Diagnose>,
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
    watch: Arc<dyn Diagnose>,
}

type Parts = (Arc<dyn ObjectStore>, Path, String, u64, Arc<dyn Diagnose>);

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
