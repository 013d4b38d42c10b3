//! Arrow Flight SQL ([`serve_flight`]): the same statements as the PostgreSQL server, for
//! clients that want Arrow (ADBC, the Flight SQL JDBC driver, arrow-flight's client).
//!
//! - A statement runs when its `GetFlightInfo` arrives: a query is planned then (its rows are
//!   computed as the client reads them); every other statement (`CREATE SLICE`, `INGEST`,
//!   `INSERT`, ...) runs to its end, and its result is what the REPL shows (for a statement
//!   that counts the rows it wrote, the count). The info's ticket fetches the rows once, with
//!   `DoGet`, as Arrow batches streamed from the plan; a ticket not used within
//!   [`RESULT_TTL`] is dropped.
//! - `DoPut` of an update runs a statement and answers with the rows it wrote (`-1` when it
//!   writes no rows it can count: DDL, icepie's statements).
//! - Prepared statements take `$n` or `?` placeholders; their parameter types come from the
//!   plan, their values from the Arrow rows the client binds, cast to those types: one row for
//!   a query, one run per row for an update.
//! - Metadata: catalogs, schemas, tables (with their Arrow schemas), table types and the
//!   server's SQL info, from `information_schema`, so a client lists what SQL finds.
//! - Errors carry a gRPC code and their SQLSTATE in the `x-sqlstate` header.
//! - Authentication: basic (any user name, the server's password) at the handshake or on any
//!   call, then the bearer token the handshake returned. Basic authentication sends the
//!   password itself, so a server with a password listens beyond loopback only with TLS;
//!   without a password it takes every client and listens only on loopback.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, CommandStatementQuery, CommandStatementUpdate,
    DoPutPreparedStatementResult, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    SchemaAsIpc, Ticket,
};
use base64::Engine;
use datafusion::arrow::array::{Array, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::common::{ParamValues, ScalarValue, TableReference};
use datafusion::dataframe::DataFrame;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use super::backend::{admit, counts_rows, execute, parameter_slots, written, written_in};
use super::errors::sqlstate;
use super::policy::Policy;
use super::{Secret, ServerOptions};
use crate::engine::IcePie;
use crate::error::{IcePieError, Result};
use crate::sql::Statement;

/// How long a statement's result waits for its `DoGet` before it is dropped.
pub const RESULT_TTL: Duration = Duration::from_secs(600);

/// How long a prepared statement, or a bearer token, may go unused before it is dropped.
pub const IDLE_TTL: Duration = Duration::from_secs(24 * 3600);

/// At most this many results wait for their `DoGet` at once; beyond, statements are refused
/// until some are read or expire.
const MAX_RESULTS: usize = 1_000;

/// At most this many prepared statements are kept, and as many bearer tokens; beyond, the
/// least recently used is dropped.
const MAX_PREPARED: usize = 10_000;
const MAX_TOKENS: usize = 10_000;

/// How many password checks run at once (each is thousands of HMACs, off the async workers),
/// and how long a wrong password waits for its answer: guessing is slow and cannot starve
/// the queries.
const PASSWORD_CHECKS: usize = 2;
const WRONG_PASSWORD_DELAY: Duration = Duration::from_millis(500);

/// Serves `warehouse` over Arrow Flight SQL on `listener` until `shutdown` resolves. Refuses
/// a listener beyond the loopback interface without a password.
pub async fn serve_flight(
    warehouse: IcePie,
    listener: tokio::net::TcpListener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| IcePieError::Server(format!("the Flight SQL listener: {e}")))?;
    if options.password.is_none() && !addr.ip().is_loopback() {
        return Err(IcePieError::Server(format!(
            "{addr} is reachable from other machines and no password is set: set one \
             (ICEPIE_PASSWORD) or listen on 127.0.0.1"
        )));
    }
    if options.password.is_some() && options.tls.is_none() && !addr.ip().is_loopback() {
        return Err(IcePieError::Server(format!(
            "{addr} is reachable from other machines and Flight SQL clients send the password \
             itself (basic authentication): give a TLS certificate and key (--tls-cert, \
             --tls-key) or listen on 127.0.0.1"
        )));
    }
    let auth_timeout = options.checked_auth_timeout()?;
    let service = Flight {
        policy: Policy::new(&options.allow_paths, options.read_only)?
            .with_statement_memory(options.statement_memory),
        sql_info: sql_info(options.read_only)?,
        statement_timeout: options.statement_timeout,
        password: options
            .password
            .as_deref()
            .map(Secret::new)
            .transpose()?
            .map(Arc::new),
        checking: tokio::sync::Semaphore::new(PASSWORD_CHECKS),
        tokens: Mutex::default(),
        results: Mutex::default(),
        prepared: Mutex::default(),
        warehouse,
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        // tonic builds its TLS on the process's default crypto provider: aws-lc-rs, as the
        // object stores use, unless the embedding app installed one.
        let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
        let identity = tonic::transport::Identity::from_pem(&tls.cert, &tls.key);
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| IcePieError::Server(format!("the TLS certificate and key: {e}")))?;
    }
    let places = options
        .max_connections
        .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
    if let Some(n) = options.max_connections {
        // gRPC multiplexes a client's calls on one connection: each connection also runs at
        // most that many calls at once.
        server = server.concurrency_limit_per_connection(n);
    }
    let incoming = TcpIncoming::from(listener).map_ok(move |stream| Connection {
        stream,
        logged_in: Arc::new(AtomicBool::new(false)),
        login_by: Some(Box::pin(tokio::time::sleep(auth_timeout))),
        place: match &places {
            None => Place::Unlimited,
            Some(places) => places
                .clone()
                .try_acquire_owned()
                .map_or(Place::Refused, Place::Taken),
        },
    });
    server
        .add_service(FlightServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| IcePieError::Server(format!("the Flight SQL server: {e}")))
}

