//! The table providers of core tables and slices, and what instruments the plans that read
//! them: the layer between storage and the slice and core layers.
//!
//! [`IcePieTable`] is a Delta table read at one version, read-only.
//!
//! A provider is pinned to the version that was current when the query was planned, so a
//! query sees one whole committed version even while a refresh commits the next one
//! (invariant 1), and it reads only that table's files (invariant 3). Writes through plain SQL
//! are refused with an error that says which icepie statement to use instead.
//!
//! Tables as icepie writes them (no partition columns, no Delta reader features such as
//! deletion vectors or column mapping) are exactly their Parquet files, so the provider hands
//! that version's file list to DataFusion's own Parquet scan, as DataFusion reads a listing
//! table, with no per-row work on top: strings as view types, and each file's Delta
//! statistics attached so filters skip files without opening them ([`file_stats`];
//! test `budgets::filters_skip_files_by_their_delta_statistics`). Any other table (a partitioned slice, a table another
//! engine upgraded) is read through delta-rs's provider, which applies what Delta requires.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{ScanArgs, ScanResult, Session, TableProvider};
use datafusion::common::{Constraints, DFSchemaRef, Statistics};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::TableType;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown};
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::ExecutionPlan;
use deltalake::DeltaTable;

use crate::error::{IcePieError, Result};
use damage::Diagnose;
use scan::DirectScan;

pub(crate) mod damage;
pub(crate) mod file_stats;
pub(crate) mod live;
pub(crate) mod progress;
mod scan;
pub(crate) mod watch;

/// Prefix of the columns icepie keeps in a slice for itself (an aggregate slice's group keys
/// and states): never shown to readers.
pub(crate) const HIDDEN: &str = "__icepie_";

/// Which kind of icepie table a provider serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableKind {
    /// A table of the frozen core.
    Core,
    /// A slice.
    Slice,
    /// The refresh log (`system.refreshes`).
    System,
}

/// One scan of a core table or slice in a plan, as [`logging_scans`] collects them.
#[derive(Debug, Clone)]
pub(crate) struct ScanRecord {
    /// Qualified name.
    pub name: String,
    pub kind: TableKind,
    /// Data files the scan was given.
    pub files: usize,
    /// The Parquet scan's metrics (rows and bytes read, files skipped) as it runs; `None`
    /// when the table is read through delta-rs.
    pub metrics: Option<ExecutionPlanMetricsSet>,
}

tokio::task_local! {
    static SCANS: Arc<Mutex<Vec<ScanRecord>>>;
}

/// Runs `planning` (a physical planning) and returns, with its output, the scans of core
/// tables and slices it planned.
pub(crate) async fn logging_scans<F: std::future::Future>(
    planning: F,
) -> (F::Output, Vec<ScanRecord>) {
    let log = Arc::<Mutex<Vec<ScanRecord>>>::default();
    let out = SCANS.scope(log.clone(), planning).await;
    let scans = std::mem::take(&mut *log.lock().unwrap_or_else(|e| e.into_inner()));
    (out, scans)
}

/// True while a planning's scans are being logged (in this task): a plan planned inside it (a
/// view's) is part of that planning.
pub(crate) fn logging_scans_now() -> bool {
    SCANS.try_with(|_| ()).is_ok()
}

/// A read-only Delta table pinned to one version.
#[derive(Clone)]
pub(crate) struct IcePieTable {
    kind: TableKind,
    name: String,
    version: i64,
    /// Read at a version the SQL named (`core_at`, `slice_at`), not the latest.
    pinned: bool,
    /// Read through `fresh(...)`, which applied its own staleness limit.
    freshness_checked: bool,
    /// Where a damaged file found while scanning is reported.
    watch: Option<Arc<dyn Diagnose>>,
    table: DeltaTable,
    reader: Reader,
}

/// How a provider reads its version.
#[derive(Clone)]
enum Reader {
    /// The version's Parquet files, scanned by DataFusion directly.
    Direct(DirectScan),
    /// delta-rs's provider.
    Delta(Arc<dyn TableProvider>),
}

