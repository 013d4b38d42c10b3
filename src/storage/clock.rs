//! Time as the warehouse's object store tells it.
//!
//! Leases and running markers expire by their last renewal, and the store stamps each
//! renewal (`last_modified`) with its own clock. Comparing that stamp with this process's
//! clock would make a process whose clock runs ahead take a live holder for dead (and record
//! its refresh as abandoned while it runs), and one whose clock lags wait too long. So expiry
//! is judged by the store's clock: [`StoreClock`] measures how far this process's clock is
//! from the store's (one small write, a HEAD and a delete), keeps that offset for a minute,
//! and reads "now" as the store would. A store it cannot write to (read-only credentials) is
//! taken to agree with this process.

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

/// Folder of the objects written to read the store's clock, one per process while it reads.
pub(crate) const CLOCK_PATH: &str = "_system/clock/";

/// How long a measured offset is used before it is measured again.
const KEPT: Duration = Duration::from_secs(60);

/// Shift of this process's clock, in ms, from `ICEPIE_CLOCK_SKEW_MS`: a testing aid that
/// makes a process behave as one whose clock runs ahead (positive) or behind (negative).
static SKEW_MS: LazyLock<i64> = LazyLock::new(|| {
    std::env::var("ICEPIE_CLOCK_SKEW_MS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
});

/// This process's clock, in ms since the epoch.
pub(crate) fn local_now_ms() -> i64 {
    Utc::now().timestamp_millis().saturating_add(*SKEW_MS)
}

/// The offset of the store's clock from this process's, measured now and then.
#[derive(Debug, Default)]
pub(crate) struct StoreClock {
    offset: Mutex<Option<(Instant, i64)>>,
}

impl StoreClock {
    /// Now by the store's clock, in ms since the epoch (measuring the offset when the last
    /// measure is older than a minute).
    pub(crate) async fn now_ms(&self, store: &dyn ObjectStore) -> i64 {
        let kept = *self.offset.lock().expect("store clock");
        let offset = match kept {
            Some((at, offset)) if at.elapsed() < KEPT => offset,
            _ => {
                // A store that cannot be read this way agrees with this process, for a minute.
                let offset = measure(store).await.unwrap_or(0);
                *self.offset.lock().expect("store clock") = Some((Instant::now(), offset));
                offset
            }
        };
        local_now_ms().saturating_add(offset)
    }
}

/// The store's clock minus this process's, from the time the store stamps on a new object,
/// taken against the middle of the write.
async fn measure(store: &dyn ObjectStore) -> Option<i64> {
    let path = Path::from(format!(
        "{CLOCK_PATH}{}.json",
        uuid::Uuid::new_v4().as_simple()
    ));
    let before = local_now_ms();
    store.put(&path, "{}".into()).await.ok()?;
    let stamped = store.head(&path).await;
    let after = local_now_ms();
    let _ = store.delete(&path).await;
    let stamped = stamped.ok()?.last_modified.timestamp_millis();
    Some(stamped - before.midpoint(after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn the_store_clock_is_measured_once_a_minute_and_leaves_nothing() {
        let store = InMemory::new();
        let clock = StoreClock::default();
        let now = clock.now_ms(&store).await;
        // An in-memory store stamps with this machine's clock.
        assert!((now - local_now_ms()).abs() < 1_000, "{now}");
        let measured = clock.offset.lock().unwrap().unwrap();
        clock.now_ms(&store).await;
        assert_eq!(clock.offset.lock().unwrap().unwrap().0, measured.0);
        let left: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
}
