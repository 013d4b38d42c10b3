//! Slices: materialized, versioned tables defined by a query over the core and other slices.
//!
//! A build (the first version, a refresh, or a replace) plans the definition with every input
//! pinned at the version current when planning starts, streams the result into the slice's next
//! Delta version as one Overwrite commit, and records the input versions in that commit
//! ([`meta`]) and in the refresh log ([`log`]). A build that fails at any point commits nothing:
//! the slice keeps serving its last version (invariant 2), and the failure is logged so that
//! `system.slices` shows the slice `failed` with its error in every process.
//!
//! Each build runs under its own memory budget (`icepie.refresh_memory_limit`), so one greedy
//! refresh fails alone instead of starving queries and other refreshes. A build commits only on
//! top of the version it started from: if another process committed the slice meanwhile, the
//! build reports a conflict and commits nothing, so no version is ever mixed or lost.

mod info;
pub mod lease;
pub mod lifecycle;
pub mod log;
pub mod meta;
pub mod quarantine;
pub mod running;
pub mod vacuum;

pub(crate) use info::{info, InputCache};
pub use info::{SliceInfo, SliceState};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::source_as_provider;
use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use deltalake::kernel::transaction::{CommitProperties, TransactionError};
use deltalake::operations::write::{SchemaMode, WriteBuilder};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError};

use crate::catalog::table::{IcePieTable, TableKind};
use crate::catalog::time_travel;
use crate::engine::state::Shared;
use crate::error::{IcePieError, Result};
use crate::options::IcePieOptions;
use crate::storage::names::{SliceName, CORE_SCHEMA};
use crate::storage::tracked::TakeBack;
use crate::storage::{
    table_stats, TableStats, Warehouse, FREQUENT_CHECKPOINTS, NO_EXPIRED_LOG_CLEANUP,
};
use meta::{format_inputs, CommitKind, Frozen, InputVersion, SliceMeta, COMMIT_KEY};

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
    /// True when this refresh committed nothing because another writer had just committed a
    /// version built from the inputs' latest versions: that version is the outcome.
    pub by_another_writer: bool,
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
                    if t.kind() == TableKind::Slice
                        && t.name() == slice.to_string()
                        && !t.is_pinned()
                    {
                        refused = Some("a slice cannot read itself".into());
                    }
                    inputs.insert((t.name().to_string(), t.is_pinned()), t.version());
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
        .map(|((table, pinned), version)| InputVersion {
            table,
            version,
            pinned,
        })
        .collect())
}

/// Refuses a definition of `slice` whose inputs read `slice` again through other slices
/// (`a` reads `b` reads `a`): each would make the other stale on every refresh, so `REFRESH
/// ON CHANGE` would commit a new version every tick. Versions the SQL names (`slice_at`) are
/// not followed: they never change. The error names the cycle.
async fn refuse_cycles(shared: &Shared, slice: &SliceName, inputs: &[InputVersion]) -> Result<()> {
    let me = slice.to_string();
    // Depth-first over the slices' latest descriptors, with the path that led to each.
    let mut stack: Vec<Vec<String>> = followed(inputs).map(|t| vec![me.clone(), t]).collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(path) = stack.pop() {
        let current = path.last().expect("paths are never empty").clone();
        if current == me {
            return Err(IcePieError::InvalidDefinition {
                slice: me,
                reason: format!(
                    "it would read itself through other slices ({}); slices must not form a \
                     cycle, or each refresh would make the other stale",
                    path.join(" -> ")
                ),
            });
        }
        if !seen.insert(current.clone()) {
            continue;
        }
        let Ok(name) = SliceName::parse(&current) else {
            continue;
        };
        let Some(table) = shared
            .warehouse
            .load(&Warehouse::slice_path(&name), None)
            .await?
        else {
            continue;
        };
        let (meta, _) = meta::latest_meta(&table, &current).await?;
        for next in followed(&meta.inputs) {
            let mut longer = path.clone();
            longer.push(next);
            stack.push(longer);
        }
    }
    Ok(())
}

/// The slices among `inputs` that a refresh follows (not core tables, not pinned versions).
fn followed(inputs: &[InputVersion]) -> impl Iterator<Item = String> + '_ {
    inputs
        .iter()
        .filter(|i| !i.pinned && !i.table.starts_with(&format!("{CORE_SCHEMA}.")))
        .map(|i| i.table.clone())
}

/// A copy of `state` whose queries may use at most `limit` bytes, spilling to disk where an
/// operator can; the error of one that cannot names the biggest consumers.
pub(crate) fn budgeted_state(state: &SessionState, limit: u64) -> Result<SessionState> {
    let pool = TrackConsumersPool::new(
        FairSpillPool::new(usize::try_from(limit).unwrap_or(usize::MAX)),
        NonZeroUsize::new(3).expect("3 is not zero"),
    );
    let runtime = RuntimeEnvBuilder::from_runtime_env(state.runtime_env())
        .with_memory_pool(Arc::new(pool))
        .build_arc()?;
    Ok(SessionStateBuilder::new_from_existing(state.clone())
        .with_runtime_env(runtime)
        .build())
}

