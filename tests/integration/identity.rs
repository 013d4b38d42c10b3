//! Per-slice state belongs to one slice, and time between processes: a slice made again under
//! a dropped slice's name inherits none of its attempts, a refresh of a slice dropped while it
//! runs leaves no table behind (see also `faults::a_commit_that_lands_after_its_slice_was_dropped_is_withdrawn`), and leases and running markers expire by the holder's
//! heartbeat and the store's clock, not by a reader whose clock runs ahead.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use icepie::{IcePie, SliceState};

use crate::lifetime::{refresh_running, statuses};
use crate::support::{eventually, fails, let_files_age, open_with, rows, run, scalar};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_made_again_inherits_none_of_its_predecessors_refreshes() {
    let (_dir, w) = open_with(&[("scheduler", "off"), ("max_failures", "2")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (v TEXT); INGEST INTO t VALUES ('1');
         CREATE SLICE s AS SELECT CAST(v AS INT) AS n FROM core.t;
         INGEST INTO t VALUES ('x');",
    )
    .await;
    w.refresh("s").await.unwrap_err();
    w.refresh("s").await.unwrap_err();
    let old = w.slice("s").await.unwrap();
    assert_eq!(old.state, SliceState::Suspended);
    let old_id = old.slice_id.unwrap();

    run(
        &w,
        "DROP SLICE s; CREATE SLICE s AS SELECT CAST(v AS INT) AS n FROM core.t WHERE v <> 'x'",
    )
    .await;
    w.flush().await;
    let new = w.slice("s").await.unwrap();
    assert_eq!(
        (new.state, new.failures, new.last_error.as_deref()),
        (SliceState::Fresh, 0, None)
    );
    let new_id = new.slice_id.unwrap();
    assert_ne!(new_id, old_id);
    // The dropped slice's attempts are still shown, each with the id of its own slice.
    let whose = scalar(
        &w,
        &format!(
            "SELECT string_agg(CASE slice_id WHEN '{old_id}' THEN 'old' WHEN '{new_id}' \
             THEN 'new' END || ' ' || status, ', ' ORDER BY started_at) \
             FROM system.refreshes WHERE slice = 'slices.s'"
        ),
    )
    .await;
    assert_eq!(whose, "old success, old failed, old failed, new success");
    // Joined with system.slices, only the current slice's attempts remain.
    let current = rows(
        &w,
        "SELECT r.status FROM system.refreshes r JOIN system.slices s USING (slice_id)",
    )
    .await;
    assert_eq!(current, ["success"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_slice_is_dropped_while_it_runs_says_so_and_leaves_nothing() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    let running = refresh_running(&w).await;
    // Another process drops the slice while the refresh builds.
    let other = IcePie::open(dir.path().to_string_lossy().to_string())
        .await
        .unwrap();
    run(&other, "DROP SLICE s").await;
    let err = running.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("was dropped while"), "{err}");
    // Nothing is left that claims to be the slice, and it can be made again.
    let log = dir.path().join("slices/slices/s/_delta_log");
    assert_eq!(commits(&log), Vec::<String>::new());
    for w in [&w, &other] {
        let err = fails(w, "SELECT * FROM slices.s").await;
        assert!(err.contains("not found"), "{err}");
        assert_eq!(
            scalar(w, "SELECT count(*) FROM system.slices WHERE name = 's'").await,
            "0"
        );
    }
    run(&w, "CREATE SLICE s AS SELECT count(*) AS n FROM core.big").await;
    assert_eq!(scalar(&other, "SELECT n FROM slices.s").await, "12000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_drop_stopped_half_way_left_is_no_table() {
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s AS SELECT sum(n) AS total FROM core.t;
         INGEST INTO t VALUES (2); REFRESH SLICE s; INGEST INTO t VALUES (3); REFRESH SLICE s;",
    )
    .await;
    // A drop deletes the log from version 0 on: stopped after the first, versions 1 and 2
    // are left with nothing to start from.
    let log = dir.path().join("slices/slices/s/_delta_log");
    std::fs::remove_file(log.join(format!("{:020}.json", 0))).unwrap();
    let fresh = IcePie::open(dir.path().to_string_lossy().to_string())
        .await
        .unwrap();
    let err = fails(&fresh, "SELECT * FROM slices.s").await;
    assert!(err.contains("not found"), "{err}");
    assert_eq!(
        scalar(&fresh, "SELECT count(*) FROM system.slices").await,
        "0"
    );
    // Made again, the new slice starts from a clean log.
    run(
        &fresh,
        "CREATE SLICE s AS SELECT sum(n) * 10 AS total FROM core.t",
    )
    .await;
    assert_eq!(commits(&log), [format!("{:020}.json", 0)]);
    assert_eq!(scalar(&w, "SELECT total FROM slices.s").await, "60");
}

/// The commit files of a Delta log folder, sorted.
fn commits(log: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(log)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Another process running a refresh of `slices.<name>`, as the warehouse sees it: the
/// attempt's marker and the scheduler's lease, both recording a heartbeat of 500 ms (so a
/// loaded machine that starves the renewing thread for a second does not expire them) and
/// renewed every 50 ms until dropped (the storage layout of DESIGN.md).
struct Elsewhere {
    stop: Arc<AtomicBool>,
    renewing: Option<std::thread::JoinHandle<()>>,
}

const ELSEWHERE: &str = "elsewhere:42";

impl Elsewhere {
    fn start(dir: &Path, name: &str) -> Self {
        let now = chrono::Utc::now().timestamp_millis();
        let marker = serde_json::json!({
            "slice": format!("slices.{name}"), "attempt_id": "elsewhere-1", "kind": "refresh",
            "started_at": now, "process": ELSEWHERE, "heartbeat_ms": 500,
        });
        let lease = serde_json::json!({
            "process": ELSEWHERE, "taken_at": now, "heartbeat_ms": 500,
        });
        let files: Vec<(PathBuf, Vec<u8>)> = vec![
            (
                dir.join(format!("_system/running/slices/{name}/elsewhere-1.json")),
                serde_json::to_vec(&marker).unwrap(),
            ),
            (
                dir.join(format!("_system/leases/slices/{name}/{:020}.json", 0)),
                serde_json::to_vec(&lease).unwrap(),
            ),
        ];
        for (path, body) in &files {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let renewing = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                for (path, body) in &files {
                    // Gone once another process recorded the attempt: then stop renewing.
                    if path.exists() {
                        let _ = std::fs::write(path, body);
                    }
                }
            }
        });
        Self {
            stop,
            renewing: Some(renewing),
        }
    }
}

impl Drop for Elsewhere {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.renewing.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_clock_runs_ahead_never_takes_a_live_refresh_for_dead() {
    // The reader's heartbeat is the default (10 s): the holder's 200 ms decides expiry.
    let (dir, w) = open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s AS SELECT sum(n) AS total FROM core.t;",
    )
    .await;
    w.flush().await;
    let elsewhere = Elsewhere::start(dir.path(), "s");
    // A process whose clock is five minutes ahead: VACUUM resolves abandoned attempts.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_icepie"))
        .env("ICEPIE_CLOCK_SKEW_MS", "300000")
        .args(["--data", &dir.path().to_string_lossy(), "--format", "csv"])
        .args([
            "-c",
            "VACUUM SLICE s;
             SELECT status FROM system.refreshes WHERE slice = 'slices.s' ORDER BY started_at;
             SELECT state || ' by ' || refreshing_by AS who FROM system.slices WHERE name = 's';",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("status\nsuccess\nrunning\n"),
        "the live refresh was taken for dead:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("who\nrefreshing by {ELSEWHERE}\n")),
        "the live lease was taken for expired:\n{stdout}"
    );
    assert_eq!(statuses(&w, "slices.s").await, "success,running");

    // Stopped: six of its 500 ms heartbeats later it is abandoned, although this reader's
    // own heartbeat is 10 s (its expiry would be a minute).
    drop(elsewhere);
    eventually(20, "the holder's heartbeat to decide expiry", || async {
        (statuses(&w, "slices.s").await == "success,abandoned").then_some(())
    })
    .await;
    assert_eq!(
        scalar(&w, "SELECT state FROM system.slices WHERE name = 's'").await,
        "fresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_keeps_the_versions_a_running_refresh_of_another_slice_may_read() {
    let (dir, w) = open_with(&[
        ("scheduler", "off"),
        ("retain_versions", "1"),
        ("vacuum_enforce_grace", "off"),
        ("vacuum_grace", "0 seconds"),
    ])
    .await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE a AS SELECT sum(n) AS total FROM core.t;
         CREATE SLICE b AS SELECT total * 2 AS twice FROM slices.a;",
    )
    .await;
    // A refresh of b starts elsewhere, reading a's version 0; then a moves on.
    let elsewhere = Elsewhere::start(dir.path(), "b");
    run(&w, "INGEST INTO t VALUES (2); REFRESH SLICE a FULL").await;
    let_files_age().await;
    let out = w.vacuum("a").await.unwrap();
    assert_eq!((out.retained_from, out.files_deleted), (0, 0), "{out:?}");
    // Once it has ended, version 0's file goes.
    drop(elsewhere);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let out = w.vacuum("a").await.unwrap();
    assert_eq!((out.retained_from, out.files_deleted), (1, 1), "{out:?}");
    assert_eq!(scalar(&w, "SELECT total FROM slices.a").await, "3");
}
