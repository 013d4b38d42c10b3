//! Incremental refresh: a slice refreshed from its inputs' new data equals, row for row, the
//! same definition computed in full (invariant 9), and whatever prevents an incremental
//! refresh makes a full one that says why. Aggregates merge the states of the new rows into
//! the states they keep.
//!
//! The property test runs `ICEPIE_INCREMENTAL_CASES` random cases (CI: 8), each a random
//! sequence of appends (empty loads, NULLs, duplicate keys, rows a filter drops) to a fact and
//! a dimension table under every supported definition shape.

use datafusion::arrow::array::RecordBatch;
use icepie::IcePie;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::support::{fails, rows, run, scalar, table};

/// The definitions under test: filters, projections, UNION ALL, inner joins (one side or
/// both changing, a self-join), a slice over a slice, and aggregates (grouped, over a join,
/// and over everything).
const SHAPES: &[(&str, &str)] = &[
    (
        "filtered",
        "SELECT k, v * 2 AS v2, g FROM core.f WHERE v > 1 OR g IS NULL",
    ),
    (
        "unioned",
        "SELECT k, g FROM core.f WHERE k % 3 = 1 UNION ALL SELECT k, name AS g FROM core.d \
         WHERE k > 2",
    ),
    (
        "joined",
        "SELECT f.k, f.v, d.name FROM core.f f JOIN core.d d ON f.k = d.k WHERE f.v >= 0",
    ),
    (
        "self_joined",
        "SELECT a.k, a.g, b.v FROM core.f a JOIN core.f b ON a.k = b.k AND a.g = b.g",
    ),
    ("chained", "SELECT k, v2 FROM filtered WHERE k > 1"),
    (
        "grouped",
        "SELECT g, count(*) AS n, sum(v) AS s, min(k) AS lo, max(v) AS hi, avg(v) AS a, \
         count(v) FILTER (WHERE v > 0) AS pos, bool_or(v > 1) AS big FROM core.f GROUP BY g",
    ),
    (
        "joined_totals",
        "SELECT upper(d.name) AS name, count(*) AS n, sum(f.v) * 2 AS s2 FROM core.f f \
         JOIN core.d d ON f.k = d.k WHERE f.v IS NOT NULL GROUP BY d.name",
    ),
    (
        "overall",
        "SELECT count(*) AS n, sum(k) AS s, approx_distinct(g) AS dg FROM core.f",
    ),
    (
        "self_totals",
        "SELECT a.g, count(*) AS n, sum(b.v) AS s FROM core.f a JOIN core.f b ON a.k = b.k \
         GROUP BY a.g",
    ),
    (
        "holistic",
        "SELECT g, k, median(v) AS m, count(DISTINCT v) AS dv FROM core.f GROUP BY g, k",
    ),
    (
        "parted",
        "SELECT g, count(*) AS n, median(v) AS m, count(DISTINCT k) AS dk FROM core.f GROUP BY g",
    ),
];

/// What `CREATE SLICE` says of a shape before `AS`.
fn clauses(name: &str) -> &'static str {
    match name {
        // Each partition is recomputed where new rows fall: any aggregate works.
        "parted" => "PARTITION BY (g)",
        _ => "",
    }
}

