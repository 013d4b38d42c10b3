//! The PostgreSQL wire protocol (`icepie::server::serve_pg`), through a real client:
//! tokio-postgres, which speaks the simple protocol (`simple_query`, `batch_execute`) and the
//! extended one (`query` with parameters, binary results).

use icepie::server::{serve_pg, ServerOptions};

use crate::support::{serve, Protocol, Served};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// A server on a fresh warehouse, on a free loopback port; it stops when dropped.
type Server = Served;

async fn start(password: Option<&str>) -> Server {
    start_with(ServerOptions {
        password: password.map(str::to_string),
        ..ServerOptions::default()
    })
    .await
}

async fn start_with(options: ServerOptions) -> Server {
    let (dir, warehouse) = crate::support::open_with(&[]).await;
    serve(Protocol::Pg, warehouse, options).await.keeping(dir)
}

fn config(server: &Server, password: Option<&str>) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(server.addr.ip().to_string())
        .port(server.addr.port())
        .user("analyst")
        .dbname("icepie");
    if let Some(p) = password {
        config.password(p);
    }
    config
}

async fn connect(server: &Server, password: Option<&str>) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config(server, password).connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A client whose server notices arrive on the receiver.
async fn connect_with_notices(
    server: &Server,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = config(server, None).connect(NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notice(n) = message {
                let _ = tx.send(n.message().to_string());
            }
        }
    });
    (client, rx)
}

/// The text rows of a simple query's last result, cells joined by `|`.
async fn simple_rows(client: &Client, sql: &str) -> Vec<String> {
    let mut rows = Vec::new();
    for message in client.simple_query(sql).await.unwrap() {
        match message {
            SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL").to_string())
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            SimpleQueryMessage::CommandComplete(_) => {}
            _ => {}
        }
    }
    rows
}

/// The SQLSTATE a statement fails with.
async fn sqlstate(client: &Client, sql: &str) -> String {
    let e = client
        .simple_query(sql)
        .await
        .expect_err("the statement should fail");
    e.code()
        .unwrap_or_else(|| panic!("no SQLSTATE in {e:?}"))
        .code()
        .to_string()
}

#[tokio::test]
async fn a_postgres_client_creates_ingests_slices_and_queries() {
    let server = start(None).await;
    let client = connect(&server, None).await.unwrap();
    client
        .batch_execute(
            "CREATE CORE TABLE orders (id BIGINT, amount DOUBLE, status TEXT, day DATE);
             INGEST INTO orders VALUES (1, 10.5, 'paid', DATE '2026-01-02'),
                 (2, 99.0, 'open', DATE '2026-01-03'), (3, 250.25, 'paid', NULL);
             CREATE SLICE ops.paid AS SELECT id, amount, day FROM core.orders WHERE status = 'paid';",
        )
        .await
        .unwrap();

    // Simple protocol: text rows, icepie statements' own results included.
    assert_eq!(
        simple_rows(&client, "SELECT id, amount, day FROM ops.paid ORDER BY id").await,
        vec!["1|10.5|2026-01-02", "3|250.25|NULL"]
    );
    let slices = simple_rows(&client, "SHOW SLICES").await;
    assert!(
        slices.len() == 1 && slices[0].starts_with("ops|paid|"),
        "{slices:?}"
    );

    // Extended protocol: a parameter, binary results decoded as Rust types.
    let rows = client
        .query(
            "SELECT id, amount, day FROM ops.paid WHERE amount > $1 ORDER BY id",
            &[&100.0f64],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i64>(0), 3);
    assert_eq!(rows[0].get::<_, f64>(1), 250.25);
    assert_eq!(rows[0].get::<_, Option<chrono::NaiveDate>>(2), None);

    // A prepared statement runs again with other parameters; a text parameter too.
    let by_status = client
        .prepare("SELECT count(*) AS n FROM core.orders WHERE status = $1")
        .await
        .unwrap();
    assert_eq!(by_status.params(), &[tokio_postgres::types::Type::TEXT]);
    for (status, n) in [("paid", 2i64), ("open", 1), ("lost", 0)] {
        let row = client.query_one(&by_status, &[&status]).await.unwrap();
        assert_eq!(row.get::<_, i64>("n"), n, "status {status}");
    }

    // A refresh through the server sees new core data; its output is rows, as in the REPL.
    client
        .batch_execute("INGEST INTO orders VALUES (4, 5.0, 'paid', DATE '2026-01-05')")
        .await
        .unwrap();
    // Through the extended protocol (as psycopg and JDBC send everything) too.
    let refreshed = client.query("REFRESH SLICE ops.paid", &[]).await.unwrap();
    assert_eq!(refreshed.len(), 1);
    assert_eq!(refreshed[0].get::<_, String>("slice"), "ops.paid");
    assert_eq!(refreshed[0].get::<_, i64>("rows"), 3);
    let slices = client.query("SHOW SLICES", &[]).await.unwrap();
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].get::<_, String>("name"), "paid");
    let n: i64 = client
        .query_one("SELECT count(*) FROM ops.paid", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);

    // Statements that return no rows answer with their command; BEGIN/COMMIT are accepted.
    client
        .batch_execute("BEGIN; SELECT 1; COMMIT")
        .await
        .unwrap();
    // Through the extended protocol, an icepie statement runs and reports its command with
    // the count of the rows it would have shown.
    let changed = client
        .execute("FREEZE SLICE ops.paid 'audit'", &[])
        .await
        .unwrap();
    assert_eq!(changed, 1);
    assert_eq!(
        simple_rows(&client, "SELECT state FROM system.slices").await,
        vec!["frozen"]
    );
    // Every icepie statement returns its rows through the extended protocol, as in the REPL:
    // their columns are known before they run.
    let thawed = client.query("THAW SLICE ops.paid", &[]).await.unwrap();
    assert_eq!(thawed[0].get::<_, String>("slice"), "ops.paid");
    assert!(thawed[0].get::<_, bool>("committed"));
    let described = client.query("DESCRIBE SLICE ops.paid", &[]).await.unwrap();
    let property = |name: &str| -> String {
        described
            .iter()
            .find(|r| r.get::<_, String>("property") == name)
            .map(|r| r.get("value"))
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert_eq!(property("rows"), "3");
    let history = client
        .query("SHOW SLICE HISTORY ops.paid", &[])
        .await
        .unwrap();
    assert!(history.len() >= 4, "create, refresh, freeze, thaw");
    assert_eq!(
        history[0].get::<_, i64>("version"),
        history.len() as i64 - 1
    );
    let explained = client
        .query("EXPLAIN REFRESH SLICE ops.paid", &[])
        .await
        .unwrap();
    assert!(!explained.is_empty());
    assert!(!explained[0].get::<_, String>("mode").is_empty());
    let rolled = client
        .query("ROLLBACK SLICE ops.paid TO VERSION 0", &[])
        .await
        .unwrap();
    assert_eq!(rolled.len(), 1);
    let unknown = client.query("SHOW SLICE HISTORY ops.nowhere", &[]).await;
    assert_eq!(
        unknown.unwrap_err().code().map(|c| c.code().to_string()),
        Some("42P01".into())
    );
}

