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

use tokio::task::JoinSet;

use super::log::{self, Attempt};
use super::running::Running;
use crate::storage::names::SliceName;
use crate::storage::Warehouse;

/// Tries at writing a row before leaving it to the marker's resolution.
const TRIES: u32 = 3;

/// The successful attempts of this process whose rows are still being written.
#[derive(Debug, Default)]
pub(crate) struct Settling {
    /// By attempt id.
    outcomes: Arc<Mutex<HashMap<String, Attempt>>>,
    tasks: Mutex<JoinSet<()>>,
}

impl Settling {
    /// Writes `attempt`'s row to its slice's log in the background, then ends its marker.
    pub fn record(&self, warehouse: &Warehouse, slice: &SliceName, attempt: Attempt, run: Running) {
        let outcomes = self.outcomes.clone();
        outcomes
            .lock()
            .expect("settling lock")
            .insert(attempt.attempt_id.clone(), attempt.clone());
        let warehouse = warehouse.clone();
        let slice = slice.clone();
        let mut tasks = self.tasks.lock().expect("settling lock");
        // Rows written since the last call: forget their tasks.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            let mut written = false;
            for round in 0..TRIES {
                if log::append(&warehouse, &slice, &attempt).await.is_ok() {
                    written = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100 << round)).await;
            }
            if written {
                run.finish().await;
            } else {
                // The marker stays and expires; its resolution finds the commit.
                run.leave().await;
            }
            outcomes
                .lock()
                .expect("settling lock")
                .remove(&attempt.attempt_id);
        });
    }

    /// The outcome of attempt `id` if its row is still being written by this process.
    pub fn outcome(&self, id: &str) -> Option<Attempt> {
        self.outcomes
            .lock()
            .expect("settling lock")
            .get(id)
            .cloned()
    }

    /// Waits until every row recorded so far is written (or given up on).
    pub async fn flush(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("settling lock"));
        tasks.join_all().await;
    }
}
