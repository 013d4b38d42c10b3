//! Where icepie keeps its data: one warehouse location holding Delta Lake tables.
//!
//! ```text
//! <warehouse>/core/<table>/            Delta table, append-only (delta.appendOnly = true)
//! <warehouse>/slices/<domain>/<name>/  Delta table; one commit per refresh, replace, rollback,
//!                                      freeze and thaw
//! <warehouse>/_system/refreshes/<domain>/<name>/  Delta table: append-only log of a slice's
//!                                                  refresh attempts
//! ```
//!
//! Paths are only ever built from names validated by [`names`], so nothing is read or written
//! outside the warehouse root. Locations users name (files to load, `COPY` targets) are judged
//! by `location` on what they will actually open. The warehouse is the only source of truth:
//! nothing about tables or slices is kept in memory that another process could not read back
//! from here. Tables loaded at their latest version are kept to be brought up to date cheaply,
//! but every load checks the log first, so what another process committed is always seen.

mod cache;
pub(crate) mod clock;
pub(crate) mod copy;
pub(crate) mod journal;
pub(crate) mod location;
pub(crate) mod names;
pub(crate) mod tracked;

use cache::Cached;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deltalake::kernel::EagerSnapshot;
use deltalake::logstore::LogStoreRef;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError, ObjectStore};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::ObjectStoreExt;
use url::Url;

use crate::error::{IcePieError, Result};
use names::SliceName;
use tracked::TrackedStore;

/// Folder of the refresh logs, one Delta table per slice under `<domain>/<name>/`.
pub(crate) const REFRESHES_PATH: &str = "_system/refreshes/";
/// Folder of the core tables.
pub(crate) const CORE_DIR: &str = "core";
/// Folder of the slice domains.
pub(crate) const SLICES_DIR: &str = "slices";

/// Table property that stops delta-rs from deleting old commit files after each commit.
///
/// Log retention in a warehouse is decided by icepie, not by age: the core keeps every
/// version's log (its whole history can be read with `core_at`); a slice's log and its refresh
/// log are trimmed by VACUUM to what the retained versions need (see `slice::vacuum`). Delta's
/// own age-based clean-up (`delta.logRetentionDuration`, 30 days) would delete commits that
/// time travel still needs, and lists the whole log on every commit to do it.
pub(crate) const NO_EXPIRED_LOG_CLEANUP: (&str, Option<&str>) =
    ("delta.enableExpiredLogCleanup", Some("false"));

/// Table property that makes delta-rs write a checkpoint every 10 commits on slices and
/// refresh logs (Delta's default is 100).
///
/// A process opening a table reads its latest checkpoint and every commit after it, so the
/// interval bounds what a first query of a slice costs however long its history: a slice
/// commits once per refresh and its checkpoint holds only the files of one version, so
/// checkpoints are small. Core tables keep Delta's default: each ingest adds files and a
/// checkpoint lists them all.
pub(crate) const FREQUENT_CHECKPOINTS: (&str, Option<&str>) =
    ("delta.checkpointInterval", Some("10"));

/// Default warehouse location when none is given.
pub const DEFAULT_LOCATION: &str = "./icepie-data";

/// Where one write to a table starts: see [`Warehouse::write_base`].
pub(crate) struct WriteBase {
    /// The table's log store, writing through `tracked`.
    pub log_store: LogStoreRef,
    /// The version the write commits on top of; `None` to create the table.
    pub snapshot: Option<EagerSnapshot>,
    /// What the write created, to take back if it fails.
    pub tracked: Arc<TrackedStore>,
    /// The table's URL.
    table_url: Url,
    /// The table's folder in `tracked`.
    table_path: Path,
    /// The table's folder on local disk, when the warehouse is a local directory.
    local_dir: Option<std::path::PathBuf>,
}

