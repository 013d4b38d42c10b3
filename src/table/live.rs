//! Views that follow their tables: a view over a slice or core table reads its latest version
//! each time it is queried, not the version it was created on.
//!
//! DataFusion stores a view as the logical plan it was created from, holding the providers it
//! planned with; icepie's providers are pinned to one version (so that one query sees one
//! version), which would pin the view forever. [`follow_latest`] swaps those providers in a
//! `CREATE VIEW` plan for [`LatestTable`]s, which open the latest version when a query using
//! the view is planned into execution. The view's columns are fixed when it is created, as
//! for any view: a table whose columns changed since makes the view's queries fail, saying
//! to re-create the view.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::Transformed;
use datafusion::datasource::{provider_as_source, source_as_provider, TableType};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown, TableScan};
use datafusion::physical_plan::ExecutionPlan;

use super::{IcePieTable, TableKind};
use crate::error::{IcePieError, Result};

/// Opens core tables and slices at their latest version (the slice layer's context does).
#[async_trait]
pub(crate) trait OpenLatest: std::fmt::Debug + Send + Sync {
    /// The table `name` (qualified: `core.t`, `finance.revenue`) of kind `kind` at its latest
    /// version; `None` when there is no such table.
    async fn open_latest(&self, kind: TableKind, name: &str) -> Result<Option<IcePieTable>>;
}

/// A core table or slice read at whatever version is latest when a query runs.
#[derive(Debug)]
pub(crate) struct LatestTable {
    tables: Arc<dyn OpenLatest>,
    kind: TableKind,
    /// Qualified name (`core.t`, `finance.revenue`).
    name: String,
    schema: SchemaRef,
}

impl LatestTable {
    /// Qualified name (`core.t`, `finance.revenue`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Kind of table.
    pub(crate) fn kind(&self) -> TableKind {
        self.kind
    }

    async fn latest(&self) -> Result<IcePieTable> {
        let table = self.tables.open_latest(self.kind, &self.name).await?;
        let table = table.ok_or_else(|| match self.kind {
            TableKind::Core => IcePieError::CoreTableNotFound(self.name.clone()),
            _ => IcePieError::SliceNotFound(self.name.clone()),
        })?;
        if table.schema() != self.schema {
            return Err(IcePieError::InvalidDefinition {
                slice: self.name.clone(),
                reason: "its columns changed since a view over it was created; \
                         CREATE OR REPLACE VIEW to follow them"
                    .into(),
            });
        }
        Ok(table)
    }
}

#[async_trait]
impl TableProvider for LatestTable {
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
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let table = self.latest().await.map_err(DataFusionError::from)?;
        table.scan(state, projection, filters, limit).await
    }
}

/// `plan` (a `CREATE VIEW`'s query) with its core tables and slices read at their latest
/// version whenever the view is queried. Versions the SQL names (`slice_at`) stay as named.
pub(crate) fn follow_latest(
    tables: &Arc<dyn OpenLatest>,
    plan: LogicalPlan,
) -> Result<LogicalPlan> {
    let rewritten = plan.transform_up_with_subqueries(|node| {
        let LogicalPlan::TableScan(scan) = &node else {
            return Ok(Transformed::no(node));
        };
        let provider = source_as_provider(&scan.source)?;
        let Some(table) = provider.downcast_ref::<IcePieTable>() else {
            return Ok(Transformed::no(node));
        };
        if table.kind() == TableKind::System || table.is_pinned() {
            return Ok(Transformed::no(node));
        }
        let latest = Arc::new(LatestTable {
            tables: tables.clone(),
            kind: table.kind(),
            name: table.name().to_string(),
            schema: table.schema(),
        });
        let scan = TableScan {
            source: provider_as_source(latest),
            ..scan.clone()
        };
        Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
    })?;
    Ok(rewritten.data)
}
