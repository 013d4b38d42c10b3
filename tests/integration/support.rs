//! Helpers shared by the integration tests.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::arrow::util::pretty::pretty_format_batches;
use futures::stream::BoxStream;
use futures::StreamExt;
use icepie::IcePie;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// Runs SQL and returns its result as a pretty table.
pub async fn table(warehouse: &IcePie, sql: &str) -> String {
    let batches: Vec<RecordBatch> = warehouse
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    pretty_format_batches(&batches).unwrap().to_string()
}

/// Runs SQL and returns the single value of its single row, formatted.
pub async fn scalar(warehouse: &IcePie, sql: &str) -> String {
    let batches: Vec<RecordBatch> = warehouse
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let batch = batches.iter().find(|b| b.num_rows() > 0).expect("one row");
    assert_eq!(batch.num_rows(), 1, "{sql}");
    datafusion::arrow::util::display::array_value_to_string(batch.column(0), 0).unwrap()
}

/// The rows of a query as sorted text lines: comparing them ignores order.
pub async fn rows(w: &IcePie, sql: &str) -> Vec<String> {
    let batches: Vec<RecordBatch> = w
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for batch in &batches {
        let columns: Vec<ArrayFormatter> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = columns.iter().map(|c| c.value(row).to_string()).collect();
            out.push(cells.join(" | "));
        }
    }
    out.sort();
    out
}

/// Runs SQL that must succeed.
pub async fn run(warehouse: &IcePie, sql: &str) {
    warehouse
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    // Refresh records are written after a refresh returns: other processes (and request
    // counts) see them once written.
    warehouse.flush().await;
}

/// Runs SQL that must fail, returning the error text.
pub async fn fails(warehouse: &IcePie, sql: &str) -> String {
    let result = match warehouse.sql(sql).await {
        Ok(df) => df
            .collect()
            .await
            .map(|_| ())
            .map_err(icepie::IcePieError::from),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => panic!("{sql} succeeded but should have failed"),
        Err(e) => e.to_string(),
    }
}

/// One recorded object-store access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// An object read (get, range reads, head).
    Read(String),
    /// A listing of a prefix.
    List(String),
    /// An object written (put, multipart upload).
    Write(String),
    /// An object written by a copy in the store (the target).
    Copy(String),
    /// An object deleted.
    Delete(String),
}

impl Access {
    /// The object or prefix accessed.
    pub fn path(&self) -> &str {
        match self {
            Access::Read(p)
            | Access::List(p)
            | Access::Write(p)
            | Access::Copy(p)
            | Access::Delete(p) => p,
        }
    }
}

/// An object store that records every read and listing, then delegates.
///
/// The usage files (`_system/usage/`) are written in the background, on a timer, whatever
/// the statements: they are recorded only by a store made [`with_usage`](Self::with_usage).
#[derive(Debug)]
pub struct RecordingStore {
    inner: Arc<dyn ObjectStore>,
    pub log: Arc<Mutex<Vec<Access>>>,
    usage: bool,
}

impl RecordingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            log: Arc::default(),
            usage: false,
        }
    }

    /// A store that also records the accesses to the usage files.
    pub fn with_usage(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            usage: true,
            ..Self::new(inner)
        }
    }

    pub fn take(&self) -> Vec<Access> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn record(&self, a: Access) {
        if self.usage || !a.path().contains("_system/usage") {
            self.log.lock().unwrap().push(a);
        }
    }
}

impl fmt::Display for RecordingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recording({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for RecordingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.record(Access::Write(location.to_string()));
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.record(Access::Write(location.to_string()));
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.record(Access::Read(location.to_string()));
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        self.record(Access::Read(location.to_string()));
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let (log, usage) = (self.log.clone(), self.usage);
        self.inner.delete_stream(
            locations
                .inspect(move |p| {
                    if let Ok(p) = p {
                        if usage || !p.as_ref().contains("_system/usage") {
                            log.lock().unwrap().push(Access::Delete(p.to_string()));
                        }
                    }
                })
                .boxed(),
        )
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.record(Access::List(
            prefix.map(|p| p.to_string()).unwrap_or_default(),
        ));
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.record(Access::List(
            prefix.map(|p| p.to_string()).unwrap_or_default(),
        ));
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.record(Access::List(
            prefix.map(|p| p.to_string()).unwrap_or_default(),
        ));
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.record(Access::Copy(to.to_string()));
        self.inner.copy_opts(from, to, options).await
    }
}

/// Polls `check` every 50 ms until it gives a value, for at most `secs` seconds; `what` says
/// what was awaited when it never comes.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited {secs} s for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A warehouse in a fresh temp dir, opened with `settings` (`icepie.*` names and values).
pub async fn open_with(settings: &[(&str, &str)]) -> (tempfile::TempDir, IcePie) {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = IcePie::builder(dir.path().to_string_lossy().to_string());
    for (k, v) in settings {
        builder = builder.with_setting(*k, *v);
    }
    (dir, builder.open().await.unwrap())
}

