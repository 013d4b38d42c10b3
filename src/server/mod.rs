//! Serving a warehouse over the network: the PostgreSQL wire protocol ([`serve_pg`]), so that
//! `psql`, drivers (psycopg, JDBC, tokio-postgres) and BI tools can run every icepie statement,
//! and Arrow Flight SQL ([`serve_flight`]) for clients that read Arrow (ADBC). Both take the
//! same [`ServerOptions`]; this page describes the PostgreSQL server, [`serve_flight`] the
//! other.
//!
//! - Simple query protocol: a text of several statements runs them in order, each with its
//!   own result; the first failure stops the rest.
//! - Extended query protocol: prepared statements with `$n` parameters (their types inferred
//!   from the query, or given by the client), text or binary results.
//! - Results stream: rows are encoded batch by batch as the client reads them.
//! - Errors carry a SQLSTATE ([`sqlstate`]): syntax, undefined table, read-only core, frozen
//!   slice, conflict, ...
//! - Cancel requests (psql's Ctrl-C) and `statement_timeout` stop a statement, its rows
//!   included, with SQLSTATE 57014; the connection goes on.
//! - Authentication: SCRAM-SHA-256 against a password when one is given; without one, the
//!   server accepts every client and refuses to listen beyond the loopback interface.
//! - TLS when a certificate and key are given (clients ask for it: `sslmode=require`), and
//!   only TLS with [`ServerOptions::require_tls`].
//! - A connection that has not logged in within [`ServerOptions::auth_timeout`] is closed.
//! - The server's files are not its clients': they name only locations under those the server
//!   was started with (`--allow-path`), and in read-only mode they only read.
//!
//! Each statement commits on its own, as in the REPL: `BEGIN`, `COMMIT` and a bare `ROLLBACK`
//! are accepted and group nothing.

mod backend;
mod encode;
mod errors;
mod flight;
mod pg_compat;
mod policy;
mod prepared;
mod statements;

use backend::Backend;
pub use errors::sqlstate;
pub use flight::serve_flight;
use prepared::Parser;

use policy::Policy;

use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::Sink;
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth, ScramSecret};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::{ClientInfo, ConnectionManager, PgWireConnectionState, PgWireServerHandlers};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::TcpListener;

use crate::engine::IcePie;
use crate::error::{IcePieError, Result};

/// Iterations of SCRAM-SHA-256's key derivation (PostgreSQL's default).
const SCRAM_ITERATIONS: usize = 4096;

/// How a server ([`serve_pg`], [`serve_flight`]) admits clients and what it lets them do.
#[derive(Clone, Default)]
pub struct ServerOptions {
    /// The password every client must give: the password, or PostgreSQL's stored form of it
    /// (`SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>`), so that the server's
    /// configuration need not hold it. PostgreSQL clients prove it with SCRAM-SHA-256 (it never
    /// crosses the network); Flight SQL clients send it with basic authentication (any user
    /// name) and get a bearer token, so serve Flight with TLS when it leaves the machine.
    /// `None` admits every client: only a loopback address may be served so.
    pub password: Option<String>,
    /// The local directories and object-store URL prefixes under which clients may name
    /// files (`INGEST … FROM`, `COPY … TO`, ...); none by default.
    pub allow_paths: Vec<String>,
    /// Clients may only read: queries, SHOW, DESCRIBE, EXPLAIN.
    pub read_only: bool,
    /// How long a statement may run, its rows' sending included, before it is cancelled;
    /// `None` for no limit.
    pub statement_timeout: Option<std::time::Duration>,
    /// How many clients may be connected at once; more are refused with SQLSTATE 53300 (pg)
    /// or `RESOURCE_EXHAUSTED` (Flight, where each connection also runs at most this many
    /// calls at once). `None` for no limit.
    pub max_connections: Option<usize>,
    /// The memory, in bytes, of each statement's rows (its own pool): operators that can
    /// spill to disk (sorts, aggregations) do so beyond it, and a statement that still needs
    /// more fails alone (SQLSTATE 53200) while the others go on. What icepie's statements
    /// compute before they answer (`INGEST … SELECT`, refreshes) keeps the warehouse's
    /// limits. `None`: no pool of its own.
    pub statement_memory: Option<u64>,
    /// The certificate chain and private key (PEM) to encrypt connections with (TLS); `None`
    /// for plain connections. A PostgreSQL client asks for TLS (`sslmode=require`); a Flight
    /// SQL server with TLS speaks only TLS (`grpc+tls://`).
    pub tls: Option<TlsFiles>,
    /// The PostgreSQL server refuses a client that does not negotiate TLS (SQLSTATE 28000)
    /// instead of serving it in clear. Needs [`ServerOptions::tls`]; a Flight SQL server
    /// with TLS speaks nothing else anyway.
    pub require_tls: bool,
    /// How long a client may take to connect and authenticate (its TLS handshake, its
    /// startup, its password) before its connection is closed, so that sockets which never
    /// log in cannot hold every `max_connections` place. `None`: [`DEFAULT_AUTH_TIMEOUT`].
    pub auth_timeout: Option<std::time::Duration>,
}