#[tokio::test]
async fn statements_run_one_after_the_other_and_stop_at_a_failure_in_their_rows() {
    let server = start(None).await;
    let client = connect(&server, None).await.unwrap();
    client
        .batch_execute(
            "CREATE SCHEMA scratch; CREATE TABLE scratch.m (x BIGINT);
             CREATE CORE TABLE t (s TEXT); INGEST INTO t VALUES ('1'), ('abc');
             CREATE SLICE s AS SELECT s FROM core.t;",
        )
        .await
        .unwrap();
    // A later statement sees what an earlier one of the same text wrote.
    assert_eq!(
        simple_rows(
            &client,
            "INSERT INTO scratch.m VALUES (1), (2); SELECT count(*) FROM scratch.m"
        )
        .await,
        vec!["2"]
    );
    // The cast fails on the second row, while the first statement's rows are sent: the DROP
    // after it never runs.
    assert_eq!(
        sqlstate(&client, "SELECT CAST(s AS INT) FROM core.t; DROP SLICE s").await,
        "22000"
    );
    assert_eq!(
        simple_rows(&client, "SELECT count(*) FROM system.slices").await,
        vec!["1"]
    );
    // Writes answer with the rows they wrote, through either protocol.
    let inserted = client
        .execute(
            "INSERT INTO scratch.m VALUES ($1), ($2), ($3)",
            &[&7i64, &8i64, &9i64],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 3);
    let tags: Vec<u64> = client
        .simple_query("INSERT INTO scratch.m VALUES (10)")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(n),
            _ => None,
        })
        .collect();
    assert_eq!(tags, vec![1]);
}