impl fmt::Debug for IcePieTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IcePieTable")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

impl IcePieTable {
    /// Wraps a loaded Delta table; `name` is the qualified SQL name (`core.events`).
    pub(crate) async fn try_new(kind: TableKind, name: String, table: DeltaTable) -> Result<Self> {
        Self::build(kind, name, table, kind == TableKind::Slice).await
    }

    /// A slice's version with the columns icepie keeps for itself (an aggregate's keys and
    /// states), which [`try_new`](Self::try_new) hides.
    pub(crate) async fn with_hidden_columns(name: String, table: DeltaTable) -> Result<Self> {
        Self::build(TableKind::Slice, name, table, false).await
    }

    /// A refresh log read as `schema` (`system.refreshes`): columns its files lack (logs
    /// written before a column was added) read as NULL.
    pub(crate) async fn with_schema(
        kind: TableKind,
        name: String,
        table: DeltaTable,
        schema: SchemaRef,
    ) -> Result<Self> {
        let mut out = Self::build(kind, name, table, false).await?;
        if let Reader::Direct(direct) = &mut out.reader {
            // The files' statistics follow their own columns, not these.
            for file in &mut direct.files {
                file.statistics = None;
            }
            direct.statistics = Statistics::new_unknown(&schema);
            direct.schema = schema;
        }
        Ok(out)
    }

    async fn build(kind: TableKind, name: String, table: DeltaTable, hide: bool) -> Result<Self> {
        let version = table
            .version()
            .ok_or_else(|| IcePieError::CorruptMetadata {
                what: name.clone(),
                reason: "the Delta table has no committed version".into(),
            })?;
        // The refresh log keeps its declared types: system tables combine it with rows
        // built in memory.
        let reader = match DirectScan::try_new(&table, kind != TableKind::System, hide)? {
            Some(direct) => Reader::Direct(direct),
            None => {
                let provider = table.table_provider().await?;
                Reader::Delta(match hide {
                    true => Hidden::wrap(provider),
                    false => provider,
                })
            }
        };
        Ok(Self {
            kind,
            name,
            version: version as i64,
            pinned: false,
            freshness_checked: false,
            watch: None,
            table,
            reader,
        })
    }

    /// The Delta table read, at its version.
    pub(crate) fn delta_table(&self) -> &DeltaTable {
        &self.table
    }

    /// The Delta table id (`metaData.id`), which a table created again under the same name
    /// does not share.
    pub(crate) fn table_id(&self) -> Option<String> {
        crate::storage::table_id(&self.table)
    }

    /// The data files this provider scans, `None` when it reads through delta-rs.
    pub(crate) fn files(&self) -> Option<&[PartitionedFile]> {
        match &self.reader {
            Reader::Direct(d) => Some(&d.files),
            Reader::Delta(_) => None,
        }
    }

    /// The same version scanning only the files `keep` accepts; `None` when this provider
    /// reads through delta-rs, which cannot be limited so.
    pub(crate) fn only_files(
        &self,
        keep: impl Fn(&PartitionedFile) -> bool,
    ) -> Result<Option<Self>> {
        let Reader::Direct(direct) = &self.reader else {
            return Ok(None);
        };
        let files: Vec<PartitionedFile> =
            direct.files.iter().filter(|f| keep(f)).cloned().collect();
        let statistics = Statistics::try_merge_iter(
            files.iter().filter_map(|f| f.statistics.as_deref()),
            &direct.schema,
        )?;
        Ok(Some(Self {
            kind: self.kind,
            name: self.name.clone(),
            version: self.version,
            pinned: self.pinned,
            freshness_checked: self.freshness_checked,
            watch: self.watch.clone(),
            table: self.table.clone(),
            reader: Reader::Direct(DirectScan {
                files,
                statistics,
                ..direct.clone()
            }),
        }))
    }