/// How long a client may take to authenticate unless [`ServerOptions::auth_timeout`] says.
pub const DEFAULT_AUTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl ServerOptions {
    /// The options a server cannot start with, and the time clients have to log in.
    fn checked_auth_timeout(&self) -> Result<std::time::Duration> {
        if self.require_tls && self.tls.is_none() {
            return Err(IcePieError::Server(
                "TLS is required (--require-tls) but no certificate and key are given: \
                 give --tls-cert and --tls-key"
                    .into(),
            ));
        }
        match self.auth_timeout.unwrap_or(DEFAULT_AUTH_TIMEOUT) {
            t if t.is_zero() => Err(IcePieError::Server(
                "the authentication timeout must be above zero".into(),
            )),
            t => Ok(t),
        }
    }
}

/// A server's TLS identity, in PEM.
#[derive(Clone)]
pub struct TlsFiles {
    /// The certificate chain, the server's first.
    pub cert: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
}

impl TlsFiles {
    /// Reads the certificate chain and key from PEM files.
    pub fn read(
        cert: impl AsRef<std::path::Path>,
        key: impl AsRef<std::path::Path>,
    ) -> Result<Self> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| {
                IcePieError::Server(format!(
                    "cannot read the TLS {what} {}: {e}; give a PEM file",
                    path.display()
                ))
            })
        };
        let files = Self {
            cert: read(cert.as_ref(), "certificate")?,
            key: read(key.as_ref(), "key")?,
        };
        // Refused here, before any server starts, when they do not make a TLS identity.
        files.acceptor()?;
        Ok(files)
    }

    /// The rustls acceptor pgwire takes; refuses PEM that holds no certificate or key.
    fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, e: String| {
            IcePieError::Server(format!("the TLS {what} is not usable: {e}"))
        };
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("certificate", "no CERTIFICATE in the PEM".into()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| bad("key", e.to_string()))?;
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("configuration", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate and key", e.to_string()))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles(***)")
    }
}

impl Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("allow_paths", &self.allow_paths)
            .field("read_only", &self.read_only)
            .field("statement_timeout", &self.statement_timeout)
            .field("max_connections", &self.max_connections)
            .field("statement_memory", &self.statement_memory)
            .field("tls", &self.tls.is_some())
            .field("require_tls", &self.require_tls)
            .field("auth_timeout", &self.auth_timeout)
            .finish()
    }
}

/// Serves `warehouse` over the PostgreSQL wire protocol on `listener` until `shutdown`
/// resolves. Refuses a listener beyond the loopback interface without a password.
pub async fn serve_pg(
    warehouse: IcePie,
    listener: TcpListener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = listener.local_addr().map_err(io_error)?;
    if options.password.is_none() && !addr.ip().is_loopback() {
        return Err(IcePieError::Server(format!(
            "{addr} is reachable from other machines and no password is set: set one \
             (ICEPIE_PASSWORD) or listen on 127.0.0.1"
        )));
    }
    let auth_timeout = options.checked_auth_timeout()?;
    let policy = Policy::new(&options.allow_paths, options.read_only)?
        .with_statement_memory(options.statement_memory);
    let tls = options.tls.as_ref().map(TlsFiles::acceptor).transpose()?;
    let handlers = Arc::new(Handlers {
        backend: Arc::new(Backend {
            policy,
            statement_timeout: options.statement_timeout,
            parser: Arc::new(Parser {
                warehouse: warehouse.clone(),
            }),
            warehouse,
        }),
        // Derived once: a login then costs no key derivation (which clients could make the
        // server do at will).
        password: match &options.password {
            Some(p) => Some(Arc::new(Secret::new(p)?)),
            None => None,
        },
        connections: Arc::new(ConnectionManager::new()),
        require_tls: options.require_tls,
    });
    let slots = options
        .max_connections
        .map(|n| (n, Arc::new(tokio::sync::Semaphore::new(n))));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // A failed accept (out of file descriptors, a reset) ends no other connection.
                let Ok((socket, _)) = accepted else { continue };
                let permit = match &slots {
                    None => None,
                    Some((max, slots)) => match slots.clone().try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        Err(_) => {
                            // Told why at its startup; its cancel requests still work.
                            let refuse = Arc::new(Refuse {
                                max: *max,
                                connections: handlers.connections.clone(),
                            });
                            let refused = pgwire::tokio::process_socket(socket, tls.clone(), refuse);
                            tokio::spawn(tokio::time::timeout(auth_timeout, refused));
                            continue;
                        }
                    },
                };
                let handlers = handlers.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _slot = permit;
                    let logged_in = Arc::new(AtomicBool::new(false));
                    let connection = Connection {
                        shared: handlers,
                        logged_in: logged_in.clone(),
                    };
                    // A client's protocol error ends its connection alone.
                    let served = pgwire::tokio::process_socket(socket, tls, connection);
                    tokio::pin!(served);
                    tokio::select! {
                        _ = &mut served => return,
                        _ = tokio::time::sleep(auth_timeout) => {}
                    }
                    // Not logged in by then: dropping the connection closes its socket.
                    if logged_in.load(Ordering::Acquire) {
                        let _ = served.await;
                    }
                });
            }
            _ = &mut shutdown => return Ok(()),
        }
    }
}

