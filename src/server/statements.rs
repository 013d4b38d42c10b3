//! Running a client's statement, shared by both servers (PostgreSQL and Flight SQL): its
//! admission under the server's policy (session statements answered without running), its
//! execution within the statement's memory, the rows a writing statement counts, and the
//! types of the `$n` parameters a plan expects.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use futures::TryStreamExt;

use super::policy::Policy;
use crate::engine::IcePie;
use crate::error::IcePieError;
use crate::slice::freshness;
use crate::sql::Statement;

/// PostgreSQL's limit on a statement's parameters (Bind counts them in 16 bits).
const MAX_PARAMETERS: usize = 65_535;

/// A client's session statement, answered without running anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Session {
    Begin,
    Commit,
    Rollback,
    /// `SET` of a PostgreSQL session variable.
    Set,
}

/// Refuses a client's `statement` when the server's `policy` does not allow it (it writes on a
/// read-only server, or names a location outside the allowed ones), and tells the session
/// statements, which are answered without running anything.
pub(super) fn admit(
    policy: &Policy,
    statement: &Statement,
) -> Result<Option<Session>, IcePieError> {
    policy.check(statement)?;
    session(statement)
}

/// What a client's session statements do:
/// - `BEGIN`, `START TRANSACTION`, `COMMIT`, `END` and a bare `ROLLBACK` are accepted and group
///   nothing (every statement commits on its own); savepoints are refused;
/// - `SET` of a PostgreSQL session variable (`application_name`, `extra_float_digits`,
///   `DateStyle`: what drivers send on connect) is accepted and changes nothing; the settings
///   of DataFusion and icepie are the server's, for every client: `SET` or `RESET` of them is
///   refused.
fn session(statement: &Statement) -> Result<Option<Session>, IcePieError> {
    let Statement::DataFusion(inner) = statement else {
        return Ok(None);
    };
    if let Some(variable) = super::policy::shared_setting(&inner.0) {
        return Err(IcePieError::NotAllowed(format!(
            "{variable} is a setting of the server, shared by every client: start the server \
             with --set to change it"
        )));
    }
    let DFStatement::Statement(sql) = &*inner.0 else {
        return Ok(None);
    };
    match &**sql {
        SqlStatement::StartTransaction { .. } => Ok(Some(Session::Begin)),
        SqlStatement::Commit { .. } => Ok(Some(Session::Commit)),
        SqlStatement::Rollback {
            savepoint: None, ..
        } => Ok(Some(Session::Rollback)),
        SqlStatement::Rollback { .. } | SqlStatement::Savepoint { .. } => Err(
            IcePieError::DataFusion(datafusion::error::DataFusionError::NotImplemented(
                "savepoints are not supported: every statement commits on its own".into(),
            )),
        ),
        SqlStatement::Set(_) => Ok(Some(Session::Set)),
        _ => Ok(None),
    }
}

/// Runs a client's `statement` (that [`admit`] let through) with `params`; on a read-only
/// server, a stale slice is not refreshed for a reader either. The returned rows are computed
/// within the policy's memory for a statement.
pub(super) async fn execute(
    warehouse: &IcePie,
    policy: &Policy,
    statement: Statement,
    params: ParamValues,
) -> Result<datafusion::dataframe::DataFrame, IcePieError> {
    let execute = warehouse.execute_with_params(statement, params);
    let frame = match policy.read_only() {
        true => freshness::with_mode(freshness::Mode::ReadOnly, execute).await,
        false => execute.await,
    }?;
    let Some(limit) = policy.statement_memory() else {
        return Ok(frame);
    };
    // Its own pool: a statement that outgrows it fails alone, and spills where it can.
    let (state, plan) = frame.into_parts();
    let mut state = crate::slice::budgeted_state(&state, limit)?;
    // Each sort partition sets aside this much for merging its spills, which cannot spill
    // itself: kept to a quarter of the pool, shared by the partitions, so that a small
    // limit still sorts.
    let options = state.config_mut().options_mut();
    let partitions = options.execution.target_partitions.max(1);
    let share = usize::try_from(limit).unwrap_or(usize::MAX) / (4 * partitions);
    options.execution.sort_spill_reservation_bytes =
        options.execution.sort_spill_reservation_bytes.min(share);
    Ok(datafusion::dataframe::DataFrame::new(state, plan))
}

/// True for the statements whose result is the count of rows they wrote.
pub(super) fn counts_rows(statement: &Statement) -> bool {
    match statement {
        Statement::DataFusion(inner) => match &*inner.0 {
            DFStatement::CopyTo(_) => true,
            DFStatement::Statement(s) => matches!(
                **s,
                SqlStatement::Insert(_) | SqlStatement::Update { .. } | SqlStatement::Delete(_)
            ),
            _ => false,
        },
        _ => false,
    }
}

/// The rows a statement that [`counts_rows`] wrote: the sum of its result's first column.
pub(super) async fn written(
    stream: datafusion::physical_plan::SendableRecordBatchStream,
) -> Result<u64, IcePieError> {
    let mut stream = stream;
    let mut count = 0;
    while let Some(batch) = stream.try_next().await? {
        count += written_in(&batch);
    }
    Ok(count)
}

/// The rows counted in one batch of a writing statement's result (its first column).
pub(super) fn written_in(batch: &datafusion::arrow::array::RecordBatch) -> u64 {
    batch
        .column(0)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::UInt64Array>()
        .map(|a| a.iter().flatten().sum())
        .unwrap_or(0)
}

/// True when the rows `plan` returns are those of its schema, known before it runs (not DDL,
/// DML, COPY, SET, nor DESCRIBE, which icepie answers with its own columns).
pub(super) fn returns_rows(plan: &LogicalPlan) -> bool {
    !matches!(
        plan,
        LogicalPlan::Ddl(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::DescribeTable(_)
    )
}

/// The Arrow type `plan` expects for each of its `$n` parameters, in order (`None` when the
/// query leaves it open); refuses numbers beyond PostgreSQL's limit.
pub(super) fn parameter_slots(plan: &LogicalPlan) -> Result<Vec<Option<DataType>>, IcePieError> {
    let types = plan.get_parameter_types()?;
    let mut numbered: Vec<(usize, Option<DataType>)> = Vec::with_capacity(types.len());
    for (id, ty) in types {
        let n = id
            .strip_prefix('$')
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=MAX_PARAMETERS).contains(n))
            .ok_or_else(|| {
                IcePieError::Syntax(format!(
                    "parameter {id} is not one of $1 to ${MAX_PARAMETERS}"
                ))
            })?;
        numbered.push((n, ty.filter(|t| *t != DataType::Null)));
    }
    let count = numbered.iter().map(|(n, _)| *n).max().unwrap_or(0);
    let mut out = vec![None; count];
    for (n, ty) in numbered {
        out[n - 1] = ty;
    }
    Ok(out)
}
