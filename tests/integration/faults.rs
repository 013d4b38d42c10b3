//! Fault injection: an object store that fails chosen calls (by kind, count and path) and
//! adds latency. Every statement either fully succeeds or changes nothing readers see, with
//! a clear error, and the warehouse is usable afterwards.
//!
//! CI fails a few calls of each kind each statement makes (the first, a middle one and the
//! last PUT, a middle one of the others); `ICEPIE_FAULTS=all` fails every one in turn.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use icepie::IcePie;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

use crate::support::{create_workload, load_sql, run, violations};

/// Kinds of object-store calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    List,
    Delete,
}

const OPS: [Op; 4] = [Op::Put, Op::Get, Op::List, Op::Delete];

#[derive(Debug, Default)]
struct Plan {
    /// Calls of each kind so far (index: `Op as usize`).
    calls: [usize; 4],
    /// Fail the call of this kind with this number (1-based; 0: every one) whose path
    /// contains `path`.
    fail: Option<(Op, usize)>,
    path: Option<String>,
    /// Added to every call whose path contains `path`.
    latency: Duration,
    injected: usize,
}

/// An object store that fails the calls it is told to.
#[derive(Debug, Default)]
pub struct FaultyStore {
    inner: Option<Arc<dyn ObjectStore>>,
    plan: Arc<Mutex<Plan>>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner: Some(inner),
            plan: Arc::default(),
        }
    }

    fn inner(&self) -> &Arc<dyn ObjectStore> {
        self.inner.as_ref().expect("an inner store")
    }

    /// Counts calls from zero again and fails call `n` of kind `op` (none: count only).
    pub fn arm(&self, fail: Option<(Op, usize)>, path: Option<&str>, latency: Duration) {
        let mut p = self.plan.lock().unwrap();
        p.calls = [0; 4];
        p.fail = fail;
        p.path = path.map(str::to_string);
        p.latency = latency;
    }

    /// Calls of each kind since the last `arm`.
    pub fn calls(&self) -> [usize; 4] {
        self.plan.lock().unwrap().calls
    }

    /// Faults injected so far.
    pub fn injected(&self) -> usize {
        self.plan.lock().unwrap().injected
    }

    /// Counts a call; an error when it is the one to fail.
    fn check(&self, op: Op, path: &Path) -> (Duration, Result<()>) {
        check(&self.plan, op, path)
    }

    async fn enter(&self, op: Op, path: &Path) -> Result<()> {
        let (latency, result) = self.check(op, path);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        result
    }
}

/// Counts a call of `op` on `path`; an error when it is the one to fail.
fn check(plan: &Mutex<Plan>, op: Op, path: &Path) -> (Duration, Result<()>) {
    let mut p = plan.lock().unwrap();
    let matches = p.path.as_ref().is_none_or(|s| path.as_ref().contains(s));
    if matches {
        p.calls[op as usize] += 1;
    }
    let fail = matches && (p.fail == Some((op, p.calls[op as usize])) || p.fail == Some((op, 0)));
    if fail {
        p.injected += 1;
    }
    let result = if fail {
        Err(object_store::Error::Generic {
            store: "faulty",
            source: format!("injected {op:?} fault on {path}").into(),
        })
    } else {
        Ok(())
    };
    let latency = if matches { p.latency } else { Duration::ZERO };
    (latency, result)
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner())
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.enter(Op::Put, location).await?;
        self.inner().put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.enter(Op::Put, location).await?;
        self.inner().put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.enter(Op::Get, location).await?;
        self.inner().get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        self.enter(Op::Get, location).await?;
        self.inner().get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        // Faults are decided per path, before the inner store deletes it.
        let plan = self.plan.clone();
        let decided = locations
            .map(move |p| p.and_then(|path| check(&plan, Op::Delete, &path).1.map(|()| path)));
        self.inner().delete_stream(decided.boxed())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let at = prefix.cloned().unwrap_or_default();
        match self.check(Op::List, &at).1 {
            Ok(()) => self.inner().list(prefix),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let at = prefix.cloned().unwrap_or_default();
        match self.check(Op::List, &at).1 {
            Ok(()) => self.inner().list_with_offset(prefix, offset),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.enter(Op::List, &prefix.cloned().unwrap_or_default())
            .await?;
        self.inner().list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.enter(Op::Put, to).await?;
        self.inner().copy_opts(from, to, options).await
    }
}

