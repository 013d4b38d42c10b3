//! The warehouse's change journal: one empty object per change of a table,
//! `<warehouse>/_system/changes/<ms>-<random>-<table>`, where `<table>` is the table's folder
//! with `/` as `.` (`core.orders`, `slices.sales.daily`, `_system.refreshes.sales.daily`).
//!
//! It lets the view of every slice ([`crate::catalog::cards`]: `system.slices`, the
//! scheduler) learn what changed in the whole warehouse with one listing (the keys sort by
//! time), instead of reading every slice's state each time. Every commit made
//! through icepie (see [`super::tracked`]), every dropped table and every quarantine change
//! writes one entry, best effort: a reader also rescans everything now and then, so an entry
//! that failed to be written (or a change made by another engine) is seen late, not never.
//! Entries older than [`KEEP`] are deleted by that view's full scans (at most every ten
//! minutes).
//!
//! A process also keeps the changes it made itself ([`Journal::take_own`]): it sees them
//! whether or not their entries could be written.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use crate::error::{IcePieError, Result};

/// Folder of the journal.
pub(crate) const CHANGES_PATH: &str = "_system/changes/";

/// How far back a reader looks again at each read: entries written by a process whose clock
/// is behind (or whose write took long) are still found.
pub(crate) const WINDOW: Duration = Duration::from_secs(120);

/// How long entries are kept.
pub(crate) const KEEP: Duration = Duration::from_secs(3600);

/// Where one process notes the changes it makes to a warehouse: the journal, and its own
/// list of them.
#[derive(Debug, Clone)]
pub(crate) struct Journal {
    /// The warehouse's store (rooted at the warehouse).
    store: Arc<dyn ObjectStore>,
    /// The journal's folder, when the warehouse is a local directory read through no other
    /// store: listed by name alone (object_store's listing of a local folder converts and
    /// stats every entry, which a busy journal makes slow).
    local: Option<PathBuf>,
    own: Arc<Mutex<BTreeSet<String>>>,
}

impl Journal {
    /// The journal of the warehouse whose store (rooted at the warehouse) is `store`, and
    /// which is the local directory `local`, if it is one.
    pub(crate) fn new(store: Arc<dyn ObjectStore>, local: Option<PathBuf>) -> Self {
        Self {
            store,
            local: local.map(|root| root.join(CHANGES_PATH)),
            own: Arc::default(),
        }
    }

    /// A reader of what changes from now on, with the entries written up to now already
    /// read: what they record is seen by whatever is read after this returns.
    pub(crate) async fn reader_from_now(&self) -> Result<Reader> {
        let mut reader = self.reader_at(Position {
            cursor: Utc::now().timestamp_millis(),
            seen: BTreeSet::new(),
        });
        reader.changed().await?;
        Ok(reader)
    }

    /// A reader that goes on from `position`.
    pub(crate) fn reader_at(&self, position: Position) -> Reader {
        Reader {
            journal: self.clone(),
            at: position,
            quiet: None,
            listings: 0,
        }
    }

    /// Records that the table at `rel` (a warehouse folder, `core/orders/`) changed. Best
    /// effort: the change is made; readers rescan now and then.
    pub(crate) async fn note(&self, rel: &str) {
        let table = rel.trim_end_matches('/');
        self.own
            .lock()
            .expect("journal lock")
            .insert(format!("{table}/"));
        let key = format!(
            "{CHANGES_PATH}{:013}-{:08x}-{}",
            Utc::now().timestamp_millis().max(0),
            rand_u32(),
            table.replace('/', ".")
        );
        let _ = self
            .store
            .put(&Path::from(key), Vec::<u8>::new().into())
            .await;
    }

    /// The folders of the tables this process changed since the last call.
    pub(crate) fn take_own(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.own.lock().expect("journal lock"))
    }
}

fn rand_u32() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32
}

/// The time (ms) and table folder of a journal key's file name.
fn parse(name: &str) -> Option<(i64, String)> {
    let (ms, rest) = name.split_once('-')?;
    let (_, table) = rest.split_once('-')?;
    let ms = ms.parse().ok()?;
    Some((ms, format!("{}/", table.replace('.', "/"))))
}

/// Where a [`Reader`] is: what it will not return again. A view of the warehouse saved
/// with the position of the reader that kept it up to date can be taken up by another
/// process, which reads on from there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Position {
    /// Local time (ms) of the last read.
    cursor: i64,
    /// Entries read within the window before it.
    seen: BTreeSet<String>,
}

