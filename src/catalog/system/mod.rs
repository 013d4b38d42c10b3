//! Schema `system`: `core_tables`, `slices`, `refreshes`, `usage`, `usage_columns` and
//! `proposals`.
//!
//! `core_tables` is computed from the warehouse each time a query scans it, and `slices`
//! from the view of every slice this process keeps up to date (see [`super::cards`]);
//! `refreshes` reads the slices' refresh logs (one Delta table per slice) as one table. A
//! filter on the key column (`name`, or `slice`: `=`, `IN`) limits what is read to the
//! tables it names, read from the warehouse; without one, the tables are read 16 at a time.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::datasource::TableType;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use deltalake::DeltaTable;
use futures::{StreamExt, TryStreamExt};

use super::cards::Purpose;
use super::pushdown::wanted;
use crate::catalog::state::CatalogState;
use crate::error::Result;
use crate::slice::meta::format_inputs;
use crate::slice::schedule::{apply_demand, decide};
use crate::slice::{self, refresh_log, InputCache, SliceInfo, SliceState};
use crate::storage::names::{validate_name, SliceName};
use crate::storage::{table_stats, Warehouse, SLICES_DIR};
use crate::text::human_duration;
use refreshes::refresh_logs;

mod history;
mod refreshes;
mod usage_tables;

pub(crate) use history::{history_schema, history_table};

/// Names of the system tables.
pub(crate) const TABLES: [&str; 6] = [
    "core_tables",
    "proposals",
    "refreshes",
    "slices",
    "usage",
    "usage_columns",
];

pub(crate) use crate::usage::ts;

/// Schema of `system.core_tables`.
pub(crate) static CORE_TABLES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
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
pub(crate) static SLICES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
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
        Field::new("lag", DataType::Utf8, true),
        Field::new("lag_ms", DataType::Int64, true),
        Field::new("frozen_reason", DataType::Utf8, true),
        Field::new("frozen_since", ts(), true),
        Field::new("refresh", DataType::Utf8, true),
        Field::new("inputs", DataType::Utf8, true),
        Field::new("definition", DataType::Utf8, true),
        Field::new("refreshing_by", DataType::Utf8, true),
        Field::new("cluster_by", DataType::Utf8, true),
        Field::new("clustered_by", DataType::Utf8, true),
        Field::new("clustering_reason", DataType::Utf8, true),
        Field::new("reads_per_day", DataType::Float64, true),
        Field::new("last_read", ts(), true),
        Field::new("scheduling", DataType::Utf8, true),
        Field::new("slice_id", DataType::Utf8, true),
    ]))
});

/// Schema of `system.proposals`.
pub(crate) static PROPOSALS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("target", DataType::Utf8, false),
        Field::new("evidence", DataType::Utf8, false),
        Field::new("estimated_saving", DataType::Utf8, false),
        Field::new("statement", DataType::Utf8, false),
    ]))
});

/// Schema `system`.
#[derive(Debug)]
pub(crate) struct SystemSchema {
    shared: Arc<CatalogState>,
}

impl SystemSchema {
    pub(crate) fn new(shared: Arc<CatalogState>) -> Self {
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
        let which = match name {
            "core_tables" => Which::CoreTables,
            "slices" => Which::Slices,
            "refreshes" => Which::Refreshes,
            "usage" => Which::Usage,
            "usage_columns" => Which::UsageColumns,
            "proposals" => Which::Proposals,
            _ => return Ok(None),
        };
        Ok(Some(Arc::new(SystemTable {
            shared: self.shared.clone(),
            which,
        })))
    }

    fn table_exist(&self, name: &str) -> bool {
        TABLES.contains(&name)
    }
}

/// One system table, computed when a query scans it, for the rows its filters can match.
#[derive(Debug)]
struct SystemTable {
    shared: Arc<CatalogState>,
    which: Which,
}

#[derive(Debug, Clone, Copy)]
enum Which {
    CoreTables,
    Slices,
    Refreshes,
    Usage,
    UsageColumns,
    Proposals,
}

