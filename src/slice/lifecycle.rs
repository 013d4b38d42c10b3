//! A slice's life besides refreshes: `FREEZE SLICE`, `THAW SLICE` and `ROLLBACK SLICE`.
//!
//! Each is one Delta commit carrying the slice's descriptor ([`meta`](super::meta)), so it is
//! persisted in the warehouse, seen by every process and listed by `SHOW SLICE HISTORY`.
//! Freezing and thawing change no data (the commit sets the table property `icepie.frozen`,
//! which other Delta readers see too); a rollback is Delta's restore: one commit whose files
//! and metadata are those of the earlier version. Like refreshes, these commits land only on
//! the version they were prepared from; when another writer commits first, the engine runs
//! them again on the new version (none depends on the data it replaces).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::DeltaTable;

use super::clustering::ClusterBy;
use super::meta::{self, CommitKind, Frozen, SliceDescriptor};
use super::quarantine;
use super::SliceContext;
use super::{commit_error, commit_properties, Previous};
use crate::error::{IcePieError, Result};
use crate::sql::RefreshPolicy;
use crate::storage::names::SliceName;
use crate::storage::tracked::TrackedStore;
use crate::storage::{table_stats, Warehouse};

/// Table property that mirrors the frozen state for other Delta readers.
pub(crate) const FROZEN_PROPERTY: &str = "icepie.frozen";

/// What a lifecycle command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleOutcome {
    /// The slice.
    pub slice: SliceName,
    /// The version now served (new when `committed`).
    pub version: i64,
    /// False when there was nothing to do (freezing a frozen slice, thawing a healthy one).
    pub committed: bool,
}

/// The slice's table at its latest version, or `SliceNotFound`.
pub(crate) async fn load_table(shared: &SliceContext, name: &SliceName) -> Result<DeltaTable> {
    shared
        .warehouse
        .load(&Warehouse::slice_path(name), None)
        .await?
        .ok_or_else(|| IcePieError::SliceNotFound(name.to_string()))
}

/// The slice's table at its latest version for a refresh, its descriptor, and how that
/// version was last built (`meta: None` in [`Previous`] when a commit icepie did not make
/// follows the latest descriptor), or `SliceNotFound`.
pub(crate) async fn load_previous(
    shared: &SliceContext,
    name: &SliceName,
    full: bool,
) -> Result<(DeltaTable, SliceDescriptor, Previous)> {
    let table = load_table(shared, name).await?;
    let (mut meta, committed_at, at) = meta::latest_meta_at(&table, &name.to_string()).await?;
    let latest = table.version().map(|v| v as i64) == Some(at);
    meta.count_own_build(committed_at.filter(|_| latest));
    let ours = latest
        && match meta.kind {
            CommitKind::Create | CommitKind::Refresh | CommitKind::Replace => true,
            // Another writer's commit may hide behind a freeze, a thaw or a rollback.
            _ => meta::data_is_ours(&table, &name.to_string(), at).await?,
        };
    let rel = Warehouse::slice_path(name);
    let damaged = quarantine::in_force(&shared.warehouse, &rel, &table)
        .await?
        .map(|q| q.file);
    let previous = Previous {
        meta: ours.then(|| meta.clone()),
        full,
        damaged,
        costs: meta.costs.clone(),
    };
    Ok((table, meta, previous))
}

/// [`load_previous`] for a change: the table is loaded anew through a store that tracks what the
/// change writes, so that a change whose commit landed is never reported as failed.
async fn load_for_change(
    shared: &SliceContext,
    name: &SliceName,
) -> Result<(DeltaTable, SliceDescriptor, Option<i64>, Arc<TrackedStore>)> {
    let (table, tracked) = shared
        .warehouse
        .load_tracked(&Warehouse::slice_path(name))
        .await?
        .ok_or_else(|| IcePieError::SliceNotFound(name.to_string()))?;
    let (mut meta, committed_at, at) = meta::latest_meta_at(&table, &name.to_string()).await?;
    let latest = table.version().map(|v| v as i64) == Some(at);
    // The next descriptor carries the cost of the build that made this one.
    meta.count_own_build(committed_at.filter(|_| latest));
    Ok((table, meta, committed_at, tracked))
}

/// The error a change of a frozen slice gets: when and why it was frozen, and what to do.
pub(crate) fn frozen_error(name: &SliceName, frozen: &Frozen, what: &str) -> IcePieError {
    let since = chrono::DateTime::from_timestamp_millis(frozen.since)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "an unknown time".into());
    let why = frozen
        .reason
        .as_deref()
        .map(|r| format!(" ('{r}')"))
        .unwrap_or_default();
    IcePieError::Frozen {
        slice: name.to_string(),
        detail: format!("frozen since {since}{why}; {what} is refused until THAW SLICE {name}"),
    }
}

