//! `VACUUM SLICE` and `VACUUM SLICES`: deleting the files of a slice that no retained version
//! references.
//!
//! A version is retained when it is one of the latest `icepie.retain_versions`, or when it
//! was the current version less than `icepie.vacuum_grace` ago: a reader that planned a query
//! on it a moment before a refresh committed still finds its files. A file is deleted only
//! when no retained version references it *and* it is older than the grace period (and a
//! second more: S3 reports times in whole seconds), so the files of a refresh still being
//! written are never touched. Nor are the files written since
//! any attempt still running in any process started (its marker, see [`running`]), however
//! long it runs, nor those of the versions replaced since then: a running refresh of any
//! slice may be reading this one. A slice folder with no Delta log (what failed first builds left) loses the
//! files older than the grace. VACUUM commits nothing to the slice, and lists only the
//! slice's own folders: the core is never vacuumed.
//!
//! VACUUM also decides how much of the slice's Delta log is kept (Delta's own age-based log
//! clean-up is off for icepie's tables): the commit and checkpoint files older than the latest
//! checkpoint at or before the oldest retained version go, so every retained version stays
//! readable from a checkpoint and the commits after it. Of the slice's refresh log only the
//! commits before its latest checkpoint go, and the files its compactions replaced (see
//! `refresh_log::compact`); its rows are kept. Files are deleted in batches (S3's DeleteObjects).
//!
//! A `vacuum_grace` under [`MIN_VACUUM_GRACE`] is refused unless
//! `icepie.vacuum_enforce_grace` is off, as delta-rs refuses a retention under the table's
//! `deletedFileRetentionDuration`. icepie does not use delta-rs's `VacuumBuilder` because it
//! commits `VACUUM START`/`VACUUM END` versions: each would be a new version of the slice
//! that wakes `REFRESH ON CHANGE` readers and is not an icepie commit.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use deltalake::protocol::checkpoints::cleanup_expired_logs_for;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::ObjectStoreExt;

use super::SliceContext;
use super::{meta, running};
use crate::error::{IcePieError, Result};
use crate::options::Span;
use crate::storage::names::SliceName;
use crate::storage::Warehouse;

/// What a vacuum of one slice deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VacuumOutcome {
    /// The slice.
    pub slice: SliceName,
    /// Versions whose files were kept.
    pub retained_from: i64,
    /// Files deleted.
    pub files_deleted: i64,
    /// Bytes deleted.
    pub bytes_deleted: i64,
    /// Old Delta log files (commits, checkpoints) deleted, of the slice and its refresh log.
    pub log_files_deleted: usize,
}

/// The shortest `icepie.vacuum_grace` VACUUM accepts while `icepie.vacuum_enforce_grace` is on.
pub(crate) const MIN_VACUUM_GRACE: Duration = Duration::from_secs(600);

/// Vacuums one slice with the current settings.
pub(crate) async fn vacuum(shared: &SliceContext, name: &SliceName) -> Result<VacuumOutcome> {
    let options = shared.options();
    let grace = options.vacuum_grace.0;
    if options.vacuum_enforce_grace.0 && grace < MIN_VACUUM_GRACE {
        return Err(IcePieError::Setting {
            name: "vacuum_grace".into(),
            reason: format!(
                "VACUUM refuses a grace of {} (under {}): a refresh or a query still running in \
                 any process could lose files it needs. Raise it, or SET \
                 icepie.vacuum_enforce_grace = off when nothing else uses the warehouse",
                Span(grace),
                Span(MIN_VACUUM_GRACE)
            ),
        });
    }
    vacuum_with(
        shared,
        name,
        options.retain_versions,
        grace,
        options.heartbeat.0,
    )
    .await
}

