//! Slices: materialized, versioned tables defined by a query over the core and other slices.
//!
//! A build (the first version, a refresh, or a replace) plans the definition with every input
//! pinned at the version current when planning starts, streams the result into the slice's next
//! Delta version as one Overwrite commit, and records the input versions in that commit
//! ([`meta`]) and in the refresh log ([`refresh_log`]). A build that fails at any point commits nothing:
//! the slice keeps serving its last version (invariant 2), and the failure is logged so that
//! `system.slices` shows the slice `failed` with its error in every process.
//!
//! Each build runs under its own memory budget (`icepie.refresh_memory_limit`), so one greedy
//! refresh fails alone instead of starving queries and other refreshes. A build commits only on
//! top of the version it started from: if another process committed the slice meanwhile, the
//! build reports a conflict and commits nothing, so no version is ever mixed or lost.

pub(crate) mod aggregate;
mod as_planned;
mod build;
pub(crate) mod clustering;
mod context;
pub(crate) mod damage;
pub(crate) mod freshness;
mod incremental;
mod info;
pub(crate) mod lease;
pub(crate) mod lifecycle;
pub(crate) mod meta;
mod partitions;
mod plan;
pub(crate) mod quarantine;
pub(crate) mod refresh_log;
pub(crate) mod running;
pub(crate) mod schedule;
mod settle;
pub(crate) mod vacuum;

pub(crate) use build::{after_lost_race, build, explain, is_query, BuildRequest};
pub(crate) use context::{Refresher, SliceContext};
pub(crate) use incremental::Previous;
pub(crate) use info::{info, Card, InputCache};
pub use info::{SliceInfo, SliceState};
pub(crate) use settle::Settling;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use chrono::Utc;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::source_as_provider;
use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use deltalake::kernel::transaction::{CommitProperties, TransactionError};
use deltalake::DeltaTableError;

use crate::error::{IcePieError, Result};
use crate::sql::RefreshPolicy;
use crate::storage::names::{SliceName, CORE_SCHEMA};
use crate::storage::{table_stats, TableStats, Warehouse};
use crate::table::{IcePieTable, TableKind};
use meta::{Frozen, InputVersion, RefreshMode, SliceDescriptor, COMMIT_KEY};

/// What a slice is built from: its definition and settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SliceSpec {
    /// The defining query (SQL).
    pub definition: String,
    /// Owning team.
    pub owner: Option<String>,
    /// When the slice refreshes.
    pub refresh: RefreshPolicy,
    /// Partition columns.
    pub partition_by: Vec<String>,
    /// How refreshes run: incremental, full, or incremental when it pays (auto).
    pub refresh_mode: RefreshMode,
    /// How full builds order the rows.
    pub cluster_by: clustering::ClusterBy,
    /// When the slice was created (ms since the epoch), `None` for a new one: kept by its
    /// refreshes, even when a commit icepie did not make precedes them.
    pub created_at: Option<i64>,
}

impl From<&SliceDescriptor> for SliceSpec {
    fn from(m: &SliceDescriptor) -> Self {
        Self {
            definition: m.definition.clone(),
            owner: m.owner.clone(),
            refresh: m.refresh.clone(),
            partition_by: m.partition_by.clone(),
            refresh_mode: m.refresh_mode,
            cluster_by: m.cluster_by.clone(),
            created_at: m.created_at,
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
    /// True when the inputs were the very versions the slice's version was built from: the
    /// refresh had nothing to do and committed nothing (`version` is the current one).
    pub unchanged: bool,
    /// How this build ran (full or incremental), why, and what it read; `None` when another
    /// writer built the version.
    pub built: Option<meta::Built>,
}

/// Finds the tables a plan reads, with the versions their providers are pinned to.
/// Refuses plans that read anything but core tables and slices, or the slice itself.
pub(crate) fn plan_inputs(plan: &LogicalPlan, slice: &SliceName) -> Result<Vec<InputVersion>> {
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
                    inputs.insert(
                        (t.name().to_string(), t.is_pinned()),
                        (t.version(), t.table_id()),
                    );
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
        .map(|((table, pinned), (version, id))| InputVersion {
            table,
            version,
            pinned,
            id,
        })
        .collect())
}

/// Refuses a definition of `slice` whose inputs read `slice` again through other slices
/// (`a` reads `b` reads `a`): each would make the other stale on every refresh, so `REFRESH
/// ON CHANGE` would commit a new version every tick. Versions the SQL names (`slice_at`) are
/// not followed: they never change. The error names the cycle.
async fn refuse_cycles(
    shared: &SliceContext,
    slice: &SliceName,
    inputs: &[InputVersion],
) -> Result<()> {
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
pub(crate) fn commit_properties(meta: &SliceDescriptor) -> CommitProperties {
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
