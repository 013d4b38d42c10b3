//! The state wrappers of an aggregate ([`StateUdaf`]): `partial`, `merge` and `final`, each
//! driving the aggregate's own accumulator to read or write its state, and which aggregates
//! can be wrapped at all ([`wrap`]).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray, StructArray};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema};
use datafusion::common::{DFSchemaRef, ScalarValue};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::type_coercion::functions::fields_with_udf;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, ExprSchemable, GroupsAccumulator,
    Signature, Volatility,
};
use datafusion::physical_expr::expressions::Column as PhysicalColumn;
use datafusion::physical_expr::PhysicalExpr;

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
pub(super) struct Wrapped {
    /// The original call's arguments, cast to the types the aggregate takes.
    pub(super) args: Vec<Expr>,
    pub(super) filter: Option<Box<Expr>>,
    /// Its state's fields.
    pub(super) state: Fields,
    pub(super) partial: Arc<AggregateUDF>,
    pub(super) merge: Arc<AggregateUDF>,
    pub(super) final_: Arc<AggregateUDF>,
}

/// Wraps `expr`, an aggregate call of the definition over `input`, or says why it cannot be.
pub(super) fn wrap(expr: &Expr, input: &DFSchemaRef) -> std::result::Result<Wrapped, String> {
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