fn io_error(e: std::io::Error) -> IcePieError {
    IcePieError::Server(format!("the PostgreSQL listener: {e}"))
}

/// What every connection of a PostgreSQL server shares.
struct Handlers {
    backend: Arc<Backend>,
    password: Option<Arc<Secret>>,
    /// Every connection, for cancel requests to find theirs.
    connections: Arc<ConnectionManager>,
    require_tls: bool,
}

/// One connection's handlers: the shared ones, and whether it has logged in.
struct Connection {
    shared: Arc<Handlers>,
    logged_in: Arc<AtomicBool>,
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.shared.backend.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.shared.backend.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::new(DefaultCancelHandler::new(self.shared.connections.clone()))
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        // Called once per connection: each has its own authentication state.
        let shared = &self.shared;
        let how = match &shared.password {
            None => How::Trust(Trust(shared.connections.clone())),
            Some(password) => {
                let mut scram = ScramAuth::new(password.clone());
                scram.set_iterations(SCRAM_ITERATIONS);
                How::Scram(Box::new(
                    SASLAuthStartupHandler::new(Arc::new(server_parameters()))
                        .with_scram(scram)
                        .with_connection_manager(shared.connections.clone()),
                ))
            }
        };
        Arc::new(Startup {
            how,
            require_tls: shared.require_tls,
            logged_in: self.logged_in.clone(),
        })
    }
}

/// Answers a connection beyond `max_connections`: refused at startup, cancel requests served.
struct Refuse {
    max: usize,
    connections: Arc<ConnectionManager>,
}

impl PgWireServerHandlers for Refuse {
    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::new(DefaultCancelHandler::new(self.connections.clone()))
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(TooMany(self.max))
    }
}

struct TooMany(usize);

#[async_trait]
impl StartupHandler for TooMany {
    async fn on_startup<C>(
        &self,
        _client: &mut C,
        _message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        Err(PgWireError::UserError(Box::new(
            pgwire::error::ErrorInfo::new(
                "FATAL".into(),
                "53300".into(),
                format!(
                    "sorry, too many clients already: this server takes {} at once \
                 (--max-connections)",
                    self.0
                ),
            ),
        )))
    }
}

fn server_parameters() -> DefaultServerParameterProvider {
    let mut parameters = DefaultServerParameterProvider::default();
    parameters.server_version = format!("16.0 (icepie {})", env!("CARGO_PKG_VERSION"));
    // Unqualified names are slices of the default domain.
    parameters.search_path = crate::storage::names::DEFAULT_DOMAIN.to_string();
    parameters
}

/// The column and value PostgreSQL's `SHOW name` gives, for the settings that drivers and BI
/// tools ask for: those the server reported at startup, and the fixed facts of every session
/// (each statement commits on its own, so the isolation is `read committed`). `None` for any
/// other name, which DataFusion's `SHOW` answers.
pub(super) fn postgres_setting(name: &str) -> Option<(&'static str, String)> {
    let p = server_parameters();
    let on = |b: bool| if b { "on" } else { "off" }.to_string();
    Some(match name {
        "server_version" => ("server_version", p.server_version),
        "server_encoding" => ("server_encoding", p.server_encoding),
        "client_encoding" => ("client_encoding", "UTF8".into()),
        "search_path" => ("search_path", p.search_path),
        "timezone" | "time zone" => ("TimeZone", p.time_zone),
        "datestyle" => ("DateStyle", p.date_style),
        "intervalstyle" => ("IntervalStyle", p.interval_style),
        "standard_conforming_strings" => (
            "standard_conforming_strings",
            on(p.standard_conforming_strings),
        ),
        "integer_datetimes" => ("integer_datetimes", on(p.integer_datetimes)),
        "transaction isolation level" | "transaction_isolation" => {
            ("transaction_isolation", "read committed".into())
        }
        "max_identifier_length" => ("max_identifier_length", "63".into()),
        _ => return None,
    })
}