/// A clock for [`icepie::IcePieBuilder::with_clock`] that stands still at the moment it was
/// made until a test moves it on: what depends on time passing (dormancy, proposals) is
/// tested without sleeping, and nothing happens between two statements by the clock.
#[derive(Clone)]
pub struct TestClock(Arc<std::sync::atomic::AtomicI64>);

impl TestClock {
    pub fn new() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        Self(Arc::new(std::sync::atomic::AtomicI64::new(now as i64)))
    }

    /// Moves the clock on by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        self.0
            .fetch_add(by.as_millis() as i64, std::sync::atomic::Ordering::SeqCst);
    }

    /// What `with_clock` reads.
    pub fn reader(&self) -> impl Fn() -> i64 + Send + Sync + 'static {
        let now = self.0.clone();
        move || now.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// [`open_with`], on the clock `clock`.
pub async fn open_with_clock(
    settings: &[(&str, &str)],
    clock: &TestClock,
) -> (tempfile::TempDir, IcePie) {
    let dir = tempfile::tempdir().unwrap();
    let mut builder =
        IcePie::builder(dir.path().to_string_lossy().to_string()).with_clock(clock.reader());
    for (k, v) in settings {
        builder = builder.with_setting(*k, *v);
    }
    (dir, builder.open().await.unwrap())
}

/// The version a slice serves.
pub async fn version(warehouse: &IcePie, slice: &str) -> i64 {
    warehouse.slice(slice).await.unwrap().version
}

/// Rows of one load of the workload table `core.t (x BIGINT)`: `x` = 1..=LOAD.
pub const LOAD: i64 = 20_000;

/// One whole load of the workload table.
pub fn load_sql() -> String {
    format!("INGEST INTO t SELECT value AS x FROM generate_series(1, {LOAD})")
}

/// Creates the workload: `core.t` with one load, slice `s` (count and sum of `x`), slice
/// `r` (a count, times 1) and slice `i` (a filter, refreshed incrementally).
pub async fn create_workload(w: &IcePie) {
    run(
        w,
        &format!(
            "CREATE CORE TABLE t (x BIGINT); {};
             CREATE SLICE s AS SELECT count(*) AS n, sum(x) AS total FROM core.t;
             CREATE SLICE r AS SELECT count(*) * 1 AS n FROM core.t;
             CREATE SLICE i INCREMENTAL AS SELECT x * 2 AS y FROM core.t WHERE x % 7 = 0;",
            load_sql()
        ),
    )
    .await;
}

/// What breaks the invariants in a warehouse holding the workload: `core.t` holds whole loads
/// only, and every slice over it holds exactly what its definition gives over the version of
/// `core.t` it records. Empty when all hold.
pub async fn violations(w: &IcePie) -> Vec<String> {
    let mut out = Vec::new();
    let whole = async {
        let count: i64 = scalar(w, "SELECT count(*) FROM core.t")
            .await
            .parse()
            .ok()?;
        let sum: i64 = scalar(w, "SELECT coalesce(sum(x), 0) FROM core.t")
            .await
            .parse()
            .ok()?;
        Some((count, sum))
    };
    match whole.await {
        Some((count, sum)) => {
            let loads = count / LOAD;
            if count % LOAD != 0 || sum != loads * LOAD * (LOAD + 1) / 2 {
                out.push(format!(
                    "core.t holds part of a load: {count} rows, sum {sum}"
                ));
            }
        }
        None => out.push("core.t cannot be counted".into()),
    }
    let unreadable = scalar(
        w,
        "SELECT count(*) FROM system.slices WHERE last_error LIKE 'cannot read the slice%'",
    )
    .await;
    if unreadable != "0" {
        out.push(format!("{unreadable} slice(s) cannot be read"));
    }
    let slices = match w.slices().await {
        Ok(s) => s,
        Err(e) => return vec![format!("system.slices fails: {e}")],
    };
    for info in slices {
        let [input] = info.descriptor.inputs.as_slice() else {
            continue;
        };
        if input.table != "core.t" || input.pinned {
            continue;
        }
        let expected = info
            .descriptor
            .definition
            .replace("core.t", &format!("core_at('t', {})", input.version));
        // Sorted: an incremental refresh appends, so rows need not come in one order.
        let got = rows_of(w, &format!("SELECT * FROM {} ORDER BY 1", info.name)).await;
        let want = rows_of(w, &format!("SELECT * FROM ({expected}) ORDER BY 1")).await;
        if got != want {
            out.push(format!(
                "{} v{} holds {got:?}, but its definition over core.t@{} gives {want:?}",
                info.name, info.version, input.version
            ));
        }
    }
    out
}

/// A query's rows as text, or its error.
async fn rows_of(w: &IcePie, sql: &str) -> std::result::Result<String, String> {
    let df = w.sql(sql).await.map_err(|e| e.to_string())?;
    let batches = df.collect().await.map_err(|e| e.to_string())?;
    pretty_format_batches(&batches)
        .map(|t| t.to_string())
        .map_err(|e| e.to_string())
}