/// One warehouse location and the means to open the Delta tables in it.
#[derive(Debug, Clone)]
pub(crate) struct Warehouse {
    root: Url,
    custom_store: Option<Arc<dyn ObjectStore>>,
    storage_options: HashMap<String, String>,
    root_store: Arc<dyn ObjectStore>,
    /// The store with "/" at the root of the location's object store (as delta-rs wants one).
    base_store: Arc<dyn ObjectStore>,
    /// Tables loaded at their latest version, brought up to date incrementally; at most
    /// [`cache::CACHED_TABLES`], the least recently used going first.
    latest: Arc<Mutex<HashMap<String, Cached>>>,
    /// The store's clock, by which leases and running markers expire.
    clock: Arc<clock::StoreClock>,
    /// Where changes are noted.
    journal: journal::Journal,
}

impl Warehouse {
    /// Opens (creating a local directory if needed) the warehouse at `location`: a local path
    /// or a URL (`file://`, and `s3://`, `gs://`, `az://` when built with those features).
    ///
    /// `custom_store`, when given, is used for every read and write; it must have "/" at the
    /// root of the URL's object store (for a local path, the file system root).
    pub(crate) fn open(
        location: &str,
        custom_store: Option<Arc<dyn ObjectStore>>,
        storage_options: HashMap<String, String>,
    ) -> Result<Self> {
        let err = |reason: String| IcePieError::Warehouse {
            location: location.to_string(),
            reason,
        };
        let mut root = if location.contains("://") {
            Url::parse(location).map_err(|e| err(format!("not a valid URL: {e}")))?
        } else {
            let path = std::path::Path::new(if location.is_empty() { "." } else { location });
            std::fs::create_dir_all(path).map_err(|e| err(format!("cannot create it: {e}")))?;
            let path = path
                .canonicalize()
                .map_err(|e| err(format!("cannot resolve it: {e}")))?;
            Url::from_directory_path(&path)
                .map_err(|_| err("not an absolute directory path".to_string()))?
        };
        if root.scheme() == "file" {
            let path = root
                .to_file_path()
                .map_err(|_| err("not a local path".to_string()))?;
            std::fs::create_dir_all(&path).map_err(|e| err(format!("cannot create it: {e}")))?;
        }
        if !root.path().ends_with('/') {
            root.set_path(&format!("{}/", root.path()));
        }
        let mut builder = DeltaTableBuilder::from_url(root.clone())
            .map_err(|e| err(e.to_string()))?
            .with_storage_options(storage_options.clone());
        if let Some(store) = &custom_store {
            builder = builder.with_storage_backend(store.clone(), root.clone());
        }
        let log_store = builder
            .build_storage()
            .map_err(|e| err(format!("no object store for this location: {e}")))?;
        let root_store = log_store.object_store(None);
        let base_store = log_store.root_object_store(None);
        let local = match (&custom_store, root.scheme()) {
            (None, "file") => root.to_file_path().ok(),
            _ => None,
        };
        Ok(Self {
            root,
            custom_store,
            storage_options,
            base_store,
            latest: Arc::default(),
            clock: Arc::default(),
            journal: journal::Journal::new(root_store.clone(), local),
            root_store,
        })
    }

    /// Now by the clock of the warehouse's store (ms since the epoch): what renewals of
    /// leases and running markers are stamped with, whatever this process's clock says.
    pub(crate) async fn store_now_ms(&self) -> i64 {
        self.clock.now_ms(self.root_store.as_ref()).await
    }

    /// Where changes to the warehouse are noted.
    pub(crate) fn journal(&self) -> &journal::Journal {
        &self.journal
    }

    /// The warehouse root URL (ends with `/`).
    pub(crate) fn url(&self) -> &Url {
        &self.root
    }

    /// The object store of the warehouse, with paths relative to its root.
    pub(crate) fn store(&self) -> Arc<dyn ObjectStore> {
        self.root_store.clone()
    }

    /// Relative path of a core table.
    pub(crate) fn core_path(name: &str) -> String {
        format!("{CORE_DIR}/{name}/")
    }

