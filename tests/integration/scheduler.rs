//! Refresh policies run by the scheduler, retries, backoff and suspension, and concurrency:
//! different slices in parallel, one slice never twice at once, two processes on one slice.

use std::collections::BTreeSet;
use std::time::Duration;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use icepie::{IcePie, SliceState};

use crate::support::{eventually, open_with, run, scalar, version};

/// A scheduler that looks every 50 ms.
const FAST: (&str, &str) = ("scheduler_tick", "50ms");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_and_on_change_slices_refresh_on_their_own_manual_and_frozen_ones_do_not() {
    let (_dir, w) = open_with(&[FAST]).await;
    let mut events = w.subscribe();
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE ticking REFRESH EVERY '1 second' AS SELECT sum(n) AS s FROM core.t;
         CREATE SLICE follower REFRESH ON CHANGE AS SELECT sum(n) AS s FROM core.t;
         CREATE SLICE manual AS SELECT sum(n) AS s FROM core.t;
         CREATE SLICE pinned REFRESH EVERY '1 second' AS SELECT sum(n) AS s FROM core.t;
         FREEZE SLICE pinned 'audit';",
    )
    .await;
    // Every second, from the latest attempt on; its inputs unchanged, each has nothing to do
    // and commits nothing.
    let ticks = eventually(15, "two scheduled refreshes of 'ticking'", || async {
        // Ended ones: a third may be running at the moment.
        let mut ticks = attempts(&w, "slices.ticking").await;
        ticks.retain(|(status, _, _)| status != "running");
        (ticks.len() >= 2).then_some(ticks)
    })
    .await;
    assert!(ticks.iter().all(|(s, _, _)| s == "no_change"), "{ticks:?}");
    assert!(ticks[1].1 >= ticks[0].2 + 950_000, "{ticks:?}");
    assert_eq!(version(&w, "ticking").await, 0);
    // Fresh inputs: nothing to do on change.
    assert_eq!(version(&w, "follower").await, 0);

    run(&w, "INGEST INTO t VALUES (41)").await;
    let ingested = std::time::Instant::now();
    eventually(15, "'follower' to follow the ingest", || async {
        let info = w.slice("follower").await.unwrap();
        (info.state == SliceState::Fresh && info.version == 1).then_some(())
    })
    .await;
    assert_eq!(scalar(&w, "SELECT s FROM follower").await, "42");
    assert_eq!(
        w.slice("follower").await.unwrap().descriptor.inputs[0].version,
        2
    );

    // The scheduler reported what it did.
    let event = events.recv().await.unwrap();
    assert!(event.outcome.is_ok(), "{event:?}");

    // Its lag: how long ago the change it has not consumed was committed (before `ingested`),
    // as of a moment during the call.
    let since = ingested.elapsed().as_millis() as i64;
    let manual = w.slice("manual").await.unwrap();
    assert_eq!((manual.version, manual.state), (0, SliceState::Stale));
    let lag = manual.lag_ms.unwrap();
    assert!(
        lag + 5 >= since && lag < since + 5_000,
        "lag {lag} ms, {since} ms since"
    );
    let pinned = w.slice("pinned").await.unwrap();
    assert_eq!((pinned.version, pinned.state), (1, SliceState::Frozen));
    assert_eq!(
        scalar(
            &w,
            "SELECT count(*) FROM system.refreshes WHERE slice IN ('slices.manual', 'slices.pinned') \
             AND kind = 'refresh'"
        )
        .await,
        "0"
    );
}

