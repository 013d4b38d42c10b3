//! Request budgets: what one statement costs in object-store requests, whatever the size of the
//! warehouse and the length of its history. Every request is counted by [`RecordingStore`].
//!
//! `ICEPIE_BUDGET_REFRESHES` sets how many past refreshes the long history has (default 25,
//! past two checkpoints).

use std::sync::Arc;

use icepie::IcePie;
use object_store::local::LocalFileSystem;

use crate::support::{data_files, env_or, run, scalar, Access, RecordingStore};

/// How many files a slice's refresh log grows to before it is compacted (`COMPACT_AT` in
/// `src/slice/log.rs`).
const COMPACT_AT: usize = 32;

async fn open(dir: &std::path::Path) -> (Arc<RecordingStore>, IcePie) {
    open_through(dir, RecordingStore::new(Arc::new(LocalFileSystem::new()))).await
}

/// The warehouse in `dir`, without a scheduler, every request through `store`.
async fn open_through(
    dir: &std::path::Path,
    store: RecordingStore,
) -> (Arc<RecordingStore>, IcePie) {
    let store = Arc::new(store);
    let w = IcePie::builder(dir.to_string_lossy().to_string())
        .with_object_store(store.clone())
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    (store, w)
}

/// The requests `sql` makes, with the result it gives.
async fn cost(store: &RecordingStore, w: &IcePie, sql: &str) -> (String, Vec<Access>) {
    store.take();
    let result = scalar(w, sql).await;
    (result, store.take())
}

/// A warehouse with core table `a` and slice `slices.s1` over it, as `root`.
async fn small(root: &std::path::Path) -> (Arc<RecordingStore>, IcePie) {
    let (store, w) = open(root).await;
    run(
        &w,
        "CREATE CORE TABLE a (id INT, v TEXT); INGEST INTO a VALUES (1, 'x'), (2, 'y');
         CREATE SLICE s1 FULL AS SELECT id, v FROM core.a;",
    )
    .await;
    w.flush().await;
    (store, w)
}

/// `s1` is declared FULL: each refresh replaces its one file. (An incremental refresh adds a
/// file; how many a slice gathers is bounded, see `incremental::appends_never_pile_up_files`.)
///
/// Grows the warehouse of [`small`]: 30 more slices in three domains, and `refreshes` more
/// ingests into `a`, each followed by a refresh of `s1`.
async fn grow(w: &IcePie, refreshes: usize) {
    let mut sql = String::from("CREATE CORE TABLE b (n INT); INGEST INTO b VALUES (1);");
    for d in ["sales", "ops", "finance"] {
        for i in 0..10 {
            sql.push_str(&format!(
                "CREATE SLICE {d}.t{i} AS SELECT n + {i} AS n FROM core.b;"
            ));
        }
    }
    run(w, &sql).await;
    for i in 0..refreshes {
        run(
            w,
            &format!("INGEST INTO a VALUES ({i}, 'z'); REFRESH SLICE s1"),
        )
        .await;
    }
    // Refresh records are written in the background: none may land in a measurement.
    w.flush().await;
}

fn refreshes() -> usize {
    env_or("ICEPIE_BUDGET_REFRESHES", 25)
}

const QUERY: &str = "SELECT sum(id) FROM slices.s1";

/// Opening a warehouse lists two folders (the core, the domains), whether it holds 1 slice
/// or 31 in four domains; a first query then loads its slice by name, listing nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_warehouse_costs_the_same_however_many_slices() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let (_, w) = small(&root).await;
    let (store, _) = open(&root).await;
    let opened_small = store.take();
    grow(&w, 0).await;
    let (store, fresh) = open(&root).await;
    let opened_big = store.take();
    for opened in [&opened_small, &opened_big] {
        assert_eq!(opened.len(), 2, "{opened:#?}");
        assert!(
            opened.iter().all(|a| matches!(a, Access::List(_))),
            "{opened:#?}"
        );
    }
    let (n, first) = cost(&store, &fresh, "SELECT sum(n) FROM sales.t3").await;
    assert_eq!(n, "4");
    for a in &first {
        assert!(
            a.path().contains("slices/sales/t3/") || a.path().contains("_system/quarantine/"),
            "outside the slice: {a:?}"
        );
    }
    // What needs every name lists them all first.
    assert_eq!(
        scalar(
            &fresh,
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'ops'"
        )
        .await,
        "10"
    );
    assert_eq!(
        scalar(&fresh, "SELECT count(*) FROM system.slices").await,
        "31"
    );
}