/// Versions of the workload's tables and slices, as readers see them.
async fn versions(w: &IcePie) -> String {
    crate::support::table(
        w,
        "SELECT 'core.t' AS name, version FROM system.core_tables WHERE name = 't' UNION ALL \
         SELECT domain || '.' || name, version FROM system.slices ORDER BY name",
    )
    .await
}

/// A warehouse holding the workload, on a faulty store.
async fn faulty_warehouse() -> (tempfile::TempDir, Arc<FaultyStore>, IcePie) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultyStore::new(Arc::new(LocalFileSystem::new())));
    let w = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_object_store(store.clone())
        .with_scheduler(false)
        .with_setting("vacuum_enforce_grace", "off")
        .with_setting("vacuum_grace", "0 seconds")
        .with_setting("retain_versions", "1000")
        .open()
        .await
        .unwrap();
    create_workload(&w).await;
    (dir, store, w)
}

/// Which of `calls` numbered calls of kind `op` to fail: all of them in the long form; in
/// the short form the first, a middle one and the last PUT (commits are PUTs) and a middle
/// call of each other kind.
fn chosen(op: Op, calls: usize) -> Vec<usize> {
    if std::env::var("ICEPIE_FAULTS").is_ok_and(|v| v == "all") {
        return (1..=calls).collect();
    }
    let mut n = match op {
        Op::Put => vec![1, calls.div_ceil(2), calls],
        _ => vec![calls.div_ceil(2)],
    };
    n.retain(|c| *c >= 1);
    n.dedup();
    n
}

/// A statement under test, what puts the warehouse in the state it needs first, and what
/// undoes it after.
struct Case {
    prepare: &'static str,
    statement: String,
    reset: &'static str,
}

fn case(prepare: &'static str, statement: impl Into<String>, reset: &'static str) -> Case {
    Case {
        prepare,
        statement: statement.into(),
        reset,
    }
}

/// Runs SQL, returning its outcome, once what it writes in the background is written too.
async fn attempt(w: &IcePie, sql: &str) -> icepie::Result<()> {
    let result = match w.sql(sql).await {
        Ok(df) => df
            .collect()
            .await
            .map(|_| ())
            .map_err(icepie::IcePieError::from),
        Err(e) => Err(e),
    };
    w.flush().await;
    result
}

