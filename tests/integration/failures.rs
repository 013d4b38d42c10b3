//! Invariant 2: a refresh that fails commits nothing; the slice keeps serving its last version,
//! `system.slices` shows it `failed` with its error, and no other slice is affected.

use icepie::{IcePie, IcePieError, SliceState};

use crate::support::{fails, run, scalar, table};

async fn open() -> (tempfile::TempDir, IcePie) {
    let dir = tempfile::tempdir().unwrap();
    let warehouse = IcePie::open(dir.path().to_string_lossy().to_string())
        .await
        .unwrap();
    run(
        &warehouse,
        "CREATE CORE TABLE raw (k TEXT, d INT);
         INGEST INTO raw VALUES ('1', 1), ('2', 2);
         CREATE SLICE casted AS SELECT CAST(k AS INT) AS n FROM core.raw;
         CREATE SLICE ratios AS SELECT 10 / d AS r FROM core.raw;
         CREATE SLICE other.total AS SELECT count(*) AS c FROM core.raw;",
    )
    .await;
    (dir, warehouse)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_cast_fails_alone_and_the_last_version_is_served() {
    let (_dir, warehouse) = open().await;
    run(&warehouse, "INGEST INTO raw VALUES ('oops', 3)").await;

    let err = warehouse.refresh("casted").await.unwrap_err();
    assert!(matches!(err, IcePieError::RefreshFailed { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("still serving version 0") && msg.contains("oops"),
        "{msg}"
    );

    // Still version 0, whole.
    assert_eq!(scalar(&warehouse, "SELECT sum(n) FROM casted").await, "3");
    let info = warehouse.slice("casted").await.unwrap();
    assert_eq!((info.state, info.version), (SliceState::Failed, 0));
    assert!(info.last_error.unwrap().contains("oops"));
    assert_eq!(
        scalar(
            &warehouse,
            "SELECT state || ' v' || version FROM system.slices WHERE name = 'casted'"
        )
        .await,
        "failed v0"
    );

    // Another slice over the same input refreshes and serves as usual.
    warehouse.refresh("other.total").await.unwrap();
    assert_eq!(scalar(&warehouse, "SELECT c FROM other.total").await, "3");
    assert_eq!(
        warehouse.slice("other.total").await.unwrap().state,
        SliceState::Fresh
    );

    // The failed attempt and the successful one are both in the log.
    assert_eq!(
        table(
            &warehouse,
            "SELECT slice, kind, status, version FROM system.refreshes \
             WHERE kind = 'refresh' ORDER BY started_at"
        )
        .await,
        "+---------------+---------+---------+---------+\n\
         | slice         | kind    | status  | version |\n\
         +---------------+---------+---------+---------+\n\
         | slices.casted | refresh | failed  |         |\n\
         | other.total   | refresh | success | 1       |\n\
         +---------------+---------+---------+---------+"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn division_by_zero_fails_the_refresh_only() {
    let (_dir, warehouse) = open().await;
    run(&warehouse, "INGEST INTO raw VALUES ('3', 0)").await;
    let msg = warehouse.refresh("ratios").await.unwrap_err().to_string();
    assert!(msg.contains("division by zero"), "{msg}");
    assert_eq!(scalar(&warehouse, "SELECT sum(r) FROM ratios").await, "15");
    // The failed attempt says how it set out to run.
    let failed = scalar(
        &warehouse,
        "SELECT mode || ': ' || reason FROM system.refreshes WHERE status = 'failed'",
    )
    .await;
    assert!(
        failed.starts_with("incremental: ") || failed.starts_with("full: "),
        "{failed}"
    );
    assert_eq!(warehouse.slice("ratios").await.unwrap().version, 0);
    // A later successful refresh clears the failure.
    run(
        &warehouse,
        "CREATE OR REPLACE SLICE ratios AS SELECT 10 / nullif(d, 0) AS r FROM core.raw",
    )
    .await;
    let info = warehouse.slice("ratios").await.unwrap();
    assert_eq!(
        (info.state, info.version, info.last_error),
        (SliceState::Fresh, 1, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_input_or_dropped_column_fails_the_refresh_only() {
    let (_dir, warehouse) = open().await;
    run(
        &warehouse,
        "CREATE SLICE base AS SELECT k, d FROM core.raw;
         CREATE SLICE uses_d AS SELECT d FROM slices.base;
         CREATE SLICE uses_base AS SELECT count(*) AS c FROM slices.base;",
    )
    .await;
    // The input loses column d: uses_d fails, uses_base does not.
    run(
        &warehouse,
        "CREATE OR REPLACE SLICE base AS SELECT k FROM core.raw",
    )
    .await;
    let msg = warehouse.refresh("uses_d").await.unwrap_err().to_string();
    assert!(msg.contains('d'), "{msg}");
    assert_eq!(scalar(&warehouse, "SELECT sum(d) FROM uses_d").await, "3");
    warehouse.refresh("uses_base").await.unwrap();

    // The input disappears: the refresh fails, the slice is still served.
    run(&warehouse, "DROP SLICE base").await;
    let msg = warehouse
        .refresh("uses_base")
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("base"), "{msg}");
    assert_eq!(scalar(&warehouse, "SELECT c FROM uses_base").await, "2");
    assert_eq!(
        warehouse.slice("uses_base").await.unwrap().state,
        SliceState::Failed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_leaves_nothing_and_a_failed_replace_keeps_the_old_slice() {
    let (dir, warehouse) = open().await;
    let msg = fails(
        &warehouse,
        "CREATE SLICE broken AS SELECT CAST('x' AS INT) AS n",
    )
    .await;
    assert!(msg.contains("broken"), "{msg}");
    assert_eq!(
        scalar(
            &warehouse,
            "SELECT count(*) FROM system.slices WHERE name = 'broken'"
        )
        .await,
        "0"
    );
    assert!(!dir.path().join("slices/slices/broken").exists());
    fails(&warehouse, "SELECT * FROM broken").await;

    let before = warehouse.slice("casted").await.unwrap();
    fails(
        &warehouse,
        "CREATE OR REPLACE SLICE casted AS SELECT no_such_column FROM core.raw",
    )
    .await;
    let after = warehouse.slice("casted").await.unwrap();
    assert_eq!(after.descriptor.definition, before.descriptor.definition);
    assert_eq!(after.version, 0);
    assert_eq!(after.state, SliceState::Failed);
    assert_eq!(scalar(&warehouse, "SELECT sum(n) FROM casted").await, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_over_its_memory_budget_fails_alone() {
    let (_dir, w) = crate::support::open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE words AS SELECT value AS id, concat('word-', value) AS word
             FROM generate_series(1, 200000);
         CREATE SLICE vocabulary AS SELECT cardinality(array_agg(word)) AS n FROM core.words;
         CREATE SLICE small AS SELECT count(*) AS n FROM core.words WHERE id < 10;
         CREATE SLICE other.total AS SELECT count(*) AS n FROM core.words;
         INGEST INTO words VALUES (0, 'zero');
         SET icepie.refresh_memory_limit = '2MB';",
    )
    .await;
    // The greedy refresh, another refresh and a query, all at once.
    let (greedy, small, query) = tokio::join!(
        w.refresh("vocabulary"),
        w.refresh("small"),
        scalar(&w, "SELECT count(DISTINCT word) FROM core.words"),
    );
    let err = greedy.unwrap_err();
    let IcePieError::RefreshFailed { source, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(**source, IcePieError::MemoryBudget { .. }),
        "{source}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("memory budget of 2MB") && msg.contains("icepie.refresh_memory_limit"),
        "{msg}"
    );
    assert_eq!(small.unwrap().version, 1);
    assert_eq!(query, "200001");
    // The greedy slice still serves its last version and says why it failed.
    assert_eq!(scalar(&w, "SELECT n FROM vocabulary").await, "200000");
    let info = w.slice("vocabulary").await.unwrap();
    assert_eq!((info.state, info.version), (SliceState::Failed, 0));
    assert!(info.last_error.unwrap().contains("memory budget"));
    assert_eq!(
        w.slice("other.total").await.unwrap().state,
        SliceState::Stale
    );

    // With a budget that fits, the same refresh succeeds.
    run(&w, "SET icepie.refresh_memory_limit = '1GB'").await;
    assert_eq!(w.refresh("vocabulary").await.unwrap().version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_slice_is_reported_and_hides_nothing_else() {
    let (dir, w) = crate::support::open_with(&[("scheduler_tick", "50ms")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE broken AS SELECT n FROM core.t;
         CREATE SLICE healthy REFRESH ON CHANGE AS SELECT sum(n) AS s FROM core.t;",
    )
    .await;
    let log = dir
        .path()
        .join("slices/slices/broken/_delta_log/00000000000000000000.json");
    std::fs::write(log, "{ not json").unwrap();

    assert_eq!(
        table(
            &w,
            "SELECT name, state, version, last_error LIKE 'cannot read the slice: %' AS why \
             FROM system.slices ORDER BY name"
        )
        .await,
        "+---------+--------+---------+------+\n\
         | name    | state  | version | why  |\n\
         +---------+--------+---------+------+\n\
         | broken  | failed |         | true |\n\
         | healthy | fresh  | 0       |      |\n\
         +---------+--------+---------+------+"
    );
    // The scheduler goes on refreshing the healthy slice.
    run(&w, "INGEST INTO t VALUES (2)").await;
    crate::support::eventually(15, "'healthy' refreshed by the scheduler", || async {
        (crate::support::version(&w, "healthy").await == 1).then_some(())
    })
    .await;
    assert_eq!(scalar(&w, "SELECT s FROM healthy").await, "3");
    assert_eq!(w.slices().await.unwrap().len(), 1);
}
