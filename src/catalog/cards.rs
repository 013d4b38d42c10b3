//! What this process knows of every slice of the warehouse: one [`Card`] per slice, kept up
//! to date from the change journal (see [`journal`]) and saved in the warehouse, so that
//! listing a thousand slices (`system.slices`, the scheduler's tick) costs a few requests
//! instead of several per slice.
//!
//! - A **full scan** lists the slices and reads each one. It happens when the view is older
//!   than [`RESCAN`], and, for `system.slices`, at every read while the warehouse holds at
//!   most [`READ_WHOLE_UP_TO`] slices (reading them all costs little, and sees even what the
//!   journal cannot record).
//! - An **update** lists the journal once, with this process's own changes (which it knows
//!   even when their entries failed to be written). A slice whose table or refresh log
//!   changed is read again; a slice one of whose inputs changed only has its staleness worked
//!   out again, at one read of each changed input however many slices read it.
//! - The view is **saved** as `_system/cards/<cursor>-<scanned>-<random>.json` after a full
//!   scan and after updates that read [`SAVE_AFTER`] slices again, with the position of its
//!   journal reader. A process with no view takes up the newest saved one whose full scan is
//!   younger than [`RESCAN`] and reads the journal on from its position: a list, a read and
//!   a listing of the journal, however many slices there are. Each save has a name of its
//!   own, so writers never contend; writers delete all but the newest [`KEEP_SAVED`].
//!
//! What the journal does not record (files changed behind icepie's back, commits made by
//! other engines, an entry another process failed to write) shows at the next full scan, at
//! most [`RESCAN`] after the last one.
//!
//! # Invariants
//!
//! - `system.slices` in a new process costs the same number of requests however many slices
//!   there are (invariant 8; `budgets::listing_every_slice_costs_the_same_however_many_slices`).
//! - What the view shows is what reading every slice shows, after changes made by this
//!   process and by another (`cards::the_view_of_every_slice_agrees_with_reading_each_one`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::state::CatalogState;
use super::system::PARALLEL;
use crate::error::Result;
use crate::slice::{lease, Card, InputCache, SliceInfo};
use crate::storage::journal;
use crate::storage::names::{SliceName, CORE_SCHEMA};
use crate::storage::{CORE_DIR, SLICES_DIR};

/// How old a view may grow before it is read whole again (and how old a saved view may be
/// to be taken up).
pub(crate) const RESCAN: Duration = Duration::from_secs(600);

/// Up to how many slices `system.slices` reads every slice at each read.
pub(crate) const READ_WHOLE_UP_TO: usize = 16;

/// After how many slices read again since the last save the view is saved again.
const SAVE_AFTER: usize = 32;

/// How many saved views writers keep.
const KEEP_SAVED: usize = 3;

/// Folder of the saved views.
pub(crate) const CARDS_PATH: &str = "_system/cards/";

/// Version of the saved form: a saved view of another form is not taken up.
const FORMAT: u32 = 1;

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The view of every slice one process keeps (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Cards(tokio::sync::Mutex<View>);

/// How a caller wants the slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// As `system.slices` shows them: a small warehouse read whole, the leases listed (who is
    /// refreshing what).
    Show,
    /// As the scheduler needs them: from the view, without the leases (it takes a slice's
    /// lease before refreshing it anyway).
    Schedule,
}

#[derive(Debug, Default)]
struct View {
    cards: BTreeMap<SliceName, Card>,
    /// Slices that could not be read, with why: read again at each update.
    unreadable: BTreeMap<SliceName, String>,
    reader: Option<journal::Reader>,
    /// When the full scan the view comes from started (local ms).
    scanned_at: i64,
    /// Slices read again since the view was last saved.
    unsaved: usize,
    /// Whether a saved view was looked for.
    looked: bool,
    /// When a full scan last pruned the journal (local ms).
    pruned_at: i64,
}

/// A view as saved.
#[derive(Serialize, Deserialize)]
struct Saved {
    format: u32,
    scanned_at: i64,
    position: journal::Position,
    cards: Vec<Card>,
    /// Slices that could not be read: read again by whoever takes the view up.
    unreadable: Vec<String>,
}

impl Cards {
    /// Every slice's info as of now, and the slices that could not be read with why.
    pub(crate) async fn infos(
        &self,
        shared: &CatalogState,
        purpose: Purpose,
    ) -> Result<(Vec<SliceInfo>, Vec<(SliceName, String)>)> {
        let mut view = self.0.lock().await;
        view.update(shared, purpose).await?;
        let options = shared.options();
        let holders = match purpose {
            Purpose::Show => lease::holders(&shared.warehouse, options.heartbeat.0).await?,
            Purpose::Schedule => HashMap::new(),
        };
        let infos = view
            .cards
            .iter()
            .map(|(name, card)| card.info(shared, &options, name.clone(), holders.get(name)))
            .collect();
        let unreadable = view
            .unreadable
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        Ok((infos, unreadable))
    }

