//! Slices: materialized, versioned tables defined by a query over the core and other slices.
//!
//! A build (the first version, a refresh, or a replace) plans the definition with every input
//! pinned at the version current when planning starts, streams the result into the slice's next
//! Delta version as one Overwrite commit, and records the input versions in that commit
//! ([`meta`]) and in the refresh log ([`log`]). A build that fails at any point commits nothing:
//! the slice keeps serving its last version (invariant 2), and the failure is logged so that
//! `system.slices` shows the slice `failed` with its error in every process.

pub mod log;
pub mod meta;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::{SchemaMode, WriteBuilder};
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;

use crate::catalog::table::{IcePieTable, TableKind};
use crate::catalog::Shared;
use crate::error::{IcePieError, Result};
use crate::storage::names::SliceName;
use crate::storage::{table_stats, TableStats, Warehouse};
use meta::{format_inputs, InputVersion, SliceMeta, COMMIT_KEY};

/// What a slice is built from: its definition and settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSpec {
    /// The defining query (SQL).
    pub definition: String,
    /// Owning team.
    pub owner: Option<String>,
    /// Refresh policy in SQL text form (`manual`, `every '5 minutes'`, `on change`).
    pub refresh: String,
    /// Partition columns.
    pub partition_by: Vec<String>,
}

impl From<&SliceMeta> for SliceSpec {
    fn from(m: &SliceMeta) -> Self {
        Self {
            definition: m.definition.clone(),
            owner: m.owner.clone(),
            refresh: m.refresh.clone(),
            partition_by: m.partition_by.clone(),
        }
    }
}

/// Why a build runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildKind {
    /// The first version (`CREATE SLICE`).
    Create,
    /// A new version from the same definition (`REFRESH SLICE`).
    Refresh,
    /// A new definition and its data in one commit (`CREATE OR REPLACE SLICE`).
    Replace,
}

impl fmt::Display for BuildKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Create => "create",
            Self::Refresh => "refresh",
            Self::Replace => "replace",
        })
    }
}

/// The result of a successful build.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The slice.
    pub slice: SliceName,
    /// Version committed.
    pub version: i64,
    /// Size of that version.
    pub stats: TableStats,
    /// Inputs read, with their versions.
    pub inputs: Vec<InputVersion>,
    /// Time taken.
    pub duration_ms: i64,
}

/// Marks a slice as refreshing in this process for as long as it lives.
struct RefreshingGuard<'a> {
    shared: &'a Shared,
    name: SliceName,
}

impl<'a> RefreshingGuard<'a> {
    fn new(shared: &'a Shared, name: &SliceName) -> Self {
        shared
            .refreshing
            .lock()
            .expect("refreshing lock")
            .insert(name.clone());
        Self {
            shared,
            name: name.clone(),
        }
    }
}

impl Drop for RefreshingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.shared.refreshing.lock() {
            set.remove(&self.name);
        }
    }
}

