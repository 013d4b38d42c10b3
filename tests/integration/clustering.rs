//! Clustering: `CLUSTER BY (cols)`, `NONE`, and `AUTO` chosen from the filters readers use.

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use icepie::IcePie;

use crate::support::{data_files, fails, rows, run, scalar};

async fn open(dir: &std::path::Path, settings: &[(&str, &str)]) -> IcePie {
    let mut b = IcePie::builder(dir.to_string_lossy().to_string()).with_scheduler(false);
    for (k, v) in settings {
        b = b.with_setting(*k, *v);
    }
    b.open().await.unwrap()
}

/// The values of column `column` (BIGINT) in a slice's data files, file by file.
fn values(dir: &std::path::Path, slice: &str, column: &str) -> Vec<Vec<i64>> {
    file_values(data_files(&dir.join("slices/slices").join(slice)), column)
}

/// The values of column `column` (BIGINT) in the files of a slice's latest version.
async fn latest_values(dir: &std::path::Path, slice: &str, column: &str) -> Vec<Vec<i64>> {
    let path = dir
        .join("slices/slices")
        .join(slice)
        .canonicalize()
        .unwrap();
    let url = url::Url::from_directory_path(&path).unwrap();
    let table = deltalake::DeltaTable::try_from_url(url).await.unwrap();
    let files = table
        .snapshot()
        .unwrap()
        .log_data()
        .iter()
        .map(|f| path.join(f.path().as_ref()))
        .collect();
    file_values(files, column)
}

/// The values of column `column` (BIGINT) in `files`, file by file.
fn file_values(files: Vec<std::path::PathBuf>, column: &str) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    for file in files {
        let bytes = bytes::Bytes::from(std::fs::read(&file).unwrap());
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        let mut values = Vec::new();
        for batch in reader {
            let batch = batch.unwrap();
            let c = batch
                .column_by_name(column)
                .unwrap()
                .as_primitive::<Int64Type>();
            values.extend((0..c.len()).map(|i| c.value(i)));
        }
        out.push(values);
    }
    out
}

#[tokio::test]
async fn cluster_by_columns_sorts_full_builds_and_none_keeps_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let w = open(dir.path(), &[]).await;
    run(
        &w,
        "CREATE CORE TABLE t (k BIGINT, v BIGINT);
         INGEST INTO t SELECT (value * 7919) % 1000 AS k, value AS v FROM generate_series(1, 1000);
         CREATE SLICE sorted CLUSTER BY (k) AS SELECT k, v FROM core.t;
         CREATE SLICE plain CLUSTER BY NONE AS SELECT k, v FROM core.t;
         CREATE SLICE auto AS SELECT k, v FROM core.t;",
    )
    .await;
    let files = values(dir.path(), "sorted", "k");
    let sorted = files.concat();
    assert_eq!(sorted.len(), 1000);
    assert!(
        sorted.windows(2).all(|w| w[0] <= w[1]),
        "not sorted by k: {} files, {:?}",
        files.len(),
        &sorted[..20]
    );
    let plain = values(dir.path(), "plain", "v").concat();
    assert!(
        plain.windows(2).all(|w| w[0] <= w[1]),
        "NONE reordered the rows"
    );
    assert_eq!(
        rows(
            &w,
            "SELECT name, cluster_by, coalesce(clustered_by, '-'), clustering_reason
             FROM system.slices"
        )
        .await,
        [
            "auto | auto | - | AUTO: no column filtered on by 3 queries in icepie.usage_retention",
            "plain | none | - | CLUSTER BY NONE",
            "sorted | (k) | k | CLUSTER BY (k)",
        ]
    );
    let e = fails(
        &w,
        "CREATE SLICE bad CLUSTER BY (nope) AS SELECT k FROM core.t",
    )
    .await;
    assert!(
        e.contains("CLUSTER BY column 'nope' is not in the query's output"),
        "{e}"
    );
    let e = fails(&w, "CREATE SLICE bad CLUSTER BY k AS SELECT k FROM core.t").await;
    assert!(
        e.contains("AUTO, NONE or (columns) after CLUSTER BY"),
        "{e}"
    );
}