/// A client's connection, its place among `--max-connections`, and whether it has logged in.
struct Connection {
    stream: tokio::net::TcpStream,
    place: Place,
    /// Set by the first call that authenticates.
    logged_in: Arc<AtomicBool>,
    /// When the connection is closed unless it has logged in; `None` once it has.
    login_by: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Whether a connection holds one of the `--max-connections` places.
enum Place {
    /// No limit.
    Unlimited,
    /// One of the places, given back when the connection closes.
    Taken(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
    /// Every place was taken when it connected: its calls are refused (with a gRPC status the
    /// client can show, which closing it would not give).
    Refused,
}

/// What a call knows of its connection.
#[derive(Clone, Debug)]
struct ConnectionInfo {
    /// The connection holds no place.
    refused: bool,
    /// Set when a call on it authenticates.
    logged_in: Arc<AtomicBool>,
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            refused: matches!(self.place, Place::Refused),
            logged_in: self.logged_in.clone(),
        }
    }
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // The server always waits to read from an open connection, so this runs (and the
        // timer wakes it) even when the client sends nothing.
        let this = &mut *self;
        if let Some(login_by) = &mut this.login_by {
            if this.logged_in.load(Ordering::Acquire) {
                this.login_by = None;
            } else if login_by.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not authenticate in time (--auth-timeout)",
                )));
            }
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What `request` knows of its connection.
fn connection<T>(request: &Request<T>) -> Option<&ConnectionInfo> {
    let extensions = request.extensions();
    extensions.get::<ConnectionInfo>().or_else(|| {
        extensions
            .get::<tonic::transport::server::TlsConnectInfo<ConnectionInfo>>()
            .map(|tls| tls.get_ref())
    })
}

/// Records that `request`'s connection has logged in: it stays open past `--auth-timeout`.
fn logged_in<T>(request: &Request<T>) {
    if let Some(info) = connection(request) {
        info.logged_in.store(true, Ordering::Release);
    }
}

/// Refuses a call on a connection that came beyond `--max-connections`.
fn admitted<T>(request: &Request<T>) -> std::result::Result<(), Status> {
    match connection(request).is_some_and(|i| i.refused) {
        false => Ok(()),
        true => Err(Status::resource_exhausted(
            "sorry, too many clients already: this server takes a limited number of connections \
             at once (--max-connections); close another or try again later",
        )),
    }
}

