//! Arrow Flight SQL (`icepie::server::serve_flight`), through arrow-flight's own Flight SQL
//! client: statements, prepared statements with parameters, catalog metadata, errors,
//! authentication, the server's file policy and TLS (for both servers).

use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::CommandGetTables;
use arrow_flight::FlightInfo;
use datafusion::arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::util::pretty::pretty_format_batches;
use futures::TryStreamExt;
use icepie::server::{ServerOptions, TlsFiles};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::support::{serve, Protocol, Served};

type Server = Served;

/// A Flight SQL server on a fresh warehouse.
async fn start(options: ServerOptions) -> Server {
    let (dir, warehouse) = crate::support::open_with(&[]).await;
    serve(Protocol::Flight, warehouse, options)
        .await
        .keeping(dir)
}

/// Runs `sql` as an update (DoPut): the rows it wrote, or -1.
async fn update(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> i64 {
    client
        .execute_update(sql.to_string(), None)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn client(server: &Server) -> FlightSqlServiceClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    FlightSqlServiceClient::new(channel)
}

/// The batches of every endpoint of `info`.
async fn fetch(
    client: &mut FlightSqlServiceClient<Channel>,
    info: FlightInfo,
) -> Result<Vec<RecordBatch>, FlightError> {
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.expect("a ticket");
        let stream = client.do_get(ticket).await?;
        batches.extend(stream.try_collect::<Vec<_>>().await?);
    }
    Ok(batches)
}

/// Runs `sql` as a query (GetFlightInfo, then DoGet) and renders its rows as text.
async fn query(
    client: &mut FlightSqlServiceClient<Channel>,
    sql: &str,
) -> Result<String, FlightError> {
    let info = client.execute(sql.to_string(), None).await?;
    let batches = fetch(client, info).await?;
    Ok(pretty_format_batches(&batches).unwrap().to_string())
}

