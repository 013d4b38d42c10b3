//! Usage recording: what queries read, summed per table and day (`system.usage`) and per
//! column (`system.usage_columns`), across processes, at one write per flush.

use std::sync::Arc;

use icepie::IcePie;
use object_store::local::LocalFileSystem;

use crate::support::{open_unscheduled, rows, run, Access, RecordingStore, TestClock};

/// `core.events` in three loads (three files: ids 1-3, 11-13, 21-23), and slice `regions`.
const SETUP: &str = "
    CREATE CORE TABLE events (id INT, region TEXT, amount DOUBLE);
    INGEST INTO events VALUES (1, 'eu', 1.0), (2, 'us', 7.0), (3, 'eu', 9.0);
    INGEST INTO events VALUES (11, 'eu', 2.0), (12, 'apac', 8.0), (13, 'us', 3.0);
    INGEST INTO events VALUES (21, 'us', 4.0), (22, 'eu', 6.0), (23, 'apac', 5.0);
    CREATE SLICE regions AS SELECT region, sum(amount) AS total FROM core.events GROUP BY region;";

#[tokio::test]
async fn queries_are_recorded_per_table_and_column_and_refreshes_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let w = open_unscheduled(dir.path()).await;
    run(&w, SETUP).await;
    // Building the slice read core.events: that is not usage.
    assert!(rows(&w, "SELECT * FROM system.usage").await.is_empty());

    for _ in 0..3 {
        run(&w, "SELECT * FROM core.events WHERE region = 'eu'").await;
    }
    run(
        &w,
        "SELECT region, count(*) FROM core.events WHERE amount > 5 GROUP BY region",
    )
    .await;
    run(
        &w,
        "SELECT r.total, e.id FROM slices.regions r JOIN core.events e ON r.region = e.region
         WHERE e.id IN (1, 2)",
    )
    .await;
    // Neither a plan that is not run nor a session that turned recording off is usage.
    run(&w, "EXPLAIN SELECT * FROM core.events WHERE id = 1").await;
    run(&w, "SET icepie.usage = off").await;
    run(&w, "SELECT * FROM core.events WHERE id = 1").await;
    run(&w, "SET icepie.usage = on").await;
    w.flush().await;

    assert_eq!(
        rows(
            &w,
            r#"SELECT "table", kind, queries, processes, rows_returned FROM system.usage"#
        )
        .await,
        [
            // 3 × 4 eu rows, 3 groups, 2 joined rows.
            "core.events | core | 5 | 1 | 17",
            "slices.regions | slice | 1 | 1 | 2",
        ]
    );
    assert_eq!(
        rows(
            &w,
            r#"SELECT "table", "column", filters, equality, range, in_list, groups, joins
               FROM system.usage_columns"#
        )
        .await,
        [
            "core.events | amount | 1 | 0 | 1 | 0 | 0 | 0",
            "core.events | id | 1 | 0 | 0 | 1 | 0 | 0",
            "core.events | region | 3 | 3 | 0 | 0 | 1 | 1",
            "slices.regions | region | 0 | 0 | 0 | 0 | 0 | 1",
        ]
    );
    // Every query scanned the 3 files of core.events or skipped them; times were measured.
    assert_eq!(
        rows(
            &w,
            r#"SELECT files_scanned + files_skipped, rows_scanned > 0, bytes_scanned > 0,
                   avg_latency_ms > 0, last_read >= first_read, day = current_date()
               FROM system.usage WHERE "table" = 'core.events'"#
        )
        .await,
        ["15 | true | true | true | true | true"]
    );
}

#[tokio::test]
async fn files_skipped_by_statistics_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let w = open_unscheduled(dir.path()).await;
    run(&w, SETUP).await;
    run(&w, "SELECT * FROM core.events WHERE id = 12").await;
    w.flush().await;
    assert_eq!(
        rows(
            &w,
            r#"SELECT files_scanned, files_skipped, rows_scanned, rows_returned
               FROM system.usage"#
        )
        .await,
        ["1 | 2 | 3 | 1"]
    );
}

#[tokio::test]
async fn usage_is_summed_across_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_unscheduled(dir.path()).await;
    run(&a, SETUP).await;
    let b = open_unscheduled(dir.path()).await;
    for w in [&a, &b, &b] {
        run(w, "SELECT count(*) FROM slices.regions WHERE region = 'eu'").await;
    }
    run(&a, "SELECT id FROM core.events GROUP BY id").await;
    a.flush().await;
    b.flush().await;
    for w in [&a, &b] {
        assert_eq!(
            rows(w, r#"SELECT "table", queries, processes FROM system.usage"#).await,
            ["core.events | 1 | 1", "slices.regions | 3 | 2"]
        );
        assert_eq!(
            rows(
                w,
                r#"SELECT "table", "column", equality, groups FROM system.usage_columns"#
            )
            .await,
            [
                "core.events | id | 0 | 1",
                "slices.regions | region | 3 | 0"
            ]
        );
    }
}