/// What the server tells of itself (`CommandGetSqlInfo`).
fn sql_info(read_only: bool) -> Result<SqlInfoData> {
    let mut info = SqlInfoDataBuilder::new();
    info.append(SqlInfo::FlightSqlServerName, "icepie");
    info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    info.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    info.append(SqlInfo::FlightSqlServerReadOnly, read_only);
    info.append(SqlInfo::FlightSqlServerSql, true);
    info.append(SqlInfo::FlightSqlServerSubstrait, false);
    info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    info.append(SqlInfo::FlightSqlServerCancel, false);
    info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    info.build()
        .map_err(|e| IcePieError::Server(format!("the Flight SQL server's info: {e}")))
}

/// A statement's result waiting for its `DoGet`.
struct Pending {
    frame: DataFrame,
    at: Instant,
}

/// A prepared statement and the parameters last bound to it.
struct PreparedEntry {
    statement: Statement,
    params: ParamValues,
    /// The Arrow type of each `$n`, when the plan says.
    slots: Vec<Option<DataType>>,
    at: Instant,
}

/// The Flight SQL service.
struct Flight {
    warehouse: IcePie,
    policy: Policy,
    sql_info: SqlInfoData,
    statement_timeout: Option<Duration>,
    password: Option<Arc<Secret>>,
    /// Password checks running.
    checking: tokio::sync::Semaphore,
    /// The bearer tokens given at handshakes, with when each was last used.
    tokens: Mutex<HashMap<String, Instant>>,
    results: Mutex<HashMap<String, Pending>>,
    prepared: Mutex<HashMap<String, PreparedEntry>>,
}

/// An icepie error as gRPC carries it: a code for the client library, the SQLSTATE in the
/// `x-sqlstate` header, the message as the REPL shows it.
fn status(e: &IcePieError) -> Status {
    let state = sqlstate(e);
    let code = match state {
        "42P01" | "42704" => tonic::Code::NotFound,
        "42P07" => tonic::Code::AlreadyExists,
        "42501" | "25006" => tonic::Code::PermissionDenied,
        "55000" | "2BP01" => tonic::Code::FailedPrecondition,
        "40001" => tonic::Code::Aborted,
        "53200" => tonic::Code::ResourceExhausted,
        "57014" => tonic::Code::DeadlineExceeded,
        "0A000" => tonic::Code::Unimplemented,
        s if s.starts_with("42") || s.starts_with("22") => tonic::Code::InvalidArgument,
        _ => tonic::Code::Internal,
    };
    let mut status = Status::new(code, e.to_string());
    status
        .metadata_mut()
        .insert("x-sqlstate", MetadataValue::from_static(state));
    status
}

fn timed_out(limit: Duration) -> Status {
    let mut status = Status::deadline_exceeded(format!(
        "canceling statement due to statement timeout ({} s)",
        limit.as_secs_f64()
    ));
    status
        .metadata_mut()
        .insert("x-sqlstate", MetadataValue::from_static("57014"));
    status
}

/// Drops the entries of `map` last used more than `ttl` ago, then, when `map` holds `max`
/// or more, its least recently used one.
fn expire<T>(map: &mut HashMap<String, T>, ttl: Duration, max: usize, at: impl Fn(&T) -> Instant) {
    map.retain(|_, v| at(v).elapsed() < ttl);
    if map.len() >= max {
        if let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| at(v))
            .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
    }
}

/// The end of a statement's time, when the server has a statement timeout.
type Deadline = Option<(tokio::time::Instant, Duration)>;