/// A value as its raw binary bytes, whatever its type.
struct Raw(Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

#[tokio::test]
async fn values_and_parameters_keep_their_types() {
    use tokio_postgres::types::Type;
    let server = start(None).await;
    let client = connect(&server, None).await.unwrap();
    // Decimals are numeric, text or binary (ndigits 2, weight 0, positive, dscale 2: 12.50).
    let row = client
        .query_one(
            "SELECT CAST(12.5 AS DECIMAL(10, 2)) AS d, TIME '10:30:00' AS t",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.columns()[0].type_(), &Type::NUMERIC);
    let Raw(bytes) = row.get(0);
    assert_eq!(bytes, vec![0, 2, 0, 0, 0, 0, 0, 2, 0, 12, 0x13, 0x88]);
    assert_eq!(
        row.get::<_, chrono::NaiveTime>(1),
        chrono::NaiveTime::from_hms_opt(10, 30, 0).unwrap()
    );
    assert_eq!(
        simple_rows(&client, "SELECT CAST(-12.5 AS DECIMAL(10, 2))").await,
        vec!["-12.50"]
    );
    // A parameter the query leaves open is text, as described, whatever type the client sent.
    let open = client
        .prepare_typed("SELECT $1 AS v", &[Type::INT4])
        .await
        .unwrap();
    assert_eq!(open.columns()[0].type_(), &Type::TEXT);
    let row = client.query_one(&open, &[&5i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "5");
    // Structs and lists of lists go as their text.
    assert_eq!(
        simple_rows(&client, "SELECT named_struct('a', 1, 'b', 'x')").await,
        vec!["{a: 1, b: x}"]
    );
    assert_eq!(
        simple_rows(&client, "SELECT [[1, 2], [3]]").await,
        vec!["[[1, 2], [3]]"]
    );
    // Lists are PostgreSQL arrays, text or binary, with their NULLs.
    let row = client
        .query_one(
            "SELECT [1, NULL, 3] AS i, ['a b', NULL, 'c'] AS t, \
             CAST(NULL AS BIGINT[]) AS n, [DATE '2024-02-29'] AS d",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.columns()[0].type_(), &Type::INT8_ARRAY);
    assert_eq!(
        row.get::<_, Vec<Option<i64>>>(0),
        vec![Some(1), None, Some(3)]
    );
    assert_eq!(
        row.get::<_, Vec<Option<String>>>(1),
        vec![Some("a b".to_string()), None, Some("c".to_string())]
    );
    assert_eq!(row.get::<_, Option<Vec<i64>>>(2), None);
    assert_eq!(
        row.get::<_, Vec<chrono::NaiveDate>>(3),
        vec![chrono::NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()]
    );
    assert_eq!(
        simple_rows(&client, "SELECT [1, NULL, 3], ['a b', NULL, 'c']").await,
        vec!["{1,NULL,3}|{\"a b\",NULL,c}"]
    );
    // Intervals and durations are PostgreSQL intervals; unsigned 64-bit integers numeric.
    let row = client
        .query_one(
            "SELECT INTERVAL '1 month 2 days 3 hours' AS i, \
             arrow_cast(90, 'Duration(Second)') AS s, \
             CAST(18446744073709551615 AS BIGINT UNSIGNED) AS u",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.columns()[0].type_(), &Type::INTERVAL);
    assert_eq!(
        row.get::<_, pg_interval::Interval>(0),
        pg_interval::Interval::new(1, 2, 3 * 3_600_000_000)
    );
    assert_eq!(
        row.get::<_, pg_interval::Interval>(1),
        pg_interval::Interval::new(0, 0, 90_000_000)
    );
    assert_eq!(row.columns()[2].type_(), &Type::NUMERIC);
    assert_eq!(
        simple_rows(
            &client,
            "SELECT INTERVAL '1 month 2 days 3 hours', arrow_cast(90, 'Duration(Second)'), \
             CAST(18446744073709551615 AS BIGINT UNSIGNED)"
        )
        .await,
        vec!["1 mon 2 days 03:00:00|00:01:30|18446744073709551615"]
    );
    // An absurd parameter number is refused, not allocated.
    let e = client.prepare("SELECT $1000000000").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42601"), "{e:?}");
    // Drivers' session settings are accepted; the server's are refused.
    client
        .batch_execute("SET application_name = 'dashboard'; SET extra_float_digits = 3")
        .await
        .unwrap();
    assert_eq!(
        sqlstate(&client, "SET datafusion.execution.batch_size = 10").await,
        "42501"
    );
    assert_eq!(
        sqlstate(&client, "SET icepie.retain_versions = 0").await,
        "42501"
    );
}

#[tokio::test]
async fn errors_carry_their_sqlstate() {
    let server = start(None).await;
    let client = connect(&server, None).await.unwrap();
    client
        .batch_execute(
            "CREATE CORE TABLE t (x BIGINT); INGEST INTO t VALUES (1);
             CREATE SLICE s AS SELECT x FROM core.t; FREEZE SLICE s;",
        )
        .await
        .unwrap();
    assert_eq!(sqlstate(&client, "SELEC 1").await, "42601");
    assert_eq!(
        sqlstate(&client, "SELECT * FROM core.missing").await,
        "42P01"
    );
    assert_eq!(sqlstate(&client, "SELECT * FROM nowhere").await, "42P01");
    assert_eq!(sqlstate(&client, "REFRESH SLICE s").await, "55000");
    assert_eq!(sqlstate(&client, "DELETE FROM core.t").await, "25006");
    assert_eq!(
        sqlstate(&client, "CREATE CORE TABLE t (y INT)").await,
        "42P07"
    );
    // The statements after a failed one do not run; the connection goes on.
    assert_eq!(
        sqlstate(
            &client,
            "SELECT * FROM nowhere; CREATE CORE TABLE u (x INT)"
        )
        .await,
        "42P01"
    );
    assert_eq!(
        simple_rows(&client, "SELECT count(*) FROM system.core_tables").await,
        vec!["1"]
    );
}

#[tokio::test]
async fn a_stale_read_sends_a_notice_or_fails_with_its_sqlstate() {
    let server = start(None).await;
    let (client, mut notices) = connect_with_notices(&server).await;
    client
        .batch_execute(
            "CREATE CORE TABLE t (x BIGINT); INGEST INTO t VALUES (1);
             CREATE SLICE s AS SELECT sum(x) AS total FROM core.t; INGEST INTO t VALUES (10);",
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(
        sqlstate(&client, "SELECT * FROM fresh('s', '0 seconds', 'fail')").await,
        "55000"
    );
    let serve = "SELECT total FROM fresh('s', '0 seconds', 'serve')";
    assert_eq!(simple_rows(&client, serve).await, vec!["1"]);
    let rows = client.query(serve, &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 1);
    for _ in 0..2 {
        let notice = tokio::time::timeout(std::time::Duration::from_secs(10), notices.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(notice.contains("slice slices.s is"), "{notice}");
    }
}

#[tokio::test]
async fn clients_reach_only_the_files_they_are_allowed() {
    let landing = tempfile::tempdir().unwrap();
    std::fs::write(landing.path().join("day1.csv"), "x\n1\n2\n").unwrap();
    let l = landing.path().display();
    let server = start_with(ServerOptions {
        allow_paths: vec![l.to_string()],
        ..ServerOptions::default()
    })
    .await;
    let client = connect(&server, None).await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE CORE TABLE t (x BIGINT); INGEST INTO t FROM '{l}/day1.csv'; \
             COPY (SELECT * FROM core.t) TO '{l}/out/t.csv'"
        ))
        .await
        .unwrap();
    assert!(landing.path().join("out/t.csv").exists());
    let copied = client
        .execute(
            &format!("COPY (SELECT * FROM core.t) TO '{l}/out/u.csv'"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(copied, 2);
    for refused in [
        "INGEST INTO t FROM '/etc/passwd' FORMAT csv".to_string(),
        format!("INGEST INTO t FROM '{l}/../../etc/passwd' FORMAT csv"),
        "CREATE CORE TABLE p FROM '/etc/passwd' FORMAT csv".to_string(),
        "COPY (SELECT 1) TO '/tmp/icepie-not-allowed.csv'".to_string(),
        "CREATE EXTERNAL TABLE e STORED AS CSV LOCATION '/etc/passwd'".to_string(),
    ] {
        assert_eq!(sqlstate(&client, &refused).await, "42501", "{refused}");
    }
    assert!(!std::path::Path::new("/tmp/icepie-not-allowed.csv").exists());
    assert_eq!(
        simple_rows(&client, "SELECT count(*) FROM core.t").await,
        vec!["2"]
    );
}

/// Every location of the corpus (percent-encoded and double-encoded dot segments, `file:`
/// spellings, links out, globs, other stores, Windows paths, ...), in every statement that
/// names one, is refused with 42501 and leaves the files outside the allowed directory as
/// they were. Regression: `file:///allowed/%2e%2e/secret/s.csv` was read, and `COPY` wrote
/// there, because the check judged the text rather than what DataFusion opens.
#[tokio::test]
async fn percent_encoded_dot_segments_cannot_leave_allow_path() {
    let hostile = crate::support::Hostile::new();
    let before = hostile.snapshot();
    let server = start_with(ServerOptions {
        allow_paths: hostile.allow_paths(),
        ..ServerOptions::default()
    })
    .await;
    let client = connect(&server, None).await.unwrap();
    client
        .batch_execute("CREATE CORE TABLE t (x BIGINT)")
        .await
        .unwrap();
    let statements = hostile.statements();
    assert!(statements.len() >= 60 * 4, "{}", statements.len());
    for sql in statements {
        // PostgreSQL's protocol carries no NUL in a query: the client does not send one.
        if sql.contains('\0') {
            continue;
        }
        // What does not even parse is refused before any location is looked at.
        let expected = match icepie::IcePie::parse(&sql) {
            Ok(_) => "42501",
            Err(_) => "42601",
        };
        assert_eq!(sqlstate(&client, &sql).await, expected, "{sql:?}");
    }
    hostile.assert_untouched(&before);
    assert_eq!(
        simple_rows(&client, "SELECT count(*) FROM core.t").await,
        vec!["0"]
    );
}

#[tokio::test]
async fn reset_of_runtime_settings_is_refused() {
    let server = start_with(ServerOptions::default()).await;
    let client = connect(&server, None).await.unwrap();
    for sql in [
        "RESET datafusion.runtime.memory_limit",
        "RESET \"datafusion.runtime.memory_limit\"",
        "RESET Datafusion.Runtime.Temp_Directory",
        "RESET ALL",
        "SET \"datafusion\".\"runtime\".\"memory_limit\" = '1G'",
        // Not a runtime setting, but the server's all the same.
        "RESET datafusion.execution.batch_size",
        "RESET timezone",
    ] {
        assert_eq!(sqlstate(&client, sql).await, "42501", "{sql}");
    }
    // PostgreSQL's own session variables are still accepted (and ignored).
    client
        .batch_execute("SET application_name = 'psql'")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_read_only_server_refuses_writes() {
    // A slice behind its input, served read-only.
    let (dir, warehouse) = crate::support::open_with(&[]).await;
    crate::support::run(
        &warehouse,
        "CREATE CORE TABLE t (x BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s AS SELECT sum(x) AS total FROM core.t; INGEST INTO t VALUES (2);",
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let options = ServerOptions {
        read_only: true,
        ..ServerOptions::default()
    };
    let server = serve(Protocol::Pg, warehouse, options).await.keeping(dir);
    let client = connect(&server, None).await.unwrap();
    assert_eq!(simple_rows(&client, "SELECT 1 + 1").await, vec!["2"]);
    assert_eq!(simple_rows(&client, "SHOW SLICES").await.len(), 1);
    for refused in [
        "CREATE CORE TABLE u (x BIGINT)",
        "CREATE SLICE s2 AS SELECT 1 AS x",
        "SET datafusion.execution.batch_size = 10",
        "SELECT 1 AS x INTO made",
    ] {
        assert_eq!(sqlstate(&client, refused).await, "25006", "{refused}");
    }
    // Nor does it refresh a stale slice for a reader; serving it is a read.
    assert_eq!(
        sqlstate(&client, "SELECT * FROM fresh('s', '0 seconds', 'refresh')").await,
        "42501"
    );
    assert_eq!(
        simple_rows(&client, "SELECT * FROM fresh('s', '0 seconds', 'serve')").await,
        vec!["1"]
    );
    assert_eq!(
        simple_rows(&client, "SELECT version FROM system.slices").await,
        vec!["0"]
    );
}

/// A query that runs for minutes unless stopped.
const LONG: &str = "SELECT count(*) FROM generate_series(1, 100000000000)";

/// `work`, or a failure after a minute: a stop that does not work fails rather than hangs.
async fn within_a_minute<T>(work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(60), work)
        .await
        .expect("the statement was not stopped within a minute")
}

/// `query`, with a cancel request sent through `token` every 300 ms until it ends: a request
/// that reaches the server before the statement has started cancels nothing, so a slow
/// machine needs the next one.
async fn cancelled<T>(
    token: &tokio_postgres::CancelToken,
    query: impl std::future::Future<Output = T>,
) -> T {
    let cancel = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            token.cancel_query(NoTls).await.unwrap();
        }
    };
    tokio::select! {
        ended = within_a_minute(query) => ended,
        _ = cancel => unreachable!("the cancel requests never end"),
    }
}

#[tokio::test]
async fn a_cancel_request_or_the_statement_timeout_stops_a_long_query() {
    let server = start(None).await;
    let client = connect(&server, None).await.unwrap();
    let token = client.cancel_token();
    let result = cancelled(&token, client.simple_query(LONG)).await;
    let e = result.expect_err("the query should be cancelled");
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e:?}");
    // The connection goes on, through the extended protocol too.
    let result = cancelled(&token, client.query(LONG, &[])).await;
    assert_eq!(result.unwrap_err().code().map(|c| c.code()), Some("57014"));
    assert_eq!(simple_rows(&client, "SELECT 1").await, vec!["1"]);

    let limited = start_with(ServerOptions {
        statement_timeout: Some(std::time::Duration::from_millis(300)),
        ..ServerOptions::default()
    })
    .await;
    let client = connect(&limited, None).await.unwrap();
    let e = within_a_minute(client.simple_query(LONG))
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e:?}");
    let message = e.as_db_error().map(|d| d.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("statement timeout")),
        "{message:?}"
    );
    assert_eq!(simple_rows(&client, "SELECT 2").await, vec!["2"]);
}

