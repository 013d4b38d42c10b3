//! Serving a warehouse over the network: the PostgreSQL wire protocol ([`serve_pg`]), so that
//! `psql`, drivers (psycopg, JDBC, tokio-postgres) and BI tools can run every icepie statement.
//!
//! - Simple query protocol: a text of several statements runs them in order, each with its
//!   own result; the first failure stops the rest.
//! - Extended query protocol: prepared statements with `$n` parameters (their types inferred
//!   from the query, or given by the client), text or binary results.
//! - Results stream: rows are encoded batch by batch as the client reads them.
//! - Errors carry a SQLSTATE ([`sqlstate`]): syntax, undefined table, read-only core, frozen
//!   slice, conflict, ...
//! - Authentication: SCRAM-SHA-256 against a password when one is given; without one, the
//!   server accepts every client and refuses to listen beyond the loopback interface.
//! - The server's files are not its clients': they name only locations under those the server
//!   was started with (`--allow-path`), and in read-only mode they only read.
//!
//! Each statement commits on its own, as in the REPL: `BEGIN`, `COMMIT` and a bare `ROLLBACK`
//! are accepted and group nothing.

mod encode;
mod policy;

use policy::Policy;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use futures::{Sink, StreamExt, TryStreamExt};
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::{ClientInfo, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::TcpListener;

use crate::engine::IcePie;
use crate::error::{IcePieError, Result};
use crate::sql::Statement;

/// Iterations of SCRAM-SHA-256's key derivation (PostgreSQL's default).
const SCRAM_ITERATIONS: usize = 4096;

/// How the PostgreSQL server admits clients.
#[derive(Clone, Default)]
pub struct PgOptions {
    /// The password every client must give (checked with SCRAM-SHA-256, so it never crosses
    /// the network). `None` admits every client: only a loopback address may be served so.
    pub password: Option<String>,
    /// The local directories and object-store URL prefixes under which clients may name
    /// files (`INGEST … FROM`, `COPY … TO`, ...); none by default.
    pub allow_paths: Vec<String>,
    /// Clients may only read: queries, SHOW, DESCRIBE, EXPLAIN.
    pub read_only: bool,
}

impl Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("allow_paths", &self.allow_paths)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Serves `warehouse` over the PostgreSQL wire protocol on `listener` until `shutdown`
/// resolves. Refuses a listener beyond the loopback interface without a password.
pub async fn serve_pg(
    warehouse: IcePie,
    listener: TcpListener,
    options: PgOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = listener.local_addr().map_err(io_error)?;
    if options.password.is_none() && !addr.ip().is_loopback() {
        return Err(IcePieError::Server(format!(
            "{addr} is reachable from other machines and no password is set: set one \
             (ICEPIE_PASSWORD) or listen on 127.0.0.1"
        )));
    }
    let policy = Policy::new(&options.allow_paths, options.read_only)?;
    let handlers = Arc::new(Handlers {
        backend: Arc::new(Backend {
            policy,
            parser: Arc::new(Parser {
                warehouse: warehouse.clone(),
            }),
            warehouse,
        }),
        password: options.password.map(Arc::new),
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // A failed accept (out of file descriptors, a reset) ends no other connection.
                let Ok((socket, _)) = accepted else { continue };
                let handlers = handlers.clone();
                tokio::spawn(async move {
                    // A client's protocol error ends its connection alone.
                    let _ = pgwire::tokio::process_socket(socket, None, handlers).await;
                });
            }
            _ = &mut shutdown => return Ok(()),
        }
    }
}

fn io_error(e: std::io::Error) -> IcePieError {
    IcePieError::Server(format!("the PostgreSQL listener: {e}"))
}

struct Handlers {
    backend: Arc<Backend>,
    password: Option<Arc<String>>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.backend.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.backend.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        // Called once per connection: each has its own authentication state.
        Arc::new(match &self.password {
            None => Startup::Trust(Trust),
            Some(password) => {
                let mut scram = ScramAuth::new(Arc::new(Secret(password.clone())));
                scram.set_iterations(SCRAM_ITERATIONS);
                Startup::Scram(Box::new(
                    SASLAuthStartupHandler::new(Arc::new(server_parameters())).with_scram(scram),
                ))
            }
        })
    }
}

fn server_parameters() -> DefaultServerParameterProvider {
    let mut parameters = DefaultServerParameterProvider::default();
    parameters.server_version = format!("16.0 (icepie {})", env!("CARGO_PKG_VERSION"));
    parameters
}

/// The configured password, salted for SCRAM at each login.
struct Secret(Arc<String>);

impl Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[async_trait]
impl AuthSource for Secret {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        let salt = uuid::Uuid::new_v4().as_bytes().to_vec();
        let salted = gen_salted_password(&self.0, &salt, SCRAM_ITERATIONS);
        Ok(Password::new(Some(salt), salted))
    }
}