/// A query on a slice a process has read before costs one listing of the slice's log (is
/// there a newer commit?), one GET of its quarantine record and the reads of its data file:
/// the same with 1 slice or 31, with 0 past refreshes or many. A first query in a new process
/// reads the latest checkpoint and the commits after it (at most 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_on_one_slice_costs_the_same_however_big_the_warehouse_and_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let (store, w) = small(&root).await;
    scalar(&w, QUERY).await;
    let (_, before) = cost(&store, &w, QUERY).await;
    let lists = |a: &[Access]| a.iter().filter(|a| matches!(a, Access::List(_))).count();
    let data = |a: &[Access]| a.iter().filter(|a| a.path().ends_with(".parquet")).count();
    assert_eq!(lists(&before), 1, "{before:#?}");
    assert_eq!(
        before.len(),
        2 + data(&before),
        "one listing, one quarantine record, data: {before:#?}"
    );

    let n = refreshes();
    grow(&w, n).await;
    // The first query after the refreshes reads the commits it has not seen, then the
    // slice costs what it cost before.
    let (sum, _) = cost(&store, &w, QUERY).await;
    assert_eq!(sum, (3 + (0..n as i64).sum::<i64>()).to_string());
    let (_, after) = cost(&store, &w, QUERY).await;
    assert_eq!(lists(&after), 1, "{after:#?}");
    assert_eq!(after.len(), before.len(), "{before:#?}\n{after:#?}");

    // A new process: the latest checkpoint, the commits after it (each read up to three
    // times by delta-rs), the quarantine record and the data.
    let (fresh_store, fresh) = open(&root).await;
    let (_, cold) = cost(&fresh_store, &fresh, QUERY).await;
    let commits = cold
        .iter()
        .filter(|a| a.path().ends_with(".json") && a.path().contains("/_delta_log/"))
        .count();
    assert!(commits <= 3 * 10, "{commits} commit reads: {cold:#?}");
    assert!(cold.len() <= 4 + 3 * 10 + data(&cold), "{cold:#?}");
    for a in &cold {
        assert!(
            a.path().contains("slices/slices/s1/") || a.path().contains("_system/quarantine/"),
            "outside the slice: {a:?}"
        );
    }
}

/// Refreshes `s1` and waits for its row in the refresh log, written in the background.
async fn refresh_s1(w: &IcePie) {
    run(w, "REFRESH SLICE s1").await;
    w.flush().await;
}

/// `REFRESH SLICE s` costs the same with 1 slice or 31: it touches s's folders, its inputs,
/// its refresh log and its attempt markers, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_costs_the_same_however_many_other_slices() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let (store, w) = small(&root).await;
    refresh_s1(&w).await;
    store.take();
    refresh_s1(&w).await;
    let before = store.take();
    grow(&w, 0).await;
    refresh_s1(&w).await;
    store.take();
    refresh_s1(&w).await;
    let after = store.take();
    assert_eq!(before.len(), after.len(), "{before:#?}\n{after:#?}");
    for a in &after {
        let p = a.path();
        assert!(
            [
                "slices/slices/s1/",
                "core/a/",
                "_system/refreshes/slices/s1/",
                "_system/running/slices/s1",
                // The change journal's entries: one per commit, named after its table.
                "_system/changes/",
            ]
            .iter()
            .any(|own| p.contains(own)),
            "outside s1, its input and its records: {a:?}"
        );
    }
}

/// The requests of `sql` that touch anything of another slice than `slices.s1` (or of
/// another core table than `a`).
fn outside_s1(accesses: &[Access]) -> Vec<&Access> {
    accesses
        .iter()
        .filter(|a| {
            let p = a.path();
            [
                "slices/sales",
                "slices/ops",
                "slices/finance",
                "core/b",
                "/sales/",
                "/ops/",
                "/finance/",
            ]
            .iter()
            .any(|other| p.contains(other))
        })
        .collect()
}

