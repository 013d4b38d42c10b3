//! A column passed on with the nullability its logical plan gives it.
//!
//! DataFusion's optimizer can make a physical expression claim that it may be null where the
//! logical plan proved it never is: common-subexpression elimination turns
//! `coalesce(v, 0.5)` (simplified to `CASE WHEN v IS NOT NULL THEN v ELSE 0.5 END`) into
//! `CASE WHEN __common_expr_1 THEN v ELSE 0.5 END` when `v IS NOT NULL` also appears in an
//! aggregate's argument, and the rewritten `CASE` no longer knows its guard. Harmless on its
//! own, the mismatch fails the physical planning of any aggregate above it ("Physical input
//! schema should be the same as the one converted from logical input schema"): exactly what
//! merging stored aggregate states does with the keys of new rows. [`as_planned`] passes a
//! column through with the logical plan's nullability, so the merge sees the same on both sides.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{DFSchema, ExprSchema};
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::ExprSchemable;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};

/// The identity function, declaring the nullability it was made with.
#[derive(Debug, PartialEq, Eq, Hash)]
struct AsPlanned {
    signature: Signature,
    nullable: bool,
}

impl ScalarUDFImpl for AsPlanned {
    fn name(&self) -> &str {
        "__icepie_as_planned"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(arg_types[0].clone())
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DFResult<FieldRef> {
        let arg = &args.arg_fields[0];
        Ok(Arc::new(Field::new(
            self.name(),
            arg.data_type().clone(),
            self.nullable,
        )))
    }

    fn is_nullable(&self, _args: &[Expr], _schema: &dyn ExprSchema) -> bool {
        self.nullable
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        Ok(args.args[0].clone())
    }
}

/// `expr` (a column of `schema`) declared as nullable as `schema` says it is.
pub(crate) fn as_planned(expr: Expr, schema: &DFSchema) -> DFResult<Expr> {
    let nullable = expr.nullable(schema)?;
    let udf = ScalarUDF::new_from_impl(AsPlanned {
        signature: Signature::any(1, Volatility::Immutable),
        nullable,
    });
    Ok(udf.call(vec![expr]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float64Array, RecordBatch};
    use datafusion::arrow::datatypes::Schema;
    use datafusion::prelude::*;

    /// The physical plan declares what the logical plan proved, and the values pass as they are.
    #[tokio::test]
    async fn a_column_keeps_its_logical_nullability_and_its_values() {
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Float64, true)]));
        let values = Float64Array::from(vec![Some(1.0), None]);
        let batch = RecordBatch::try_new(schema, vec![Arc::new(values.clone())]).unwrap();
        ctx.register_batch("t", batch).unwrap();
        let df = ctx.table("t").await.unwrap();
        let df = df
            .select(vec![
                col("v"),
                coalesce(vec![col("v"), lit(0.5)]).alias("k"),
            ])
            .unwrap();
        let exprs = vec![
            as_planned(col("v"), df.schema()).unwrap().alias("v"),
            as_planned(col("k"), df.schema()).unwrap().alias("k"),
        ];
        let out = df.select(exprs).unwrap().collect().await.unwrap();
        let schema = out[0].schema();
        assert!(schema.field(0).is_nullable());
        assert!(!schema.field(1).is_nullable());
        assert_eq!(
            out[0].column(0).as_ref(),
            &values as &dyn datafusion::arrow::array::Array
        );
        let k = Float64Array::from(vec![1.0, 0.5]);
        assert_eq!(
            out[0].column(1).as_ref(),
            &k as &dyn datafusion::arrow::array::Array
        );
    }
}