/// Runs `work` until `deadline`.
async fn within<T>(
    deadline: Deadline,
    work: impl Future<Output = std::result::Result<T, IcePieError>>,
) -> std::result::Result<T, Status> {
    match deadline {
        None => work.await,
        Some((at, limit)) => tokio::time::timeout_at(at, work)
            .await
            .map_err(|_| timed_out(limit))?,
    }
    .map_err(|e| status(&e))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere never leaves these maps half-changed: each change is one call.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Flight {
    /// Admits a request that carries a bearer token from a handshake or the password (basic).
    async fn check<T>(&self, request: &Request<T>) -> std::result::Result<(), Status> {
        self.authenticate(request).await?;
        logged_in(request);
        Ok(())
    }

    /// [`Flight::check`] but for recording the login.
    async fn authenticate<T>(&self, request: &Request<T>) -> std::result::Result<(), Status> {
        admitted(request)?;
        if self.password.is_none() {
            return Ok(());
        }
        let refused = || {
            Status::unauthenticated(
                "this server takes a password: log in with basic authentication (any user \
                 name, the server's password) or send the bearer token the handshake gave",
            )
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(refused)?;
        if let Some(token) = header.strip_prefix("Bearer ") {
            let mut tokens = lock(&self.tokens);
            return match tokens.get_mut(token.trim()) {
                Some(used) if used.elapsed() < IDLE_TTL => {
                    *used = Instant::now();
                    Ok(())
                }
                _ => Err(refused()),
            };
        }
        match header.strip_prefix("Basic ").and_then(basic_password) {
            Some(password) => match self.verify(password).await {
                true => Ok(()),
                false => Err(refused()),
            },
            None => Err(refused()),
        }
    }

    /// True when `password` is the server's; checked off the async workers, a few at a time,
    /// and a wrong one answered late.
    async fn verify(&self, password: String) -> bool {
        let Some(secret) = self.password.clone() else {
            return true;
        };
        let right = {
            let _turn = self.checking.acquire().await;
            tokio::task::spawn_blocking(move || secret.verify(&password))
                .await
                .unwrap_or(false)
        };
        if !right {
            tokio::time::sleep(WRONG_PASSWORD_DELAY).await;
        }
        right
    }

    /// A new bearer token.
    fn new_token(&self) -> String {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut tokens = lock(&self.tokens);
        expire(&mut tokens, IDLE_TTL, MAX_TOKENS, |at| *at);
        tokens.insert(token.clone(), Instant::now());
        token
    }

    /// When a statement starting now must end.
    fn deadline(&self) -> Deadline {
        self.statement_timeout
            .map(|limit| (tokio::time::Instant::now() + limit, limit))
    }

    /// Runs one statement with `params` until `deadline`. A query is planned only (its rows
    /// are computed as they are read); a statement that writes rows it counts (`INSERT`,
    /// `COPY`, ...) runs to its end and its result is that count.
    async fn run(
        &self,
        statement: Statement,
        params: ParamValues,
        deadline: Deadline,
    ) -> std::result::Result<DataFrame, Status> {
        if admit(&self.policy, &statement)
            .map_err(|e| status(&e))?
            .is_some()
        {
            // BEGIN, COMMIT, SET of a PostgreSQL variable: accepted, nothing to run.
            return self
                .warehouse
                .context()
                .read_empty()
                .map_err(|e| status(&e.into()));
        }
        let counts = counts_rows(&statement);
        let frame = within(
            deadline,
            execute(&self.warehouse, &self.policy, statement, params),
        )
        .await?;
        if !counts {
            return Ok(frame);
        }
        let count = within(deadline, async {
            written(frame.execute_stream().await?).await
        })
        .await?;
        let batch = RecordBatch::try_from_iter([(
            "count",
            Arc::new(UInt64Array::from(vec![count])) as Arc<dyn Array>,
        )])
        .map_err(|e| status(&e.into()))?;
        self.warehouse
            .context()
            .read_batch(batch)
            .map_err(|e| status(&e.into()))
    }

    /// Keeps `frame` for its `DoGet` and describes it.
    fn ticket(
        &self,
        frame: DataFrame,
        descriptor: FlightDescriptor,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = frame.schema().as_arrow().clone();
        let handle = uuid::Uuid::new_v4().to_string();
        {
            let mut results = lock(&self.results);
            results.retain(|_, p| p.at.elapsed() < RESULT_TTL);
            if results.len() >= MAX_RESULTS {
                return Err(Status::resource_exhausted(format!(
                    "{MAX_RESULTS} results are waiting for their DoGet: read them (or let them \
                     expire, after {} s) before running more statements",
                    RESULT_TTL.as_secs()
                )));
            }
            results.insert(
                handle.clone(),
                Pending {
                    frame,
                    at: Instant::now(),
                },
            );
        }
        let ticket = TicketStatementQuery {
            statement_handle: handle.into_bytes().into(),
        };
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| status(&e.into()))?
            .with_endpoint(
                FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec())),
            )
            .with_descriptor(descriptor)
            .with_ordered(true);
        Ok(Response::new(info))
    }

    /// Runs a statement for `DoPut`: the rows it wrote, or -1 when it writes none it counts.
    async fn update(
        &self,
        statement: Statement,
        params: ParamValues,
    ) -> std::result::Result<i64, Status> {
        let counts = counts_rows(&statement);
        let deadline = self.deadline();
        let frame = self.run(statement, params, deadline).await?;
        within(deadline, async {
            let mut stream = frame.execute_stream().await?;
            let mut count = 0;
            while let Some(batch) = stream.try_next().await? {
                if counts {
                    count += written_in(&batch);
                }
            }
            Ok(if counts {
                i64::try_from(count).unwrap_or(i64::MAX)
            } else {
                -1
            })
        })
        .await
    }

    /// The statement, bound parameters and parameter types of a prepared statement.
    #[allow(clippy::result_large_err)]
    fn prepared_statement(
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

    /// A catalog listing of `information_schema` (names only: small), as string columns.
    async fn listing(&self, sql: &str) -> std::result::Result<Vec<RecordBatch>, Status> {
        let frame = self.warehouse.sql(sql).await.map_err(|e| status(&e))?;
        frame.collect().await.map_err(|e| status(&e.into()))
    }
}

