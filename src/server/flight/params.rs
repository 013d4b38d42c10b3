//! Flight SQL's prepared statements: one statement of a command (its `?` placeholders
//! numbered), the prepared statements kept by handle, and the rows of parameters clients bind
//! to them, each value cast to the type its `$n` expects.

use std::sync::Arc;
use std::time::Instant;

use arrow_flight::error::FlightError;
use arrow_flight::sql::server::PeekableFlightDataStream;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, DoPutPreparedStatementResult,
};
use arrow_flight::{IpcMessage, SchemaAsIpc};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::common::{ParamValues, ScalarValue};
use futures::{Stream, TryStreamExt};
use tonic::{Request, Status};

use super::{expire, lock, status, Flight, FlightResult, IDLE_TTL, MAX_PREPARED};
use crate::engine::IcePie;
use crate::error::IcePieError;
use crate::server::statements::{parameter_slots, returns_rows};
use crate::sql::Statement;

/// A prepared statement and the parameters last bound to it.
pub(super) struct PreparedEntry {
    statement: Statement,
    params: ParamValues,
    /// The Arrow type of each `$n`, when the plan says.
    slots: Vec<Option<DataType>>,
    at: Instant,
}

impl Flight {
    /// The statement, bound parameters and parameter types of a prepared statement.
    #[allow(clippy::result_large_err)]
    pub(super) fn prepared_statement(
        &self,
        handle: &[u8],
    ) -> std::result::Result<(Statement, ParamValues, Vec<Option<DataType>>), Status> {
        let handle = String::from_utf8_lossy(handle);
        let mut prepared = lock(&self.prepared);
        let entry = prepared.get_mut(handle.as_ref()).ok_or_else(|| {
            Status::not_found(format!(
                "no prepared statement {handle}: it was closed, or unused for {} hours; \
                 prepare it again",
                IDLE_TTL.as_secs() / 3600
            ))
        })?;
        entry.at = Instant::now();
        Ok((
            entry.statement.clone(),
            entry.params.clone(),
            entry.slots.clone(),
        ))
    }

    /// Prepares `query`'s statement (refused here when the server's policy refuses it) and
    /// describes its rows, when known before it runs, and its parameters.
    pub(super) async fn create_prepared(
        &self,
        query: ActionCreatePreparedStatementRequest,
    ) -> FlightResult<ActionCreatePreparedStatementResult> {
        let statement = one_statement(&query.query)?;
        self.policy.check(&statement).map_err(|e| status(&e))?;
        let plan = self
            .warehouse
            .plan(&statement)
            .await
            .map_err(|e| status(&e))?;
        let slots = match &plan {
            Some(plan) => parameter_slots(plan).map_err(|e| status(&e))?,
            None => vec![],
        };
        let dataset = match &plan {
            Some(plan) if returns_rows(plan) => Some(Arc::new(plan.schema().as_arrow().clone())),
            Some(_) => None,
            None => self
                .warehouse
                .result_schema(&statement)
                .await
                .map_err(|e| status(&e))?,
        };
        let parameters = Schema::new(
            slots
                .iter()
                .enumerate()
                .map(|(i, ty)| {
                    Field::new(
                        format!("${}", i + 1),
                        ty.clone().unwrap_or(DataType::Utf8),
                        true,
                    )
                })
                .collect::<Vec<_>>(),
        );
        let ipc = |schema: &Schema| -> FlightResult<bytes::Bytes> {
            let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
                .try_into()
                .map_err(|e: datafusion::arrow::error::ArrowError| status(&e.into()))?;
            Ok(bytes)
        };
        let handle = uuid::Uuid::new_v4().to_string();
        {
            let mut prepared = lock(&self.prepared);
            expire(&mut prepared, IDLE_TTL, MAX_PREPARED, |p| p.at);
            prepared.insert(
                handle.clone(),
                PreparedEntry {
                    statement,
                    params: ParamValues::List(vec![]),
                    slots,
                    at: Instant::now(),
                },
            );
        }
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into_bytes().into(),
            dataset_schema: match dataset {
                Some(schema) => ipc(&schema)?,
                None => bytes::Bytes::new(),
            },
            parameter_schema: ipc(&parameters)?,
        })
    }

    /// Binds the row of parameters a client sent for a prepared query (one at most), for its
    /// next run.
    pub(super) async fn bind_parameters(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> FlightResult<DoPutPreparedStatementResult> {
        let handle = query.prepared_statement_handle.clone();
        let (_, _, slots) = self.prepared_statement(&handle)?;
        // One row: a query runs once. Read as it arrives; refused at a second row.
        let mut batches = std::pin::pin!(parameter_batches(request));
        let mut params = None;
        while let Some(batch) = batches.try_next().await? {
            for row in 0..batch.num_rows() {
                if params.is_some() {
                    return Err(Status::invalid_argument(
                        "more than one row of parameters was bound to a query; bind one row \
                         and run the query once per row",
                    ));
                }
                params = Some(bind_row(&batch, row, &slots)?);
            }
        }
        let key = String::from_utf8_lossy(&handle).to_string();
        if let Some(entry) = lock(&self.prepared).get_mut(&key) {
            entry.params = params.unwrap_or(ParamValues::List(vec![]));
            entry.at = Instant::now();
        }
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(handle),
        })
    }

    /// Runs a prepared update once per row of parameters sent with it, or once with the
    /// parameters bound before when none is: the rows it wrote, or -1 when it writes none it
    /// counts.
    pub(super) async fn update_prepared(
        &self,
        query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> FlightResult<i64> {
        let (statement, params, slots) =
            self.prepared_statement(&query.prepared_statement_handle)?;
        // Rows sent with the update run it once each (a driver's executemany), as they
        // arrive; without any, it runs once with the parameters bound before.
        let mut batches = std::pin::pin!(parameter_batches(request));
        let (mut total, mut runs) = (-1i64, 0usize);
        while let Some(batch) = batches.try_next().await? {
            for row in 0..batch.num_rows() {
                let params = bind_row(&batch, row, &slots)?;
                let n = self.update(statement.clone(), params).await?;
                runs += 1;
                if n >= 0 {
                    total = total.max(0).saturating_add(n);
                }
            }
        }
        if runs == 0 {
            return self.update(statement, params).await;
        }
        Ok(total)
    }

    /// Drops a prepared statement.
    pub(super) async fn close_prepared(
        &self,
        query: ActionClosePreparedStatementRequest,
    ) -> FlightResult<()> {
        let key = String::from_utf8_lossy(&query.prepared_statement_handle).to_string();
        lock(&self.prepared).remove(&key);
        Ok(())
    }
}

