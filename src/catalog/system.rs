//! Schema `system`: `core_tables`, `slices` and `refreshes`.
//!
//! `core_tables` and `slices` are computed from the warehouse each time a query names them;
//! `refreshes` is the refresh log's Delta table itself.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, DurationMillisecondArray, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::Result as DFResult;
use futures::StreamExt;

use super::table::{IcePieTable, TableKind};
use super::Shared;
use crate::error::Result;
use crate::slice::lifecycle::retained;
use crate::slice::meta::{format_inputs, HistoryEntry};
use crate::slice::{self, log, InputCache, SliceInfo};
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
        Field::new("version", DataType::Int64, false),
        Field::new("rows", DataType::Int64, false),
        Field::new("bytes", DataType::Int64, false),
        Field::new("files", DataType::Int64, false),
        Field::new("refreshed_at", ts(), true),
        Field::new("last_error", DataType::Utf8, true),
        Field::new("failures", DataType::Int64, false),
        Field::new("lag", DataType::Duration(TimeUnit::Millisecond), true),
        Field::new("frozen_reason", DataType::Utf8, true),
        Field::new("frozen_since", ts(), true),
        Field::new("refresh", DataType::Utf8, false),
        Field::new("inputs", DataType::Utf8, false),
        Field::new("definition", DataType::Utf8, false),
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
        let provider = match name {
            "core_tables" => core_tables(&self.shared).await?,
            "slices" => {
                let infos = all_slices(&self.shared).await?;
                slices_table(&infos)?
            }
            "refreshes" => match self.shared.warehouse.load(REFRESHES_PATH, None).await? {
                Some(t) => Arc::new(
                    IcePieTable::try_new(TableKind::System, "system.refreshes".into(), t).await?,
                ) as Arc<dyn TableProvider>,
                None => Arc::new(MemTable::try_new(log::SCHEMA.clone(), vec![vec![]])?),
            },
            _ => return Ok(None),
        };
        Ok(Some(provider))
    }

    fn table_exist(&self, name: &str) -> bool {
        TABLES.contains(&name)
    }
}

/// Every slice's info, in name order.
pub(crate) async fn all_slices(shared: &Shared) -> Result<Vec<SliceInfo>> {
    let attempts = shared.recent_attempts().await?;
    let mut inputs = InputCache::default();
    let mut out = Vec::new();
    for name in shared.slice_names() {
        if let Some(info) = slice::info(shared, &name, &attempts, &mut inputs).await? {
            out.push(info);
        }
    }
    Ok(out)
}

fn timestamps(values: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from(values).with_timezone("UTC"))
}

fn slices_table(infos: &[SliceInfo]) -> DFResult<Arc<dyn TableProvider>> {
    let s = |f: &dyn Fn(&SliceInfo) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(infos.iter().map(f).collect::<Vec<_>>()))
    };
    let i = |f: &dyn Fn(&SliceInfo) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from(infos.iter().map(f).collect::<Vec<_>>()))
    };
    mem(
        &SLICES_SCHEMA,
        vec![
            s(&|x| Some(x.name.domain.clone())),
            s(&|x| Some(x.name.name.clone())),
            s(&|x| x.meta.owner.clone()),
            s(&|x| Some(x.state.to_string())),
            i(&|x| x.version),
            i(&|x| x.stats.rows),
            i(&|x| x.stats.bytes),
            i(&|x| x.stats.files),
            timestamps(infos.iter().map(|x| x.refreshed_at).collect()),
            s(&|x| x.last_error.clone()),
            i(&|x| i64::from(x.failures)),
            Arc::new(DurationMillisecondArray::from(
                infos.iter().map(|x| x.lag_ms).collect::<Vec<_>>(),
            )),
            s(&|x| x.frozen().and_then(|f| f.reason.clone())),
            timestamps(infos.iter().map(|x| x.frozen().map(|f| f.since)).collect()),
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