/// True when a Delta error says another writer committed first.
pub(crate) fn is_conflict(e: &DeltaTableError) -> bool {
    matches!(
        e,
        DeltaTableError::VersionAlreadyExists(_)
            | DeltaTableError::Transaction {
                source: TransactionError::MaxCommitAttempts(_)
                    | TransactionError::CommitConflict(_)
                    | TransactionError::VersionAlreadyExists(_)
            }
    )
}

/// The commit properties of every icepie commit to a slice: its descriptor, and no retry, so
/// that a commit lands only on the version it was prepared from.
pub(crate) fn commit_properties(meta: &SliceMeta) -> CommitProperties {
    CommitProperties::default()
        .with_metadata([(
            COMMIT_KEY.to_string(),
            serde_json::to_value(meta).expect("slice metadata serializes"),
        )])
        .with_max_retries(0)
}

/// Turns a Delta error of a slice commit into a conflict error when another writer won.
pub(crate) fn commit_error(name: &SliceName, base: Option<i64>, e: DeltaTableError) -> IcePieError {
    if is_conflict(&e) {
        IcePieError::Conflict {
            slice: name.to_string(),
            base: base.map_or("no version (the slice did not exist yet)".into(), |v| {
                format!("version {v}")
            }),
        }
    } else {
        e.into()
    }
}

/// Builds and commits the next version of `name` (the first one when `existing` is `None`).
pub(crate) async fn build(
    state: &SessionState,
    shared: &Shared,
    name: &SliceName,
    spec: &SliceSpec,
    kind: CommitKind,
    existing: Option<&DeltaTable>,
) -> Result<BuildOutcome> {
    let _refreshing = RefreshingGuard::new(shared, name);
    let attempt_id = uuid::Uuid::new_v4().to_string();
    let started_at = Utc::now();
    let clock = Instant::now();
    let mut inputs = Vec::new();
    let options = shared.options();
    let heartbeat = options.heartbeat.0;
    // Attempts of this slice whose process died are recorded before this one starts.
    running::resolve_abandoned(shared, name, heartbeat).await?;
    let running = running::Running::start(
        &shared.warehouse,
        name,
        &attempt_id,
        &kind.to_string(),
        started_at,
        heartbeat,
    )
    .await?;
    let result = match budgeted_state(state, options.refresh_memory_limit.0) {
        Ok(state) => {
            write_version(
                &state,
                shared,
                name,
                spec,
                kind,
                existing,
                &attempt_id,
                &mut inputs,
            )
            .await
        }
        Err(e) => Err(e),
    };
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
    let outcome = match result {
        Ok(table) => {
            let version = table.version().unwrap_or_default() as i64;
            let stats = table_stats(&table).unwrap_or_default();
            attempt.version = Some(version);
            attempt.rows = Some(stats.rows);
            attempt.bytes = Some(stats.bytes);
            if let Err(e) = log::append(&shared.warehouse, name, &attempt).await {
                running.finish().await;
                return Err(IcePieError::Warehouse {
                    location: shared.warehouse.url().to_string(),
                    reason: format!(
                        "slice {name} version {version} was committed, but its refresh record \
                         could not be written: {e}"
                    ),
                });
            }
            Ok(BuildOutcome {
                slice: name.clone(),
                version,
                stats,
                inputs,
                duration_ms,
                by_another_writer: false,
            })
        }
        Err(source) => {
            let mut source = over_budget(source, &options);
            // A first build that failed because another writer created the slice meanwhile
            // (whatever error the race surfaced as) lost a race, and says so.
            if existing.is_none()
                && !matches!(source, IcePieError::Conflict { .. })
                && shared
                    .warehouse
                    .has_log(&Warehouse::slice_path(name))
                    .await
                    .unwrap_or(false)
            {
                source = IcePieError::Conflict {
                    slice: name.to_string(),
                    base: "no version (the slice did not exist yet)".into(),
                };
            }
            attempt.status = if matches!(source, IcePieError::Conflict { .. }) {
                log::CONFLICT
            } else {
                log::FAILED
            };
            attempt.error = Some(source.to_string());
            // The build's own error matters more than a failure to log it.
            let _ = log::append(&shared.warehouse, name, &attempt).await;
            Err(IcePieError::RefreshFailed {
                slice: name.to_string(),
                serving: existing
                    .and_then(|t| t.version())
                    .map(|v| format!(", still serving version {v}"))
                    .unwrap_or_default(),
                source: Box::new(source),
            })
        }
    };
    // The attempt's row is logged (or could not be): its marker goes.
    running.finish().await;
    outcome
}

