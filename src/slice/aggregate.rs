//! Incremental aggregates: a `GROUP BY` slice keeps, beside each group's values, the
//! aggregates' intermediate states (DataFusion's own: a sum and a count for `avg`, a sketch for
//! `approx_distinct`), so that a refresh merges the states of the new data into them instead
//! of reading all of the input again.
//!
//! A slice whose definition is `SELECT … FROM (filters, projections, UNION ALL, inner joins)
//! GROUP BY keys` is built as
//!
//! ```text
//! definition's projections ( final(state) per group )
//!   └ GROUP BY key columns: final(state), merge(state)
//!       └ UNION ALL ( the slice's stored keys and states,            -- incremental only
//!                     GROUP BY keys: partial(args) over the new data ) -- all of the input when full
//! ```
//!
//! where `partial`, `merge` and `final` wrap each aggregate's own accumulator ([`StateUdaf`]):
//! `partial` updates it with rows and outputs its state, `merge` merges states and outputs the
//! state, `final` merges states and outputs the value. The keys and states are stored in hidden
//! columns (`__icepie_key_<i>`, `__icepie_state_<i>`) that the slice's table provider does not
//! show. Every aggregate whose accumulator merges its states is supported; DISTINCT and
//! ordered aggregates, and those whose state is every value (median, percentiles, array_agg,
//! string_agg), are refreshed in full.
//!
//! # Invariants
//!
//! - Merging stored states with the new rows' gives what aggregating all rows gives
//!   (invariant 9; `incremental::incremental_equals_full_over_random_appends`, shapes
//!   `grouped`, `joined_totals`, `self_totals`, `overall`).
//! - States are merged only into stored states of the same fields, names and order
//!   ([`holds_states`]); anything else is a full refresh.
//! - The hidden columns never show in a slice's schema, however it is read
//!   (`incremental::hidden_state_stays_hidden_when_delta_rs_reads_the_slice`).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray, StructArray};
use datafusion::arrow::compute::can_cast_types;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema};
use datafusion::common::tree_node::TreeNode;
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::type_coercion::functions::fields_with_udf;
use datafusion::logical_expr::{
    Accumulator, Aggregate, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, ExprSchemable,
    GroupsAccumulator, LogicalPlan, LogicalPlanBuilder, Projection, Signature, SubqueryAlias,
    Volatility,
};
use datafusion::physical_expr::expressions::Column as PhysicalColumn;
use datafusion::physical_expr::PhysicalExpr;

use super::as_planned::as_planned;

/// Prefix of the columns icepie keeps in a slice for itself.
pub(crate) const HIDDEN: &str = "__icepie_";

pub(crate) fn key_column(i: usize) -> String {
    format!("{HIDDEN}key_{i}")
}

fn state_column(i: usize) -> String {
    format!("{HIDDEN}state_{i}")
}

/// What a wrapped aggregate does with its input and outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Phase {
    /// Rows in, state out.
    Partial,
    /// States in, state out.
    Merge,
    /// States in, value out.
    Final,
}

/// One aggregate of a definition wrapped to read or write its state (see the module doc).
#[derive(Debug)]
struct StateUdaf {
    inner: Arc<AggregateUDF>,
    phase: Phase,
    name: String,
    signature: Signature,
    /// The inner aggregate's arguments (after type coercion), result and state.
    args: Vec<FieldRef>,
    returns: FieldRef,
    state: Fields,
}

impl PartialEq for StateUdaf {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner
            && self.phase == other.phase
            && self.args == other.args
            && self.returns == other.returns
    }
}

impl Eq for StateUdaf {}

impl Hash for StateUdaf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.inner.name().hash(state);
        self.phase.hash(state);
        self.args.hash(state);
    }
}

impl StateUdaf {
    /// The state as one struct value.
    fn state_type(&self) -> DataType {
        DataType::Struct(self.state.clone())
    }

    /// The inner aggregate's accumulator arguments: its (coerced) argument fields as columns.
    fn with_inner_args<T>(&self, f: impl FnOnce(AccumulatorArgs) -> T) -> T {
        inner_args(&self.args, &self.returns, &self.name, f)
    }

    /// The columns of a state struct, as the inner accumulator merges them.
    fn unpack(values: &[ArrayRef]) -> DFResult<Vec<ArrayRef>> {
        let state = values
            .first()
            .and_then(|v| v.as_struct_opt())
            .ok_or_else(|| DataFusionError::Internal("aggregate state is not a struct".into()))?;
        Ok(state.columns().to_vec())
    }

    fn pack(&self, columns: Vec<ArrayRef>) -> DFResult<ArrayRef> {
        Ok(Arc::new(StructArray::try_new(
            self.state.clone(),
            columns,
            None,
        )?))
    }
}

