//! Schema `system`: `core_tables`, `slices` and `refreshes`.
//!
//! `core_tables` and `slices` are computed from the warehouse each time a query names them;
//! `refreshes` reads the slices' refresh logs (one Delta table per slice) as one table.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, DurationMillisecondArray, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::datasource::TableType;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;

use super::table::{IcePieTable, TableKind};
use super::Shared;
use crate::error::Result;
use crate::slice::lifecycle::retained;
use crate::slice::meta::{format_inputs, HistoryEntry};
use crate::slice::{self, log, running, InputCache, SliceInfo, SliceState};
use crate::storage::names::SliceName;
use crate::storage::{table_stats, Warehouse, REFRESHES_PATH};

/// Names of the system tables.
pub const TABLES: [&str; 3] = ["core_tables", "refreshes", "slices"];

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Schema of `system.core_tables`.
pub static CORE_TABLES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("version", DataType::Int64, false),
        Field::new("rows", DataType::Int64, false),
        Field::new("files", DataType::Int64, false),
        Field::new("bytes", DataType::Int64, false),
        Field::new("created_at", ts(), true),
        Field::new("last_ingest_at", ts(), true),
    ]))
});

/// Schema of `system.slices`.
pub static SLICES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("domain", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("owner", DataType::Utf8, true),
        Field::new("state", DataType::Utf8, false),
        Field::new("version", DataType::Int64, true),
        Field::new("rows", DataType::Int64, true),
        Field::new("bytes", DataType::Int64, true),
        Field::new("files", DataType::Int64, true),
        Field::new("refreshed_at", ts(), true),
        Field::new("last_error", DataType::Utf8, true),
        Field::new("failures", DataType::Int64, true),
        Field::new("lag", DataType::Duration(TimeUnit::Millisecond), true),
        Field::new("frozen_reason", DataType::Utf8, true),
        Field::new("frozen_since", ts(), true),
        Field::new("refresh", DataType::Utf8, true),
        Field::new("inputs", DataType::Utf8, true),
        Field::new("definition", DataType::Utf8, true),
    ]))
});

/// Schema `system`.
#[derive(Debug)]
pub(crate) struct SystemSchema {
    shared: Arc<Shared>,
}

impl SystemSchema {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn mem(schema: &SchemaRef, columns: Vec<ArrayRef>) -> DFResult<Arc<dyn TableProvider>> {
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    Ok(Arc::new(MemTable::try_new(
        schema.clone(),
        vec![vec![batch]],
    )?))
}

#[async_trait]
impl SchemaProvider for SystemSchema {
    fn table_names(&self) -> Vec<String> {
        TABLES.iter().map(|s| s.to_string()).collect()
    }

    async fn table(&self, name: &str) -> DFResult<Option<Arc<dyn TableProvider>>> {
        // Tables that list the warehouse list it now: statements no longer do.
        if name == "core_tables" || name == "slices" {
            self.shared.refresh_listing().await.map_err(super::df)?;
        }
        let provider = match name {
            "core_tables" => core_tables(&self.shared).await?,
            "slices" => {
                let (infos, unreadable) = all_slices(&self.shared).await?;
                slices_table(&infos, &unreadable)?
            }
            "refreshes" => Arc::new(refresh_logs(&self.shared).await?) as Arc<dyn TableProvider>,
            _ => return Ok(None),
        };
        Ok(Some(provider))
    }