async fn run_all(w: &IcePie, sql: &str) {
    if !sql.is_empty() {
        run(w, sql).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_succeeds_whole_or_changes_nothing_under_faults() {
    let (dir, store, w) = faulty_warehouse().await;
    let landing = crate::zero_copy::workload_landing(&dir.path().join("landing")).await;
    let cases = [
        case("", load_sql(), ""),
        // A load that copies its Parquet files as they are.
        case("", format!("INGEST INTO t FROM '{landing}'"), ""),
        case("", "REFRESH SLICE s", ""),
        case(
            "",
            "CREATE OR REPLACE SLICE r AS SELECT count(*) * 2 AS n FROM core.t",
            "",
        ),
        case("", "FREEZE SLICE s 'checking'", "THAW SLICE s"),
        case("FREEZE SLICE s", "THAW SLICE s", ""),
        case("", "ROLLBACK SLICE s TO VERSION 0", ""),
        case("", "VACUUM SLICES", ""),
        case(
            "",
            "CREATE CORE TABLE u AS SELECT 1 AS one",
            "DROP CORE TABLE IF EXISTS u",
        ),
    ];
    let mut trials = 0;
    for Case {
        prepare,
        statement,
        reset,
    } in &cases
    {
        // How many calls of each kind the statement makes (it runs for real once).
        run_all(&w, prepare).await;
        store.arm(None, None, Duration::ZERO);
        attempt(&w, statement).await.unwrap();
        let calls = store.calls();
        run_all(&w, reset).await;
        for op in OPS {
            for n in chosen(op, calls[op as usize]) {
                trials += 1;
                run_all(&w, prepare).await;
                let before = versions(&w).await;
                // Call n of this kind fails; reads are slowed a little too.
                let latency = if op == Op::Get {
                    Duration::from_millis(1)
                } else {
                    Duration::ZERO
                };
                store.arm(Some((op, n)), None, latency);
                let result = attempt(&w, statement).await;
                store.arm(None, None, Duration::ZERO);
                let after = versions(&w).await;
                if let Err(e) = &result {
                    let msg = e.to_string();
                    assert!(!msg.is_empty() && !msg.contains("panicked"), "{msg}");
                    // A failure changes nothing readers see, unless it says its commit
                    // landed (VACUUM changes no version either way).
                    if !msg.contains("was committed") {
                        assert_eq!(
                            after, before,
                            "{statement} with {op:?} fault #{n} failed ({msg}) but changed \
                             versions"
                        );
                    }
                }
                let broken = violations(&w).await;
                assert!(
                    broken.is_empty(),
                    "{statement} with {op:?} fault #{n} ({result:?}): {broken:?}"
                );
                // Usable afterwards: the statement works without faults.
                run_all(&w, reset).await;
                run_all(&w, prepare).await;
                attempt(&w, statement)
                    .await
                    .unwrap_or_else(|e| panic!("{statement} after {op:?} fault #{n}: {e}"));
                run_all(&w, reset).await;
            }
        }
    }
    // A statement may make fewer calls on a later run (a cache, a smaller log): a few chosen
    // calls never come. Most do.
    assert!(trials >= 30, "only {trials} trials");
    assert!(
        store.injected() * 10 >= trials * 7,
        "{} faults in {trials} trials",
        store.injected()
    );
    eprintln!(
        "fault injection: {trials} trials, {} faults injected",
        store.injected()
    );
}

/// A refresh whose row could not be written to its refresh log (or whose process ended
/// first) committed all the same: its marker outlives it, and the slice's next refresh finds
/// the commit and records the attempt as the success it was, never as abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_record_was_lost_is_recorded_from_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultyStore::new(Arc::new(LocalFileSystem::new())));
    let w = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_object_store(store.clone())
        .with_scheduler(false)
        .with_setting("heartbeat", "10ms")
        .open()
        .await
        .unwrap();
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s AS SELECT sum(n) AS total FROM core.t;",
    )
    .await;
    w.flush().await;
    // Every write to the refresh logs fails: the refresh commits, its row cannot be written.
    store.arm(
        Some((Op::Put, 0)),
        Some("_system/refreshes/"),
        Duration::ZERO,
    );
    run(&w, "INGEST INTO t VALUES (2); REFRESH SLICE s").await;
    w.flush().await;
    store.arm(None, None, Duration::ZERO);
    assert!(store.injected() >= 1);
    let markers = dir.path().join("_system/running/slices/s");
    let left = std::fs::read_dir(&markers).unwrap().count();
    assert_eq!(left, 1, "the attempt's marker stays");
    // Once it expires (6 heartbeats), the next refresh resolves it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    run(&w, "INGEST INTO t VALUES (3); REFRESH SLICE s").await;
    w.flush().await;
    assert_eq!(
        crate::support::scalar(
            &w,
            "SELECT string_agg(concat_ws(' ', kind, status, version, rows, inputs), '; ' \
             ORDER BY started_at) FROM system.refreshes"
        )
        .await,
        "create success 0 1 core.t@1; refresh success 1 1 core.t@2; refresh success 2 1 core.t@3"
    );
    assert_eq!(std::fs::read_dir(&markers).unwrap().count(), 0);
    assert_eq!(crate::support::scalar(&w, "SELECT total FROM s").await, "6");
}

/// A refresh returns once its version is committed and writes its row in the background; its
/// own process shows the attempt as it ended at once, however slow the refresh log is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_shows_its_outcome_at_once_in_its_own_process() {
    let (dir, store, w) = faulty_warehouse().await;
    // The rows of the workload's CREATEs are written before the store slows down: only the
    // REFRESH's row is in flight below.
    w.flush().await;
    // Writing to the refresh logs takes long; reading them too.
    store.arm(None, Some("_system/refreshes/"), Duration::from_millis(400));
    // FULL: a refresh of unchanged inputs would commit nothing, and write its row at once.
    w.sql("REFRESH SLICE s FULL")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    // Its row is still being written: its marker is there.
    let markers = dir.path().join("_system/running/slices/s");
    assert_eq!(std::fs::read_dir(&markers).map_or(0, |d| d.count()), 1);
    let shown = crate::support::scalar(
        &w,
        "SELECT string_agg(status, ',' ORDER BY started_at) FROM system.refreshes \
         WHERE slice = 'slices.s' AND kind = 'refresh'",
    )
    .await;
    w.flush().await;
    store.arm(None, None, Duration::ZERO);
    assert_eq!(shown, "success");
    assert_eq!(std::fs::read_dir(&markers).unwrap().count(), 0);
    let other = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    assert_eq!(
        crate::support::scalar(
            &other,
            "SELECT count(*) FROM system.refreshes WHERE slice = 'slices.s' AND \
             kind = 'refresh' AND status = 'success'"
        )
        .await,
        "1"
    );
}

