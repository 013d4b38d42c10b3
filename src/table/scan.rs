//! The direct scan of a table version that needs no Delta reader features: the version's
//! Parquet files, each with its Delta statistics, handed to DataFusion's own Parquet scan as
//! DataFusion plans a listing table's, its readers watched for damaged files.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::project_schema;
use datafusion::common::Statistics;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::{
    transform_schema_to_view, CachedParquetFileReaderFactory, ParquetFileReaderFactory,
};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::physical_plan::{FileSource, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::Result as DFResult;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::ExecutionPlan;
use deltalake::DeltaTable;
use object_store::path::Path;
use object_store::ObjectMeta;

use super::damage::{Diagnose, WatchedReaders};
use super::file_stats::file_statistics;
use super::HIDDEN;
use crate::error::{IcePieError, Result};

/// The files of one version of a table that needs no Delta reader features.
#[derive(Clone)]
pub(super) struct DirectScan {
    pub(super) schema: SchemaRef,
    pub(super) store: ObjectStoreUrl,
    /// The table's root in that store.
    pub(super) root: Path,
    pub(super) files: Vec<PartitionedFile>,
    pub(super) statistics: Statistics,
}

impl DirectScan {
    /// The direct scan of `table`'s loaded version, or `None` when it needs delta-rs.
    /// `views`: strings and binaries read as view types.
    pub(super) fn try_new(table: &DeltaTable, views: bool, hide: bool) -> Result<Option<Self>> {
        let state = table.snapshot()?;
        // Read through serde: delta-rs keeps these accessors internal.
        let metadata = serde_json::to_value(state.metadata()).unwrap_or_default();
        let protocol = serde_json::to_value(state.protocol()).unwrap_or_default();
        let partitioned = metadata
            .get("partitionColumns")
            .and_then(|c| c.as_array())
            .is_none_or(|c| !c.is_empty());
        let plain_reader = protocol.get("minReaderVersion").and_then(|v| v.as_i64()) == Some(1);
        if partitioned || !plain_reader {
            return Ok(None);
        }
        let url = table.table_url();
        let store = ObjectStoreUrl::parse(&url[..url::Position::BeforePath])?;
        let root = Path::from_url_path(url.path()).map_err(|e| IcePieError::CorruptMetadata {
            what: url.to_string(),
            reason: e.to_string(),
        })?;
        // Strings and binaries as views, as DataFusion reads Parquet by default
        // (`schema_force_view_types`): faster to filter, group and join on.
        let schema = state.snapshot().arrow_schema();
        let schema = match views {
            true => Arc::new(transform_schema_to_view(&schema)),
            false => schema,
        };
        // A slice's own bookkeeping (an aggregate's keys and states) is not its data.
        let schema = match hide {
            true => Arc::new(datafusion::arrow::datatypes::Schema::new_with_metadata(
                schema
                    .fields()
                    .iter()
                    .filter(|f| !f.name().starts_with(HIDDEN))
                    .cloned()
                    .collect::<Vec<_>>(),
                schema.metadata().clone(),
            )),
            false => schema,
        };
        let mut files = Vec::new();
        for file in state.log_data().iter() {
            let relative = file.object_store_path();
            let size = u64::try_from(file.size()).unwrap_or_default();
            let stats = file_statistics(&schema, file.stats().as_deref(), file.num_records(), size);
            // The parts are already encoded: build the path from them, not from text.
            files.push(
                PartitionedFile::new_from_meta(ObjectMeta {
                    location: Path::from_iter(root.parts().chain(relative.parts())),
                    last_modified: chrono::DateTime::from_timestamp_millis(
                        file.modification_time(),
                    )
                    .unwrap_or_default(),
                    size,
                    e_tag: None,
                    version: None,
                })
                .with_statistics(Arc::new(stats)),
            );
        }
        // The table's ranges and counts, as a listing table derives them from the footers.
        let statistics = Statistics::try_merge_iter(
            files.iter().filter_map(|f| f.statistics.as_deref()),
            &schema,
        )?;
        Ok(Some(Self {
            schema,
            store,
            root,
            files,
            statistics,
        }))
    }

    pub(super) async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        limit: Option<usize>,
        watch: Option<&Arc<dyn Diagnose>>,
    ) -> DFResult<(Arc<dyn ExecutionPlan>, Option<ExecutionPlanMetricsSet>)> {
        if self.files.is_empty() {
            let schema = project_schema(&self.schema, projection)?;
            return Ok((Arc::new(EmptyExec::new(schema)), None));
        }
        // Spread the files over the partitions; DataFusion splits big files further.
        let groups = state
            .config()
            .target_partitions()
            .clamp(1, self.files.len());
        let mut file_groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); groups];
        for (i, file) in self.files.iter().enumerate() {
            file_groups[i % groups].push(file.clone());
        }
        // As DataFusion's ParquetFormat plans a scan (footer cache included), with the
        // readers watched for damaged files.
        let options = state.table_options().parquet.clone();
        let runtime = state.runtime_env();
        let store = runtime.object_store(self.store.clone())?;
        let cache = runtime.cache_manager.get_file_metadata_cache();
        let mut readers: Arc<dyn ParquetFileReaderFactory> =
            Arc::new(CachedParquetFileReaderFactory::new(store.clone(), cache));
        if let Some(watch) = watch {
            readers = Arc::new(WatchedReaders {
                inner: readers,
                store,
                root: self.root.clone(),
                watch: watch.clone(),
            });
        }
        let mut source = ParquetSource::new(TableSchema::from(self.schema.clone()))
            .with_table_parquet_options(options.clone())
            .with_parquet_file_reader_factory(readers);
        if let Some(hint) = options.global.metadata_size_hint {
            source = source.with_metadata_size_hint(hint);
        }
        // Shared with the sources the optimizer derives from this one (a pushed-down
        // predicate), so it shows what the query read.
        let metrics = source.metrics().clone();
        let config = FileScanConfigBuilder::new(self.store.clone(), Arc::new(source))
            .with_file_groups(file_groups.into_iter().map(FileGroup::new).collect())
            .with_statistics(self.statistics.clone())
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok((DataSourceExec::from_data_source(config), Some(metrics)))
    }
}
