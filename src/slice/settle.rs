//! Recording successful attempts after the statement returns.
//!
//! A successful build has committed its version before its row is written to the slice's
//! refresh log: that row is bookkeeping, and writing it (a Delta commit of a one-row file,
//! now and then a compaction) would add a fixed cost to every refresh. So it is written in the
//! background while the attempt's marker stays live, and the marker goes once the row is in
//! the log. In the meantime this process shows the attempt with its outcome
//! ([`Settling::outcome`]); other processes see it `running` for those few milliseconds.
//!
//! Nothing is lost if the process ends first: its marker expires, and whoever resolves it
//! finds the attempt's commit in the slice's Delta log and records it as the success it was
//! ([`super::running::resolve_abandoned`]). [`Settling::flush`] (`IcePie::flush`, called by
//! `IcePie::close` and by the `icepie` command before it exits) waits for the rows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::refresh_log::{self, Attempt};
use super::running::Running;
use crate::storage::names::SliceName;
use crate::storage::Warehouse;

/// Tries at writing a row before leaving it to the marker's resolution.
const TRIES: u32 = 3;

/// The successful attempts of this process whose rows are still being written.
#[derive(Debug)]
pub(crate) struct Settling {
    /// By attempt id.
    outcomes: Arc<Mutex<HashMap<String, Attempt>>>,
    /// Rows still being written. The tasks writing them are detached: dropping the last
    /// `IcePie` or a cancelled flush never cancels one half-way.
    pending: Arc<watch::Sender<usize>>,
}

impl Default for Settling {
    fn default() -> Self {
        Self {
            outcomes: Arc::default(),
            pending: Arc::new(watch::channel(0).0),
        }
    }
}

/// One row being written, until dropped (also when its task panics or is cancelled at the
/// runtime's shutdown).
struct Pending {
    pending: Arc<watch::Sender<usize>>,
    outcomes: Arc<Mutex<HashMap<String, Attempt>>>,
    id: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut outcomes) = self.outcomes.lock() {
            outcomes.remove(&self.id);
        }
        self.pending.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Settling {
    /// Writes `attempt`'s row to its slice's log in the background, then ends its marker.
    pub(crate) fn record(
        &self,
        warehouse: &Warehouse,
        slice: &SliceName,
        attempt: Attempt,
        run: Running,
    ) {
        self.outcomes
            .lock()
            .expect("settling lock")
            .insert(attempt.attempt_id.clone(), attempt.clone());
        self.pending.send_modify(|n| *n += 1);
        let pending = Pending {
            pending: self.pending.clone(),
            outcomes: self.outcomes.clone(),
            id: attempt.attempt_id.clone(),
        };
        let warehouse = warehouse.clone();
        let slice = slice.clone();
        let mut run = run;
        run.committed();
        tokio::spawn(async move {
            let _pending = pending;
            for round in 0..TRIES {
                if refresh_log::append(&warehouse, &slice, &attempt)
                    .await
                    .is_ok()
                {
                    run.finish().await;
                    return;
                }
                if round + 1 < TRIES {
                    tokio::time::sleep(Duration::from_millis(100 << round)).await;
                }
            }
            // The marker stays and expires; its resolution finds the commit.
            run.leave().await;
        });
    }

    /// The outcome of attempt `id` if its row is still being written by this process.
    pub(crate) fn outcome(&self, id: &str) -> Option<Attempt> {
        self.outcomes
            .lock()
            .expect("settling lock")
            .get(id)
            .cloned()
    }

    /// Waits until every row recorded so far is written (or given up on).
    pub(crate) async fn flush(&self) {
        let mut pending = self.pending.subscribe();
        let _ = pending.wait_for(|n| *n == 0).await;
    }
}
