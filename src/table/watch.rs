//! [`WatchExec`]: a plan node that passes its input's batches through unchanged while a
//! [`Watch`] sees each of them. Progress counts the rows a write processes with it, and usage
//! the rows a query returns.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result as DFResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::TryStreamExt;

/// What a [`WatchExec`] does with the batches it passes on.
pub(crate) trait Watch: fmt::Debug + Send + Sync + 'static {
    /// The node's name in plans.
    const NAME: &'static str;

    /// What follows the name in `EXPLAIN`.
    fn detail(&self) -> String {
        String::new()
    }

    /// What sees the batches of one partition of `input` as it runs; dropped when that
    /// partition's stream ends.
    fn partition(
        self: &Arc<Self>,
        input: &Arc<dyn ExecutionPlan>,
    ) -> Box<dyn FnMut(&RecordBatch) + Send>;

    /// Whether the node gains from its input being split into partitions (when not, the
    /// optimizer adds no repartitioning below it for its sake).
    fn benefits_from_input_partitioning(&self) -> bool {
        true
    }
}

/// Passes its input's batches through, showing each to `watch`.
#[derive(Debug)]
pub(crate) struct WatchExec<W: Watch> {
    input: Arc<dyn ExecutionPlan>,
    watch: Arc<W>,
}

impl<W: Watch> WatchExec<W> {
    /// `input`, watched by `watch`.
    pub(crate) fn new(input: Arc<dyn ExecutionPlan>, watch: Arc<W>) -> Self {
        Self { input, watch }
    }
}

impl<W: Watch> DisplayAs for WatchExec<W> {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match self.watch.detail() {
            d if d.is_empty() => write!(f, "{}", W::NAME),
            d => write!(f, "{}: {d}", W::NAME),
        }
    }
}

impl<W: Watch> ExecutionPlan for WatchExec<W> {
    fn name(&self) -> &str {
        W::NAME
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![self.watch.benefits_from_input_partitioning()]
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            self.watch.clone(),
        )))
    }

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let stream = self.input.execute(partition, context)?;
        let schema = stream.schema();
        let mut see = self.watch.partition(&self.input);
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            stream.inspect_ok(move |batch| see(batch)),
        )))
    }
}