/// Accumulator arguments of an aggregate over columns of the types `args`, returning `returns`.
fn inner_args<T>(
    args: &[FieldRef],
    returns: &FieldRef,
    name: &str,
    f: impl FnOnce(AccumulatorArgs) -> T,
) -> T {
    let schema = Schema::new(args.to_vec());
    let exprs: Vec<Arc<dyn PhysicalExpr>> = args
        .iter()
        .enumerate()
        .map(|(i, f)| Arc::new(PhysicalColumn::new(f.name(), i)) as Arc<dyn PhysicalExpr>)
        .collect();
    f(AccumulatorArgs {
        return_field: returns.clone(),
        schema: &schema,
        ignore_nulls: false,
        order_bys: &[],
        is_reversed: false,
        name,
        is_distinct: false,
        exprs: &exprs,
        expr_fields: args,
    })
}

impl AggregateUDFImpl for StateUdaf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(match self.phase {
            Phase::Final => self.returns.data_type().clone(),
            Phase::Partial | Phase::Merge => self.state_type(),
        })
    }

    fn is_nullable(&self) -> bool {
        // The value is the inner aggregate's, as nullable as it (so a slice keeping states
        // has the columns of one that does not: `count` is NOT NULL in both); states may be
        // missing.
        match self.phase {
            Phase::Final => self.returns.is_nullable(),
            Phase::Partial | Phase::Merge => true,
        }
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DFResult<Vec<FieldRef>> {
        Ok(self
            .state
            .iter()
            .map(|f| {
                Arc::new(Field::new(
                    format!("{}[{}]", args.name, f.name()),
                    f.data_type().clone(),
                    true,
                ))
            })
            .collect())
    }

    fn accumulator(&self, _acc_args: AccumulatorArgs) -> DFResult<Box<dyn Accumulator>> {
        let inner = self.with_inner_args(|a| self.inner.accumulator(a))?;
        Ok(Box::new(StateAccumulator {
            inner,
            phase: self.phase,
            state: self.state.clone(),
        }))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        self.with_inner_args(|a| self.inner.groups_accumulator_supported(a))
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> DFResult<Box<dyn GroupsAccumulator>> {
        let inner = self.with_inner_args(|a| self.inner.create_groups_accumulator(a))?;
        Ok(Box::new(StateGroupsAccumulator {
            inner,
            udaf: StateUdaf {
                inner: self.inner.clone(),
                phase: self.phase,
                name: self.name.clone(),
                signature: self.signature.clone(),
                args: self.args.clone(),
                returns: self.returns.clone(),
                state: self.state.clone(),
            },
        }))
    }
}

/// [`StateUdaf`]'s row-by-row accumulator.
#[derive(Debug)]
struct StateAccumulator {
    inner: Box<dyn Accumulator>,
    phase: Phase,
    state: Fields,
}

impl Accumulator for StateAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DFResult<()> {
        match self.phase {
            Phase::Partial => self.inner.update_batch(values),
            Phase::Merge | Phase::Final => self.inner.merge_batch(&StateUdaf::unpack(values)?),
        }
    }

    fn evaluate(&mut self) -> DFResult<ScalarValue> {
        match self.phase {
            Phase::Final => self.inner.evaluate(),
            Phase::Partial | Phase::Merge => {
                let columns = self
                    .inner
                    .state()?
                    .into_iter()
                    .map(|v| v.to_array())
                    .collect::<DFResult<Vec<_>>>()?;
                let array = StructArray::try_new(self.state.clone(), columns, None)?;
                Ok(ScalarValue::Struct(Arc::new(array)))
            }
        }
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn state(&mut self) -> DFResult<Vec<ScalarValue>> {
        self.inner.state()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DFResult<()> {
        self.inner.merge_batch(states)
    }
}

/// [`StateUdaf`]'s accumulator of many groups at once.
struct StateGroupsAccumulator {
    inner: Box<dyn GroupsAccumulator>,
    udaf: StateUdaf,
}

impl GroupsAccumulator for StateGroupsAccumulator {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DFResult<()> {
        match self.udaf.phase {
            Phase::Partial => {
                self.inner
                    .update_batch(values, group_indices, opt_filter, total_num_groups)
            }
            Phase::Merge | Phase::Final => {
                self.inner
                    .merge_batch(&StateUdaf::unpack(values)?, group_indices, total_num_groups)
            }
        }
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> DFResult<ArrayRef> {
        match self.udaf.phase {
            Phase::Final => self.inner.evaluate(emit_to),
            Phase::Partial | Phase::Merge => {
                let columns = self.inner.state(emit_to)?;
                self.udaf.pack(columns)
            }
        }
    }

    fn state(&mut self, emit_to: EmitTo) -> DFResult<Vec<ArrayRef>> {
        self.inner.state(emit_to)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> DFResult<()> {
        self.inner
            .merge_batch(values, group_indices, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> DFResult<Vec<ArrayRef>> {
        match self.udaf.phase {
            Phase::Partial => self.inner.convert_to_state(values, opt_filter),
            Phase::Merge | Phase::Final => StateUdaf::unpack(values),
        }
    }

    fn size(&self) -> usize {
        self.inner.size()
    }
}

/// Aggregates whose state is every value they saw: merging it costs what recomputing does.
const HOLISTIC: [&str; 7] = [
    "median",
    // A t-digest: its merge depends on how rows were split, so it is not exact.
    "approx_median",
    "percentile_cont",
    "array_agg",
    "string_agg",
    "quantile_cont",
    "mode",
];

/// Aggregates whose value depends on the order rows arrive in, unless given an ORDER BY.
pub(crate) const ORDER_DEPENDENT: [&str; 5] = [
    "first_value",
    "last_value",
    "nth_value",
    "array_agg",
    "string_agg",
];

/// One aggregate of the definition and its three wrappers.
struct Wrapped {
    /// The original call's arguments, cast to the types the aggregate takes.
    args: Vec<Expr>,
    filter: Option<Box<Expr>>,
    /// Its state's fields.
    state: Fields,
    partial: Arc<AggregateUDF>,
    merge: Arc<AggregateUDF>,
    final_: Arc<AggregateUDF>,
}

/// Wraps `expr`, an aggregate call of the definition over `input`, or says why it cannot be.
fn wrap(expr: &Expr, input: &DFSchemaRef) -> std::result::Result<Wrapped, String> {
    let call = match expr {
        Expr::AggregateFunction(call) => call,
        Expr::Alias(alias) => return wrap(&alias.expr, input),
        other => return Err(format!("the aggregate {other} is not a plain call")),
    };
    let name = call.func.name().to_string();
    let params = &call.params;
    if params.distinct {
        return Err(format!("{name}(DISTINCT …) keeps every distinct value"));
    }
    // Most aggregates declare no order sensitivity at all (DataFusion's default is to
    // assume one), so the known order-dependent ones are named.
    if !params.order_by.is_empty() || ORDER_DEPENDENT.contains(&name.as_str()) {
        return Err(format!("{name}() depends on the order of its input"));
    }
    if HOLISTIC.contains(&name.as_str()) || name.starts_with("approx_percentile") {
        return Err(format!("{name}() keeps every value it sees"));
    }
    let fields = params
        .args
        .iter()
        .map(|a| a.to_field(input.as_ref()).map(|(_, f)| f))
        .collect::<DFResult<Vec<FieldRef>>>()
        .map_err(|e| e.to_string())?;
    let coerced =
        fields_with_udf(&fields, call.func.as_ref()).map_err(|e| format!("{name}(): {e}"))?;
    let returns = call
        .func
        .return_field(&coerced)
        .map_err(|e| format!("{name}(): {e}"))?;
    let state: Fields = call
        .func
        .state_fields(StateFieldsArgs {
            name: &name,
            input_fields: &coerced,
            return_field: returns.clone(),
            ordering_fields: &[],
            is_distinct: false,
        })
        .map_err(|e| format!("{name}(): {e}"))?
        .iter()
        .map(|f| Field::new(f.name(), f.data_type().clone(), true))
        .collect();
    // The state is stored in the slice: a type Delta has none for (a `Decimal256` sum of
    // decimals) would fail every build of the slice.
    for field in state.iter() {
        use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
        use deltalake::kernel::StructField;
        if TryIntoKernel::<StructField>::try_into_kernel(field.as_ref()).is_err() {
            return Err(format!(
                "{name}()'s state holds a {}, which Delta cannot store",
                field.data_type()
            ));
        }
    }
    let args = params
        .args
        .iter()
        .zip(&coerced)
        .map(|(a, f)| a.clone().cast_to(f.data_type(), input.as_ref()))
        .collect::<DFResult<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    let make = |phase: Phase, inputs: Vec<DataType>| {
        Arc::new(AggregateUDF::new_from_impl(StateUdaf {
            inner: call.func.clone(),
            phase,
            name: format!(
                "icepie_{}_{name}",
                match phase {
                    Phase::Partial => "partial",
                    Phase::Merge => "merge",
                    Phase::Final => "final",
                }
            ),
            signature: Signature::exact(inputs, Volatility::Immutable),
            args: coerced.clone(),
            returns: returns.clone(),
            state: state.clone(),
        }))
    };
    // The wrappers make the accumulator from the arguments' types alone: an aggregate that
    // needs more (a literal argument, say) is refreshed in full.
    if let Err(e) = inner_args(&coerced, &returns, &name, |a| call.func.accumulator(a)) {
        return Err(format!("{name}() cannot be rebuilt from its state: {e}"));
    }
    let state_type = DataType::Struct(state.clone());
    Ok(Wrapped {
        args,
        filter: params.filter.clone(),
        state: state.clone(),
        partial: make(
            Phase::Partial,
            coerced.iter().map(|f| f.data_type().clone()).collect(),
        ),
        merge: make(Phase::Merge, vec![state_type.clone()]),
        final_: make(Phase::Final, vec![state_type]),
    })
}

/// A definition of the aggregate shape: nodes above the aggregate, the aggregate, its input.
pub(crate) struct Shape<'a> {
    /// Projections and aliases above the aggregate, top first.
    above: Vec<&'a LogicalPlan>,
    pub aggregate: &'a Aggregate,
    /// Everything below the aggregate: where new data enters.
    pub input: &'a LogicalPlan,
    wrapped: Vec<Wrapped>,
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