    /// What a full scan reads: data files, rows and bytes.
    pub(crate) fn read_size(&self) -> (i64, i64, i64) {
        match &self.reader {
            Reader::Direct(d) => d.files.iter().fold((0, 0, 0), |(f, r, b), file| {
                let rows = file
                    .statistics
                    .as_deref()
                    .and_then(|s| s.num_rows.get_value().copied())
                    .unwrap_or_default();
                (f + 1, r + rows as i64, b + file.object_meta.size as i64)
            }),
            Reader::Delta(_) => crate::storage::table_stats(&self.table)
                .map(|s| (s.files, s.rows, s.bytes))
                .unwrap_or_default(),
        }
    }

    /// Marks this provider as reading a version the SQL named (`core_at`, `slice_at`).
    pub(crate) fn pinned(mut self) -> Self {
        self.pinned = true;
        self
    }

    /// Marks this provider as read through `fresh(...)`, whose limit was applied.
    pub(crate) fn freshness_checked(mut self) -> Self {
        self.freshness_checked = true;
        self
    }

    /// True for a provider read through `fresh(...)`.
    pub(crate) fn is_freshness_checked(&self) -> bool {
        self.freshness_checked
    }

    /// Reports damaged files found while scanning through `watch`.
    pub(crate) fn watched(mut self, watch: Arc<dyn Diagnose>) -> Self {
        self.watch = Some(watch);
        self
    }

    /// True for a version the SQL named rather than the latest.
    pub(crate) fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// Kind of table.
    pub(crate) fn kind(&self) -> TableKind {
        self.kind
    }

    /// Qualified name, e.g. `core.events` or `finance.revenue`.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The Delta version this provider reads.
    pub(crate) fn version(&self) -> i64 {
        self.version
    }

    /// The error a plain-SQL write of kind `what` (INSERT, UPDATE, ...) at this table gets.
    pub(crate) fn write_refused(&self, what: &str) -> IcePieError {
        let name = &self.name;
        let msg = match self.kind {
            TableKind::Core if what == "INSERT" => format!(
                "core table '{name}' is append-only and changes only through INGEST: \
                 use INGEST INTO {name} FROM 'files' or INGEST INTO {name} SELECT ..."
            ),
            TableKind::Core => format!(
                "core table '{name}' is immutable: {what} is not allowed. Append corrections \
                 with INGEST INTO {name} ... and derive corrected data in a slice"
            ),
            TableKind::Slice => format!(
                "slice '{name}' is materialized from its definition: {what} is not allowed. \
                 Change it with CREATE OR REPLACE SLICE {name} AS ... or rebuild it with REFRESH SLICE {name}"
            ),
            TableKind::System => format!("'{name}' is a read-only system table: {what} is not allowed"),
        };
        IcePieError::ReadOnly(msg)
    }

    fn refuse(&self, what: &str) -> datafusion::error::DataFusionError {
        self.write_refused(what).into()
    }

    /// Adds a scan of this table to the planning's log ([`logging_scans`]), if any.
    fn log_scan(&self, metrics: Option<ExecutionPlanMetricsSet>) {
        if self.kind == TableKind::System {
            return;
        }
        let files = match &self.reader {
            Reader::Direct(d) => d.files.len(),
            Reader::Delta(_) => self.read_size().0 as usize,
        };
        let record = ScanRecord {
            name: self.name.clone(),
            kind: self.kind,
            files,
            metrics,
        };
        let _ = SCANS.try_with(|log| {
            if let Ok(mut log) = log.lock() {
                log.push(record);
            }
        });
    }
}

#[async_trait]
impl TableProvider for IcePieTable {
    fn schema(&self) -> SchemaRef {
        match &self.reader {
            Reader::Direct(d) => d.schema.clone(),
            Reader::Delta(p) => p.schema(),
        }
    }