/// Reads the journal from where it last read, each entry once.
#[derive(Debug)]
pub(crate) struct Reader {
    journal: Journal,
    at: Position,
    /// A local journal folder's modification time as seen just before the last listing, if
    /// it was then older than [`SETTLED`]: while the folder keeps it, no entry was added or
    /// deleted since, and a read lists nothing.
    quiet: Option<SystemTime>,
    /// Listings made (a test counts them).
    listings: u64,
}

/// How old a local journal folder's modification time must be for a reader to trust that
/// an entry added after it would change it (file times tick coarsely).
const SETTLED: Duration = Duration::from_secs(1);

impl Reader {
    /// Where the reader is.
    pub(crate) fn position(&self) -> &Position {
        &self.at
    }

    /// The folders of the tables changed since the last read: one listing.
    pub(crate) async fn changed(&mut self) -> Result<BTreeSet<String>> {
        let now = Utc::now().timestamp_millis();
        // A local journal whose folder has not changed since the last listing: nothing new.
        // (Otherwise a busy journal's window, thousands of names, is listed at every read.)
        let modified = self.journal.local.as_deref().and_then(modified);
        if modified.is_some() && modified == self.quiet {
            self.at.cursor = now;
            return Ok(BTreeSet::new());
        }
        self.quiet = modified.filter(|m| m.elapsed().is_ok_and(|age| age >= SETTLED));
        self.listings += 1;
        let window = i64::try_from(WINDOW.as_millis()).unwrap_or(i64::MAX);
        let from = self.at.cursor.saturating_sub(window).max(0);
        let first = format!("{from:013}");
        let names = self.journal.names_from(&first).await?;
        // What was read before and is still within the window: not returned again, and not
        // parsed again (a busy journal holds thousands of entries in its window).
        let mut seen = self.at.seen.split_off(first.as_str());
        let mut out = BTreeSet::new();
        for name in names {
            if seen.contains(&name) {
                continue;
            }
            if let Some((ms, rel)) = parse(&name) {
                if ms >= from {
                    out.insert(rel);
                    seen.insert(name);
                }
            }
        }
        self.at = Position { cursor: now, seen };
        Ok(out)
    }
}

