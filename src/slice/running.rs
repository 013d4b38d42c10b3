//! Refresh attempts while they run: one small marker object per attempt,
//! `<warehouse>/_system/running/<domain>/<name>/<attempt_id>.json`, written before the attempt
//! reads or writes anything, renewed every `icepie.heartbeat` while it runs, and deleted once
//! its outcome is in the slice's refresh log.
//!
//! The markers make attempts visible from the moment they start, in every process:
//! `system.refreshes` lists a live one as `running`, and one whose process stopped renewing it
//! for [`EXPIRY_HEARTBEATS`] of the heartbeats the marker records (killed, or cut off from
//! storage) as `abandoned`, judged by the store's clock, which stamps the renewals (see
//! `storage::clock`): a process whose clock runs ahead never takes a live attempt for dead. A
//! cancelled attempt (Ctrl-C, a stopped scheduler) records `cancelled` itself. The next
//! attempt of the slice, or VACUUM, turns an abandoned marker into an `abandoned` row of the
//! refresh log; the files it may have written are orphans that VACUUM deletes after its grace.
//! An attempt that committed before its process stopped (its row is written after the
//! statement returns, see [`super::settle`]) is found by its id in the slice's latest commits
//! and recorded as the success it was.
//!
//! VACUUM reads the live markers of a slice and keeps every file written since the earliest
//! of them started: a refresh running in any process never loses a file it may still commit.
//!
//! ## Invariants
//! - A marker exists, or the attempt's row is in the refresh log, at every moment after the
//!   attempt started writing (guarded by `lifetime::a_killed_refresh_shows_as_abandoned`).
//! - Resolving an abandoned marker records one row, whichever processes resolve it at once:
//!   the one that creates its claim object first records it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::meta;
use super::refresh_log::{self, Attempt};
use super::SliceContext;
use crate::error::Result;
use crate::storage::names::SliceName;
use crate::storage::{table_stats, Warehouse};

/// Folder of the markers, one folder per slice under `<domain>/<name>/`.
pub(crate) const RUNNING_PATH: &str = "_system/running/";

/// Heartbeats a marker may miss before its attempt counts as abandoned.
pub(crate) const EXPIRY_HEARTBEATS: u32 = 6;

/// What a marker holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Marker {
    /// `domain.name`.
    pub slice: String,
    /// The attempt (matches `system.refreshes.attempt_id`).
    pub attempt_id: String,
    /// `create`, `refresh` or `replace`.
    pub kind: String,
    /// When the attempt started (ms since the epoch).
    pub started_at: i64,
    /// The process that runs it: host and pid, for people looking for it.
    pub process: String,
    /// How often its process renews it (ms): it expires after [`EXPIRY_HEARTBEATS`] of
    /// them, whatever heartbeat the reader has. Absent in markers written before.
    #[serde(default)]
    pub heartbeat_ms: Option<u64>,
    /// The Delta table id of the slice (see `refresh_log::Attempt::slice_id`).
    #[serde(default)]
    pub slice_id: Option<String>,
}

impl Marker {
    /// The refresh-log row of this marker's attempt, ended with `status` after `duration_ms`.
    fn attempt(&self, duration_ms: i64, status: &'static str, error: Option<String>) -> Attempt {
        Attempt {
            slice: self.slice.clone(),
            attempt_id: self.attempt_id.clone(),
            kind: self.kind.clone(),
            started_at: DateTime::from_timestamp_millis(self.started_at).unwrap_or_default(),
            duration_ms,
            status,
            version: None,
            rows: None,
            bytes: None,
            inputs: String::new(),
            error,
            built: None,
            slice_id: self.slice_id.clone(),
        }
    }
}

/// A marker as found in the warehouse, with when it was last renewed.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    /// Its content.
    pub marker: Marker,
    /// When its process last renewed it (ms since the epoch).
    pub renewed_at: i64,
    /// Where it is.
    path: Path,
}

impl Found {
    /// True when its process renewed it within the expiry: [`EXPIRY_HEARTBEATS`] of the
    /// heartbeat the marker records (`heartbeat`, the reader's, for markers that record
    /// none), by the store's clock `store_now_ms` (the renewals' stamps are the store's).
    pub(crate) fn live(&self, heartbeat: Duration, store_now_ms: i64) -> bool {
        let heartbeat = self
            .marker
            .heartbeat_ms
            .map_or(heartbeat, Duration::from_millis);
        !expired(self.renewed_at, heartbeat, store_now_ms)
    }
}