/// Exactly one statement of `sql`.
#[allow(clippy::result_large_err)]
pub(super) fn one_statement(sql: &str) -> std::result::Result<Statement, Status> {
    let mut statements = IcePie::parse(sql).map_err(|e| status(&e))?;
    if statements.len() != 1 {
        return Err(status(&IcePieError::Syntax(format!(
            "a Flight SQL command holds one statement, not {}; send them one by one",
            statements.len()
        ))));
    }
    let mut statement = statements.remove(0);
    number_placeholders(&mut statement);
    Ok(statement)
}

/// ADBC and JDBC send `?` placeholders; DataFusion binds `$1`, `$2`, ...: numbered in the
/// order they appear.
fn number_placeholders(statement: &mut Statement) {
    use datafusion::sql::parser::Statement as DFStatement;
    use datafusion::sql::sqlparser::ast::{visit_expressions_mut, Expr, Value};
    let Statement::DataFusion(inner) = statement else {
        return;
    };
    let DFStatement::Statement(sql) = inner.0.as_mut() else {
        return;
    };
    let mut n = 0;
    let _ = visit_expressions_mut(sql.as_mut(), |e| {
        if let Expr::Value(v) = e {
            if let Value::Placeholder(p) = &mut v.value {
                if p == "?" {
                    n += 1;
                    *p = format!("${n}");
                }
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
}

/// Row `row` of `batch` as the parameters of a prepared statement, each value cast to the
/// type its `$n` expects.
#[allow(clippy::result_large_err)]
fn bind_row(
    batch: &RecordBatch,
    row: usize,
    slots: &[Option<DataType>],
) -> std::result::Result<ParamValues, Status> {
    if batch.num_columns() != slots.len() {
        return Err(Status::invalid_argument(format!(
            "the statement takes {} parameters; {} were bound",
            slots.len(),
            batch.num_columns()
        )));
    }
    let mut values = Vec::with_capacity(slots.len());
    for (column, slot) in batch.columns().iter().zip(slots) {
        let value =
            ScalarValue::try_from_array(column.as_ref(), row).map_err(|e| status(&e.into()))?;
        let value = match slot {
            Some(ty) if value.data_type() != *ty => {
                value.cast_to(ty).map_err(|e| status(&e.into()))?
            }
            _ => value,
        };
        values.push(value.into());
    }
    Ok(ParamValues::List(values))
}

/// The batches of parameter rows a client sent with `DoPut`, as they arrive.
fn parameter_batches(
    request: Request<PeekableFlightDataStream>,
) -> impl Stream<Item = std::result::Result<RecordBatch, Status>> {
    // The stream as it came, its first message (the schema, peeked at for the command)
    // included.
    let data = request.into_inner().map_err(FlightError::from);
    arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(data)
        .map_err(|e| Status::invalid_argument(format!("the bound parameters: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, Int64Array};

    #[test]
    fn bound_parameters_are_cast_to_the_types_the_query_expects() {
        let batch = RecordBatch::try_from_iter([(
            "$1",
            Arc::new(Int64Array::from(vec![7, 8])) as Arc<dyn Array>,
        )])
        .unwrap();
        let ParamValues::List(values) = bind_row(&batch, 1, &[Some(DataType::Int32)]).unwrap()
        else {
            panic!("a list")
        };
        assert_eq!(values[0].value, ScalarValue::Int32(Some(8)));
        let e = bind_row(&batch, 0, &[None, None]).unwrap_err();
        assert!(e.message().contains("takes 2 parameters"), "{e}");
        let cast = bind_row(&batch, 0, &[Some(DataType::Date32)]);
        assert!(cast.is_err() || cast.is_ok(), "never a panic");
    }

    #[test]
    fn question_marks_are_numbered_in_order() {
        let statement =
            one_statement("SELECT ? AS a FROM t WHERE x > ? AND y = '?' LIMIT ?").unwrap();
        let text = match &statement {
            Statement::DataFusion(inner) => inner.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(
            text.contains("$1 AS a") && text.contains("x > $2") && text.contains("y = '?'"),
            "{text}"
        );
        assert!(text.contains("LIMIT $3"), "{text}");
        // $n stay as they are.
        let statement = one_statement("SELECT $2, $1").unwrap();
        assert!(matches!(&statement, Statement::DataFusion(s) if s.to_string().contains("$2, $1")));
    }
}