#[tokio::test]
async fn clients_beyond_max_connections_are_refused_until_one_leaves() {
    let server = start_with(ServerOptions {
        max_connections: Some(1),
        ..ServerOptions::default()
    })
    .await;
    let first = connect(&server, None).await.unwrap();
    let refused = connect(&server, None).await.unwrap_err();
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("53300"),
        "{refused:?}"
    );
    // The connected client goes on, and can still be cancelled through a new connection.
    let token = first.cancel_token();
    let result = cancelled(&token, first.simple_query(LONG)).await;
    assert_eq!(result.unwrap_err().code().map(|c| c.code()), Some("57014"));
    drop(first);
    let second = crate::support::eventually(10, "a free connection", || async {
        connect(&server, None).await.ok()
    })
    .await;
    assert_eq!(simple_rows(&second, "SELECT 3").await, vec!["3"]);
}

#[tokio::test]
async fn a_password_is_checked_when_set() {
    let server = start(Some("s3cret")).await;
    let refused = connect(&server, Some("wrong")).await.unwrap_err();
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("28P01"),
        "{refused:?}"
    );
    assert!(connect(&server, None).await.is_err());
    let client = connect(&server, Some("s3cret")).await.unwrap();
    assert_eq!(simple_rows(&client, "SELECT 40 + 2").await, vec!["42"]);
}