/// Finds the tables a plan reads, with the versions their providers are pinned to.
/// Refuses plans that read anything but core tables and slices, or the slice itself.
pub fn plan_inputs(plan: &LogicalPlan, slice: &SliceName) -> Result<Vec<InputVersion>> {
    let mut inputs = BTreeMap::new();
    let mut refused: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let provider: Arc<dyn TableProvider> = source_as_provider(&scan.source)?;
            match provider.downcast_ref::<IcePieTable>() {
                Some(t) if t.kind() != TableKind::System => {
                    if t.kind() == TableKind::Slice && t.name() == slice.to_string() {
                        refused = Some("a slice cannot read itself".into());
                    }
                    inputs.insert(t.name().to_string(), t.version());
                }
                _ => {
                    refused = Some(format!(
                        "it reads '{}', which is not a core table or slice; a slice may read only \
                         core tables and other slices, so that any process can rebuild it",
                        scan.table_name
                    ))
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if let Some(reason) = refused {
        return Err(IcePieError::InvalidDefinition {
            slice: slice.to_string(),
            reason,
        });
    }
    Ok(inputs
        .into_iter()
        .map(|(table, version)| InputVersion { table, version })
        .collect())
}

/// Builds and commits the next version of `name` (the first one when `existing` is `None`).
pub(crate) async fn build(
    ctx: &SessionContext,
    shared: &Shared,
    name: &SliceName,
    spec: &SliceSpec,
    kind: BuildKind,
    existing: Option<&DeltaTable>,
) -> Result<BuildOutcome> {
    let _refreshing = RefreshingGuard::new(shared, name);
    let attempt_id = uuid::Uuid::new_v4().to_string();
    let started_at = Utc::now();
    let clock = Instant::now();
    let mut inputs = Vec::new();
    let result = write_version(
        ctx,
        shared,
        name,
        spec,
        kind,
        existing,
        &attempt_id,
        &mut inputs,
    )
    .await;
    let duration_ms = clock.elapsed().as_millis() as i64;
    let mut attempt = log::Attempt {
        slice: name.to_string(),
        attempt_id,
        kind: kind.to_string(),
        started_at,
        duration_ms,
        status: log::SUCCESS,
        version: None,
        rows: None,
        bytes: None,
        inputs: format_inputs(&inputs),
        error: None,
    };
    match result {
        Ok(table) => {
            let version = table.version().unwrap_or_default() as i64;
            let stats = table_stats(&table)?;
            attempt.version = Some(version);
            attempt.rows = Some(stats.rows);
            attempt.bytes = Some(stats.bytes);
            log::append(&shared.warehouse, &attempt).await.map_err(|e| {
                IcePieError::Warehouse {
                    location: shared.warehouse.url().to_string(),
                    reason: format!(
                        "slice {name} version {version} was committed, but its refresh record could not be written: {e}"
                    ),
                }
            })?;
            Ok(BuildOutcome {
                slice: name.clone(),
                version,
                stats,
                inputs,
                duration_ms,
            })
        }
        Err(source) => {
            attempt.status = log::FAILED;
            attempt.error = Some(source.to_string());
            let rel = Warehouse::slice_path(name);
            if existing.is_none() && !shared.warehouse.has_log(&rel).await.unwrap_or(true) {
                // A first build leaves no trace but its log row: remove files it wrote.
                let _ = shared.warehouse.delete_prefix(&rel).await;
            }
            // The build's own error matters more than a failure to log it.
            let _ = log::append(&shared.warehouse, &attempt).await;
            Err(IcePieError::RefreshFailed {
                slice: name.to_string(),
                serving: existing
                    .and_then(|t| t.version())
                    .map(|v| format!(", still serving version {v}"))
                    .unwrap_or_default(),
                source: Box::new(source),
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_version(
    ctx: &SessionContext,
    shared: &Shared,
    name: &SliceName,
    spec: &SliceSpec,
    kind: BuildKind,
    existing: Option<&DeltaTable>,
    attempt_id: &str,
    inputs: &mut Vec<InputVersion>,
) -> Result<DeltaTable> {
    let state = ctx.state();
    let plan = state.create_logical_plan(&spec.definition).await?;
    if !is_query(&plan) {
        return Err(IcePieError::InvalidDefinition {
            slice: name.to_string(),
            reason: "the definition must be a query (SELECT, WITH, VALUES)".into(),
        });
    }
    *inputs = plan_inputs(&plan, name)?;
    for col in &spec.partition_by {
        if plan.schema().field_with_unqualified_name(col).is_err() {
            return Err(IcePieError::InvalidDefinition {
                slice: name.to_string(),
                reason: format!("PARTITION BY column '{col}' is not in the query's output"),
            });
        }
    }
    let meta = SliceMeta {
        kind: kind.to_string(),
        attempt_id: attempt_id.to_string(),
        definition: spec.definition.clone(),
        owner: spec.owner.clone(),
        refresh: spec.refresh.clone(),
        partition_by: spec.partition_by.clone(),
        inputs: inputs.clone(),
    };
    let commit = CommitProperties::default().with_metadata([(
        COMMIT_KEY.to_string(),
        serde_json::to_value(&meta).expect("slice metadata serializes"),
    )]);
    let (log_store, snapshot) = shared
        .warehouse
        .write_base(&Warehouse::slice_path(name), existing)?;
    let mut write = WriteBuilder::new(log_store, snapshot)
        .with_input_plan(plan)
        .with_session_state(Arc::new(state))
        .with_partition_columns(spec.partition_by.clone())
        .with_commit_properties(commit);
    write = match existing {
        Some(_) => write
            .with_save_mode(SaveMode::Overwrite)
            .with_schema_mode(SchemaMode::Overwrite),
        None => write.with_save_mode(SaveMode::ErrorIfExists),
    };
    Ok(write.await?)
}

/// True for plans that produce rows (not DDL, DML or statements).
fn is_query(plan: &LogicalPlan) -> bool {
    !matches!(
        plan,
        LogicalPlan::Ddl(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::Explain(_)
            | LogicalPlan::Analyze(_)
            | LogicalPlan::DescribeTable(_)
    )
}

/// State of a slice (DESIGN §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceState {
    /// Built from the latest versions of its inputs.
    Fresh,
    /// An input has moved on since the version being served.
    Stale,
    /// A build is running in this process.
    Refreshing,
    /// The last build failed; the previous version is served.
    Failed,
}

impl fmt::Display for SliceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fresh => "fresh",
            Self::Stale => "stale",
            Self::Refreshing => "refreshing",
            Self::Failed => "failed",
        })
    }
}

/// Everything known about one slice.
#[derive(Debug, Clone)]
pub struct SliceInfo {
    /// The slice.
    pub name: SliceName,
    /// Its descriptor, from the version served.
    pub meta: SliceMeta,
    /// Version served.
    pub version: i64,
    /// Size of that version.
    pub stats: TableStats,
    /// When that version was committed (ms since the epoch).
    pub refreshed_at: Option<i64>,
    /// Its state.
    pub state: SliceState,
    /// The error of the last build, if it failed.
    pub last_error: Option<String>,
    /// Output columns and their types.
    pub columns: Vec<(String, String)>,
}

/// Reads what `system.slices` shows of one slice. `attempts` is the refresh log's latest
/// attempt per slice; `latest` caches input versions across slices.
pub(crate) async fn info(
    shared: &Shared,
    name: &SliceName,
    attempts: &HashMap<String, log::LastAttempt>,
    latest: &mut HashMap<String, Option<i64>>,
) -> Result<Option<SliceInfo>> {
    let Some(table) = shared
        .warehouse
        .load(&Warehouse::slice_path(name), None)
        .await?
    else {
        return Ok(None);
    };
    let (meta, committed) = meta::latest_meta(&table, &name.to_string()).await?;
    let version = table.version().unwrap_or_default() as i64;
    let stats = table_stats(&table)?;
    let last = attempts.get(&name.to_string());
    let state = if shared
        .refreshing
        .lock()
        .expect("refreshing lock")
        .contains(name)
    {
        SliceState::Refreshing
    } else if last.is_some_and(|a| a.status == log::FAILED) {
        SliceState::Failed
    } else {
        let mut stale = false;
        for input in &meta.inputs {
            if !latest.contains_key(&input.table) {
                let v = shared.latest_version(&input.table).await?;
                latest.insert(input.table.clone(), v);
            }
            if latest[&input.table] != Some(input.version) {
                stale = true;
            }
        }
        if stale {
            SliceState::Stale
        } else {
            SliceState::Fresh
        }
    };
    let schema = table.snapshot()?.snapshot().arrow_schema();
    let columns = schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().to_string()))
        .collect();
    Ok(Some(SliceInfo {
        name: name.clone(),
        meta,
        version,
        stats,
        refreshed_at: committed,
        state,
        last_error: last
            .filter(|a| a.status == log::FAILED)
            .and_then(|a| a.error.clone()),
        columns,
    }))
}
