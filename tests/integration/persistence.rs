//! The warehouse is the only source of truth: what one `IcePie` commits survives closing and
//! reopening, and a second handle (or process) on the same location sees it.

use icepie::{IcePie, SliceState};

use crate::support::{run, scalar, table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_string_lossy().to_string();
    {
        let w = IcePie::open(location.clone()).await.unwrap();
        run(
            &w,
            "CREATE CORE TABLE t (k TEXT);
             INGEST INTO t VALUES ('1'), ('2');
             CREATE SLICE fin.s OWNER 'finance' REFRESH EVERY '5 minutes' PARTITION BY (k)
                 AS SELECT k, CAST(k AS INT) AS n FROM core.t;
             INGEST INTO t VALUES ('x');",
        )
        .await;
        w.refresh("fin.s").await.unwrap_err();
    }
    let w = IcePie::open(location).await.unwrap();
    assert_eq!(scalar(&w, "SELECT count(*) FROM core.t").await, "3");
    assert_eq!(scalar(&w, "SELECT sum(n) FROM fin.s").await, "3");
    let info = w.slice("fin.s").await.unwrap();
    assert_eq!(info.state, SliceState::Failed);
    assert_eq!(info.descriptor.owner.as_deref(), Some("finance"));
    assert_eq!(
        info.descriptor.refresh,
        icepie::RefreshPolicy::Every("5 minutes".into())
    );
    assert_eq!(info.descriptor.refresh.to_string(), "every '5 minutes'");
    assert_eq!(info.descriptor.partition_by, vec!["k".to_string()]);
    assert_eq!(
        info.descriptor.definition,
        "SELECT k, CAST(k AS INT) AS n FROM core.t"
    );
    assert_eq!(info.descriptor.inputs[0].table, "core.t");
    assert_eq!(info.descriptor.inputs[0].version, 1);
    assert_eq!(
        table(
            &w,
            "SELECT kind, status FROM system.refreshes ORDER BY started_at"
        )
        .await,
        "+---------+---------+\n\
         | kind    | status  |\n\
         +---------+---------+\n\
         | create  | success |\n\
         | refresh | failed  |\n\
         +---------+---------+"
    );
    assert_eq!(
        table(&w, "SHOW CORE TABLES")
            .await
            .lines()
            .nth(3)
            .unwrap()
            .split('|')
            .nth(1)
            .unwrap()
            .trim(),
        "t"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handles_on_one_location_see_each_others_commits() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_string_lossy().to_string();
    let a = IcePie::open(location.clone()).await.unwrap();
    let b = IcePie::open(location.clone()).await.unwrap();
    run(
        &a,
        "CREATE CORE TABLE t (n INT); INGEST INTO t VALUES (1);
         CREATE SLICE s AS SELECT sum(n) AS total FROM core.t;",
    )
    .await;
    // b never created anything, yet sees the table, the slice and its state.
    assert_eq!(scalar(&b, "SELECT total FROM s").await, "1");
    assert_eq!(
        scalar(&b, "SELECT state FROM system.slices WHERE name = 's'").await,
        "fresh"
    );
    run(&b, "INGEST INTO core.t VALUES (41)").await;
    assert_eq!(
        scalar(&a, "SELECT state FROM system.slices WHERE name = 's'").await,
        "stale"
    );
    b.refresh("s").await.unwrap();
    assert_eq!(scalar(&a, "SELECT total FROM slices.s").await, "42");
    assert_eq!(a.slice("s").await.unwrap().version, 1);

    // A separate process sees the same warehouse.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_icepie"))
        .args([
            "--data",
            &location,
            "--format",
            "csv",
            "-c",
            "SELECT total FROM s",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "total\n42\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezes_and_suspensions_are_kept_in_the_warehouse() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_string_lossy().to_string();
    {
        let a = IcePie::open(location.clone()).await.unwrap();
        run(
            &a,
            "CREATE CORE TABLE t (v TEXT); INGEST INTO t VALUES ('1');
             CREATE SLICE frozen AS SELECT count(*) AS n FROM core.t;
             CREATE SLICE typed AS SELECT CAST(v AS INT) AS n FROM core.t;
             FREEZE SLICE frozen 'month-end close';
             INGEST INTO t VALUES ('x');
             SET icepie.max_failures = 2;",
        )
        .await;
        a.refresh("typed").await.unwrap_err();
        a.refresh("typed").await.unwrap_err();
        assert_eq!(a.slice("typed").await.unwrap().state, SliceState::Suspended);
    }
    // Another handle, as another process would: the freeze holds, with its reason.
    let b = IcePie::builder(location)
        .with_setting("max_failures", "2")
        .open()
        .await
        .unwrap();
    let frozen = b.slice("frozen").await.unwrap();
    assert_eq!(frozen.state, SliceState::Frozen);
    assert_eq!(
        frozen.frozen().unwrap().reason.as_deref(),
        Some("month-end close")
    );
    let err = b.refresh("frozen").await.unwrap_err().to_string();
    assert!(
        err.contains("month-end close") && err.contains("THAW SLICE slices.frozen"),
        "{err}"
    );
    let typed = b.slice("typed").await.unwrap();
    assert_eq!((typed.state, typed.failures), (SliceState::Suspended, 2));
    b.thaw("frozen").await.unwrap();
    assert_eq!(b.refresh("frozen").await.unwrap().version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_dropped_and_created_again_elsewhere_is_read_anew() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_string_lossy().to_string();
    let a = IcePie::open(location.clone()).await.unwrap();
    let b = IcePie::open(location).await.unwrap();
    run(
        &a,
        "CREATE CORE TABLE t (n INT); INGEST INTO t VALUES (1), (2);
         CREATE SLICE s AS SELECT sum(n) AS v FROM core.t;
         REFRESH SLICE s FULL;",
    )
    .await;
    assert_eq!(scalar(&a, "SELECT v FROM s").await, "3");
    // Another handle replaces the slice by a new table whose log starts again at version 0.
    run(
        &b,
        "DROP SLICE s; CREATE SLICE s AS SELECT count(*) * 100 AS v FROM core.t;",
    )
    .await;
    assert_eq!(scalar(&a, "SELECT v FROM s").await, "200");
    assert_eq!(a.slice("s").await.unwrap().version, 0);
    run(&b, "REFRESH SLICE s FULL; REFRESH SLICE s FULL").await;
    assert_eq!(a.slice("s").await.unwrap().version, 2);
}