#[tokio::test]
async fn a_stored_scram_verifier_stands_for_the_password() {
    use base64::Engine;
    use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramSecret};
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let salt = b"pepper-salt-1234".to_vec();
    let salted = gen_salted_password("s3cret", &salt, 4096);
    let ScramSecret::Verifier {
        stored_key,
        server_key,
        ..
    } = ScramSecret::verifier_from_salted_password(salt.clone(), salted, 4096)
    else {
        panic!("a verifier");
    };
    // As PostgreSQL stores it (pg_authid.rolpassword).
    let verifier = format!(
        "SCRAM-SHA-256$4096:{}${}:{}",
        b64(&salt),
        b64(&stored_key),
        b64(&server_key)
    );
    let server = start(Some(&verifier)).await;
    let refused = connect(&server, Some("wrong")).await.unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("28P01"));
    assert!(connect(&server, Some(&verifier)).await.is_err());
    let client = connect(&server, Some("s3cret")).await.unwrap();
    assert_eq!(simple_rows(&client, "SELECT 1").await, vec!["1"]);

    let (_dir, warehouse) = crate::support::open_with(&[]).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = ServerOptions {
        password: Some("SCRAM-SHA-256$4096:bad".into()),
        ..ServerOptions::default()
    };
    let e = serve_pg(warehouse, listener, options, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not one"), "{e}");
}