#[tokio::test]
async fn recording_writes_one_file_per_flush_however_many_queries() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RecordingStore::with_usage(Arc::new(LocalFileSystem::new())));
    let w = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_object_store(store.clone())
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    run(&w, SETUP).await;
    let usage = |accesses: Vec<Access>| -> Vec<Access> {
        accesses
            .into_iter()
            .filter(|a| a.path().contains("_system/usage"))
            .collect()
    };
    store.take();
    for i in 0..40 {
        let sql = format!("SELECT * FROM core.events WHERE id = {i}");
        w.sql(&sql).await.unwrap().collect().await.unwrap();
    }
    // The 10-second timer may have written once while the queries ran (and, the first
    // time, listed the usage folder to tidy it); nothing else touched it.
    let usage = |accesses: Vec<Access>| -> Vec<Access> {
        let listed = |a: &Access| matches!(a, Access::List(_));
        usage(accesses).into_iter().filter(|a| !listed(a)).collect()
    };
    let during = usage(store.take());
    w.flush().await;
    let flushed = usage(store.take());
    assert!(during.len() <= 1, "{during:#?}");
    let all: Vec<&Access> = during.iter().chain(&flushed).collect();
    assert!(
        all.iter().all(|a| matches!(a, Access::Write(_))),
        "{all:#?}"
    );
    assert!((1..=2).contains(&all.len()), "{all:#?}");
    assert_eq!(rows(&w, "SELECT queries FROM system.usage").await, ["40"]);
}

#[tokio::test]
async fn a_query_through_a_view_counts_once_and_refreshes_never() {
    let dir = tempfile::tempdir().unwrap();
    let w = open_unscheduled(dir.path()).await;
    run(&w, SETUP).await;
    // An incremental refresh of a partitioned slice plans and runs plans of its own.
    run(
        &w,
        "CREATE SLICE by_region PARTITION BY (region) INCREMENTAL AS
             SELECT region, count(*) AS n FROM core.events GROUP BY region;
         INGEST INTO events VALUES (31, 'eu', 1.0);
         REFRESH SLICE by_region;
         EXPLAIN REFRESH SLICE by_region;
         CREATE SCHEMA scratch;
         CREATE VIEW scratch.big AS SELECT region, total FROM slices.regions WHERE total > 10",
    )
    .await;
    assert!(rows(&w, "SELECT * FROM system.usage").await.is_empty());
    run(&w, "SELECT * FROM scratch.big WHERE region = 'us'").await;
    w.flush().await;
    assert_eq!(
        rows(
            &w,
            r#"SELECT "table", queries, rows_returned FROM system.usage"#
        )
        .await,
        ["slices.regions | 1 | 1"]
    );
    assert_eq!(
        rows(
            &w,
            r#"SELECT "column", equality, range FROM system.usage_columns"#
        )
        .await,
        ["region | 1 | 0", "total | 0 | 1"]
    );
}

#[tokio::test]
async fn a_slice_read_through_another_is_awake_however_system_slices_is_filtered() {
    let clock = TestClock::new();
    let dir = tempfile::tempdir().unwrap();
    let w = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_scheduler(false)
        .with_clock(clock.reader())
        .open()
        .await
        .unwrap();
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE d.base REFRESH AUTO AS SELECT n FROM core.t;
         CREATE SLICE d.top REFRESH AUTO AS SELECT sum(n) AS s FROM d.base;
         SET icepie.cold_after = '30 minutes';",
    )
    .await;
    // Long enough for both to fall asleep; the clock then stands still while top is read
    // and the checks run.
    clock.advance(std::time::Duration::from_secs(45 * 60));
    // Neither read since created: both asleep.
    assert_eq!(
        rows(&w, "SELECT name, state FROM system.slices").await,
        ["base | dormant", "top | dormant"]
    );
    // top is read: it wakes, and keeps base, which its refreshes read, awake; also when
    // system.slices is asked about base alone.
    rows(&w, "SELECT * FROM d.top").await;
    // The read is recorded once the query's stream ends, by the usage task: wait for it.
    w.flush().await;
    assert_eq!(
        rows(&w, "SELECT state FROM system.slices WHERE name = 'base'").await,
        ["fresh"]
    );
    assert_eq!(
        rows(&w, "SELECT name, state FROM system.slices").await,
        ["base | fresh", "top | fresh"]
    );
}