/// `system.slices WHERE name = 'x'` and `system.refreshes WHERE slice = 'x'` read only x's
/// metadata, and cost the same with 1 slice or 31.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_tables_filtered_to_one_slice_read_only_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let (store, w) = small(&root).await;
    refresh_s1(&w).await;
    let queries = [
        "SELECT state FROM system.slices WHERE domain = 'slices' AND name = 's1'",
        "SELECT count(*) FROM system.refreshes WHERE slice = 'slices.s1'",
        "SELECT count(*) FROM system.refreshes WHERE slice IN ('slices.s1', 'slices.gone')",
        "SELECT rows FROM system.core_tables WHERE name = 'a'",
    ];
    let mut small_costs = Vec::new();
    for q in queries {
        scalar(&w, q).await;
        small_costs.push(cost(&store, &w, q).await);
    }
    grow(&w, 0).await;
    run(&w, "REFRESH SLICE sales.t1; REFRESH SLICE ops.t2").await;
    w.flush().await;
    for (q, (result, before)) in queries.iter().zip(small_costs) {
        scalar(&w, q).await;
        let (again, after) = cost(&store, &w, q).await;
        assert_eq!(result, again, "{q}");
        assert!(outside_s1(&after).is_empty(), "{q}: {after:#?}");
        assert_eq!(before.len(), after.len(), "{q}:\n{before:#?}\n{after:#?}");
    }
    // Without the domain, one listing of the domains finds the slice wherever it is.
    let (state, accesses) = cost(
        &store,
        &w,
        "SELECT domain || '.' || state FROM system.slices WHERE name = 's1'",
    )
    .await;
    assert_eq!(state, "slices.fresh");
    let others: Vec<_> = outside_s1(&accesses)
        .into_iter()
        .filter(|a| !matches!(a, Access::List(p) if p.ends_with("/s1/_delta_log")))
        .collect();
    assert!(others.is_empty(), "{others:#?}");
    // Unfiltered, every slice is there.
    assert_eq!(scalar(&w, "SELECT count(*) FROM system.slices").await, "31");
    assert_eq!(
        scalar(&w, "SELECT count(DISTINCT slice) FROM system.refreshes").await,
        "31"
    );
}

/// A slice's refresh log is compacted as it grows: a new process reads a few files for its
/// whole history, however many attempts it records, and VACUUM deletes the files compactions
/// replaced without losing an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_refresh_history_reads_as_few_files_as_a_short_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let (_, w) = small(&root).await;
    let attempts = 2 * COMPACT_AT + 6;
    for _ in 1..attempts {
        run(&w, "REFRESH SLICE s1").await;
    }
    let history = "SELECT count(*) FROM system.refreshes WHERE slice = 'slices.s1'";
    assert_eq!(scalar(&w, history).await, attempts.to_string());
    w.flush().await;
    let parquet_reads = |a: &[Access]| {
        a.iter()
            .filter(|a| matches!(a, Access::Read(p) if p.contains("_system/refreshes/") && p.ends_with(".parquet")))
            .count()
    };
    let (store, fresh) = open(&root).await;
    let (count, accesses) = cost(&store, &fresh, history).await;
    assert_eq!(count, attempts.to_string());
    assert!(
        parquet_reads(&accesses) < COMPACT_AT,
        "{} files read for {attempts} attempts",
        parquet_reads(&accesses)
    );
    let (state, accesses) = cost(
        &store,
        &fresh,
        "SELECT state FROM system.slices WHERE domain = 'slices' AND name = 's1'",
    )
    .await;
    assert_eq!(state, "fresh");
    assert!(parquet_reads(&accesses) < COMPACT_AT, "{accesses:#?}");

    let files = |rel: &str| {
        data_files(&root.join(rel))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .count()
    };
    let before = files("_system/refreshes/slices/s1");
    assert!(before >= attempts, "{before} files for {attempts} attempts");
    crate::support::let_files_age().await;
    run(
        &fresh,
        "SET icepie.vacuum_enforce_grace = off; SET icepie.vacuum_grace = '0s'; VACUUM SLICE s1",
    )
    .await;
    let after = files("_system/refreshes/slices/s1");
    assert!(after < COMPACT_AT, "{after} files left after VACUUM");
    assert_eq!(scalar(&fresh, history).await, attempts.to_string());
    let (_, w2) = open(&root).await;
    assert_eq!(scalar(&w2, history).await, attempts.to_string());
}