    fn table_exist(&self, name: &str) -> bool {
        TABLES.contains(&name)
    }
}

/// Every slice's refresh log, including those of slices since dropped.
async fn refresh_logs(shared: &Shared) -> Result<RefreshLogs> {
    let warehouse = &shared.warehouse;
    let mut parts = Vec::new();
    for domain in warehouse.list_children(REFRESHES_PATH).await? {
        for name in warehouse
            .list_children(&format!("{REFRESHES_PATH}{domain}"))
            .await?
        {
            let Ok(slice) = SliceName::new(domain.clone(), name) else {
                continue;
            };
            if let Some(t) = warehouse
                .load(&Warehouse::refreshes_path(&slice), None)
                .await?
            {
                let name = format!("system.refreshes of {slice}");
                parts.push(Arc::new(
                    IcePieTable::try_new(TableKind::System, name, t).await?,
                ));
            }
        }
    }
    // Attempts still running, or abandoned by a process that died, from their markers.
    let found = running::list(warehouse, None).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let schema = parts
        .first()
        .map_or_else(|| log::SCHEMA.clone(), |p| p.schema());
    let mut batches = Vec::new();
    for attempt in running::as_attempts(&found, shared.options().heartbeat.0, now) {
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
struct RefreshLogs {
    parts: Vec<Arc<IcePieTable>>,
    markers: MemTable,
}

#[async_trait]
impl TableProvider for RefreshLogs {
    fn schema(&self) -> SchemaRef {
        self.parts
            .first()
            .map_or_else(|| log::SCHEMA.clone(), |p| p.schema())
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

/// Every slice's info, in name order, and the slices that could not be read with why: one
/// damaged slice must not hide the others.
pub(crate) async fn all_slices(
    shared: &Shared,
) -> Result<(Vec<SliceInfo>, Vec<(SliceName, String)>)> {
    let mut inputs = InputCache::default();
    let (mut out, mut unreadable) = (Vec::new(), Vec::new());
    for name in shared.slice_names() {
        match slice::info(shared, &name, &mut inputs).await {
            Ok(Some(info)) => out.push(info),
            Ok(None) => {}
            Err(e) => unreadable.push((name, e.to_string())),
        }
    }
    Ok((out, unreadable))
}

fn timestamps(values: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from(values).with_timezone("UTC"))
}

/// `system.slices`: one row per slice; a slice that cannot be read is `failed`, with why in
/// `last_error` and NULL where nothing could be read.
fn slices_table(
    infos: &[SliceInfo],
    unreadable: &[(SliceName, String)],
) -> DFResult<Arc<dyn TableProvider>> {
    let rows: Vec<(&SliceName, Option<&SliceInfo>, Option<&str>)> = infos
        .iter()
        .map(|i| (&i.name, Some(i), None))
        .chain(unreadable.iter().map(|(n, e)| (n, None, Some(e.as_str()))))
        .collect();
    let s = |f: &dyn Fn(&SliceInfo) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter().map(|r| r.1.and_then(f)).collect::<Vec<_>>(),
        ))
    };
    let i = |f: &dyn Fn(&SliceInfo) -> Option<i64>| -> ArrayRef {
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.1.and_then(f)).collect::<Vec<_>>(),
        ))
    };
    let t = |f: &dyn Fn(&SliceInfo) -> Option<i64>| -> ArrayRef {
        timestamps(rows.iter().map(|r| r.1.and_then(f)).collect())
    };
    mem(
        &SLICES_SCHEMA,
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &r.0.domain),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| &r.0.name),
            )),
            s(&|x| x.meta.owner.clone()),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| {
                r.1.map_or(SliceState::Failed, |x| x.state).to_string()
            }))),
            i(&|x| Some(x.version)),
            i(&|x| Some(x.stats.rows)),
            i(&|x| Some(x.stats.bytes)),
            i(&|x| Some(x.stats.files)),
            t(&|x| x.refreshed_at),
            Arc::new(StringArray::from(
                rows.iter()
                    .map(|r| match r {
                        (_, Some(x), _) => x.last_error.clone(),
                        (_, None, e) => e.map(|e| format!("cannot read the slice: {e}")),
                    })
                    .collect::<Vec<_>>(),
            )),
            i(&|x| Some(i64::from(x.failures))),
            Arc::new(DurationMillisecondArray::from(
                rows.iter()
                    .map(|r| r.1.and_then(|x| x.lag_ms))
                    .collect::<Vec<_>>(),
            )),
            s(&|x| x.frozen().and_then(|f| f.reason.clone())),
            t(&|x| x.frozen().map(|f| f.since)),
            s(&|x| Some(x.meta.refresh.clone())),
            s(&|x| Some(format_inputs(&x.meta.inputs))),
            s(&|x| Some(x.meta.definition.clone())),
        ],
    )
}

async fn core_tables(shared: &Shared) -> Result<Arc<dyn TableProvider>> {
    let (mut names, mut versions, mut rows, mut files, mut bytes, mut created, mut ingested) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for name in shared.listing().core {
        let Some(table) = shared
            .warehouse
            .load(&Warehouse::core_path(&name), None)
            .await?
        else {
            continue;
        };
        let stats = table_stats(&table)?;
        // Delta's metadata records when the table was created (createdTime, ms).
        let created_at = serde_json::to_value(table.snapshot()?.metadata())
            .ok()
            .and_then(|m| m.get("createdTime").and_then(|t| t.as_i64()));
        let last = match table.history(Some(1)).next().await {
            Some(Ok(info)) => info.timestamp,
            _ => None,
        };
        names.push(name);
        versions.push(table.version().unwrap_or_default() as i64);
        rows.push(stats.rows);
        files.push(stats.files);
        bytes.push(stats.bytes);
        created.push(created_at);
        ingested.push(last);
    }
    Ok(mem(
        &CORE_TABLES_SCHEMA,
        vec![
            Arc::new(StringArray::from(names)),
            Arc::new(Int64Array::from(versions)),
            Arc::new(Int64Array::from(rows)),
            Arc::new(Int64Array::from(files)),
            Arc::new(Int64Array::from(bytes)),
            timestamps(created),
            timestamps(ingested),
        ],
    )?)
}

/// The table `slice_history('domain.name')` returns: one row per commit, newest first.
pub(crate) fn history_table(
    entries: &[HistoryEntry],
    latest: i64,
    retain_versions: usize,
) -> Result<Arc<dyn TableProvider>> {
    let kept = retained(latest, retain_versions);
    let schema = Arc::new(Schema::new(vec![
        Field::new("version", DataType::Int64, false),
        Field::new("committed_at", ts(), true),
        Field::new("kind", DataType::Utf8, false),
        Field::new("rows", DataType::Int64, true),
        Field::new("inputs", DataType::Utf8, false),
        Field::new("retained", DataType::Boolean, false),
    ]));
    Ok(mem(
        &schema,
        vec![
            Arc::new(Int64Array::from_iter_values(
                entries.iter().map(|e| e.version),
            )),
            timestamps(entries.iter().map(|e| e.committed_at).collect()),
            Arc::new(StringArray::from_iter_values(
                entries.iter().map(HistoryEntry::kind),
            )),
            Arc::new(Int64Array::from(
                entries.iter().map(|e| e.rows).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from_iter_values(entries.iter().map(|e| {
                e.meta
                    .as_ref()
                    .map(|m| format_inputs(&m.inputs))
                    .unwrap_or_default()
            }))),
            Arc::new(BooleanArray::from(
                entries
                    .iter()
                    .map(|e| kept.contains(&e.version))
                    .collect::<Vec<_>>(),
            )),
        ],
    )?)
}
