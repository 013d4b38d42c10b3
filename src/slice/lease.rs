//! One scheduler per slice across processes: a lease that a process takes before it runs a
//! scheduled refresh, so that a due refresh runs once in the whole warehouse, however many
//! processes (REPLs, apps, `icepie serve`) schedule it.
//!
//! A lease is an object `<warehouse>/_system/leases/<domain>/<name>/<epoch>.json`; the
//! highest epoch is the lease in force. A process takes the lease by creating the next epoch
//! with put-if-absent, which exactly one process wins, when there is no epoch, or when the
//! highest one's holder stopped renewing it for [`EXPIRY_HEARTBEATS`](super::running::EXPIRY_HEARTBEATS) of its heartbeats
//! (killed, or cut off from storage). The holder rewrites its epoch every `icepie.heartbeat`
//! while the refresh runs, and empties it when done (an empty epoch is released; it stays so
//! that epoch numbers are never reused). Taking a free lease costs one listing and one write.
//!
//! # Invariants
//!
//! - A due refresh runs once in the warehouse, whichever processes are open (invariant 8;
//!   `scheduler::three_serve_processes_run_each_due_refresh_once`,
//!   `scheduler::a_killed_lease_holder_is_taken_over_once_its_lease_expires`).
//!
//! The epoch records its holder's heartbeat, and expiry is judged by the store's clock (see
//! `storage::clock`): the store stamps each renewal, so processes whose clocks disagree by
//! minutes, or whose heartbeats differ, agree on when a lease expired.
//!
//! A lease only keeps processes from doing the same work: a holder paused past its expiry
//! whose lease was taken over can still commit, and Delta's commit protocol then settles the
//! race as for any two writers (one wins, the other records `conflict`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions};
use serde::{Deserialize, Serialize};

use super::running::{expired, process, Heartbeat};
use crate::error::Result;
use crate::storage::names::SliceName;
use crate::storage::Warehouse;

/// Folder of the leases, one folder per slice under `<domain>/<name>/`.
pub(crate) const LEASES_PATH: &str = "_system/leases/";

/// What a lease object holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Holder {
    /// The process holding it: host and pid.
    pub process: String,
    /// When it was taken (ms since the epoch).
    pub taken_at: i64,
    /// How often the holder renews it (ms): it expires after [`EXPIRY_HEARTBEATS`](super::running::EXPIRY_HEARTBEATS) of them,
    /// whatever heartbeat the reader has. Absent in leases written before.
    #[serde(default)]
    pub heartbeat_ms: Option<u64>,
}

/// A lease this process holds, renewed until [`Lease::release`] (or drop).
pub(crate) struct Lease {
    warehouse: Warehouse,
    path: Path,
    heartbeat: Option<Heartbeat>,
}

fn folder(slice: &SliceName) -> String {
    format!("{LEASES_PATH}{}/{}/", slice.domain, slice.name)
}