#[tokio::test]
async fn auto_clusters_by_the_filtered_column_at_the_next_refresh_and_reads_fewer_files() {
    let dir = tempfile::tempdir().unwrap();
    let w = open(dir.path(), &[("target_file_size", "200KB")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (k BIGINT, v BIGINT);
         INGEST INTO t SELECT (value * 7919) % 200000 AS k, value AS v
             FROM generate_series(1, 200000);
         CREATE SLICE s AS SELECT k, v FROM core.t;",
    )
    .await;
    let files: i64 = scalar(&w, "SELECT files FROM system.slices")
        .await
        .parse()
        .unwrap();
    assert!(files >= 5, "{files} files: too few to show skipping");
    let queries = |w: &IcePie| {
        let w = w.clone();
        async move {
            for k in [17, 90_001, 150_000, 199_999] {
                let n = scalar(&w, &format!("SELECT count(*) FROM s WHERE k = {k}")).await;
                assert_eq!(n, "1");
            }
            w.flush().await;
        }
    };
    let scanned = |w: &IcePie| {
        let w = w.clone();
        async move {
            scalar(&w, "SELECT sum(files_scanned) FROM system.usage")
                .await
                .parse::<i64>()
                .unwrap()
        }
    };
    queries(&w).await;
    let before = scanned(&w).await;
    // Every file holds about every range of k: each query read many of them.
    assert!(before >= 2 * files, "{before} files read of {files} × 4");

    // The layout changes at the next refresh, not before; and that refresh is full.
    assert_eq!(
        scalar(&w, "SELECT coalesce(clustered_by, '-') FROM system.slices").await,
        "-"
    );
    run(&w, "INGEST INTO t VALUES (5, 0); REFRESH SLICE s").await;
    assert_eq!(
        rows(
            &w,
            "SELECT clustered_by, clustering_reason FROM system.slices"
        )
        .await,
        ["k | AUTO: the column readers filter on most (4 queries in icepie.usage_retention)"]
    );
    let reason = scalar(
        &w,
        "SELECT mode || ': ' || reason FROM system.refreshes WHERE status = 'success'
         ORDER BY started_at DESC LIMIT 1",
    )
    .await;
    assert!(
        reason.starts_with("full: the clustering changes to (k)"),
        "{reason}"
    );

    queries(&w).await;
    let after = scanned(&w).await - before;
    assert!(
        after <= 4 * 2,
        "{after} files read by 4 queries after clustering"
    );
    assert!(
        before >= 4 * after,
        "{before} files read before, {after} after"
    );
}

/// True when every file is sorted and no two files' ranges overlap.
fn sorted_apart(files: &[Vec<i64>]) -> bool {
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for f in files.iter().filter(|f| !f.is_empty()) {
        if !f.windows(2).all(|w| w[0] <= w[1]) {
            return false;
        }
        ranges.push((f[0], f[f.len() - 1]));
    }
    ranges.sort();
    ranges.windows(2).all(|r| r[0].1 <= r[1].0)
}

#[tokio::test]
async fn clustered_writes_are_sorted_file_by_file_and_incremental_rewrites_stay_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let w = open(dir.path(), &[("target_file_size", "200KB")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (k BIGINT, v BIGINT);
         INGEST INTO t SELECT (value * 7919) % 200000 AS k, value AS v
             FROM generate_series(1, 200000);
         CREATE SLICE s CLUSTER BY (k) AS SELECT k, v FROM core.t;
         CREATE SLICE g CLUSTER BY (g) AS
             SELECT k % 50000 AS g, count(*) AS n, sum(v) AS total FROM core.t GROUP BY k % 50000;",
    )
    .await;
    // Many files, each a range of k of its own: a filter on k reads one of them.
    let files = latest_values(dir.path(), "s", "k").await;
    assert!(files.len() >= 3, "{} files", files.len());
    assert_eq!(files.iter().map(Vec::len).sum::<usize>(), 200_000);
    assert!(sorted_apart(&files), "files overlap or are unsorted");

    // An incremental refresh that merges its groups into the slice writes them sorted too,
    // and the layout it records is still (g).
    run(
        &w,
        "INGEST INTO t VALUES (3, 1), (49999, 2); REFRESH SLICE g",
    )
    .await;
    assert_eq!(
        scalar(
            &w,
            "SELECT mode FROM system.refreshes WHERE slice = 'slices.g'
             ORDER BY started_at DESC LIMIT 1"
        )
        .await,
        "incremental"
    );
    let groups = latest_values(dir.path(), "g", "g").await;
    assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 50_000);
    assert!(sorted_apart(&groups), "merged groups unsorted");
    assert_eq!(
        scalar(
            &w,
            "SELECT clustered_by FROM system.slices WHERE name = 'g'"
        )
        .await,
        "g"
    );
    assert_eq!(scalar(&w, "SELECT n FROM g WHERE g = 3").await, "5");
}

#[tokio::test]
async fn auto_changes_column_only_for_a_clearly_more_filtered_one() {
    let dir = tempfile::tempdir().unwrap();
    let w = open(dir.path(), &[]).await;
    run(
        &w,
        "CREATE CORE TABLE t (k BIGINT, v BIGINT);
         INGEST INTO t SELECT value AS k, value AS v FROM generate_series(1, 100);
         CREATE SLICE s AS SELECT k, v FROM core.t;",
    )
    .await;
    let filter = |column: &'static str, times: usize| {
        let w = w.clone();
        async move {
            for i in 0..times {
                run(&w, &format!("SELECT count(*) FROM s WHERE {column} = {i}")).await;
            }
            w.flush().await;
        }
    };
    let layout = || {
        let w = w.clone();
        async move {
            run(&w, "REFRESH SLICE s FULL").await;
            scalar(
                &w,
                "SELECT clustered_by || ' | ' || clustering_reason FROM system.slices",
            )
            .await
        }
    };
    filter("k", 3).await;
    assert!(layout().await.starts_with("k | AUTO: the column readers"));
    // v overtakes k, but not by twice: the layout stays.
    filter("v", 5).await;
    let kept = layout().await;
    assert!(
        kept.starts_with("k | AUTO: kept (k): 'v' is filtered on by 5 queries and 'k' by 3"),
        "{kept}"
    );
    filter("v", 1).await;
    assert!(layout()
        .await
        .starts_with("v | AUTO: the column readers filter on most (6"));
}