/// What a client's password is checked against: the SCRAM-SHA-256 verifier of the
/// configured password (the password itself is not kept).
struct Secret {
    salt: Vec<u8>,
    iterations: usize,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl Secret {
    /// `password` is a password, or PostgreSQL's stored form of one
    /// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64).
    fn new(password: &str) -> Result<Self> {
        if let Some(stored) = password.strip_prefix("SCRAM-SHA-256$") {
            return parse_verifier(stored).ok_or_else(|| {
                IcePieError::Server(
                    "the password starts as a SCRAM-SHA-256 verifier does but is not one: \
                     give SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> (base64, \
                     as PostgreSQL stores it) or a plain password"
                        .into(),
                )
            });
        }
        let salt = uuid::Uuid::new_v4().as_bytes().to_vec();
        let salted = gen_salted_password(password, &salt, SCRAM_ITERATIONS);
        match ScramSecret::verifier_from_salted_password(salt, salted, SCRAM_ITERATIONS) {
            ScramSecret::Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            } => Ok(Self {
                salt,
                iterations,
                stored_key,
                server_key,
            }),
            ScramSecret::SaltedPassword { .. } => Err(IcePieError::Server(
                "pgwire made no SCRAM verifier of the password".into(),
            )),
        }
    }
}

impl Secret {
    /// True when `password` is the one this secret was made from (what Flight SQL's basic
    /// authentication sends).
    fn verify(&self, password: &str) -> bool {
        let salted = gen_salted_password(password, &self.salt, self.iterations);
        match ScramSecret::verifier_from_salted_password(self.salt.clone(), salted, self.iterations)
        {
            ScramSecret::Verifier { stored_key, .. } => {
                // Compared in constant time: no early exit at the first differing byte.
                stored_key.len() == self.stored_key.len()
                    && stored_key
                        .iter()
                        .zip(&self.stored_key)
                        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                        == 0
            }
            ScramSecret::SaltedPassword { .. } => false,
        }
    }
}

/// The verifier after `SCRAM-SHA-256$`.
fn parse_verifier(stored: &str) -> Option<Secret> {
    use base64::Engine;
    let decode = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).ok();
    let (iterations_salt, keys) = stored.split_once('$')?;
    let (iterations, salt) = iterations_salt.split_once(':')?;
    let (stored_key, server_key) = keys.split_once(':')?;
    let iterations: usize = iterations.parse().ok().filter(|n| *n > 0)?;
    Some(Secret {
        salt: decode(salt)?,
        iterations,
        stored_key: decode(stored_key).filter(|k| k.len() == 32)?,
        server_key: decode(server_key).filter(|k| k.len() == 32)?,
    })
}

impl Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[async_trait]
impl AuthSource for Secret {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        // Only SCRAM is offered, which asks `get_scram_secret`.
        Err(PgWireError::InvalidPassword(
            login.user().unwrap_or_default().to_string(),
        ))
    }

    async fn get_scram_secret(
        &self,
        _login: &LoginInfo,
    ) -> PgWireResult<(ScramSecret, Option<()>)> {
        let secret = ScramSecret::Verifier {
            salt: self.salt.clone(),
            iterations: self.iterations,
            stored_key: self.stored_key.clone(),
            server_key: self.server_key.clone(),
        };
        Ok((secret, None))
    }
}

/// Admits every client (a loopback listener without a password).
struct Trust(Arc<ConnectionManager>);

impl pgwire::api::auth::noop::NoopStartupHandler for Trust {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.0.clone())
    }
}

/// How a connection logs in.
enum How {
    Trust(Trust),
    Scram(Box<SASLAuthStartupHandler<DefaultServerParameterProvider>>),
}

/// A connection's startup: TLS when required, then its login, which it records.
struct Startup {
    how: How,
    require_tls: bool,
    logged_in: Arc<AtomicBool>,
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
        if self.require_tls && !client.is_secure() {
            return Err(PgWireError::UserError(Box::new(
                pgwire::error::ErrorInfo::new(
                    "FATAL".into(),
                    "28000".into(),
                    "this server requires TLS (--require-tls): connect with sslmode=require".into(),
                ),
            )));
        }
        match &self.how {
            How::Trust(t) => t.on_startup(client, message).await?,
            How::Scram(s) => s.on_startup(client, message).await?,
        }
        if matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            self.logged_in.store(true, Ordering::Release);
        }
        Ok(())
    }
}