    /// The slices but `except` as last read, reading nothing.
    pub(crate) async fn known(
        &self,
        shared: &CatalogState,
        except: &HashSet<SliceName>,
    ) -> Vec<SliceInfo> {
        let options = shared.options();
        let view = self.0.lock().await;
        view.cards
            .iter()
            .filter(|(name, _)| !except.contains(*name))
            .map(|(name, card)| card.info(shared, &options, name.clone(), None))
            .collect()
    }
}

impl View {
    async fn update(&mut self, shared: &CatalogState, purpose: Purpose) -> Result<()> {
        let store = shared.warehouse.store();
        let now = Utc::now().timestamp_millis();
        if self.reader.is_none() && !self.looked {
            self.looked = true;
            if let Some(saved) = newest_saved(&store, now).await {
                self.take_up(saved, shared.warehouse.journal());
            }
        }
        let small = self.cards.len() + self.unreadable.len() <= READ_WHOLE_UP_TO;
        if self.reader.is_none()
            || now.saturating_sub(self.scanned_at) > ms(RESCAN)
            || (purpose == Purpose::Show && small)
        {
            self.scan(shared).await?;
        } else {
            self.catch_up(shared).await?;
        }
        if self.unsaved >= SAVE_AFTER && self.cards.len() > READ_WHOLE_UP_TO {
            self.save(&store).await;
        }
        Ok(())
    }

    fn take_up(&mut self, saved: Saved, journal: &journal::Journal) {
        self.cards = saved
            .cards
            .into_iter()
            .filter_map(|c| Some((c.slice()?, c)))
            .collect();
        self.unreadable = saved
            .unreadable
            .iter()
            .filter_map(|n| SliceName::parse(n).ok())
            .map(|n| (n, "not read yet".to_string()))
            .collect();
        self.reader = Some(journal.reader_at(saved.position));
        self.scanned_at = saved.scanned_at;
        self.unsaved = 0;
    }

    /// Reads every slice.
    async fn scan(&mut self, shared: &CatalogState) -> Result<()> {
        let started = Utc::now().timestamp_millis();
        // Before anything is read: what the journal and this process recorded so far is seen
        // by the reads below.
        let reader = shared.warehouse.journal().reader_from_now().await?;
        shared.refresh_listing().await?;
        // Taken only once nothing can fail before the reads: a failed scan loses none.
        shared.warehouse.journal().take_own();
        let names: BTreeSet<SliceName> = shared.slice_names().into_iter().collect();
        self.cards.clear();
        self.unreadable.clear();
        self.read_again(shared, names, &InputCache::default()).await;
        self.reader = Some(reader);
        self.scanned_at = started;
        if started.saturating_sub(self.pruned_at) > ms(RESCAN) {
            self.pruned_at = started;
            shared.warehouse.journal().prune().await;
        }
        // Saved at once.
        self.unsaved = SAVE_AFTER;
        Ok(())
    }

    /// Reads again what the changes since the last update concern.
    async fn catch_up(&mut self, shared: &CatalogState) -> Result<()> {
        let reader = self.reader.as_mut().expect("a view to catch up");
        let mut changed = reader.changed().await?;
        changed.extend(shared.warehouse.journal().take_own());
        let mut again: BTreeSet<SliceName> = self.unreadable.keys().cloned().collect();
        let mut tables = BTreeSet::new();
        for rel in &changed {
            let (table, slice) = changed_table(rel);
            again.extend(slice);
            tables.extend(table);
        }
        let moved: Vec<(SliceName, Card)> = self
            .cards
            .iter()
            .filter(|(name, card)| {
                !again.contains(*name)
                    && card
                        .descriptor
                        .inputs
                        .iter()
                        .any(|i| !i.pinned && tables.contains(&i.table))
            })
            .map(|(name, card)| (name.clone(), card.clone()))
            .collect();
        self.unsaved += again.len() + moved.len();
        // One read of each changed input, for both the staleness and the slices read again.
        let inputs = InputCache::default();
        let behind = futures::stream::iter(moved)
            .map(|(name, mut card)| {
                let inputs = &inputs;
                async move {
                    let result = card.behind(shared, inputs).await.map(|()| card);
                    (name, result)
                }
            })
            .buffer_unordered(PARALLEL)
            .collect::<Vec<_>>()
            .await;
        for (name, result) in behind {
            match result {
                Ok(card) => {
                    self.cards.insert(name, card);
                }
                Err(e) => {
                    self.cards.remove(&name);
                    self.unreadable.insert(name, e.to_string());
                }
            }
        }
        self.read_again(shared, again, &inputs).await;
        Ok(())
    }