#[tokio::test]
async fn no_password_serves_loopback_only() {
    let (_dir, warehouse) = crate::support::open_with(&[]).await;
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let e = serve_pg(warehouse, listener, ServerOptions::default(), async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no password"), "{e}");
}

#[tokio::test]
async fn garbage_on_the_wire_ends_that_connection_only() {
    let server = start(None).await;
    for garbage in [
        &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..], // an SSL request, then gone
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], // another protocol
        &b"\x00\x00\x00\x03"[..],                 // a length shorter than itself
        &b"\xff\xff\xff\xff\x00\x03\x00\x00user\x00"[..], // a huge length, truncated
        &b"\x00\x00\x00\x09\x00\x03\x00\x00u"[..], // a startup cut short
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
    let client = connect(&server, None).await.unwrap();
    assert_eq!(simple_rows(&client, "SELECT 1").await, vec!["1"]);
}

/// A warehouse served with a core table, a slice in domain `sales` and one in the default
/// domain, for the catalog tests.
async fn catalog_server() -> Server {
    let server = start(None).await;
    let client = connect(&server, None).await.unwrap();
    client
        .batch_execute(
            "CREATE CORE TABLE orders (id BIGINT NOT NULL, region VARCHAR, amount DOUBLE, at TIMESTAMP); \
             CREATE SLICE sales.recent AS SELECT id, amount FROM core.orders; \
             CREATE SLICE eu AS SELECT region, sum(amount) AS total FROM core.orders GROUP BY region",
        )
        .await
        .unwrap();
    server
}

/// psql 15's `\d NAME`: the table's oid by a pattern (`OPERATOR(pg_catalog.~)`, `COLLATE
/// pg_catalog.default`), then its columns.
const PSQL_FIND: &str = r#"SELECT c.oid,
  n.nspname,
  c.relname
FROM pg_catalog.pg_class c
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname OPERATOR(pg_catalog.~) '^(recent)$' COLLATE pg_catalog.default
  AND n.nspname OPERATOR(pg_catalog.~) '^(sales)$' COLLATE pg_catalog.default
ORDER BY 2, 3;"#;

