//! The `incremental` section: after 1% more lineitem rows are appended to the core, an
//! incremental `REFRESH SLICE` of a filter/projection, a TPC-H Q1-shaped aggregate and a
//! Q3-shaped fact-dimension join, against the same refresh in full (`REFRESH SLICE … FULL`)
//! and against DuckDB computing the same query from the same Parquet files (when its Python
//! package is found: `ICEPIE_DUCKDB_PYTHON`, default `python3`). It also prints the bytes the
//! incremental refresh read from storage against the bytes of the new files, and its time
//! against DataFusion computing the definition over the new rows only (`COPY` to Parquet):
//! the engine's limit for the work an increment does, so the difference is what icepie and
//! Delta add (planning the increment, merging stored states, the commit and its records).
//!
//! Each timed incremental refresh starts from the slice rolled back to its version before the
//! append (untimed), so every run reads the same new data.

use std::ops::Range;
use std::process::Command;
use std::sync::atomic::AtomicU64;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use super::*;

/// The slices measured, with the target of incremental time / full time.
pub(super) const SLICES: [(&str, &str, f64); 3] = [
    (
        "filter_project",
        "SELECT l_orderkey, l_partkey, l_quantity, l_extendedprice * (1 - l_discount) AS revenue \
         FROM core.lineitem WHERE l_shipmode IN ('MAIL', 'SHIP')",
        0.03,
    ),
    (
        "aggregate_q1",
        "SELECT l_returnflag, l_linestatus, sum(l_quantity) AS sum_qty, \
         sum(l_extendedprice) AS sum_base_price, \
         sum(l_extendedprice * (1 - l_discount)) AS sum_disc_price, \
         sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge, \
         avg(l_quantity) AS avg_qty, avg(l_extendedprice) AS avg_price, \
         avg(l_discount) AS avg_disc, count(*) AS count_order \
         FROM core.lineitem WHERE l_shipdate <= DATE '1998-09-02' \
         GROUP BY l_returnflag, l_linestatus",
        0.03,
    ),
    (
        "join_q3",
        "SELECT l_orderkey, sum(l_extendedprice * (1 - l_discount)) AS revenue, o_orderdate, \
         o_shippriority FROM core.customer, core.orders, core.lineitem \
         WHERE c_mktsegment = 'BUILDING' AND c_custkey = o_custkey AND l_orderkey = o_orderkey \
         AND o_orderdate < DATE '1995-03-15' AND l_shipdate > DATE '1995-03-15' \
         GROUP BY l_orderkey, o_orderdate, o_shippriority",
        0.10,
    ),
];

/// The write strategies of an aggregate compared: blocks of 64 order keys above `{edge}` (about
/// 94,000 groups at SF 1), where `{edge}` leaves 16 blocks for the appended lineitems to fall
/// in, stored in files of 128 KB (the groups the new rows fall in are replaced, the files
/// holding none are kept) and in one file (merged and rewritten whole).
const BLOCKS: &str =
    "SELECT l_orderkey / 64 AS block, count(*) AS n, sum(l_extendedprice) AS revenue, \
     avg(l_discount) AS disc FROM core.lineitem WHERE l_orderkey > {edge} GROUP BY l_orderkey / 64";
/// Blocks of [`BLOCKS`] the appended rows fall in.
const TOUCHED_BLOCKS: i64 = 16;

/// Target of incremental time / DuckDB's time.
const DUCKDB_TARGET: f64 = 0.10;
/// Target of bytes read / bytes of the new files.
const BYTES_TARGET: f64 = 1.5;

/// Counts the bytes read through it.
#[derive(Debug)]
struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    read: AtomicU64,
}

impl std::fmt::Display for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CountingStore({})", self.inner)
    }
}

impl CountingStore {
    fn take(&self) -> u64 {
        self.read.swap(0, Ordering::SeqCst)
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &StorePath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &StorePath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &StorePath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let got = self.inner.get_opts(location, options).await?;
        self.read
            .fetch_add(got.range.end - got.range.start, Ordering::SeqCst);
        Ok(got)
    }

