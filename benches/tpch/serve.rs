//! Serving under load: `ICEPIE_BENCH_CLIENTS` (32) PostgreSQL clients query slices over
//! `icepie::server::serve_pg` for `ICEPIE_BENCH_SERVE_SECS` (30) seconds while another slice
//! is refreshed in full again and again, then as many Arrow Flight SQL clients over
//! `serve_flight`, vs as many tasks running the same queries on the embedded warehouse for as
//! long (with the same refreshes): throughput and the p50 and p99 latency of a query, server /
//! embedded, and the errors (none wanted).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use icepie::server::{serve_flight, serve_pg, ServerOptions};
use icepie::IcePie;
use tokio::net::TcpListener;
use tokio_postgres::NoTls;

use super::{env_or, run};

/// The queries the clients take turns with: a lookup in a small aggregate slice and a
/// selective filter on a larger one.
fn query(i: usize) -> String {
    match i % 2 {
        0 => format!(
            "SELECT region, n, total FROM bench.by_region WHERE region = {}",
            i % 100
        ),
        _ => {
            let from = (i * 7919) % 990_000;
            format!(
                "SELECT count(*), sum(amount) FROM bench.events WHERE id BETWEEN {from} AND {}",
                from + 100
            )
        }
    }
}

/// What one side measured.
struct Load {
    queries: usize,
    errors: usize,
    p50: Duration,
    p99: Duration,
    elapsed: Duration,
}

impl Load {
    fn per_second(&self) -> f64 {
        self.queries as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `clients` loops of `one` (client number, query number) until `secs` have passed,
/// with `warehouse` refreshing a heavy slice meanwhile.
async fn load<F, Fut>(warehouse: &IcePie, clients: usize, secs: u64, one: F) -> Load
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let refreshes = Arc::new(AtomicUsize::new(0));
    let refresher = {
        let (w, stop, refreshes) = (warehouse.clone(), stop.clone(), refreshes.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                run(&w, "REFRESH SLICE bench.heavy FULL").await;
                refreshes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0);
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                if one(c, i).await {
                    latencies.push(t.elapsed());
                } else {
                    errors += 1;
                }
                i += clients;
            }
            (latencies, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("a client task");
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    refresher.await.expect("the refresher");
    all.sort();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    println!(
        "  ({} queries, {errors} errors, {} refreshes of bench.heavy)",
        all.len(),
        refreshes.load(Ordering::Relaxed)
    );
    Load {
        queries: all.len(),
        errors,
        p50: at(0.50),
        p99: at(0.99),
        elapsed,
    }
}

pub async fn serve(root: &Path) {
    let clients: usize = env_or("ICEPIE_BENCH_CLIENTS", 32);
    let secs: u64 = env_or("ICEPIE_BENCH_SERVE_SECS", 30);
    let dir = root.join("serve");
    let w = IcePie::builder(dir.to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .expect("open the warehouse");
    run(
        &w,
        "CREATE CORE TABLE events AS
             SELECT value AS id, value % 100 AS region, value * 0.5 AS amount
             FROM generate_series(1, 1000000);
         CREATE SLICE bench.events AS SELECT * FROM core.events;
         CREATE SLICE bench.by_region AS
             SELECT region, count(*) AS n, sum(amount) AS total FROM core.events GROUP BY region;
         CREATE SLICE bench.heavy AS
             SELECT id % 100000 AS k, count(*) AS n, sum(amount) AS s FROM core.events
             GROUP BY id % 100000",
    )
    .await;

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let port = listener.local_addr().expect("its address").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_pg(
        w.clone(),
        listener,
        ServerOptions::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let mut connections = Vec::new();
    for _ in 0..clients {
        let (client, connection) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=bench dbname=icepie"),
            NoTls,
        )
        .await
        .expect("connect");
        tokio::spawn(connection);
        connections.push(Arc::new(client));
    }
    let connections = Arc::new(connections);
    let served = load(&w, clients, secs, move |c, i| {
        let client = connections[c].clone();
        async move { client.simple_query(&query(i)).await.is_ok() }
    })
    .await;
    let _ = stop.send(());
    let _ = server.await;
    // Each server's baseline runs right after it, so both see the warehouse as it then is
    // (the heavy slice keeps committing versions).
    let embedded = || {
        let w2 = w.clone();
        load(&w, clients, secs, move |_, i| {
            let w = w2.clone();
            async move {
                match w.sql(&query(i)).await {
                    Ok(df) => df.collect().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
    };
    let after_pg = embedded().await;

    // The same over Arrow Flight SQL: each client its own connection, each query a
    // GetFlightInfo and a DoGet.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let port = listener.local_addr().expect("its address").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_flight(
        w.clone(),
        listener,
        ServerOptions::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let mut flights = Vec::new();
    for _ in 0..clients {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("an endpoint")
            .connect()
            .await
            .expect("connect");
        flights.push(Arc::new(tokio::sync::Mutex::new(
            FlightSqlServiceClient::new(channel),
        )));
    }
    let flights = Arc::new(flights);
    let flown = load(&w, clients, secs, move |c, i| {
        let client = flights[c].clone();
        async move {
            let mut client = client.lock().await;
            let Ok(info) = client.execute(query(i), None).await else {
                return false;
            };
            let Some(ticket) = info.endpoint.first().and_then(|e| e.ticket.clone()) else {
                return false;
            };
            match client.do_get(ticket).await {
                Ok(stream) => stream.try_collect::<Vec<_>>().await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    let _ = stop.send(());
    let _ = server.await;
    let after_flight = embedded().await;
    report("serve", clients, &served, &after_pg, 0.5);
    report("serve flight", clients, &flown, &after_flight, 0.9);
}

/// Prints `served` against `embedded`, with the targets (`throughput`: the least ratio of
/// queries per second).
fn report(name: &str, clients: usize, served: &Load, embedded: &Load, throughput_target: f64) {
    let line = |what: &str, ours: f64, base: f64, unit: &str, target: &str, above: bool| {
        println!(
            "{what:<34} server {ours:>9.1} {unit:<5} embedded {base:>9.1} {unit:<5} ratio {:>5.2} \
             ({target}){}",
            ours / base,
            if above { "  ABOVE TARGET" } else { "" }
        );
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let throughput = served.per_second() / embedded.per_second();
    line(
        &format!("{name}: {clients} clients, queries/s"),
        served.per_second(),
        embedded.per_second(),
        "q/s",
        &format!("target >= {throughput_target:.2}"),
        throughput < throughput_target,
    );
    let (p50, p99) = (
        ms(served.p50) / ms(embedded.p50),
        ms(served.p99) / ms(embedded.p99),
    );
    line(
        &format!("{name}: p50 latency"),
        ms(served.p50),
        ms(embedded.p50),
        "ms",
        "target <= 2.00",
        p50 > 2.0,
    );
    line(
        &format!("{name}: p99 latency"),
        ms(served.p99),
        ms(embedded.p99),
        "ms",
        "target <= 2.00",
        p99 > 2.0,
    );
    println!(
        "{:<34} server {} of {}, embedded {} of {}{}",
        format!("{name}: errors"),
        served.errors,
        served.queries + served.errors,
        embedded.errors,
        embedded.queries + embedded.errors,
        if served.errors + embedded.errors > 0 {
            "  ABOVE TARGET (0 wanted)"
        } else {
            ""
        }
    );
}
