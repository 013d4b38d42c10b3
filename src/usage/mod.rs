//! Usage: which core tables and slices queries read, which of their columns they filter,
//! group and join on, how much they read and how long they took; the evidence that
//! `system.usage` and `system.usage_columns` show.
//!
//! The engine's query planner (`engine::usage_planner`) wraps each query that reads an icepie table,
//! and when the query ends hands [`Usage::record`] one [`Reading`] per table. Recording stays
//! off the query's path: `record` only tries to put the readings in a bounded queue, and when
//! the queue is full it drops them and counts them ([`Usage::dropped`]) rather than wait. One
//! task per open warehouse sums the readings by day, table and *shape* (how the query read its
//! tables) and every 10 seconds, and on [`Usage::flush`], rewrites this process's file of the
//! day with its sums so far ([`files`]): each process writes only its own files, so writers
//! never contend, and a day has one file per process that recorded on it. Once an hour, in a
//! task of its own, it deletes the days older than `icepie.usage_retention` and compacts each
//! day before yesterday into one file.
//!
//! # Invariants
//!
//! - Recording never waits: a full queue drops readings and counts them (test
//!   `usage::tests::a_full_queue_drops_and_counts_instead_of_waiting`).
//! - A reading is counted once, across processes, flushes and compactions (tests
//!   `usage::files::tests::a_process_rewrites_its_own_file_of_the_day`,
//!   `usage::files::tests::a_compacted_day_counts_each_row_once` and
//!   `usage::usage_is_summed_across_two_processes`).

pub(crate) mod files;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use tokio::sync::{mpsc, oneshot};

use files::{day_of, Key, Rows, Sums};

/// UTC timestamps in milliseconds, as every system table and usage file stores them.
pub(crate) fn ts() -> datafusion::arrow::datatypes::DataType {
    use datafusion::arrow::datatypes::{DataType, TimeUnit};
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Marks a session whose plans are not usage: a refresh reading its inputs.
#[derive(Debug)]
pub(crate) struct Quiet;

/// `state`, planning without recording usage.
pub(crate) fn quiet(
    state: &datafusion::execution::SessionState,
) -> datafusion::execution::SessionState {
    let mut config = state.config().clone();
    config.set_extension(Arc::new(Quiet));
    datafusion::execution::SessionStateBuilder::new_from_existing(state.clone())
        .with_config(config)
        .build()
}

/// Readings waiting for the usage task; more are dropped.
const QUEUE: usize = 4096;

/// How often the usage task writes what it has summed.
const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// How often the usage task deletes expired days and compacts past ones.
const TIDY_EVERY: Duration = Duration::from_secs(3600);

/// How a query used a column of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Use {
    /// `col = value`.
    FilterEq,
    /// `col < value`, `BETWEEN`, ...
    FilterRange,
    /// `col IN (...)`.
    FilterIn,
    /// Any other filter on the column (`LIKE`, `IS NULL`, a function of it, `OR`).
    FilterOther,
    /// `GROUP BY col`.
    Group,
    /// A join key.
    Join,
}

impl Use {
    /// The name stored and shown: `filter_eq`, `filter_range`, `filter_in`, `filter_other`,
    /// `group`, `join`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Use::FilterEq => "filter_eq",
            Use::FilterRange => "filter_range",
            Use::FilterIn => "filter_in",
            Use::FilterOther => "filter_other",
            Use::Group => "group",
            Use::Join => "join",
        }
    }
}

impl fmt::Display for Use {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Use {
    /// Every use, in order.
    const ALL: [Use; 6] = [
        Use::FilterEq,
        Use::FilterRange,
        Use::FilterIn,
        Use::FilterOther,
        Use::Group,
        Use::Join,
    ];

    /// The use stored as `name`, if it is one.
    pub(crate) fn from_name(name: &str) -> Option<Use> {
        Use::ALL.into_iter().find(|u| u.name() == name)
    }

    /// Whether files sorted by the column would let such a filter skip files: equality, a
    /// range or `IN`.
    pub(crate) fn prunes(self) -> bool {
        matches!(self, Use::FilterEq | Use::FilterRange | Use::FilterIn)
    }
}

/// One column of a table a query used, and how. Stored and shown as `how:column`
/// (`filter_eq:region`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ColumnUse {
    pub how: Use,
    pub column: String,
}

