//! Clustering: the order a slice's full builds write its rows in, so that the files' and row
//! groups' statistics let selective queries skip most of the slice.
//!
//! - `CLUSTER BY (cols)`: sorted by those columns.
//! - `CLUSTER BY NONE`: as the definition gives them (slices created before clustering
//!   existed read as `NONE`).
//! - `CLUSTER BY AUTO`, the default for new slices: sorted by the column its readers filter
//!   on most (equality, range or `IN`, as `system.usage_columns` counts them over
//!   `icepie.usage_retention`), once at least [`MIN_QUERIES`] queries filtered on it; as
//!   the definition gives them until then.
//!
//! A clustered build also writes smaller row groups ([`ROW_GROUP_ROWS`]), so that a filter
//! skips within files too. A change of clustering happens at the next refresh, never as a
//! rewrite of its own: an AUTO slice's refresh whose choice differs from the layout of the
//! version it starts from is full, with that reason; an incremental refresh appends its new
//! rows as they come, and the full build that compacts appends sorts again.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::{provider_as_source, TableType};
use datafusion::error::Result as DFResult;
use datafusion::execution::{SendableRecordBatchStream, SessionState, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::aggregate::HIDDEN;
use super::SliceContext;
use crate::error::{IcePieError, Result};
pub(crate) use crate::sql::ClusterBy;
use crate::storage::names::SliceName;
use crate::usage::files::{day_of, Rows};

/// Queries that must have filtered on a column before AUTO clusters by it.
pub(crate) const MIN_QUERIES: i64 = 3;

/// Rows per row group in a clustered build (Parquet's default is 1 Mi).
pub(crate) const ROW_GROUP_ROWS: usize = 128 * 1024;

/// The layout of a version's data: the columns it is sorted by (none: unsorted) and why.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Clustered {
    /// Sort columns, empty when the rows are as the definition gives them.
    pub columns: Vec<String>,
    /// Why these.
    pub reason: String,
}

/// A column must be filtered on by this many times the queries of the column an AUTO slice
/// is sorted by before AUTO sorts by it instead: a layout does not flip back and forth
/// between columns used about as often.
pub(crate) const SWITCH_FACTOR: i64 = 2;

/// The layout a full build of slice `name`, whose definition outputs `output`, gives it;
/// `laid_out` is the layout of the version it replaces.
pub(crate) async fn choose(
    shared: &SliceContext,
    name: &SliceName,
    by: &ClusterBy,
    output: &DFSchema,
    partition_by: &[String],
    laid_out: Option<&Clustered>,
) -> Result<Clustered> {
    let usable = |c: &str| {
        output.field_with_unqualified_name(c).is_ok()
            && !c.starts_with(HIDDEN)
            && !partition_by.iter().any(|p| p == c)
    };
    match by {
        ClusterBy::None => Ok(Clustered {
            columns: vec![],
            reason: "CLUSTER BY NONE".into(),
        }),
        ClusterBy::Columns(columns) => {
            if let Some(c) = columns
                .iter()
                .find(|c| output.field_with_unqualified_name(c).is_err())
            {
                return Err(IcePieError::InvalidDefinition {
                    slice: name.to_string(),
                    reason: format!("CLUSTER BY column '{c}' is not in the query's output"),
                });
            }
            Ok(Clustered {
                columns: columns.clone(),
                reason: format!("CLUSTER BY {by}"),
            })
        }
        ClusterBy::Auto => {
            // The AUTO layout in place, when its columns are still there to sort by.
            let current = laid_out
                .filter(|l| !l.columns.is_empty() && l.columns.iter().all(|c| usable(c)))
                .map(|l| l.columns.clone());
            let keep = |why: String| match &current {
                Some(columns) => Clustered {
                    columns: columns.clone(),
                    reason: format!("AUTO: kept ({}): {why}", columns.join(", ")),
                },
                None => Clustered {
                    columns: vec![],
                    reason: format!("AUTO: {why}"),
                },
            };
            // Usage is evidence, not data: without it the layout stays as it is.
            let rows = match shared.recorded_usage().await {
                Ok(rows) => rows,
                Err(e) => return Ok(keep(format!("the usage could not be read ({e})"))),
            };
            let retention = shared.options().usage_retention.0;
            let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
            let since = day_of(shared.usage.clock.now_ms().saturating_sub(retention));
            let filters = filter_counts(&rows, &name.to_string(), since, usable);
            let best = filters
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)));
            let Some((column, &n)) = best.filter(|(_, n)| **n >= MIN_QUERIES) else {
                return Ok(keep(format!(
                    "no column filtered on by {MIN_QUERIES} queries in icepie.usage_retention"
                )));
            };
            if let Some(columns) = &current {
                let held = filters.get(&columns[0]).copied().unwrap_or(0);
                if &columns[0] != column && n < held.saturating_mul(SWITCH_FACTOR) {
                    return Ok(keep(format!(
                        "'{column}' is filtered on by {n} queries and '{}' by {held}; a \
                         change needs {SWITCH_FACTOR} times as many",
                        columns[0]
                    )));
                }
            }
            Ok(Clustered {
                columns: vec![column.clone()],
                reason: format!(
                    "AUTO: the column readers filter on most ({n} queries in \
                     icepie.usage_retention)"
                ),
            })
        }
    }
}

