//! Yield points after joins, so that CPU-heavy queries can be cancelled and share threads.
//!
//! Tokio runs a task until it returns `Pending`. DataFusion's scans give up their thread
//! regularly (they are cooperative), but a join can turn one input batch into thousands of
//! output batches, all ready at once: a cross join of two small tables then holds a worker
//! thread for as long as it runs. Meanwhile neither Ctrl-C in the REPL, nor a stop of
//! `icepie serve`, nor the cancellation of a refresh takes effect, and other slices' queries
//! and refreshes wait for a thread (invariant 5). This rule puts DataFusion's own
//! [`CooperativeExec`] above every join, so that such a query yields after every few hundred
//! batches, as a scan does.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::error::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::ExecutionPlan;

/// Operators that may emit many batches per input batch.
const AMPLIFYING: [&str; 5] = [
    "CrossJoinExec",
    "NestedLoopJoinExec",
    "HashJoinExec",
    "SortMergeJoinExec",
    "SymmetricHashJoinExec",
];

/// Wraps every join in a [`CooperativeExec`].
#[derive(Debug, Default)]
pub(crate) struct YieldAfterJoins;

impl PhysicalOptimizerRule for YieldAfterJoins {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            if AMPLIFYING.contains(&node.name()) {
                Ok(Transformed::yes(
                    Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>
                ))
            } else {
                Ok(Transformed::no(node))
            }
        })
        .data()
    }

    fn name(&self) -> &str {
        "icepie_yield_after_joins"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn joins_get_a_yield_point_and_nothing_else_changes() {
        let ctx = SessionContext::new();
        let plan = ctx
            .sql("SELECT a.column1 + b.column1 FROM (VALUES (1), (2)) a, (VALUES (3)) b")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let before = displayable(plan.as_ref()).indent(false).to_string();
        let after = YieldAfterJoins
            .optimize(plan, &ConfigOptions::default())
            .unwrap();
        let after = displayable(after.as_ref()).indent(false).to_string();
        let lines: Vec<&str> = after.lines().map(str::trim).collect();
        let join = lines
            .iter()
            .position(|l| l.starts_with("CrossJoinExec"))
            .unwrap();
        assert_eq!(lines[join - 1], "CooperativeExec", "{after}");
        assert_eq!(
            after.replace("CooperativeExec\n", "").replace("  ", ""),
            before.replace("  ", ""),
            "only the yield point was added"
        );
    }
}
