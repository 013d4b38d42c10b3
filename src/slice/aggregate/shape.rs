//! Recognising the aggregate shape of a definition ([`Shape`]): a GROUP BY under projections
//! and aliases whose every aggregate can keep its state, and whether a stored version holds
//! those states ([`holds_states`]).

use datafusion::arrow::compute::can_cast_types;
use datafusion::arrow::datatypes::{DataType, Fields, Schema};
use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan};

use super::state::{wrap, Wrapped};
use super::{key_column, state_column};

/// A definition of the aggregate shape: nodes above the aggregate, the aggregate, its input.
pub(crate) struct Shape<'a> {
    /// Projections and aliases above the aggregate, top first.
    pub(super) above: Vec<&'a LogicalPlan>,
    pub aggregate: &'a Aggregate,
    /// Everything below the aggregate: where new data enters.
    pub input: &'a LogicalPlan,
    pub(super) wrapped: Vec<Wrapped>,
}

/// The GROUP BY at the top of `plan`, under projections and aliases (returned top first):
/// `Ok(None)` when there is none, `Err(reason)` for one no refresh can extend (HAVING,
/// GROUPING SETS).
#[allow(clippy::type_complexity)]
pub(crate) fn split(
    plan: &LogicalPlan,
) -> std::result::Result<Option<(Vec<&LogicalPlan>, &Aggregate)>, String> {
    let mut above = Vec::new();
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Projection(p) => {
                above.push(node);
                node = &p.input;
            }
            LogicalPlan::SubqueryAlias(a) => {
                above.push(node);
                node = &a.input;
            }
            LogicalPlan::Aggregate(aggregate) => {
                if aggregate
                    .group_expr
                    .iter()
                    .any(|e| matches!(e, Expr::GroupingSet(_)))
                {
                    return Err("GROUPING SETS, CUBE or ROLLUP".into());
                }
                return Ok(Some((above, aggregate)));
            }
            LogicalPlan::Filter(_) if above.len() <= 1 && filter_over_aggregate(node) => {
                return Err("HAVING".into())
            }
            _ => return Ok(None),
        }
    }
}

/// The aggregate shape of `plan`: `Ok(None)` when it is not one (no GROUP BY at its top),
/// `Err(reason)` when it is one that cannot keep states.
pub(crate) fn shape(plan: &LogicalPlan) -> std::result::Result<Option<Shape<'_>>, String> {
    let Some((above, aggregate)) = split(plan)? else {
        return Ok(None);
    };
    let wrapped = aggregate
        .aggr_expr
        .iter()
        .map(|e| wrap(e, aggregate.input.schema()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Some(Shape {
        above,
        aggregate,
        input: &aggregate.input,
        wrapped,
    }))
}

fn filter_over_aggregate(node: &LogicalPlan) -> bool {
    matches!(node, LogicalPlan::Filter(f) if matches!(f.input.as_ref(), LogicalPlan::Aggregate(_)))
}

impl Shape<'_> {
    /// True when every value above the aggregate comes from its own group's row: no
    /// subquery there reads other tables (whose change would change every group).
    pub(crate) fn rows_stand_alone(&self) -> bool {
        self.above.iter().all(|node| {
            node.expressions().iter().all(|e| {
                !e.exists(|e| {
                    Ok(matches!(
                        e,
                        Expr::ScalarSubquery(_) | Expr::InSubquery(_) | Expr::Exists(_)
                    ))
                })
                .unwrap_or(true)
            })
        })
    }

    /// The hidden columns a slice of this shape stores.
    pub(crate) fn hidden_columns(&self) -> Vec<String> {
        (0..self.aggregate.group_expr.len())
            .map(key_column)
            .chain((0..self.wrapped.len()).map(state_column))
            .collect()
    }
}

/// True when `schema` (a slice version's) holds every hidden column of `shape`, each
/// readable as the type the shape stores: its states can be merged into.
pub(crate) fn holds_states(shape: &Shape<'_>, schema: &Schema) -> bool {
    let keys = shape.aggregate.group_expr.len();
    (0..keys).all(|i| schema.field_with_name(&key_column(i)).is_ok())
        && shape.wrapped.iter().enumerate().all(|(i, w)| {
            // Same fields by name and order: a cast between structs may match by position,
            // so a state laid out otherwise must never be merged into.
            let names = |fields: &Fields| -> Vec<String> {
                fields.iter().map(|f| f.name().clone()).collect()
            };
            schema.field_with_name(&state_column(i)).is_ok_and(|f| {
                matches!(f.data_type(), DataType::Struct(stored) if names(stored) == names(&w.state))
                    && can_cast_types(f.data_type(), &DataType::Struct(w.state.clone()))
            })
        })
}