/// Counts, per column of `table` that `usable` accepts, the queries that filtered on it
/// (equality, range or IN) from day `since` on.
pub(crate) fn filter_counts(
    rows: &Rows,
    table: &str,
    since: i32,
    usable: impl Fn(&str) -> bool,
) -> BTreeMap<String, i64> {
    let mut filters: BTreeMap<String, i64> = BTreeMap::new();
    for sums in rows
        .iter()
        .filter(|(k, _)| k.table == table && k.day >= since)
        .map(|(_, s)| s)
    {
        for used in &sums.columns {
            if used.how.prunes() && usable(&used.column) {
                *filters.entry(used.column.clone()).or_default() += sums.queries;
            }
        }
    }
    filters
}

/// `plan` sorted by `columns`, as the input of a write.
///
/// The sort is planned here, then sealed: a write's own optimizer would drop a sort nothing
/// above it asks for (DataFusion's `EnforceSorting` removes sorts whose order no parent
/// needs, and a Delta write needs none). The sealed plan is a leaf to that optimizer, so
/// the rows reach the writer in order, merged into one stream.
pub(crate) async fn sorted_input(
    state: &SessionState,
    plan: LogicalPlan,
    columns: &[String],
) -> Result<LogicalPlan> {
    let order = columns
        .iter()
        .map(|c| Expr::Column(Column::new_unqualified(c)).sort(true, false));
    let sorted = LogicalPlanBuilder::from(plan).sort(order)?.build()?;
    let physical = state.create_physical_plan(&sorted).await?;
    let table = SealedTable {
        schema: physical.schema(),
        plan: physical,
    };
    Ok(
        LogicalPlanBuilder::scan("clustered", provider_as_source(Arc::new(table)), None)?
            .build()?,
    )
}

/// A table whose scan is a plan planned already.
#[derive(Debug)]
struct SealedTable {
    schema: SchemaRef,
    plan: Arc<dyn ExecutionPlan>,
}

#[async_trait]
impl TableProvider for SealedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let schema = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => self.schema.clone(),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(
                self.plan.properties().partitioning.partition_count(),
            ),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Arc::new(SealedExec {
            inner: self.plan.clone(),
            projection: projection.cloned(),
            properties: Arc::new(properties),
        }))
    }
}

/// Runs a plan the optimizer does not see into: a leaf to it.
#[derive(Debug)]
struct SealedExec {
    inner: Arc<dyn ExecutionPlan>,
    projection: Option<Vec<usize>>,
    properties: Arc<PlanProperties>,
}

impl DisplayAs for SealedExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "SealedExec: {}", self.inner.name())
    }
}

impl ExecutionPlan for SealedExec {
    fn name(&self) -> &str {
        "SealedExec"
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let stream = self.inner.execute(partition, context)?;
        let schema = self.properties.eq_properties.schema().clone();
        let projection = self.projection.clone();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            stream.map(move |batch| match &projection {
                Some(p) => Ok(batch?.project(p)?),
                None => batch,
            }),
        )))
    }
}
