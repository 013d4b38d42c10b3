//! `system.refreshes`: every slice's refresh log, or only those a filter names, read as one
//! table together with the attempts still running.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;
use futures::{StreamExt, TryStreamExt};

use super::PARALLEL;
use crate::catalog::state::CatalogState;
use crate::error::Result;
use crate::slice::{refresh_log, running};
use crate::storage::names::SliceName;
use crate::storage::{Warehouse, REFRESHES_PATH};
use crate::table::{IcePieTable, TableKind};

/// Every slice's refresh log (including those of slices since dropped), or those of `only`.
pub(super) async fn refresh_logs(
    shared: &CatalogState,
    only: Option<Vec<SliceName>>,
) -> Result<RefreshLogs> {
    let warehouse = &shared.warehouse;
    // Attempts still running, or abandoned by a process that died, from their markers,
    // listed before the logs are read: a marker goes only after its row is in the log, so
    // an attempt ending meanwhile is found in one or the other.
    let found = match &only {
        None => running::list(warehouse, None).await?,
        Some(only) => {
            let mut found = Vec::new();
            for slice in only {
                found.extend(running::list(warehouse, Some(slice)).await?);
            }
            found
        }
    };
    // This process's successes whose rows are still being written, taken before the logs
    // are read: a row written after this is in the versions read below, and one whose
    // writing ends while they are read shows from here.
    let settled: std::collections::HashMap<String, refresh_log::Attempt> = found
        .iter()
        .filter_map(|f| {
            let id = &f.marker.attempt_id;
            shared.settling.outcome(id).map(|a| (id.clone(), a))
        })
        .collect();
    let slices = match &only {
        Some(only) => only.clone(),
        None => {
            let mut all = Vec::new();
            for domain in warehouse.list_children(REFRESHES_PATH).await? {
                for name in warehouse
                    .list_children(&format!("{REFRESHES_PATH}{domain}"))
                    .await?
                {
                    all.extend(SliceName::new(domain.clone(), name).ok());
                }
            }
            all
        }
    };
    let loaded: Vec<Option<(String, u64, IcePieTable)>> = futures::stream::iter(slices)
        .map(|slice| async move {
            let Some(t) = warehouse
                .load(&Warehouse::refreshes_path(&slice), None)
                .await?
            else {
                return Ok(None);
            };
            let version = t.version().unwrap_or_default();
            let name = format!("system.refreshes of {slice}");
            let part =
                IcePieTable::with_schema(TableKind::System, name, t, refresh_log::SCHEMA.clone())
                    .await?;
            Ok::<_, crate::error::IcePieError>(Some((slice.to_string(), version, part)))
        })
        .buffered(PARALLEL)
        .try_collect()
        .await?;
    let mut read = std::collections::HashMap::new();
    let mut parts = Vec::new();
    for (slice, version, part) in loaded.into_iter().flatten() {
        read.insert(slice, version);
        parts.push(Arc::new(part));
    }
    // Markers whose rows are in the versions just read are shown from there.
    let found = running::not_logged(shared, found, &read).await?;
    // Expiry is judged by the store's clock, which stamped the markers' renewals.
    let now = match found.is_empty() {
        true => 0,
        false => warehouse.store_now_ms().await,
    };
    let schema = refresh_log::SCHEMA.clone();
    let mut batches = Vec::new();
    let heartbeat = shared.options().heartbeat.0;
    for (found, attempt) in found
        .iter()
        .zip(running::as_attempts(&found, heartbeat, now))
    {
        // A success of this process whose row is still being written shows as it ended.
        let attempt = settled
            .get(&found.marker.attempt_id)
            .cloned()
            .unwrap_or(attempt);
        let batch = attempt.to_batch()?;
        let columns = schema
            .fields()
            .iter()
            .zip(batch.columns())
            .map(|(f, c)| cast(c, f.data_type()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        batches.push(RecordBatch::try_new(schema.clone(), columns)?);
    }
    let markers = MemTable::try_new(schema, vec![batches])?;
    Ok(RefreshLogs { parts, markers })
}

/// `system.refreshes`: the refresh logs of all slices, read as one table, and the attempts
/// that have not ended (or whose process died).
#[derive(Debug)]
pub(super) struct RefreshLogs {
    parts: Vec<Arc<IcePieTable>>,
    markers: MemTable,
}

#[async_trait]
impl TableProvider for RefreshLogs {
    fn schema(&self) -> SchemaRef {
        refresh_log::SCHEMA.clone()
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
        let mut plans = Vec::with_capacity(self.parts.len() + 1);
        for part in &self.parts {
            plans.push(part.scan(state, projection, filters, limit).await?);
        }
        plans.push(self.markers.scan(state, projection, filters, limit).await?);
        UnionExec::try_new(plans)
    }
}
