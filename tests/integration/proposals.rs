//! Proposals: each kind drawn from a synthetic workload, applied, dismissed, and applied
//! by the scheduler when `icepie.auto_apply` allows its kind.

use std::time::Duration;

use icepie::IcePie;

use crate::support::{eventually, fails, open_with, open_with_clock, rows, run, scalar, TestClock};

/// Three slices, each the subject of a proposal once read or refreshed as below.
const SLICES: &str = "CREATE CORE TABLE t (k BIGINT, v BIGINT);
     INGEST INTO t SELECT value AS k, value % 10 AS v FROM generate_series(1, 100);
     CREATE SLICE d.unread CLUSTER BY NONE AS SELECT k FROM core.t;
     CREATE SLICE d.filtered CLUSTER BY NONE AS SELECT k, v FROM core.t;
     CREATE SLICE d.busy REFRESH EVERY '1 hour' AS SELECT count(*) AS n FROM core.t;";

/// Filters `d.filtered` on `v` three times.
async fn filter(w: &IcePie) {
    for v in 0..3 {
        let n = scalar(w, &format!("SELECT count(*) FROM d.filtered WHERE v = {v}")).await;
        assert_eq!(n, "10");
    }
    w.flush().await;
}

async fn id(w: &IcePie, kind: &str, target: &str) -> i64 {
    scalar(
        w,
        &format!("SELECT id FROM system.proposals WHERE kind = '{kind}' AND target = '{target}'"),
    )
    .await
    .parse()
    .unwrap()
}

