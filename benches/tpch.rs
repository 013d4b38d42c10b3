//! icepie against the engine's own limit, on TPC-H data generated in-process.
//!
//! Every figure is a ratio of two timings taken in the same run on the same files (medians of
//! `ICEPIE_BENCH_RUNS` runs after one warm-up), so the machine's speed and noise cancel out.
//! Nothing is asserted: the report says where a ratio is above its target.
//!
//! Sections (all by default; name some to run only those, e.g.
//! `cargo bench --bench tpch -- scan refresh`):
//!
//! - `ingest`: `INGEST` of lineitem vs DataFusion's `COPY` of the same Parquet files to Parquet.
//! - `load`: loading the eight TPC-H tables into a fresh core vs DuckDB's `CREATE TABLE AS`
//!   from the same Parquet files into a fresh database file.
//! - `scan`: queries on a slice (full scan, selective filter, group by) vs DataFusion's
//!   `ListingTable` over the slice's own files; the selective one also one-shot (`icepie -c`
//!   less process start vs DataFusion from a fresh context).
//! - `refresh`: `REFRESH SLICE … FULL` of each of the 22 TPC-H query slices vs DataFusion's
//!   `COPY (query) TO` Parquet over the core's own files.
//! - `p99`: a small slice query's 99th-percentile latency while another slice's heavy
//!   `REFRESH SLICE … FULL` runs again and again, vs the same query on an idle warehouse.
//! - `incremental`: after 1% more lineitem rows, an incremental `REFRESH SLICE` of a
//!   filter/projection, a Q1-shaped aggregate and a Q3-shaped join vs the same refresh in full
//!   and vs DuckDB computing the query from the same files; bytes read vs bytes appended.
//! - `auto`: for lineitem appends of 0.1% to 100% of its rows, the refreshes of the
//!   `incremental` section's slices incrementally, in full, and as AUTO chooses by measured
//!   cost: the crossover curve, and AUTO against the better mode.
//! - `scale`: a warehouse with `ICEPIE_BENCH_SLICES` slices (1,000) and `ICEPIE_BENCH_ATTEMPTS`
//!   refresh attempts in history (10,000) vs a fresh one with one slice: process start to first
//!   result, a slice query, a `REFRESH SLICE … FULL`, `system.slices` for that slice, and
//!   `system.slices` whole, in a new process and warm.
//!
//! - `cluster`: a selective query on a slice of `ICEPIE_BENCH_CLUSTER_ROWS` (4 million) rows
//!   before and after AUTO clustering re-clusters it by the filtered column: files, bytes and
//!   time, after vs before.
//! - `usage`: a small slice query with usage recorded (the default) vs with `icepie.usage =
//!   off`, on the same files.
//! - `serve`: the load test of the PostgreSQL server: `ICEPIE_BENCH_CLIENTS` (32) clients
//!   querying slices for `ICEPIE_BENCH_SERVE_SECS` (30) seconds while another slice refreshes,
//!   vs as many tasks querying the embedded warehouse: throughput, p50, p99, errors.
//!
//! `ICEPIE_BENCH_SF` sets the TPC-H scale factor (default 1).

