//! Running clients' statements: the simple query protocol (a text of statements, each run and
//! its rows sent before the next starts) and the extended one (prepared statements, bound
//! parameters, portals), rows streamed batch by batch.

use std::fmt::Debug;
use std::ops::ControlFlow;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use futures::{Sink, SinkExt, StreamExt, TryStreamExt};
use pgwire::api::portal::{Format, Portal, PortalExecutionState};
use pgwire::api::query::{
    send_execution_response, send_query_response, send_ready_for_query, ExtendedQueryHandler,
    SimpleQueryHandler,
};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::{Entry, PortalStore};
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionHandle, PgWireConnectionState, Type, DEFAULT_NAME,
};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::extendedquery::Execute;
use pgwire::messages::response::{EmptyQueryResponse, TransactionStatus};
use pgwire::messages::simplequery::Query;
use pgwire::messages::PgWireBackendMessage;

use super::encode::{self, protocol_error};
use super::errors::{error_info, user_error};
use super::policy::Policy;
use crate::engine::IcePie;
use crate::error::IcePieError;
use crate::slice::freshness;
use crate::sql::Statement;

/// PostgreSQL's limit on a statement's parameters (Bind counts them in 16 bits).
const MAX_PARAMETERS: usize = 65_535;

/// Runs statements on the warehouse for every connection.
pub(super) struct Backend {
    pub(super) warehouse: IcePie,
    pub(super) policy: Policy,
    pub(super) statement_timeout: Option<std::time::Duration>,
    pub(super) parser: Arc<Parser>,
}

/// A statement prepared by the extended protocol, with its plan when it is one of
/// DataFusion's own (result schema, parameter types).
#[derive(Clone)]
pub(super) struct Prepared {
    statement: Statement,
    plan: Option<LogicalPlan>,
    /// The rows an icepie statement returns.
    result: Option<SchemaRef>,
}

