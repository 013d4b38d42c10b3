//! The delta rules ([`delta_terms`]): the terms whose `UNION ALL` is the rows a definition
//! gains from its inputs' new data, each a copy of the definition with some scans swapped
//! (see [`super`]'s module doc).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::DFSchemaRef;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::logical_expr::{JoinType, LogicalPlan, LogicalPlanBuilder, TableScan};

use super::{empty, Change};
use crate::error::Result;
use crate::table::IcePieTable;

/// The terms whose `UNION ALL` is the rows `plan` gains from `changes`; `Err` says which
/// part of the definition has no delta rule.
pub(super) fn delta_terms(
    plan: &LogicalPlan,
    changes: &HashMap<String, Change>,
) -> std::result::Result<Vec<LogicalPlan>, String> {
    terms(plan, changes).map_err(|e| match e {
        Unsupported::Shape(why) => why,
        Unsupported::Error(e) => format!("the definition could not be rewritten: {e}"),
    })
}

enum Unsupported {
    Shape(String),
    Error(crate::error::IcePieError),
}

impl<E: Into<crate::error::IcePieError>> From<E> for Unsupported {
    fn from(e: E) -> Self {
        Self::Error(e.into())
    }
}

fn terms(
    plan: &LogicalPlan,
    changes: &HashMap<String, Change>,
) -> std::result::Result<Vec<LogicalPlan>, Unsupported> {
    if !touches(plan, changes) {
        return Ok(Vec::new());
    }
    let shape = |what: &str| {
        Unsupported::Shape(format!(
            "the definition has {what} over new data, which has no incremental rule yet"
        ))
    };
    let no_subqueries = |node: &LogicalPlan| {
        let mut found = false;
        let _ = node.apply_subqueries(|_| {
            found = true;
            Ok(TreeNodeRecursion::Stop)
        });
        match found {
            true => Err(shape("a subquery")),
            false => Ok(()),
        }
    };
    match plan {
        LogicalPlan::TableScan(scan) => {
            let change = changed(scan, changes).ok_or_else(|| shape("a table scan"))?;
            Ok(vec![swapped(scan, change.new_files.clone())])
        }
        LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
            no_subqueries(plan)?;
            let child = plan.inputs()[0];
            terms(child, changes)?
                .into_iter()
                .map(|t| Ok(with_children(plan, vec![t])?))
                .collect()
        }
        LogicalPlan::Union(union) => {
            let mut out = Vec::new();
            for (i, input) in union.inputs.iter().enumerate() {
                for term in terms(input, changes)? {
                    let children = union
                        .inputs
                        .iter()
                        .enumerate()
                        .map(|(j, other)| {
                            if i == j {
                                term.clone()
                            } else {
                                empty(other.schema())
                            }
                        })
                        .collect();
                    out.push(with_children(plan, children)?);
                }
            }
            Ok(out)
        }
        LogicalPlan::Join(join) if join.join_type == JoinType::Inner && !join.null_aware => {
            no_subqueries(plan)?;
            let mut out = Vec::new();
            for term in terms(&join.left, changes)? {
                out.push(with_children(plan, vec![term, (*join.right).clone()])?);
            }
            let left_old = old(&join.left, changes)?;
            for term in terms(&join.right, changes)? {
                out.push(with_children(plan, vec![left_old.clone(), term])?);
            }
            Ok(out)
        }
        LogicalPlan::Join(join) => Err(shape(&format!("a {} join", join.join_type))),
        LogicalPlan::Aggregate(_) => Err(shape("an aggregate (GROUP BY)")),
        LogicalPlan::Window(_) => Err(shape("a window function")),
        LogicalPlan::Sort(_) => Err(shape("ORDER BY")),
        LogicalPlan::Limit(_) => Err(shape("LIMIT")),
        LogicalPlan::Distinct(_) => Err(shape("DISTINCT (or UNION without ALL)")),
        other => {
            let node = other.display().to_string();
            let node = node.split(':').next().unwrap_or_default();
            Err(shape(&format!("a {node} node")))
        }
    }
}

/// True when `plan` reads a changed input anywhere, subqueries included.
fn touches(plan: &LogicalPlan, changes: &HashMap<String, Change>) -> bool {
    touched_input(plan, changes).is_some()
}

/// The first changed input `plan` reads, subqueries included.
pub(super) fn touched_input(
    plan: &LogicalPlan,
    changes: &HashMap<String, Change>,
) -> Option<String> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            if changed(scan, changes).is_some() {
                found = Some(scan.table_name.to_string());
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// The change of the input `scan` reads at its latest version, if it changed.
fn changed<'a>(scan: &TableScan, changes: &'a HashMap<String, Change>) -> Option<&'a Change> {
    let provider = source_as_provider(&scan.source).ok()?;
    let table = provider.downcast_ref::<IcePieTable>()?;
    match table.is_pinned() {
        true => None,
        false => changes.get(table.name()),
    }
}

/// `scan` reading `table` instead.
fn swapped(scan: &TableScan, table: Arc<IcePieTable>) -> LogicalPlan {
    LogicalPlan::TableScan(TableScan {
        source: provider_as_source(table),
        ..scan.clone()
    })
}

/// `plan` reading each changed input as it was at the previous version.
fn old(plan: &LogicalPlan, changes: &HashMap<String, Change>) -> Result<LogicalPlan> {
    Ok(plan
        .clone()
        .transform_up(|node| {
            if let LogicalPlan::TableScan(scan) = &node {
                if let Some(change) = changed(scan, changes) {
                    return Ok(Transformed::yes(swapped(scan, change.old_files.clone())));
                }
            }
            Ok(Transformed::no(node))
        })?
        .data)
}

/// `plan` with its inputs replaced by `children`, in order; schemas are unchanged.
fn with_children(plan: &LogicalPlan, children: Vec<LogicalPlan>) -> Result<LogicalPlan> {
    let mut children = children.into_iter();
    Ok(plan
        .clone()
        .map_children(|c| Ok(Transformed::yes(children.next().unwrap_or(c))))?
        .data)
}

/// One UNION ALL of `terms` (all of one schema, named as the first), or an empty relation
/// of `schema` when there is none.
pub(super) fn union_all(terms: Vec<LogicalPlan>, schema: &DFSchemaRef) -> Result<LogicalPlan> {
    let mut terms = terms.into_iter();
    Ok(match terms.next() {
        Some(first) => {
            let mut union = LogicalPlanBuilder::from(first);
            for term in terms {
                union = union.union(term)?;
            }
            union.build()?
        }
        None => empty(schema),
    })
}