    /// Relative path of a slice.
    pub(crate) fn slice_path(name: &SliceName) -> String {
        format!("{SLICES_DIR}/{}/{}/", name.domain, name.name)
    }

    /// Relative path of a slice's refresh log.
    pub(crate) fn refreshes_path(name: &SliceName) -> String {
        format!("{REFRESHES_PATH}{}/{}/", name.domain, name.name)
    }

    /// A Delta table builder for the table at `rel` (a path built by this module).
    pub(crate) fn builder(&self, rel: &str) -> Result<DeltaTableBuilder> {
        self.builder_on(rel, self.custom_store.clone())
    }

    fn builder_on(
        &self,
        rel: &str,
        store: Option<Arc<dyn ObjectStore>>,
    ) -> Result<DeltaTableBuilder> {
        let url = self.root.join(rel).map_err(|e| IcePieError::Warehouse {
            location: self.root.to_string(),
            reason: format!("bad table path {rel}: {e}"),
        })?;
        let mut builder = DeltaTableBuilder::from_url(url.clone())?
            .with_storage_options(self.storage_options.clone());
        if let Some(store) = store {
            builder = builder.with_storage_backend(store, url);
        }
        Ok(builder)
    }

    /// An unloaded handle on the table at `rel`, for creating it.
    pub(crate) fn handle(&self, rel: &str) -> Result<DeltaTable> {
        Ok(self.builder(rel)?.build()?)
    }

    /// What a write to the table at `rel` starts from: a log store that tracks the files the
    /// write creates (so that a failed write can take back exactly those, see [`tracked`])
    /// and, when the table exists (`existing`), the snapshot the write commits on top of.
    pub(crate) fn write_base(&self, rel: &str, existing: Option<&DeltaTable>) -> Result<WriteBase> {
        let inner = self
            .custom_store
            .clone()
            .unwrap_or_else(|| self.base_store.clone());
        let tracked = Arc::new(TrackedStore::new(inner).with_journal(self.journal.clone(), rel));
        let log_store = self
            .builder_on(rel, Some(tracked.clone()))?
            .build()?
            .log_store();
        let snapshot = match existing {
            Some(t) => Some(t.snapshot()?.snapshot().clone()),
            None => None,
        };
        let table_url = log_store.config().location().clone();
        let table_path =
            Path::from_url_path(table_url.path()).map_err(|e| IcePieError::Warehouse {
                location: self.root.to_string(),
                reason: format!("bad table path {rel}: {e}"),
            })?;
        let local_dir = match (&self.custom_store, table_url.scheme()) {
            (None, "file") => table_url.to_file_path().ok(),
            _ => None,
        };
        Ok(WriteBase {
            log_store,
            snapshot,
            tracked,
            table_url,
            table_path,
            local_dir,
        })
    }

