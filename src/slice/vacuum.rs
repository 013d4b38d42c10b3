//! `VACUUM SLICE` and `VACUUM SLICES`: deleting the files of a slice that no retained version
//! references.
//!
//! A version is retained when it is one of the latest `icepie.retain_versions`, or when it
//! was the current version less than `icepie.vacuum_grace` ago: a reader that planned a query
//! on it a moment before a refresh committed still finds its files. A file is deleted only
//! when no retained version references it *and* it is older than the grace period, so the
//! files of a refresh still being written are never touched. Nothing is committed (the Delta
//! log is unchanged) and only the slice's own folder is listed: the core is never vacuumed.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStoreExt;

use super::meta;
use crate::catalog::Shared;
use crate::error::{IcePieError, Result};
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
}

/// Vacuums one slice with the current settings.
pub(crate) async fn vacuum(shared: &Shared, name: &SliceName) -> Result<VacuumOutcome> {
    let options = shared.options();
    vacuum_with(
        shared,
        name,
        options.retain_versions,
        options.vacuum_grace.0,
    )
    .await
}

async fn vacuum_with(
    shared: &Shared,
    name: &SliceName,
    retain_versions: usize,
    grace: Duration,
) -> Result<VacuumOutcome> {
    let rel = Warehouse::slice_path(name);
    let table = shared
        .warehouse
        .load(&rel, None)
        .await?
        .ok_or_else(|| IcePieError::SliceNotFound(name.to_string()))?;
    let latest = table.version().unwrap_or_default() as i64;
    let now = Utc::now().timestamp_millis();
    let cutoff = now - i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
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
    let log_prefix = format!("{rel}_delta_log/");
    let store = shared.warehouse.store();
    let mut doomed: Vec<(Path, u64)> = Vec::new();
    let mut listing = store.list(Some(&Path::from(rel.as_str())));
    while let Some(object) = listing.try_next().await? {
        let path = object.location;
        if path.as_ref().starts_with(&log_prefix)
            || keep.contains(&path)
            || object.last_modified.timestamp_millis() > cutoff
        {
            continue;
        }
        doomed.push((path, object.size));
    }
    drop(listing);
    let mut outcome = VacuumOutcome {
        slice: name.clone(),
        retained_from: oldest,
        files_deleted: 0,
        bytes_deleted: 0,
    };
    for (path, size) in doomed {
        match store.delete(&path).await {
            Ok(()) => {
                outcome.files_deleted += 1;
                outcome.bytes_deleted += i64::try_from(size).unwrap_or(i64::MAX);
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(outcome)
}

/// The warehouse-relative path of a file of the table at `rel`.
fn table_file(rel: &str, file: &Path) -> Result<Path> {
    Path::parse(format!("{rel}{file}")).map_err(|e| IcePieError::CorruptMetadata {
        what: format!("table {rel}"),
        reason: format!("bad file path {file}: {e}"),
    })
}