const PSQL_COLUMNS: &str = r#"SELECT a.attname,
  pg_catalog.format_type(a.atttypid, a.atttypmod),
  (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid, true)
   FROM pg_catalog.pg_attrdef d
   WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.atthasdef),
  a.attnotnull,
  (SELECT c.collname FROM pg_catalog.pg_collation c, pg_catalog.pg_type t
   WHERE c.oid = a.attcollation AND t.oid = a.atttypid AND a.attcollation <> t.typcollation) AS attcollation,
  a.attidentity,
  a.attgenerated
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = 'OID' AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum;"#;

#[tokio::test]
async fn catalog_queries_of_psql_and_bi_tools_are_answered() {
    let server = catalog_server().await;
    let client = connect(&server, None).await.unwrap();
    // psql's `\d sales.recent`, as psql 15 sends it.
    let found = simple_rows(&client, PSQL_FIND).await;
    assert_eq!(found.len(), 1, "{found:?}");
    let oid = found[0].split('|').next().unwrap().to_string();
    assert!(found[0].ends_with("|sales|recent"), "{found:?}");
    let columns = simple_rows(&client, &PSQL_COLUMNS.replace("OID", &oid)).await;
    assert_eq!(
        columns,
        [
            "id|bigint|NULL|t|NULL||",
            "amount|double precision|NULL|f|NULL||"
        ]
    );
    // What drivers and BI tools (JDBC/DBeaver, Metabase, Grafana) ask on connect and when they
    // browse: each answered, and the warehouse's tables among the answers.
    for (sql, expect) in [
        ("SHOW search_path", "slices"),
        ("SHOW TRANSACTION ISOLATION LEVEL", "read committed"),
        ("SHOW timezone", "Etc/UTC"),
        ("SELECT current_schema(), session_user", "slices|postgres"),
        (
            "SELECT current_database(), c.oid = 'core.orders'::regclass \
             FROM pg_catalog.pg_class c WHERE c.relname = 'orders'",
            "icepie|t",
        ),
        (
            "SELECT n.nspname FROM pg_catalog.pg_namespace n \
             LEFT OUTER JOIN pg_catalog.pg_description d ON d.objoid = n.oid AND d.objsubid = 0 \
             WHERE n.nspname = 'sales' ORDER BY nspname",
            "sales",
        ),
        (
            "SELECT datname FROM pg_catalog.pg_database WHERE datname = current_database()",
            "icepie",
        ),
        (
            "SELECT setting FROM pg_catalog.pg_settings WHERE name = 'standard_conforming_strings'",
            "on",
        ),
        (
            "SELECT schemaname, tablename FROM pg_catalog.pg_tables \
             WHERE schemaname !~ '^pg_' AND schemaname <> 'information_schema' \
             AND pg_catalog.has_schema_privilege(current_user, schemaname, 'usage') \
             AND tablename = 'recent'",
            "sales|recent",
        ),
        (
            "SELECT \"n\".\"nspname\", \"c\".\"relname\", CASE \"c\".\"relkind\" WHEN 'r' THEN 'TABLE' \
             WHEN 'v' THEN 'VIEW' END FROM \"pg_catalog\".\"pg_class\" AS \"c\" \
             INNER JOIN \"pg_catalog\".\"pg_namespace\" AS \"n\" ON \"c\".\"relnamespace\" = \"n\".\"oid\" \
             WHERE \"n\".\"nspname\" IN ('system') AND \"c\".\"relname\" = 'slices'",
            "system|slices|VIEW",
        ),
        (
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON a.attrelid = c.oid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'slices' AND c.relname = 'eu' AND a.attnum > 0 ORDER BY a.attnum",
            "region|text\ntotal|double precision",
        ),
        (
            "SELECT table_name FROM information_schema.tables \
             WHERE table_schema = 'sales' ORDER BY table_name",
            "recent",
        ),
    ] {
        let rows = client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let text = rows
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).unwrap_or("NULL"))
                        .collect::<Vec<_>>()
                        .join("|"),
                ),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(text, expect, "{sql}");
    }
    // DataFusion's SHOW still answers.
    assert_eq!(
        simple_rows(&client, "SHOW datafusion.execution.batch_size").await,
        ["datafusion.execution.batch_size|8192"]
    );
}

#[tokio::test]
async fn user_queries_mean_what_they_mean_in_the_repl() {
    let server = catalog_server().await;
    let client = connect(&server, None).await.unwrap();
    client
        .batch_execute(
            "INGEST INTO core.orders VALUES (1, 'eu', 2.0, NULL), (2, 'eu', 3.0, NULL),              (3, 'us', 4.0, NULL)",
        )
        .await
        .unwrap();
    // Scalar subqueries, correlated or not: the catalog rewrites would make these NULL, so a
    // query that does not ask the catalog is not rewritten.
    assert_eq!(
        simple_rows(
            &client,
            "SELECT o.id, (SELECT count(*) FROM core.orders i WHERE i.region = o.region) AS same,              (SELECT max(x.v) FROM (SELECT 1 AS v UNION ALL SELECT 2) x) AS m              FROM core.orders o ORDER BY o.id"
        )
        .await,
        ["1|2|2", "2|2|2", "3|1|2"]
    );
    // Lists are PostgreSQL arrays, as PostgreSQL answers these.
    assert_eq!(
        simple_rows(
            &client,
            "SELECT current_schemas(false), current_schemas(true)"
        )
        .await,
        ["{slices}|{pg_catalog,slices}"]
    );
}

