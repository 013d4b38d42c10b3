//! The warehouse's change journal: one empty object per change of a table,
//! `<warehouse>/_system/changes/<ms>-<random>-<table>`, where `<table>` is the table's folder
//! with `/` as `.` (`core.orders`, `slices.sales.daily`, `_system.refreshes.sales.daily`).
//!
//! It lets a scheduler learn what changed in the whole warehouse with one listing (the keys
//! sort by time), instead of reading every slice's state on every tick. Every commit made
//! through icepie (see [`super::tracked`]), every dropped table and every quarantine change
//! writes one entry, best effort: a reader also rescans everything now and then, so an entry
//! that failed to be written (or a change made by another engine) is seen late, not never.
//! Entries older than [`KEEP`] are deleted by the schedulers' rescans.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::error::Result;

/// Folder of the journal.
pub(crate) const CHANGES_PATH: &str = "_system/changes/";

/// How far back a reader looks again at each read: entries written by a process whose clock
/// is behind (or whose write took long) are still found.
pub(crate) const WINDOW: Duration = Duration::from_secs(120);

/// How long entries are kept.
pub(crate) const KEEP: Duration = Duration::from_secs(3600);

/// Records that the table at `rel` (a warehouse folder, `core/orders/`) changed. Best effort:
/// the change is made; readers rescan now and then.
pub(crate) async fn note(store: &dyn ObjectStore, rel: &str) {
    let table = rel.trim_end_matches('/').replace('/', ".");
    let key = format!(
        "{CHANGES_PATH}{:013}-{:08x}-{table}",
        Utc::now().timestamp_millis().max(0),
        rand_u32()
    );
    let _ = store.put(&Path::from(key), Vec::<u8>::new().into()).await;
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

/// Reads the journal from where it last read, each entry once.
#[derive(Debug)]
pub(crate) struct Reader {
    store: Arc<dyn ObjectStore>,
    /// Local time (ms) of the last read.
    cursor: i64,
    /// Entries read within the window, not to be returned twice.
    seen: BTreeSet<String>,
}

impl Reader {
    /// A reader of what changes from now on.
    pub(crate) fn from_now(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            store,
            cursor: Utc::now().timestamp_millis(),
            seen: BTreeSet::new(),
        }
    }

    /// The folders of the tables changed since the last read: one listing.
    pub(crate) async fn changed(&mut self) -> Result<BTreeSet<String>> {
        let now = Utc::now().timestamp_millis();
        let window = i64::try_from(WINDOW.as_millis()).unwrap_or(i64::MAX);
        let from = self.cursor.saturating_sub(window).max(0);
        let offset = Path::from(format!("{CHANGES_PATH}{from:013}"));
        let mut listing = self
            .store
            .list_with_offset(Some(&Path::from(CHANGES_PATH)), &offset);
        let mut out = BTreeSet::new();
        let mut seen = BTreeSet::new();
        while let Some(object) = listing.try_next().await? {
            let Some(name) = object.location.filename() else {
                continue;
            };
            let Some((ms, rel)) = parse(name) else {
                continue;
            };
            if ms < from {
                continue;
            }
            if !self.seen.contains(name) {
                out.insert(rel);
            }
            seen.insert(name.to_string());
        }
        self.seen = seen;
        self.cursor = now;
        Ok(out)
    }
}

/// Deletes the entries older than [`KEEP`], in batches. Best effort.
pub(crate) async fn prune(store: &Arc<dyn ObjectStore>) {
    let keep = i64::try_from(KEEP.as_millis()).unwrap_or(i64::MAX);
    let cutoff = Utc::now().timestamp_millis().saturating_sub(keep);
    let old: Vec<Path> = store
        .list(Some(&Path::from(CHANGES_PATH)))
        // Not every store lists in key order (a local directory does not).
        .try_filter(|o| {
            let old = o
                .location
                .filename()
                .and_then(parse)
                .is_some_and(|(ms, _)| ms < cutoff);
            std::future::ready(old)
        })
        .map_ok(|o| o.location)
        .try_collect()
        .await
        .unwrap_or_default();
    if old.is_empty() {
        return;
    }
    let mut deleted = store.delete_stream(futures::stream::iter(old).map(Ok).boxed());
    while deleted.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn a_reader_finds_each_change_once() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let mut reader = Reader::from_now(store.clone());
        assert!(reader.changed().await.unwrap().is_empty());
        note(store.as_ref(), "core/orders/").await;
        note(store.as_ref(), "slices/sales/daily/").await;
        let changed = reader.changed().await.unwrap();
        assert_eq!(
            changed,
            BTreeSet::from([
                "core/orders/".to_string(),
                "slices/sales/daily/".to_string()
            ])
        );
        assert!(reader.changed().await.unwrap().is_empty());
        note(store.as_ref(), "_system/refreshes/sales/daily/").await;
        assert_eq!(
            reader.changed().await.unwrap(),
            BTreeSet::from(["_system/refreshes/sales/daily/".to_string()])
        );
    }

    #[tokio::test]
    async fn late_entries_within_the_window_are_found_and_old_ones_pruned() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let mut reader = Reader::from_now(store.clone());
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
        prune(&store).await;
        let left: Vec<_> = store
            .list(Some(&Path::from(CHANGES_PATH)))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(left.len(), 1);
    }
}