#[async_trait]
impl TableProvider for SystemTable {
    fn schema(&self) -> SchemaRef {
        match self.which {
            Which::CoreTables => CORE_TABLES_SCHEMA.clone(),
            Which::Slices => SLICES_SCHEMA.clone(),
            Which::Refreshes => refresh_log::SCHEMA.clone(),
            Which::Usage => usage_tables::USAGE_SCHEMA.clone(),
            Which::UsageColumns => usage_tables::USAGE_COLUMNS_SCHEMA.clone(),
            Which::Proposals => PROPOSALS_SCHEMA.clone(),
        }
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Filters on the key columns (`name`, `domain`, `slice`) choose what is read; every
    /// filter is applied again to the rows.
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
        let shared = &self.shared;
        let table: Arc<dyn TableProvider> = match self.which {
            Which::CoreTables => {
                let names = match wanted(filters, "name") {
                    Some(names) => names.into_iter().collect(),
                    None => {
                        shared.refresh_listing().await.map_err(super::df)?;
                        shared.listing().core
                    }
                };
                core_tables(shared, names).await?
            }
            Which::Slices => {
                let (mut infos, unreadable) = match wanted(filters, "name") {
                    // A few slices named: read them.
                    Some(names) => {
                        describe(shared, named_slices(shared, filters, names).await?).await?
                    }
                    None => {
                        let (mut infos, mut unreadable) =
                            shared.cards.infos(shared, Purpose::Show).await?;
                        if let Some(domains) = wanted(filters, "domain") {
                            infos.retain(|i| domains.contains(&i.name.domain));
                            unreadable.retain(|(n, _)| domains.contains(&n.domain));
                        }
                        (infos, unreadable)
                    }
                };
                // Reads, dormancy and what the scheduler makes of each slice.
                let demand = shared.demand().await;
                let options = shared.options();
                let now = shared.usage.clock.now_ms();
                apply_known_demand(shared, &mut infos, demand.as_ref(), &options, now).await;
                let mut scheduling = HashMap::new();
                for info in &infos {
                    scheduling.insert(info.name.clone(), decide(info, &options, now).1);
                }
                slices_table(&infos, &scheduling, &unreadable)?
            }
            Which::Refreshes => {
                let slices = wanted(filters, "slice").map(|names| {
                    names
                        .iter()
                        .filter_map(|n| SliceName::parse(n).ok())
                        .collect::<Vec<_>>()
                });
                Arc::new(refresh_logs(shared, slices).await?)
            }
            Which::Usage => usage_tables::usage_table(shared, false).await?,
            Which::UsageColumns => usage_tables::usage_table(shared, true).await?,
            Which::Proposals => {
                let proposals = crate::catalog::proposals::list(shared).await?;
                let text = |f: fn(&crate::catalog::proposals::Proposal) -> String| -> ArrayRef {
                    Arc::new(StringArray::from_iter_values(proposals.iter().map(f)))
                };
                mem(
                    &PROPOSALS_SCHEMA,
                    vec![
                        Arc::new(Int64Array::from_iter_values(proposals.iter().map(|p| p.id))),
                        text(|p| p.kind.to_string()),
                        text(|p| p.target.clone()),
                        text(|p| p.evidence.clone()),
                        text(|p| p.saving.clone()),
                        text(|p| p.statement.clone()),
                    ],
                )?
            }
        };
        table.scan(state, projection, filters, limit).await
    }
}

/// The slices named by a filter on `name` of a scan of `system.slices`, in the domains its
/// filters on `domain` name (or every domain), without listing other slices.
async fn named_slices(
    shared: &CatalogState,
    filters: &[Expr],
    names: impl IntoIterator<Item = String>,
) -> Result<Vec<SliceName>> {
    let domains = match wanted(filters, "domain") {
        Some(domains) => domains.into_iter().collect::<Vec<_>>(),
        None => shared.warehouse.list_children(SLICES_DIR).await?,
    };
    let names: Vec<String> = names.into_iter().collect();
    Ok(domains
        .iter()
        .flat_map(|d| names.iter().map(move |n| (d, n)))
        .filter_map(|(d, n)| SliceName::new(d.clone(), n.clone()).ok())
        .collect())
}

/// How many slices (or tables) are read at once for a listing of the warehouse.
pub(super) const PARALLEL: usize = 16;

