//! The threads slices are built on: their own pool, at a lower OS scheduling priority.
//!
//! A build (CREATE SLICE's first version, every refresh, manual or scheduled) is long CPU work
//! nobody waits on keystroke by keystroke; queries are the opposite. On the threads that run
//! queries, a heavy build would hold every worker between its batches and a small query of
//! another slice would wait behind it (50 times its idle latency in `benches/tpch.rs`,
//! section `p99`). So builds run on a pool of their own, as many worker threads as cores, whose
//! threads ask the OS for a lower priority (nice +10, on Linux): when both want the CPU the
//! query's threads run first; on an idle machine a build still gets every core. Everything a
//! build spawns (DataFusion's partition tasks, blocking file IO) runs on the same pool.
//!
//! The pool is one per process, shared by every open `IcePie`, started on first use. When it
//! cannot be started, builds run on the caller's runtime as before.
//!
//! **Invariants**
//! - A build cancelled by its caller (the caller's future dropped) is cancelled on the pool
//!   too, and cleans up as before (`dropping_the_caller_cancels_the_build`,
//!   `lifetime::a_cancelled_refresh_is_recorded_as_cancelled`).
//! - A heavy refresh of one slice leaves another slice's small queries' median latency
//!   unchanged (invariant 5); their p99 tail is what the machine allows (on 2 vCPUs, 3-4x
//!   idle, as for DataFusion alone). Measured by `benches/tpch.rs -- p99`, not asserted
//!   (timing).

use std::future::Future;
use std::sync::OnceLock;

use datafusion::error::DataFusionError;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::error::{IcePieError, Result};

/// How much less CPU share the build threads ask for (the Unix nice increment).
const NICENESS: i32 = 10;

fn pool() -> Option<&'static Runtime> {
    static POOL: OnceLock<Option<Runtime>> = OnceLock::new();
    POOL.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("icepie-build")
            .enable_all()
            .on_thread_start(lower_priority)
            .build()
            .ok()
    })
    .as_ref()
}

/// Lowers the calling thread's priority. Only on Linux, where the nice value is per thread;
/// elsewhere it would lower the whole process, so the pool keeps the normal priority there.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its integer arguments; `who = 0` names the calling thread.
    // A failure leaves the priority unchanged, which is harmless.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, NICENESS);
    }
}

/// Aborts the task when its caller stops waiting for it.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `build` on the build pool and returns its result; dropping the returned future
/// cancels the build.
pub(crate) async fn run<F, T>(build: F) -> Result<T>
where
    F: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let Some(pool) = pool() else {
        return build.await;
    };
    let mut task = AbortOnDrop(pool.spawn(build));
    match (&mut task.0).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(IcePieError::DataFusion(DataFusionError::Execution(
            format!("the build was cancelled: {e}"),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builds_run_on_the_pool_at_a_lower_priority() {
        let (name, nice) = run(async {
            let name = std::thread::current().name().map(str::to_string);
            // SAFETY: getpriority only reads its integer arguments.
            #[cfg(target_os = "linux")]
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            #[cfg(not(target_os = "linux"))]
            let nice = NICENESS;
            Ok((name, nice))
        })
        .await
        .unwrap();
        assert_eq!(name.as_deref(), Some("icepie-build"));
        assert!(nice >= NICENESS, "nice {nice}");
    }

    #[tokio::test]
    async fn dropping_the_caller_cancels_the_build() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let waiting = run(async move {
            let _tx = tx; // dropped when the build is cancelled
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            Ok(())
        });
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), waiting).await;
        // The build's future was dropped on the pool: its end of the channel closed.
        assert!(rx.await.is_err());
    }
}