/// Admits every client (a loopback listener without a password).
struct Trust;

impl pgwire::api::auth::noop::NoopStartupHandler for Trust {}

enum Startup {
    Trust(Trust),
    Scram(Box<SASLAuthStartupHandler<DefaultServerParameterProvider>>),
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Trust(t) => t.on_startup(client, message).await,
            Startup::Scram(s) => s.on_startup(client, message).await,
        }
    }
}

/// Runs statements on the warehouse for every connection.
struct Backend {
    warehouse: IcePie,
    policy: Policy,
    parser: Arc<Parser>,
}

/// A statement prepared by the extended protocol: the statement, and for a query its plan
/// (result schema, parameter types).
#[derive(Clone)]
struct Prepared {
    statement: Statement,
    plan: Option<LogicalPlan>,
}

/// Parses and plans prepared statements.
struct Parser {
    warehouse: IcePie,
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
        let mut statements = IcePie::parse(sql).map_err(|e| user_error(&e))?;
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
            .plan_query(&statement)
            .await
            .map_err(|e| user_error(&e))?;
        Ok(Some(Prepared { statement, plan }))
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        parameter_types(stmt).map(|types| types.into_iter().map(|(pg, _)| pg).collect())
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(match &stmt.plan {
            Some(plan) => encode::fields(
                plan.schema().as_arrow(),
                format.unwrap_or(&Format::UnifiedBinary),
            ),
            None => vec![],
        })
    }
}

/// Each `$n` parameter's PostgreSQL type and the Arrow type the query expects, in order.
fn parameter_types(stmt: &Prepared) -> PgWireResult<Vec<(Type, Option<DataType>)>> {
    let Some(plan) = &stmt.plan else {
        return Ok(vec![]);
    };
    let types = plan
        .get_parameter_types()
        .map_err(|e| user_error(&e.into()))?;
    let mut numbered: Vec<(usize, Option<DataType>)> = types
        .into_iter()
        .filter_map(|(id, ty)| Some((id.strip_prefix('$')?.parse().ok()?, ty)))
        .collect();
    numbered.sort_by_key(|(n, _)| *n);
    let count = numbered.last().map(|(n, _)| *n).unwrap_or(0);
    let mut out = vec![(Type::TEXT, None); count];
    for (n, ty) in numbered {
        if n >= 1 {
            let pg = ty.as_ref().map(encode::pg_type_of).unwrap_or(Type::TEXT);
            out[n - 1] = (pg, ty);
        }
    }
    Ok(out)
}