/// A text of several statements in which one asks the catalog: only that one goes through
/// the catalog rewrites (which turned every statement's scalar subqueries into NULL).
#[tokio::test]
async fn a_catalog_query_beside_a_user_query_rewrites_only_itself() {
    let server = catalog_server().await;
    let client = connect(&server, None).await.unwrap();
    client
        .batch_execute("INGEST INTO core.orders VALUES (1, 'eu', 2.0, NULL), (3, 'us', 4.0, NULL)")
        .await
        .unwrap();
    assert_eq!(
        simple_rows(
            &client,
            "SELECT count(*) AS n FROM pg_catalog.pg_class WHERE relname = 'no_such_table'; \
             SELECT o.id, (SELECT count(*) FROM core.orders i WHERE i.region = o.region) AS \
             same FROM core.orders o ORDER BY o.id"
        )
        .await,
        ["0", "1|1", "3|1"]
    );
}

/// `commands` run by psql ([`crate::tools::psql`]: `ICEPIE_PSQL`, else the one on `PATH`, else
/// Debian's postgresql-client installed when running as root).
fn psql(server: &Server, commands: &[&str]) -> String {
    let program = crate::tools::psql();
    let mut command = std::process::Command::new(program);
    command
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(server.addr.ip().to_string())
        .arg("-p")
        .arg(server.addr.port().to_string())
        .args(["-U", "analyst", "-d", "icepie"]);
    for c in commands {
        command.args(["-c", c]);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run '{}' ({e})", program.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "psql {commands:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_lists_and_describes_tables_slices_and_schemas() {
    let server = catalog_server().await;
    let listed = tokio::task::spawn_blocking(move || {
        let out = psql(
            &server,
            &["\\d", "\\d sales.recent", "\\d eu", "\\dn", "\\dv system.*"],
        );
        drop(server);
        out
    })
    .await
    .unwrap();
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        [
            // \d: core tables and slices are tables, system tables views.
            "core|orders|table|postgres",
            "sales|recent|table|postgres",
            "slices|eu|table|postgres",
            "system|core_tables|view|postgres",
            "system|proposals|view|postgres",
            "system|refreshes|view|postgres",
            "system|slices|view|postgres",
            "system|usage|view|postgres",
            "system|usage_columns|view|postgres",
            // \d sales.recent: columns, types, NOT NULL.
            "id|bigint||not null|",
            "amount|double precision|||",
            // \d eu: a slice of the default domain, by its bare name.
            "region|text|||",
            "total|double precision|||",
            // \dn
            "core|postgres",
            "sales|postgres",
            "slices|postgres",
            "system|postgres",
            // \dv system.*
            "system|core_tables|view|postgres",
            "system|proposals|view|postgres",
            "system|refreshes|view|postgres",
            "system|slices|view|postgres",
            "system|usage|view|postgres",
            "system|usage_columns|view|postgres",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_beyond_its_memory_fails_alone() {
    let server = start_with(ServerOptions {
        statement_memory: Some(4 << 20),
        ..ServerOptions::default()
    })
    .await;
    let greedy = connect(&server, None).await.unwrap();
    let other = connect(&server, None).await.unwrap();
    // A hash join's build side of two million rows cannot spill: far beyond 4 MB.
    let big = "SELECT count(*) FROM generate_series(1, 2000000) a \
               JOIN generate_series(1, 2000000) b ON a.value = b.value";
    let (failed, small) = tokio::join!(
        greedy.simple_query(big),
        other.simple_query("SELECT sum(value) FROM generate_series(1, 1000)")
    );
    let e = failed.expect_err("over its memory");
    assert_eq!(e.code().unwrap().code(), "53200", "{e:?}");
    assert!(small.is_ok(), "{small:?}");
    // The greedy client's connection goes on, and a sort of twice its memory spills.
    assert_eq!(
        simple_rows(&greedy, "SELECT sum(value) FROM generate_series(1, 1000)").await,
        vec!["500500"]
    );
    assert_eq!(
        simple_rows(
            &greedy,
            "SELECT max(r) FROM (SELECT row_number() OVER (ORDER BY value DESC) AS r \
             FROM generate_series(1, 1000000))"
        )
        .await,
        vec!["1000000"]
    );
}
