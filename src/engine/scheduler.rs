//! The scheduler: a tokio task inside each open [`IcePie`] that runs the refreshes that
//! slices' policies make due.
//!
//! Every `icepie.scheduler_tick` it brings the view of the slices' states it shares with
//! `system.slices` up to date from the warehouse's change journal (one listing when nothing
//! changed, see [`cards`]) and starts, up to `icepie.max_concurrent_refreshes` at once, the refreshes that are due:
//! `REFRESH EVERY 'interval'` once the interval has passed since the slice's latest commit,
//! `REFRESH ON CHANGE` once an input has a newer version. It skips frozen and suspended
//! slices; a slice whose last refreshes failed is retried after an exponential backoff, and
//! after `icepie.max_failures` failures in a row it is suspended. All of this is derived from
//! the warehouse (commit times and the refresh log), so several processes scheduling the same
//! warehouse agree on what is due. A process runs a due refresh only once it holds the
//! slice's lease (see [`lease`]) and has checked that the slice is still due, so each due
//! refresh runs once in the whole warehouse; should two writers still meet, Delta's commit
//! protocol settles who commits.
//!
//! Every [`PROPOSE_EVERY_TICKS`] ticks, when `icepie.auto_apply` names kinds of proposals,
//! it applies the standing proposals of those kinds (`system.proposals`).
//!
//! The task holds the engine only weakly between ticks: dropping the last `IcePie` stops it.
//! [`IcePie::close`] stops it gracefully, letting running refreshes finish for a while before
//! cancelling them (a cancelled refresh commits nothing).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{IcePie, Inner};
use crate::catalog::cards::{self, Purpose};
use crate::error::IcePieError;
use crate::options::IcePieOptions;
use crate::slice::lease::{self, Lease};
use crate::slice::schedule::{apply_demand, is_due, priority};
use crate::slice::{BuildOutcome, SliceInfo};
use crate::storage::names::SliceName;
use crate::usage::Demand;

/// One scheduled refresh that ended.
#[derive(Debug, Clone)]
pub struct RefreshEvent {
    /// The slice.
    pub slice: SliceName,
    /// When the refresh ended.
    pub at: DateTime<Utc>,
    /// What the refresh built (its `unchanged` is true when no input had changed: it
    /// committed nothing, and the version is the one served before), or why it failed.
    pub outcome: std::result::Result<BuildOutcome, Arc<IcePieError>>,
    /// How long it ran, lease included.
    pub duration_ms: i64,
}

/// Controls a running scheduler task.
#[derive(Debug)]
pub(crate) struct Handle {
    stop: watch::Sender<Option<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Stops at once, cancelling running refreshes.
    pub(crate) fn abort(self) {
        self.task.abort();
    }

    /// Stops starting refreshes, waits up to `grace` for running ones, cancels the rest.
    pub(crate) async fn stop(self, grace: Duration) {
        let _ = self.stop.send(Some(grace));
        let _ = self.task.await;
    }
}

/// Starts the scheduler of the engine `inner`.
pub(crate) fn spawn(inner: Weak<Inner>) -> Handle {
    let (stop, stopped) = watch::channel(None);
    let task = tokio::spawn(run(inner, stopped));
    Handle { stop, task }
}

/// The slice's lease (see [`lease`]), if no other process holds it and the slice is still
/// due: another process may have refreshed it since this tick read its state.
async fn take_lease(engine: &IcePie, name: &SliceName, options: &IcePieOptions) -> Option<Lease> {
    let warehouse = &engine.inner.shared.warehouse;
    let lease = lease::acquire(warehouse, name, options.heartbeat.0)
        .await
        .ok()??;
    match engine.slice(&name.to_string()).await {
        Ok(info) if is_due(&info, options, engine.inner.shared.usage.clock.now_ms()) => Some(lease),
        _ => {
            lease.release().await;
            None
        }
    }
}

/// What the scheduler knows of how much each table is read, renewed every
/// [`cards::RESCAN`] (`None`: not known).
#[derive(Default)]
struct Reads {
    demand: Option<HashMap<String, Demand>>,
    read_at: Option<Instant>,
}