#[async_trait]
impl SimpleQueryHandler for Backend {
    async fn do_query<C>(&self, _client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let statements = IcePie::parse(query).map_err(|e| user_error(&e))?;
        let mut out = Vec::with_capacity(statements.len());
        for statement in statements {
            match self
                .run(statement, ParamValues::List(vec![]), &Format::UnifiedText)
                .await
            {
                Ok(response) => out.push(response),
                // The statements after a failed one do not run, as in PostgreSQL.
                Err(e) => {
                    out.push(Response::Error(Box::new(error_info(&e))));
                    break;
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Backend {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
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
        let response = self
            .run(
                prepared.statement.clone(),
                params,
                &portal.result_column_format,
            )
            .await
            .map_err(|e| user_error(&e))?;
        Ok(match (&prepared.plan, response) {
            // Described as returning no rows (its rows are known once it ran): it runs to the
            // end (an INSERT writes as its rows are read), and its tag says what it did.
            (None, Response::Query(mut rows)) => {
                let mut count = 0;
                while let Some(row) = rows.data_rows().next().await {
                    row?;
                    count += 1;
                }
                Response::Execution(Tag::new(&tag(&prepared.statement)).with_rows(count))
            }
            (_, response) => response,
        })
    }
}

impl Backend {
    /// Runs `statement` with `params`; rows go in `format`.
    async fn run(
        &self,
        statement: Statement,
        params: ParamValues,
        format: &Format,
    ) -> Result<Response> {
        self.policy.check(&statement)?;
        if let Some(response) = transaction(&statement) {
            return Ok(response);
        }
        let tag = tag(&statement);
        let df = self
            .warehouse
            .execute_with_params(statement, params)
            .await?;
        let schema = df.schema().as_arrow().clone();
        if schema.fields().is_empty() {
            return Ok(Response::Execution(Tag::new(&tag)));
        }
        let fields = Arc::new(encode::fields(&schema, format));
        let encoding = fields.clone();
        let rows = df
            .execute_stream()
            .await?
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

/// `BEGIN`, `START TRANSACTION`, `COMMIT`, `END` and a bare `ROLLBACK`: accepted, grouping
/// nothing (every statement commits on its own).
fn transaction(statement: &Statement) -> Option<Response> {
    let Statement::DataFusion(inner) = statement else {
        return None;
    };
    let DFStatement::Statement(sql) = &**inner else {
        return None;
    };
    match **sql {
        SqlStatement::StartTransaction { .. } => {
            Some(Response::TransactionStart(Tag::new("BEGIN")))
        }
        SqlStatement::Commit { .. } => Some(Response::TransactionEnd(Tag::new("COMMIT"))),
        SqlStatement::Rollback { .. } => Some(Response::TransactionEnd(Tag::new("ROLLBACK"))),
        _ => None,
    }
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
                Some(w) if w == "WITH" || w == "VALUES" || w == "(" => "SELECT".into(),
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
        Statement::RollbackSlice { .. } => "ROLLBACK SLICE",
        Statement::ShowSliceHistory(_) => "SHOW SLICE HISTORY",
        Statement::Vacuum(_) => "VACUUM",
        Statement::Verify(_) => "VERIFY",
    };
    fixed.to_string()
}

/// The portal's parameters, each as the type the query expects it (as the client sent it,
/// text or binary, in the type the client or the query gave it).
fn bind(portal: &Portal<Prepared>) -> PgWireResult<ParamValues> {
    let expected = parameter_types(&portal.statement.statement)?;
    let mut values = Vec::with_capacity(portal.parameter_len());
    for i in 0..portal.parameter_len() {
        let (inferred, arrow) = expected.get(i).cloned().unwrap_or((Type::TEXT, None));
        let pg = portal
            .statement
            .parameter_types
            .get(i)
            .cloned()
            .flatten()
            .filter(|t| *t != Type::UNKNOWN)
            .unwrap_or(inferred);
        let value = parameter(portal, i, &pg)?;
        let value = match &arrow {
            Some(dt) if value.data_type() != *dt => {
                value.cast_to(dt).map_err(|e| user_error(&e.into()))?
            }
            _ => value,
        };
        values.push(value.into());
    }
    Ok(ParamValues::List(values))
}

/// Parameter `i` of the portal, read as PostgreSQL type `pg`.
fn parameter(portal: &Portal<Prepared>, i: usize, pg: &Type) -> PgWireResult<ScalarValue> {
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
        // Text, and every other type as its text, which the query's expected type casts.
        _ => ScalarValue::Utf8(portal.parameter::<String>(i, &Type::TEXT)?),
    })
}

/// The SQLSTATE of an error: what kind of failure it is, for clients to act on.
pub fn sqlstate(e: &IcePieError) -> &'static str {
    match e {
        IcePieError::Syntax(_) => "42601",
        IcePieError::InvalidName { .. } => "42602",
        IcePieError::CoreTableNotFound(_) | IcePieError::SliceNotFound(_) => "42P01",
        IcePieError::AlreadyExists { .. } => "42P07",
        IcePieError::CoreTableInUse { .. } => "2BP01",
        IcePieError::SchemaMismatch { .. } => "42804",
        // read_only_sql_transaction: the core is append-only.
        IcePieError::ReadOnly(_) => "25006",
        IcePieError::BadLocation { .. } => "58P01",
        IcePieError::InvalidDefinition { .. } => "42P17",
        IcePieError::RefreshFailed { source, .. } => sqlstate(source),
        // serialization_failure: another writer went first; running it again is the remedy.
        IcePieError::Conflict { .. } | IcePieError::ChangedMeanwhile { .. } => "40001",
        IcePieError::Damaged { .. } | IcePieError::CorruptMetadata { .. } => "XX001",
        IcePieError::MemoryBudget { .. } => "53200",
        // object_not_in_prerequisite_state: thaw it first.
        IcePieError::Frozen { .. } => "55000",
        IcePieError::VersionNotFound { .. } => "42704",
        IcePieError::Setting { .. } => "22023",
        IcePieError::Joined(inner) => sqlstate(inner),
        IcePieError::Column(_) => "42703",
        IcePieError::BadData(_) => "22000",
        IcePieError::DataFusion(e) => datafusion_sqlstate(e),
        IcePieError::Warehouse { .. } | IcePieError::Delta(_) | IcePieError::ObjectStore(_) => {
            "58030"
        }
        IcePieError::Server(_) => "58000",
        IcePieError::NotAllowed(_) => "42501",
    }
}

fn datafusion_sqlstate(e: &datafusion::error::DataFusionError) -> &'static str {
    use datafusion::error::DataFusionError as E;
    match e.find_root() {
        E::SQL(..) => "42601",
        E::SchemaError(..) => "42703",
        E::Plan(text) if text.contains("not found") => "42P01",
        E::Plan(_) => "42000",
        E::NotImplemented(_) => "0A000",
        E::ResourcesExhausted(_) => "53200",
        E::Execution(_) | E::ArrowError(..) => "22000",
        _ => "XX000",
    }
}

fn error_info(e: &IcePieError) -> ErrorInfo {
    ErrorInfo::new("ERROR".into(), sqlstate(e).into(), e.to_string())
}

fn user_error(e: &IcePieError) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(e)))
}
