//! The process's cache of tables loaded at their latest version: brought up to date from
//! where they were with one listing of the log, loaded anew when their log was replaced, the
//! least recently used going first beyond [`CACHED_TABLES`].

use std::collections::HashMap;

use deltalake::DeltaTable;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt};

use super::{commit_version, no_table, Warehouse};
use crate::error::Result;

/// Tables a process keeps loaded at most (each holds its version's file list).
pub(super) const CACHED_TABLES: usize = 256;

/// A table as last loaded, and the commit file its state ends with.
#[derive(Debug, Clone)]
pub(super) struct Cached {
    table: DeltaTable,
    commit: ObjectMeta,
    /// When it was last used, in uses of the cache.
    used: u64,
}

/// Counts uses of the table caches, for least-recently-used eviction.
static USES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn next_use() -> u64 {
    USES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Warehouse {
    /// Loads the table at `rel` at its latest version (or `version`); `None` if there is none.
    ///
    /// A table loaded at its latest version before is brought up to date from where it was
    /// (reading only the commits since), unless its log was replaced meanwhile: a table
    /// dropped and created again, by any process, is loaded anew.
    pub(crate) async fn load(&self, rel: &str, version: Option<i64>) -> Result<Option<DeltaTable>> {
        if version.is_some() {
            return self.load_anew(rel, version).await;
        }
        let cached = self
            .latest
            .lock()
            .expect("table cache")
            .get_mut(rel)
            .map(|c| {
                c.used = next_use();
                c.clone()
            });
        if let Some(cached) = cached {
            if let Ok(Some(table)) = self.bring_up_to_date(rel, cached).await {
                return Ok(Some(table));
            }
            self.latest.lock().expect("table cache").remove(rel);
        }
        let table = self.load_anew(rel, None).await?;
        if let Some(t) = &table {
            self.remember(rel, t).await;
        }
        Ok(table)
    }

    pub(super) async fn load_anew(
        &self,
        rel: &str,
        version: Option<i64>,
    ) -> Result<Option<DeltaTable>> {
        let mut builder = self.builder(rel)?;
        if let Some(v) = version {
            builder = builder.with_version(v as _);
        }
        match builder.load().await {
            Ok(t) => Ok(Some(t)),
            Err(e) if no_table(&e) => Ok(None),
            // Which error a missing table gives depends on the store; no log, or only what a
            // dropped table left, means no table.
            Err(_) if self.log_start(rel).await? != Some(true) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn commit_path(rel: &str, version: Option<u64>) -> Option<Path> {
        version.map(|v| Path::from(format!("{rel}_delta_log/{v:020}.json")))
    }

    /// Keeps `table`, loaded at its latest version, with the identity of its last commit.
    async fn remember(&self, rel: &str, table: &DeltaTable) {
        let Some(path) = Self::commit_path(rel, table.version()) else {
            return;
        };
        if let Ok(commit) = self.root_store.head(&path).await {
            self.keep(rel, table, commit);
        }
    }

    fn keep(&self, rel: &str, table: &DeltaTable, commit: ObjectMeta) {
        let cached = Cached {
            table: table.clone(),
            commit,
            used: next_use(),
        };
        let mut latest = self.latest.lock().expect("table cache");
        latest.insert(rel.to_string(), cached);
        evict_least_recent(&mut latest, CACHED_TABLES, |c| c.used);
    }

    /// `cached` brought to the latest version; `None` when its log is no longer the same.
    ///
    /// One listing of the log from the cached commit on answers both questions: the commit
    /// must still be there, unchanged (a table dropped and created again has a new one), and
    /// any later commit means there is more to read. A table nobody changed costs that one
    /// request, whatever its history.
    async fn bring_up_to_date(&self, rel: &str, cached: Cached) -> Result<Option<DeltaTable>> {
        let Some(path) = Self::commit_path(rel, cached.table.version()) else {
            return Ok(None);
        };
        let log = Path::from(format!("{rel}_delta_log"));
        // "…N.jso" sorts just before "…N.json" and after every earlier log file.
        let name = path.as_ref();
        let offset = Path::from(&name[..name.len() - 1]);
        let mut listing = self.root_store.list_with_offset(Some(&log), &offset);
        let before = cached.table.version().unwrap_or_default() as i64;
        let (mut same, mut newest) = (false, None::<(i64, ObjectMeta)>);
        while let Some(object) = listing.try_next().await? {
            if object.location == path {
                same = same_object(&object, &cached.commit);
            } else if let Some(v) = object.location.filename().and_then(commit_version) {
                if v > before && newest.as_ref().is_none_or(|(n, _)| v > *n) {
                    newest = Some((v, object));
                }
            }
        }
        drop(listing);
        if !same {
            return Ok(None);
        }
        let Some((_, newest)) = newest else {
            return Ok(Some(cached.table));
        };
        let mut table = cached.table;
        table.update_incremental(None).await?;
        if Self::commit_path(rel, table.version()).as_ref() == Some(&newest.location) {
            self.keep(rel, &table, newest);
        } else {
            self.remember(rel, &table).await;
        }
        Ok(Some(table))
    }
}

/// True when two descriptions of an object (from a HEAD and a listing) are of the same
/// write: by ETag and size where the store gives ETags (some stores give a listing's times in
/// milliseconds and a HEAD's in whole seconds), else by time and size.
fn same_object(a: &ObjectMeta, b: &ObjectMeta) -> bool {
    a.size == b.size
        && match (&a.e_tag, &b.e_tag) {
            (Some(x), Some(y)) => x == y,
            _ => a.last_modified == b.last_modified,
        }
}

/// Removes the least recently `used` entries of `map` beyond `cap`.
fn evict_least_recent<V>(map: &mut HashMap<String, V>, cap: usize, used: impl Fn(&V) -> u64) {
    while map.len() > cap {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| used(v))
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        map.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_tables_go_first() {
        let mut map: HashMap<String, u64> = (0..5).map(|i| (format!("t{i}"), i)).collect();
        // t0 used again last.
        map.insert("t0".into(), 9);
        evict_least_recent(&mut map, 3, |u| *u);
        let mut left: Vec<&String> = map.keys().collect();
        left.sort();
        assert_eq!(left, ["t0", "t3", "t4"]);
    }
}