/// Commits a data-less version with descriptor `meta`, setting `icepie.frozen`.
async fn commit_state(
    shared: &SliceContext,
    table: &DeltaTable,
    tracked: &TrackedStore,
    name: &SliceName,
    meta: &SliceDescriptor,
) -> Result<i64> {
    let frozen = meta.frozen.is_some().to_string();
    let base = table.version().map(|v| v as i64);
    let result = table
        .clone()
        .set_tbl_properties()
        .with_properties(HashMap::from([(FROZEN_PROPERTY.to_string(), frozen)]))
        // Not a `delta.*` property: Delta has no opinion on it.
        .with_raise_if_not_exists(false)
        .with_commit_properties(commit_properties(meta))
        .await;
    let table = match result {
        Err(e) if !tracked.committed() => return Err(commit_error(name, base, e)),
        landed => {
            shared
                .warehouse
                .landed(&Warehouse::slice_path(name), tracked, landed)
                .await?
        }
    };
    Ok(table.version().unwrap_or_default() as i64)
}

fn lifecycle_meta(meta: &SliceDescriptor, kind: CommitKind, rows: i64) -> SliceDescriptor {
    SliceDescriptor {
        kind,
        attempt_id: uuid::Uuid::new_v4().to_string(),
        rows: Some(rows),
        restored_from: None,
        built: None,
        build_started_at: None,
        ..meta.clone()
    }
}

/// `FREEZE SLICE name ['reason']`: pins the slice at its current data. Freezing a frozen
/// slice changes nothing.
pub(crate) async fn freeze(
    shared: &SliceContext,
    name: &SliceName,
    reason: Option<String>,
) -> Result<LifecycleOutcome> {
    let (table, meta, _, tracked) = load_for_change(shared, name).await?;
    let version = table.version().unwrap_or_default() as i64;
    if meta.frozen.is_some() {
        return Ok(LifecycleOutcome {
            slice: name.clone(),
            version,
            committed: false,
        });
    }
    let mut next = lifecycle_meta(&meta, CommitKind::Freeze, table_stats(&table)?.rows);
    next.frozen = Some(Frozen {
        reason,
        since: Utc::now().timestamp_millis(),
    });
    Ok(LifecycleOutcome {
        slice: name.clone(),
        version: commit_state(shared, &table, &tracked, name, &next).await?,
        committed: true,
    })
}

/// `THAW SLICE name`: resumes the slice's refresh policy, and clears a suspension (the
/// failures in a row are counted from the latest commit). Thawing a slice that is neither
/// frozen nor failing changes nothing.
pub(crate) async fn thaw(shared: &SliceContext, name: &SliceName) -> Result<LifecycleOutcome> {
    let (table, meta, committed_at, tracked) = load_for_change(shared, name).await?;
    let version = table.version().unwrap_or_default() as i64;
    let attempts = shared.attempts_of(name, &table).await?;
    let failing = super::refresh_log::failures_since(&attempts, committed_at.unwrap_or(0))
        .last
        .is_some();
    if meta.frozen.is_none() && !failing {
        return Ok(LifecycleOutcome {
            slice: name.clone(),
            version,
            committed: false,
        });
    }
    let mut next = lifecycle_meta(&meta, CommitKind::Thaw, table_stats(&table)?.rows);
    next.frozen = None;
    Ok(LifecycleOutcome {
        slice: name.clone(),
        version: commit_state(shared, &table, &tracked, name, &next).await?,
        committed: true,
    })
}

/// `ALTER SLICE name SET [REFRESH policy] [CLUSTER BY layout]`: a version with the same
/// data whose descriptor has the new policy or layout. The scheduler follows the new policy
/// at once; a new layout is written by the next refresh (full, as any change of layout).
/// A change to what the slice already has commits nothing.
pub(crate) async fn alter(
    shared: &SliceContext,
    name: &SliceName,
    refresh: Option<&RefreshPolicy>,
    cluster_by: Option<&ClusterBy>,
) -> Result<LifecycleOutcome> {
    let (table, meta, _, tracked) = load_for_change(shared, name).await?;
    let version = table.version().unwrap_or_default() as i64;
    if let Some(ClusterBy::Columns(columns)) = cluster_by {
        let schema = table.snapshot()?.schema();
        if let Some(c) = columns
            .iter()
            .find(|c| c.starts_with(super::aggregate::HIDDEN) || schema.field(c.as_str()).is_none())
        {
            return Err(IcePieError::InvalidDefinition {
                slice: name.to_string(),
                reason: format!("CLUSTER BY column '{c}' is not one of the slice's columns"),
            });
        }
    }
    let mut next = lifecycle_meta(&meta, CommitKind::Alter, table_stats(&table)?.rows);
    if let Some(refresh) = refresh {
        next.refresh = refresh.clone();
    }
    if let Some(cluster_by) = cluster_by {
        next.cluster_by = cluster_by.clone();
    }
    if next.refresh == meta.refresh && next.cluster_by == meta.cluster_by {
        return Ok(LifecycleOutcome {
            slice: name.clone(),
            version,
            committed: false,
        });
    }
    Ok(LifecycleOutcome {
        slice: name.clone(),
        version: commit_state(shared, &table, &tracked, name, &next).await?,
        committed: true,
    })
}