async fn vacuum_with(
    shared: &SliceContext,
    name: &SliceName,
    retain_versions: usize,
    grace: Duration,
    heartbeat: Duration,
) -> Result<VacuumOutcome> {
    let rel = Warehouse::slice_path(name);
    // Files' times are the store's: so is the grace's end.
    let now = shared.warehouse.store_now_ms().await;
    // Object stores may report times in whole seconds (S3 does): a file written a moment
    // after `now` can look older than it, so the cutoff is a second earlier.
    let mut cutoff = now
        .saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX))
        .saturating_sub(STORE_TIME_GRANULARITY_MS);
    // Files written since a running attempt (in any process) started may still be committed
    // by it; a minute more covers clocks that disagree. Abandoned attempts are recorded.
    running::resolve_abandoned(shared, name, heartbeat).await?;
    // So may a refresh of another slice still read the version of this one that was current
    // when it started, however long ago: the versions replaced since are kept.
    for live in running::list(&shared.warehouse, None).await? {
        if live.live(heartbeat, now) {
            cutoff = cutoff.min(live.marker.started_at - CLOCK_SKEW_MS);
        }
    }
    let Some(table) = shared.warehouse.load(&rel, None).await? else {
        return debris(shared, name, &rel, cutoff).await;
    };
    let latest = table.version().unwrap_or_default() as i64;
    let mut oldest = *super::lifecycle::retained(latest, retain_versions).start();
    // Versions replaced within the grace period stay readable: commit times only grow, so
    // walk back until a version was replaced before the cutoff.
    while oldest > 0 {
        match meta::commit_info(&table, oldest).await? {
            Some(info) if info.timestamp.is_some_and(|t| t > cutoff) => oldest -= 1,
            _ => break,
        }
    }
    let mut keep: HashSet<Path> = HashSet::new();
    for version in oldest..=latest {
        let Some(t) = shared.warehouse.load(&rel, Some(version)).await? else {
            continue;
        };
        for file in t.snapshot()?.log_data().iter() {
            keep.insert(table_file(&rel, &file.object_store_path())?);
        }
    }
    let (files_deleted, bytes_deleted) = sweep(shared, &rel, Some(&keep), cutoff).await?;
    let mut outcome = VacuumOutcome {
        slice: name.clone(),
        retained_from: oldest,
        files_deleted,
        bytes_deleted,
        log_files_deleted: 0,
    };
    // Readers of older versions (another process's slice_at or ROLLBACK, whatever its own
    // retain_versions) learn that their files are gone.
    let id = crate::storage::table_id(&table);
    if outcome.files_deleted > 0
        && kept_from(shared, name, id.as_deref())
            .await?
            .is_none_or(|k| k < oldest)
    {
        // For this table only: a slice made again under the name inherits nothing.
        let body =
            serde_json::json!({ "kept_from": oldest, "at": now, "table_id": id }).to_string();
        shared
            .warehouse
            .store()
            .put(&watermark_path(name), body.into())
            .await?;
    }
    // The log: commits and checkpoints older than the checkpoint the oldest kept version is
    // read from (and older than the grace) go; Delta's own age-based clean-up is off.
    outcome.log_files_deleted +=
        cleanup_expired_logs_for(oldest as u64, table.log_store().as_ref(), cutoff, None).await?;
    // The slice's refresh log keeps every row: only its commits before its latest checkpoint
    // go, and the files its compactions replaced.
    let log_rel = Warehouse::refreshes_path(name);
    if let Some(log) = shared.warehouse.load(&log_rel, None).await? {
        let latest = log.version().unwrap_or_default();
        let mut keep = HashSet::new();
        for file in log.snapshot()?.log_data().iter() {
            keep.insert(table_file(&log_rel, &file.object_store_path())?);
        }
        let (files, bytes) = sweep(shared, &log_rel, Some(&keep), cutoff).await?;
        outcome.files_deleted += files;
        outcome.bytes_deleted += bytes;
        outcome.log_files_deleted +=
            cleanup_expired_logs_for(latest, log.log_store().as_ref(), cutoff, None).await?;
    }
    Ok(outcome)
}

/// Folder of the VACUUM watermarks: `<domain>/<name>.json` holds the oldest version of the
/// slice whose files the last VACUUM kept, and the Delta table id of the slice it applies to.
pub(crate) const VACUUMED_PATH: &str = "_system/vacuumed/";

fn watermark_path(name: &SliceName) -> Path {
    Path::from(format!("{VACUUMED_PATH}{}/{}.json", name.domain, name.name))
}