/// The password of a basic `authorization` header's credentials (`user:password`, base64).
fn basic_password(credentials: &str) -> Option<String> {
    // With or without padding: Go's Flight client (ADBC) sends it unpadded.
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let decoded = engine.decode(credentials.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, p)| p.to_string())
}

/// Exactly one statement of `sql`.
#[allow(clippy::result_large_err)]
fn one_statement(sql: &str) -> std::result::Result<Statement, Status> {
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
    let DFStatement::Statement(sql) = inner.as_mut() else {
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

/// The columns of `batches` as text, row by row.
fn string_rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for batch in batches {
        let columns: Vec<Option<StringArray>> = batch
            .columns()
            .iter()
            .map(|c| {
                datafusion::arrow::compute::cast(c, &DataType::Utf8)
                    .ok()
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
            })
            .collect();
        for i in 0..batch.num_rows() {
            rows.push(
                columns
                    .iter()
                    .map(|c| {
                        c.as_ref()
                            .map(|c| c.value(i).to_string())
                            .unwrap_or_default()
                    })
                    .collect(),
            );
        }
    }
    rows
}

/// `text` as a SQL string literal.
fn sql_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Flight SQL's name for a table type of `information_schema`.
fn table_type(kind: &str) -> &str {
    match kind {
        "BASE TABLE" => "TABLE",
        other => other,
    }
}

/// Streams `batches` (of `schema`) as Flight data.
fn flight_stream(
    schema: SchemaRef,
    batches: impl Stream<Item = std::result::Result<RecordBatch, FlightError>> + Send + 'static,
) -> Response<BoxStream<'static, std::result::Result<arrow_flight::FlightData, Status>>> {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(batches)
        .map_err(Status::from);
    Response::new(stream.boxed())
}

/// One metadata batch as a Flight response.
fn one_batch(
    batch: std::result::Result<RecordBatch, FlightError>,
) -> std::result::Result<
    Response<BoxStream<'static, std::result::Result<arrow_flight::FlightData, Status>>>,
    Status,
> {
    let batch = batch.map_err(Status::from)?;
    Ok(flight_stream(
        batch.schema(),
        futures::stream::iter([Ok(batch)]),
    ))
}

/// A `FlightInfo` whose ticket is the metadata command itself.
fn metadata_info(
    command: impl ProstMessageExt,
    schema: &Schema,
    descriptor: FlightDescriptor,
) -> std::result::Result<Response<FlightInfo>, Status> {
    let ticket = Ticket::new(command.as_any().encode_to_vec());
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| status(&e.into()))?
        .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

