//! Rewriting a definition of the aggregate shape into the plan of the slice's next version:
//! the partial states of the new data, merged with the stored ones, under the definition's
//! projections and aliases (see [`super`]'s module doc).

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::Column;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Expr, ExprSchemable, LogicalPlan, LogicalPlanBuilder, Projection, SubqueryAlias,
};

use super::shape::Shape;
use super::{key_column, state_column, HIDDEN};
use crate::slice::as_planned::as_planned;

impl Shape<'_> {
    /// Partial states of `new_data` (the aggregate's input, or its new rows), grouped by
    /// the keys: the hidden key and state columns.
    fn partial(&self, new_data: LogicalPlan) -> DFResult<LogicalPlan> {
        let states = self
            .wrapped
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Expr::AggregateFunction(AggregateFunction::new_udf(
                    w.partial.clone(),
                    w.args.clone(),
                    false,
                    w.filter.clone(),
                    vec![],
                    None,
                ))
                .alias(state_column(i))
            })
            .collect::<Vec<_>>();
        let keys = self.aggregate.group_expr.clone();
        let grouped = LogicalPlanBuilder::from(new_data)
            .aggregate(keys.clone(), states)?
            .build()?;
        let schema = grouped.schema().clone();
        // Each with the nullability the logical plan gives it: the merge above compares it
        // with the physical plan's ([`as_planned`]).
        let exprs = (0..keys.len())
            .map(|i| {
                let (q, f) = schema.qualified_field(i);
                let key = Expr::Column(Column::from((q, f)));
                Ok(as_planned(key, &schema)?.alias(key_column(i)))
            })
            .chain((0..self.wrapped.len()).map(|i| {
                let name = state_column(i);
                Ok(as_planned(Expr::Column(Column::from_name(&name)), &schema)?.alias(name))
            }))
            .collect::<DFResult<Vec<_>>>()?;
        LogicalPlanBuilder::from(grouped).project(exprs)?.build()
    }

    /// The plan of the slice's next version: `stored` (the hidden columns of its current
    /// version, `None` for a full build) merged with the partial states of `new_data` (the
    /// aggregate's input, or the terms of its new rows).
    pub(crate) fn plan(
        &self,
        stored: Option<LogicalPlan>,
        new_data: Vec<LogicalPlan>,
    ) -> DFResult<LogicalPlan> {
        // The states of each part of the new data, then one UNION ALL of them: their columns
        // are the unqualified hidden ones, whereas a union of the parts themselves would
        // lose the qualifiers the keys and arguments name.
        let mut parts = new_data.into_iter();
        let first = parts.next().unwrap_or_else(|| {
            LogicalPlan::EmptyRelation(datafusion::logical_expr::EmptyRelation {
                produce_one_row: false,
                schema: self.input.schema().clone(),
            })
        });
        let mut partial = LogicalPlanBuilder::from(self.partial(first)?);
        for part in parts {
            partial = partial.union(self.partial(part)?)?;
        }
        let partial = partial.build()?;
        let types: Vec<DataType> = partial
            .schema()
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let mut states = LogicalPlanBuilder::from(partial);
        if let Some(stored) = stored {
            // Stored as Delta types (no unsigned integers, no string views): read back as
            // the states' own.
            let schema = stored.schema().clone();
            let exprs = self
                .hidden_columns()
                .into_iter()
                .zip(&types)
                .map(|(c, t)| {
                    let cast = Expr::Column(Column::from_name(&c)).cast_to(t, schema.as_ref())?;
                    Ok(as_planned(cast, &schema)?.alias(c))
                })
                .collect::<DFResult<Vec<_>>>()?;
            let stored = LogicalPlanBuilder::from(stored).project(exprs)?.build()?;
            states = states.union(stored)?;
        }
        let key_count = self.aggregate.group_expr.len();
        let keys: Vec<Expr> = (0..key_count)
            .map(|i| Expr::Column(Column::from_name(key_column(i))))
            .collect();
        let mut aggregates = Vec::new();
        for (i, w) in self.wrapped.iter().enumerate() {
            let state = Expr::Column(Column::from_name(state_column(i)));
            for (udaf, name) in [
                (&w.final_, format!("{HIDDEN}value_{i}")),
                (&w.merge, state_column(i)),
            ] {
                aggregates.push(
                    Expr::AggregateFunction(AggregateFunction::new_udf(
                        udaf.clone(),
                        vec![state.clone()],
                        false,
                        None,
                        vec![],
                        None,
                    ))
                    .alias(name),
                );
            }
        }
        let merged = states.aggregate(keys, aggregates)?.build()?;
        // The aggregate's own output, named as the definition's nodes above it refer to it,
        // and the hidden columns.
        let original = self.aggregate.schema.clone();
        let mut exprs = Vec::new();
        for (i, (q, f)) in original.iter().enumerate() {
            let source = match i < key_count {
                true => key_column(i),
                false => format!("{HIDDEN}value_{}", i - key_count),
            };
            exprs.push(
                Expr::Column(Column::from_name(source))
                    .cast_to(f.data_type(), merged.schema().as_ref())?
                    .alias_qualified(q.cloned(), f.name()),
            );
        }
        let hidden = self.hidden_columns();
        exprs.extend(hidden.iter().map(|c| Expr::Column(Column::from_name(c))));
        let mut plan = LogicalPlanBuilder::from(merged).project(exprs)?.build()?;
        // The definition's projections and aliases, each passing the hidden columns on.
        for node in self.above.iter().rev() {
            plan = match node {
                LogicalPlan::Projection(p) => {
                    let mut exprs = p.expr.clone();
                    for c in &hidden {
                        let (q, f) = plan.schema().qualified_field_with_unqualified_name(c)?;
                        exprs.push(Expr::Column(Column::from((q, f))));
                    }
                    LogicalPlan::Projection(Projection::try_new(exprs, Arc::new(plan))?)
                }
                LogicalPlan::SubqueryAlias(a) => LogicalPlan::SubqueryAlias(
                    SubqueryAlias::try_new(Arc::new(plan), a.alias.clone())?,
                ),
                other => {
                    return Err(DataFusionError::Internal(format!(
                        "unexpected node above an aggregate: {}",
                        other.display()
                    )))
                }
            };
        }
        Ok(plan)
    }
}
