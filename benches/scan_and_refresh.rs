//! Benchmarks with baselines measured in the same run; prints ratios, asserts nothing.
//!
//! 1. Scanning a slice (full scan, selective filter) vs DataFusion reading the same Parquet
//!    files directly. Target: ratio <= 1.10.
//! 2. Refreshing one slice in a warehouse of 1 slice vs one of 20 slices. Target: <= 1.10.
//!
//! `ICEPIE_BENCH_ROWS` sets the size of the core table (default 2,000,000 rows).

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;
use icepie::IcePie;

const RUNS: usize = 9;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn time<F, Fut>(mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    f().await; // warm-up
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        f().await;
        times.push(start.elapsed());
    }
    median(times)
}

fn report(what: &str, ours: Duration, baseline: Duration, baseline_name: &str) {
    let ratio = ours.as_secs_f64() / baseline.as_secs_f64();
    println!(
        "{what:<28} icepie {:>9.2} ms   {baseline_name} {:>9.2} ms   ratio {ratio:.3} (target <= 1.10){}",
        ours.as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 1e3,
        if ratio <= 1.10 { "" } else { "  ABOVE TARGET" }
    );
}

/// A warehouse without a scheduler: only the statements measured touch storage.
async fn open(dir: &std::path::Path) -> IcePie {
    IcePie::builder(dir.to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .unwrap()
}

async fn rows_of(w: &IcePie, sql: &str) -> usize {
    let batches = w.sql(sql).await.unwrap().collect().await.unwrap();
    batches.iter().map(|b| b.num_rows()).sum()
}

async fn make_core(w: &IcePie, rows: u64) {
    w.sql(&format!(
        "CREATE CORE TABLE facts AS SELECT value AS id, value % 1000 AS k, \
         CAST(value AS DOUBLE) * 0.5 AS v, concat('name-', value % 5000) AS s \
         FROM generate_series(1, {rows})"
    ))
    .await
    .unwrap()
    .collect()
    .await
    .unwrap();
}

async fn scan_bench(rows: u64) {
    let dir = tempfile::tempdir().unwrap();
    let w = open(dir.path()).await;
    make_core(&w, rows).await;
    rows_of(
        &w,
        "CREATE SLICE bench.s AS SELECT * FROM core.facts ORDER BY id",
    )
    .await;

    // The baseline: exactly the slice's current Parquet files, read by DataFusion directly.
    let table = deltalake::open_table(
        url::Url::from_directory_path(dir.path().canonicalize().unwrap().join("slices/bench/s"))
            .unwrap(),
    )
    .await
    .unwrap();
    let urls: Vec<ListingTableUrl> = table
        .get_file_uris()
        .unwrap()
        .map(|u| ListingTableUrl::parse(u).unwrap())
        .collect();
    let ctx = SessionContext::new();
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .infer_schema(&ctx.state())
        .await
        .unwrap();
    ctx.register_table("s", Arc::new(ListingTable::try_new(config).unwrap()))
        .unwrap();

    for (what, query) in [
        (
            "slice scan, full",
            "SELECT count(*), sum(v), max(s) FROM {t}",
        ),
        (
            "slice scan, selective",
            "SELECT count(*), sum(v) FROM {t} WHERE id BETWEEN 1000 AND 1999",
        ),
    ] {
        let ours_sql = query.replace("{t}", "bench.s");
        let base_sql = query.replace("{t}", "s");
        let ours = time(|| {
            let w = w.clone();
            let sql = ours_sql.clone();
            async move {
                rows_of(&w, &sql).await;
            }
        })
        .await;
        let base = time(|| {
            let ctx = ctx.clone();
            let sql = base_sql.clone();
            async move {
                ctx.sql(&sql).await.unwrap().collect().await.unwrap();
            }
        })
        .await;
        report(what, ours, base, "direct parquet");
    }
}

async fn refresh_in_warehouse(rows: u64, slices: usize) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let w = open(dir.path()).await;
    make_core(&w, rows).await;
    for i in 0..slices {
        rows_of(
            &w,
            &format!("CREATE SLICE d{i}.s AS SELECT k, count(*) AS n, sum(v) AS v FROM core.facts GROUP BY k"),
        )
        .await;
    }
    time(|| {
        let w = w.clone();
        async move {
            w.refresh("d0.s").await.unwrap();
        }
    })
    .await
}

#[tokio::main]
async fn main() {
    let rows: u64 = std::env::var("ICEPIE_BENCH_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    println!("icepie benchmarks ({rows} core rows, median of {RUNS} runs)");
    scan_bench(rows).await;
    let one = refresh_in_warehouse(rows, 1).await;
    let twenty = refresh_in_warehouse(rows, 20).await;
    report("refresh, 20 vs 1 slices", twenty, one, "1-slice");
}