/// One load: which table, and its rows as SQL values.
#[derive(Debug, Clone)]
struct Load {
    fact: bool,
    /// Refresh after this load (the last load always does): loads in between make several
    /// inputs change at once.
    refresh: bool,
    rows: Vec<(Option<i64>, Option<&'static str>, Option<f64>)>,
}

fn load() -> impl Strategy<Value = Load> {
    let key = prop::option::weighted(0.9, 0i64..4);
    let text = prop::option::weighted(0.8, prop::sample::select(vec!["a", "b", "c"]));
    let value = prop::option::weighted(0.8, prop::sample::select(vec![-1.5, 0.0, 2.25, 10.0]));
    (
        any::<bool>(),
        prop::bool::weighted(0.7),
        prop::collection::vec((key, text, value), 0..8),
    )
        .prop_map(|(fact, refresh, rows)| Load {
            fact,
            refresh,
            rows,
        })
}

fn sql_value<T: ToString>(v: &Option<T>, quote: bool) -> String {
    match v {
        None => "NULL".into(),
        Some(v) if quote => format!("'{}'", v.to_string()),
        Some(v) => v.to_string(),
    }
}

/// `INGEST` of one load; an empty load is an append of no rows.
fn ingest(load: &Load) -> String {
    let values: Vec<String> = load
        .rows
        .iter()
        .map(|(k, g, v)| match load.fact {
            true => format!(
                "({}, {}, {})",
                sql_value(k, false),
                sql_value(g, true),
                sql_value(v, false)
            ),
            false => format!("({}, {})", sql_value(k, false), sql_value(g, true)),
        })
        .collect();
    match (load.fact, values.is_empty()) {
        (true, true) => "INGEST INTO core.f SELECT * FROM core.f WHERE false".into(),
        (false, true) => "INGEST INTO core.d SELECT * FROM core.d WHERE false".into(),
        (true, false) => format!(
            "INGEST INTO core.f SELECT CAST(column1 AS BIGINT) AS k, CAST(column2 AS VARCHAR) \
             AS g, CAST(column3 AS DOUBLE) AS v FROM (VALUES {})",
            values.join(", ")
        ),
        (false, false) => format!(
            "INGEST INTO core.d SELECT CAST(column1 AS BIGINT) AS k, CAST(column2 AS VARCHAR) \
             AS name FROM (VALUES {})",
            values.join(", ")
        ),
    }
}

/// The mode of the slice's latest version.
async fn last_mode(w: &IcePie, slice: &str) -> String {
    scalar(
        w,
        &format!("SELECT mode || ': ' || reason FROM slice_history('{slice}') ORDER BY version DESC LIMIT 1"),
    )
    .await
}

async fn new_warehouse(dir: &tempfile::TempDir) -> IcePie {
    let w = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_setting("scheduler", "off")
        .open()
        .await
        .unwrap();
    run(&w, "CREATE CORE TABLE f (k BIGINT, g VARCHAR, v DOUBLE)").await;
    run(&w, "CREATE CORE TABLE d (k BIGINT, name VARCHAR)").await;
    w
}

/// Runs one case: every shape declared INCREMENTAL, refreshed after each load, equals its
/// definition computed from scratch.
async fn check_case(first: Vec<Load>, loads: Vec<Load>) {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    // Slices of many small files, so that aggregates replace the groups the new rows fall in
    // rather than rewrite a slice of one file.
    run(
        &w,
        "SET icepie.target_file_size = 1; SET datafusion.execution.batch_size = 2",
    )
    .await;
    for load in &first {
        run(&w, &ingest(load)).await;
    }
    for (name, definition) in SHAPES {
        let clauses = clauses(name);
        run(
            &w,
            &format!("CREATE SLICE {name} INCREMENTAL {clauses} AS {definition}"),
        )
        .await;
    }
    for (step, load) in loads.iter().enumerate() {
        run(&w, &ingest(load)).await;
        if !load.refresh && step + 1 < loads.len() {
            continue;
        }
        for (name, definition) in SHAPES {
            let refreshed = rows(&w, &format!("REFRESH SLICE {name}")).await;
            // Loads of no rows leave nothing to do: no version is committed.
            if !refreshed[0].contains("nothing to do") {
                let mode = last_mode(&w, name).await;
                assert!(
                    mode.starts_with("incremental"),
                    "{name} after load {step} refreshed {mode}"
                );
            }
            let got = rows(&w, &format!("SELECT * FROM {name}")).await;
            let want = rows(&w, definition).await;
            assert_eq!(
                got,
                want,
                "{name} after loads {first:?} then {:?}: incremental differs from full",
                &loads[..=step]
            );
        }
    }
}

fn cases() -> u32 {
    std::env::var("ICEPIE_INCREMENTAL_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(8)
}

#[test]
fn incremental_equals_full_over_random_appends() {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runner
        .run(
            &(
                prop::collection::vec(load(), 0..3),
                prop::collection::vec(load(), 1..6),
            ),
            |(first, loads)| {
                runtime.block_on(check_case(first, loads));
                Ok(())
            },
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_prevents_an_incremental_refresh_makes_a_full_one_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(&w, "INGEST INTO core.f VALUES (1, 'a', 1.0), (2, 'b', 2.0)").await;
    run(&w, "SET icepie.incremental_max_share = 1").await;
    run(
        &w,
        "CREATE SLICE totals AS SELECT g, sum(v) AS s FROM core.f GROUP BY g",
    )
    .await;
    run(
        &w,
        "CREATE SLICE middle AS SELECT g, median(v) AS m FROM core.f GROUP BY g",
    )
    .await;
    run(
        &w,
        "CREATE SLICE hidden_key AS SELECT upper(g) AS big_g, median(v) AS m FROM core.f \
         GROUP BY g",
    )
    .await;
    run(
        &w,
        "CREATE SLICE recent AS SELECT k FROM core.f WHERE v < random() + 10",
    )
    .await;
    run(&w, "CREATE SLICE plain AS SELECT k, v FROM core.f").await;
    run(&w, "CREATE SLICE always FULL AS SELECT k, v FROM core.f").await;
    run(&w, "INGEST INTO core.f VALUES (3, 'a', 3.0)").await;
    for slice in [
        "totals",
        "middle",
        "hidden_key",
        "recent",
        "plain",
        "always",
    ] {
        run(&w, &format!("REFRESH SLICE {slice}")).await;
    }
    assert_eq!(
        last_mode(&w, "totals").await,
        "incremental: only appends since the previous version (core.f); their aggregate \
         states were merged into the stored ones"
    );
    assert_eq!(
        last_mode(&w, "middle").await,
        "incremental: only appends since the previous version (core.f); the 1 group(s) they \
         fall in were recomputed"
    );
    assert_eq!(
        rows(&w, "SELECT * FROM middle").await,
        rows(&w, "SELECT g, median(v) AS m FROM core.f GROUP BY g").await
    );
    assert_eq!(
        last_mode(&w, "hidden_key").await,
        "full: the definition has an aggregate that keeps no state (median() keeps every \
         value it sees)"
    );
    assert_eq!(
        rows(&w, "SELECT * FROM totals").await,
        rows(&w, "SELECT g, sum(v) AS s FROM core.f GROUP BY g").await
    );
    assert!(last_mode(&w, "recent").await.contains("random()"));
    assert_eq!(
        last_mode(&w, "plain").await,
        "incremental: only appends since the previous version (core.f)"
    );
    assert_eq!(
        last_mode(&w, "always").await,
        "full: the slice is declared FULL"
    );
    run(&w, "REFRESH SLICE plain FULL").await;
    assert_eq!(
        last_mode(&w, "plain").await,
        "full: REFRESH SLICE … FULL asked for it"
    );

    // A version the SQL names never changes: only the latest one is read incrementally.
    let pinned = "SELECT k FROM core.f UNION ALL SELECT k FROM core_at('f', 1)";
    run(&w, &format!("CREATE SLICE pinned AS {pinned}")).await;
    run(&w, "INGEST INTO core.f VALUES (5, 'a', 5.0)").await;
    run(&w, "REFRESH SLICE pinned").await;
    assert!(last_mode(&w, "pinned").await.starts_with("incremental"));
    assert_eq!(
        rows(&w, "SELECT * FROM pinned").await,
        rows(&w, pinned).await
    );
    assert_eq!(rows(&w, "SELECT * FROM pinned").await.len(), 6);

    // AUTO goes full when the new data is a large share of the input.
    run(&w, "SET icepie.incremental_max_share = 0.1").await;
    run(&w, "INGEST INTO core.f VALUES (4, 'c', 4.0)").await;
    run(&w, "REFRESH SLICE plain").await;
    let mode = last_mode(&w, "plain").await;
    assert!(
        mode.contains("more than icepie.incremental_max_share"),
        "{mode}"
    );

    // A slice over a slice that was rewritten (not appended to) goes full.
    run(&w, "SET icepie.incremental_max_share = 1").await;
    run(
        &w,
        "CREATE SLICE over_plain AS SELECT k FROM plain WHERE k > 1",
    )
    .await;
    run(
        &w,
        "CREATE OR REPLACE SLICE plain AS SELECT k, v FROM core.f WHERE k < 4",
    )
    .await;
    run(&w, "REFRESH SLICE over_plain").await;
    let mode = last_mode(&w, "over_plain").await;
    assert!(
        mode.contains("slices.plain changed other than by appends"),
        "{mode}"
    );
    assert_eq!(rows(&w, "SELECT * FROM over_plain").await, ["2", "3"]);

    // A slice declared INCREMENTAL must have a definition that can be.
    let err = fails(
        &w,
        "CREATE SLICE nope INCREMENTAL AS SELECT g, count(*) FROM core.f GROUP BY g \
         ORDER BY g",
    )
    .await;
    assert!(err.contains("declared INCREMENTAL"), "{err}");
    assert!(err.contains("ORDER BY"), "{err}");
    let err = fails(&w, "CREATE SLICE nope INCREMENTAL FULL AS SELECT 1").await;
    assert!(
        err.contains("give one of INCREMENTAL, FULL or AUTO"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_refresh_shows_the_mode_and_what_it_would_read() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(&w, "INGEST INTO core.f VALUES (1, 'a', 1.0), (2, 'b', 2.0)").await;
    run(&w, "INGEST INTO core.d VALUES (1, 'one')").await;
    run(
        &w,
        "CREATE SLICE j INCREMENTAL AS SELECT f.k, d.name FROM core.f f JOIN core.d d ON f.k = d.k",
    )
    .await;
    run(&w, "INGEST INTO core.f VALUES (1, 'c', 5.0)").await;
    let before = scalar(
        &w,
        "SELECT version FROM slice_history('j') ORDER BY version DESC LIMIT 1",
    )
    .await;
    let explained = table(&w, "EXPLAIN REFRESH SLICE j").await;
    // Explaining commits nothing.
    assert_eq!(
        scalar(
            &w,
            "SELECT version FROM slice_history('j') ORDER BY version DESC LIMIT 1"
        )
        .await,
        before
    );
    let lines: Vec<&str> = explained.lines().collect();
    assert!(
        lines[1].contains("mode") && lines[1].contains("from_version"),
        "{explained}"
    );
    // The fact is read from its new file only (one row); the dimension whole.
    let fact = lines
        .iter()
        .find(|l| l.contains("core.f "))
        .expect(&explained);
    let cells: Vec<&str> = fact.split('|').map(str::trim).collect();
    assert_eq!(cells[1], "incremental", "{explained}");
    assert_eq!(&cells[4..8], ["1", "2", "1", "1"], "{explained}");
    let dim = lines
        .iter()
        .find(|l| l.contains("core.d "))
        .expect(&explained);
    let cells: Vec<&str> = dim.split('|').map(str::trim).collect();
    assert_eq!(&cells[4..8], ["", "1", "1", "1"], "{explained}");

    run(&w, "REFRESH SLICE j").await;
    assert_eq!(rows(&w, "SELECT * FROM j").await, ["1 | one", "1 | one"]);
    let history = scalar(
        &w,
        "SELECT read FROM slice_history('j') ORDER BY version DESC LIMIT 1",
    )
    .await;
    assert!(
        history.contains("core.f@1..2: 1 files, 1 rows"),
        "{history}"
    );
}

/// The costs an AUTO slice's refresh predicts from, as its latest descriptor carries them.
async fn costs_of(w: &IcePie, slice: &str) -> icepie::BuildCosts {
    let history = w.history(slice).await.unwrap();
    let latest = history.iter().max_by_key(|h| h.version).unwrap();
    latest.descriptor.clone().unwrap().costs
}

/// An AUTO slice's refresh chooses its mode by the measured costs of its earlier builds: each
/// build's bytes read and time are carried from commit to commit (through freezes, thaws and
/// rollbacks; a new definition starts afresh), and once a build of each mode was measured the
/// reason gives the prediction that decided. (Which mode the figures pick is unit-tested in
/// `slice::incremental::costs`; the `auto` bench measures it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_predicts_both_modes_from_the_costs_of_earlier_builds() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(&w, "INGEST INTO core.f VALUES (1, 'a', 1.0), (2, 'b', 2.0)").await;
    run(
        &w,
        "CREATE SLICE plain AS SELECT k, v FROM core.f; \
         CREATE SLICE declared INCREMENTAL AS SELECT k, v FROM core.f",
    )
    .await;
    // The first build was full, and is carried by the next descriptor with what it read.
    run(&w, "INGEST INTO core.f VALUES (3, 'c', 3.0)").await;
    run(&w, "REFRESH SLICE plain; REFRESH SLICE declared").await;
    let first = last_mode(&w, "plain").await;
    assert_eq!(
        first,
        "incremental: only appends since the previous version (core.f)"
    );
    let costs = costs_of(&w, "plain").await;
    assert_eq!(
        (costs.full.len(), costs.incremental.len()),
        (1, 0),
        "{costs:?}"
    );
    let history = w.history("plain").await.unwrap();
    let created = history.iter().find(|h| h.version == 0).unwrap();
    let read: i64 = created
        .descriptor
        .as_ref()
        .unwrap()
        .built
        .as_ref()
        .unwrap()
        .reads
        .iter()
        .map(|r| r.bytes)
        .sum();
    assert!(read > 0);
    assert_eq!(costs.full[0].bytes, read);
    assert!(costs.full[0].ms >= 0);

    // Both modes measured: the prediction decides, and says so.
    run(&w, "INGEST INTO core.f VALUES (4, 'd', 4.0)").await;
    let explained = table(&w, "EXPLAIN REFRESH SLICE plain").await;
    assert!(explained.contains("AUTO predicted"), "{explained}");
    run(&w, "REFRESH SLICE plain; REFRESH SLICE declared").await;
    let second = last_mode(&w, "plain").await;
    assert!(
        second.contains("AUTO predicted")
            && second.contains("from the last 1 incremental and 1 full builds"),
        "{second}"
    );
    // A slice declared INCREMENTAL does not choose.
    assert!(!last_mode(&w, "declared").await.contains("AUTO"));
    let costs = costs_of(&w, "plain").await;
    assert_eq!(
        (costs.full.len(), costs.incremental.len()),
        (1, 1),
        "{costs:?}"
    );

    // A freeze carries the last build's cost (of either mode: timings decided it), a
    // rollback to the same definition keeps them.
    run(&w, "FREEZE SLICE plain; THAW SLICE plain").await;
    let costs = costs_of(&w, "plain").await;
    let measured = (costs.incremental.len(), costs.full.len());
    assert!(
        measured == (2, 1) || measured == (1, 2),
        "{second}: {costs:?}"
    );
    run(&w, "ROLLBACK SLICE plain TO VERSION 1").await;
    assert_eq!(costs_of(&w, "plain").await, costs);
    run(&w, "REFRESH SLICE plain").await;
    let figures = format!(
        "from the last {} incremental and {} full builds",
        measured.0, measured.1
    );
    assert!(
        last_mode(&w, "plain").await.contains(&figures),
        "{}",
        last_mode(&w, "plain").await
    );
    assert_eq!(
        rows(&w, "SELECT * FROM plain").await,
        rows(&w, "SELECT k, v FROM core.f").await
    );

    // A new definition: costs measured under the old one predict nothing.
    run(&w, "CREATE OR REPLACE SLICE plain AS SELECT k FROM core.f").await;
    assert!(costs_of(&w, "plain").await.is_empty());
    run(
        &w,
        "INGEST INTO core.f VALUES (5, 'e', 5.0); REFRESH SLICE plain",
    )
    .await;
    assert!(!last_mode(&w, "plain").await.contains("AUTO"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_never_pile_up_files() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(&w, "SET icepie.incremental_max_share = 1").await;
    run(&w, "INGEST INTO core.f VALUES (0, 'a', 1.0)").await;
    run(&w, "CREATE SLICE s AS SELECT k, v FROM core.f").await;
    let mut most = 0;
    for i in 1..=40 {
        run(
            &w,
            &format!("INGEST INTO core.f VALUES ({i}, 'a', 1.0); REFRESH SLICE s"),
        )
        .await;
        let files: i64 = scalar(
            &w,
            "SELECT files FROM system.slices WHERE domain = 'slices' AND name = 's'",
        )
        .await
        .parse()
        .unwrap();
        most = most.max(files);
    }
    assert!(most <= 17, "the slice gathered {most} files");
    let compactions = scalar(
        &w,
        "SELECT count(*) FROM slice_history('s') WHERE mode = 'full' \
         AND reason LIKE '%in a row added files%'",
    )
    .await;
    assert_eq!(compactions, "2");
    assert_eq!(scalar(&w, "SELECT count(*) FROM s").await, "41");
}

/// The `remove` actions of a slice's latest commit: the files it replaced.
fn removed_by_last_commit(dir: &tempfile::TempDir, slice: &str) -> usize {
    let log = dir
        .path()
        .join("slices/slices")
        .join(slice)
        .join("_delta_log");
    let last = std::fs::read_dir(&log)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .max()
        .unwrap();
    std::fs::read_to_string(last)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("{\"remove\""))
        .count()
}

/// A warehouse whose slice `totals` is `SELECT g, <aggregates> FROM core.f GROUP BY g` over
/// 200 groups, in files of 8 groups each.
async fn totals_in_many_files(aggregates: &str) -> (tempfile::TempDir, IcePie) {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(
        &w,
        &format!(
            "SET icepie.incremental_max_share = 1; SET icepie.target_file_size = 1; \
             SET datafusion.execution.batch_size = 8;
             INGEST INTO core.f SELECT value AS k, 'g' || CAST(value % 200 AS VARCHAR) AS g, \
             CAST(value AS DOUBLE) AS v FROM generate_series(1, 2000);
             CREATE SLICE totals INCREMENTAL AS SELECT g, {aggregates} FROM core.f GROUP BY g"
        ),
    )
    .await;
    (dir, w)
}

/// The data files of slice `totals`.
async fn files_of_totals(w: &IcePie) -> usize {
    scalar(
        w,
        "SELECT files FROM system.slices WHERE domain = 'slices' AND name = 'totals'",
    )
    .await
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_rewrites_only_the_files_of_the_groups_new_rows_fall_in() {
    let (dir, w) = totals_in_many_files("sum(v) AS s, count(*) AS n, avg(v) AS a").await;
    let before = files_of_totals(&w).await;
    assert!(before >= 10, "{before} files");
    // New rows in two groups, one of them new.
    run(
        &w,
        "INGEST INTO core.f VALUES (5000, 'g7', 1.5), (5001, 'g7', 2.5), (5002, 'new', 4.0); \
         REFRESH SLICE totals",
    )
    .await;
    assert_eq!(
        last_mode(&w, "totals").await,
        "incremental: only appends since the previous version (core.f); their aggregate \
         states were merged into those of the 2 group(s) they fall in, which replaced those \
         groups"
    );
    let definition = "SELECT g, sum(v) AS s, count(*) AS n, avg(v) AS a FROM core.f GROUP BY g";
    assert_eq!(
        rows(&w, "SELECT * FROM totals").await,
        rows(&w, definition).await
    );
    // Only the file that held g7 was replaced; the others were kept.
    assert_eq!(removed_by_last_commit(&dir, "totals"), 1);
    assert!(files_of_totals(&w).await >= before);
    // And again, with NULL group keys among the new rows.
    run(
        &w,
        "INGEST INTO core.f VALUES (5003, NULL, 1.0), (5004, 'g9', 1.0); REFRESH SLICE totals",
    )
    .await;
    assert!(last_mode(&w, "totals").await.contains("2 group(s)"));
    assert_eq!(
        rows(&w, "SELECT * FROM totals").await,
        rows(&w, definition).await
    );
    assert_eq!(removed_by_last_commit(&dir, "totals"), 1);

    // A subquery above the aggregate reads another table: when it changes, every group does,
    // so the slice is merged and rewritten whole. So are float keys (NaN escapes statistics).
    let shares = "SELECT g, sum(v) / (SELECT count(*) FROM core.d) AS per FROM core.f GROUP BY g";
    let by_float = "SELECT v, count(*) AS n FROM core.f GROUP BY v";
    run(
        &w,
        &format!(
            "INGEST INTO core.d VALUES (1, 'x'); \
             CREATE SLICE shares INCREMENTAL AS {shares}; \
             CREATE SLICE by_float INCREMENTAL AS {by_float}; \
             INGEST INTO core.d VALUES (2, 'y'); INGEST INTO core.f VALUES (6000, 'g3', 1.0); \
             REFRESH SLICE shares; REFRESH SLICE by_float"
        ),
    )
    .await;
    for (slice, definition) in [("shares", shares), ("by_float", by_float)] {
        assert!(
            last_mode(&w, slice)
                .await
                .ends_with("merged into the stored ones"),
            "{slice}: {}",
            last_mode(&w, slice).await
        );
        assert_eq!(
            rows(&w, &format!("SELECT * FROM {slice}")).await,
            rows(&w, definition).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_replacements_in_a_row_end_in_a_whole_rewrite_that_compacts() {
    let (dir, w) = totals_in_many_files("count(*) AS n").await;
    // Each load brings a group the slice did not have: each replacement adds a file.
    let limit = 16;
    for i in 1..limit {
        run(
            &w,
            &format!(
                "INGEST INTO core.f VALUES ({}, 'new{i}', 1.0); REFRESH SLICE totals",
                9000 + i
            ),
        )
        .await;
        assert!(
            last_mode(&w, "totals")
                .await
                .ends_with("which replaced those groups"),
            "refresh {i}: {}",
            last_mode(&w, "totals").await
        );
    }
    let piled = files_of_totals(&w).await;
    run(
        &w,
        "INGEST INTO core.f VALUES (9999, 'last', 1.0); REFRESH SLICE totals",
    )
    .await;
    assert_eq!(
        last_mode(&w, "totals").await,
        format!(
            "incremental: only appends since the previous version (core.f); their aggregate \
             states were merged into the stored ones, rewriting the slice whole: {} refreshes \
             in a row replaced groups and may have added files",
            limit - 1
        )
    );
    // Every file was replaced by the rewrite, and the rows are those of the definition.
    assert_eq!(removed_by_last_commit(&dir, "totals"), piled);
    assert_eq!(
        rows(&w, "SELECT * FROM totals").await,
        rows(&w, "SELECT g, count(*) AS n FROM core.f GROUP BY g").await
    );
    // The count starts again: the next refresh replaces groups.
    run(
        &w,
        "INGEST INTO core.f VALUES (10000, 'g1', 1.0); REFRESH SLICE totals",
    )
    .await;
    assert!(last_mode(&w, "totals")
        .await
        .ends_with("which replaced those groups"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_limits_and_outer_joins_refresh_in_full_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    let slices = [
        (
            "numbered",
            "SELECT k, row_number() OVER (ORDER BY k) AS r FROM core.f",
            "a window function, which may number rows differently each run",
        ),
        (
            "top",
            "SELECT k FROM core.f ORDER BY k LIMIT 2",
            "LIMIT, which may pick other rows each run",
        ),
        (
            "named",
            "SELECT f.k, d.name FROM core.f LEFT JOIN core.d ON f.k = d.k",
            "the definition has a Left join over new data, which has no incremental rule yet",
        ),
    ];
    run(
        &w,
        "SET icepie.incremental_max_share = 1; \
         INGEST INTO core.f VALUES (3, 'a', 1.0), (1, 'b', 2.0); \
         INGEST INTO core.d VALUES (1, 'one')",
    )
    .await;
    for (name, sql, _) in slices {
        run(&w, &format!("CREATE SLICE {name} AS {sql}")).await;
    }
    run(
        &w,
        "INGEST INTO core.f VALUES (0, 'c', 3.0), (2, NULL, 4.0); \
         INGEST INTO core.d VALUES (2, 'two')",
    )
    .await;
    for (name, sql, why) in slices {
        run(&w, &format!("REFRESH SLICE {name}")).await;
        let mode = last_mode(&w, name).await;
        assert!(
            mode.starts_with("full: ") && mode.contains(why),
            "{name}: {mode}"
        );
        assert_eq!(
            rows(&w, &format!("SELECT * FROM {name}")).await,
            rows(&w, sql).await,
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_after_a_rollback_reads_from_the_rolled_back_versions_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    let definition = "SELECT g, sum(v) AS s, count(*) AS n FROM core.f WHERE v > 0 GROUP BY g";
    // core.f: version 0 created, 1 to 3 loaded; the slice's versions 0 to 2 read f@1 to f@3.
    run(
        &w,
        &format!(
            "INGEST INTO core.f VALUES (1, 'a', 1.0), (2, 'b', 2.0);
             CREATE SLICE totals INCREMENTAL AS {definition};
             INGEST INTO core.f VALUES (3, 'a', 4.0), (4, 'c', -1.0); REFRESH SLICE totals;
             INGEST INTO core.f VALUES (5, 'c', 8.0), (6, NULL, 16.0); REFRESH SLICE totals;
             ROLLBACK SLICE totals TO VERSION 0"
        ),
    )
    .await;
    assert_eq!(
        rows(&w, "SELECT * FROM totals").await,
        ["a | 1.0 | 1", "b | 2.0 | 1"]
    );
    run(&w, "REFRESH SLICE totals").await;
    assert!(
        last_mode(&w, "totals").await.starts_with("incremental"),
        "{}",
        last_mode(&w, "totals").await
    );
    // Both loads since version 0's input are read, and nothing before them.
    assert_eq!(
        scalar(
            &w,
            "SELECT read FROM slice_history('totals') ORDER BY version DESC LIMIT 1"
        )
        .await
        .split(':')
        .next()
        .unwrap(),
        "core.f@1..3"
    );
    assert_eq!(
        rows(&w, "SELECT * FROM totals").await,
        rows(&w, definition).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_logs_written_before_the_mode_columns_still_read_and_gain_them() {
    use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(&w, "INGEST INTO core.f VALUES (1, 'a', 1.0)").await;
    run(&w, "CREATE SLICE s AS SELECT k FROM core.f").await;
    w.close(std::time::Duration::ZERO).await;
    drop(w);
    // The slice's refresh log as an older icepie wrote it: no mode, reason or read.
    let log = dir.path().join("_system/refreshes/slices/s");
    std::fs::remove_dir_all(&log).unwrap();
    std::fs::create_dir_all(&log).unwrap();
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("slice", DataType::Utf8, false),
        Field::new("attempt_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("started_at", ts, false),
        Field::new("duration_ms", DataType::Int64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("version", DataType::Int64, true),
        Field::new("rows", DataType::Int64, true),
        Field::new("bytes", DataType::Int64, true),
        Field::new("inputs", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
    ]));
    let text = |v: &str| Arc::new(StringArray::from(vec![v])) as ArrayRef;
    let int = |v: i64| Arc::new(Int64Array::from(vec![v])) as ArrayRef;
    let batch = RecordBatch::try_new(
        schema,
        vec![
            text("slices.s"),
            text("old-attempt"),
            text("create"),
            Arc::new(TimestampMicrosecondArray::from(vec![1_000_000]).with_timezone("UTC")),
            int(5),
            text("success"),
            int(0),
            int(1),
            int(100),
            text("core.f@1"),
            Arc::new(StringArray::from(vec![None::<&str>])),
        ],
    )
    .unwrap();
    let url = url::Url::from_directory_path(log.canonicalize().unwrap()).unwrap();
    deltalake::DeltaTable::try_from_url(url)
        .await
        .unwrap()
        .write([batch])
        .await
        .unwrap();

    let w = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_setting("scheduler", "off")
        .open()
        .await
        .unwrap();
    assert_eq!(
        rows(&w, "SELECT attempt_id, mode FROM system.refreshes").await,
        ["old-attempt | NULL"]
    );
    run(&w, "INGEST INTO core.f VALUES (2, 'b', 2.0)").await;
    run(&w, "SET icepie.incremental_max_share = 1").await;
    run(&w, "REFRESH SLICE s").await;
    let logged = rows(&w, "SELECT kind, mode, reason, read FROM system.refreshes").await;
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert_eq!(logged[0], "create | NULL | NULL | NULL");
    assert!(
        logged[1].starts_with(
            "refresh | incremental | only appends since the previous version (core.f) | \
             core.f@1..2: 1 files, 1 rows, "
        ),
        "{logged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_state_stays_hidden_when_delta_rs_reads_the_slice() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(&w, "SET icepie.incremental_max_share = 1").await;
    // A timestamp without a time zone in the slice (not in its input) makes the slice need
    // a Delta reader feature, so it is read through delta-rs rather than as plain Parquet.
    run(&w, "CREATE CORE TABLE e (k BIGINT, at BIGINT)").await;
    run(&w, "INGEST INTO core.e VALUES (1, 1767261600)").await;
    let definition =
        "SELECT k, max(to_timestamp_seconds(at)) AS last, count(*) AS n FROM core.e GROUP BY k";
    run(&w, &format!("CREATE SLICE latest AS {definition}")).await;
    run(&w, "INGEST INTO core.e VALUES (1, 1767348000), (2, NULL)").await;
    run(&w, "REFRESH SLICE latest").await;
    assert!(last_mode(&w, "latest").await.starts_with("incremental"));
    assert_eq!(
        table(&w, "SELECT * FROM latest ORDER BY k")
            .await
            .lines()
            .nth(1)
            .unwrap(),
        "| k | last                | n |",
        "{}",
        table(&w, "SELECT * FROM latest ORDER BY k").await
    );
    assert_eq!(
        rows(&w, "SELECT * FROM latest").await,
        rows(&w, definition).await
    );
    let err = fails(
        &w,
        "CREATE SLICE sneaky AS SELECT k AS __icepie_key_0 FROM core.e",
    )
    .await;
    assert!(err.contains("keeps for its own columns"), "{err}");
}

/// Issue 26: a GROUP BY recomputed group by group (or partition by partition) diffed only the
/// aggregate's input, so a subquery above it (whose table changed) was evaluated for the
/// touched groups only, or, when only the subquery's table changed, not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subquery_above_a_recomputed_group_by_refreshes_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(&w, "SET icepie.incremental_max_share = 1").await;
    run(
        &w,
        "CREATE CORE TABLE orders (id BIGINT, region TEXT, customer BIGINT)",
    )
    .await;
    run(
        &w,
        "INGEST INTO orders SELECT * FROM (VALUES (1,'eu',10),(2,'us',20),(3,'us',30)) \
         AS t(id,region,customer)",
    )
    .await;
    // The reproduction: the share of all customers each region has.
    let share = "SELECT region, count(DISTINCT customer) * 100.0 / (SELECT count(DISTINCT \
                 customer) FROM core.orders) AS pct FROM core.orders GROUP BY region";
    let err = fails(&w, &format!("CREATE SLICE share INCREMENTAL AS {share}")).await;
    assert!(err.contains("declared INCREMENTAL"), "{err}");
    assert!(err.contains("a subquery above its GROUP BY reads"), "{err}");
    run(&w, &format!("CREATE SLICE share AS {share}")).await;
    run(
        &w,
        &format!("CREATE SLICE share_parted PARTITION BY (region) AS {share}"),
    )
    .await;
    // The subquery reads another table than the GROUP BY: only it changes below.
    let of_all = "SELECT g, count(DISTINCT v) * 1.0 / (SELECT count(*) FROM core.d) AS per_d \
                  FROM core.f GROUP BY g";
    run(&w, "INGEST INTO core.f VALUES (1, 'a', 1.0), (2, 'b', 2.0)").await;
    run(&w, "INGEST INTO core.d VALUES (1, 'x')").await;
    run(&w, &format!("CREATE SLICE of_all AS {of_all}")).await;
    // A mergeable aggregate under the same subquery merges its states and rewrites whole.
    let merged = "SELECT g, sum(v) / (SELECT count(*) FROM core.d) AS per_d FROM core.f \
                  GROUP BY g";
    run(&w, &format!("CREATE SLICE merged AS {merged}")).await;

    run(
        &w,
        "INGEST INTO orders SELECT * FROM (VALUES (4,'eu',40)) AS t(id,region,customer)",
    )
    .await;
    run(&w, "INGEST INTO core.d VALUES (2, 'y'), (3, 'z')").await;
    for (slice, definition) in [
        ("share", share),
        ("share_parted", share),
        ("of_all", of_all),
        ("merged", merged),
    ] {
        run(&w, &format!("REFRESH SLICE {slice}")).await;
        assert_eq!(
            rows(&w, &format!("SELECT * FROM {slice}")).await,
            rows(&w, definition).await,
            "{slice}: {}",
            last_mode(&w, slice).await
        );
    }
    for slice in ["share", "share_parted", "of_all"] {
        let mode = last_mode(&w, slice).await;
        assert!(
            mode.starts_with("full") && mode.contains("a subquery above its GROUP BY reads"),
            "{slice}: {mode}"
        );
    }
    assert_eq!(
        rows(&w, "SELECT * FROM share").await,
        ["eu | 50.0", "us | 50.0"]
    );
    // When the subquery's table is unchanged, its groups are still recomputed one by one.
    run(&w, "INGEST INTO core.f VALUES (3, 'a', 7.0)").await;
    run(&w, "REFRESH SLICE of_all").await;
    assert!(
        last_mode(&w, "of_all").await.starts_with("incremental"),
        "{}",
        last_mode(&w, "of_all").await
    );
    assert_eq!(
        rows(&w, "SELECT * FROM of_all").await,
        rows(&w, of_all).await
    );
}

/// Issue 26: holistic aggregates without GROUP BY failed every incremental refresh
/// ("Aggregate requires at least one grouping or aggregate expression"), and the scheduler
/// then suspended the slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holistic_aggregates_without_group_by_refresh_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(&w, "SET icepie.incremental_max_share = 1").await;
    run(&w, "INGEST INTO core.f VALUES (1, 'a', 1.0), (2, 'b', 2.0)").await;
    let definition = "SELECT count(DISTINCT g) AS n, median(v) AS m FROM core.f";
    let err = fails(
        &w,
        &format!("CREATE SLICE whole INCREMENTAL AS {definition}"),
    )
    .await;
    assert!(err.contains("declared INCREMENTAL"), "{err}");
    run(&w, &format!("CREATE SLICE whole AS {definition}")).await;
    for load in ["(3, 'c', 9.0)", "(4, 'a', NULL)"] {
        run(&w, &format!("INGEST INTO core.f VALUES {load}")).await;
        run(&w, "REFRESH SLICE whole").await;
        let mode = last_mode(&w, "whole").await;
        assert!(
            mode.starts_with("full: the definition has an aggregate that keeps no state"),
            "{mode}"
        );
        assert_eq!(
            rows(&w, "SELECT * FROM whole").await,
            rows(&w, definition).await
        );
    }
    assert_eq!(
        scalar(&w, "SELECT state FROM system.slices WHERE name = 'whole'").await,
        "fresh"
    );
}

/// Found by the differential tester: the state of `avg` over a wide decimal is a
/// `Decimal256` sum, which Delta cannot store, so a slice keeping states (AUTO, the default)
/// failed to build where the same definition declared FULL worked. Such a slice keeps no
/// states, and its groups are recomputed where new rows fall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_whose_state_delta_cannot_store_keep_no_state() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(&w, "CREATE CORE TABLE e (k BIGINT, amount DECIMAL(10,2))").await;
    run(
        &w,
        "INGEST INTO core.e VALUES (1, 2.5), (1, 3.25), (2, NULL)",
    )
    .await;
    let definition = "SELECT k, avg(amount * 2) AS a, sum(amount) AS s FROM core.e GROUP BY k";
    run(&w, &format!("CREATE SLICE wide AS {definition}")).await;
    run(&w, "INGEST INTO core.e VALUES (2, 100.75)").await;
    run(&w, "REFRESH SLICE wide").await;
    // Its groups are recomputed one by one, as for aggregates that keep no state.
    assert_eq!(
        last_mode(&w, "wide").await,
        "incremental: only appends since the previous version (core.e); the 1 group(s) they \
         fall in were recomputed"
    );
    assert_eq!(
        rows(&w, "SELECT * FROM wide").await,
        rows(&w, definition).await
    );
}

/// Found by the differential tester: DataFusion's optimizer rewrites the key
/// `coalesce(v, 0.5)` into a `CASE` on a common subexpression shared with the aggregate's
/// argument `v IS NOT NULL`, and the rewritten key no longer knows it is never null; merging
/// the new rows' states with the stored ones then failed every refresh ("Physical input schema
/// should be the same as the one converted from logical input schema").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_null_key_the_optimizer_rewrites_still_merges_its_states() {
    let dir = tempfile::tempdir().unwrap();
    let w = new_warehouse(&dir).await;
    run(
        &w,
        "INGEST INTO core.f VALUES (1, 'a', 1.0), (2, 'b', NULL)",
    )
    .await;
    let definition = "SELECT coalesce(f.v, 0.5) AS k, bool_or(f.v IS NOT NULL) AS seen, \
                      count(*) AS n FROM core.f f GROUP BY coalesce(f.v, 0.5)";
    run(&w, &format!("CREATE SLICE keyed AS {definition}")).await;
    for load in ["(3, 'c', 2.0)", "(4, 'a', NULL), (5, 'd', 1.0)"] {
        run(&w, &format!("INGEST INTO core.f VALUES {load}")).await;
        run(&w, "REFRESH SLICE keyed").await;
        let mode = last_mode(&w, "keyed").await;
        assert!(mode.contains("aggregate states were merged"), "{mode}");
        assert_eq!(
            rows(&w, "SELECT * FROM keyed").await,
            rows(&w, definition).await
        );
    }
}
