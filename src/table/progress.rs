//! Progress of long writes: the rows and bytes an `INGEST`, `CREATE CORE TABLE ... FROM`,
//! `CREATE SLICE` or `REFRESH SLICE` has processed so far, for a live display.
//!
//! [`IcePie::execute_with_progress`](crate::IcePie::execute_with_progress) runs a statement
//! with a [`Progress`] in a task-local; the write paths plan their input with
//! [`counting`], whose query planner puts a node above the plan that counts each batch on its
//! way to the Parquet writer (two atomic adds a batch). Builds that run on the build pool carry
//! the task-local over ([`current`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result as DFResult;
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;

use super::watch::{Watch, WatchExec};

/// How far a statement has got: the rows and bytes (their size in memory, uncompressed) it has
/// read from its sources, and the rows it has written. Shared between the statement and
/// whoever displays it; every count only grows.
#[derive(Debug, Default)]
pub struct Progress {
    rows: AtomicU64,
    bytes: AtomicU64,
    rows_written: AtomicU64,
}

impl Progress {
    /// A new, zeroed progress.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Rows read from the statement's sources (files, tables, `VALUES`) so far.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// Bytes read from the statement's sources so far: the in-memory size of the values.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Rows written so far.
    pub fn rows_written(&self) -> u64 {
        self.rows_written.load(Ordering::Relaxed)
    }

    fn add(&self, side: Side, batch: &RecordBatch) {
        let rows = batch.num_rows() as u64;
        match side {
            Side::Written => {
                self.rows_written.fetch_add(rows, Ordering::Relaxed);
            }
            Side::Read => {
                let bytes: usize = batch
                    .columns()
                    .iter()
                    .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
                    .sum();
                self.rows.fetch_add(rows, Ordering::Relaxed);
                self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Which count a [`CountingExec`] adds to.
#[derive(Debug, Clone, Copy)]
enum Side {
    /// Above a source (a leaf of the plan).
    Read,
    /// Above the whole plan, whose output is written.
    Written,
}

tokio::task_local! {
    static PROGRESS: Arc<Progress>;
}

/// Runs `work` with `progress` as the statement's progress.
pub(crate) async fn scope<F: std::future::Future>(progress: Arc<Progress>, work: F) -> F::Output {
    PROGRESS.scope(progress, work).await
}

/// The progress of the statement this task runs for, if any.
pub(crate) fn current() -> Option<Arc<Progress>> {
    PROGRESS.try_with(Arc::clone).ok()
}

/// `state`, planning so that the rows of every plan it runs add to the current progress;
/// `state` itself when there is none.
pub(crate) fn counting(state: &SessionState) -> SessionState {
    let Some(progress) = current() else {
        return state.clone();
    };
    let inner = state.query_planner().clone();
    SessionStateBuilder::new_from_existing(state.clone())
        .with_query_planner(Arc::new(CountingPlanner { inner, progress }))
        .build()
}

/// Plans as `inner` does, then counts the plan's output.
#[derive(Debug)]
struct CountingPlanner {
    inner: Arc<dyn QueryPlanner + Send + Sync>,
    progress: Arc<Progress>,
}

#[async_trait]
impl QueryPlanner for CountingPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let plan = self
            .inner
            .create_physical_plan(logical_plan, session)
            .await?;
        let progress = &self.progress;
        let counted = |input, side| -> Arc<dyn ExecutionPlan> {
            let progress = progress.clone();
            Arc::new(WatchExec::new(input, Arc::new(Counting { progress, side })))
        };
        // Above every source, then above the whole: the plan is optimized already.
        let plan = plan
            .transform_up(|node| {
                Ok(if node.children().is_empty() {
                    Transformed::yes(counted(node, Side::Read))
                } else {
                    Transformed::no(node)
                })
            })?
            .data;
        Ok(counted(plan, Side::Written))
    }
}

/// Counts the batches a [`WatchExec`] passes on, as rows read or written.
#[derive(Debug)]
struct Counting {
    progress: Arc<Progress>,
    side: Side,
}

impl Watch for Counting {
    const NAME: &'static str = "CountingExec";

    fn detail(&self) -> String {
        format!("{:?}", self.side)
    }

    fn partition(
        self: &Arc<Self>,
        _input: &Arc<dyn ExecutionPlan>,
    ) -> Box<dyn FnMut(&RecordBatch) + Send> {
        let (progress, side) = (self.progress.clone(), self.side);
        Box::new(move |batch| progress.add(side, batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn counts_what_a_plan_produces_only_within_its_scope() {
        let ctx = SessionContext::new();
        let progress = Progress::new();
        let sql = "SELECT value, 'x' AS s FROM generate_series(1, 10000) WHERE value > 0";
        let counted = scope(progress.clone(), async {
            let state = counting(&ctx.state());
            let plan = state.create_logical_plan(sql).await.unwrap();
            let physical = state.create_physical_plan(&plan).await.unwrap();
            datafusion::physical_plan::collect(physical, state.task_ctx())
                .await
                .unwrap()
        })
        .await;
        let rows: usize = counted.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 10_000);
        assert_eq!(progress.rows(), 10_000);
        assert_eq!(progress.rows_written(), 10_000);
        assert!(progress.bytes() >= 80_000, "{}", progress.bytes());
        // Outside a scope, planning counts nothing.
        let state = counting(&ctx.state());
        let plan = state.create_logical_plan(sql).await.unwrap();
        let physical = state.create_physical_plan(&plan).await.unwrap();
        datafusion::physical_plan::collect(physical, state.task_ctx())
            .await
            .unwrap();
        assert_eq!(progress.rows(), 10_000);
    }
}
