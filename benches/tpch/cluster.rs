//! AUTO clustering: a slice of a few million rows queried with a selective filter on a
//! column it is not ordered by; then, once the recorded usage shows that filter, the next
//! refresh re-clusters it by that column. Files and bytes the query reads (from
//! `system.usage`) and its time, after vs before. Targets: files and bytes at most 1/5, time
//! at most 1/3.

use std::path::Path;

use icepie::IcePie;

use super::{report, run, runs, time};

/// Rows of the slice (`ICEPIE_BENCH_CLUSTER_ROWS`).
fn rows() -> u64 {
    super::env_or("ICEPIE_BENCH_CLUSTER_ROWS", 4_000_000u64)
}

/// The selective query, on a range of 1/2000 of the key's values.
fn query(n: u64, i: u64) -> String {
    let from = (i * 7_777_777) % n;
    format!(
        "SELECT count(*), sum(v) FROM bench.events WHERE k BETWEEN {from} AND {}",
        from + n / 2000
    )
}

/// Files and bytes read by the queries recorded so far.
async fn scanned(w: &IcePie) -> (f64, f64) {
    w.flush().await;
    let batches = w
        .sql("SELECT sum(files_scanned), sum(bytes_scanned), sum(queries) FROM system.usage WHERE \"table\" = 'bench.events'")
        .await
        .expect("system.usage")
        .collect()
        .await
        .expect("system.usage");
    let value = |c: usize| {
        datafusion::arrow::util::display::array_value_to_string(batches[0].column(c), 0)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value(0), value(1))
}

pub async fn cluster(root: &Path) {
    let dir = root.join("cluster");
    let w = IcePie::builder(dir.to_string_lossy().to_string())
        .with_scheduler(false)
        .with_setting("target_file_size", "8MB")
        .open()
        .await
        .expect("open the warehouse");
    let n = rows();
    run(
        &w,
        &format!(
            "CREATE CORE TABLE events AS
                 SELECT value AS id, (value * 7919) % {n} AS k, value * 0.5 AS v,
                        'event ' || value AS label
                 FROM generate_series(1, {n});
             CREATE SLICE bench.events AS SELECT * FROM core.events"
        ),
    )
    .await;
    let phase = |w: &IcePie| {
        let w = w.clone();
        async move {
            let mut i = 0;
            let (files0, bytes0) = scanned(&w).await;
            let took = time(|| {
                i += 1;
                let sql = query(n, i);
                let w = w.clone();
                async move {
                    run(&w, &sql).await;
                }
            })
            .await;
            let (files1, bytes1) = scanned(&w).await;
            let queries = (runs() + 1) as f64;
            (
                took,
                (files1 - files0) / queries,
                (bytes1 - bytes0) / queries,
            )
        }
    };
    let (before, files_before, bytes_before) = phase(&w).await;
    // New data, then the next refresh: AUTO re-clusters by the filtered column.
    run(
        &w,
        "INGEST INTO events VALUES (0, 0, 0.0, 'late'); REFRESH SLICE bench.events",
    )
    .await;
    let layout = w
        .sql(
            "SELECT coalesce(clustered_by, 'none'), files FROM system.slices WHERE name = 'events'",
        )
        .await
        .expect("system.slices")
        .collect()
        .await
        .expect("system.slices");
    println!(
        "(slice of {n} rows re-clustered by {}, {} files)",
        datafusion::arrow::util::display::array_value_to_string(layout[0].column(0), 0)
            .unwrap_or_default(),
        datafusion::arrow::util::display::array_value_to_string(layout[0].column(1), 0)
            .unwrap_or_default(),
    );
    let (after, files_after, bytes_after) = phase(&w).await;
    for (what, after, before) in [
        ("files", files_after, files_before),
        ("MB", bytes_after / 1e6, bytes_before / 1e6),
    ] {
        let ratio = after / before.max(1e-9);
        println!(
            "{:<34} after {after:>9.2} {what:<5} before {before:>9.2} {what:<5} ratio {ratio:>5.2} (target <= 0.20){}",
            format!("cluster: {what} read per query"),
            if ratio <= 0.2 { "" } else { "  ABOVE TARGET" }
        );
    }
    report(
        "cluster: query time, after/before",
        after,
        before,
        "before",
        0.33,
    );
}