impl Prepared {
    /// The schema of the rows it returns, when known before it runs (queries, EXPLAIN, most
    /// of icepie's statements).
    fn rows(&self) -> Option<&Schema> {
        let Some(plan) = self.plan.as_ref() else {
            return self.result.as_deref();
        };
        returns_rows(plan).then(|| plan.schema().as_arrow())
    }
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

#[async_trait]
impl SimpleQueryHandler for Backend {
    /// Runs the statements one after the other, each sent whole (its rows streamed) before
    /// the next starts, and stops at the first failure, whether in planning or in the rows.
    async fn on_query<C>(&self, client: &mut C, query: Query) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            return Err(PgWireError::NotReadyForQuery);
        }
        let mut status = client.transaction_status();
        client.set_state(PgWireConnectionState::QueryInProgress);
        match parse_pg(&query.query) {
            Ok(statements) if statements.is_empty() => {
                client
                    .feed(PgWireBackendMessage::EmptyQueryResponse(
                        EmptyQueryResponse::new(),
                    ))
                    .await?;
            }
            Ok(statements) => {
                for statement in statements {
                    let stop = self.stop_signal(client).await;
                    let work = async {
                        let (response, notices) = IcePie::with_notices(self.run(
                            statement,
                            ParamValues::List(vec![]),
                            &Format::UnifiedText,
                        ))
                        .await;
                        send_notices(client, notices).await?;
                        status = send(client, response?, true, status).await?;
                        Ok(())
                    };
                    let sent = stop.guard(work).await;
                    match sent {
                        Ok(()) => {}
                        // The statements after a failed one do not run, as in PostgreSQL.
                        Err(PgWireError::UserError(info)) => {
                            client
                                .feed(PgWireBackendMessage::ErrorResponse((*info).into()))
                                .await?;
                            status = status.to_error_state();
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => {
                client
                    .feed(PgWireBackendMessage::ErrorResponse(error_info(&e).into()))
                    .await?;
                status = status.to_error_state();
            }
        }
        client.set_state(PgWireConnectionState::ReadyForQuery);
        client.set_transaction_status(status);
        send_ready_for_query(client, status).await
    }

    /// Not called: [`on_query`](Self::on_query) runs the statements itself.
    async fn do_query<C>(&self, _client: &mut C, _query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        Err(PgWireError::ApiError(
            "simple queries are run by on_query".into(),
        ))
    }
}

#[async_trait]
impl ExtendedQueryHandler for Backend {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    /// An Execute of all of a portal's rows (what drivers send) streams them to the client as
    /// they are computed; one of some rows at a time is pgwire's (which holds the rows of
    /// each fetch).
    async fn on_execute<C>(&self, client: &mut C, message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        let portal = match client.portal_store().get_portal(name) {
            Some(Entry::Value(portal)) if message.max_rows == 0 => portal,
            _ => return self._on_execute(client, message).await,
        };
        if !matches!(*portal.state().lock().await, PortalExecutionState::Initial) {
            return self._on_execute(client, message).await;
        }
        if !matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            return Err(PgWireError::NotReadyForQuery);
        }
        let mut status = client.transaction_status();
        client.set_state(PgWireConnectionState::QueryInProgress);
        let stop = self.stop_signal(client).await;
        let work = async {
            let (response, notices) = IcePie::with_notices(ExtendedQueryHandler::do_query(
                self,
                client,
                portal.as_ref(),
                0,
            ))
            .await;
            send_notices(client, notices).await?;
            let response = response?;
            let fields = match &response {
                Response::Query(rows) => Some(rows.row_schema()),
                _ => None,
            };
            status = send(client, response, false, status).await?;
            if let Some(fields) = fields {
                // Run to its end: another Execute of it returns no more rows.
                portal
                    .start(QueryResponse::new(fields, futures::stream::empty()))
                    .await;
            }
            Ok(())
        };
        stop.guard(work).await?;
        client.set_state(PgWireConnectionState::ReadyForQuery);
        client.set_transaction_status(status);
        Ok(())
    }

    async fn do_query<C>(
        &self,
        _client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let prepared = &portal.statement.statement;
        let params = bind(portal)?;
        let described = prepared.rows().is_some();
        let response = self
            .run(
                prepared.statement.clone(),
                params,
                &portal.result_column_format,
            )
            .await?;
        Ok(match response {
            // Described as returning no rows (they are known only once it ran): it runs to
            // its end, and its tag says what it did.
            Response::Query(mut rows) if !described => {
                let mut count = 0;
                while let Some(row) = rows.data_rows().next().await {
                    row?;
                    count += 1;
                }
                Response::Execution(Tag::new(&tag(&prepared.statement)).with_rows(count))
            }
            response => response,
        })
    }
}

/// Sends a statement's notices (`icepie.on_stale = 'serve'`) as NoticeResponses.
async fn send_notices<C>(client: &mut C, notices: Vec<String>) -> PgWireResult<()>
where
    C: Sink<PgWireBackendMessage> + Unpin,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    for text in notices {
        let info = pgwire::error::ErrorInfo::new("NOTICE".into(), "01000".into(), text);
        client
            .feed(PgWireBackendMessage::NoticeResponse(info.into()))
            .await?;
    }
    Ok(())
}

/// Sends `response` whole (a query's rows streamed, after their description with
/// `describe`) and returns the transaction status it leaves `status` in.
async fn send<C>(
    client: &mut C,
    response: Response,
    describe: bool,
    status: TransactionStatus,
) -> PgWireResult<TransactionStatus>
where
    C: Sink<PgWireBackendMessage> + Unpin,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    Ok(match response {
        Response::Query(rows) => {
            send_query_response(client, rows, describe).await?;
            status
        }
        Response::TransactionStart(tag) => {
            send_execution_response(client, tag).await?;
            status.to_in_transaction_state()
        }
        Response::TransactionEnd(tag) => {
            send_execution_response(client, tag).await?;
            status.to_idle_state()
        }
        Response::Execution(tag) => {
            send_execution_response(client, tag).await?;
            status
        }
        // `run` answers with none of the others.
        _ => status,
    })
}

/// What stops a running statement: the client's cancel request or the statement timeout.
struct Stop {
    cancel: Option<futures::channel::oneshot::Receiver<()>>,
    timeout: Option<std::time::Duration>,
}

