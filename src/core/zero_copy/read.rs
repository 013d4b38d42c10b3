//! Reading a Parquet file in an object store: its footer, and one row group decoded in full.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use datafusion::parquet::arrow::async_reader::AsyncFileReader;
use datafusion::parquet::arrow::ParquetRecordBatchStreamBuilder;
use datafusion::parquet::errors::{ParquetError, Result as ParquetResult};
use datafusion::parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use futures::future::BoxFuture;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::stats::{Counting, Totals};

/// A Parquet file of known size in an object store.
#[derive(Debug, Clone)]
pub(super) struct StoreFile {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    pub size: u64,
}

impl AsyncFileReader for StoreFile {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, ParquetResult<Bytes>> {
        Box::pin(async move {
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        })
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, ParquetResult<Vec<Bytes>>> {
        Box::pin(async move {
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        })
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, ParquetResult<Arc<ParquetMetaData>>> {
        Box::pin(async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_metadata_options(options.map(|o| o.metadata_options().clone()))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        })
    }
}

impl StoreFile {
    /// The file's footer, with its Arrow schema as a Delta reader sees it (from the Parquet
    /// schema; embedded Arrow metadata is ignored).
    pub(super) async fn footer(&self) -> Result<ArrowReaderMetadata, String> {
        let options = ArrowReaderOptions::new().with_skip_arrow_metadata(true);
        ArrowReaderMetadata::load_async(&mut self.clone(), options)
            .await
            .map_err(|e| e.to_string())
    }

    /// Decodes row group `row_group` in full, summing what Delta's statistics need.
    pub(super) async fn read_row_group(
        self,
        footer: ArrowReaderMetadata,
        row_group: usize,
    ) -> Result<Totals, String> {
        let schema = footer.schema().clone();
        let mut stream = ParquetRecordBatchStreamBuilder::new_with_metadata(self, footer)
            .with_row_groups(vec![row_group])
            .with_batch_size(8192)
            .build()
            .map_err(|e| e.to_string())?;
        let mut counting = Counting::new(&schema).map_err(|e| e.to_string())?;
        while let Some(batch) = stream.try_next().await.map_err(|e| e.to_string())? {
            counting.add(&batch).map_err(|e| e.to_string())?;
        }
        counting.totals().map_err(|e| e.to_string())
    }
}
