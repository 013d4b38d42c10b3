//! PostgreSQL's prepared statements (the extended query protocol): parsing and planning them,
//! describing their parameters and rows, and binding a portal's parameters as the query
//! expects them.

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::LogicalPlan;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::results::FieldInfo;
use pgwire::api::stmt::QueryParser;
use pgwire::api::{ClientInfo, Type};
use pgwire::error::{PgWireError, PgWireResult};

use super::encode::{self, protocol_error};
use super::errors::user_error;
use super::pg_compat::parse_pg;
use super::statements::{parameter_slots, returns_rows};
use crate::engine::IcePie;
use crate::error::IcePieError;
use crate::sql::Statement;

/// A statement prepared by the extended protocol, with its plan when it is one of
/// DataFusion's own (result schema, parameter types).
#[derive(Clone)]
pub(super) struct Prepared {
    pub(super) statement: Statement,
    plan: Option<LogicalPlan>,
    /// The rows an icepie statement returns.
    result: Option<SchemaRef>,
}

impl Prepared {
    /// The schema of the rows it returns, when known before it runs (queries, EXPLAIN, most
    /// of icepie's statements).
    pub(super) fn rows(&self) -> Option<&Schema> {
        let Some(plan) = self.plan.as_ref() else {
            return self.result.as_deref();
        };
        returns_rows(plan).then(|| plan.schema().as_arrow())
    }
}

/// Parses and plans prepared statements.
pub(super) struct Parser {
    pub(super) warehouse: IcePie,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = parse_pg(sql).map_err(|e| user_error(&e))?;
        if statements.len() > 1 {
            return Err(user_error(&IcePieError::Syntax(
                "a prepared statement holds one statement; send the others separately".into(),
            )));
        }
        let Some(statement) = statements.pop() else {
            return Ok(None);
        };
        let plan = self
            .warehouse
            .plan(&statement)
            .await
            .map_err(|e| user_error(&e))?;
        let result = self
            .warehouse
            .result_schema(&statement)
            .await
            .map_err(|e| user_error(&e))?;
        let prepared = Prepared {
            statement,
            plan,
            result,
        };
        // Refuses absurd parameter numbers here, before anything is sized by them.
        parameter_types(&prepared)?;
        Ok(Some(prepared))
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        parameter_types(stmt).map(|types| types.into_iter().map(|(pg, _)| pg).collect())
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match stmt.rows() {
            // A statement's description has no formats yet: text, as PostgreSQL says.
            Some(schema) => encode::fields(schema, format.unwrap_or(&Format::UnifiedText)),
            None => Ok(vec![]),
        }
    }
}

/// Each `$n` parameter's PostgreSQL type and the Arrow type the query expects (`None` when
/// the query leaves it open: it is then text), in order.
fn parameter_types(stmt: &Prepared) -> PgWireResult<Vec<(Type, Option<DataType>)>> {
    let Some(plan) = &stmt.plan else {
        return Ok(vec![]);
    };
    let slots = parameter_slots(plan).map_err(|e| user_error(&e))?;
    Ok(slots
        .into_iter()
        .map(|ty| {
            (
                ty.as_ref().map(encode::pg_type_of).unwrap_or(Type::TEXT),
                ty,
            )
        })
        .collect())
}

/// The portal's parameters, each as the type the query expects it (read as the client sent
/// it: text or binary, of the type the client declared or else the query's).
pub(super) fn bind(portal: &Portal<Prepared>) -> PgWireResult<ParamValues> {
    let expected = parameter_types(&portal.statement.statement)?;
    let n = portal.parameter_len();
    if let Format::Individual(codes) = &portal.parameter_format {
        if codes.len() != n {
            return Err(protocol_error(format!(
                "{} parameter format codes for {n} parameters",
                codes.len()
            )));
        }
    }
    let mut values = Vec::with_capacity(n);
    for i in 0..n {
        let (inferred, arrow) = expected.get(i).cloned().unwrap_or((Type::TEXT, None));
        let declared = portal
            .statement
            .parameter_types
            .get(i)
            .cloned()
            .flatten()
            .filter(|t| *t != Type::UNKNOWN);
        let pg = declared.unwrap_or(inferred);
        let value = parameter(portal, i, &pg)?;
        // A parameter the query leaves open is text, as it was described.
        let target = arrow.unwrap_or(DataType::Utf8);
        let value = if value.data_type() == target {
            value
        } else {
            value.cast_to(&target).map_err(|e| user_error(&e.into()))?
        };
        values.push(value.into());
    }
    Ok(ParamValues::List(values))
}

/// Parameter `i` of the portal, read as PostgreSQL type `pg`.
fn parameter(portal: &Portal<Prepared>, i: usize, pg: &Type) -> PgWireResult<ScalarValue> {
    let binary = portal.parameter_format.is_binary(i);
    Ok(match *pg {
        Type::BOOL => ScalarValue::Boolean(portal.parameter::<bool>(i, pg)?),
        Type::INT2 => ScalarValue::Int16(portal.parameter::<i16>(i, pg)?),
        Type::INT4 => ScalarValue::Int32(portal.parameter::<i32>(i, pg)?),
        Type::INT8 => ScalarValue::Int64(portal.parameter::<i64>(i, pg)?),
        Type::FLOAT4 => ScalarValue::Float32(portal.parameter::<f32>(i, pg)?),
        Type::FLOAT8 => ScalarValue::Float64(portal.parameter::<f64>(i, pg)?),
        Type::DATE => ScalarValue::Date32(
            portal
                .parameter::<chrono::NaiveDate>(i, pg)?
                .map(|d| (d - chrono::NaiveDate::default()).num_days() as i32),
        ),
        Type::TIME => ScalarValue::Time64Microsecond(
            portal
                .parameter::<chrono::NaiveTime>(i, pg)?
                .map(|t| (t - chrono::NaiveTime::MIN).num_microseconds().unwrap_or(0)),
        ),
        Type::TIMESTAMP => ScalarValue::TimestampMicrosecond(
            portal
                .parameter::<chrono::NaiveDateTime>(i, pg)?
                .map(|t| t.and_utc().timestamp_micros()),
            None,
        ),
        Type::TIMESTAMPTZ => ScalarValue::TimestampMicrosecond(
            portal
                .parameter::<chrono::DateTime<chrono::FixedOffset>>(i, pg)?
                .map(|t| t.timestamp_micros()),
            Some("+00:00".into()),
        ),
        Type::BYTEA => ScalarValue::Binary(portal.parameter::<Vec<u8>>(i, pg)?),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            ScalarValue::Utf8(portal.parameter::<String>(i, &Type::TEXT)?)
        }
        // Any other type in text format is its text, which the query's expected type casts;
        // its binary form is not read here.
        _ if !binary => ScalarValue::Utf8(portal.parameter::<String>(i, &Type::TEXT)?),
        _ => {
            return Err(PgWireError::UserError(Box::new(
                pgwire::error::ErrorInfo::new(
                    "ERROR".into(),
                    "22P03".into(),
                    format!(
                        "parameter ${} of type {pg} was sent in binary, which this server does \
                         not read for that type; send it as text",
                        i + 1
                    ),
                ),
            )))
        }
    })
}