    /// Reads the cards of `names`: a slice that cannot be read is recorded with why, one
    /// that no longer exists is forgotten.
    async fn read_again(
        &mut self,
        shared: &CatalogState,
        names: BTreeSet<SliceName>,
        inputs: &InputCache,
    ) {
        let read: Vec<(SliceName, Result<Option<Card>>)> = futures::stream::iter(names)
            .map(|name| async move {
                let card = Card::read(shared, &name, inputs).await;
                (name, card)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        for (name, card) in read {
            self.unreadable.remove(&name);
            match card {
                Ok(Some(card)) => {
                    self.cards.insert(name, card);
                }
                Ok(None) => {
                    self.cards.remove(&name);
                }
                Err(e) => {
                    self.cards.remove(&name);
                    self.unreadable.insert(name, e.to_string());
                }
            }
        }
    }

    /// Saves the view for other processes (best effort) and deletes old saves.
    async fn save(&mut self, store: &Arc<dyn ObjectStore>) {
        let Some(reader) = &self.reader else {
            return;
        };
        let position = reader.position().clone();
        let key = format!(
            "{CARDS_PATH}{:013}-{:013}-{:08x}.json",
            position.cursor().max(0),
            self.scanned_at.max(0),
            uuid::Uuid::new_v4().as_u128() as u32
        );
        let saved = Saved {
            format: FORMAT,
            scanned_at: self.scanned_at,
            position,
            cards: self.cards.values().cloned().collect(),
            unreadable: self.unreadable.keys().map(ToString::to_string).collect(),
        };
        let Ok(body) = serde_json::to_vec(&saved) else {
            return;
        };
        if store.put(&Path::from(key), body.into()).await.is_err() {
            return;
        }
        self.unsaved = 0;
        for (_, _, path) in saves(store).await.into_iter().skip(KEEP_SAVED) {
            let _ = store.delete(&path).await;
        }
    }
}

/// The saved views, newest first: each one's journal cursor, the start of its full scan, and
/// its path.
async fn saves(store: &Arc<dyn ObjectStore>) -> Vec<(i64, i64, Path)> {
    let listed: Vec<_> = store
        .list(Some(&Path::from(CARDS_PATH)))
        .try_collect()
        .await
        .unwrap_or_default();
    let mut saves: Vec<(i64, i64, Path)> = listed
        .into_iter()
        .filter_map(|o| {
            let name = o.location.filename()?.strip_suffix(".json")?;
            let mut parts = name.split('-');
            let cursor = parts.next()?.parse().ok()?;
            let scanned = parts.next()?.parse().ok()?;
            Some((cursor, scanned, o.location))
        })
        .collect();
    saves.sort_by_key(|s| std::cmp::Reverse(s.0));
    saves
}

/// The newest saved view whose full scan is younger than [`RESCAN`], if one can be read.
async fn newest_saved(store: &Arc<dyn ObjectStore>, now: i64) -> Option<Saved> {
    let young = saves(store)
        .await
        .into_iter()
        .filter(|(_, scanned, _)| now.saturating_sub(*scanned) <= ms(RESCAN));
    // A save deleted since the listing, or unreadable: the next one.
    for (_, _, path) in young.take(KEEP_SAVED) {
        let Ok(got) = store.get(&path).await else {
            continue;
        };
        let Ok(bytes) = got.bytes().await else {
            continue;
        };
        match serde_json::from_slice::<Saved>(&bytes) {
            Ok(saved) if saved.format == FORMAT => return Some(saved),
            _ => continue,
        }
    }
    None
}

/// What a change of the folder `rel` concerns: the table slices read it as (`core.t`,
/// `d.n`), and the slice whose state it changes.
pub(crate) fn changed_table(rel: &str) -> (Option<String>, Option<SliceName>) {
    let parts: Vec<&str> = rel.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        [CORE_DIR, t] => (Some(format!("{CORE_SCHEMA}.{t}")), None),
        [SLICES_DIR, d, n] => {
            let slice = SliceName::new(d.to_string(), *n).ok();
            (slice.as_ref().map(ToString::to_string), slice)
        }
        ["_system", "refreshes", d, n] => (None, SliceName::new(d.to_string(), *n).ok()),
        _ => (None, None),
    }
}