/// The gRPC code of a failed call, the SQLSTATE the server gave and the message.
fn failure(e: FlightError) -> (tonic::Code, String, String) {
    match e {
        FlightError::Tonic(status) => {
            let state = status
                .metadata()
                .get("x-sqlstate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            (status.code(), state, status.message().to_string())
        }
        other => (tonic::Code::Unknown, String::new(), other.to_string()),
    }
}

#[tokio::test]
async fn a_flight_sql_client_runs_icepie_statements_and_streams_results() {
    let server = start(ServerOptions::default()).await;
    let mut client = client(&server).await;
    // Statements that write run at GetFlightInfo; DoPut's update answers them too.
    query(
        &mut client,
        "CREATE CORE TABLE orders (id BIGINT, amount DOUBLE, status TEXT)",
    )
    .await
    .unwrap();
    let loaded = query(
        &mut client,
        "INGEST INTO orders VALUES (1, 10.5, 'paid'), (2, 3.0, 'open'), (3, 7.25, 'paid')",
    )
    .await
    .unwrap();
    assert!(loaded.contains("| 3 "), "{loaded}");
    let created = update(
        &mut client,
        "CREATE SLICE ops.paid AS SELECT id, amount FROM core.orders WHERE status = 'paid'",
    )
    .await;
    assert_eq!(created, -1, "DDL counts no rows");
    let rows = query(&mut client, "SELECT id, amount FROM ops.paid ORDER BY id")
        .await
        .unwrap();
    assert_eq!(
        rows.lines().filter(|l| l.starts_with("| ")).count(),
        3,
        "{rows}"
    );
    assert!(rows.contains("| 3  | 7.25   |"), "{rows}");
    // The slice's state, as the REPL shows it.
    let state = query(&mut client, "SELECT domain, name, state FROM system.slices")
        .await
        .unwrap();
    assert!(
        state
            .lines()
            .any(|l| l.contains("| ops ") && l.contains("| paid ")),
        "{state}"
    );
    // A result of many batches arrives as many batches: streamed, not gathered.
    let info = client
        .execute(
            "SELECT value FROM generate_series(1, 1000000) ORDER BY value".into(),
            None,
        )
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let mut stream = client.do_get(ticket.clone()).await.unwrap();
    let (mut batches, mut rows, mut last) = (0, 0, 0i64);
    while let Some(batch) = stream.try_next().await.unwrap() {
        batches += 1;
        rows += batch.num_rows();
        let values = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        last = values.value(values.len() - 1);
    }
    assert_eq!((rows, last), (1_000_000, 1_000_000));
    assert!(batches > 10, "{batches} batches");
    // A ticket is read once.
    let again = client.do_get(ticket).await;
    let e = match again {
        Ok(s) => s.try_collect::<Vec<_>>().await.unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("read once"), "{e}");
}

#[tokio::test]
async fn prepared_statements_bind_parameters() {
    let server = start(ServerOptions::default()).await;
    let mut client = client(&server).await;
    update(&mut client, "CREATE CORE TABLE t (id BIGINT, name TEXT)").await;
    update(
        &mut client,
        "INGEST INTO t VALUES (1, 'one'), (2, 'two'), (3, 'three')",
    )
    .await;
    let mut prepared = client
        .prepare(
            "SELECT name FROM core.t WHERE id > $1 ORDER BY id".into(),
            None,
        )
        .await
        .unwrap();
    let params = prepared.parameter_schema().unwrap().clone();
    assert_eq!(params.fields().len(), 1);
    assert_eq!(
        prepared.dataset_schema().unwrap().field(0).name(),
        "name",
        "the result's schema is known before it runs"
    );
    // An Int32 where the query wants Int64: cast, as a driver expects.
    let bound = RecordBatch::try_from_iter([(
        "$1",
        std::sync::Arc::new(datafusion::arrow::array::Int32Array::from(vec![1])) as _,
    )])
    .unwrap();
    prepared.set_parameters(bound).unwrap();
    let info = prepared.execute().await.unwrap();
    let batches = fetch(&mut client, info).await.unwrap();
    let names: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            // Text may come as Utf8View, as DataFusion reads it.
            let a = datafusion::arrow::compute::cast(
                b.column(0),
                &datafusion::arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            let a = a.as_any().downcast_ref::<StringArray>().unwrap();
            (0..a.len())
                .map(|i| a.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(names, vec!["two", "three"]);
    prepared.close().await.unwrap();
    // An INSERT into a scratch table counts its rows.
    update(&mut client, "CREATE SCHEMA scratch").await;
    update(&mut client, "CREATE TABLE scratch.m (x BIGINT)").await;
    let inserted = update(&mut client, "INSERT INTO scratch.m VALUES (1), (2)").await;
    assert_eq!(inserted, 2);
}

#[tokio::test]
async fn catalog_metadata_lists_core_tables_slices_and_system_tables() {
    let server = start(ServerOptions::default()).await;
    let mut client = client(&server).await;
    update(&mut client, "CREATE CORE TABLE orders (id BIGINT)").await;
    update(
        &mut client,
        "CREATE SLICE sales.recent AS SELECT id FROM core.orders",
    )
    .await;
    let info = client.get_catalogs().await.unwrap();
    let catalogs = pretty_format_batches(&fetch(&mut client, info).await.unwrap())
        .unwrap()
        .to_string();
    assert!(catalogs.contains("icepie"), "{catalogs}");
    let info = client
        .get_tables(CommandGetTables {
            catalog: Some("icepie".into()),
            db_schema_filter_pattern: None,
            table_name_filter_pattern: Some("%r%".into()),
            table_types: vec![],
            include_schema: true,
        })
        .await
        .unwrap();
    let batches = fetch(&mut client, info).await.unwrap();
    let listed = pretty_format_batches(&batches).unwrap().to_string();
    for (schema, table) in [
        ("core", "orders"),
        ("sales", "recent"),
        ("system", "refreshes"),
    ] {
        assert!(
            listed
                .lines()
                .any(|l| l.contains(&format!("| {schema} ")) && l.contains(&format!("| {table} "))),
            "{schema}.{table} in\n{listed}"
        );
    }
    // With each table's Arrow schema.
    let batch = &batches[0];
    let names = batch
        .column_by_name("table_name")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    let schemas = batch
        .column_by_name("table_schema")
        .unwrap()
        .as_any()
        .downcast_ref::<datafusion::arrow::array::BinaryArray>()
        .unwrap();
    let recent = (0..names.len())
        .find(|i| names.value(*i) == "recent")
        .unwrap();
    let schema = datafusion::arrow::datatypes::Schema::try_from(arrow_flight::IpcMessage(
        schemas.value(recent).to_vec().into(),
    ))
    .unwrap();
    assert_eq!(schema.field(0).name(), "id");
    let info = client.get_table_types().await.unwrap();
    let types = pretty_format_batches(&fetch(&mut client, info).await.unwrap())
        .unwrap()
        .to_string();
    assert!(types.contains("TABLE"), "{types}");
}

#[tokio::test]
async fn errors_carry_a_grpc_code_and_their_sqlstate() {
    let server = start(ServerOptions::default()).await;
    let mut client = client(&server).await;
    update(&mut client, "CREATE CORE TABLE t (x BIGINT)").await;
    update(&mut client, "CREATE SLICE s AS SELECT x FROM core.t").await;
    update(&mut client, "FREEZE SLICE s").await;
    for (sql, code, state) in [
        ("SELECT * FROM nowhere", tonic::Code::NotFound, "42P01"),
        ("SELEC 1", tonic::Code::InvalidArgument, "42601"),
        ("REFRESH SLICE s", tonic::Code::FailedPrecondition, "55000"),
        (
            "CREATE CORE TABLE t (y INT)",
            tonic::Code::AlreadyExists,
            "42P07",
        ),
        (
            "SET icepie.retain_versions = 3",
            tonic::Code::PermissionDenied,
            "42501",
        ),
    ] {
        let e = client.execute(sql.into(), None).await.unwrap_err();
        let (got_code, got_state, message) = failure(e);
        assert_eq!(
            (got_code, got_state.as_str()),
            (code, state),
            "{sql}: {message}"
        );
    }
}

#[tokio::test]
async fn a_password_is_checked_at_the_handshake_and_on_every_call() {
    let server = start(ServerOptions {
        password: Some("s3cret".into()),
        ..ServerOptions::default()
    })
    .await;
    let mut anonymous = client(&server).await;
    let e = anonymous
        .execute("SELECT 1".into(), None)
        .await
        .unwrap_err();
    assert_eq!(failure(e).0, tonic::Code::Unauthenticated);
    let mut wrong = client(&server).await;
    let e = wrong.handshake("analyst", "guess").await.unwrap_err();
    assert!(
        e.to_string().contains("password authentication failed"),
        "{e}"
    );
    let mut right = client(&server).await;
    right.handshake("analyst", "s3cret").await.unwrap();
    assert!(right.token().is_some(), "a bearer token for the next calls");
    assert!(query(&mut right, "SELECT 1 AS one")
        .await
        .unwrap()
        .contains("| 1 "));
    // A forged token is refused.
    let mut forged = client(&server).await;
    forged.set_token("0123456789abcdef".into());
    let e = forged.execute("SELECT 1".into(), None).await.unwrap_err();
    assert_eq!(failure(e).0, tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn flight_clients_reach_only_allowed_files_and_a_read_only_server_refuses_writes() {
    let landing = tempfile::tempdir().unwrap();
    std::fs::write(landing.path().join("day1.csv"), "x\n1\n2\n").unwrap();
    let l = landing.path().display();
    let server = start(ServerOptions {
        allow_paths: vec![l.to_string()],
        ..ServerOptions::default()
    })
    .await;
    let mut client = client(&server).await;
    update(&mut client, "CREATE CORE TABLE t (x BIGINT)").await;
    update(&mut client, &format!("INGEST INTO t FROM '{l}/day1.csv'")).await;
    for refused in [
        "INGEST INTO t FROM '/etc/passwd' FORMAT csv".to_string(),
        format!("INGEST INTO t FROM '{l}/../../etc/passwd' FORMAT csv"),
        "COPY (SELECT 1) TO '/tmp/icepie-flight-not-allowed.csv'".to_string(),
        "CREATE EXTERNAL TABLE e STORED AS CSV LOCATION '/etc/passwd'".to_string(),
    ] {
        let e = client.execute(refused.clone(), None).await.unwrap_err();
        let (code, state, message) = failure(e);
        assert_eq!(
            (code, state.as_str()),
            (tonic::Code::PermissionDenied, "42501"),
            "{refused}: {message}"
        );
    }
    assert!(!std::path::Path::new("/tmp/icepie-flight-not-allowed.csv").exists());

    let read_only = start(ServerOptions {
        read_only: true,
        ..ServerOptions::default()
    })
    .await;
    let mut reader = self::client(&read_only).await;
    assert!(query(&mut reader, "SELECT 1 AS one").await.is_ok());
    let e = reader
        .execute_update("CREATE CORE TABLE u (x BIGINT)".into(), None)
        .await
        .unwrap_err();
    assert_eq!(failure(e).0, tonic::Code::PermissionDenied);
}

/// The corpus of hostile locations, sent over Flight SQL: each refused with
/// PERMISSION_DENIED (42501), nothing outside the allowed directory touched.
#[tokio::test]
async fn flight_percent_encoded_dot_segments_cannot_leave_allow_path() {
    let hostile = crate::support::Hostile::new();
    let before = hostile.snapshot();
    let server = start(ServerOptions {
        allow_paths: hostile.allow_paths(),
        ..ServerOptions::default()
    })
    .await;
    let mut client = client(&server).await;
    update(&mut client, "CREATE CORE TABLE t (x BIGINT)").await;
    for sql in hostile.statements() {
        let expected = match icepie::IcePie::parse(&sql) {
            Ok(_) => (tonic::Code::PermissionDenied, "42501"),
            Err(_) => (tonic::Code::InvalidArgument, "42601"),
        };
        let e = client.execute(sql.clone(), None).await.unwrap_err();
        let (code, state, message) = failure(e);
        assert_eq!((code, state.as_str()), expected, "{sql:?}: {message}");
    }
    hostile.assert_untouched(&before);
    let e = client
        .execute("RESET datafusion.runtime.memory_limit".into(), None)
        .await
        .unwrap_err();
    assert_eq!(failure(e).0, tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn a_statement_beyond_its_memory_fails_with_resource_exhausted() {
    let server = start(ServerOptions {
        statement_memory: Some(4 << 20),
        ..ServerOptions::default()
    })
    .await;
    let mut client = client(&server).await;
    let e = query(
        &mut client,
        "SELECT count(*) FROM generate_series(1, 2000000) a \
         JOIN generate_series(1, 2000000) b ON a.value = b.value",
    )
    .await
    .unwrap_err();
    let (code, state, message) = failure(e);
    assert_eq!(
        (code, state.as_str()),
        (tonic::Code::ResourceExhausted, "53200"),
        "{message}"
    );
    assert!(query(&mut client, "SELECT 1 AS one").await.is_ok());
}

#[tokio::test]
async fn the_statement_timeout_stops_a_long_query() {
    let server = start(ServerOptions {
        statement_timeout: Some(std::time::Duration::from_millis(500)),
        ..ServerOptions::default()
    })
    .await;
    let mut client = client(&server).await;
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        let info = client
            .execute(
                "SELECT count(*) FROM generate_series(1, 100000000000)".into(),
                None,
            )
            .await?;
        fetch(&mut client, info).await
    })
    .await
    .expect("stopped well within a minute");
    let e = stopped.unwrap_err();
    assert!(e.to_string().contains("statement timeout"), "{e}");
    // The server goes on.
    assert!(query(&mut client, "SELECT 1 AS one").await.is_ok());
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused_until_one_closes() {
    let server = start(ServerOptions {
        max_connections: Some(1),
        ..ServerOptions::default()
    })
    .await;
    let mut first = client(&server).await;
    assert!(query(&mut first, "SELECT 1 AS one").await.is_ok());
    let mut second = client(&server).await;
    let (code, _, message) = failure(query(&mut second, "SELECT 2 AS two").await.unwrap_err());
    assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
    assert!(message.contains("--max-connections"), "{message}");
    // The first goes on; once it closes, a new connection takes its place.
    assert!(query(&mut first, "SELECT 3 AS three").await.is_ok());
    drop((first, second));
    let mut third = crate::support::eventually(10, "a free connection", || async {
        let mut c = client(&server).await;
        query(&mut c, "SELECT 4 AS four").await.ok().map(|_| c)
    })
    .await;
    assert!(query(&mut third, "SELECT 5 AS five").await.is_ok());
}

#[tokio::test]
async fn garbage_and_malformed_calls_fail_alone() {
    use arrow_flight::flight_service_client::FlightServiceClient;
    use arrow_flight::{Action, FlightDescriptor, Ticket};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = start(ServerOptions::default()).await;
    // Bytes that are not HTTP/2, or HTTP/2 cut short.
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00"[..], // a SETTINGS frame cut short
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x00\x00\x00\x00\x00\x01"[..],
        &[0u8; 3][..],
    ] {
        let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let _ = socket.write_all(garbage).await;
        let _ = socket.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            socket.read_to_end(&mut sink),
        )
        .await;
    }
    // Well-formed gRPC carrying what is not a Flight SQL command.
    let channel = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = FlightServiceClient::new(channel);
    let bad_command = raw
        .get_flight_info(FlightDescriptor::new_cmd(vec![0xff, 0x01, 0x02, 0x03]))
        .await
        .unwrap_err();
    assert_ne!(bad_command.code(), tonic::Code::Ok);
    let bad_ticket = raw.do_get(Ticket::new(vec![0x0a, 0xff, 0xff])).await;
    assert!(
        bad_ticket.is_err() || {
            let mut stream = bad_ticket.unwrap().into_inner();
            futures::StreamExt::next(&mut stream)
                .await
                .is_some_and(|m| m.is_err())
        }
    );
    let bad_action = raw
        .do_action(Action::new("CreatePreparedStatement", vec![0x12, 0x80]))
        .await;
    assert!(bad_action.is_err(), "a truncated action body is refused");
    // The server goes on.
    let mut client = client(&server).await;
    assert!(query(&mut client, "SELECT 1 AS one").await.is_ok());
}

/// The test certificate authority and the server's certificate (for localhost and 127.0.0.1,
/// valid until 2126) in `tests/integration/tls`.
fn tls_files() -> TlsFiles {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/tls");
    TlsFiles::read(dir.join("server.pem"), dir.join("server.key")).unwrap()
}

fn test_ca() -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/tls/ca.pem"),
    )
    .unwrap()
}

#[tokio::test]
async fn both_servers_speak_tls_with_the_given_certificate() {
    // Flight SQL over TLS.
    let server = start(ServerOptions {
        tls: Some(tls_files()),
        ..ServerOptions::default()
    })
    .await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(test_ca()))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FlightSqlServiceClient::new(channel);
    assert!(query(&mut client, "SELECT 1 AS one")
        .await
        .unwrap()
        .contains("| 1 "));
    // A plain client gets nothing from it.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut plain = FlightSqlServiceClient::new(channel);
        assert!(plain.execute("SELECT 1".into(), None).await.is_err());
    }

    // PostgreSQL over TLS (sslmode=require).
    let (dir, warehouse) = crate::support::open_with(&[]).await;
    let pg_server = serve(
        Protocol::Pg,
        warehouse,
        ServerOptions {
            tls: Some(tls_files()),
            ..ServerOptions::default()
        },
    )
    .await
    .keeping(dir);
    let addr = pg_server.addr;
    let (client, connection) = pg_config(addr, tokio_postgres::config::SslMode::Require)
        .connect(pg_tls())
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client.query_one("SELECT 41 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
}

/// A PostgreSQL client of the server on `addr` (whose certificate names `localhost`).
fn pg_config(
    addr: std::net::SocketAddr,
    ssl: tokio_postgres::config::SslMode,
) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host("localhost")
        .port(addr.port())
        .user("analyst")
        .dbname("icepie")
        .ssl_mode(ssl);
    pg
}