/// A refresh whose commit lands after another process dropped its slice withdraws it: left
/// there, the commit would be a log that starts at no version, a table nobody can load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_lands_after_its_slice_was_dropped_is_withdrawn() {
    let (dir, store, w) = faulty_warehouse().await;
    run(&w, "CREATE SLICE gone AS SELECT count(*) AS n FROM core.t").await;
    w.flush().await;
    // The refresh's commit (version 1) takes long; another process drops the slice meanwhile.
    let commit = "slices/slices/gone/_delta_log/00000000000000000001.json";
    store.arm(None, Some(commit), Duration::from_millis(1500));
    let refresh = {
        let w = w.clone();
        tokio::spawn(async move { w.refresh_full("gone").await })
    };
    crate::support::eventually(20, "the commit to be under way", || async {
        (store.calls()[Op::Put as usize] >= 1).then_some(())
    })
    .await;
    let other = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    run(&other, "DROP SLICE gone").await;
    let err = refresh.await.unwrap().unwrap_err().to_string();
    store.arm(None, None, Duration::ZERO);
    assert!(err.contains("was dropped while"), "{err}");
    let folder = dir.path().join("slices/slices/gone");
    let left: Vec<_> = walkdir(&folder);
    assert!(left.is_empty(), "left behind: {left:?}");
    let err = crate::support::fails(&other, "SELECT * FROM slices.gone").await;
    assert!(err.contains("not found"), "{err}");
    run(&other, "CREATE SLICE gone AS SELECT 1 AS n").await;
    assert_eq!(
        crate::support::scalar(&w, "SELECT n FROM slices.gone").await,
        "1"
    );
}

/// DROP deletes the slice's checkpoints, then its first commit, one at a time, and the rest in
/// batches: stopped before the first commit goes, it leaves the whole slice; stopped after,
/// no slice (a log with no start), which a second DROP clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_stopped_half_way_leaves_the_whole_slice_or_none() {
    let (dir, store, w) = faulty_warehouse().await;
    run(&w, "CREATE SLICE many AS SELECT count(*) AS n FROM core.t").await;
    for _ in 0..11 {
        w.refresh_full("many").await.unwrap();
    }
    w.flush().await;
    let log = dir.path().join("slices/slices/many/_delta_log");
    assert!(
        log.join(format!("{:020}.checkpoint.parquet", 9)).exists(),
        "{:?}",
        walkdir(&log)
    );
    let n = crate::support::scalar(&w, "SELECT n FROM slices.many").await;
    let reader = || async {
        IcePie::builder(dir.path().to_string_lossy().to_string())
            .with_scheduler(false)
            .open()
            .await
            .unwrap()
    };

    store.arm(
        Some((Op::Delete, 1)),
        Some(&format!("many/_delta_log/{:020}.json", 0)),
        Duration::ZERO,
    );
    attempt(&w, "DROP SLICE many").await.unwrap_err();
    store.arm(None, None, Duration::ZERO);
    assert!(!log.join(format!("{:020}.checkpoint.parquet", 9)).exists());
    let other = reader().await;
    assert_eq!(
        crate::support::scalar(&other, "SELECT n FROM slices.many").await,
        n
    );
    assert_eq!(other.slice("many").await.unwrap().version, 11);

    store.arm(
        Some((Op::Delete, 1)),
        Some(&format!("many/_delta_log/{:020}.json", 1)),
        Duration::ZERO,
    );
    attempt(&w, "DROP SLICE many").await.unwrap_err();
    store.arm(None, None, Duration::ZERO);
    let err = crate::support::fails(&reader().await, "SELECT n FROM slices.many").await;
    assert!(err.contains("not found"), "{err}");
    run(&w, "DROP SLICE many").await;
    let left = walkdir(&dir.path().join("slices/slices/many"));
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Every file under `dir` (none when it does not exist).
fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walkdir(&path));
        } else {
            out.push(path);
        }
    }
    out
}
