//! Incremental refresh of a partitioned `GROUP BY` slice: only the partitions the new data
//! touches are recomputed, and replace those partitions in one commit (Delta's
//! `replaceWhere`); every other partition keeps its files.
//!
//! A slice `PARTITION BY (p, …)` whose definition is `SELECT …, key AS p, … GROUP BY key, …`
//! (each partition column one of the group keys) holds every group of a partition in that
//! partition. The new rows of its input (the delta rules of [`super::incremental`]) name the
//! partitions they fall in; recomputing the definition over the whole input filtered to those
//! partitions gives exactly their new content, whatever the aggregates are (`median` and
//! `count(DISTINCT …)` included): a partition's groups depend on that partition's rows only.
//!
//! An unpartitioned `GROUP BY` slice whose aggregates keep no mergeable state (`median`,
//! `count(DISTINCT …)`) and whose group keys are all columns of its output is refreshed the
//! same way, group by group: the groups new rows fall in are recomputed from the input
//! filtered to them, and the slice is rewritten from its other groups and those.
//!
//! # Invariants
//!
//! - The partitions or groups recomputed are exactly those the new rows fall in, NULL keys
//!   included, and nothing else changes (invariant 9;
//!   `incremental::incremental_equals_full_over_random_appends`, shapes `parted`,
//!   `holistic`).

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ScalarValue};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, LogicalPlanBuilder};
use futures::TryStreamExt;

use super::aggregate;
use crate::error::Result;

/// Partitions (or groups) a refresh recomputes at most; more make a full refresh.
pub(crate) const MAX_PARTITIONS: usize = 1000;

/// A partitioned GROUP BY definition: its aggregate and, per partition column, the group key
/// it shows.
pub(crate) struct Partitioned<'a> {
    /// The GROUP BY at the top of the definition.
    pub aggregate: &'a Aggregate,
    /// Each partition column with its key's expression over the aggregate's input.
    keys: Vec<(String, Expr)>,
}

/// The partitioned shape of `plan` for `partition_by`: `Ok(None)` when it has no GROUP BY
/// on top (a linear definition appends to its partitions), `Err(reason)` when a partition
/// column is not one of its group keys.
pub(crate) fn partitioned<'a>(
    plan: &'a LogicalPlan,
    partition_by: &[String],
) -> std::result::Result<Option<Partitioned<'a>>, String> {
    let Some((above, aggregate)) = aggregate::split(plan)? else {
        return Ok(None);
    };
    let [LogicalPlan::Projection(projection)] = above.as_slice() else {
        return Err("its GROUP BY is not right under its SELECT list".into());
    };
    let groups = aggregate.group_expr.len();
    let mut keys = Vec::new();
    for name in partition_by {
        let key = projection
            .schema
            .fields()
            .iter()
            .position(|f| f.name() == name)
            .and_then(|i| match projection.expr[i].clone().unalias() {
                Expr::Column(c) => aggregate.schema.index_of_column(&c).ok(),
                _ => None,
            })
            .filter(|i| *i < groups)
            .map(|i| aggregate.group_expr[i].clone())
            .ok_or_else(|| format!("PARTITION BY column '{name}' is not one of its group keys"))?;
        keys.push((name.clone(), key));
    }
    Ok(Some(Partitioned { aggregate, keys }))
}

/// `plan` as a GROUP BY whose every group key is a column of its output, keyed by all of
/// them: `Ok(None)` when it has no GROUP BY on top, `Err(reason)` when a key is not shown.
pub(crate) fn grouped(plan: &LogicalPlan) -> std::result::Result<Option<Partitioned<'_>>, String> {
    let Some((above, aggregate)) = aggregate::split(plan)? else {
        return Ok(None);
    };
    let [LogicalPlan::Projection(projection)] = above.as_slice() else {
        return Err("its GROUP BY is not right under its SELECT list".into());
    };
    if aggregate.group_expr.is_empty() {
        // Its one group is the whole input: recomputing it is a full refresh.
        return Err("it has no GROUP BY keys, so its one group is all of its input".into());
    }
    let mut keys = Vec::new();
    for (i, key) in aggregate.group_expr.iter().enumerate() {
        let column = Column::from(aggregate.schema.qualified_field(i));
        let name = projection
            .expr
            .iter()
            .zip(projection.schema.fields())
            .find(|(e, _)| matches!((*e).clone().unalias(), Expr::Column(c) if c == column))
            .map(|(_, f)| f.name().clone())
            .ok_or_else(|| format!("its group key {key} is not a column of its output"))?;
        keys.push((name, key.clone()));
    }
    Ok(Some(Partitioned { aggregate, keys }))
}