/// A PostgreSQL client that negotiates TLS with the test certificate authority.
fn pg_tls() -> tokio_postgres_rustls::MakeRustlsConnect {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    for cert in tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(&test_ca()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

/// `--require-tls`: SCRAM never sends the password, but rows would travel in clear.
#[tokio::test]
async fn require_tls_refuses_postgres_clients_that_do_not_negotiate_it() {
    use tokio_postgres::config::SslMode;
    let (dir, warehouse) = crate::support::open_with(&[]).await;
    // Refused at start without a certificate.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = ServerOptions {
        require_tls: true,
        ..ServerOptions::default()
    };
    let err = icepie::server::serve_pg(warehouse.clone(), listener, options, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("--tls-cert"), "{err}");
    let server = serve(
        Protocol::Pg,
        warehouse,
        ServerOptions {
            tls: Some(tls_files()),
            require_tls: true,
            ..ServerOptions::default()
        },
    )
    .await
    .keeping(dir);
    let plain = pg_config(server.addr, SslMode::Disable)
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("a plain client is refused");
    assert_eq!(plain.code().map(|c| c.code()), Some("28000"), "{plain:?}");
    let message = plain.as_db_error().map(|e| e.message().to_string());
    assert!(
        message.unwrap_or_default().contains("requires TLS"),
        "{plain:?}"
    );
    // A client that prefers TLS gets it; one that requires it too.
    for ssl in [SslMode::Prefer, SslMode::Require] {
        let (client, connection) = pg_config(server.addr, ssl).connect(pg_tls()).await.unwrap();
        tokio::spawn(connection);
        let row = client.query_one("SELECT 6 * 7", &[]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), 42);
    }
}