impl ColumnUse {
    /// The use stored as `text` (`filter_eq:region`), if it is one this icepie knows.
    pub(crate) fn parse(text: &str) -> Option<ColumnUse> {
        let (how, column) = text.split_once(':')?;
        Some(ColumnUse {
            how: Use::from_name(how)?,
            column: column.to_string(),
        })
    }
}

impl fmt::Display for ColumnUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.how, self.column)
    }
}

/// The columns of one table a query used, and how.
pub(crate) type ColumnUses = BTreeSet<(Use, String)>;

/// The text of a query's shape: each table it read with the columns it used, in name order,
/// e.g. `core.orders(filter_range:o_orderdate, join:o_custkey) core.customer(join:c_custkey)`.
pub(crate) fn shape<'a>(tables: impl IntoIterator<Item = (&'a String, &'a ColumnUses)>) -> String {
    let mut out = Vec::new();
    for (table, uses) in tables {
        let uses: Vec<String> = uses.iter().map(|(u, c)| format!("{u}:{c}")).collect();
        out.push(format!("{table}({})", uses.join(", ")));
    }
    out.join(" ")
}

/// How much a table is read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Demand {
    /// The latest read recorded (ms since the epoch).
    pub last_read: Option<i64>,
    /// Queries per day over the last week.
    pub reads_per_day: f64,
}

/// Days over which reads per day are averaged.
const DEMAND_DAYS: i64 = 7;

/// How much each table is read, from the usage `rows` recorded over the `window` before `now`
/// (at least [`DEMAND_DAYS`]).
pub(crate) fn demand(
    rows: &Rows,
    window: Duration,
    now: i64,
) -> std::collections::HashMap<String, Demand> {
    let since = day_of(now.saturating_sub(demand_window(window)));
    let week = day_of(now - DEMAND_DAYS * DAY_MS);
    let mut out: std::collections::HashMap<String, Demand> = Default::default();
    for (key, sums) in rows.iter().filter(|(k, _)| k.day >= since) {
        let d = out.entry(key.table.clone()).or_default();
        d.last_read = d.last_read.max(Some(sums.last_at));
        if key.day > week {
            d.reads_per_day += sums.queries as f64 / DEMAND_DAYS as f64;
        }
    }
    out
}

/// A day in milliseconds.
const DAY_MS: i64 = 86_400_000;

/// The span [`demand`] reads: `window`, at least [`DEMAND_DAYS`], in milliseconds.
pub(crate) fn demand_window(window: Duration) -> i64 {
    i64::try_from(window.as_millis())
        .unwrap_or(i64::MAX)
        .max(DEMAND_DAYS * DAY_MS)
}

/// One query's read of one table.
#[derive(Debug, Clone)]
pub(crate) struct Reading {
    /// When the query ended, in milliseconds since the epoch.
    pub at: i64,
    /// Qualified name: `core.orders`, `finance.revenue`.
    pub table: String,
    /// `core` or `slice`.
    pub kind: &'static str,
    /// The query's [`shape`].
    pub shape: Arc<str>,
    /// The columns of this table the query used, and how.
    pub columns: Vec<ColumnUse>,
    /// Rows and bytes (in memory) the query returned.
    pub rows_returned: u64,
    pub bytes_returned: u64,
    /// Rows and bytes read from this table's files, and its files read and skipped.
    pub rows_scanned: u64,
    pub bytes_scanned: u64,
    pub files_scanned: u64,
    pub files_skipped: u64,
    /// From planning to the end of the query.
    pub latency: Duration,
    /// The definition of a slice that would answer the query (queries of core tables only).
    pub example: Option<Arc<str>>,
}

impl Reading {
    fn sums(&self) -> Sums {
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let latency = int(self.latency.as_micros().min(u64::MAX as u128) as u64);
        Sums {
            columns: self.columns.clone(),
            queries: 1,
            rows_returned: int(self.rows_returned),
            bytes_returned: int(self.bytes_returned),
            rows_scanned: int(self.rows_scanned),
            bytes_scanned: int(self.bytes_scanned),
            files_scanned: int(self.files_scanned),
            files_skipped: int(self.files_skipped),
            latency_us_total: latency,
            latency_us_max: latency,
            first_at: self.at,
            last_at: self.at,
            example: self.example.as_deref().map(str::to_string),
        }
    }
}

