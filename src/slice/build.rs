//! One build of a slice: the first version, a refresh or a replace, from planning the
//! definition over pinned inputs to the commit and its entry in the refresh log.

pub(crate) use super::plan::is_query;

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use datafusion::execution::SessionState;
use datafusion::parquet::basic::Compression;
use datafusion::parquet::file::properties::WriterProperties;
use deltalake::operations::write::{SchemaMode, WriteBuilder};
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;

use super::clustering;
use super::incremental::Previous;
use super::plan::plan_build;
use super::SliceContext;
use super::{
    budgeted_state, commit_error, commit_properties, lifecycle, meta, refresh_log, running,
    BuildOutcome, SliceSpec,
};
use crate::error::{IcePieError, Result};
use crate::options::IcePieOptions;
use crate::storage::names::SliceName;
use crate::storage::tracked::TakeBack;
use crate::storage::{
    table_id, table_stats, Warehouse, FREQUENT_CHECKPOINTS, NO_EXPIRED_LOG_CLEANUP,
};
use meta::{format_inputs, BuildMode, Built, CommitKind, InputVersion, SliceDescriptor};

/// Marks a slice as refreshing in this process for as long as it lives.
struct RefreshingGuard<'a> {
    shared: &'a SliceContext,
    name: SliceName,
}

impl<'a> RefreshingGuard<'a> {
    fn new(shared: &'a SliceContext, name: &SliceName) -> Self {
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

/// One build of a slice: which slice, to what definition, why, and over which current version.
#[derive(Clone, Copy)]
pub(crate) struct BuildRequest<'a> {
    /// The slices' shared context: warehouse, options, caches and hooks.
    pub context: &'a SliceContext,
    pub name: &'a SliceName,
    /// The definition, layout and policies the new version is built to.
    pub spec: &'a SliceSpec,
    /// Why the version is built: a first build, a refresh, a replacement, ...
    pub kind: CommitKind,
    /// The slice's table at its current version (`None` for a first build).
    pub existing: Option<&'a DeltaTable>,
    /// What the current version was built from (`None` for a first build).
    pub previous: Option<&'a Previous>,
}

/// Builds and commits the next version of `name` (the first one when `existing` is `None`);
/// a refresh whose inputs are those the current version was built from commits nothing.
pub(crate) async fn build(state: &SessionState, request: BuildRequest<'_>) -> Result<BuildOutcome> {
    let BuildRequest {
        context: shared,
        name,
        kind,
        existing,
        ..
    } = request;
    // A refresh reading its inputs is not usage.
    let state = &crate::usage::quiet(state);
    let _refreshing = RefreshingGuard::new(shared, name);
    let attempt_id = uuid::Uuid::new_v4().to_string();
    let started_at = Utc::now();
    let clock = Instant::now();
    let mut inputs = Vec::new();
    // How the build set out to run (mode, reason, reads): logged even when it fails.
    let mut planned = None;
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
        existing.and_then(table_id),
    )
    .await?;
    let result = match budgeted_state(state, options.refresh_memory_limit.0) {
        Ok(state) => write_version(&state, &request, &attempt_id, &mut inputs, &mut planned).await,
        Err(e) => Err(e),
    };
    let duration_ms = clock.elapsed().as_millis() as i64;
    let mut attempt = refresh_log::Attempt {
        slice: name.to_string(),
        attempt_id,
        kind: kind.to_string(),
        started_at,
        duration_ms,
        status: refresh_log::SUCCESS,
        version: None,
        rows: None,
        bytes: None,
        inputs: format_inputs(&inputs),
        error: None,
        built: planned,
        slice_id: existing.and_then(table_id),
    };
    match result {
        Ok((table, built, committed)) => {
            let version = table.version().unwrap_or_default() as i64;
            let stats = table_stats(&table).unwrap_or_default();
            attempt.version = Some(version);
            attempt.rows = Some(stats.rows);
            attempt.bytes = Some(stats.bytes);
            attempt.built = Some(built.clone());
            // A first build's slice has its id once committed.
            attempt.slice_id = table_id(&table);
            if committed {
                // The version is committed: its row is written after the statement returns.
                shared
                    .settling
                    .record(&shared.warehouse, name, attempt, running);
            } else {
                // Nothing committed: the row is all the attempt leaves, and the scheduler
                // counts `REFRESH EVERY` from it, so it is written before the statement returns.
                attempt.status = refresh_log::NO_CHANGE;
                let logged = refresh_log::append(&shared.warehouse, name, &attempt).await;
                running.finish().await;
                logged?;
            }
            Ok(BuildOutcome {
                unchanged: !committed,
                slice: name.clone(),
                version,
                stats,
                inputs,
                duration_ms,
                by_another_writer: false,
                built: Some(built),
            })
        }
        Err(source) => {
            let mut source = over_budget(source, &options);
            // A build that failed because another writer created the slice meanwhile, or
            // dropped it (whatever error the race surfaced as), lost a race, and says so.
            let rel = Warehouse::slice_path(name);
            let start = shared.warehouse.log_start(&rel).await.ok().flatten();
            if existing.is_none()
                && !matches!(source, IcePieError::Conflict { .. })
                && start.is_some()
            {
                source = IcePieError::Conflict {
                    slice: name.to_string(),
                    base: "no version (the slice did not exist yet)".into(),
                };
            } else if existing.is_some() && start != Some(true) {
                source = IcePieError::DroppedMeanwhile {
                    table: format!("slice {name}"),
                };
            }
            attempt.status = if matches!(source, IcePieError::Conflict { .. }) {
                refresh_log::CONFLICT
            } else {
                refresh_log::FAILED
            };
            attempt.error = Some(source.to_string());
            // The build's own error matters more than a failure to log it. A failure is
            // logged before the statement returns: the slice's state depends on it.
            let _ = refresh_log::append(&shared.warehouse, name, &attempt).await;
            // The attempt's row is logged (or could not be): its marker goes.
            running.finish().await;
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

/// What a refresh of `name` that lost a race to another writer does next, its descriptor
/// having been `before`: `Some(outcome)` when the winner's version is built from the inputs'
/// latest versions (nothing left to do), `None` to build again on top of it. A drop, a freeze
/// or a new definition in between is an error that says which.
pub(crate) async fn after_lost_race(
    shared: &SliceContext,
    name: &SliceName,
    before: &SliceDescriptor,
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
        unchanged: false,
        built: None,
    }))
}

