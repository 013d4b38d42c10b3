//! Running clients' statements: the simple query protocol (a text of statements, each run and
//! its rows sent before the next starts) and the extended one (prepared statements, bound
//! parameters, portals), rows streamed batch by batch.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::ParamValues;
use futures::{Sink, SinkExt, StreamExt, TryStreamExt};
use pgwire::api::portal::{Format, Portal, PortalExecutionState};
use pgwire::api::query::{
    send_execution_response, send_query_response, send_ready_for_query, ExtendedQueryHandler,
    SimpleQueryHandler,
};
use pgwire::api::results::{QueryResponse, Response, Tag};
use pgwire::api::store::{Entry, PortalStore};
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionHandle, PgWireConnectionState, DEFAULT_NAME,
};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::extendedquery::Execute;
use pgwire::messages::response::{EmptyQueryResponse, TransactionStatus};
use pgwire::messages::simplequery::Query;
use pgwire::messages::PgWireBackendMessage;

use super::encode;
use super::errors::{error_info, user_error};
use super::pg_compat::parse_pg;
use super::policy::Policy;
use super::prepared::{bind, Parser, Prepared};
use super::statements::{admit, counts_rows, execute, written, Session};
use crate::engine::IcePie;
use crate::sql::Statement;

/// Runs statements on the warehouse for every connection.
pub(super) struct Backend {
    pub(super) warehouse: IcePie,
    pub(super) policy: Policy,
    pub(super) statement_timeout: Option<std::time::Duration>,
    pub(super) parser: Arc<Parser>,
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

/// The PostgreSQL answer to a session statement.
fn session_response(session: Session) -> Response {
    match session {
        Session::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Session::Commit => Response::TransactionEnd(Tag::new("COMMIT")),
        Session::Rollback => Response::TransactionEnd(Tag::new("ROLLBACK")),
        Session::Set => Response::Execution(Tag::new("SET")),
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