impl Journal {
    /// The names of the entries from `first` (a time as written in names) on.
    async fn names_from(&self, first: &str) -> Result<Vec<String>> {
        let first = first.to_string();
        if let Some(dir) = self.local.clone() {
            return tokio::task::spawn_blocking(move || list_local(&dir, &first))
                .await
                .map_err(|e| IcePieError::Warehouse {
                    location: CHANGES_PATH.into(),
                    reason: e.to_string(),
                })?;
        }
        let offset = Path::from(format!("{CHANGES_PATH}{first}"));
        let mut listing = self
            .store
            .list_with_offset(Some(&Path::from(CHANGES_PATH)), &offset);
        let mut out = Vec::new();
        while let Some(object) = listing.try_next().await? {
            if let Some(name) = object.location.filename() {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }
}

/// When the local folder `dir` was last changed (an entry added or deleted).
fn modified(dir: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(dir).and_then(|m| m.modified()).ok()
}

/// The names in the local folder `dir` that sort from `first` on.
fn list_local(dir: &std::path::Path, first: &str) -> Result<Vec<String>> {
    let err = |e: std::io::Error| IcePieError::Warehouse {
        location: dir.display().to_string(),
        reason: format!("cannot list the change journal: {e}"),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        if let Some(name) = entry.map_err(err)?.file_name().to_str() {
            // `<name>#<n>`: a local put's file before its rename.
            if name >= first && !name.contains('#') {
                out.push(name.to_string());
            }
        }
    }
    Ok(out)
}

impl Position {
    /// Local time (ms) of the last read.
    pub(crate) fn cursor(&self) -> i64 {
        self.cursor
    }
}

impl Journal {
    /// Deletes the entries older than [`KEEP`], in batches. Best effort.
    pub(crate) async fn prune(&self) {
        let keep = i64::try_from(KEEP.as_millis()).unwrap_or(i64::MAX);
        let cutoff = Utc::now().timestamp_millis().saturating_sub(keep);
        // Every name (a local folder is listed by name alone), not every store in key order.
        let old: Vec<Path> = self
            .names_from("")
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|name| parse(name).is_some_and(|(ms, _)| ms < cutoff))
            .map(|name| Path::from(format!("{CHANGES_PATH}{name}")))
            .collect();
        if old.is_empty() {
            return;
        }
        let store = &self.store;
        let mut deleted = store.delete_stream(futures::stream::iter(old).map(Ok).boxed());
        while deleted.next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn a_reader_finds_each_change_once() {
        finds_each_change_once(Journal::new(Arc::new(InMemory::new()), None)).await;
        // A local warehouse's journal is listed by name.
        let dir = tempfile::tempdir().unwrap();
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let journal = Journal::new(Arc::new(store), Some(dir.path().to_path_buf()));
        finds_each_change_once(journal).await;
    }

    async fn finds_each_change_once(journal: Journal) {
        journal.note("core/orders/").await;
        // Read before the reader started: seen by what it is started for.
        let mut reader = journal.reader_from_now().await.unwrap();
        assert!(reader.changed().await.unwrap().is_empty());
        journal.note("core/orders/").await;
        journal.note("slices/sales/daily/").await;
        let changed = reader.changed().await.unwrap();
        assert_eq!(
            changed,
            BTreeSet::from([
                "core/orders/".to_string(),
                "slices/sales/daily/".to_string()
            ])
        );
        assert!(reader.changed().await.unwrap().is_empty());
        journal.note("_system/refreshes/sales/daily/").await;
        // A reader taken up from a saved position returns only what came after it.
        let saved = serde_json::to_string(reader.position()).unwrap();
        let mut again = journal.reader_at(serde_json::from_str(&saved).unwrap());
        assert_eq!(
            reader.changed().await.unwrap(),
            BTreeSet::from(["_system/refreshes/sales/daily/".to_string()])
        );
        assert_eq!(
            again.changed().await.unwrap(),
            BTreeSet::from(["_system/refreshes/sales/daily/".to_string()])
        );
        // What this process changed, each once.
        assert_eq!(
            journal.take_own(),
            BTreeSet::from([
                "core/orders/".to_string(),
                "slices/sales/daily/".to_string(),
                "_system/refreshes/sales/daily/".to_string()
            ])
        );
        assert!(journal.take_own().is_empty());
    }

    #[tokio::test]
    async fn a_quiet_local_journal_is_not_listed_again_and_any_entry_ends_the_quiet() {
        let dir = tempfile::tempdir().unwrap();
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(store);
        let journal = Journal::new(store.clone(), Some(dir.path().to_path_buf()));
        journal.note("core/orders/").await;
        let mut reader = journal.reader_from_now().await.unwrap();
        // Once the folder's time is settled, reads list it no more while it stays.
        tokio::time::sleep(SETTLED + Duration::from_millis(100)).await;
        assert!(reader.changed().await.unwrap().is_empty());
        let listed = reader.listings;
        for _ in 0..3 {
            assert!(reader.changed().await.unwrap().is_empty());
        }
        assert_eq!(reader.listings, listed);
        // An entry ends the quiet, at once, even one named a minute back (a clock behind).
        let late = format!(
            "{CHANGES_PATH}{:013}-0000000a-core.t",
            Utc::now().timestamp_millis() - 60_000
        );
        store
            .put(&Path::from(late), Vec::<u8>::new().into())
            .await
            .unwrap();
        assert_eq!(
            reader.changed().await.unwrap(),
            BTreeSet::from(["core/t/".to_string()])
        );
        assert_eq!(reader.listings, listed + 1);
        // Right after a change the folder's time is too new to trust: reads list.
        journal.note("core/orders/").await;
        assert_eq!(
            reader.changed().await.unwrap(),
            BTreeSet::from(["core/orders/".to_string()])
        );
        assert!(reader.changed().await.unwrap().is_empty());
        assert_eq!(reader.listings, listed + 3);
    }

    #[tokio::test]
    async fn late_entries_within_the_window_are_found_and_old_ones_pruned() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let mut reader = Journal::new(store.clone(), None)
            .reader_from_now()
            .await
            .unwrap();
        let now = Utc::now().timestamp_millis();
        // Written by a process whose clock is a minute behind.
        let late = format!("{CHANGES_PATH}{:013}-0000000a-core.t", now - 60_000);
        store
            .put(&Path::from(late), Vec::<u8>::new().into())
            .await
            .unwrap();
        let ancient = format!("{CHANGES_PATH}{:013}-0000000b-core.u", now - 7_200_000);
        store
            .put(&Path::from(ancient), Vec::<u8>::new().into())
            .await
            .unwrap();
        assert_eq!(
            reader.changed().await.unwrap(),
            BTreeSet::from(["core/t/".to_string()])
        );
        Journal::new(store.clone(), None).prune().await;
        let left: Vec<_> = store
            .list(Some(&Path::from(CHANGES_PATH)))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(left.len(), 1);
    }
}