/// Names the memory budget when a build ran out of it: DataFusion's `ResourcesExhausted`,
/// however deep it is wrapped. delta-rs carries the errors of the plan a write runs as text
/// (`DeltaTableError::Generic`): for those, the text is all there is.
fn over_budget(e: IcePieError, options: &IcePieOptions) -> IcePieError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = match &e {
        IcePieError::DataFusion(df) => Some(df),
        IcePieError::Delta(delta) => Some(delta),
        _ => None,
    };
    let mut exhausted = false;
    while let Some(c) = cause {
        exhausted |= c
            .downcast_ref::<datafusion::error::DataFusionError>()
            .is_some_and(|df| {
                matches!(
                    df.find_root(),
                    datafusion::error::DataFusionError::ResourcesExhausted(_)
                )
            });
        cause = c.source();
    }
    let text = e.to_string();
    if exhausted || text.contains("Resources exhausted") {
        IcePieError::MemoryBudget {
            limit: options.refresh_memory_limit.to_string(),
            detail: text,
        }
    } else {
        e
    }
}

/// Plans the build `request` asks for, records its inputs (in `inputs`) and how it set out to
/// run (in `planned`), and commits the version it writes. The `bool` is whether a version was
/// committed (a refresh with nothing to do commits none).
async fn write_version(
    state: &SessionState,
    request: &BuildRequest<'_>,
    attempt_id: &str,
    inputs: &mut Vec<InputVersion>,
    planned: &mut Option<Built>,
) -> Result<(DeltaTable, Built, bool)> {
    let BuildRequest {
        context: shared,
        name,
        spec,
        kind,
        existing,
        ..
    } = *request;
    let build_started_at = Utc::now().timestamp_millis();
    let (decision, clustered) = plan_build(state, request, inputs).await?;
    *planned = Some(decision.built.clone());
    if let (true, Some(table)) = (decision.unchanged, existing) {
        return Ok((table.clone(), decision.built, false));
    }
    // Every write of a clustered slice is sorted: a full build's rows, an incremental
    // merge's or recomputed partitions' rows, and an append's new rows.
    let sorted = clustered.as_ref().is_some_and(|c| !c.columns.is_empty());
    let meta = SliceDescriptor {
        kind,
        attempt_id: attempt_id.to_string(),
        definition: spec.definition.clone(),
        owner: spec.owner.clone(),
        refresh: spec.refresh.clone(),
        partition_by: spec.partition_by.clone(),
        refresh_mode: spec.refresh_mode,
        inputs: inputs.clone(),
        frozen: None,
        rows: None,
        restored_from: None,
        built: Some(decision.built.clone()),
        appends: decision.appends,
        cluster_by: spec.cluster_by.clone(),
        clustered,
        created_at: match kind {
            CommitKind::Create | CommitKind::Replace => Some(Utc::now().timestamp_millis()),
            _ => spec.created_at,
        },
        build_started_at: Some(build_started_at),
        // Costs measured under another definition predict nothing of this one.
        costs: match (kind, request.previous) {
            (CommitKind::Refresh, Some(previous))
                if previous
                    .meta
                    .as_ref()
                    .is_none_or(|m| m.definition == spec.definition) =>
            {
                previous.costs.clone()
            }
            _ => Default::default(),
        },
    };
    let built = decision.built;
    let rel = Warehouse::slice_path(name);
    let base = shared.warehouse.write_base(&rel, existing)?;
    let tracked = base.tracked.clone();
    let state = match built.mode {
        BuildMode::Incremental => small_delta_joins(state),
        BuildMode::Full => state.clone(),
    };
    let (input, write_state) = match (sorted, &meta.clustered) {
        (true, Some(c)) => {
            let input = clustering::sorted_input(&state, decision.plan, &c.columns).await?;
            // The sorted rows come as one stream, and must reach the writer as one: with
            // more target partitions the write's optimizer would deal them round-robin to
            // several writers, whose files would each span the whole range.
            let mut single = state.clone();
            single
                .config_mut()
                .options_mut()
                .execution
                .target_partitions = 1;
            (input, single)
        }
        _ => (decision.plan, state),
    };
    let mut write = WriteBuilder::new(base.log_store, base.snapshot)
        .with_input_plan(input)
        .with_session_state(Arc::new(crate::table::progress::counting(&write_state)))
        .with_partition_columns(spec.partition_by.clone())
        .with_target_file_size(NonZeroU64::new(shared.options().target_file_size.0))
        .with_commit_properties(commit_properties(&meta));
    if sorted {
        // Sorted rows in smaller row groups: a filter on the sort column skips within files.
        write = write.with_writer_properties(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_max_row_group_row_count(Some(clustering::ROW_GROUP_ROWS))
                .build(),
        );
    }
    write = match (existing, decision.replace) {
        // New rows only, added to the version the inputs were extended from.
        (Some(_), _) if built.appended => write.with_save_mode(SaveMode::Append),
        // The partitions the new data fell in, recomputed.
        (Some(_), Some(partitions)) => write
            .with_save_mode(SaveMode::Overwrite)
            .with_replace_where(partitions),
        (Some(_), None) => write
            .with_save_mode(SaveMode::Overwrite)
            .with_schema_mode(SchemaMode::Overwrite),
        (None, _) => write
            .with_save_mode(SaveMode::ErrorIfExists)
            .with_configuration([NO_EXPIRED_LOG_CLEANUP, FREQUENT_CHECKPOINTS]),
    };
    // A failed or cancelled build leaves nothing behind, not even a file.
    let guard = TakeBack::new(base.tracked);
    let result = write.await;
    guard.finish(&result).await;
    let from = existing.and_then(DeltaTable::version).map(|v| v as i64);
    let table = match result {
        Err(e) if !tracked.committed() => Err(commit_error(name, from, e)),
        landed => shared.warehouse.landed(&rel, &tracked, landed).await,
    }?;
    Ok((table, built, true))
}

