//! The check that an incremental write keeps the slice's columns ([`keep_columns`]): the
//! columns it would write, as Delta records them, against those a full build writes and those
//! the slice stores.

use std::sync::Arc;

use datafusion::logical_expr::LogicalPlan;
use deltalake::DeltaTable;

use super::{full, full_plan, Decision};
use crate::error::Result;
use crate::slice::meta::BuildMode;
use crate::slice::SliceSpec;

/// `decision`, an incremental one for `plan` on top of the stored version `existing`, or a
/// full build when the columns it would write are not exactly those a full build writes
/// (names, Delta types, nullability) or those the slice stores: an incremental write must
/// never change the slice's schema.
pub(crate) fn keep_columns(
    decision: Decision,
    spec: &SliceSpec,
    plan: &LogicalPlan,
    existing: Option<&DeltaTable>,
) -> Result<Decision> {
    // Nothing is written when nothing changed (an empty relation of the table's columns).
    if decision.built.mode == BuildMode::Full
        || matches!(decision.plan, LogicalPlan::EmptyRelation(_))
    {
        return Ok(decision);
    }
    let full_plan = full_plan(spec, plan)?;
    let written = decision.plan.schema().as_arrow();
    let mut why = columns_differ(
        written,
        full_plan.schema().as_arrow(),
        "a full refresh writes",
    );
    if let (None, Some(table)) = (&why, existing) {
        let stored = table.snapshot()?.snapshot().arrow_schema();
        why = columns_differ(written, &stored, "the slice stores");
    }
    Ok(match why {
        Some(why) => full(
            full_plan,
            format!("an incremental write would change the slice's columns: {why}"),
        ),
        None => decision,
    })
}

/// How the columns `written` differ from `expected` (which `label` names) as Delta records
/// them (normalized as Delta's writer does): names, Delta types, nullability; `None` when
/// they are the same. Delta stores no string views, unsigned integers or timestamps in
/// seconds, so those differ from their Delta type only in Arrow.
pub(super) fn columns_differ(
    written: &datafusion::arrow::datatypes::Schema,
    expected: &datafusion::arrow::datatypes::Schema,
    label: &str,
) -> Option<String> {
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
    use deltalake::kernel::schema::cast::normalize_for_delta;
    use deltalake::kernel::StructField;
    // As the writer normalizes them (seconds and nanoseconds to microseconds, ...).
    let written = normalize_for_delta(&Arc::new(written.clone()));
    let expected = normalize_for_delta(&Arc::new(expected.clone()));
    let delta =
        |f: &datafusion::arrow::datatypes::Field| TryIntoKernel::<StructField>::try_into_kernel(f);
    let shown = |f: &StructField| match f.is_nullable() {
        true => f.data_type().to_string(),
        false => format!("{} NOT NULL", f.data_type()),
    };
    if written.fields().len() != expected.fields().len() {
        return Some(format!(
            "{} columns, where {label} {}",
            written.fields().len(),
            expected.fields().len()
        ));
    }
    for field in written.fields() {
        let Ok(other) = expected.field_with_name(field.name()) else {
            return Some(format!(
                "column '{}', which is not among those {label}",
                field.name()
            ));
        };
        let differs = match (delta(field), delta(other)) {
            (Ok(mine), Ok(theirs)) => (mine.data_type() != theirs.data_type()
                || mine.is_nullable() != theirs.is_nullable())
            .then(|| (shown(&mine), shown(&theirs))),
            // A type Delta has no name for: the Arrow types must be the very same.
            _ => (field.data_type() != other.data_type()
                || field.is_nullable() != other.is_nullable())
            .then(|| (field.to_string(), other.to_string())),
        };
        if let Some((mine, theirs)) = differs {
            return Some(format!(
                "column '{}' as {mine}, where {label} {theirs}",
                field.name(),
            ));
        }
    }
    None
}