    async fn get_ranges(
        &self,
        location: &StorePath,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<bytes::Bytes>> {
        let n: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        self.read.fetch_add(n, Ordering::SeqCst);
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<StorePath>>,
    ) -> BoxStream<'static, object_store::Result<StorePath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&StorePath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&StorePath>,
        offset: &StorePath,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&StorePath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &StorePath,
        to: &StorePath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// The bytes of `files` on disk (`file://` URLs or paths).
fn size_of(files: &[String]) -> u64 {
    files
        .iter()
        .map(|f| {
            let path = f.strip_prefix("file://").unwrap_or(f);
            std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
        })
        .sum()
}

/// The median time DuckDB takes to compute `sql` over the core tables' current files, or
/// `None` when its Python package is not there.
fn duckdb_time(files: &[(&str, Vec<String>)], sql: &str) -> Option<Duration> {
    let python = std::env::var("ICEPIE_DUCKDB_PYTHON").unwrap_or_else(|_| "python3".into());
    let tables: Vec<String> = files
        .iter()
        .map(|(t, f)| {
            let paths: Vec<String> = f
                .iter()
                .map(|p| format!("'{}'", p.strip_prefix("file://").unwrap_or(p)))
                .collect();
            format!(
                "con.execute(\"CREATE VIEW core.{t} AS SELECT * FROM read_parquet([{}])\")",
                paths.join(", ")
            )
        })
        .collect();
    let script = format!(
        "import duckdb, time\n\
         con = duckdb.connect()\n\
         con.execute('SET enable_progress_bar = false')\n\
         con.execute('CREATE SCHEMA core')\n\
         {}\n\
         times = []\n\
         for i in range({}):\n    \
             s = time.perf_counter()\n    \
             con.execute('''CREATE OR REPLACE TEMP TABLE r AS {sql}''')\n    \
             times.append(time.perf_counter() - s)\n\
         times = sorted(times[1:])\n\
         print(times[len(times) // 2])\n",
        tables.join("\n"),
        runs() + 1
    );
    let out = Command::new(python).arg("-c").arg(script).output().ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.contains("No module named 'duckdb'") {
            println!(
                "(DuckDB failed: {})",
                err.lines().last().unwrap_or_default()
            );
        }
        return None;
    }
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(Duration::from_secs_f64(secs))
}

/// The mode and reason of the slice's latest version.
async fn last_build(w: &IcePie, slice: &str) -> String {
    let sql = format!(
        "SELECT mode || ': ' || reason FROM slice_history('{slice}') ORDER BY version DESC LIMIT 1"
    );
    let batches = w.sql(&sql).await.unwrap().collect().await.unwrap();
    datafusion::arrow::util::display::array_value_to_string(batches[0].column(0), 0).unwrap()
}

pub(super) async fn incremental(src: &Path, root: &Path, sf: f64) {
    let dir = root.join("incremental");
    std::fs::create_dir_all(&dir).unwrap();
    let store = Arc::new(CountingStore {
        inner: Arc::new(LocalFileSystem::new()),
        read: AtomicU64::new(0),
    });
    let w = IcePie::builder(dir.to_string_lossy().to_string())
        .with_object_store(store.clone())
        .with_scheduler(false)
        // Every run rolls back to the version before the append.
        .with_setting("retain_versions", "1000")
        .open()
        .await
        .expect("open the warehouse");
    load_core(&w, src, &["lineitem", "orders", "customer"]).await;
    // 1% more lineitem rows, loaded into the core once the slices are built.
    let extra = root.join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    let extra_file = extra.join("lineitem.parquet");
    write_parquet(
        &extra_file,
        LineItemArrow::new(LineItemGenerator::new(sf, 1, 100)).map(|b| b.expect("generate")),
    );
    let edge = {
        let ctx = SessionContext::new();
        let path = extra_file.to_string_lossy();
        ctx.register_parquet("extra", path.as_ref(), Default::default())
            .await
            .unwrap();
        let batches = ctx
            .sql("SELECT max(l_orderkey) FROM extra")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let max: i64 =
            datafusion::arrow::util::display::array_value_to_string(batches[0].column(0), 0)
                .unwrap()
                .parse()
                .unwrap();
        (max / 64 - TOUCHED_BLOCKS + 1) * 64 - 1
    };
    let blocks = BLOCKS.replace("{edge}", &edge.to_string());
    let mut before = Vec::new();
    for (name, sql, _) in SLICES {
        run(&w, &format!("CREATE SLICE inc.{name} INCREMENTAL AS {sql}")).await;
        before.push(w.slice(&format!("inc.{name}")).await.unwrap().version);
    }
    run(
        &w,
        &format!(
            "SET icepie.target_file_size = '128KB'; \
             CREATE SLICE inc.blocks_in_files INCREMENTAL AS {blocks}; \
             SET icepie.target_file_size = '100MB'; \
             CREATE SLICE inc.blocks_in_one INCREMENTAL AS {blocks}"
        ),
    )
    .await;
    w.flush().await;

    let old_files = delta_files(&dir.join("core/lineitem")).await;
    run(
        &w,
        &format!(
            "INGEST INTO core.lineitem FROM '{}' FORMAT parquet",
            extra_file.display()
        ),
    )
    .await;
    let all_files = delta_files(&dir.join("core/lineitem")).await;
    let new_files: Vec<String> = all_files
        .iter()
        .filter(|f| !old_files.contains(f))
        .cloned()
        .collect();
    let new_bytes = size_of(&new_files);
    let core_files = [
        ("lineitem", all_files.clone()),
        ("orders", delta_files(&dir.join("core/orders")).await),
        ("customer", delta_files(&dir.join("core/customer")).await),
    ];
    // The engine's limit for the same work: DataFusion computing the definition over the new
    // lineitem rows only (orders and customer whole), written to Parquet by `COPY`.
    let over_new = SessionContext::new();
    run_df(&over_new, "CREATE SCHEMA core").await;
    for (table, files) in [
        ("lineitem", new_files.clone()),
        ("orders", core_files[1].1.clone()),
        ("customer", core_files[2].1.clone()),
    ] {
        over_new
            .register_table(format!("core.{table}"), listing(&over_new, files).await)
            .unwrap();
    }
    let copied = root.join("incremental_copy.parquet");
    println!(
        "(appended {} new lineitem file(s), {new_bytes} bytes, to {} bytes)",
        new_files.len(),
        size_of(&all_files)
    );

    for ((name, sql, target), version) in SLICES.into_iter().zip(before) {
        let slice = format!("inc.{name}");
        let (mut inc, mut full, mut read) = (Vec::new(), Vec::new(), Vec::new());
        for run_no in 0..=runs() {
            if w.slice(&slice).await.unwrap().version != version {
                run(&w, &format!("ROLLBACK SLICE {slice} TO VERSION {version}")).await;
            }
            w.flush().await;
            store.take();
            let start = Instant::now();
            w.refresh(&slice).await.expect("incremental refresh");
            let took = start.elapsed();
            let bytes = store.take();
            w.flush().await;
            let built = last_build(&w, &slice).await;
            if !built.starts_with("incremental") {
                println!("({slice} did not refresh incrementally: {built})");
            }
            let start = Instant::now();
            w.refresh_full(&slice).await.expect("full refresh");
            let took_full = start.elapsed();
            w.flush().await;
            // The first round warms up.
            if run_no > 0 {
                inc.push(took);
                full.push(took_full);
                read.push(bytes);
            }
        }
        let (inc, full) = (median(inc), median(full));
        report(
            &format!("incremental {name}"),
            inc,
            full,
            "full refresh",
            target,
        );
        match duckdb_time(&core_files, sql) {
            Some(duck) => {
                report(
                    &format!("incremental {name}"),
                    inc,
                    duck,
                    "DuckDB",
                    DUCKDB_TARGET,
                );
            }
            None => println!(
                "{:<34} DuckDB not found (pip install duckdb, or set ICEPIE_DUCKDB_PYTHON)",
                format!("incremental {name}")
            ),
        }
        let copy = format!("COPY ({sql}) TO '{}' STORED AS PARQUET", copied.display());
        let limit = time(|| async {
            run_df(&over_new, &copy).await;
        })
        .await;
        report(
            &format!("incremental {name}"),
            inc,
            limit,
            "DF on new rows",
            f64::INFINITY,
        );
        read.sort();
        let bytes = read[read.len() / 2];
        let ratio = bytes as f64 / new_bytes.max(1) as f64;
        println!(
            "{:<34} read {bytes:>12} bytes   new files {new_bytes:>12} bytes   ratio {ratio:>5.2} \
             (target <= {BYTES_TARGET:.2}){}",
            format!("incremental {name}"),
            if ratio <= BYTES_TARGET {
                ""
            } else {
                "  ABOVE TARGET"
            }
        );
    }
    write_strategies(&w, &store).await;
}

/// The incremental refresh of [`BLOCKS`] replacing the [`TOUCHED_BLOCKS`] groups the new rows
/// fall in, in a slice of many files, against merging every group and rewriting the slice of
/// one file.
async fn write_strategies(w: &IcePie, store: &CountingStore) {
    let mut measured = Vec::new();
    for slice in ["inc.blocks_in_files", "inc.blocks_in_one"] {
        let version = 0;
        let sql = format!(
            "SELECT files FROM system.slices WHERE domain = 'inc' AND name = '{}'",
            &slice[4..]
        );
        let batches = w.sql(&sql).await.unwrap().collect().await.unwrap();
        let files =
            datafusion::arrow::util::display::array_value_to_string(batches[0].column(0), 0)
                .unwrap();
        let (mut took, mut read) = (Vec::new(), Vec::new());
        for run_no in 0..=runs() {
            if w.slice(slice).await.unwrap().version != version {
                run(w, &format!("ROLLBACK SLICE {slice} TO VERSION {version}")).await;
            }
            w.flush().await;
            store.take();
            let start = Instant::now();
            w.refresh(slice).await.expect("incremental refresh");
            let elapsed = start.elapsed();
            let bytes = store.take();
            w.flush().await;
            if run_no == 0 {
                println!("({slice}, {files} file(s): {})", last_build(w, slice).await);
            } else {
                took.push(elapsed);
                read.push(bytes);
            }
        }
        took.sort();
        read.sort();
        measured.push((took[took.len() / 2], read[read.len() / 2]));
    }
    let ((replace, replace_read), (whole, whole_read)) = (measured[0], measured[1]);
    println!(
        "{:<34} {:>8.1} ms  vs merge and rewrite whole {:>8.1} ms  ratio {:>5.2}   read {} vs {} bytes",
        format!("aggregate: replace {TOUCHED_BLOCKS} groups"),
        replace.as_secs_f64() * 1e3,
        whole.as_secs_f64() * 1e3,
        replace.as_secs_f64() / whole.as_secs_f64(),
        replace_read,
        whole_read
    );
}