    /// The table at `rel` at its latest version, loaded anew through a store that tracks what
    /// a write on it creates (for commits made through the table's own operations).
    pub(crate) async fn load_tracked(
        &self,
        rel: &str,
    ) -> Result<Option<(DeltaTable, Arc<TrackedStore>)>> {
        let inner = self
            .custom_store
            .clone()
            .unwrap_or_else(|| self.base_store.clone());
        let tracked = Arc::new(TrackedStore::new(inner).with_journal(self.journal.clone(), rel));
        match self.builder_on(rel, Some(tracked.clone()))?.load().await {
            Ok(t) => Ok(Some((t, tracked))),
            Err(e) if no_table(&e) => Ok(None),
            Err(_) if self.log_start(rel).await? != Some(true) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// What a write through `tracked` ended with: `result`, or, when the write failed after
    /// its commit landed (a failed checkpoint, a failed read-back), the table at the version
    /// it committed. Only when even that cannot be read is it an error, which says the
    /// change was committed so that nobody makes it twice.
    pub(crate) async fn landed(
        &self,
        rel: &str,
        tracked: &TrackedStore,
        result: std::result::Result<DeltaTable, DeltaTableError>,
    ) -> Result<DeltaTable> {
        // A commit onto a table another process dropped meanwhile is withdrawn: left there,
        // it would be a log that starts at no version.
        if let Some(version) = tracked.committed_version() {
            if self.dropped_under(rel, version).await.unwrap_or(false) {
                tracked.withdraw().await;
                self.latest
                    .lock()
                    .expect("table cache")
                    .retain(|cached, _| cached != rel);
                return Err(IcePieError::DroppedMeanwhile {
                    table: table_name(rel),
                });
            }
        }
        let error = match result {
            Ok(table) => return Ok(table),
            Err(e) => e,
        };
        let Some(version) = tracked.committed_version() else {
            return Err(error.into());
        };
        match self.load_anew(rel, Some(version)).await {
            Ok(Some(table)) => Ok(table),
            other => Err(IcePieError::Warehouse {
                location: self.root.to_string(),
                reason: format!(
                    "the change was committed as version {version} of {rel}, but could not be \
                     read back ({error}{}); it is there: do not make it again",
                    match other {
                        Err(e) => format!("; {e}"),
                        _ => String::new(),
                    }
                ),
            }),
        }
    }

    /// Names of the folders directly under `rel` that are valid names.
    pub(crate) async fn list_children(&self, rel: &str) -> Result<Vec<String>> {
        let listing = self
            .root_store
            .list_with_delimiter(Some(&Path::from(rel)))
            .await?;
        let mut out: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|n| names::validate_name(n).is_ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// Deletes every object under `rel`, the Delta log first so that the table stops existing
    /// for readers before its data files go.
    ///
    /// The log's start goes first, one object at a time and in order: the checkpoint hint,
    /// the checkpoints (oldest first), then commit 0. A drop stopped before the last of them
    /// leaves a table readable at its latest version; from then on what is left is no table
    /// (see [`Warehouse::log_start`]), so the rest goes in batches (S3's DeleteObjects).
    pub(crate) async fn delete_prefix(&self, rel: &str) -> Result<()> {
        self.latest
            .lock()
            .expect("table cache")
            .retain(|cached, _| !cached.starts_with(rel));
        let (mut start, rest): (Vec<Path>, Vec<Path>) =
            self.log_files(rel).await?.into_iter().partition(|p| {
                let name = p.filename().unwrap_or_default();
                name == "_last_checkpoint"
                    || name.contains(".checkpoint")
                    || commit_version(name) == Some(0)
            });
        start.sort_by_key(|p| {
            let name = p.filename().unwrap_or_default();
            (
                name != "_last_checkpoint",
                commit_version(name).is_some(),
                p.to_string(),
            )
        });
        for p in start {
            match self.root_store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        delete_all(self.root_store.as_ref(), rest).await?;
        // The table no longer exists for readers, whatever becomes of its files.
        self.journal.note(rel).await;
        let files: Vec<Path> = self
            .root_store
            .list(Some(&Path::from(rel)))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        delete_all(self.root_store.as_ref(), files).await
    }

    /// The latest version of the table at `rel`, `None` when it has no log.
    ///
    /// Found from the latest checkpoint onward, never by walking the log from version 0: old
    /// commit files may be gone (Delta's log clean-up, another engine's, or VACUUM's). One GET
    /// of `_last_checkpoint` and one listing of the commits after it.
    pub(crate) async fn latest_version(&self, rel: &str) -> Result<Option<i64>> {
        let log = format!("{rel}_delta_log/");
        let hint = Path::from(format!("{log}_last_checkpoint"));
        let checkpoint = match self.root_store.get(&hint).await {
            Ok(got) => checkpoint_version(&got.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let offset = Path::from(format!("{log}{:020}", checkpoint.unwrap_or(0)));
        let mut listing = self
            .root_store
            .list_with_offset(Some(&Path::from(log.as_str())), &offset);
        let mut latest = checkpoint;
        // Without a checkpoint the log must start at version 0: else it is what a dropped
        // table left (see [`Warehouse::log_start`]), no table.
        let mut start = checkpoint.is_some();
        while let Some(object) = listing.try_next().await? {
            let name = object.location.filename().unwrap_or_default();
            start |= name.contains(".checkpoint");
            if let Some(v) = commit_version(name) {
                start |= v == 0;
                latest = Some(latest.map_or(v, |l| l.max(v)));
            }
        }
        Ok(latest.filter(|_| start))
    }

    /// True when a Delta log exists under `rel`.
    pub(crate) async fn has_log(&self, rel: &str) -> Result<bool> {
        let log = Path::from(format!("{rel}_delta_log"));
        let mut listing = self.root_store.list(Some(&log));
        Ok(listing.try_next().await?.is_some())
    }

    /// What the Delta log under `rel` starts from: `None` when there is no log, `Some(true)`
    /// when a table can be read from it (its first commit or a checkpoint), `Some(false)` when
    /// it holds only what a dropped table left: commits that do not start at version 0 and no
    /// checkpoint, as a drop stopped half-way, or a commit another process made after a drop
    /// removed the log, leaves. Such remains are no table. One listing of the log.
    pub(crate) async fn log_start(&self, rel: &str) -> Result<Option<bool>> {
        let files = self.log_files(rel).await?;
        Ok((!files.is_empty()).then(|| starts_a_table(&files)))
    }

    /// Every file of the Delta log under `rel` (one listing).
    async fn log_files(&self, rel: &str) -> Result<Vec<Path>> {
        let log = Path::from(format!("{rel}_delta_log"));
        Ok(self
            .root_store
            .list(Some(&log))
            .map_ok(|m| m.location)
            .try_collect()
            .await?)
    }

    /// Deletes the log files a dropped table left under `rel` (see [`Warehouse::log_start`]),
    /// so that a table can be created there; returns true when a table is there (then, as
    /// when nothing is, nothing is deleted). One listing of the log. Data files are left to
    /// VACUUM: a table being created there by another process may be writing its own.
    pub(crate) async fn clear_remains(&self, rel: &str) -> Result<bool> {
        let files = self.log_files(rel).await?;
        if files.is_empty() || starts_a_table(&files) {
            return Ok(!files.is_empty());
        }
        delete_all(self.root_store.as_ref(), files).await?;
        Ok(false)
    }

    /// True when the table at `rel` was dropped while a write committed `version` to it: the
    /// log holds nothing of an earlier version (a VACUUM of old commits always keeps the
    /// checkpoint the latest versions are read from). One HEAD when it was not.
    async fn dropped_under(&self, rel: &str, version: i64) -> Result<bool> {
        if version == 0 {
            return Ok(false);
        }
        let previous = Path::from(format!("{rel}_delta_log/{:020}.json", version - 1));
        match self.root_store.head(&previous).await {
            Ok(_) => return Ok(false),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // Commits, checkpoints and their checksums all start with their version's 20 digits.
        let earlier = self.log_files(rel).await?.into_iter().any(|p| {
            let name = p.filename().unwrap_or_default();
            name.get(..20)
                .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<i64>().ok())
                .is_some_and(|v| v < version)
        });
        Ok(!earlier)
    }
}

/// True when the Delta log files `files` hold a start to read a table from: its first
/// commit or a checkpoint.
fn starts_a_table(files: &[Path]) -> bool {
    files.iter().any(|p| {
        let name = p.filename().unwrap_or_default();
        commit_version(name) == Some(0) || name.contains(".checkpoint")
    })
}

/// Deletes `paths` in batches (one request per batch where the store has one, as S3's
/// DeleteObjects); paths already gone are no error.
async fn delete_all(store: &dyn ObjectStore, paths: Vec<Path>) -> Result<()> {
    if paths.is_empty() {
        return Ok(());
    }
    let mut deleted = store.delete_stream(futures::stream::iter(paths).map(Ok).boxed());
    while let Some(result) = deleted.next().await {
        match result {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// How a table at `rel` is named in messages: `slice d.s` or `core table t`.
fn table_name(rel: &str) -> String {
    let parts: Vec<&str> = rel.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        [CORE_DIR, name] => format!("core table {name}"),
        [SLICES_DIR, domain, name] => format!("slice {domain}.{name}"),
        _ => rel.to_string(),
    }
}

/// True when a load failed because there is no table at all: no log, or (on a local disk)
/// not even its folder, as when another process is creating it at this very moment.
fn no_table(e: &DeltaTableError) -> bool {
    match e {
        DeltaTableError::NotATable(_) | DeltaTableError::InvalidTableLocation(_) => true,
        // delta-rs does not re-export the kernel's error type: its text is all there is
        // (pinned by `tests::a_missing_folder_is_no_table`).
        DeltaTableError::KernelError(k) => k.to_string().starts_with("Invalid table location"),
        _ => false,
    }
}

/// The version of a commit file's name (`00000000000000000042.json`).
fn commit_version(file: &str) -> Option<i64> {
    let digits = file.strip_suffix(".json")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The version `_last_checkpoint` names; `None` when it cannot be read (it is only a hint).
fn checkpoint_version(hint: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(hint)
        .ok()?
        .get("version")?
        .as_i64()
}

/// Size of one version of a table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Data files.
    pub files: i64,
    /// Rows (from the files' statistics).
    pub rows: i64,
    /// Bytes of data files.
    pub bytes: i64,
}

/// The Delta table id (`metaData.id`) of `table`: a table created again under the same name
/// does not share it.
pub(crate) fn table_id(table: &DeltaTable) -> Option<String> {
    Some(metadata_field(table, "id")?.as_str()?.to_string())
}

/// When `table` was created (`metaData.createdTime`, ms since the epoch).
pub(crate) fn table_created(table: &DeltaTable) -> Option<i64> {
    metadata_field(table, "createdTime")?.as_i64()
}

fn metadata_field(table: &DeltaTable, field: &str) -> Option<serde_json::Value> {
    let state = table.snapshot().ok()?;
    let metadata = serde_json::to_value(state.metadata()).ok()?;
    metadata.get(field).cloned()
}

/// The size of the loaded version of `table`, from its Delta log alone.
pub(crate) fn table_stats(table: &DeltaTable) -> Result<TableStats> {
    let mut stats = TableStats::default();
    for file in table.snapshot()?.log_data().iter() {
        stats.files += 1;
        stats.bytes += file.size();
        stats.rows += file.num_records().unwrap_or(0) as i64;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_files_and_checkpoint_hints_give_versions() {
        assert_eq!(commit_version("00000000000000000042.json"), Some(42));
        assert_eq!(
            commit_version("00000000000000000042.checkpoint.parquet"),
            None
        );
        assert_eq!(commit_version("_last_checkpoint"), None);
        assert_eq!(commit_version("42.json"), None);
        assert_eq!(checkpoint_version(br#"{"version":99,"size":12}"#), Some(99));
        assert_eq!(checkpoint_version(b"not json"), None);
    }

    #[tokio::test]
    async fn a_missing_folder_is_no_table() {
        let dir = tempfile::tempdir().unwrap();
        let w = Warehouse::open(dir.path().to_str().unwrap(), None, HashMap::new()).unwrap();
        assert!(w.load("core/nothing/", None).await.unwrap().is_none());
        let url = Url::from_directory_path(dir.path().join("gone")).unwrap();
        let err = DeltaTableBuilder::from_url(url)
            .unwrap()
            .load()
            .await
            .unwrap_err();
        assert!(no_table(&err), "{err:?}");
    }
}