impl Reads {
    async fn update(&mut self, engine: &IcePie) {
        if self.read_at.is_none_or(|at| at.elapsed() > cards::RESCAN) {
            self.demand = engine.inner.shared.demand().await;
            self.read_at = Some(Instant::now());
        }
    }
}

/// Slices with a scheduled refresh running, removed by the refresh's task however it ends.
#[derive(Clone, Default)]
struct Running(Arc<Mutex<HashSet<SliceName>>>);

struct RunningGuard(Running, SliceName);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if let Ok(mut set) = (self.0).0.lock() {
            set.remove(&self.1);
        }
    }
}

/// Every how many ticks the scheduler applies the proposals `icepie.auto_apply` allows.
const PROPOSE_EVERY_TICKS: u64 = 120;

/// Applies the standing proposals whose kinds `icepie.auto_apply` allows, as `APPLY
/// PROPOSAL` would. Proposals are advice: one that cannot be listed or applied now is tried
/// again later.
async fn auto_apply(engine: &IcePie) {
    let allowed = engine.options().auto_apply;
    let Ok(proposals) = engine.proposals().await else {
        return;
    };
    for p in proposals.iter().filter(|p| allowed.allows(p.kind)) {
        let _ = engine.run_proposal(p).await;
    }
}

async fn run(inner: Weak<Inner>, mut stop: watch::Receiver<Option<Duration>>) {
    let mut tasks: JoinSet<()> = JoinSet::new();
    let running = Running::default();
    let mut reads = Reads::default();
    let mut ticks: u64 = 0;
    let proposing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let tick = match inner.upgrade() {
            Some(inner) => IcePie { inner }.options().scheduler_tick.0,
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(tick.max(Duration::from_millis(10))) => {}
            _ = stop.changed() => break,
        }
        while tasks.try_join_next().is_some() {}
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let engine = IcePie { inner };
        let options = engine.options();
        if !options.scheduler.0 {
            continue;
        }
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(PROPOSE_EVERY_TICKS)
            && !options.auto_apply.0.is_empty()
            && !proposing.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let engine = engine.clone();
            let proposing = proposing.clone();
            tasks.spawn(async move {
                auto_apply(&engine).await;
                proposing.store(false, std::sync::atomic::Ordering::Release);
            });
        }
        let busy = running.0.lock().expect("running lock").len();
        let free = options.max_concurrent_refreshes.saturating_sub(busy);
        if free == 0 {
            continue;
        }
        let shared = &engine.inner.shared;
        // A warehouse that cannot be read now is read again next tick.
        let Ok((mut all, _unreadable)) = shared.cards.infos(shared, Purpose::Schedule).await else {
            continue;
        };
        reads.update(&engine).await;
        let now = shared.usage.clock.now_ms();
        // This process's reads count at once: a read wakes a dormant slice by the next tick.
        let local = shared.usage.local_reads();
        let demand = reads.demand.as_ref().map(|d| {
            let mut d = d.clone();
            for (table, at) in &local {
                let e = d.entry(table.clone()).or_default();
                e.last_read = e.last_read.max(Some(*at));
            }
            d
        });
        apply_demand(&mut all, demand.as_ref(), &options, now);
        let mut due: Vec<SliceInfo> = all
            .into_iter()
            .filter(|s| !running.0.lock().expect("running lock").contains(&s.name))
            .filter(|s| is_due(s, &options, now))
            .collect();
        due.sort_by(|a, b| priority(b, now).total_cmp(&priority(a, now)));
        for info in due.into_iter().take(free) {
            let name = info.name.clone();
            running.0.lock().expect("running lock").insert(name.clone());
            let guard = RunningGuard(running.clone(), name.clone());
            let engine = engine.clone();
            let options = options.clone();
            tasks.spawn(async move {
                let _guard = guard;
                let Some(lease) = take_lease(&engine, &name, &options).await else {
                    return;
                };
                let started = std::time::Instant::now();
                let outcome = engine.refresh(&name.to_string()).await.map_err(Arc::new);
                lease.release().await;
                let _ = engine.inner.events.send(RefreshEvent {
                    slice: name,
                    at: Utc::now(),
                    outcome,
                    duration_ms: started.elapsed().as_millis() as i64,
                });
            });
        }
    }
    let grace = stop.borrow().unwrap_or_default();
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}