    fn constraints(&self) -> Option<&Constraints> {
        match &self.reader {
            Reader::Direct(_) => None,
            Reader::Delta(p) => p.constraints(),
        }
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn get_logical_plan(&'_ self) -> Option<Cow<'_, LogicalPlan>> {
        None
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        self.table
            .update_datafusion_session(state)
            .map_err(IcePieError::from)?;
        match &self.reader {
            // Filters are Inexact: DataFusion pushes them into the Parquet scan itself.
            Reader::Direct(d) => {
                let (plan, metrics) = d
                    .scan(state, projection, limit, self.watch.as_ref())
                    .await?;
                self.log_scan(metrics);
                Ok(plan)
            }
            Reader::Delta(p) => {
                self.log_scan(None);
                p.scan(state, projection, filters, limit).await
            }
        }
    }

    async fn scan_with_args<'a>(
        &self,
        state: &dyn Session,
        args: ScanArgs<'a>,
    ) -> DFResult<ScanResult> {
        match &self.reader {
            Reader::Direct(_) => {
                let projection = args.projection().map(|p| p.to_vec());
                let filters = args.filters().map(|f| f.to_vec()).unwrap_or_default();
                let plan = self
                    .scan(state, projection.as_ref(), &filters, args.limit())
                    .await?;
                Ok(ScanResult::new(plan))
            }
            Reader::Delta(p) => {
                self.table
                    .update_datafusion_session(state)
                    .map_err(IcePieError::from)?;
                self.log_scan(None);
                p.scan_with_args(state, args).await
            }
        }
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DFResult<Vec<TableProviderFilterPushDown>> {
        match &self.reader {
            Reader::Direct(_) => Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()]),
            Reader::Delta(p) => p.supports_filters_pushdown(filters),
        }
    }

    fn statistics(&self) -> Option<Statistics> {
        match &self.reader {
            Reader::Direct(d) => Some(d.statistics.clone()),
            Reader::Delta(p) => p.statistics(),
        }
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        _input: Arc<dyn ExecutionPlan>,
        _op: InsertOp,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Err(self.refuse("INSERT"))
    }

    async fn delete_from(
        &self,
        _state: &dyn Session,
        _filters: Vec<Expr>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Err(self.refuse("DELETE"))
    }

    async fn update(
        &self,
        _state: &dyn Session,
        _assignments: Vec<(String, Expr)>,
        _filters: Vec<Expr>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Err(self.refuse("UPDATE"))
    }

    async fn truncate(&self, _state: &dyn Session) -> DFResult<Arc<dyn ExecutionPlan>> {
        Err(self.refuse("TRUNCATE"))
    }

    async fn merge_into(
        &self,
        _state: &dyn Session,
        _source: Arc<dyn ExecutionPlan>,
        _merge_schema: DFSchemaRef,
        _on: Expr,
        _clauses: Vec<datafusion::logical_expr::dml::MergeIntoClause>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Err(self.refuse("MERGE"))
    }
}

/// delta-rs's provider of a slice without the columns icepie keeps for itself.
#[derive(Debug)]
struct Hidden {
    inner: Arc<dyn TableProvider>,
    schema: SchemaRef,
    /// The inner provider's index of each column shown.
    visible: Vec<usize>,
}

impl Hidden {
    /// `inner` as is when it has no hidden column, wrapped otherwise.
    fn wrap(inner: Arc<dyn TableProvider>) -> Arc<dyn TableProvider> {
        let all = inner.schema();
        let visible: Vec<usize> = (0..all.fields().len())
            .filter(|i| !all.field(*i).name().starts_with(HIDDEN))
            .collect();
        if visible.len() == all.fields().len() {
            return inner;
        }
        let schema = match all.project(&visible) {
            Ok(schema) => Arc::new(schema),
            Err(_) => return inner,
        };
        Arc::new(Self {
            inner,
            schema,
            visible,
        })
    }
}

#[async_trait]
impl TableProvider for Hidden {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DFResult<Vec<TableProviderFilterPushDown>> {
        // Filters name shown columns only, which keep their names inside.
        self.inner.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let projection: Vec<usize> = match projection {
            Some(p) => p.iter().map(|i| self.visible[*i]).collect(),
            None => self.visible.clone(),
        };
        self.inner
            .scan(state, Some(&projection), filters, limit)
            .await
    }
}
