//! What makes a definition refresh in full whatever its inputs gain: functions whose result
//! may change between runs ([`deterministic`]), a subquery beside a GROUP BY recomputed where
//! new rows fall ([`read_beside`]), a part with no delta rule; and the check of a definition
//! declared `INCREMENTAL` ([`refuses_incremental`]).

use std::collections::HashMap;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};

use super::rules::{delta_terms, touched_input};
use super::{providers, Change};
use crate::error::Result;
use crate::slice::{aggregate, partitions};

/// Why `plan` cannot refresh incrementally whatever its inputs gain, or `Ok(None)` when it can:
/// checks a definition declared `INCREMENTAL`.
pub(crate) fn refuses_incremental(
    plan: &LogicalPlan,
    partition_by: &[String],
) -> Result<Option<String>> {
    if let Err(why) = deterministic(plan) {
        return Ok(Some(why));
    }
    // Every input changes at once: the delta rules must hold at every node.
    let changes: HashMap<String, Change> = providers(plan)?
        .into_iter()
        .map(|(name, provider)| {
            let change = Change {
                new_files: provider.clone(),
                old_files: provider,
            };
            (name, change)
        })
        .collect();
    // The input of a GROUP BY whose partitions or groups are recomputed where new rows fall.
    let recomputed = match partition_by.is_empty() {
        true => None,
        false => match partitions::partitioned(plan, partition_by) {
            Ok(found) => found.map(|p| p.aggregate.input.as_ref()),
            Err(why) => return Ok(Some(format!("the slice is partitioned, but {why}"))),
        },
    };
    let found = match recomputed {
        Some(input) => Ok(Some((input, true))),
        None => match aggregate::shape(plan) {
            Ok(shape) => Ok(shape.map(|s| (s.input, false))),
            // Groups that keep no state are recomputed when all of their keys are shown.
            Err(why) => match partitions::grouped(plan) {
                Ok(Some(grouped)) => Ok(Some((grouped.aggregate.input.as_ref(), true))),
                _ => Err(why),
            },
        },
    };
    let definition = match found {
        Ok(Some((input, recomputed))) => {
            if let (true, Some(table)) = (recomputed, read_beside(plan, &changes)?) {
                return Ok(Some(beside(&table)));
            }
            input
        }
        Ok(None) => plan,
        Err(why) => {
            return Ok(Some(format!(
                "the definition has an aggregate that keeps no state ({why})"
            )))
        }
    };
    Ok(delta_terms(definition, &changes).err())
}

/// The changed input that `plan` reads beside the input of its GROUP BY: in a subquery of
/// the SELECT list above it or of the aggregate's own expressions. A change there changes
/// every group, not only those the new rows fall in.
pub(super) fn read_beside(
    plan: &LogicalPlan,
    changes: &HashMap<String, Change>,
) -> Result<Option<String>> {
    let mut found = None;
    let mut node = plan;
    loop {
        node.apply_subqueries(|subquery| {
            found = touched_input(subquery, changes);
            Ok(match found {
                Some(_) => TreeNodeRecursion::Stop,
                None => TreeNodeRecursion::Continue,
            })
        })?;
        let inputs = node.inputs();
        match (&found, node, inputs.as_slice()) {
            (None, LogicalPlan::Projection(_) | LogicalPlan::SubqueryAlias(_), [input]) => {
                node = input
            }
            _ => return Ok(found),
        }
    }
}

/// Why a GROUP BY recomputed group by group (or partition by partition) refreshes in full
/// when `table`, which a subquery beside it reads, changed.
pub(super) fn beside(table: &str) -> String {
    format!(
        "a subquery above its GROUP BY reads {table}, whose change may change every group, \
         not only those the new rows fall in"
    )
}

/// Refuses functions whose result may differ between two runs over the same data: an
/// incremental refresh would keep rows a full one would compute differently.
pub(crate) fn deterministic(plan: &LogicalPlan) -> std::result::Result<(), String> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        // Parts over unchanged inputs run again in every refresh: whatever may pick other
        // rows each time (LIMIT, window functions, order-dependent aggregates) would mix
        // two different answers.
        match node {
            LogicalPlan::Limit(_) => {
                found = Some("LIMIT, which may pick other rows each run".into())
            }
            LogicalPlan::Window(_) => {
                found = Some("a window function, which may number rows differently each run".into())
            }
            _ => {}
        }
        if found.is_some() {
            return Ok(TreeNodeRecursion::Stop);
        }
        node.apply_expressions(|e| {
            e.apply(|e| {
                match e {
                    Expr::ScalarFunction(f)
                        if f.func.signature().volatility != Volatility::Immutable =>
                    {
                        found = Some(format!(
                            "{}(), whose result can change between refreshes",
                            f.func.name()
                        ));
                    }
                    Expr::AggregateFunction(f)
                        if f.params.order_by.is_empty()
                            && aggregate::ORDER_DEPENDENT.contains(&f.func.name()) =>
                    {
                        found = Some(format!(
                            "{}() without ORDER BY, whose result depends on the order rows \
                             arrive in",
                            f.func.name()
                        ));
                    }
                    _ => return Ok(TreeNodeRecursion::Continue),
                }
                Ok(TreeNodeRecursion::Stop)
            })
        })
    });
    match found {
        Some(what) => Err(format!("the definition has {what}")),
        None => Ok(()),
    }
}