/// True when a record last renewed at `renewed_ms` (by the store's clock) and renewed every
/// `heartbeat` has missed [`EXPIRY_HEARTBEATS`] renewals at `store_now_ms`.
pub(crate) fn expired(renewed_ms: i64, heartbeat: Duration, store_now_ms: i64) -> bool {
    let expiry = i64::try_from((heartbeat * EXPIRY_HEARTBEATS).as_millis()).unwrap_or(i64::MAX);
    store_now_ms >= renewed_ms.saturating_add(expiry)
}

fn folder(slice: Option<&SliceName>) -> Path {
    match slice {
        Some(s) => Path::from(format!("{RUNNING_PATH}{}/{}/", s.domain, s.name)),
        None => Path::from(RUNNING_PATH),
    }
}

pub(crate) fn process() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

/// Lists the markers of `slice`, or of every slice (one listing).
pub(crate) async fn list(warehouse: &Warehouse, slice: Option<&SliceName>) -> Result<Vec<Found>> {
    let store = warehouse.store();
    let objects: Vec<_> = store.list(Some(&folder(slice))).try_collect().await?;
    let mut out = Vec::new();
    for object in objects {
        if !object.location.as_ref().ends_with(".json") {
            continue;
        }
        // A marker deleted since the listing has ended: skip it.
        let Ok(got) = store.get(&object.location).await else {
            continue;
        };
        let Ok(marker) = serde_json::from_slice::<Marker>(&got.bytes().await?) else {
            continue;
        };
        out.push(Found {
            marker,
            renewed_at: object.last_modified.timestamp_millis(),
            path: object.location,
        });
    }
    Ok(out)
}