/// A filter skips the files whose Delta statistics rule them out, without opening them: a
/// query on one of three loads reads one data file, of a core table and of a slice alike.
#[tokio::test]
async fn filters_skip_files_by_their_delta_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let (store, w) = open(dir.path()).await;
    run(
        &w,
        "CREATE CORE TABLE t (id BIGINT, day DATE, v TEXT);
         INGEST INTO t SELECT value AS id, DATE '2024-01-01' AS day, 'a' AS v FROM generate_series(1, 100);
         INGEST INTO t SELECT value AS id, DATE '2024-02-01' AS day, 'b' AS v FROM generate_series(101, 200);
         INGEST INTO t SELECT value AS id, DATE '2024-03-01' AS day, 'c' AS v FROM generate_series(201, 300);
         CREATE SLICE s AS SELECT * FROM core.t;
         REFRESH SLICE s;",
    )
    .await;
    let parquet_reads = |accesses: &[Access]| {
        let mut files: Vec<String> = accesses
            .iter()
            .filter_map(|a| match a {
                Access::Read(p) if p.ends_with(".parquet") && !p.contains("_delta_log") => {
                    Some(p.clone())
                }
                _ => None,
            })
            .collect();
        files.sort();
        files.dedup();
        files.len()
    };
    for (sql, expected) in [
        (
            "SELECT count(*) FROM core.t WHERE id BETWEEN 150 AND 160",
            "11",
        ),
        (
            "SELECT count(*) FROM core.t WHERE day = DATE '2024-03-01'",
            "100",
        ),
        ("SELECT max(v) FROM core.t WHERE id < 50", "a"),
    ] {
        let (result, accesses) = cost(&store, &w, sql).await;
        assert_eq!(result, expected, "{sql}");
        assert_eq!(parquet_reads(&accesses), 1, "{sql}: {accesses:#?}");
    }
    // The slice was written in one file: nothing to skip, but nothing wrong either.
    let (result, _) = cost(&store, &w, "SELECT count(*) FROM s WHERE id > 290").await;
    assert_eq!(result, "10");
    // Without a filter every file is read.
    let (result, accesses) = cost(&store, &w, "SELECT count(*), max(v) FROM core.t").await;
    assert_eq!(result, "300");
    assert_eq!(parquet_reads(&accesses), 3);
}

/// `system.slices` over every slice, in a process that never read the warehouse, costs a few
/// requests however many slices there are (`ICEPIE_BUDGET_SLICES`, 40 by default: more than
/// the 16 a listing reads whole): it takes up the view of every slice another process saved,
/// and reads the change journal on from there. Read again with nothing changed, it lists the
/// journal and the leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_every_slice_costs_the_same_however_many_slices() {
    let slices: usize = env_or("ICEPIE_BUDGET_SLICES", 40);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let (_, first) = open(&root).await;
    let mut sql = String::from("CREATE CORE TABLE b (n INT); INGEST INTO b VALUES (1);");
    for i in 0..slices {
        sql.push_str(&format!(
            "CREATE SLICE d{}.s{i} AS SELECT n + {i} AS n FROM core.b;",
            i % 4
        ));
    }
    run(&first, &sql).await;
    first.flush().await;
    // Reads every slice, and saves what it read.
    assert_eq!(
        scalar(&first, "SELECT count(*) FROM system.slices").await,
        slices.to_string()
    );

    let usage_too = RecordingStore::with_usage(Arc::new(LocalFileSystem::new()));
    let (store, w) = open_through(&root, usage_too).await;
    let sql = "SELECT concat(count(*), ' ', sum(version), ' ', \
               count(*) FILTER (WHERE state = 'fresh')) FROM system.slices";
    let (listed, cold) = cost(&store, &w, sql).await;
    assert_eq!(listed, format!("{slices} 0 {slices}"));
    assert!(cold.len() <= 10, "{} requests: {cold:#?}", cold.len());
    assert!(
        cold.iter().all(|a| !a.path().contains("/slices/d")),
        "a slice read: {cold:#?}"
    );
    let (again, warm) = cost(&store, &w, sql).await;
    assert_eq!(again, listed);
    assert!(warm.len() <= 3, "{warm:#?}");
}