/// Largest build side, in bytes as the planner estimates them, that an incremental refresh's
/// joins collect once instead of hash-partitioning both sides (DataFusion's default: 1 MiB).
const DELTA_BUILD_BYTES: usize = 64 << 20;
/// The same in rows (DataFusion's default: 128Ki).
const DELTA_BUILD_ROWS: usize = 4 << 20;

/// `state` for an incremental build. Its joins meet a few new rows with whole inputs: the
/// planner makes the new rows the build side, and collected once (rather than hash-partitioned)
/// they give the other side's scans a dynamic filter on the join keys' range, which skips the
/// row groups and pages of a dimension those keys do not reach (orders for new lineitems). A
/// partitioned join's filter differs per partition and prunes nothing.
fn small_delta_joins(state: &SessionState) -> SessionState {
    let mut state = state.clone();
    let optimizer = &mut state.config_mut().options_mut().optimizer;
    optimizer.hash_join_single_partition_threshold = optimizer
        .hash_join_single_partition_threshold
        .max(DELTA_BUILD_BYTES);
    optimizer.hash_join_single_partition_threshold_rows = optimizer
        .hash_join_single_partition_threshold_rows
        .max(DELTA_BUILD_ROWS);
    state
}

/// What `REFRESH SLICE` would build now: mode, reason and reads (`EXPLAIN REFRESH SLICE`).
/// `request` is that of a refresh of an existing slice.
pub(crate) async fn explain(state: &SessionState, request: BuildRequest<'_>) -> Result<Built> {
    let state = &crate::usage::quiet(state);
    let mut inputs = Vec::new();
    let (decision, _) = plan_build(state, &request, &mut inputs).await?;
    Ok(decision.built)
}
