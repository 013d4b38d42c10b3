//! Reader-chosen freshness: `SET icepie.max_staleness` / `icepie.on_stale` and `fresh(...)`.

use icepie::IcePie;

use crate::support::{fails, rows, run, scalar};

/// Slice `s` (the sum of `core.t`), then more data in `core.t`: `s` is stale.
async fn stale_slice() -> (tempfile::TempDir, IcePie) {
    let dir = tempfile::tempdir().unwrap();
    let w = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    run(
        &w,
        "CREATE CORE TABLE t (x BIGINT); INGEST INTO t VALUES (1), (2);
         CREATE SLICE s AS SELECT sum(x) AS total FROM core.t;
         INGEST INTO t VALUES (10);",
    )
    .await;
    // The change is now older than a limit of 0 seconds.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    (dir, w)
}

/// The notices and the rows (or error) of `sql`.
async fn with_notices(w: &IcePie, sql: &str) -> (Result<Vec<String>, String>, Vec<String>) {
    IcePie::with_notices(async {
        let df = w.sql(sql).await.map_err(|e| e.to_string())?;
        let batches = df.collect().await.map_err(|e| e.to_string())?;
        Ok(batches
            .iter()
            .map(|b| {
                datafusion::arrow::util::display::array_value_to_string(b.column(0), 0).unwrap()
            })
            .collect())
    })
    .await
}

#[tokio::test]
async fn a_session_limit_serves_with_a_notice_fails_or_refreshes() {
    let (_dir, w) = stale_slice().await;
    // No limit: the version there is, silently.
    let (got, notices) = with_notices(&w, "SELECT total FROM s").await;
    assert_eq!((got.unwrap(), notices.len()), (vec!["3".to_string()], 0));

    // Within a generous limit: the same.
    run(&w, "SET icepie.max_staleness = '1 hour'").await;
    let (got, notices) = with_notices(&w, "SELECT total FROM s").await;
    assert_eq!((got.unwrap(), notices.len()), (vec!["3".to_string()], 0));

    // Staler than the limit, serve (the default): served, with a notice naming the slice.
    run(&w, "SET icepie.max_staleness = '0 seconds'").await;
    let (got, notices) = with_notices(&w, "SELECT total FROM s").await;
    assert_eq!(got.unwrap(), ["3"]);
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].contains("slice slices.s is") && notices[0].contains("serving version 0"),
        "{notices:?}"
    );

    // fail: an error naming the slice, its lag and the limit; nothing else changes.
    run(&w, "SET icepie.on_stale = 'fail'").await;
    let e = fails(&w, "SELECT total FROM s").await;
    assert!(
        e.contains("slice 'slices.s' is") && e.contains("more than the 0 seconds this read allows"),
        "{e}"
    );
    assert_eq!(scalar(&w, "SELECT version FROM system.slices").await, "0");

    // refresh: refreshed first, then read.
    run(&w, "SET icepie.on_stale = 'refresh'").await;
    let (got, notices) = with_notices(&w, "SELECT total FROM s").await;
    assert_eq!((got.unwrap(), notices.len()), (vec!["13".to_string()], 0));
    assert_eq!(scalar(&w, "SELECT version FROM system.slices").await, "1");

    // Fresh now: even a fail limit of 0 seconds reads it.
    run(&w, "SET icepie.on_stale = 'fail'").await;
    assert_eq!(scalar(&w, "SELECT total FROM s").await, "13");
    // Versions the SQL names are not checked.
    run(&w, "INGEST INTO t VALUES (100)").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(scalar(&w, "SELECT total FROM slice_at('s', 0)").await, "3");
    run(&w, "SET icepie.max_staleness = 'none'").await;
    assert_eq!(scalar(&w, "SELECT total FROM s").await, "13");
}

#[tokio::test]
async fn fresh_limits_one_read() {
    let (_dir, w) = stale_slice().await;
    let e = fails(&w, "SELECT total FROM fresh('s', '0 seconds', 'fail')").await;
    assert!(e.contains("behind its inputs"), "{e}");
    // Without an action, the session's (serve): the old version, with a notice.
    let (got, notices) = with_notices(&w, "SELECT total FROM fresh('s', '0 s')").await;
    assert_eq!((got.unwrap(), notices.len()), (vec!["3".to_string()], 1));
    assert_eq!(
        scalar(
            &w,
            "SELECT total FROM fresh('slices.s', '0 seconds', 'refresh')"
        )
        .await,
        "13"
    );
    assert_eq!(
        scalar(&w, "SELECT total FROM fresh('s', '1 hour', 'fail')").await,
        "13"
    );
    for (sql, says) in [
        (
            "SELECT * FROM fresh('s', 'soon')",
            "'soon' is not a staleness limit",
        ),
        (
            "SELECT * FROM fresh('s', '1 hour', 'wait')",
            "'wait' is not an action",
        ),
        ("SELECT * FROM fresh('s')", "fresh takes a slice name"),
        ("SELECT * FROM fresh('nope', '1 hour')", "nope"),
    ] {
        let e = fails(&w, sql).await;
        assert!(e.contains(says), "{sql}: {e}");
    }
    for (sql, says) in [
        (
            "SET icepie.max_staleness = 'soon'",
            "a duration such as '5 minutes', or none",
        ),
        ("SET icepie.on_stale = 'wait'", "serve, refresh or fail"),
    ] {
        let e = fails(&w, sql).await;
        assert!(e.contains(says), "{sql}: {e}");
    }
}

#[tokio::test]
async fn a_frozen_slice_is_not_refreshed_for_a_reader() {
    let (_dir, w) = stale_slice().await;
    run(&w, "FREEZE SLICE s 'audit'").await;
    run(&w, "SET icepie.max_staleness = '0 seconds'").await;
    run(&w, "SET icepie.on_stale = 'refresh'").await;
    let e = fails(&w, "SELECT total FROM s").await;
    assert!(e.contains("frozen") && e.contains("THAW SLICE"), "{e}");
    assert_eq!(
        rows(&w, "SELECT version, state FROM system.slices").await,
        ["1 | frozen"]
    );
}

#[tokio::test]
async fn views_are_checked_when_read_not_when_created_or_explained() {
    let (_dir, w) = stale_slice().await;
    run(&w, "SET icepie.max_staleness = '0 seconds'").await;
    run(&w, "SET icepie.on_stale = 'fail'").await;
    // Defining or explaining reads nothing now.
    run(&w, "CREATE SCHEMA scratch").await;
    run(&w, "CREATE VIEW scratch.v AS SELECT total FROM s").await;
    run(&w, "EXPLAIN SELECT total FROM scratch.v").await;
    run(&w, "EXPLAIN SELECT * FROM fresh('s', '0 seconds', 'fail')").await;
    // Reading the view reads the slice.
    let e = fails(&w, "SELECT total FROM scratch.v").await;
    assert!(e.contains("slice 'slices.s' is"), "{e}");
    run(&w, "SET icepie.on_stale = 'refresh'").await;
    assert_eq!(scalar(&w, "SELECT total FROM scratch.v").await, "13");
    // A slice cannot be defined over fresh(...).
    let e = fails(
        &w,
        "CREATE SLICE f AS SELECT * FROM fresh('s', '1 hour', 'refresh')",
    )
    .await;
    assert!(e.contains("a definition cannot read fresh(...)"), "{e}");
}