/// The oldest version of `name` (the Delta table `id`, when known) whose files VACUUM kept,
/// if it ever deleted any: older versions may have lost files, whatever a process's
/// `icepie.retain_versions` says. A watermark of another table of that name (one dropped
/// since) says nothing of this one.
pub(crate) async fn kept_from(
    shared: &SliceContext,
    name: &SliceName,
    id: Option<&str>,
) -> Result<Option<i64>> {
    match shared.warehouse.store().get(&watermark_path(name)).await {
        Ok(got) => {
            let Ok(mark) = serde_json::from_slice::<serde_json::Value>(&got.bytes().await?) else {
                return Ok(None);
            };
            let of = mark.get("table_id").and_then(|v| v.as_str());
            if matches!((of, id), (Some(of), Some(id)) if of != id) {
                return Ok(None);
            }
            Ok(mark.get("kept_from").and_then(|v| v.as_i64()))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Refuses to read `version` of `name` (the Delta table `id`, when known) when VACUUM
/// deleted files older versions need.
pub(crate) async fn check_not_vacuumed(
    shared: &SliceContext,
    name: &SliceName,
    version: i64,
    id: Option<&str>,
) -> Result<()> {
    match kept_from(shared, name, id).await? {
        Some(kept) if version < kept => Err(IcePieError::VersionNotFound {
            table: name.to_string(),
            detail: format!(
                "the files of version {version} were deleted by VACUUM, which kept versions \
                 {kept} and later"
            ),
        }),
        _ => Ok(()),
    }
}

/// The coarsest modification times object stores report (ms): S3 gives whole seconds.
const STORE_TIME_GRANULARITY_MS: i64 = 1_000;

/// Margin for clocks of different machines that disagree (ms).
const CLOCK_SKEW_MS: i64 = 60_000;

/// A slice folder with no Delta log holds only what failed or abandoned first builds left:
/// files older than `cutoff` go. A name with no folder at all is not a slice.
async fn debris(
    shared: &SliceContext,
    name: &SliceName,
    rel: &str,
    cutoff: i64,
) -> Result<VacuumOutcome> {
    let store = shared.warehouse.store();
    let mut any = store.list(Some(&Path::from(rel)));
    if any.try_next().await?.is_none() {
        return Err(IcePieError::SliceNotFound(name.to_string()));
    }
    drop(any);
    let (files_deleted, bytes_deleted) = sweep(shared, rel, None, cutoff).await?;
    Ok(VacuumOutcome {
        slice: name.clone(),
        retained_from: 0,
        files_deleted,
        bytes_deleted,
        log_files_deleted: 0,
    })
}

/// Deletes the files under `rel` older than `cutoff` that `keep` does not hold, in batches
/// (one request per 1,000 files on S3); with `keep`, the Delta log is left alone. Returns the
/// files and bytes deleted.
async fn sweep(
    shared: &SliceContext,
    rel: &str,
    keep: Option<&HashSet<Path>>,
    cutoff: i64,
) -> Result<(i64, i64)> {
    let log_prefix = format!("{rel}_delta_log/");
    let store = shared.warehouse.store();
    let mut doomed: HashMap<Path, u64> = HashMap::new();
    let mut listing = store.list(Some(&Path::from(rel)));
    while let Some(object) = listing.try_next().await? {
        let path = object.location;
        let kept =
            keep.is_some_and(|k| path.as_ref().starts_with(&log_prefix) || k.contains(&path));
        if kept || object.last_modified.timestamp_millis() > cutoff {
            continue;
        }
        doomed.insert(path, object.size);
    }
    drop(listing);
    let paths: Vec<Path> = doomed.keys().cloned().collect();
    let mut deleted = store.delete_stream(futures::stream::iter(paths).map(Ok).boxed());
    let (mut files, mut bytes) = (0, 0);
    while let Some(result) = deleted.next().await {
        match result {
            Ok(path) => {
                files += 1;
                bytes += doomed
                    .get(&path)
                    .map_or(0, |s| i64::try_from(*s).unwrap_or(i64::MAX));
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((files, bytes))
}

/// The warehouse-relative path of a file of the table at `rel`.
fn table_file(rel: &str, file: &Path) -> Result<Path> {
    Path::parse(format!("{rel}{file}")).map_err(|e| IcePieError::CorruptMetadata {
        what: format!("table {rel}"),
        reason: format!("bad file path {file}: {e}"),
    })
}