/// What a refresh of `name` that lost a race to another writer does next, its descriptor
/// having been `before`: `Some(outcome)` when the winner's version is built from the inputs'
/// latest versions (nothing left to do), `None` to build again on top of it. A drop, a freeze
/// or a new definition in between is an error that says which.
pub(crate) async fn after_lost_race(
    shared: &Shared,
    name: &SliceName,
    before: &SliceMeta,
) -> Result<Option<BuildOutcome>> {
    let changed = |change: &str| IcePieError::ChangedMeanwhile {
        slice: name.to_string(),
        change: change.to_string(),
    };
    let table = match lifecycle::load_table(shared, name).await {
        Ok(t) => t,
        Err(IcePieError::SliceNotFound(_)) => return Err(changed("it was dropped")),
        Err(e) => return Err(e),
    };
    let (now, _) = meta::latest_meta(&table, &name.to_string()).await?;
    if let Some(frozen) = &now.frozen {
        return Err(lifecycle::frozen_error(name, frozen, "REFRESH SLICE"));
    }
    if now.definition != before.definition || now.partition_by != before.partition_by {
        return Err(changed(
            "CREATE OR REPLACE SLICE gave it a new definition; run REFRESH SLICE again to \
             build from it",
        ));
    }
    for input in now.inputs.iter().filter(|i| !i.pinned) {
        if shared.latest_version(&input.table).await? != Some(input.version) {
            return Ok(None);
        }
    }
    Ok(Some(BuildOutcome {
        slice: name.clone(),
        version: table.version().unwrap_or_default() as i64,
        stats: table_stats(&table)?,
        inputs: now.inputs,
        duration_ms: 0,
        by_another_writer: true,
    }))
}

/// Names the memory budget when a build ran out of it.
fn over_budget(e: IcePieError, options: &IcePieOptions) -> IcePieError {
    let text = e.to_string();
    if text.contains("Resources exhausted") {
        IcePieError::MemoryBudget {
            limit: options.refresh_memory_limit.to_string(),
            detail: text,
        }
    } else {
        e
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_version(
    state: &SessionState,
    shared: &Shared,
    name: &SliceName,
    spec: &SliceSpec,
    kind: CommitKind,
    existing: Option<&DeltaTable>,
    attempt_id: &str,
    inputs: &mut Vec<InputVersion>,
) -> Result<DeltaTable> {
    let plan = time_travel::plan_sql(state, shared, &spec.definition).await?;
    if !is_query(&plan) {
        return Err(IcePieError::InvalidDefinition {
            slice: name.to_string(),
            reason: "the definition must be a query (SELECT, WITH, VALUES)".into(),
        });
    }
    *inputs = plan_inputs(&plan, name)?;
    refuse_cycles(shared, name, inputs).await?;
    for col in &spec.partition_by {
        if plan.schema().field_with_unqualified_name(col).is_err() {
            return Err(IcePieError::InvalidDefinition {
                slice: name.to_string(),
                reason: format!("PARTITION BY column '{col}' is not in the query's output"),
            });
        }
    }
    let meta = SliceMeta {
        kind,
        attempt_id: attempt_id.to_string(),
        definition: spec.definition.clone(),
        owner: spec.owner.clone(),
        refresh: spec.refresh.clone(),
        partition_by: spec.partition_by.clone(),
        inputs: inputs.clone(),
        frozen: None,
        rows: None,
        restored_from: None,
    };
    let rel = Warehouse::slice_path(name);
    let base = shared.warehouse.write_base(&rel, existing)?;
    let tracked = base.tracked.clone();
    let mut write = WriteBuilder::new(base.log_store, base.snapshot)
        .with_input_plan(plan)
        .with_session_state(Arc::new(crate::engine::progress::counting(state)))
        .with_partition_columns(spec.partition_by.clone())
        .with_commit_properties(commit_properties(&meta));
    write = match existing {
        Some(_) => write
            .with_save_mode(SaveMode::Overwrite)
            .with_schema_mode(SchemaMode::Overwrite),
        None => write
            .with_save_mode(SaveMode::ErrorIfExists)
            .with_configuration([NO_EXPIRED_LOG_CLEANUP, FREQUENT_CHECKPOINTS]),
    };
    // A failed or cancelled build leaves nothing behind, not even a file.
    let guard = TakeBack::new(base.tracked);
    let result = write.await;
    guard.finish(&result).await;
    let from = existing.and_then(DeltaTable::version).map(|v| v as i64);
    match result {
        Err(e) if !tracked.committed() => Err(commit_error(name, from, e)),
        landed => shared.warehouse.landed(&rel, &tracked, landed).await,
    }
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