/// Ends `stream` with a timeout error at `deadline`.
fn with_deadline<S>(
    stream: S,
    deadline: Deadline,
) -> BoxStream<'static, std::result::Result<arrow_flight::FlightData, Status>>
where
    S: Stream<Item = std::result::Result<arrow_flight::FlightData, Status>> + Send + 'static,
{
    let Some((at, limit)) = deadline else {
        return stream.boxed();
    };
    let expired = Arc::new(AtomicBool::new(false));
    let flag = expired.clone();
    let deadline = async move {
        tokio::time::sleep_until(at).await;
        flag.store(true, Ordering::SeqCst);
    };
    stream
        .take_until(deadline)
        .chain(
            futures::stream::once(async move {
                expired
                    .load(Ordering::SeqCst)
                    .then(|| Err(timed_out(limit)))
            })
            .filter_map(futures::future::ready),
        )
        .boxed()
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

type FlightResult<T> = std::result::Result<T, Status>;
type DoGet = Response<<Flight as FlightService>::DoGetStream>;

#[tonic::async_trait]
impl FlightSqlService for Flight {
    type FlightService = Flight;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> FlightResult<Response<Pin<Box<dyn Stream<Item = FlightResult<HandshakeResponse>> + Send>>>>
    {
        admitted(&request)?;
        let token = match &self.password {
            None => String::new(),
            Some(_) => {
                let password = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|h| h.strip_prefix("Basic "))
                    .and_then(basic_password);
                let right = match password {
                    Some(p) => self.verify(p).await,
                    None => false,
                };
                if !right {
                    return Err(Status::unauthenticated(
                        "password authentication failed: give the server's password (basic \
                         authentication, any user name)",
                    ));
                }
                self.new_token()
            }
        };
        logged_in(&request);
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into_bytes().into(),
        };
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(futures::stream::iter([Ok(reply)])));
        if !token.is_empty() {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|e| Status::internal(e.to_string()))?;
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> FlightResult<Response<FlightInfo>> {
        self.check(&request).await?;
        let statement = one_statement(&query.query)?;
        let frame = self
            .run(statement, ParamValues::List(vec![]), self.deadline())
            .await?;
        self.ticket(frame, request.into_inner())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> FlightResult<Response<FlightInfo>> {
        self.check(&request).await?;
        let (statement, params, _) = self.prepared_statement(&query.prepared_statement_handle)?;
        let frame = self.run(statement, params, self.deadline()).await?;
        self.ticket(frame, request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> FlightResult<DoGet> {
        self.check(&request).await?;
        let handle = String::from_utf8_lossy(&ticket.statement_handle).to_string();
        let pending = lock(&self.results).remove(&handle).ok_or_else(|| {
            Status::not_found(format!(
                "no result for this ticket: each is read once, within {} s of its statement; \
                 run the statement again",
                RESULT_TTL.as_secs()
            ))
        })?;
        let deadline = self.deadline();
        let stream = within(deadline, async {
            Ok(pending.frame.execute_stream().await?)
        })
        .await?;
        // The physical schema: the batches' own.
        let schema = stream.schema();
        // Batch by batch, as the client reads: the result is never held whole.
        let batches = stream.map_err(|e| FlightError::Tonic(Box::new(status(&e.into()))));
        let response = flight_stream(schema, batches);
        Ok(Response::new(with_deadline(
            response.into_inner(),
            deadline,
        )))
    }

    async fn do_put_statement_update(
        &self,
        command: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> FlightResult<i64> {
        self.check(&request).await?;
        let statement = one_statement(&command.query)?;
        self.update(statement, ParamValues::List(vec![])).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> FlightResult<ActionCreatePreparedStatementResult> {
        self.check(&request).await?;
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
            Some(plan) if super::backend::returns_rows(plan) => {
                Some(Arc::new(plan.schema().as_arrow().clone()))
            }
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

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> FlightResult<DoPutPreparedStatementResult> {
        self.check(&request).await?;
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

    async fn do_put_prepared_statement_update(
        &self,
        query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> FlightResult<i64> {
        self.check(&request).await?;
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

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> FlightResult<()> {
        self.check(&request).await?;
        let key = String::from_utf8_lossy(&query.prepared_statement_handle).to_string();
        lock(&self.prepared).remove(&key);
        Ok(())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> FlightResult<Response<FlightInfo>> {
        self.check(&request).await?;
        let schema = query.into_builder().schema();
        metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> FlightResult<DoGet> {
        self.check(&request).await?;
        let mut builder = query.into_builder();
        let mut names = self.warehouse.context().catalog_names();
        names.sort();
        for name in names {
            builder.append(name);
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> FlightResult<Response<FlightInfo>> {
        self.check(&request).await?;
        let schema = query.clone().into_builder().schema();
        metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> FlightResult<DoGet> {
        self.check(&request).await?;
        let mut filters = vec!["TRUE".to_string()];
        if let Some(catalog) = &query.catalog {
            filters.push(format!("catalog_name = {}", sql_string(catalog)));
        }
        if let Some(pattern) = &query.db_schema_filter_pattern {
            filters.push(format!("schema_name LIKE {}", sql_string(pattern)));
        }
        let rows = string_rows(
            &self
                .listing(&format!(
                    "SELECT catalog_name, schema_name FROM information_schema.schemata \
                     WHERE {} ORDER BY catalog_name, schema_name",
                    filters.join(" AND ")
                ))
                .await?,
        );
        let mut builder = query.into_builder();
        for row in rows {
            builder.append(&row[0], &row[1]);
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> FlightResult<Response<FlightInfo>> {
        self.check(&request).await?;
        let schema = query.clone().into_builder().schema();
        metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> FlightResult<DoGet> {
        self.check(&request).await?;
        // The filters go to the listing, so that only the tables asked for are looked up.
        let mut filters = vec!["TRUE".to_string()];
        if let Some(catalog) = &query.catalog {
            filters.push(format!("table_catalog = {}", sql_string(catalog)));
        }
        if let Some(pattern) = &query.db_schema_filter_pattern {
            filters.push(format!("table_schema LIKE {}", sql_string(pattern)));
        }
        if let Some(pattern) = &query.table_name_filter_pattern {
            filters.push(format!("table_name LIKE {}", sql_string(pattern)));
        }
        let rows = string_rows(
            &self
                .listing(&format!(
                    "SELECT table_catalog, table_schema, table_name, table_type \
                     FROM information_schema.tables WHERE {} \
                     ORDER BY table_catalog, table_schema, table_name",
                    filters.join(" AND ")
                ))
                .await?,
        );
        let include_schema = query.include_schema;
        let mut builder = query.into_builder();
        let empty = Schema::empty();
        for row in rows {
            let schema = match include_schema {
                // Each table's schema is looked up only when asked for (a slice's is read
                // from its log); one that cannot be read is listed without its columns.
                true => self
                    .warehouse
                    .context()
                    .table_provider(TableReference::full(
                        row[0].as_str(),
                        row[1].as_str(),
                        row[2].as_str(),
                    ))
                    .await
                    .map(|t| t.schema())
                    .unwrap_or_else(|_| Arc::new(empty.clone())),
                false => Arc::new(empty.clone()),
            };
            builder
                .append(&row[0], &row[1], &row[2], table_type(&row[3]), &schema)
                .map_err(Status::from)?;
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> FlightResult<Response<FlightInfo>> {
        self.check(&request).await?;
        let schema = query.into_builder().schema();
        metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> FlightResult<DoGet> {
        self.check(&request).await?;
        let mut builder = query.into_builder();
        for kind in ["TABLE", "VIEW"] {
            builder.append(kind);
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> FlightResult<Response<FlightInfo>> {
        self.check(&request).await?;
        let schema = query.clone().into_builder(&self.sql_info).schema();
        metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> FlightResult<DoGet> {
        self.check(&request).await?;
        one_batch(query.into_builder(&self.sql_info).build())
    }

    async fn do_get_fallback(&self, request: Request<Ticket>, message: Any) -> FlightResult<DoGet> {
        self.check(&request).await?;
        Err(Status::unimplemented(format!(
            "this server does not answer {}",
            message.type_url
        )))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;

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

    #[test]
    fn basic_credentials_give_their_password() {
        let header = base64::engine::general_purpose::STANDARD.encode("analyst:s3cret:x");
        assert_eq!(basic_password(&header).as_deref(), Some("s3cret:x"));
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode("analyst:s3cret");
        assert_eq!(basic_password(&unpadded).as_deref(), Some("s3cret"));
        assert_eq!(basic_password("not base64!"), None);
    }
}
