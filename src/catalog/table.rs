//! The table provider of core tables and slices: a Delta table read at one version, read-only.
//!
//! A provider is pinned to the version that was current when the query was planned, so a
//! query sees one whole committed version even while a refresh commits the next one
//! (invariant 1), and it reads only that table's files (invariant 3). Writes through plain SQL
//! are refused with an error that says which icepie statement to use instead.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{ScanArgs, ScanResult, Session, TableProvider};
use datafusion::common::{Constraints, DFSchemaRef, Statistics};
use datafusion::datasource::TableType;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use deltalake::DeltaTable;

use crate::error::{IcePieError, Result};

/// Which kind of icepie table a provider serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// A table of the frozen core.
    Core,
    /// A slice.
    Slice,
    /// The refresh log (`system.refreshes`).
    System,
}

/// A read-only Delta table pinned to one version.
pub struct IcePieTable {
    kind: TableKind,
    name: String,
    version: i64,
    table: DeltaTable,
    inner: Arc<dyn TableProvider>,
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
    pub async fn try_new(kind: TableKind, name: String, table: DeltaTable) -> Result<Self> {
        let version = table
            .version()
            .ok_or_else(|| IcePieError::CorruptMetadata {
                what: name.clone(),
                reason: "the Delta table has no committed version".into(),
            })?;
        let inner = table.table_provider().await?;
        Ok(Self {
            kind,
            name,
            version: version as i64,
            table,
            inner,
        })
    }

    /// Kind of table.
    pub fn kind(&self) -> TableKind {
        self.kind
    }

    /// Qualified name, e.g. `core.events` or `finance.revenue`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Delta version this provider reads.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The loaded Delta table.
    pub fn delta(&self) -> &DeltaTable {
        &self.table
    }

    /// The error a plain-SQL write of kind `what` (INSERT, UPDATE, ...) at this table gets.
    pub fn write_refused(&self, what: &str) -> IcePieError {
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
}

#[async_trait]
impl TableProvider for IcePieTable {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn constraints(&self) -> Option<&Constraints> {
        self.inner.constraints()
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
        self.inner.scan(state, projection, filters, limit).await
    }

    async fn scan_with_args<'a>(
        &self,
        state: &dyn Session,
        args: ScanArgs<'a>,
    ) -> DFResult<ScanResult> {
        self.table
            .update_datafusion_session(state)
            .map_err(IcePieError::from)?;
        self.inner.scan_with_args(state, args).await
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DFResult<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    fn statistics(&self) -> Option<Statistics> {
        self.inner.statistics()
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