/// True for a listing of the warehouse's change journal (what an idle scheduler tick does).
pub fn journal_listing(a: &Access) -> bool {
    matches!(a, Access::List(p) if p.ends_with("_system/changes"))
}

/// Waits (up to a minute) until a scheduler recording through `store` has finished its
/// first full scan: a half second in which it only listed the change journal.
pub async fn until_idle(store: &RecordingStore) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        store.take();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let seen = store.take();
        if !seen.is_empty() && seen.iter().all(journal_listing) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the scheduler never went idle: {seen:#?}"
        );
    }
}

/// Data files (not the Delta log) under `dir`, recursively.
pub fn data_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "_delta_log") {
                out.extend(data_files(&p));
            }
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Waits until every file written so far is older than VACUUM's cutoff with a grace of 0:
/// object stores report modification times in whole seconds, so VACUUM spares the files of
/// the last second.
pub async fn let_files_age() {
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
}

/// Which of icepie's servers [`serve`] runs.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    Pg,
    Flight,
}

/// A server on a free loopback port; it stops when this is dropped, and keeps its
/// warehouse's directory until then.
pub struct Served {
    pub addr: std::net::SocketAddr,
    _dir: Option<tempfile::TempDir>,
    _stop: tokio::sync::watch::Sender<()>,
}

impl Served {
    /// Keeps `dir` (the warehouse's) as long as the server.
    pub fn keeping(mut self, dir: tempfile::TempDir) -> Self {
        self._dir = Some(dir);
        self
    }
}

/// Serves `warehouse` with `protocol` and `options` on 127.0.0.1.
pub async fn serve(
    protocol: Protocol,
    warehouse: IcePie,
    options: icepie::server::ServerOptions,
) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut stopped) = tokio::sync::watch::channel(());
    tokio::spawn(async move {
        let stop = async move {
            let _ = stopped.changed().await;
        };
        match protocol {
            Protocol::Pg => icepie::server::serve_pg(warehouse, listener, options, stop).await,
            Protocol::Flight => {
                icepie::server::serve_flight(warehouse, listener, options, stop).await
            }
        }
        .unwrap();
    });
    Served {
        addr,
        _dir: None,
        _stop: stop,
    }
}

/// The locations no client of a server started with `--allow-path` may use, laid out on disk:
/// the corpus `tests/data/hostile_locations.txt` (which the unit tests of the policy read
/// too) with its placeholders filled in.
pub struct Hostile {
    _dir: tempfile::TempDir,
    /// `{root}`: the allowed directory's parent, holding the secret one.
    pub root: std::path::PathBuf,
    /// `{allowed}`: what `--allow-path` names.
    pub allowed: std::path::PathBuf,
}

/// The corpus and its layout, shared with the policy's unit tests.
#[path = "../data/hostile.rs"]
#[allow(dead_code)]
mod hostile;

impl Hostile {
    /// Lays out the directories, files and links the corpus's header describes.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (root, allowed) = hostile::layout(dir.path());
        Self {
            _dir: dir,
            root,
            allowed,
        }
    }

    /// What the server is started with: the allowed directory and an object-store prefix.
    pub fn allow_paths(&self) -> Vec<String> {
        vec![
            self.allowed.display().to_string(),
            "s3://bucket/landing".to_string(),
        ]
    }

    /// Every statement of the corpus with every location.
    pub fn statements(&self) -> Vec<String> {
        hostile::locations(hostile::HOSTILE, &self.root, &self.allowed)
            .iter()
            .flat_map(|location| hostile::statements(location))
            .collect()
    }

    /// Every entry under the root, links not followed, with each file's contents: equal
    /// before and after means nothing was written, created or removed.
    pub fn snapshot(&self) -> Vec<(std::path::PathBuf, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    pending.push(path.clone());
                }
                let contents = meta.is_file().then(|| std::fs::read(&path).unwrap());
                out.push((path, contents));
            }
        }
        out.sort();
        out
    }

    /// Checks that nothing under the root, nor the corpus's relative names in the current
    /// directory, was created, changed or removed since `before`.
    pub fn assert_untouched(&self, before: &[(std::path::PathBuf, Option<Vec<u8>>)]) {
        assert_eq!(
            self.snapshot(),
            before,
            "files under {}",
            self.root.display()
        );
        for relative in [
            "icepie-hostile-relative.csv",
            "relative",
            "../icepie-hostile-relative.csv",
        ] {
            assert!(!std::path::Path::new(relative).exists(), "{relative}");
        }
    }
}

/// SplitMix64: small, seedable, the same on every machine.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The warehouse in `dir`, opened without a scheduler: only the test's statements touch it.
pub async fn open_unscheduled(dir: &std::path::Path) -> IcePie {
    IcePie::builder(dir.to_string_lossy().to_string())
        .with_scheduler(false)
        .open()
        .await
        .unwrap()
}

/// The value of the environment variable `name`, or `default` when it is unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