#[path = "tpch/auto.rs"]
mod auto;
#[path = "tpch/cluster.rs"]
mod cluster;
#[path = "tpch/incremental.rs"]
mod incremental;
#[path = "tpch/load.rs"]
mod load;
#[path = "tpch/queries.rs"]
mod queries;
#[path = "tpch/serve.rs"]
mod serve;
#[path = "tpch/usage.rs"]
mod usage;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::Compression;
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::prelude::{DataFrame, SessionContext};
use futures::StreamExt;
use icepie::IcePie;
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator,
    PartSuppGenerator, RegionGenerator, SupplierGenerator,
};
use tpchgen_arrow::{
    CustomerArrow, LineItemArrow, NationArrow, OrderArrow, PartArrow, PartSuppArrow, RegionArrow,
    SupplierArrow,
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runs() -> usize {
    env_or("ICEPIE_BENCH_RUNS", 5usize).max(1)
}

/// The median of `times`.
fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Median of `runs()` timings of `f`, after one warm-up run.
async fn time<F, Fut>(mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    f().await;
    let mut times = Vec::new();
    for _ in 0..runs() {
        let start = Instant::now();
        f().await;
        times.push(start.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// Medians of `runs()` timings of `ours` and of `base`, after one warm-up run of each. The
/// runs alternate (and which goes first alternates), so the machine's drifts hit both alike.
async fn time_pair<A, FA, B, FB>(ours: A, base: B) -> (Duration, Duration)
where
    A: FnMut() -> FA,
    FA: std::future::Future<Output = ()>,
    B: FnMut() -> FB,
    FB: std::future::Future<Output = ()>,
{
    time_pair_settled(ours, base, || async {}).await
}

/// [`time_pair`], running `settle` untimed after each run of `ours`: what icepie finishes
/// in the background after returning (refresh records) must not slow the baseline's run.
async fn time_pair_settled<A, FA, B, FB, S, FS>(
    mut ours: A,
    mut base: B,
    mut settle: S,
) -> (Duration, Duration)
where
    A: FnMut() -> FA,
    FA: std::future::Future<Output = ()>,
    B: FnMut() -> FB,
    FB: std::future::Future<Output = ()>,
    S: FnMut() -> FS,
    FS: std::future::Future<Output = ()>,
{
    ours().await;
    settle().await;
    base().await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..runs() {
        for first in [i % 2 == 0, i % 2 != 0] {
            let start = Instant::now();
            if first {
                ours().await;
                a.push(start.elapsed());
                settle().await;
            } else {
                base().await;
                b.push(start.elapsed());
            }
        }
    }
    a.sort();
    b.sort();
    (a[a.len() / 2], b[b.len() / 2])
}

/// One line of the report; returns the ratio.
fn report(what: &str, ours: Duration, base: Duration, base_name: &str, target: f64) -> f64 {
    let ratio = ours.as_secs_f64() / base.as_secs_f64();
    let wanted = if target.is_finite() {
        format!("(target <= {target:.2})")
    } else {
        "(no target)".to_string()
    };
    println!(
        "{what:<34} icepie {:>9.2} ms   {base_name:<16} {:>9.2} ms   ratio {ratio:>5.2} {wanted}{}",
        ours.as_secs_f64() * 1e3,
        base.as_secs_f64() * 1e3,
        if ratio <= target {
            ""
        } else {
            "  ABOVE TARGET"
        }
    );
    ratio
}

/// A warehouse without a scheduler: only the statements measured touch storage.
async fn open(dir: &Path) -> IcePie {
    IcePie::builder(dir.to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .expect("open the warehouse")
}

/// The number of rows `df`, the plan of `sql`, returns.
async fn rows<E: std::fmt::Display>(df: Result<DataFrame, E>, sql: &str) -> usize {
    let df = df.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let batches = df.collect().await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    batches.iter().map(|b| b.num_rows()).sum()
}

async fn run(w: &IcePie, sql: &str) -> usize {
    rows(w.sql(sql).await, sql).await
}

async fn run_df(ctx: &SessionContext, sql: &str) -> usize {
    rows(ctx.sql(sql).await, sql).await
}

// ---------------------------------------------------------------------------------------------
// Data

/// Writes `batches` to one Parquet file.
fn write_parquet(path: &Path, batches: impl Iterator<Item = RecordBatch>) {
    let mut batches = batches.peekable();
    let schema = batches.peek().expect("a generator yields batches").schema();
    let file = std::fs::File::create(path).expect("create a source file");
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(props)).expect("parquet writer");
    for batch in batches {
        writer.write(&batch).expect("write a batch");
    }
    writer.close().expect("close a source file");
}

/// The eight TPC-H tables at scale factor `sf` as Parquet files, `<dir>/<table>/part-N.parquet`.
fn generate(dir: &Path, sf: f64) {
    type Parts = fn(f64, i32, i32) -> Box<dyn Iterator<Item = RecordBatch>>;
    let tables: [(&str, i32, Parts); 8] = [
        ("lineitem", 8, |sf, p, n| {
            Box::new(
                LineItemArrow::new(LineItemGenerator::new(sf, p, n)).map(|b| b.expect("generate")),
            )
        }),
        ("orders", 2, |sf, p, n| {
            Box::new(OrderArrow::new(OrderGenerator::new(sf, p, n)).map(|b| b.expect("generate")))
        }),
        ("partsupp", 2, |sf, p, n| {
            Box::new(
                PartSuppArrow::new(PartSuppGenerator::new(sf, p, n)).map(|b| b.expect("generate")),
            )
        }),
        ("part", 1, |sf, p, n| {
            Box::new(PartArrow::new(PartGenerator::new(sf, p, n)).map(|b| b.expect("generate")))
        }),
        ("customer", 1, |sf, p, n| {
            Box::new(
                CustomerArrow::new(CustomerGenerator::new(sf, p, n)).map(|b| b.expect("generate")),
            )
        }),
        ("supplier", 1, |sf, p, n| {
            Box::new(
                SupplierArrow::new(SupplierGenerator::new(sf, p, n)).map(|b| b.expect("generate")),
            )
        }),
        ("nation", 1, |sf, p, n| {
            Box::new(NationArrow::new(NationGenerator::new(sf, p, n)).map(|b| b.expect("generate")))
        }),
        ("region", 1, |sf, p, n| {
            Box::new(RegionArrow::new(RegionGenerator::new(sf, p, n)).map(|b| b.expect("generate")))
        }),
    ];
    std::thread::scope(|scope| {
        for (table, parts, make) in tables {
            for part in 1..=parts {
                let path = dir.join(table);
                scope.spawn(move || {
                    std::fs::create_dir_all(&path).unwrap();
                    write_parquet(
                        &path.join(format!("part-{part}.parquet")),
                        make(sf, part, parts),
                    );
                });
            }
        }
    });
}

const TABLES: [&str; 8] = [
    "lineitem", "orders", "partsupp", "part", "customer", "supplier", "nation", "region",
];

/// A `ListingTable` over exactly `files`, as DataFusion plans a Parquet table by default.
async fn listing(ctx: &SessionContext, files: Vec<String>) -> Arc<ListingTable> {
    let urls = files
        .iter()
        .map(|f| ListingTableUrl::parse(f).expect("file url"))
        .collect();
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .infer_schema(&ctx.state())
        .await
        .expect("infer the schema");
    Arc::new(ListingTable::try_new(config).expect("listing table"))
}

/// The Parquet files of the current version of the Delta table at `dir`.
async fn delta_files(dir: &Path) -> Vec<String> {
    let url = url::Url::from_directory_path(dir.canonicalize().unwrap()).unwrap();
    let table = deltalake::open_table(url)
        .await
        .expect("open a Delta table");
    table
        .get_file_uris()
        .expect("file list")
        .map(|u| u.to_string())
        .collect()
}

fn source_files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path().canonicalize().unwrap())
        .map(|p| p.to_string_lossy().to_string())
        .collect();
    files.sort();
    files
}

/// A warehouse whose core holds the eight TPC-H tables, loaded from `src`.
async fn tpch_warehouse(dir: &Path, src: &Path) -> IcePie {
    let w = open(dir).await;
    load_core(&w, src, &TABLES).await;
    w
}

/// Creates the core tables `tables` of `w` from their files in `src`.
async fn load_core(w: &IcePie, src: &Path, tables: &[&str]) {
    for table in tables {
        let glob = src.join(table).join("*.parquet");
        run(
            w,
            &format!(
                "CREATE CORE TABLE {table} FROM '{}' FORMAT parquet",
                glob.display()
            ),
        )
        .await;
    }
}

/// DataFusion with the core's own Delta files registered as `core.<table>` listing tables.
async fn baseline_over_core(warehouse: &Path) -> SessionContext {
    let ctx = SessionContext::new();
    run_df(&ctx, "CREATE SCHEMA core").await;
    for table in TABLES {
        let files = delta_files(&warehouse.join("core").join(table)).await;
        ctx.register_table(format!("core.{table}"), listing(&ctx, files).await)
            .unwrap();
    }
    ctx
}

// ---------------------------------------------------------------------------------------------
// Sections

async fn ingest(w: &IcePie, src: &Path, out: &Path) {
    let glob = src.join("lineitem").join("*.parquet");
    run(
        w,
        "CREATE CORE TABLE lineitem_in AS SELECT * FROM core.lineitem LIMIT 0",
    )
    .await;
    let sql = format!(
        "INGEST INTO core.lineitem_in FROM '{}' FORMAT parquet",
        glob.display()
    );
    let sql = sql.as_str();
    let ctx = SessionContext::new();
    let table = listing(&ctx, source_files(&src.join("lineitem"))).await;
    ctx.register_table("lineitem", table).unwrap();
    let mut n = 0;
    let (ours, base) = time_pair(
        || async move {
            run(w, sql).await;
        },
        || {
            n += 1;
            let target = out.join(format!("copy-{n}"));
            let ctx = ctx.clone();
            async move {
                run_df(
                    &ctx,
                    &format!(
                        "COPY (SELECT * FROM lineitem) TO '{}/' STORED AS PARQUET",
                        target.display()
                    ),
                )
                .await;
            }
        },
    )
    .await;
    report("INGEST lineitem", ours, base, "DataFusion COPY", 1.10);
}

async fn scan(w: &IcePie, warehouse: &Path) {
    run(
        w,
        "CREATE SLICE bench.lineitem AS SELECT * FROM core.lineitem",
    )
    .await;
    let ctx = SessionContext::new();
    let files = delta_files(&warehouse.join("slices/bench/lineitem")).await;
    ctx.register_table("lineitem", listing(&ctx, files.clone()).await)
        .unwrap();
    for (what, query) in [
        (
            "scan, full",
            "SELECT count(*), sum(l_extendedprice), max(l_comment) FROM {t}",
        ),
        (
            "scan, selective (clustered key)",
            "SELECT count(*), sum(l_quantity) FROM {t} WHERE l_orderkey BETWEEN 100000 AND 110000",
        ),
        (
            "scan, selective (other column)",
            "SELECT count(*), sum(l_quantity) FROM {t} WHERE l_shipdate = DATE '1995-03-15'",
        ),
        (
            "scan, group by",
            "SELECT l_returnflag, l_linestatus, count(*), sum(l_extendedprice * (1 - l_discount)) \
             FROM {t} GROUP BY l_returnflag, l_linestatus",
        ),
    ] {
        let ours_sql = query.replace("{t}", "bench.lineitem");
        let base_sql = query.replace("{t}", "lineitem");
        let (ours_sql, base_sql, ctx) = (ours_sql.as_str(), base_sql.as_str(), &ctx);
        let (ours, base) = time_pair(
            || async move {
                run(w, ours_sql).await;
            },
            || async move {
                run_df(ctx, base_sql).await;
            },
        )
        .await;
        report(what, ours, base, "ListingTable", 1.05);
    }
    scan_one_shot(warehouse, &ctx, files).await;
}

/// The selective query on the slice as a command line runs it, one process per statement:
/// `icepie -c` less process start (`SELECT 1` on an empty warehouse, timed alternately), vs
/// DataFusion from a fresh context (a listing table over the slice's files, then the query).
async fn scan_one_shot(warehouse: &Path, warm: &SessionContext, files: Vec<String>) {
    let query =
        "SELECT count(*), sum(l_quantity) FROM {t} WHERE l_orderkey BETWEEN 100000 AND 110000";
    let (ours_sql, base_sql) = (
        query.replace("{t}", "bench.lineitem"),
        query.replace("{t}", "lineitem"),
    );
    let empty = tempfile::tempdir().expect("temporary directory");
    let (mut ours, mut start, mut base) = (Vec::new(), Vec::new(), Vec::new());
    for run_no in 0..=runs() {
        let t = Instant::now();
        one_shot(warehouse, &ours_sql).await;
        let took = t.elapsed();
        let t = Instant::now();
        one_shot(empty.path(), "SELECT 1").await;
        let started = t.elapsed();
        let t = Instant::now();
        let ctx = SessionContext::new_with_config(warm.copied_config());
        ctx.register_table("lineitem", listing(&ctx, files.clone()).await)
            .unwrap();
        run_df(&ctx, &base_sql).await;
        let fresh = t.elapsed();
        if run_no > 0 {
            ours.push(took);
            start.push(started);
            base.push(fresh);
        }
    }
    let started = median(start);
    println!(
        "(process start, SELECT 1 on an empty warehouse: {:.1} ms)",
        started.as_secs_f64() * 1e3
    );
    report(
        "scan, selective, one-shot",
        median(ours).saturating_sub(started),
        median(base),
        "fresh DataFusion",
        1.25,
    );
}

async fn refresh(w: &IcePie, warehouse: &Path, out: &Path) {
    let ctx = baseline_over_core(warehouse).await;
    let mut worst: f64 = 0.0;
    for (name, sql) in queries::QUERIES {
        run(w, &format!("CREATE SLICE tpch.{name} AS {sql}")).await;
        let slice = format!("tpch.{name}");
        let slice = slice.as_str();
        let mut n = 0;
        let (ours, base) = time_pair_settled(
            || async move {
                w.refresh_full(slice).await.expect("refresh");
            },
            || {
                n += 1;
                let target = out.join(format!("{name}-{n}.parquet"));
                let ctx = ctx.clone();
                async move {
                    run_df(
                        &ctx,
                        &format!("COPY ({sql}) TO '{}' STORED AS PARQUET", target.display()),
                    )
                    .await;
                }
            },
            || w.flush(),
        )
        .await;
        let ratio = report(
            &format!("REFRESH SLICE {name} FULL"),
            ours,
            base,
            "DataFusion COPY",
            1.10,
        );
        worst = worst.max(ratio);
    }
    println!(
        "{:<34} worst ratio {worst:.2} (target <= 1.10)",
        "REFRESH, 22 queries"
    );
}

async fn p99(w: &IcePie, warehouse: &Path) {
    run(w, "CREATE SLICE bench.small AS SELECT * FROM core.nation").await;
    run(
        w,
        "CREATE SLICE bench.heavy AS SELECT l_orderkey, count(*) AS n, \
         sum(l_extendedprice * (1 - l_discount)) AS revenue FROM core.lineitem GROUP BY l_orderkey",
    )
    .await;
    // The engine's own limit: DataFusion alone, on the small slice's files, same machine load.
    let ctx = &SessionContext::new();
    let files = delta_files(&warehouse.join("slices/bench/small")).await;
    ctx.register_table("small", listing(ctx, files).await)
        .unwrap();
    let samples = env_or("ICEPIE_BENCH_SAMPLES", 1000usize).max(100);
    let query = "SELECT n_regionkey, count(*) FROM {t} GROUP BY n_regionkey";
    let (ours_sql, base_sql) = (
        query.replace("{t}", "bench.small"),
        query.replace("{t}", "small"),
    );
    let (ours_sql, base_sql) = (ours_sql.as_str(), base_sql.as_str());
    let ours = || async move {
        run(w, ours_sql).await;
    };
    let base = || async move {
        run_df(ctx, base_sql).await;
    };
    latencies(samples, ours, base).await; // warm-up
    let (idle, base_idle) = latencies(samples, ours, base).await;
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (w, stop) = (w.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                // FULL: with no new data a plain refresh commits at once, reading nothing.
                w.refresh_full("bench.heavy").await.expect("heavy refresh");
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (busy, base_busy) = latencies(samples, ours, base).await;
    stop.store(true, Ordering::Relaxed);
    let refreshes = background.await.unwrap();
    report(
        "small query p99, heavy refresh",
        busy.1,
        idle.1,
        "idle warehouse",
        1.2,
    );
    report(
        "small query median, heavy refresh",
        busy.0,
        idle.0,
        "idle warehouse",
        f64::INFINITY,
    );
    println!(
        "{:<34} DataFusion alone (ListingTable, same load): p99 {:.2} ms busy / {:.2} ms idle = {:.2}",
        "",
        base_busy.1.as_secs_f64() * 1e3,
        base_idle.1.as_secs_f64() * 1e3,
        base_busy.1.as_secs_f64() / base_idle.1.as_secs_f64()
    );
    println!("{:<34} ({refreshes} heavy refreshes ran meanwhile)", "");
}

/// The median and the 99th percentile of `samples` sequential runs of `ours` and of `base`,
/// whose runs alternate so that the machine's drifts hit both alike.
async fn latencies<A, FA, B, FB>(
    samples: usize,
    ours: A,
    base: B,
) -> ((Duration, Duration), (Duration, Duration))
where
    A: Fn() -> FA,
    FA: std::future::Future<Output = ()>,
    B: Fn() -> FB,
    FB: std::future::Future<Output = ()>,
{
    let (mut a, mut b) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for i in 0..samples {
        for first in [i % 2 == 0, i % 2 != 0] {
            let start = Instant::now();
            if first {
                ours().await;
                a.push(start.elapsed());
            } else {
                base().await;
                b.push(start.elapsed());
            }
        }
    }
    (percentiles(a), percentiles(b))
}

/// The median and the 99th percentile of `times` (and more with `ICEPIE_BENCH_TAIL`).
fn percentiles(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    if std::env::var_os("ICEPIE_BENCH_TAIL").is_some() {
        let at =
            |q: usize| times[(times.len() * q / 1000).min(times.len() - 1)].as_secs_f64() * 1e3;
        println!(
            "  latency ms: p50 {:.2} p90 {:.2} p95 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
            at(500),
            at(900),
            at(950),
            at(990),
            at(999),
            at(1000)
        );
    }
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

/// A warehouse of `slices` small slices over one core table, with `attempts` refreshes.
async fn populated(dir: &Path, slices: usize, attempts: usize) -> IcePie {
    let w = open(dir).await;
    run(
        &w,
        "CREATE CORE TABLE facts AS SELECT value AS id, value % 100 AS k FROM generate_series(1, 10000)",
    )
    .await;
    let name = |i: usize| format!("d{}.s{}", i / 10, i % 10);
    futures::stream::iter(0..slices)
        .map(|i| {
            let (w, name) = (w.clone(), name(i));
            async move {
                run(
                    &w,
                    &format!(
                        "CREATE SLICE {name} AS SELECT k, count(*) AS n FROM core.facts GROUP BY k"
                    ),
                )
                .await;
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    let more = attempts.saturating_sub(slices);
    futures::stream::iter(0..more)
        .map(|i| {
            let (w, name) = (w.clone(), name(i % slices));
            async move {
                // FULL: with no new data a plain refresh commits nothing, and the slices'
                // histories would not grow.
                w.refresh_full(&name).await.expect("refresh");
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    w
}

/// Process start to first result of a query on slice `d0.s0` of the warehouse in `dir`.
async fn first_result(dir: &Path) {
    one_shot(dir, "SELECT count(*) FROM d0.s0").await;
}

/// Process start to the end of `sql` run by `icepie -c` on the warehouse in `dir`.
async fn one_shot(dir: &Path, sql: &str) {
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_icepie"))
        .args(["-q", "--set", "scheduler=off", "-d"])
        .arg(dir)
        .args(["-c", sql])
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("run icepie");
    assert!(status.success());
}

/// `REFRESH SLICE d0.s0 FULL` (with no new data a plain refresh commits at once), until its
/// record is written: the background write must not slow the other side's next run.
async fn refresh_recorded(w: &IcePie) {
    w.refresh_full("d0.s0").await.expect("refresh");
    w.flush().await;
}

async fn scale(root: &Path) {
    let slices = env_or("ICEPIE_BENCH_SLICES", 1000usize).max(1);
    let attempts = env_or("ICEPIE_BENCH_ATTEMPTS", 10_000usize);
    let fresh_dir = root.join("fresh");
    let big_dir = root.join("big");
    populated(&fresh_dir, 1, 1).await;
    let started = Instant::now();
    populated(&big_dir, slices, attempts).await;
    println!(
        "(built {slices} slices and {attempts} refresh attempts in {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{slices} slices/{attempts} attempts vs fresh warehouse:");
    let (big_dir, fresh_dir) = (big_dir.as_path(), fresh_dir.as_path());
    let (big, fresh) = time_pair(|| first_result(big_dir), || first_result(fresh_dir)).await;
    report("  process start to first result", big, fresh, "fresh", 1.10);
    let (big_w, fresh_w) = (&open(big_dir).await, &open(fresh_dir).await);
    let query = "SELECT sum(n) FROM d0.s0 WHERE k < 50";
    let (big, fresh) = time_pair(
        || async move {
            run(big_w, query).await;
        },
        || async move {
            run(fresh_w, query).await;
        },
    )
    .await;
    report("  slice query", big, fresh, "fresh", 1.10);
    let (big, fresh) = time_pair(|| refresh_recorded(big_w), || refresh_recorded(fresh_w)).await;
    report("  REFRESH SLICE … FULL", big, fresh, "fresh", 1.10);
    let system = "SELECT * FROM system.slices WHERE domain = 'd0' AND name = 's0'";
    let (big, fresh) = time_pair(
        || async move {
            run(big_w, system).await;
        },
        || async move {
            run(fresh_w, system).await;
        },
    )
    .await;
    report("  system.slices WHERE name", big, fresh, "fresh", 1.10);
    whole_listing(root, big_dir, fresh_dir, big_w, fresh_w).await;
}

/// Whole `system.slices` on the big warehouse vs the fresh one: in a new process each time
/// (less process start, measured as `SELECT 1` on an empty warehouse), and warm.
async fn whole_listing(
    root: &Path,
    big_dir: &Path,
    fresh_dir: &Path,
    big_w: &IcePie,
    fresh_w: &IcePie,
) {
    // The first run (a warm-up) reads every slice and saves the view the next processes
    // take up.
    let whole = "SELECT count(*) FROM system.slices";
    let (big, fresh) = time_pair(|| one_shot(big_dir, whole), || one_shot(fresh_dir, whole)).await;
    report(
        "  whole system.slices, new process",
        big,
        fresh,
        "fresh",
        f64::INFINITY,
    );
    let empty = root.join("empty");
    drop(open(&empty).await);
    let start = time(|| one_shot(&empty, "SELECT 1")).await;
    println!(
        "    less process start ({:.1} ms): {:.1} ms (target < 100 ms)",
        start.as_secs_f64() * 1e3,
        big.saturating_sub(start).as_secs_f64() * 1e3
    );
    let (big, fresh) = time_pair(
        || async move {
            run(big_w, whole).await;
        },
        || async move {
            run(fresh_w, whole).await;
        },
    )
    .await;
    report(
        "  whole system.slices, warm",
        big,
        fresh,
        "fresh",
        f64::INFINITY,
    );
    println!("    {:.2} ms (target < 10 ms)", big.as_secs_f64() * 1e3);
}

#[tokio::main]
async fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let on = |s: &str| wanted.is_empty() || wanted.iter().any(|w| w == s);
    let sf: f64 = env_or("ICEPIE_BENCH_SF", 1.0);
    let root = tempfile::tempdir().expect("temporary directory");
    let (src, warehouse, out) = (
        root.path().join("src"),
        root.path().join("warehouse"),
        root.path().join("out"),
    );
    std::fs::create_dir_all(&out).unwrap();
    println!(
        "icepie benchmarks: TPC-H SF {sf}, median of {} runs, {} cores",
        runs(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if ["ingest", "load", "scan", "refresh", "p99"]
        .iter()
        .any(|s| on(s))
    {
        let started = Instant::now();
        generate(&src, sf);
        let w = tpch_warehouse(&warehouse, &src).await;
        println!(
            "(generated and loaded TPC-H in {:.0} s)",
            started.elapsed().as_secs_f64()
        );
        if on("ingest") {
            ingest(&w, &src, &out).await;
        }
        if on("load") {
            load::load(&src, &out).await;
        }
        if on("scan") {
            scan(&w, &warehouse).await;
        }
        if on("refresh") {
            refresh(&w, &warehouse, &out).await;
        }
        if on("p99") {
            p99(&w, &warehouse).await;
        }
    }
    if on("incremental") {
        if !src.exists() {
            generate(&src, sf);
        }
        incremental::incremental(&src, root.path(), sf).await;
    }
    if on("auto") {
        if !src.exists() {
            generate(&src, sf);
        }
        auto::auto(&src, root.path(), sf).await;
    }
    if on("scale") {
        scale(&PathBuf::from(root.path()).join("scale")).await;
    }
    if on("usage") {
        usage::usage(root.path()).await;
    }
    if on("cluster") {
        cluster::cluster(root.path()).await;
    }
    if on("serve") {
        serve::serve(root.path()).await;
    }
}
