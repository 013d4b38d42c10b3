//! Reader-chosen freshness: how far behind its inputs a slice may be when it is read.
//!
//! Staleness is measured as `system.slices` measures `lag`: from the commit of the oldest input
//! change the version served has not consumed (a slice whose inputs have not moved on is not
//! stale, however old). A reader sets a limit for a session (`SET icepie.max_staleness =
//! '5 minutes'`, applied by [`check_plan`] to every slice a statement reads at its latest
//! version) or for one read (`fresh('domain.slice', '5 minutes' [, action])`, [`read_fresh`]).
//! A slice staler than the limit is, per `icepie.on_stale` or the call's action:
//!
//! - `serve`d with a notice (the default),
//! - `refresh`ed first, then read (a refresh about to start is joined; a frozen slice cannot
//!   be refreshed, and the read fails saying so),
//! - or the read `fail`s with [`IcePieError::Stale`], naming the slice, its lag and the limit.
//!
//! Checking costs, per slice read, its descriptor and one look at each input's latest
//! version: only statements of a session with a limit pay it. A statement that is only
//! described (`EXPLAIN`, a server's Parse) is not checked; on a read-only server, a read that
//! would need a refresh fails instead ([`Mode`]).

use std::time::Duration;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::LogicalPlan;
use deltalake::DeltaTable;

use super::info::{behind, InputCache};
use super::meta;
use super::SliceContext;
use crate::error::{IcePieError, Result};
use crate::notices::notice;
use crate::options::{OnStale, Span};
use crate::storage::names::SliceName;
use crate::table::live::LatestTable;
use crate::table::{IcePieTable, TableKind};
use crate::text::human_duration;

/// How reads may act on a staleness limit, for the statements of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Serve, refresh or fail, as asked.
    Act,
    /// As [`Mode::Act`], but a refresh is refused: nothing may be written.
    ReadOnly,
    /// The statement is only planned, not run: nothing is checked.
    Describe,
}

tokio::task_local! {
    static MODE: Mode;
}

/// Runs `work` with reads acting on staleness limits as `mode` says.
pub(crate) async fn with_mode<F: std::future::Future>(mode: Mode, work: F) -> F::Output {
    MODE.scope(mode, work).await
}

fn mode() -> Mode {
    MODE.try_with(|m| *m).unwrap_or(Mode::Act)
}

/// How far behind its inputs (ms) the slice version `table` is; `None` when it is not.
/// `i64::MAX` when it is behind but the change's commit time cannot be read.
async fn lag_ms(
    shared: &SliceContext,
    name: &SliceName,
    table: &DeltaTable,
) -> Result<Option<i64>> {
    let (meta, _) = meta::latest_meta(table, &name.to_string()).await?;
    let (stale, oldest) = behind(shared, &meta, &InputCache::default()).await?;
    if !stale {
        return Ok(None);
    }
    let now = chrono::Utc::now().timestamp_millis();
    Ok(Some(oldest.map_or(i64::MAX, |at| (now - at).max(0))))
}

/// Applies `limit` to slice `name`, whose latest version is `table`: `true` when it was
/// refreshed to meet it (read it again).
async fn enforce(
    shared: &SliceContext,
    name: &SliceName,
    table: &DeltaTable,
    limit: Duration,
    action: OnStale,
) -> Result<bool> {
    let mode = mode();
    if mode == Mode::Describe {
        return Ok(false);
    }
    let Some(lag) = lag_ms(shared, name, table).await? else {
        return Ok(false);
    };
    if lag <= i64::try_from(limit.as_millis()).unwrap_or(i64::MAX) {
        return Ok(false);
    }
    let lag = match lag {
        i64::MAX => "an unknown time".to_string(),
        ms => human_duration(ms),
    };
    let limit = Span(limit).to_string();
    match action {
        OnStale::Serve => {
            let version = table.version().unwrap_or_default();
            notice(format!(
                "slice {name} is {lag} behind its inputs, more than the {limit} allowed: \
                 serving version {version} (icepie.on_stale = 'serve')"
            ));
            Ok(false)
        }
        OnStale::Fail => Err(IcePieError::Stale {
            slice: name.to_string(),
            lag,
            limit,
        }),
        OnStale::Refresh if mode == Mode::ReadOnly => Err(IcePieError::NotAllowed(format!(
            "slice '{name}' is {lag} behind its inputs, more than the {limit} this read allows, \
             and this server is read-only: it does not refresh slices for readers; read it with \
             action 'serve' or allow more staleness"
        ))),
        OnStale::Refresh => {
            shared.refresh(name).await?;
            Ok(true)
        }
    }
}

/// The latest version of slice `name`, no more than `limit` behind its inputs
/// (`fresh('name', 'limit' [, action])`).
pub(crate) async fn read_fresh(
    shared: &SliceContext,
    name: &SliceName,
    limit: Duration,
    action: OnStale,
) -> Result<IcePieTable> {
    let load = || async {
        shared
            .load_slice(name, None)
            .await?
            .ok_or_else(|| IcePieError::SliceNotFound(name.to_string()))
    };
    let table = load().await?;
    if enforce(shared, name, table.delta_table(), limit, action).await? {
        return Ok(load().await?.freshness_checked());
    }
    Ok(table.freshness_checked())
}

/// Applies `limit` to every slice `plan` reads at its latest version, directly or through
/// views (not versions named in the SQL, nor `fresh(...)` reads, which have their own limit);
/// `true` when some were refreshed to meet it (plan the statement again). A statement that
/// only defines something (`CREATE VIEW`) or explains reads nothing now: not checked.
pub(crate) async fn check_plan(
    shared: &SliceContext,
    plan: &LogicalPlan,
    limit: Duration,
    action: OnStale,
) -> Result<bool> {
    if matches!(plan, LogicalPlan::Explain(_) | LogicalPlan::Ddl(_)) {
        return Ok(false);
    }
    // The slices read: loaded already, or (through a view) by name.
    let mut read: Vec<(SliceName, Option<DeltaTable>)> = Vec::new();
    let mut plans = vec![plan.clone()];
    let mut seen = 0;
    while let Some(plan) = plans.get(seen).cloned() {
        seen += 1;
        let _ = plan.apply_with_subqueries(|node| {
            let LogicalPlan::TableScan(scan) = node else {
                return Ok(TreeNodeRecursion::Continue);
            };
            let Ok(provider) = source_as_provider(&scan.source) else {
                return Ok(TreeNodeRecursion::Continue);
            };
            let found = if let Some(t) = provider.downcast_ref::<IcePieTable>() {
                let latest =
                    t.kind() == TableKind::Slice && !t.is_pinned() && !t.is_freshness_checked();
                latest.then(|| (t.name().to_string(), Some(t.delta_table().clone())))
            } else if let Some(t) = provider.downcast_ref::<LatestTable>() {
                (t.kind() == TableKind::Slice).then(|| (t.name().to_string(), None))
            } else {
                if let Some(view) = provider.get_logical_plan() {
                    if plans.len() < 64 {
                        plans.push(view.into_owned());
                    }
                }
                None
            };
            if let Some((name, table)) = found {
                if let Ok(name) = SliceName::parse(&name) {
                    if read.iter().all(|(n, _)| *n != name) {
                        read.push((name, table));
                    }
                }
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }
    let mut refreshed = false;
    for (name, table) in read {
        let table = match table {
            Some(table) => table,
            None => match shared.load_slice(&name, None).await? {
                Some(t) => t.delta_table().clone(),
                None => continue,
            },
        };
        refreshed |= enforce(shared, &name, &table, limit, action).await?;
    }
    Ok(refreshed)
}