impl Stop {
    /// Runs `work` (a statement and the sending of its rows) until it ends or is stopped;
    /// stopped, its plan and rows are dropped and it fails with SQLSTATE 57014.
    async fn guard<F>(self, work: F) -> PgWireResult<()>
    where
        F: std::future::Future<Output = PgWireResult<()>>,
    {
        let cancelled = async {
            match self.cancel {
                // A dropped sender (a later statement took over) is no cancel.
                Some(rx) => {
                    if rx.await.is_err() {
                        std::future::pending::<()>().await
                    }
                    "canceling statement due to user request".to_string()
                }
                None => std::future::pending().await,
            }
        };
        let timed_out = async {
            match self.timeout {
                Some(limit) => {
                    tokio::time::sleep(limit).await;
                    format!(
                        "canceling statement due to statement timeout ({} s)",
                        limit.as_secs_f64()
                    )
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            done = work => done,
            why = cancelled => Err(cancelled_error(why)),
            why = timed_out => Err(cancelled_error(why)),
        }
    }
}

fn cancelled_error(message: String) -> PgWireError {
    PgWireError::UserError(Box::new(pgwire::error::ErrorInfo::new(
        "ERROR".into(),
        "57014".into(),
        message,
    )))
}

impl Backend {
    /// What may stop the next statement of `client`'s connection.
    async fn stop_signal<C: ClientInfo>(&self, client: &C) -> Stop {
        let cancel = match client.session_extensions().get::<Arc<ConnectionHandle>>() {
            Some(handle) => Some(handle.start_query().await),
            None => None,
        };
        Stop {
            cancel,
            timeout: self.statement_timeout,
        }
    }

    /// Runs `statement` with `params`; rows go in `format`.
    async fn run(
        &self,
        statement: Statement,
        params: ParamValues,
        format: &Format,
    ) -> PgWireResult<Response> {
        if let Some(session) = admit(&self.policy, &statement).map_err(|e| user_error(&e))? {
            return Ok(session_response(session));
        }
        let tag = tag(&statement);
        let writes = counts_rows(&statement);
        let df = execute(&self.warehouse, &self.policy, statement, params)
            .await
            .map_err(|e| user_error(&e))?;
        let schema = df.schema().as_arrow().clone();
        if schema.fields().is_empty() {
            return Ok(Response::Execution(Tag::new(&tag)));
        }
        let stream = df
            .execute_stream()
            .await
            .map_err(|e| user_error(&e.into()))?;
        if writes {
            // INSERT, UPDATE, DELETE and COPY answer with the rows they wrote, in their tag.
            let count = written(stream).await.map_err(|e| user_error(&e))?;
            let tag = match tag.as_str() {
                "INSERT" => Tag::new("INSERT").with_oid(0),
                other => Tag::new(other),
            };
            return Ok(Response::Execution(
                tag.with_rows(usize::try_from(count).unwrap_or(usize::MAX)),
            ));
        }
        let fields = Arc::new(encode::fields(&schema, format)?);
        let encoding = fields.clone();
        let rows = stream
            .map_err(|e| user_error(&e.into()))
            .and_then(move |batch| {
                let fields = encoding.clone();
                async move { encode::rows(&batch, &fields) }
            })
            .map_ok(|rows| futures::stream::iter(rows.into_iter().map(Ok)))
            .try_flatten();
        let mut response = QueryResponse::new(fields, rows.boxed());
        if tag != "SELECT" {
            response.set_command_tag(&tag);
        }
        Ok(Response::Query(response))
    }
}

/// True for the statements whose result is the count of rows they wrote.
pub(super) fn counts_rows(statement: &Statement) -> bool {
    match statement {
        Statement::DataFusion(inner) => match &**inner {
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

/// A client's session statement, answered without running anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Session {
    Begin,
    Commit,
    Rollback,
    /// `SET` of a PostgreSQL session variable.
    Set,
}

/// The statements of a PostgreSQL client's text. A query that asks PostgreSQL's catalog
/// ([`asks_postgres`]: what psql, DBeaver, Metabase and Grafana send to list and describe
/// tables) is parsed as PostgreSQL parses it and goes through datafusion-pg-catalog's rewrites
/// into a query DataFusion runs (`COLLATE pg_catalog.default` dropped, `'name'::regclass`
/// looked up, a few whole queries answered empty, ...). Every other statement, in the same text
/// too, is parsed as everywhere else, so a user's query means over PostgreSQL what it means in
/// the REPL (the rewrites would change some: a scalar subquery they take for correlated
/// becomes NULL).
pub(super) fn parse_pg(sql: &str) -> Result<Vec<Statement>, IcePieError> {
    static POSTGRES: LazyLock<PostgresCompatibilityParser> =
        LazyLock::new(PostgresCompatibilityParser::new);
    let wrap =
        |s: SqlStatement| Statement::DataFusion(Box::new(DFStatement::Statement(Box::new(s))));
    // PostgreSQL's statements of `text` when they are all queries.
    let queries = |text: &str| {
        POSTGRES
            .parse(text)
            .ok()
            .filter(|p| !p.is_empty() && p.iter().all(|s| matches!(s, SqlStatement::Query(_))))
    };
    let asks = |s: &Statement| {
        matches!(s, Statement::DataFusion(inner)
            if matches!(&**inner, DFStatement::Statement(q) if asks_postgres(q)))
    };
    match IcePie::parse(sql) {
        Ok(statements) => {
            // PostgreSQL's reading of the whole text, statement for statement (a statement's
            // own text may not survive being printed by another parser: `ARRAY(SELECT …)`).
            let whole = match statements.iter().any(asks) {
                true => POSTGRES
                    .parse(sql)
                    .ok()
                    .filter(|p| p.len() == statements.len()),
                false => None,
            };
            statements
                .into_iter()
                .enumerate()
                .map(|(i, statement)| {
                    if !asks(&statement) {
                        return show_postgres(statement);
                    }
                    let own = match (whole.as_ref().map(|p| &p[i]), &statement) {
                        (Some(query @ SqlStatement::Query(_)), _) => Some(query.clone()),
                        // Its printed text, when the whole text is not PostgreSQL's.
                        (_, Statement::DataFusion(inner)) => queries(&inner.to_string())
                            .filter(|p| p.len() == 1)
                            .and_then(|mut p| p.pop()),
                        _ => None,
                    };
                    Ok(own.map(wrap).unwrap_or(statement))
                })
                .collect()
        }
        // PostgreSQL syntax beyond icepie's, in a text about the catalog: all of it is
        // PostgreSQL's, when it parses as queries.
        Err(e) => match sql.to_ascii_lowercase().contains("pg_catalog") {
            true => queries(sql)
                .map(|parsed| parsed.into_iter().map(wrap).collect())
                .ok_or(e),
            false => Err(e),
        },
    }
}

/// True when `statement` is a query that names PostgreSQL's catalog: a `pg_catalog` table (or
/// a bare `pg_*` one), a `pg_catalog.` function, a `COLLATE`, an `OPERATOR(...)` or a cast to
/// an oid type (`::regclass`, `::pg_catalog.regtype`).
fn asks_postgres(statement: &SqlStatement) -> bool {
    use datafusion::sql::sqlparser::ast::{
        visit_expressions, visit_relations, BinaryOperator, DataType as SqlType, Expr, ObjectName,
    };
    if !matches!(statement, SqlStatement::Query(_)) {
        return false;
    }
    let parts = |name: &ObjectName| -> Vec<String> {
        name.0
            .iter()
            .filter_map(|p| p.as_ident())
            .map(|i| i.value.to_ascii_lowercase())
            .collect()
    };
    let relation = visit_relations(statement, |name| {
        let parts = parts(name);
        match parts.as_slice() {
            [schema, _] if schema == "pg_catalog" => ControlFlow::Break(()),
            [table] if table.starts_with("pg_") => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    });
    relation.is_break()
        || visit_expressions(statement, |e| match e {
            Expr::Collate { .. }
            | Expr::BinaryOp {
                op: BinaryOperator::PGCustomBinaryOperator(_),
                ..
            }
            | Expr::Cast {
                data_type: SqlType::Regclass,
                ..
            } => ControlFlow::Break(()),
            Expr::Cast {
                data_type: SqlType::Custom(name, _),
                ..
            } if parts(name).last().is_some_and(|t| t.starts_with("reg")) => ControlFlow::Break(()),
            Expr::Function(f) if parts(&f.name).first().is_some_and(|s| s == "pg_catalog") => {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        })
        .is_break()
}

/// `SHOW` of a PostgreSQL setting ([`super::postgres_setting`]) as the query of its one row;
/// any other statement as it is.
fn show_postgres(statement: Statement) -> Result<Statement, IcePieError> {
    let Statement::DataFusion(inner) = &statement else {
        return Ok(statement);
    };
    let DFStatement::Statement(sql) = &**inner else {
        return Ok(statement);
    };
    let SqlStatement::ShowVariable { variable } = &**sql else {
        return Ok(statement);
    };
    let name = variable
        .iter()
        .map(|i| i.value.to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(" ");
    let Some((column, value)) = super::postgres_setting(&name) else {
        return Ok(statement);
    };
    let query = format!("SELECT '{}' AS \"{column}\"", value.replace('\'', "''"));
    Ok(IcePie::parse(&query)?.remove(0))
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
    if let Some(variable) = super::policy::shared_setting(inner) {
        return Err(IcePieError::NotAllowed(format!(
            "{variable} is a setting of the server, shared by every client: start the server \
             with --set to change it"
        )));
    }
    let DFStatement::Statement(sql) = &**inner else {
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

/// The PostgreSQL answer to a session statement.
fn session_response(session: Session) -> Response {
    match session {
        Session::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Session::Commit => Response::TransactionEnd(Tag::new("COMMIT")),
        Session::Rollback => Response::TransactionEnd(Tag::new("ROLLBACK")),
        Session::Set => Response::Execution(Tag::new("SET")),
    }
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

/// The command tag of a statement: what it is, in its own words (`SELECT`, `CREATE SLICE`).
fn tag(statement: &Statement) -> String {
    let fixed = match statement {
        Statement::DataFusion(inner) => {
            let text = inner.to_string();
            let words: Vec<&str> = text.split_whitespace().take(2).collect();
            return match words.first().map(|w| w.to_ascii_uppercase()) {
                Some(w) if w == "CREATE" || w == "DROP" || w == "ALTER" => {
                    words.join(" ").to_ascii_uppercase()
                }
                Some(w) if w == "WITH" || w == "VALUES" || w.starts_with('(') => "SELECT".into(),
                Some(w) => w,
                None => "SELECT".into(),
            };
        }
        Statement::CreateCoreTable(_) => "CREATE CORE TABLE",
        Statement::Ingest(_) => "INGEST",
        Statement::DropCoreTable { .. } => "DROP CORE TABLE",
        Statement::CreateSlice(_) => "CREATE SLICE",
        Statement::RefreshSlice { .. } => "REFRESH SLICE",
        Statement::ExplainRefresh(_) => "EXPLAIN REFRESH SLICE",
        Statement::DropSlice { .. } => "DROP SLICE",
        Statement::ShowCoreTables => "SHOW CORE TABLES",
        Statement::ShowSlices => "SHOW SLICES",
        Statement::DescribeSlice(_) => "DESCRIBE SLICE",
        Statement::FreezeSlice { .. } => "FREEZE SLICE",
        Statement::ThawSlice(_) => "THAW SLICE",
        Statement::AlterSlice { .. } => "ALTER SLICE",
        Statement::ApplyProposal(_) => "APPLY PROPOSAL",
        Statement::DismissProposal(_) => "DISMISS PROPOSAL",
        Statement::RollbackSlice { .. } => "ROLLBACK SLICE",
        Statement::ShowSliceHistory(_) => "SHOW SLICE HISTORY",
        Statement::Vacuum(_) => "VACUUM",
        Statement::Verify(_) => "VERIFY",
    };
    fixed.to_string()
}

/// The portal's parameters, each as the type the query expects it (read as the client sent
/// it: text or binary, of the type the client declared or else the query's).
fn bind(portal: &Portal<Prepared>) -> PgWireResult<ParamValues> {
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