/// `d` in milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

enum Message {
    Readings(Vec<Reading>),
    Flush(oneshot::Sender<()>),
}

/// The clock a warehouse judges reads by (when a read happened, whether a slice is unread
/// or dormant, what to propose) and its scheduler judges what is due by: milliseconds since
/// the Unix epoch. The system's by default ([`IcePieBuilder::with_clock`]).
///
/// [`IcePieBuilder::with_clock`]: crate::IcePieBuilder::with_clock
#[derive(Clone)]
pub(crate) struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    /// The system's clock.
    pub(crate) fn system() -> Self {
        Self(Arc::new(now_ms))
    }

    /// A clock that reads `f`.
    pub(crate) fn new(f: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Now, in milliseconds since the epoch.
    pub(crate) fn now_ms(&self) -> i64 {
        (self.0)()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// The usage recorder of one open warehouse.
#[derive(Debug)]
pub(crate) struct Usage {
    /// The clock reads are dated and judged by.
    pub clock: Clock,
    sender: mpsc::Sender<Message>,
    dropped: AtomicU64,
    /// `icepie.usage_retention`, in milliseconds.
    retention_ms: Arc<AtomicU64>,
    /// The latest read of each table by this process, as the usage task received them.
    local: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
    store: Arc<dyn ObjectStore>,
    /// Writes of this process's usage files so far: a cache read before the latest is stale.
    written: Arc<AtomicU64>,
    /// The usage files as last read ([`Usage::recorded`]).
    cache: tokio::sync::Mutex<Option<Recorded>>,
}

/// The usage files as read at one moment.
#[derive(Debug)]
struct Recorded {
    at: Instant,
    /// [`Usage::written`] when read.
    written: u64,
    /// The first day read.
    since: i32,
    rows: Arc<Rows>,
}

/// How long [`Usage::recorded`] serves what it read before reading again (sooner when this
/// process writes its own usage meanwhile).
const RECORDED_FOR: Duration = Duration::from_secs(30);

impl Usage {
    /// The latest read of each table by this process (written or not yet).
    pub(crate) fn local_reads(&self) -> std::collections::HashMap<String, i64> {
        self.local.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Starts the usage task of the warehouse whose store (paths relative to its root) is
    /// `store`. The task ends once every handle is dropped, after writing what it holds.
    pub(crate) fn start(
        store: Arc<dyn ObjectStore>,
        retention: Duration,
        clock: Clock,
    ) -> Arc<Self> {
        let (sender, receiver) = mpsc::channel(QUEUE);
        let process = format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let retention_ms = Arc::new(AtomicU64::new(millis(retention)));
        let local = Arc::<std::sync::Mutex<_>>::default();
        let written = Arc::new(AtomicU64::new(0));
        let task = Task {
            store: store.clone(),
            process,
            local: Arc::clone(&local),
            retention_ms: retention_ms.clone(),
            written: written.clone(),
            days: BTreeMap::new(),
            dirty: BTreeSet::new(),
            tidied: None,
            tidying: Arc::default(),
        };
        tokio::spawn(task.run(receiver));
        Arc::new(Self {
            clock,
            sender,
            dropped: AtomicU64::new(0),
            retention_ms,
            local,
            store,
            written,
            cache: tokio::sync::Mutex::new(None),
        })
    }

    /// The usage recorded in the warehouse by every process from day `since` on (rows of
    /// earlier days may be included: callers filter by day). What was read is served for
    /// [`RECORDED_FOR`], or until this process writes its own usage; when the files cannot
    /// be read, what was read before is served, and the error only when nothing was.
    pub(crate) async fn recorded(&self, since: i32) -> crate::error::Result<Arc<Rows>> {
        let mut cache = self.cache.lock().await;
        let written = self.written.load(Ordering::Acquire);
        if let Some(c) = cache
            .as_ref()
            .filter(|c| c.written == written && c.since <= since && c.at.elapsed() < RECORDED_FOR)
        {
            return Ok(c.rows.clone());
        }
        match files::read(self.store.as_ref(), since).await {
            Ok(rows) => {
                let rows = Arc::new(rows);
                *cache = Some(Recorded {
                    at: Instant::now(),
                    written,
                    since,
                    rows: rows.clone(),
                });
                Ok(rows)
            }
            Err(e) => match cache.as_ref().filter(|c| c.since <= since) {
                Some(c) => Ok(c.rows.clone()),
                None => Err(e),
            },
        }
    }

    /// Queues `readings` for the usage task, or drops them when the queue is full.
    pub(crate) fn record(&self, readings: Vec<Reading>) {
        let n = readings.len() as u64;
        if n > 0 && self.sender.try_send(Message::Readings(readings)).is_err() {
            self.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Writes everything recorded so far to the warehouse, and waits until it is written.
    pub(crate) async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.sender.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Readings dropped because the queue was full.
    #[cfg(test)]
    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sets how long usage is kept.
    pub(crate) fn set_retention(&self, retention: Duration) {
        self.retention_ms
            .store(millis(retention), Ordering::Relaxed);
    }
}

/// The usage task: sums readings and writes them.
struct Task {
    store: Arc<dyn ObjectStore>,
    process: String,
    /// [`Usage::local_reads`].
    local: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
    retention_ms: Arc<AtomicU64>,
    /// [`Usage::written`].
    written: Arc<AtomicU64>,
    /// Everything this process recorded, per day: a day's file is rewritten whole.
    days: BTreeMap<i32, Rows>,
    /// Days recorded on since their file was last written.
    dirty: BTreeSet<i32>,
    tidied: Option<Instant>,
    /// Set while a clean-up runs (in a task of its own, so that recording goes on).
    tidying: Arc<AtomicBool>,
}

impl Task {
    async fn run(mut self, mut receiver: mpsc::Receiver<Message>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = receiver.recv() => match message {
                    Some(Message::Readings(readings)) => self.add(readings),
                    Some(Message::Flush(done)) => {
                        self.write().await;
                        let _ = done.send(());
                    }
                    None => {
                        self.write().await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    self.write().await;
                    self.tidy();
                }
            }
        }
    }

    fn add(&mut self, readings: Vec<Reading>) {
        if let Ok(mut local) = self.local.lock() {
            for r in &readings {
                let at = local.entry(r.table.clone()).or_insert(r.at);
                *at = (*at).max(r.at);
            }
        }
        for r in readings {
            let key = Key {
                day: day_of(r.at),
                process: self.process.clone(),
                table: r.table.clone(),
                kind: r.kind.to_string(),
                shape: r.shape.to_string(),
            };
            self.dirty.insert(key.day);
            self.days
                .entry(key.day)
                .or_default()
                .entry(key)
                .or_default()
                .add(&r.sums());
        }
    }

    /// Rewrites the file of each day recorded on since it was last written; a day whose
    /// write fails stays to be written next time. Days before yesterday that are written
    /// are forgotten: readings are dated when their query ends, so no more come for them.
    async fn write(&mut self) {
        let mut wrote = false;
        for day in std::mem::take(&mut self.dirty) {
            let Some(rows) = self.days.get(&day) else {
                continue;
            };
            match files::write(self.store.as_ref(), day, &self.process, rows).await {
                Ok(_) => wrote = true,
                Err(_) => {
                    self.dirty.insert(day);
                }
            }
        }
        if wrote {
            self.written.fetch_add(1, Ordering::AcqRel);
        }
        let yesterday = day_of(now_ms()).saturating_sub(1);
        let dirty = &self.dirty;
        self.days
            .retain(|day, _| *day >= yesterday || dirty.contains(day));
    }

    /// Once an hour, in a task of its own, deletes the days older than the retention and
    /// compacts past ones. Only a process that recorded something tidies: one that never
    /// does never lists the usage files.
    fn tidy(&mut self) {
        let due = self.tidied.is_none_or(|t| t.elapsed() >= TIDY_EVERY);
        if self.days.is_empty() || !due || self.tidying.swap(true, Ordering::AcqRel) {
            return;
        }
        self.tidied = Some(Instant::now());
        let store = self.store.clone();
        let tidying = self.tidying.clone();
        let retention =
            i64::try_from(self.retention_ms.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        tokio::spawn(async move {
            let now = now_ms();
            let since = day_of(now.saturating_sub(retention));
            let yesterday = day_of(now).saturating_sub(1);
            // Usage is evidence, not data: a failed clean-up is retried an hour later.
            let _ = files::tidy(store.as_ref(), since, yesterday).await;
            tidying.store(false, Ordering::Release);
        });
    }
}

/// Now, in milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn reading(table: &str) -> Reading {
        Reading {
            at: 1_700_000_000_000,
            table: table.into(),
            kind: "slice",
            shape: "s".into(),
            columns: vec![ColumnUse {
                how: Use::FilterEq,
                column: "a".into(),
            }],
            rows_returned: 1,
            bytes_returned: 8,
            rows_scanned: 10,
            bytes_scanned: 100,
            files_scanned: 1,
            files_skipped: 2,
            latency: Duration::from_millis(3),
            example: None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // A usage handle whose task never reads: the queue fills and stays full.
        let (sender, _receiver) = mpsc::channel(QUEUE);
        let usage = Usage {
            clock: Clock::system(),
            sender,
            dropped: AtomicU64::new(0),
            retention_ms: Arc::default(),
            local: Arc::default(),
            store: Arc::new(InMemory::new()),
            written: Arc::default(),
            cache: Default::default(),
        };
        for _ in 0..QUEUE + 10 {
            usage.record(vec![reading("d.s"), reading("d.t")]);
        }
        assert_eq!(usage.dropped(), 20);
    }

    #[tokio::test]
    async fn recorded_usage_is_read_again_once_this_process_writes() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let usage = Usage::start(
            store.clone(),
            Duration::from_secs(86_400 * 30),
            Clock::system(),
        );
        // Readings are dated when their query ends: today.
        let reading = |table: &str| Reading {
            at: now_ms(),
            ..reading(table)
        };
        usage.record(vec![reading("d.s")]);
        usage.flush().await;
        let tables =
            |rows: &Rows| -> BTreeSet<String> { rows.keys().map(|k| k.table.clone()).collect() };
        assert_eq!(tables(&usage.recorded(0).await.unwrap()).len(), 1);
        // Another process's file: not read again while what was read is recent.
        let other = Usage::start(
            store.clone(),
            Duration::from_secs(86_400 * 30),
            Clock::system(),
        );
        other.record(vec![reading("d.t")]);
        other.flush().await;
        assert_eq!(tables(&usage.recorded(0).await.unwrap()).len(), 1);
        // This process writes: everything is read again.
        usage.record(vec![reading("d.u")]);
        usage.flush().await;
        let all = tables(&usage.recorded(0).await.unwrap());
        assert_eq!(all, ["d.s", "d.t", "d.u"].map(String::from).into());
    }

    #[tokio::test]
    async fn readings_are_summed_by_day_table_and_shape_and_written() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let usage = Usage::start(
            store.clone(),
            Duration::from_secs(86_400 * 30),
            Clock::system(),
        );
        usage.record(vec![reading("d.s"), reading("d.t")]);
        usage.record(vec![reading("d.s")]);
        usage.flush().await;
        let rows = files::read(store.as_ref(), 0).await.unwrap();
        assert_eq!(rows.len(), 2);
        let s = rows.iter().find(|(k, _)| k.table == "d.s").unwrap().1;
        assert_eq!((s.queries, s.rows_scanned, s.files_skipped), (2, 20, 4));
        assert_eq!((s.latency_us_total, s.latency_us_max), (6000, 3000));
        assert_eq!(
            s.columns,
            vec![ColumnUse {
                how: Use::FilterEq,
                column: "a".into()
            }]
        );
        assert_eq!(s.columns[0].to_string(), "filter_eq:a");
    }

    #[test]
    fn a_column_use_reads_back_as_it_was_stored() {
        for how in Use::ALL {
            let used = ColumnUse {
                how,
                column: "a:b".into(),
            };
            assert_eq!(ColumnUse::parse(&used.to_string()), Some(used));
        }
        assert_eq!(ColumnUse::parse("sorted:a"), None);
        assert_eq!(ColumnUse::parse("filter_eq"), None);
    }
}