/// True once the server has closed `socket` (which never sent a byte).
async fn closed_by_the_server(socket: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(60), socket.read(&mut buf)).await
        {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // Whatever the server says first (an HTTP/2 preface): read on.
            Ok(Ok(_)) => continue,
        }
    }
}

/// `--auth-timeout`: a socket that never logs in is closed and gives its place back, on both
/// servers, while a client that logged in stays connected past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_do_not_log_in_in_time_are_closed() {
    let options = ServerOptions {
        password: Some("s3cret".into()),
        max_connections: Some(1),
        auth_timeout: Some(std::time::Duration::from_secs(1)),
        ..ServerOptions::default()
    };
    for protocol in [Protocol::Pg, Protocol::Flight] {
        let (dir, warehouse) = crate::support::open_with(&[]).await;
        let server = serve(protocol, warehouse, options.clone())
            .await
            .keeping(dir);
        let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        assert!(closed_by_the_server(&mut idle).await, "{protocol:?}");
        match protocol {
            Protocol::Pg => {
                // The idle socket's place is free again.
                let mut config = pg_config(server.addr, tokio_postgres::config::SslMode::Disable);
                config.host("127.0.0.1").password("s3cret");
                let client = crate::support::eventually(30, "a free place", || async {
                    let (client, connection) = config.connect(tokio_postgres::NoTls).await.ok()?;
                    tokio::spawn(connection);
                    Some(client)
                })
                .await;
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                let row = client.query_one("SELECT 1 + 1", &[]).await.unwrap();
                assert_eq!(row.get::<_, i64>(0), 2);
            }
            Protocol::Flight => {
                let mut client = client(&server).await;
                client.handshake("analyst", "s3cret").await.unwrap();
                assert!(query(&mut client, "SELECT 1 AS one")
                    .await
                    .unwrap()
                    .contains("| 1 "));
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                assert!(query(&mut client, "SELECT 2 AS two")
                    .await
                    .unwrap()
                    .contains("| 2 "));
            }
        }
    }
}
