//! A warehouse that lives for years: old log files gone, refreshes asked for while others run,
//! slices that read pinned versions or each other, scripts of many statements, failed first
//! builds next to other writers. Each test is named after the invariant it guards.

use std::path::Path;
use std::time::Duration;

use icepie::{IcePie, SliceState};

use crate::support::{eventually, fails, open_with, rows, run, scalar};

/// Deletes the commit files of the Delta table at `table` older than `before`, as Delta's
/// log clean-up (or another engine's) does once a checkpoint covers them.
fn expire_commits(table: &Path, before: u64) -> usize {
    let log = table.join("_delta_log");
    let mut deleted = 0;
    for entry in std::fs::read_dir(&log).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(version) = name.strip_suffix(".json") else {
            continue;
        };
        if version.parse::<u64>().is_ok_and(|v| v < before) {
            std::fs::remove_file(entry.path()).unwrap();
            deleted += 1;
        }
    }
    deleted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_stay_readable_once_old_log_files_are_gone() {
    let (dir, w) = open_with(&[
        ("scheduler", "off"),
        ("retain_versions", "2"),
        ("vacuum_enforce_grace", "off"),
        ("vacuum_grace", "0 seconds"),
    ])
    .await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT);
         CREATE SLICE s REFRESH ON CHANGE AS SELECT count(*) AS n FROM core.t;",
    )
    .await;
    // 101 ingests and refreshes: every table passes Delta's checkpoint at version 99.
    let script: String = (1..=101)
        .map(|i| format!("INGEST INTO t VALUES ({i}); REFRESH SLICE s;"))
        .collect();
    run(&w, &script).await;
    let latest = w.slice("s").await.unwrap().version;
    assert_eq!(latest, 101);

    // VACUUM trims the slice's log to what its 2 retained versions need (from the checkpoint
    // at 99 on), and its refresh log
    // to its latest checkpoint; the core's log is trimmed here as another engine would.
    crate::support::let_files_age().await;
    let out = w.vacuum("s").await.unwrap();
    assert!(out.log_files_deleted >= 2 * 99, "{out:?}");
    let first = "_delta_log/00000000000000000000.json";
    assert!(!dir.path().join("slices/slices/s").join(first).exists());
    assert!(!dir
        .path()
        .join("_system/refreshes/slices/s")
        .join(first)
        .exists());
    assert_eq!(expire_commits(&dir.path().join("core/t"), 99), 99);
    w.close(Duration::ZERO).await;
    drop(w);

    // A fresh process: every statement, time travel and the scheduler still work.
    let w = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_setting("scheduler_tick", "100ms")
        .open()
        .await
        .unwrap();
    let info = w.slice("s").await.unwrap();
    assert_eq!((info.version, info.state), (101, SliceState::Fresh));
    assert_eq!(scalar(&w, "SELECT n FROM s").await, "101");
    assert_eq!(scalar(&w, "SELECT n FROM slice_at('s', 100)").await, "100");
    assert_eq!(
        scalar(&w, "SELECT count(*) FROM core_at('t', 100)").await,
        "100"
    );
    let gone = fails(&w, "SELECT count(*) FROM core_at('t', 5)").await;
    assert!(gone.contains("version 5") && gone.contains("log"), "{gone}");
    assert_eq!(
        scalar(&w, "SELECT count(*) FROM system.refreshes").await,
        "102"
    );
    assert_eq!(
        scalar(
            &w,
            "SELECT count(*) FROM slice_history('s') WHERE kind = 'refresh'"
        )
        .await,
        // From the checkpoint the oldest retained version is read from, on.
        "3"
    );
    assert_eq!(
        scalar(&w, "SELECT state FROM system.slices WHERE name = 's'").await,
        "fresh"
    );
    run(&w, "INGEST INTO t VALUES (0)").await;
    eventually(10, "the scheduler to refresh s", || async {
        (w.slice("s").await.unwrap().version == 102).then_some(())
    })
    .await;
    assert_eq!(scalar(&w, "SELECT n FROM s").await, "102");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_asked_after_an_ingest_builds_from_it() {
    let (_dir, w) = open_with(&[("scheduler", "off")]).await;
    slow_slice(&w).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE OR REPLACE SLICE s FULL AS
             SELECT sum(a.k * b.k) AS pairs, (SELECT sum(n) FROM core.t) AS total
             FROM core.big a, core.big b;",
    )
    .await;
    let slow = {
        let w = w.clone();
        // Its inputs have not changed: FULL makes it run (and take long) all the same.
        tokio::spawn(async move { w.refresh_full("s").await })
    };
    eventually(10, "the first refresh to start", || async {
        (w.slice("s").await.unwrap().state == SliceState::Refreshing).then_some(())
    })
    .await;
    // The running refresh has read core.t at version 1 by now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    run(&w, "INGEST INTO t VALUES (2)").await;
    assert!(!slow.is_finished(), "the first refresh must still run");
    let asked_after = w.refresh("s").await.unwrap();
    let first = slow.await.unwrap().unwrap();
    let t_version = |o: &icepie::BuildOutcome| {
        o.inputs
            .iter()
            .find(|i| i.table == "core.t")
            .map(|i| i.version)
    };
    // The running refresh read core.t before the ingest (on a slow machine it may have
    // planned after it); either way the refresh asked after the ingest is a new one that
    // read it.
    assert!(t_version(&first).is_some(), "{first:?}");
    assert_eq!(t_version(&asked_after), Some(2), "{asked_after:?}");
    assert!(
        asked_after.version > first.version,
        "it joined the earlier refresh"
    );
    assert_eq!(scalar(&w, "SELECT total FROM s").await, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_inputs_never_make_a_slice_stale() {
    let (_dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE base AS SELECT sum(n) AS total FROM core.t;
         CREATE SLICE p REFRESH ON CHANGE AS
             SELECT (SELECT count(*) FROM core_at('t', 1)) AS at_one,
                    (SELECT total FROM slice_at('base', 0)) AS base_zero;
         INGEST INTO t VALUES (2); REFRESH SLICE base;",
    )
    .await;
    let p = w.slice("p").await.unwrap();
    assert!(!p.stale, "{p:?}");
    assert_eq!(p.state, SliceState::Fresh);
    assert_eq!(
        scalar(&w, "SELECT inputs FROM system.slices WHERE name = 'p'").await,
        "core.t@1 (pinned), slices.base@0 (pinned)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_that_read_each_other_are_refused_naming_the_cycle() {
    let (_dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE a AS SELECT n FROM core.t;
         CREATE SLICE b AS SELECT n FROM a;
         CREATE SLICE c AS SELECT n FROM b;",
    )
    .await;
    let err = fails(&w, "CREATE OR REPLACE SLICE a AS SELECT n FROM c").await;
    assert!(
        err.contains("slices.a -> slices.c -> slices.b -> slices.a"),
        "{err}"
    );
    let err = fails(&w, "CREATE OR REPLACE SLICE b AS SELECT n FROM b").await;
    assert!(err.contains("cannot read itself"), "{err}");
    // Nothing changed: a still reads the core.
    assert_eq!(w.slice("a").await.unwrap().version, 0);
    assert_eq!(
        scalar(&w, "SELECT inputs FROM system.slices WHERE name = 'a'").await,
        "core.t@1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_of_a_text_runs_in_order() {
    let (_dir, w) = open_with(&[("scheduler", "off")]).await;
    let elsewhere = tempfile::tempdir().unwrap();
    let out = elsewhere.path().join("out.csv");
    let sql = format!(
        "CREATE SCHEMA scratch;
         CREATE TABLE scratch.x (n BIGINT);
         INSERT INTO scratch.x VALUES (1);
         COPY (SELECT 7 AS seven) TO '{}' STORED AS CSV;
         INSERT INTO scratch.x VALUES (2);
         SELECT count(*) FROM scratch.x",
        out.display()
    );
    assert_eq!(scalar(&w, &sql).await, "2");
    assert!(std::fs::read_to_string(&out).unwrap().contains('7'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_build_deletes_only_its_own_files() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (s TEXT); INGEST INTO t VALUES ('1'), ('x');",
    )
    .await;
    // Another process writing the same names at this moment has files there already.
    let theirs = [
        dir.path()
            .join("slices/slices/s/part-other-process.parquet"),
        dir.path().join("core/c/part-other-process.parquet"),
    ];
    for file in &theirs {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, b"another writer's data").unwrap();
    }
    let err = fails(
        &w,
        "CREATE SLICE s AS SELECT CAST(s AS INT) AS n FROM core.t",
    )
    .await;
    assert!(err.contains("nothing was committed"), "{err}");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "n\n1\nnot a number\n").unwrap();
    let err = fails(
        &w,
        &format!("CREATE CORE TABLE c (n BIGINT) FROM '{}'", bad.display()),
    )
    .await;
    assert!(!err.is_empty());
    for file in &theirs {
        assert!(file.exists(), "{} was deleted", file.display());
    }
    // Neither failed build left a table behind.
    assert!(fails(&w, "SELECT * FROM s").await.contains("not found"));
    assert!(!dir.path().join("core/c/_delta_log").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_into_the_warehouse_is_refused() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1)",
    )
    .await;
    for target in [
        dir.path().join("core/t/extra.parquet"),
        dir.path().join("elsewhere/../slices/x.csv"),
    ] {
        let err = fails(
            &w,
            &format!("COPY (SELECT 1 AS n) TO '{}'", target.display()),
        )
        .await;
        assert!(err.contains("inside the warehouse"), "{err}");
    }
    assert!(!dir.path().join("core/t/extra.parquet").exists());
    let outside = tempfile::tempdir().unwrap();
    let ok = outside.path().join("n.csv");
    run(
        &w,
        &format!("COPY (SELECT n FROM core.t) TO '{}'", ok.display()),
    )
    .await;
    assert!(ok.exists());
}

/// The guard judges where DataFusion will write, not the text: `file:` without `//` is the
/// local root, and a link leads where it points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_into_the_warehouse_is_refused_however_spelt() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1)",
    )
    .await;
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let mut targets = vec![
        format!("file:{}/core/t/a.csv", root.display()),
        format!("file://{}/elsewhere/%2e%2e/core/t/b.csv", root.display()),
        format!("FILE://localhost{}/core/t/c.csv", root.display()),
    ];
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.join("core"), outside.path().join("link")).unwrap();
        targets.push(format!("{}/link/t/d.csv", outside.path().display()));
    }
    for target in targets {
        let err = fails(&w, &format!("COPY (SELECT 1 AS n) TO '{target}'")).await;
        assert!(err.contains("inside the warehouse"), "{target}: {err}");
    }
    for name in ["a.csv", "b.csv", "c.csv", "d.csv"] {
        assert!(!root.join("core/t").join(name).exists(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_replaces_never_suspend_a_slice() {
    let (_dir, w) = open_with(&[("scheduler", "off"), ("max_failures", "2")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s AS SELECT n FROM core.t;",
    )
    .await;
    for _ in 0..3 {
        fails(&w, "CREATE OR REPLACE SLICE s AS SELECT nope FROM core.t").await;
    }
    let info = w.slice("s").await.unwrap();
    assert_eq!(info.state, SliceState::Failed, "{info:?}");
    assert_eq!(info.failures, 0);
    assert!(info.last_error.unwrap().contains("nope"));
    // THAW clears the failed state.
    run(&w, "FREEZE SLICE s; THAW SLICE s").await;
    assert_eq!(w.slice("s").await.unwrap().state, SliceState::Fresh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scratch_schema_never_shadows_a_domain() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SCHEMA web; CREATE TABLE web.tmp AS SELECT 1 AS n;",
    )
    .await;
    let err = fails(&w, "CREATE SLICE web.clicks AS SELECT n FROM core.t").await;
    assert!(err.contains("scratch schema"), "{err}");
    // Another process makes the domain: this session sees the slices, not its scratch table.
    let other = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    run(
        &other,
        "CREATE SLICE web.visits AS SELECT n + 1 AS m FROM core.t",
    )
    .await;
    assert_eq!(scalar(&w, "SELECT m FROM web.visits").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_core_table_is_not_blocked_by_a_damaged_slice() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); CREATE CORE TABLE u (n BIGINT);
         INGEST INTO u VALUES (1);
         CREATE SLICE damaged AS SELECT n FROM core.u;
         CREATE SLICE reader AS SELECT n FROM core.u;",
    )
    .await;
    let log = dir
        .path()
        .join("slices/slices/damaged/_delta_log/00000000000000000000.json");
    std::fs::write(&log, b"garbage").unwrap();
    run(&w, "DROP CORE TABLE t").await;
    let err = fails(&w, "DROP CORE TABLE u").await;
    assert!(err.contains("slices.reader"), "{err}");
}

/// A core table and a slice whose refresh takes a second or so: a cross join of 12,000 x
/// 12,000 rows (summed, not counted: a count would be answered from statistics).
pub(crate) async fn slow_slice(w: &IcePie) {
    run(
        w,
        "CREATE CORE TABLE big (k BIGINT);
         INGEST INTO big SELECT value AS k FROM generate_series(1, 12000);
         CREATE SLICE s FULL AS SELECT sum(a.k * b.k) AS pairs FROM core.big a, core.big b;",
    )
    .await;
}

/// Starts a refresh of the slow slice `s` and waits until `system.refreshes` shows it running.
pub(crate) async fn refresh_running(
    w: &IcePie,
) -> tokio::task::JoinHandle<icepie::Result<icepie::BuildOutcome>> {
    slow_slice(w).await;
    let running = {
        let w = w.clone();
        // Its inputs have not changed: FULL makes it run (and take long) all the same.
        tokio::spawn(async move { w.refresh_full("s").await })
    };
    eventually(10, "the refresh to show as running", || async {
        (statuses(w, "slices.s").await == "success,running").then_some(())
    })
    .await;
    running
}

/// `status` of every attempt of `slice` in `system.refreshes`, oldest first.
pub(crate) async fn statuses(w: &IcePie, slice: &str) -> String {
    scalar(
        w,
        &format!(
            "SELECT coalesce(string_agg(status, ',' ORDER BY started_at), '') \
             FROM system.refreshes WHERE slice = '{slice}'"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_refresh_is_recorded_as_cancelled() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    // While it runs, every process sees it.
    let running = refresh_running(&w).await;
    running.abort();
    eventually(10, "the refresh to be recorded as cancelled", || async {
        (statuses(&w, "slices.s").await == "success,cancelled").then_some(())
    })
    .await;
    assert_eq!(w.slice("s").await.unwrap().version, 0);
    let markers = dir.path().join("_system/running/slices/s");
    eventually(5, "the marker to go", || async {
        (std::fs::read_dir(&markers).map_or(0, |d| d.count()) == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_refresh_shows_as_abandoned() {
    let (dir, w) = open_with(&[("scheduler", "off"), ("heartbeat", "100ms")]).await;
    slow_slice(&w).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_icepie"))
        .args(["--data", &dir.path().to_string_lossy(), "-q"])
        .args(["--set", "heartbeat=100ms", "-c", "REFRESH SLICE s FULL"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(20, "the child's refresh to show as running", || async {
        (statuses(&w, "slices.s").await == "success,running").then_some(())
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    // Six heartbeats later, it is abandoned, in every process.
    eventually(10, "the refresh to show as abandoned", || async {
        (statuses(&w, "slices.s").await == "success,abandoned").then_some(())
    })
    .await;
    assert_eq!(w.slice("s").await.unwrap().version, 0);
    // The next refresh records it for good and goes on.
    assert_eq!(w.refresh_full("s").await.unwrap().version, 1);
    assert_eq!(statuses(&w, "slices.s").await, "success,abandoned,success");
    let error = scalar(
        &w,
        "SELECT error FROM system.refreshes WHERE status = 'abandoned'",
    )
    .await;
    assert!(error.contains("stopped renewing"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_never_deletes_files_a_running_refresh_may_commit() {
    let (dir, w) = open_with(&[
        ("scheduler", "off"),
        ("vacuum_enforce_grace", "off"),
        ("vacuum_grace", "0 seconds"),
    ])
    .await;
    let running = refresh_running(&w).await;
    // A file the running refresh has written and not yet committed.
    let in_flight = dir.path().join("slices/slices/s/part-in-flight.parquet");
    std::fs::write(&in_flight, b"written by the running refresh").unwrap();
    let out = w.vacuum("s").await.unwrap();
    assert_eq!(out.files_deleted, 0, "{out:?}");
    assert!(in_flight.exists());
    assert_eq!(running.await.unwrap().unwrap().version, 1);
    // Once it has ended, what it left unreferenced goes.
    crate::support::let_files_age().await;
    let out = w.vacuum("s").await.unwrap();
    assert!(!in_flight.exists(), "{out:?}");
}

/// The data files (not the log) of the Delta table at `table`.
fn parquet_files(table: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(table)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_slice_is_quarantined_alone_and_healed_by_refresh() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1), (2), (3);
         CREATE SLICE a AS SELECT n FROM core.t;
         CREATE SLICE b AS SELECT n * 10 AS m FROM core.t;",
    )
    .await;
    // Truncate a's only file, as a failing disk or a half-finished copy would.
    let a_dir = dir.path().join("slices/slices/a");
    let [file] = parquet_files(&a_dir).try_into().unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let name = file.file_name().unwrap().to_string_lossy().to_string();

    let err = fails(&w, "SELECT sum(n) FROM a").await;
    assert!(
        err.contains("slice 'slices.a' is damaged") && err.contains(&name),
        "{err}"
    );
    assert!(err.contains("REFRESH SLICE slices.a"), "{err}");
    // Quarantined, in every process; every other slice answers.
    let info = w.slice("a").await.unwrap();
    assert_eq!(info.state, SliceState::Quarantined);
    assert!(info.last_error.unwrap().contains(&name));
    assert_eq!(scalar(&w, "SELECT sum(m) FROM b").await, "60");
    let other = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    let err = fails(&other, "SELECT * FROM a").await;
    assert!(err.contains("quarantined"), "{err}");
    assert_eq!(
        scalar(&other, "SELECT state FROM system.slices WHERE name = 'a'").await,
        "quarantined"
    );

    // VERIFY names the file and what is wrong with it.
    let verified = w.verify("a").await.unwrap();
    assert_eq!(verified.files.len(), 1);
    assert_eq!(verified.files[0].status, "wrong size");
    assert!(w.verify("b").await.unwrap().files.iter().all(|f| f.ok()));

    // A refresh writes every file anew: healed.
    assert_eq!(w.refresh("a").await.unwrap().version, 1);
    assert_eq!(w.slice("a").await.unwrap().state, SliceState::Fresh);
    assert_eq!(scalar(&other, "SELECT sum(n) FROM a").await, "6");

    // A rollback to a version whose files are intact heals too.
    run(&w, "INGEST INTO t VALUES (4); REFRESH SLICE b").await;
    let b_dir = dir.path().join("slices/slices/b");
    let newest = parquet_files(&b_dir)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .unwrap();
    std::fs::remove_file(&newest).unwrap();
    let out = table_of(&w, "VERIFY SLICES").await;
    assert!(out.contains("missing"), "{out}");
    assert_eq!(w.slice("b").await.unwrap().state, SliceState::Quarantined);
    run(&w, "ROLLBACK SLICE b TO VERSION 0").await;
    assert_eq!(w.slice("b").await.unwrap().state, SliceState::Stale);
    assert_eq!(scalar(&w, "SELECT sum(m) FROM b").await, "60");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_core_file_names_the_table_and_its_readers() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE u (n BIGINT); INGEST INTO u VALUES (5);
         CREATE SLICE c AS SELECT sum(n) AS total FROM core.u;",
    )
    .await;
    let [file] = parquet_files(&dir.path().join("core/u"))
        .try_into()
        .unwrap();
    std::fs::write(&file, b"this is not parquet at all, and not the right size").unwrap();
    // A process that has not read the file before (this one keeps its footer in memory).
    let w = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    let err = fails(&w, "SELECT n FROM core.u").await;
    assert!(
        err.contains("core table 'core.u' is damaged") && err.contains("slices.c"),
        "{err}"
    );
    assert!(err.contains("never rewritten"), "{err}");
    // The slice serves what it has.
    assert_eq!(scalar(&w, "SELECT total FROM c").await, "5");
}

/// Runs SQL and returns its result as a pretty table.
async fn table_of(w: &IcePie, sql: &str) -> String {
    crate::support::table(w, sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_over_a_slice_reads_its_latest_version() {
    let (_dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s AS SELECT sum(n) AS total FROM core.t;
         CREATE SCHEMA scratch;
         CREATE VIEW scratch.v AS SELECT total * 10 AS big FROM s;
         CREATE VIEW scratch.raw AS SELECT count(*) AS rows FROM core.t;
         CREATE VIEW scratch.first AS SELECT total FROM slice_at('s', 0);",
    )
    .await;
    run(&w, "INGEST INTO t VALUES (2); REFRESH SLICE s").await;
    assert_eq!(scalar(&w, "SELECT big FROM scratch.v").await, "30");
    assert_eq!(scalar(&w, "SELECT rows FROM scratch.raw").await, "2");
    // A version the SQL names stays as named.
    assert_eq!(scalar(&w, "SELECT total FROM scratch.first").await, "1");
    // New columns: the view says to re-create it.
    run(
        &w,
        "CREATE OR REPLACE SLICE s AS SELECT sum(n) AS total, 1 AS one FROM core.t",
    )
    .await;
    let err = fails(&w, "SELECT big FROM scratch.v").await;
    assert!(err.contains("CREATE OR REPLACE VIEW"), "{err}");
}

/// A process stopped between logging its attempt and deleting the attempt's marker leaves a
/// marker behind: the attempt is shown and counted once, as logged, never as abandoned too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_left_after_its_attempt_was_logged_is_not_an_abandoned_attempt() {
    let (dir, w) = open_with(&[("heartbeat", "10ms"), ("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s AS SELECT sum(n) AS total FROM core.t; REFRESH SLICE s FULL;",
    )
    .await;
    // The refresh's own marker goes once its row is written.
    w.flush().await;
    let id = scalar(
        &w,
        "SELECT attempt_id FROM system.refreshes WHERE kind = 'refresh'",
    )
    .await;
    // An attempt marker as the storage layout (DESIGN.md) defines it.
    let marker = serde_json::json!({
        "slice": "slices.s",
        "attempt_id": id,
        "kind": "refresh",
        "started_at": chrono::Utc::now().timestamp_millis() - 1000,
        "process": "gone:1",
    });
    let folder = dir.path().join("_system/running/slices/s");
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.join(format!("{id}.json"));
    std::fs::write(&path, serde_json::to_vec(&marker).unwrap()).unwrap();
    // Expired (6 heartbeats of 10 ms), and its attempt is logged.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(statuses(&w, "slices.s").await, "success,success");
    run(&w, "REFRESH SLICE s FULL").await;
    assert!(!path.exists(), "the marker was left");
    let rows = scalar(
        &w,
        &format!("SELECT count(*) FROM system.refreshes WHERE attempt_id = '{id}'"),
    )
    .await;
    assert_eq!(rows, "1");
    assert_eq!(
        scalar(
            &w,
            "SELECT count(*) FROM system.refreshes WHERE status <> 'success'"
        )
        .await,
        "0"
    );
}

/// A refresh whose inputs are the very versions its slice was built from commits nothing:
/// no new version wakes the slices downstream or shortens the rollback window. FULL, a new
/// definition, and a definition whose rows change by themselves (`now()`) still commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_with_nothing_to_do_commits_nothing() {
    let (_dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1), (2);
         CREATE SLICE s AS SELECT sum(n) AS total FROM core.t;
         CREATE SLICE down AS SELECT total * 2 AS twice FROM slices.s;
         CREATE SLICE clock AS SELECT sum(n) AS total, now() AS at FROM core.t;",
    )
    .await;
    let refreshed = rows(&w, "REFRESH SLICE s").await;
    assert_eq!(refreshed.len(), 1);
    assert!(
        refreshed[0].starts_with("slices.s | 0 | 1 |"),
        "{refreshed:?}"
    );
    assert!(
        refreshed[0].ends_with("| NULL | nothing to do: no input changed since version 0"),
        "{refreshed:?}"
    );
    let explained = rows(&w, "EXPLAIN REFRESH SLICE s").await;
    assert!(
        explained[0].contains("| nothing to do: no input changed since version 0 |"),
        "{explained:?}"
    );
    assert_eq!(w.history("s").await.unwrap().len(), 1);
    assert_eq!(statuses(&w, "slices.s").await, "success,no_change");
    for slice in ["s", "down"] {
        let info = w.slice(slice).await.unwrap();
        assert_eq!(
            (info.version, info.state),
            (0, SliceState::Fresh),
            "{slice}"
        );
    }
    assert!(w.slice("s").await.unwrap().checked_at.is_some());
    // What still commits.
    assert_eq!(w.refresh_full("s").await.unwrap().version, 1);
    assert_eq!(w.refresh("clock").await.unwrap().version, 1);
    run(&w, "INGEST INTO t VALUES (3)").await;
    let after = w.refresh("s").await.unwrap();
    assert_eq!((after.version, after.unchanged), (2, false));
    assert_eq!(scalar(&w, "SELECT total FROM s").await, "6");
    assert_eq!(
        statuses(&w, "slices.s").await,
        "success,no_change,success,success"
    );
}