/// Records the abandoned attempts of `slice` in its refresh log and deletes their markers;
/// returns the markers of the attempts still live (one listing serves both).
pub(crate) async fn resolve_abandoned(
    shared: &SliceContext,
    slice: &SliceName,
    heartbeat: Duration,
) -> Result<Vec<Found>> {
    let warehouse = &shared.warehouse;
    let store = warehouse.store();
    let mut live = Vec::new();
    let mut logged: Option<HashSet<String>> = None;
    let found = list(warehouse, Some(slice)).await?;
    let now = match found.is_empty() {
        true => 0,
        false => warehouse.store_now_ms().await,
    };
    for found in found {
        // This process's own success whose row is still being written is not abandoned,
        // however late its marker's renewal (a busy machine): its row is on its way.
        if found.live(heartbeat, now) || shared.settling.outcome(&found.marker.attempt_id).is_some()
        {
            live.push(found);
            continue;
        }
        // A process stopped between logging its attempt and deleting the marker: the row
        // is there, only the marker goes.
        if logged.is_none() {
            logged = Some(logged_ids(shared, slice).await?);
        }
        if logged
            .as_ref()
            .is_some_and(|l| l.contains(&found.marker.attempt_id))
        {
            match store.delete(&found.path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        // One process claims it; a store without conditional puts lets every process try.
        let claim = Path::from(format!("{}.claimed", found.path));
        let claimed = store
            .put_opts(&claim, "".into(), PutOptions::from(PutMode::Create))
            .await;
        if let Err(object_store::Error::AlreadyExists { .. }) = claimed {
            continue;
        }
        let recorded = async {
            let m = &found.marker;
            let ran = (found.renewed_at - m.started_at).max(0);
            let attempt = match committed(shared, slice, m, ran).await? {
                Some(success) => success,
                None => m.attempt(
                    ran,
                    refresh_log::ABANDONED,
                    Some(format!(
                        "the process running it ({}) stopped renewing its record after {ran} \
                         ms: it was killed or lost its storage; nothing was committed",
                        m.process
                    )),
                ),
            };
            refresh_log::append(warehouse, slice, &attempt).await
        };
        if let Err(e) = recorded.await {
            // Unclaimed again, so that a later try (this process's or another's) records it.
            let _ = store.delete(&claim).await;
            return Err(e);
        }
        for path in [&found.path, &claim] {
            match store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(live)
}

/// How many of a slice's latest commits [`committed`] looks through.
const COMMITS_SEARCHED: usize = 32;

/// The row of `marker`'s attempt if it committed before its process ended (the process
/// stopped before the row was written): a success, from the commit's descriptor.
async fn committed(
    shared: &SliceContext,
    slice: &SliceName,
    marker: &Marker,
    ran: i64,
) -> Result<Option<Attempt>> {
    let Some(table) = shared
        .warehouse
        .load(&Warehouse::slice_path(slice), None)
        .await?
    else {
        return Ok(None);
    };
    let latest = table.version().unwrap_or_default() as i64;
    let name = slice.to_string();
    for version in (0..=latest).rev().take(COMMITS_SEARCHED) {
        let Some(info) = meta::commit_info(&table, version).await? else {
            break;
        };
        // Commits older than the attempt cannot be its own (its own process stamped both;
        // other writers' clocks may differ, so look on).
        if info.timestamp.is_some_and(|t| t < marker.started_at) {
            continue;
        }
        let Ok(Some(found)) = meta::descriptor(&info, &name) else {
            continue;
        };
        // The kind as well: a descriptor names the attempt that made its commit.
        if found.attempt_id != marker.attempt_id || found.kind.to_string() != marker.kind {
            continue;
        }
        let mut attempt = marker.attempt(ran, refresh_log::SUCCESS, None);
        attempt.version = Some(version);
        attempt.inputs = meta::format_inputs(&found.inputs);
        attempt.rows = meta::commit_rows(&info, Some(&found));
        attempt.built = found.built.clone();
        if version == latest {
            let stats = table_stats(&table)?;
            attempt.rows = Some(stats.rows);
            attempt.bytes = Some(stats.bytes);
        }
        return Ok(Some(attempt));
    }
    Ok(None)
}

/// The ids of the recent attempts of `slice` in its refresh log.
pub(crate) async fn logged_ids(
    shared: &SliceContext,
    slice: &SliceName,
) -> Result<HashSet<String>> {
    Ok(shared
        .attempts(slice)
        .await?
        .into_iter()
        .map(|a| a.attempt_id)
        .collect())
}

/// Of `found` markers, those whose attempt is not in its slice's refresh log as read, at
/// the versions `read` (by slice, `domain.name`): an attempt ending meanwhile, or a process
/// that stopped between logging its attempt and deleting the marker, leaves one behind.
pub(crate) async fn not_logged(
    shared: &SliceContext,
    found: Vec<Found>,
    read: &HashMap<String, u64>,
) -> Result<Vec<Found>> {
    let mut logged: HashMap<String, HashSet<String>> = HashMap::new();
    let mut out = Vec::new();
    for f in found {
        if !logged.contains_key(&f.marker.slice) {
            let ids = match (SliceName::parse(&f.marker.slice), read.get(&f.marker.slice)) {
                (Ok(slice), Some(version)) => shared
                    .attempts_upto(&slice, *version)
                    .await?
                    .into_iter()
                    .map(|a| a.attempt_id)
                    .collect(),
                _ => HashSet::new(),
            };
            logged.insert(f.marker.slice.clone(), ids);
        }
        if !logged[&f.marker.slice].contains(&f.marker.attempt_id) {
            out.push(f);
        }
    }
    Ok(out)
}

/// A running attempt's marker, renewed while it lives. [`Running::finish`] deletes it once
/// the attempt's row is logged; dropped before that (the attempt was cancelled), it records
/// the attempt as `cancelled` and deletes the marker in the background, unless the attempt
/// committed ([`Running::committed`]): then the marker stays for its resolution.
pub(crate) struct Running {
    warehouse: Warehouse,
    slice: SliceName,
    marker: Marker,
    path: Path,
    clock: Instant,
    heartbeat: Option<Heartbeat>,
    /// The attempt committed: dropped, it is not `cancelled`.
    committed: bool,
}

/// The task renewing a marker (or a lease), and how to stop it.
pub(crate) struct Heartbeat {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Heartbeat {
    /// Starts rewriting `body` at `path` every `every`.
    pub(crate) fn start(
        store: Arc<dyn ObjectStore>,
        path: Path,
        body: Vec<u8>,
        every: Duration,
    ) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(renew(store, path, body, every, stopped));
        Self { stop, task }
    }

    /// Stops renewing and waits until no renewal is in flight: a marker deleted after this
    /// stays deleted.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

impl Running {
    /// Writes the marker of a new attempt and starts renewing it every `heartbeat`.
    pub(crate) async fn start(
        warehouse: &Warehouse,
        slice: &SliceName,
        attempt_id: &str,
        kind: &str,
        started_at: DateTime<Utc>,
        heartbeat: Duration,
        slice_id: Option<String>,
    ) -> Result<Self> {
        let marker = Marker {
            slice: slice.to_string(),
            attempt_id: attempt_id.to_string(),
            kind: kind.to_string(),
            started_at: started_at.timestamp_millis(),
            process: process(),
            heartbeat_ms: u64::try_from(heartbeat.as_millis()).ok(),
            slice_id,
        };
        let path = Path::from(format!(
            "{RUNNING_PATH}{}/{}/{attempt_id}.json",
            slice.domain, slice.name
        ));
        let body = serde_json::to_vec(&marker).expect("a marker serializes");
        let store = warehouse.store();
        store.put(&path, body.clone().into()).await?;
        let beat = Heartbeat::start(store, path.clone(), body, heartbeat);
        Ok(Self {
            warehouse: warehouse.clone(),
            slice: slice.clone(),
            marker,
            path,
            clock: Instant::now(),
            heartbeat: Some(beat),
            committed: false,
        })
    }

    /// The attempt's row is in the log: the marker goes.
    pub(crate) async fn finish(mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.stop().await;
        }
        let _ = self.warehouse.store().delete(&self.path).await;
    }

    /// The attempt committed: if this is dropped before [`Running::finish`] (its process is
    /// ending), the marker stays for its resolution to find the commit.
    pub(crate) fn committed(&mut self) {
        self.committed = true;
    }

    /// The attempt committed but its row could not be written: the marker stops being
    /// renewed and stays, so that once it expires its resolution records the attempt from
    /// its commit.
    pub(crate) async fn leave(mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.stop().await;
        }
    }
}

/// Renews the marker at `path` every `every` until told to stop. A renewal in flight when
/// the stop comes finishes first, so the marker is never written after its owner deleted it.
async fn renew(
    store: Arc<dyn ObjectStore>,
    path: Path,
    body: Vec<u8>,
    every: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every.max(Duration::from_millis(10))) => {}
            _ = &mut stop => return,
        }
        // A failed renewal is retried at the next beat; enough misses make it abandoned.
        let _ = store.put(&path, body.clone().into()).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Finished: nothing left to do.
        let Some(heartbeat) = self.heartbeat.take() else {
            return;
        };
        if self.committed {
            heartbeat.task.abort();
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            heartbeat.task.abort();
            return;
        };
        let warehouse = self.warehouse.clone();
        let slice = self.slice.clone();
        let path = self.path.clone();
        let attempt = self.marker.attempt(
            self.clock.elapsed().as_millis() as i64,
            refresh_log::CANCELLED,
            Some("cancelled before it committed; nothing was committed".into()),
        );
        runtime.spawn(async move {
            heartbeat.stop().await;
            if refresh_log::append(&warehouse, &slice, &attempt)
                .await
                .is_ok()
            {
                let _ = warehouse.store().delete(&path).await;
            }
        });
    }
}

/// The rows `system.refreshes` shows for markers: `running`, or `abandoned` when expired
/// at `store_now_ms` (by the store's clock).
pub(crate) fn as_attempts(found: &[Found], heartbeat: Duration, store_now_ms: i64) -> Vec<Attempt> {
    found
        .iter()
        .map(|f| {
            let m = &f.marker;
            let live = f.live(heartbeat, store_now_ms);
            let until = if live { store_now_ms } else { f.renewed_at };
            m.attempt(
                (until - m.started_at).max(0),
                if live {
                    refresh_log::RUNNING
                } else {
                    refresh_log::ABANDONED
                },
                (!live).then(|| {
                    format!(
                        "the process running it ({}) stopped renewing its record: it was \
                         killed or lost its storage",
                        m.process
                    )
                }),
            )
        })
        .collect()
}