/// The info of the slices `names`, in that order, and those that could not be read with why:
/// one damaged slice must not hide the others. Slices that do not exist are left out.
pub(crate) async fn describe(
    shared: &CatalogState,
    names: Vec<SliceName>,
) -> Result<(Vec<SliceInfo>, Vec<(SliceName, String)>)> {
    let inputs = InputCache::default();
    let inputs = &inputs;
    let results: Vec<_> = futures::stream::iter(names)
        .map(|name| async move {
            let info = slice::info(shared, &name, inputs).await;
            (name, info)
        })
        .buffered(PARALLEL)
        .collect()
        .await;
    let (mut out, mut unreadable) = (Vec::new(), Vec::new());
    for (name, info) in results {
        match info {
            Ok(Some(info)) => out.push(info),
            Ok(None) => {}
            Err(e) => unreadable.push((name, e.to_string())),
        }
    }
    Ok((out, unreadable))
}

/// Applies what is known of reads to `infos` ([`apply_demand`]), with the other slices as
/// this process last read them: demand that flows down from a slice the caller did not ask
/// for (`system.slices` filtered by name) still reaches the slices it reads.
pub(crate) async fn apply_known_demand(
    shared: &CatalogState,
    infos: &mut Vec<SliceInfo>,
    demand: Option<&HashMap<String, crate::usage::Demand>>,
    options: &crate::options::IcePieOptions,
    now: i64,
) {
    let asked = infos.len();
    let have: std::collections::HashSet<SliceName> = infos.iter().map(|i| i.name.clone()).collect();
    infos.extend(shared.cards.known(shared, &have).await);
    apply_demand(infos, demand, options, now);
    infos.truncate(asked);
}

fn timestamps(values: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from(values).with_timezone("UTC"))
}

/// `system.slices`: one row per slice; a slice that cannot be read is `failed`, with why in
/// `last_error` and NULL where nothing could be read.
fn slices_table(
    infos: &[SliceInfo],
    scheduling: &HashMap<SliceName, String>,
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
            s(&|x| x.descriptor.owner.clone()),
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
            s(&|x| x.lag_ms.map(human_duration)),
            i(&|x| x.lag_ms),
            s(&|x| x.frozen().and_then(|f| f.reason.clone())),
            t(&|x| x.frozen().map(|f| f.since)),
            s(&|x| Some(x.descriptor.refresh.to_string())),
            s(&|x| Some(format_inputs(&x.descriptor.inputs))),
            s(&|x| Some(x.descriptor.definition.clone())),
            s(&|x| x.refreshing_by.clone()),
            s(&|x| Some(x.descriptor.cluster_by.to_string())),
            s(&|x| {
                let c = x.descriptor.clustered.as_ref()?;
                (!c.columns.is_empty()).then(|| c.columns.join(", "))
            }),
            s(&|x| x.descriptor.clustered.as_ref().map(|c| c.reason.clone())),
            Arc::new(Float64Array::from(
                rows.iter()
                    .map(|r| r.1.and_then(|x| x.reads_per_day))
                    .collect::<Vec<_>>(),
            )),
            t(&|x| x.last_read),
            s(&|x| scheduling.get(&x.name).cloned()),
            s(&|x| x.slice_id.clone()),
        ],
    )
}

async fn core_tables(shared: &CatalogState, names: Vec<String>) -> Result<Arc<dyn TableProvider>> {
    let (mut names_out, mut versions, mut rows, mut files, mut bytes, mut created, mut ingested) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let loaded: Vec<(String, Option<DeltaTable>)> = futures::stream::iter(names)
        .filter(|name| std::future::ready(validate_name(name).is_ok()))
        .map(|name| async move {
            let table = shared
                .warehouse
                .load(&Warehouse::core_path(&name), None)
                .await?;
            Ok::<_, crate::error::IcePieError>((name, table))
        })
        .buffered(PARALLEL)
        .try_collect()
        .await?;
    for (name, table) in loaded {
        let Some(table) = table else {
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
        names_out.push(name);
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
            Arc::new(StringArray::from(names_out)),
            Arc::new(Int64Array::from(versions)),
            Arc::new(Int64Array::from(rows)),
            Arc::new(Int64Array::from(files)),
            Arc::new(Int64Array::from(bytes)),
            timestamps(created),
            timestamps(ingested),
        ],
    )?)
}