/// (status, started_at µs, ended_at µs) of a slice's attempts, oldest first.
async fn attempts(w: &IcePie, slice: &str) -> Vec<(String, i64, i64)> {
    let batches: Vec<RecordBatch> = w
        .sql(&format!(
            "SELECT status, started_at, duration_ms FROM system.refreshes \
             WHERE slice = '{slice}' AND kind = 'refresh' ORDER BY started_at"
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut out = Vec::new();
    for b in &batches {
        let status = datafusion::arrow::compute::cast(
            b.column(0),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let status = status.as_string::<i32>();
        let started = b.column(1).as_primitive::<TimestampMicrosecondType>();
        let duration = b.column(2).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            let start = started.value(i);
            out.push((
                status.value(i).to_string(),
                start,
                start + duration.value(i) * 1000,
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_refreshes_back_off_then_suspend_until_thawed_or_fixed() {
    let (_dir, w) = open_with(&[
        FAST,
        ("retry_backoff", "300ms"),
        ("max_retry_backoff", "600ms"),
        ("max_failures", "3"),
    ])
    .await;
    run(
        &w,
        "CREATE CORE TABLE raw (v TEXT); INGEST INTO raw VALUES ('1');
         CREATE SLICE typed REFRESH ON CHANGE AS SELECT CAST(v AS INT) AS n FROM core.raw;
         INGEST INTO raw VALUES ('three');",
    )
    .await;
    let info = eventually(20, "'typed' to be suspended", || async {
        let info = w.slice("typed").await.unwrap();
        (info.state == SliceState::Suspended).then_some(info)
    })
    .await;
    assert_eq!(info.failures, 3);
    assert!(info.last_error.unwrap().contains("three"));
    assert_eq!(info.version, 0, "still serving its last good version");

    // Suspended: no more automatic attempts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tried = attempts(&w, "slices.typed").await;
    assert_eq!(tried.len(), 3, "{tried:?}");
    assert!(tried.iter().all(|(s, _, _)| s == "failed"));
    // Each retry waited its backoff after the previous failure: 300 ms, then 600 ms.
    let gaps: Vec<i64> = tried.windows(2).map(|p| p[1].1 - p[0].2).collect();
    assert!(gaps[0] >= 300_000 && gaps[1] >= 600_000, "{gaps:?} µs");

    // THAW clears the suspension (seen with the scheduler paused: it would retry at once and
    // fail again): the scheduler then tries again (and fails again).
    run(&w, "SET icepie.scheduler = off; THAW SLICE typed").await;
    assert_eq!(w.slice("typed").await.unwrap().failures, 0);
    run(&w, "SET icepie.scheduler = on").await;
    eventually(10, "a new failed attempt after THAW", || async {
        let failed = attempts(&w, "slices.typed").await;
        (failed.iter().filter(|(s, _, _)| s == "failed").count() > 3).then_some(())
    })
    .await;

    // A fixed definition commits, and the slice is healthy again (once no retry runs).
    run(&w, "SET icepie.scheduler = off").await;
    eventually(10, "no attempt running", || async {
        let all = attempts(&w, "slices.typed").await;
        all.iter().all(|(s, _, _)| s != "running").then_some(())
    })
    .await;
    run(
        &w,
        "CREATE OR REPLACE SLICE typed REFRESH ON CHANGE AS \
         SELECT TRY_CAST(v AS INT) AS n FROM core.raw",
    )
    .await;
    let info = w.slice("typed").await.unwrap();
    assert_eq!((info.state, info.failures), (SliceState::Fresh, 0));
    assert_eq!(info.last_error, None);
}

/// A core table of `rows` rows, so that a self-join of it takes a moment.
async fn heavy_core(w: &IcePie, rows: u32) {
    run(
        w,
        &format!("CREATE CORE TABLE big AS SELECT value AS n FROM generate_series(1, {rows})"),
    )
    .await;
}

const HEAVY: &str = "SELECT sum(a.n * b.n) AS s FROM core.big a, core.big b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_of_different_slices_run_in_parallel_up_to_the_limit() {
    for (limit, parallel) in [("2", true), ("1", false)] {
        let (_dir, w) = open_with(&[FAST, ("max_concurrent_refreshes", limit)]).await;
        // Refreshes of a second or so: far longer than what separates two starts in a tick.
        heavy_core(&w, 4500).await;
        run(&w, "SET icepie.scheduler = false").await;
        run(
            &w,
            &format!(
                "CREATE SLICE a REFRESH EVERY '1 second' FULL AS {HEAVY};
                 CREATE SLICE b REFRESH EVERY '1 second' FULL AS {HEAVY};"
            ),
        )
        .await;
        // New core data, so that each scheduled refresh recomputes (with nothing new it
        // commits at once, and two instant refreshes overlap only by chance).
        run(&w, "INGEST INTO big VALUES (1)").await;
        // Both due by now: the next tick finds them together.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        run(&w, "SET icepie.scheduler = true").await;
        let (a, b) = eventually(30, "a scheduled refresh of each slice", || async {
            let a = attempts(&w, "slices.a").await;
            let b = attempts(&w, "slices.b").await;
            let ended = |x: &[(String, i64, i64)]| x.first().is_some_and(|f| f.0 != "running");
            (ended(&a) && ended(&b)).then(|| (a[0].clone(), b[0].clone()))
        })
        .await;
        let overlap = a.1 < b.2 && b.1 < a.2;
        assert_eq!(overlap, parallel, "limit {limit}: a {a:?}, b {b:?}");
        w.close(Duration::from_secs(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_asked_for_while_one_runs_joins_it() {
    let (_dir, w) = open_with(&[("scheduler", "off")]).await;
    // Small to create, then big enough that a refresh runs for a second or more.
    run(
        &w,
        &format!(
            "CREATE CORE TABLE big (n BIGINT); INGEST INTO big VALUES (1);
             CREATE SLICE s AS {HEAVY};
             INGEST INTO big SELECT value AS n FROM generate_series(2, 30000);"
        ),
    )
    .await;
    // A refresh that has started (read its inputs) is not joined: the next request waits for
    // its turn, and a request made while that one waits joins it. Which of two requests made
    // at once starts first depends on the machine, so the first one is seen running first.
    let running = {
        let w = w.clone();
        tokio::spawn(async move { w.refresh("s").await })
    };
    eventually(30, "the first refresh to run", || async {
        let n: i64 = scalar(
            &w,
            "SELECT count(*) FROM system.refreshes WHERE status = 'running'",
        )
        .await
        .parse()
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
    // New data for the next refresh (with none, it would have nothing to do).
    run(&w, "INGEST INTO big VALUES (0)").await;
    let (second, third) = tokio::join!(w.refresh("s"), w.refresh("s"));
    let (second, third) = (second.unwrap(), third.unwrap());
    assert_eq!(running.await.unwrap().unwrap().version, 1);
    assert_eq!(second.version, 2);
    assert_eq!(third.version, 2, "the third request joined the second");
    assert_eq!(attempts(&w, "slices.s").await.len(), 2);
    // Once it has ended, a new request runs anew (FULL: nothing changed since).
    assert_eq!(w.refresh_full("s").await.unwrap().version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_one_slice_never_lose_mix_or_duplicate_a_version() {
    let (dir, a) = open_with(&[("scheduler", "off")]).await;
    heavy_core(&a, 1500).await;
    run(&a, &format!("CREATE SLICE s AS {HEAVY}")).await;
    // A second, independent handle: no lock or memory is shared with the first.
    let b = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    let mut versions = BTreeSet::new();
    let mut superseded = 0;
    for _ in 0..4 {
        // FULL: with unchanged inputs a refresh would have nothing to do.
        let (x, y) = tokio::join!(a.refresh_full("s"), b.refresh_full("s"));
        // A REFRESH means "make it fresh": both succeed, racing or not.
        let (x, y) = (x.unwrap(), y.unwrap());
        for out in [&x, &y] {
            if out.by_another_writer {
                superseded += 1;
            } else {
                assert!(
                    versions.insert(out.version),
                    "version {} twice",
                    out.version
                );
            }
        }
        // A refresh that found the other's version fresh reports that very version.
        if x.by_another_writer || y.by_another_writer {
            assert_eq!(x.version, y.version);
        }
    }
    // Versions 1..=n, each committed once; the slice holds one whole result.
    let n = versions.len() as i64;
    assert_eq!(versions.len() + superseded, 8);
    assert_eq!(versions, (1..=n).collect());
    assert_eq!(version(&a, "s").await, n);
    assert_eq!(scalar(&b, "SELECT count(*) FROM s").await, "1");
    let expected = scalar(&a, &HEAVY.replace(" AS s", "")).await;
    assert_eq!(scalar(&a, "SELECT s FROM s").await, expected);
    let statuses = scalar(
        &a,
        "SELECT string_agg(status, ',' ORDER BY status) FROM \
         (SELECT status FROM system.refreshes WHERE kind = 'refresh' GROUP BY status, attempt_id)",
    )
    .await;
    assert_eq!(statuses.matches("success").count() as i64, n, "{statuses}");
    assert!(
        statuses.matches("conflict").count() >= superseded,
        "{statuses}"
    );
    // A conflict is not a failure of the slice.
    assert_ne!(a.slice("s").await.unwrap().state, SliceState::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_refreshing_one_slice_agree_on_every_version() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    heavy_core(&w, 1500).await;
    run(&w, &format!("CREATE SLICE s AS {HEAVY}")).await;
    let location = dir.path().to_string_lossy().to_string();
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_icepie"))
            .args(["--data", &location, "-q"])
            .args(["-c", "REFRESH SLICE s FULL", "-c", "REFRESH SLICE s FULL"])
            .args(["-c", "REFRESH SLICE s FULL"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outputs = tokio::task::spawn_blocking(move || {
        [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()]
    })
    .await
    .unwrap();
    // Every REFRESH succeeded: it committed, or found the other process's version fresh.
    for out in &outputs {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.contains("Error"), "{stderr}");
    }
    let successes: i64 = scalar(
        &w,
        "SELECT count(*) FROM system.refreshes WHERE kind = 'refresh' AND status = 'success'",
    )
    .await
    .parse()
    .unwrap();
    assert!(successes >= 3, "at least one process's worth of versions");
    // One version per success, numbered without gaps, each made by icepie from one whole
    // result.
    assert_eq!(version(&w, "s").await, successes);
    let history = w.history("s").await.unwrap();
    assert_eq!(history.len() as i64, successes + 1);
    assert!(history
        .iter()
        .all(|h| h.descriptor.is_some() && h.rows == Some(1)));
    let expected = scalar(&w, &HEAVY.replace(" AS s", "")).await;
    assert_eq!(scalar(&w, "SELECT s FROM s").await, expected);
}

/// `icepie serve` on `location`, ticking every 50 ms with heartbeats of `heartbeat` (a lease
/// expires 6 heartbeats after its holder's last renewal).
fn serve(location: &str, heartbeat: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_icepie"))
        .args(["serve", "--data", location, "--grace", "10"])
        .args(["--set", "scheduler_tick=50ms", "--set"])
        .arg(format!("heartbeat={heartbeat}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills every child with `signal` and waits for it.
fn stop_all(children: &mut [std::process::Child], signal: libc::c_int) {
    for c in children.iter() {
        let _ = crate::tools::signal(c.id(), signal);
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

/// Three schedulers on one warehouse run each due refresh once: no refresh runs twice, no
/// attempt loses a race, and refreshes come one interval apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_serve_processes_run_each_due_refresh_once() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s REFRESH EVERY '1 second' AS SELECT sum(n) AS total, now() AS at FROM core.t;",
    )
    .await;
    // (now() makes each refresh commit: a definition that gives the same rows each time
    // would have nothing to do.)
    let location = dir.path().to_string_lossy().to_string();
    let mut children: Vec<_> = (0..3).map(|_| serve(&location, "1s")).collect();
    eventually(60, "four scheduled refreshes", || async {
        (version(&w, "s").await >= 4).then_some(())
    })
    .await;
    stop_all(&mut children, libc::SIGTERM);
    let done = attempts(&w, "slices.s").await;
    let statuses: BTreeSet<&str> = done.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(statuses, BTreeSet::from(["success"]), "{done:?}");
    assert_eq!(done.len() as i64, version(&w, "s").await, "{done:?}");
    // The interval counts from the previous commit, which lies between that attempt's start
    // and its end (its row is written after it), so its start is the bound that holds however
    // slow the machine.
    for pair in done.windows(2) {
        let (started, next) = (pair[0].1, pair[1].1);
        assert!(
            next >= started + 950_000,
            "a refresh started {} ms after the previous one started: {done:?}",
            (next - started) / 1000
        );
    }
}

/// The lease on a slice, as `(epoch file, holder pid)`, if one is in force.
fn lease_holder(root: &std::path::Path, slice: &str) -> Option<(String, u32)> {
    let folder = root.join("_system/leases/slices").join(slice);
    let mut files: Vec<_> = std::fs::read_dir(folder)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let newest = files.pop()?;
    let body: serde_json::Value = serde_json::from_slice(&std::fs::read(&newest).ok()?).ok()?;
    let pid = body["process"].as_str()?.rsplit(':').next()?.parse().ok()?;
    Some((newest.file_name()?.to_string_lossy().to_string(), pid))
}

/// A holder killed mid-refresh: its lease expires and another process takes the refresh
/// over; its attempt shows as abandoned; never do two processes run it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lease_holder_is_taken_over_once_its_lease_expires() {
    // Leases expire after 6 heartbeats: 12 s, which a loaded machine's renewals keep up with.
    let (dir, w) = open_with(&[("scheduler", "off"), ("heartbeat", "2s")]).await;
    run(
        &w,
        "CREATE CORE TABLE big (n BIGINT); INGEST INTO big VALUES (1);
         CREATE SLICE slow REFRESH EVERY '1 second' AS
           SELECT sum(a.n * b.n) AS total FROM core.big a, core.big b;
         INGEST INTO big SELECT value AS n FROM generate_series(1, 200000);",
    )
    .await;
    let root = dir.path().canonicalize().unwrap();
    let location = root.to_string_lossy().to_string();
    let mut children: Vec<_> = (0..3).map(|_| serve(&location, "2s")).collect();
    let running = "SELECT count(*) FROM system.refreshes WHERE slice = 'slices.slow' \
                   AND status = 'running'";
    let (first, killed) = eventually(60, "a process to take the lease", || async {
        lease_holder(&root, "slow")
    })
    .await;
    // For a while, one process runs the refresh and the others wait.
    for _ in 0..10 {
        let n: i64 = scalar(&w, running).await.parse().unwrap();
        assert!(n <= 1, "{n} refreshes of one slice at once");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lease_holder(&root, "slow").map(|h| h.1), Some(killed));
    let _ = crate::tools::signal(killed, libc::SIGKILL);
    let (second, taker) = eventually(60, "another process to take the lease over", || async {
        lease_holder(&root, "slow").filter(|(_, pid)| *pid != killed)
    })
    .await;
    assert!(second > first, "{second} after {first}");
    assert_ne!(taker, killed);
    eventually(60, "the killed attempt to show as abandoned", || async {
        let n: i64 = scalar(
            &w,
            "SELECT count(*) FROM system.refreshes WHERE slice = 'slices.slow' \
             AND status = 'abandoned'",
        )
        .await
        .parse()
        .unwrap();
        (n >= 1).then_some(())
    })
    .await;
    let n: i64 = scalar(&w, running).await.parse().unwrap();
    assert!(n <= 1, "{n} refreshes of one slice at once");
    let by = scalar(
        &w,
        "SELECT refreshing_by FROM system.slices WHERE name = 'slow'",
    )
    .await;
    assert!(by.ends_with(&format!(":{taker}")), "{by}");
    stop_all(&mut children, libc::SIGKILL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_slice_refreshes_while_read_sleeps_when_unread_and_wakes_on_its_next_read() {
    let (_dir, w) = open_with(&[FAST]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE hot REFRESH AUTO AS SELECT sum(n) AS s FROM core.t;
         CREATE SLICE lagging REFRESH AUTO LAG '1 hour' AS SELECT sum(n) AS s FROM core.t;",
    )
    .await;
    let state = |name: &'static str| {
        let w = w.clone();
        async move {
            let sql = format!(
                "SELECT state || ' | ' || scheduling FROM system.slices WHERE name = '{name}'"
            );
            scalar(&w, &sql).await
        }
    };
    // Just created, so not dormant yet: an input change is followed.
    run(&w, "INGEST INTO t VALUES (2)").await;
    eventually(15, "'hot' to follow the ingest", || async {
        (version(&w, "hot").await == 1).then_some(())
    })
    .await;
    // Within its lag: left alone, and system.slices says why.
    let lagging = state("lagging").await;
    assert!(
        lagging.starts_with("stale | auto: ") && lagging.contains("within LAG '1 hour'"),
        "{lagging}"
    );

    // Unread for cold_after: dormant, and an input change is not followed.
    run(&w, "SET icepie.cold_after = '3 seconds'").await;
    eventually(15, "'hot' to go dormant", || async {
        state("hot").await.starts_with("dormant | ").then_some(())
    })
    .await;
    run(&w, "INGEST INTO t VALUES (4)").await;
    let hot = state("hot").await;
    assert!(
        hot.starts_with("dormant | dormant: not read for 3 seconds"),
        "{hot}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(version(&w, "hot").await, 1);

    // Its next read serves the version there is, and wakes it: refreshed behind the read
    // (read again while waiting, so that a slow machine does not let it fall asleep).
    assert_eq!(scalar(&w, "SELECT s FROM hot").await, "3");
    eventually(15, "'hot' to wake and refresh", || async {
        scalar(&w, "SELECT s FROM hot").await;
        (version(&w, "hot").await == 2).then_some(())
    })
    .await;
    assert_eq!(scalar(&w, "SELECT s FROM hot").await, "7");
    w.flush().await;
    // Its version is visible a moment before its refresh lets go of it (the state says
    // `refreshing` until then): wait for that, not for a time.
    eventually(15, "'hot' to be fresh and read", || async {
        let hot = scalar(
            &w,
            "SELECT state || ' ' || (reads_per_day > 0) || ' ' || (last_read IS NOT NULL)
             FROM system.slices WHERE name = 'hot'",
        )
        .await;
        (hot == "fresh true true").then_some(())
    })
    .await;
}