/// The versions of a slice whose latest version is `latest` that are retained.
pub(crate) fn retained(latest: i64, retain_versions: usize) -> std::ops::RangeInclusive<i64> {
    let keep = i64::try_from(retain_versions.max(1)).unwrap_or(i64::MAX);
    (latest - keep + 1).max(0)..=latest
}

/// Refuses a version of `name` that does not exist or is no longer retained.
pub(crate) fn check_retained(
    name: &str,
    version: i64,
    latest: i64,
    retain_versions: usize,
) -> Result<()> {
    let range = retained(latest, retain_versions);
    if version > latest || version < 0 {
        return Err(IcePieError::VersionNotFound {
            table: name.to_string(),
            detail: format!("it has no version {version}; its latest version is {latest}"),
        });
    }
    if !range.contains(&version) {
        return Err(IcePieError::VersionNotFound {
            table: name.to_string(),
            detail: format!(
                "version {version} is no longer retained: versions {} to {} are \
                 (icepie.retain_versions = {retain_versions})",
                range.start(),
                range.end()
            ),
        });
    }
    Ok(())
}

/// `ROLLBACK SLICE name TO VERSION n`: commits a new version whose data and definition are
/// those of version `n`.
pub(crate) async fn rollback(
    shared: &SliceContext,
    name: &SliceName,
    version: i64,
) -> Result<LifecycleOutcome> {
    let (table, meta, _, tracked) = load_for_change(shared, name).await?;
    if let Some(frozen) = &meta.frozen {
        return Err(frozen_error(name, frozen, "ROLLBACK SLICE"));
    }
    let latest = table.version().unwrap_or_default() as i64;
    let options = shared.options();
    check_retained(&name.to_string(), version, latest, options.retain_versions)?;
    let id = crate::storage::table_id(&table);
    super::vacuum::check_not_vacuumed(shared, name, version, id.as_deref()).await?;
    if version == latest {
        return Err(IcePieError::VersionNotFound {
            table: name.to_string(),
            detail: format!("version {version} is the version it serves already"),
        });
    }
    let target = shared
        .warehouse
        .load(&Warehouse::slice_path(name), Some(version))
        .await?
        .ok_or_else(|| IcePieError::SliceNotFound(name.to_string()))?;
    let (target_meta, _) = meta::latest_meta(&target, &name.to_string()).await?;
    // The costs measured so far hold for the version restored when it has the definition.
    let costs = match target_meta.definition == meta.definition {
        true => meta.costs.clone(),
        false => target_meta.costs.clone(),
    };
    let next = SliceDescriptor {
        kind: CommitKind::Rollback,
        attempt_id: uuid::Uuid::new_v4().to_string(),
        frozen: None,
        rows: Some(table_stats(&target)?.rows),
        restored_from: Some(version),
        built: None,
        build_started_at: None,
        costs,
        ..target_meta
    };
    let props: CommitProperties = commit_properties(&next);
    let restored = table
        .clone()
        .restore()
        .with_version_to_restore(version as u64)
        .with_commit_properties(props)
        .await;
    let restored = match restored {
        Err(e) if tracked.committed() => Ok(shared
            .warehouse
            .landed(&Warehouse::slice_path(name), &tracked, Err(e))
            .await?),
        other => other.map(|(table, _)| table),
    };
    match restored {
        Ok(table) => Ok(LifecycleOutcome {
            slice: name.clone(),
            version: table.version().unwrap_or_default() as i64,
            committed: true,
        }),
        // Delta's restore checks that the version's files still exist ("Find missing file");
        // its error type is private to delta-rs, so its text is all there is.
        Err(e) if e.to_string().contains("missing file") => Err(IcePieError::VersionNotFound {
            table: name.to_string(),
            detail: format!("the files of version {version} are gone (vacuumed?): {e}"),
        }),
        Err(e) => Err(commit_error(name, Some(latest), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_latest_versions() {
        assert_eq!(retained(20, 10), 11..=20);
        assert_eq!(retained(3, 10), 0..=3);
        assert_eq!(retained(5, 0), 5..=5);
        assert!(check_retained("d.s", 11, 20, 10).is_ok());
        let old = check_retained("d.s", 10, 20, 10).unwrap_err().to_string();
        assert!(
            old.contains("no longer retained") && old.contains("11 to 20"),
            "{old}"
        );
        let future = check_retained("d.s", 21, 20, 10).unwrap_err().to_string();
        assert!(future.contains("latest version is 20"), "{future}");
    }
}