#[tokio::test]
async fn each_kind_of_proposal_is_drawn_from_the_workload_and_applied_or_dismissed() {
    let clock = TestClock::new();
    let (dir, w) = open_with_clock(&[("unread_after", "30 minutes")], &clock).await;
    run(&w, SLICES).await;
    filter(&w).await;
    // Refreshed four times in its first minutes, read never.
    for _ in 0..4 {
        run(&w, "INGEST INTO t VALUES (0, 0); REFRESH SLICE d.busy").await;
    }
    // Beyond `unread_after` (and short of d.busy's next refresh, every hour).
    clock.advance(Duration::from_secs(45 * 60));
    // Read lately: not proposed for freezing.
    filter(&w).await;

    let listed = rows(&w, "SELECT kind, target, statement FROM system.proposals").await;
    assert_eq!(listed.len(), 4, "{listed:#?}");
    // (Rows come sorted.)
    assert_eq!(
        listed[0],
        "freeze | d.busy | FREEZE SLICE d.busy 'unread: proposed by icepie'"
    );
    assert_eq!(
        listed[1],
        "freeze | d.unread | FREEZE SLICE d.unread 'unread: proposed by icepie'"
    );
    assert_eq!(
        listed[2],
        "layout | d.filtered | ALTER SLICE d.filtered SET CLUSTER BY (v)"
    );
    assert_eq!(
        listed[3],
        "schedule | d.busy | ALTER SLICE d.busy SET REFRESH AUTO LAG '1 hour'"
    );
    let evidence = rows(
        &w,
        "SELECT evidence || ' / ' || estimated_saving FROM system.proposals",
    )
    .await;
    assert!(
        evidence.iter().any(|e| e.starts_with(
            "6 queries filtered on 'v' (equality, range or IN) in icepie.usage_retention; it \
             is clustered by none / "
        )),
        "{evidence:#?}"
    );
    assert!(
        evidence
            .iter()
            .any(|e| e.starts_with("refreshed 96.0 times a day (every '1 hour'), read 0.0")),
        "{evidence:#?}"
    );

    // A layout: the slice's descriptor changes now, its data at the next refresh (full).
    let layout = id(&w, "layout", "d.filtered").await;
    run(&w, &format!("APPLY PROPOSAL {layout}")).await;
    assert_eq!(
        scalar(
            &w,
            "SELECT cluster_by FROM system.slices WHERE name = 'filtered'"
        )
        .await,
        "(v)"
    );
    let history = rows(
        &w,
        "SELECT kind FROM slice_history('d.filtered') ORDER BY version DESC LIMIT 1",
    )
    .await;
    assert_eq!(history, ["alter"]);
    run(&w, "REFRESH SLICE d.filtered").await;
    assert_eq!(
        rows(
            &w,
            "SELECT clustered_by, clustering_reason FROM system.slices WHERE name = 'filtered'"
        )
        .await,
        ["v | CLUSTER BY (v)"]
    );

    // A schedule, then a freeze.
    let schedule = id(&w, "schedule", "d.busy").await;
    run(&w, &format!("APPLY PROPOSAL {schedule}")).await;
    assert_eq!(
        scalar(&w, "SELECT refresh FROM system.slices WHERE name = 'busy'").await,
        "auto lag '1 hour'"
    );
    let freeze = id(&w, "freeze", "d.busy").await;
    run(&w, &format!("APPLY PROPOSAL {freeze}")).await;
    assert_eq!(
        scalar(&w, "SELECT state FROM system.slices WHERE name = 'busy'").await,
        "frozen"
    );

    // A dismissed proposal stays hidden, in every process; an applied one is gone.
    let unread = id(&w, "freeze", "d.unread").await;
    let said = scalar(&w, &format!("DISMISS PROPOSAL {unread}")).await;
    assert!(said.starts_with(&format!(
        "dismissed proposal {unread}: FREEZE SLICE d.unread"
    )));
    assert_eq!(
        scalar(&w, "SELECT count(*) FROM system.proposals").await,
        "0"
    );
    let other = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_scheduler(false)
        .with_clock(clock.reader())
        .with_setting("unread_after", "30 minutes")
        .open()
        .await
        .unwrap();
    assert_eq!(
        scalar(&other, "SELECT count(*) FROM system.proposals").await,
        "0"
    );
    let e = fails(&w, &format!("APPLY PROPOSAL {layout}")).await;
    assert!(
        e.contains(&format!("no proposal {layout} stands now")),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_applies_the_kinds_auto_apply_allows_and_no_other() {
    let clock = TestClock::new();
    let (_dir, w) = open_with_clock(
        &[
            ("scheduler_tick", "20ms"),
            ("unread_after", "30 minutes"),
            ("auto_apply", "layout"),
        ],
        &clock,
    )
    .await;
    run(&w, SLICES).await;
    filter(&w).await;
    eventually(30, "the layout proposal to be applied", || async {
        let by = scalar(
            &w,
            "SELECT cluster_by FROM system.slices WHERE name = 'filtered'",
        )
        .await;
        (by == "(v)").then_some(())
    })
    .await;
    // The unread slices are proposed for freezing, and left as they are.
    // Beyond `unread_after` (and short of d.busy's next refresh, every hour).
    clock.advance(Duration::from_secs(45 * 60));
    scalar(&w, "SELECT count(*) FROM d.filtered").await;
    assert_eq!(
        rows(&w, "SELECT kind, target FROM system.proposals").await,
        ["freeze | d.busy", "freeze | d.unread"]
    );
    assert_eq!(
        rows(&w, "SELECT state FROM system.slices WHERE state = 'frozen'").await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn alter_slice_checks_what_it_is_given() {
    let (_dir, w) = open_with(&[]).await;
    run(&w, SLICES).await;
    let e = fails(&w, "ALTER SLICE d.filtered SET CLUSTER BY (nope)").await;
    assert!(
        e.contains("CLUSTER BY column 'nope' is not one of the slice's columns"),
        "{e}"
    );
    let e = fails(&w, "ALTER SLICE d.filtered SET OWNER 'x'").await;
    assert!(e.contains("REFRESH … or CLUSTER BY …"), "{e}");
    let e = fails(&w, "ALTER SLICE d.nope SET REFRESH MANUAL").await;
    assert!(e.contains("slice 'd.nope' does not exist"), "{e}");
    // Both clauses at once; the same again commits nothing.
    run(
        &w,
        "ALTER SLICE d.filtered SET REFRESH ON CHANGE, CLUSTER BY AUTO",
    )
    .await;
    let v = scalar(
        &w,
        "SELECT version FROM system.slices WHERE name = 'filtered'",
    )
    .await;
    run(
        &w,
        "ALTER SLICE d.filtered SET CLUSTER BY AUTO REFRESH ON CHANGE",
    )
    .await;
    assert_eq!(
        rows(
            &w,
            "SELECT version || ' ' || refresh || ' ' || cluster_by FROM system.slices
             WHERE name = 'filtered'"
        )
        .await,
        [format!("{v} on change auto")]
    );
}

#[tokio::test]
async fn a_query_shape_run_often_against_the_core_gets_a_slice_of_its_own() {
    let (_dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE orders (day DATE, region TEXT, amount DOUBLE);
         INGEST INTO orders VALUES (DATE '2026-11-01', 'eu', 1.0), (DATE '2026-11-01', 'us', 2.0),
             (DATE '2026-11-02', 'eu', 4.0);",
    )
    .await;
    // The same question for different days: one shape.
    let ask = |times: usize| {
        let w = w.clone();
        async move {
            for i in 0..times {
                let day = 1 + i % 2;
                rows(
                    &w,
                    &format!(
                        "SELECT region, sum(amount) AS total FROM core.orders
                         WHERE day = DATE '2026-11-0{day}' GROUP BY region ORDER BY region"
                    ),
                )
                .await;
            }
            w.flush().await;
        }
    };
    ask(9).await;
    assert_eq!(
        scalar(&w, "SELECT count(*) FROM system.proposals").await,
        "0"
    );
    ask(1).await;
    let definition =
        "SELECT region, sum(amount) AS total, day FROM core.orders GROUP BY region, day";
    assert_eq!(
        rows(&w, "SELECT kind, target, statement FROM system.proposals").await,
        [format!(
            "new_slice | proposed.orders_by_day_region | CREATE SLICE \
             proposed.orders_by_day_region REFRESH AUTO AS {definition}"
        )]
    );
    let evidence = scalar(&w, "SELECT evidence FROM system.proposals").await;
    assert_eq!(
        evidence,
        "10 queries in the last 7 days read only core tables as \
         core.orders(filter_eq:day, group:region)"
    );

    let n = id(&w, "new_slice", "proposed.orders_by_day_region").await;
    run(&w, &format!("APPLY PROPOSAL {n}")).await;
    assert_eq!(
        scalar(
            &w,
            "SELECT total FROM proposed.orders_by_day_region
             WHERE day = DATE '2026-11-01' AND region = 'eu'"
        )
        .await,
        "1.0"
    );
    // The slice exists: the proposal no longer stands.
    assert_eq!(
        scalar(&w, "SELECT count(*) FROM system.proposals").await,
        "0"
    );
}
