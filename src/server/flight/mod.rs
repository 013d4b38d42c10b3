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
//!
//! This file holds the service, its statements and their results; a client's connection
//! (`conn`), authentication (`auth`), prepared statements (`params`), metadata (`metadata`) and
//! the statement timeout (`timeout`) each have their own.

mod auth;
mod conn;
mod metadata;
mod params;
mod timeout;

use auth::PASSWORD_CHECKS;
use conn::{Connection, Place};
use metadata::{metadata_info, sql_info};
use params::{one_statement, PreparedEntry};
use timeout::{with_deadline, within, Deadline};

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::SqlInfoData;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, CommandStatementQuery, CommandStatementUpdate,
    DoPutPreparedStatementResult, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket,
};
use datafusion::arrow::array::{Array, RecordBatch, UInt64Array};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ParamValues;
use datafusion::dataframe::DataFrame;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use super::errors::sqlstate;
use super::policy::Policy;
use super::statements::{admit, counts_rows, execute, written, written_in};
use super::{Secret, ServerOptions};
use crate::engine::IcePie;
use crate::error::{IcePieError, Result};
use crate::sql::Statement;

/// How long a statement's result waits for its `DoGet` before it is dropped.
pub(super) const RESULT_TTL: Duration = Duration::from_secs(600);

/// How long a prepared statement, or a bearer token, may go unused before it is dropped.
pub(super) const IDLE_TTL: Duration = Duration::from_secs(24 * 3600);

/// At most this many results wait for their `DoGet` at once; beyond, statements are refused
/// until some are read or expire.
const MAX_RESULTS: usize = 1_000;

/// At most this many prepared statements are kept, and as many bearer tokens; beyond, the
/// least recently used is dropped.
const MAX_PREPARED: usize = 10_000;
const MAX_TOKENS: usize = 10_000;

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
    // Without TCP_NODELAY, a reply's last small write waits for the client's delayed ACK
    // (tens of milliseconds) whenever its headers or schema went out first; tonic sets it
    // only for listeners it binds itself.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map_ok(move |stream| Connection {
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

/// A statement's result waiting for its `DoGet`.
struct Pending {
    frame: DataFrame,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere never leaves these maps half-changed: each change is one call.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Flight {
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
        self.answer_handshake(request).await
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
        self.create_prepared(query).await
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> FlightResult<DoPutPreparedStatementResult> {
        self.check(&request).await?;
        self.bind_parameters(query, request).await
    }

    async fn do_put_prepared_statement_update(
        &self,
        query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> FlightResult<i64> {
        self.check(&request).await?;
        self.update_prepared(query, request).await
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> FlightResult<()> {
        self.check(&request).await?;
        self.close_prepared(query).await
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
        self.catalogs(query).await
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
        self.schemas(query).await
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
        self.tables(query).await
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
        self.table_types(query).await
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
        self.server_info(query).await
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