/// The groups of `aggregate` as a slice that keeps its states stores them: keyed by the
/// hidden key columns ([`aggregate::key_column`]).
pub(crate) fn by_stored_keys(aggregate: &Aggregate) -> Partitioned<'_> {
    let keys = aggregate
        .group_expr
        .iter()
        .enumerate()
        .map(|(i, key)| (aggregate::key_column(i), key.clone()))
        .collect();
    Partitioned { aggregate, keys }
}

impl Partitioned<'_> {
    /// The predicate that picks the rows of `groups` in the slice, by its columns: an `IN`
    /// list for one key (rows are matched against it by a hash set, not one comparison per
    /// group), else one conjunction per group.
    pub(crate) fn picking(&self, groups: &[Vec<ScalarValue>]) -> Expr {
        let [(name, _)] = self.keys.as_slice() else {
            return self.predicate(groups, false);
        };
        let column = Expr::Column(Column::from_name(name));
        let (nulls, values): (Vec<_>, Vec<_>) = groups.iter().partition(|g| g[0].is_null());
        let listed = (!values.is_empty()).then(|| {
            column.clone().in_list(
                values
                    .iter()
                    .map(|g| Expr::Literal(plain(&g[0]), None))
                    .collect(),
                false,
            )
        });
        let null = (!nulls.is_empty()).then(|| column.is_null());
        match (listed, null) {
            (Some(l), Some(n)) => l.or(n),
            (Some(p), None) | (None, Some(p)) => p,
            (None, None) => Expr::Literal(ScalarValue::Boolean(Some(false)), None),
        }
    }

    /// True when `groups`' key values have exactly the types of the slice's stored key
    /// columns in `stored` (a value cast on the way could pick other rows in the slice than
    /// Delta's replaceWhere does), and none is a float (NaN and -0.0 escape file statistics
    /// and equality alike).
    pub(crate) fn stored_alike(
        &self,
        groups: &[Vec<ScalarValue>],
        stored: &datafusion::arrow::datatypes::Schema,
    ) -> bool {
        self.keys.iter().enumerate().all(|(i, (name, _))| {
            stored.field_with_name(name).is_ok_and(|f| {
                !f.data_type().is_floating()
                    && groups
                        .iter()
                        .all(|g| g[i].is_null() || plain(&g[i]).data_type() == *f.data_type())
            })
        })
    }

    /// The slice's next version: its stored rows (`stored`, the definition's columns) but
    /// those of the groups in `touched`, and those groups recomputed.
    pub(crate) fn rebuild(
        &self,
        plan: &LogicalPlan,
        stored: LogicalPlan,
        touched: &[Vec<ScalarValue>],
    ) -> Result<LogicalPlan> {
        let (recompute, picked) = self.recompute(plan, touched)?;
        let columns: Vec<Expr> = recompute
            .schema()
            .fields()
            .iter()
            .map(|f| Expr::Column(Column::from_name(f.name())))
            .collect();
        // IS NOT TRUE: a row whose key is NULL is kept unless a NULL key was picked.
        let kept = LogicalPlanBuilder::from(stored)
            .filter(Expr::IsNotTrue(Box::new(picked)))?
            .project(columns)?
            .build()?;
        Ok(LogicalPlanBuilder::from(recompute).union(kept)?.build()?)
    }

    /// The partitions (one value per partition column) `new_data`, the terms of the
    /// aggregate's input's new rows, falls in; `None` when there are more than
    /// [`MAX_PARTITIONS`] (see [`Self::touched_at_most`]).
    pub(crate) async fn touched(
        &self,
        state: &SessionState,
        new_data: Vec<LogicalPlan>,
    ) -> Result<Option<Vec<Vec<ScalarValue>>>> {
        self.touched_at_most(state, new_data, MAX_PARTITIONS).await
    }

    /// The same, `None` past `most`.
    pub(crate) async fn touched_at_most(
        &self,
        state: &SessionState,
        new_data: Vec<LogicalPlan>,
        most: usize,
    ) -> Result<Option<Vec<Vec<ScalarValue>>>> {
        let keys: Vec<Expr> = self
            .keys
            .iter()
            .map(|(name, key)| key.clone().alias(name))
            .collect();
        // The keys of each part of the new data (whose columns keep their qualifiers), then
        // the distinct ones of all parts, by name.
        let mut union: Option<LogicalPlanBuilder> = None;
        for part in new_data {
            let keyed = LogicalPlanBuilder::from(part)
                .aggregate(keys.clone(), Vec::<Expr>::new())?
                .build()?;
            union = Some(match union {
                None => LogicalPlanBuilder::from(keyed),
                Some(u) => u.union(keyed)?,
            });
        }
        let Some(union) = union else {
            return Ok(Some(Vec::new()));
        };
        let names: Vec<Expr> = self
            .keys
            .iter()
            .map(|(name, _)| Expr::Column(Column::from_name(name)))
            .collect();
        let plan = union
            .aggregate(names, Vec::<Expr>::new())?
            .limit(0, Some(most + 1))?
            .build()?;
        let physical = state.create_physical_plan(&plan).await?;
        let mut stream = datafusion::physical_plan::execute_stream(physical, state.task_ctx())?;
        let mut out = Vec::new();
        while let Some(batch) = stream.try_next().await? {
            for row in 0..batch.num_rows() {
                let values = batch
                    .columns()
                    .iter()
                    .map(|c| ScalarValue::try_from_array(c, row))
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                out.push(values);
            }
        }
        Ok((out.len() <= most).then_some(out))
    }

    /// Rows in one of `partitions`: over the aggregate's input (`keys: true`, by the keys'
    /// expressions) or over the slice (by its partition columns).
    fn predicate(&self, partitions: &[Vec<ScalarValue>], keys: bool) -> Expr {
        let one = |values: &Vec<ScalarValue>| {
            self.keys
                .iter()
                .zip(values)
                .map(|((name, key), value)| {
                    let target = match keys {
                        true => key.clone(),
                        false => Expr::Column(Column::from_name(name)),
                    };
                    match value.is_null() {
                        true => target.is_null(),
                        false => target.eq(Expr::Literal(plain(value), None)),
                    }
                })
                .reduce(Expr::and)
                .unwrap_or(Expr::Literal(ScalarValue::Boolean(Some(true)), None))
        };
        partitions
            .iter()
            .map(one)
            .reduce(Expr::or)
            .unwrap_or(Expr::Literal(ScalarValue::Boolean(Some(false)), None))
    }

    /// The definition `plan` over only the rows of `partitions`, and the predicate that picks
    /// those partitions in the slice.
    pub(crate) fn recompute(
        &self,
        plan: &LogicalPlan,
        partitions: &[Vec<ScalarValue>],
    ) -> Result<(LogicalPlan, Expr)> {
        let filter = self.predicate(partitions, true);
        let target = self.aggregate;
        let plan = plan
            .clone()
            .transform_down(|node| match &node {
                LogicalPlan::Aggregate(a) if a == target => {
                    let input = LogicalPlanBuilder::from((*a.input).clone())
                        .filter(filter.clone())?
                        .build()?;
                    let a = Aggregate::try_new(
                        std::sync::Arc::new(input),
                        a.group_expr.clone(),
                        a.aggr_expr.clone(),
                    )?;
                    Ok(Transformed::yes(LogicalPlan::Aggregate(a)))
                }
                _ => Ok(Transformed::no(node)),
            })?
            .data;
        Ok((plan, self.predicate(partitions, false)))
    }
}

/// `value` as the slice stores it: Delta has no string views.
fn plain(value: &ScalarValue) -> ScalarValue {
    match value {
        ScalarValue::Utf8View(v) | ScalarValue::LargeUtf8(v) => ScalarValue::Utf8(v.clone()),
        ScalarValue::BinaryView(v) | ScalarValue::LargeBinary(v) => ScalarValue::Binary(v.clone()),
        other => other.clone(),
    }
}