/// The epoch an object of a lease folder names.
fn epoch(object: &ObjectMeta) -> Option<u64> {
    let digits = object.location.filename()?.strip_suffix(".json")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The lease in force on `slice`, if any: its highest epoch and its holder, unless released
/// or expired.
async fn in_force(
    warehouse: &Warehouse,
    slice: &SliceName,
    heartbeat: Duration,
) -> Result<(Vec<(u64, ObjectMeta)>, Option<Holder>)> {
    let epochs: Vec<(u64, ObjectMeta)> = warehouse
        .store()
        .list(Some(&Path::from(folder(slice))))
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .filter_map(|o| epoch(&o).map(|e| (e, o)))
        .collect();
    let held = held(warehouse, &epochs, heartbeat).await?;
    Ok((epochs, held))
}

/// The holder of the lease whose epochs are `epochs`, unless released or expired. Expiry is
/// judged with the holder's heartbeat and by the store's clock (which stamps the renewals),
/// so processes whose clocks or heartbeats differ agree on it.
async fn held(
    warehouse: &Warehouse,
    epochs: &[(u64, ObjectMeta)],
    heartbeat: Duration,
) -> Result<Option<Holder>> {
    // A released epoch is an empty object.
    let Some((_, highest)) = epochs
        .iter()
        .max_by_key(|(e, _)| *e)
        .filter(|(_, o)| o.size > 0)
    else {
        return Ok(None);
    };
    let holder: Holder = match warehouse.store().get(&highest.location).await {
        // Emptied (released) since the listing, or unreadable: no holder.
        Ok(got) => match serde_json::from_slice(&got.bytes().await?) {
            Ok(holder) => holder,
            Err(_) => return Ok(None),
        },
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let every = holder.heartbeat_ms.map_or(heartbeat, Duration::from_millis);
    let now = warehouse.store_now_ms().await;
    let renewed = highest.last_modified.timestamp_millis();
    Ok((!expired(renewed, every, now)).then_some(holder))
}

/// The holders of every lease in force in the warehouse: one listing of all the leases, and
/// one read of each lease held (released epochs are empty and need none).
pub(crate) async fn holders(
    warehouse: &Warehouse,
    heartbeat: Duration,
) -> Result<HashMap<SliceName, Holder>> {
    let mut epochs: HashMap<SliceName, Vec<(u64, ObjectMeta)>> = HashMap::new();
    let mut listing = warehouse.store().list(Some(&Path::from(LEASES_PATH)));
    while let Some(object) = listing.try_next().await? {
        let Some(e) = epoch(&object) else {
            continue;
        };
        // `_system/leases/<domain>/<name>/<epoch>.json`
        let parts: Vec<_> = object.location.parts().collect();
        let [_, _, domain, name, _] = parts.as_slice() else {
            continue;
        };
        let Ok(slice) = SliceName::new(domain.as_ref(), name.as_ref()) else {
            continue;
        };
        epochs.entry(slice).or_default().push((e, object));
    }
    let mut out = HashMap::new();
    for (slice, epochs) in epochs {
        if let Some(holder) = held(warehouse, &epochs, heartbeat).await? {
            out.insert(slice, holder);
        }
    }
    Ok(out)
}

/// Takes the lease on `slice` for this process, renewing it every `heartbeat`; `None` when
/// another process holds it (or took it at this very moment).
pub(crate) async fn acquire(
    warehouse: &Warehouse,
    slice: &SliceName,
    heartbeat: Duration,
) -> Result<Option<Lease>> {
    let (epochs, held) = in_force(warehouse, slice, heartbeat).await?;
    if held.is_some() {
        return Ok(None);
    }
    // Every process that saw the same epochs tries the same next one, and put-if-absent lets
    // one win. Released epochs stay (empty) so that numbers are never reused: a holder paused
    // past its expiry only ever renews or releases its own, older epoch.
    let next = epochs.iter().map(|(e, _)| e + 1).max().unwrap_or(0);
    let path = Path::from(format!("{}{next:020}.json", folder(slice)));
    let body = serde_json::to_vec(&Holder {
        process: process(),
        taken_at: Utc::now().timestamp_millis(),
        heartbeat_ms: u64::try_from(heartbeat.as_millis()).ok(),
    })
    .expect("a lease serializes");
    let store = warehouse.store();
    let create = PutOptions::from(PutMode::Create);
    match store.put_opts(&path, body.clone().into(), create).await {
        Ok(_) => {}
        Err(object_store::Error::AlreadyExists { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    // The epochs before it go but the last (best effort: the highest epoch is what counts).
    for (e, old) in epochs {
        if e + 1 < next {
            let _ = store.delete(&old.location).await;
        }
    }
    let heartbeat = Heartbeat::start(store, path.clone(), body, heartbeat);
    Ok(Some(Lease {
        warehouse: warehouse.clone(),
        path,
        heartbeat: Some(heartbeat),
    }))
}

/// The process holding the lease on `slice`, if one is in force.
pub(crate) async fn holder(
    warehouse: &Warehouse,
    slice: &SliceName,
    heartbeat: Duration,
) -> Result<Option<Holder>> {
    Ok(in_force(warehouse, slice, heartbeat).await?.1)
}

/// Marks the epoch at `path` released: empty, kept so that its number is not used again.
/// Best effort: a lease not released expires.
async fn release(store: std::sync::Arc<dyn object_store::ObjectStore>, path: &Path) {
    let _ = store.put(path, Vec::<u8>::new().into()).await;
}

impl Lease {
    /// Stops renewing the lease and empties it: the next due refresh may run anywhere.
    pub(crate) async fn release(mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.stop().await;
        }
        release(self.warehouse.store(), &self.path).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(heartbeat) = self.heartbeat.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.warehouse.store();
        let path = self.path.clone();
        runtime.spawn(async move {
            heartbeat.stop().await;
            release(store, &path).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_holder_at_a_time_and_epochs_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let w = Warehouse::open(dir.path().to_str().unwrap(), None, Default::default()).unwrap();
        let s = SliceName::parse("d.s").unwrap();
        let beat = Duration::from_secs(10);
        let (a, b) = tokio::join!(acquire(&w, &s, beat), acquire(&w, &s, beat));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a.is_some() != b.is_some(), "exactly one holds the lease");
        let held = a.or(b).unwrap();
        assert!(acquire(&w, &s, beat).await.unwrap().is_none());
        assert!(holder(&w, &s, beat).await.unwrap().is_some());
        let first = held.path.clone();
        held.release().await;
        assert!(holder(&w, &s, beat).await.unwrap().is_none());
        let next = acquire(&w, &s, beat).await.unwrap().unwrap();
        assert!(
            next.path.as_ref() > first.as_ref(),
            "{} after {first}",
            next.path
        );
        next.release().await;
    }
}
