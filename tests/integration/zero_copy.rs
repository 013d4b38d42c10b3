//! Zero-copy loads: Parquet files whose schema is the table's are copied into the core as they
//! are (never hard-linked), read in full before the commit, and committed with exact
//! statistics; files that need casting take the rewriting path; bad files load nothing and
//! leave nothing behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::prelude::SessionContext;
use futures::stream::BoxStream;
use icepie::IcePie;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

use crate::support::{fails, open_unscheduled, run, scalar};

/// Writes `query`'s rows to the Parquet file `path` with DataFusion.
pub(crate) async fn write_parquet(path: &Path, query: &str) {
    let ctx = SessionContext::new();
    ctx.sql(&format!(
        "COPY ({query}) TO '{}' STORED AS PARQUET",
        path.display()
    ))
    .await
    .unwrap()
    .collect()
    .await
    .unwrap();
}

/// Landing files `part-0.parquet`… holding `x` = 1..=`rows` between them (`x BIGINT NOT NULL`,
/// a name `n` and a price), in `parts` files; the glob naming them.
pub(crate) async fn landing(dir: &Path, rows: i64, parts: i64) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let per = rows / parts;
    for p in 0..parts {
        let (from, to) = (
            p * per + 1,
            if p == parts - 1 { rows } else { (p + 1) * per },
        );
        write_parquet(
            &dir.join(format!("part-{p}.parquet")),
            &format!(
                "SELECT value AS x, 'name ' || value AS n, \
                 CAST(CAST(value AS DECIMAL(12, 2)) / 100 AS DECIMAL(12, 2)) AS price \
                 FROM generate_series({from}, {to})"
            ),
        )
        .await;
    }
    format!("{}/*.parquet", dir.display())
}

/// Landing files holding one whole load of the workload table `core.t (x BIGINT)` (`x` =
/// 1..=LOAD, in two files that qualify for a zero-copy load); the glob naming them.
pub(crate) async fn workload_landing(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let half = crate::support::LOAD / 2;
    for (name, from, to) in [("a", 1, half), ("b", half + 1, crate::support::LOAD)] {
        write_parquet(
            &dir.join(format!("{name}.parquet")),
            &format!("SELECT value AS x FROM generate_series({from}, {to})"),
        )
        .await;
    }
    format!("{}/*.parquet", dir.display())
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|x| x == "parquet"));
    files.sort();
    files
}

fn contents(files: &[PathBuf]) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    all.sort();
    all
}

const TABLE: &str = "CREATE CORE TABLE t (x BIGINT, n VARCHAR, price DECIMAL(12, 2))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_that_fits_is_copied_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let land = dir.path().join("landing");
    let glob = landing(&land, 3000, 3).await;
    let w = open_unscheduled(&dir.path().join("w")).await;
    run(&w, TABLE).await;
    run(&w, &format!("INGEST INTO t FROM '{glob}'")).await;
    let table = dir.path().join("w/core/t");
    // The table's files are the landing files, byte for byte, and copies, not links.
    assert!(
        contents(&parquet_files(&table)) == contents(&parquet_files(&land)),
        "the table's files are not the landing files"
    );
    for f in parquet_files(&land).iter().chain(&parquet_files(&table)) {
        assert_eq!(std::fs::metadata(f).unwrap().nlink(), 1, "{f:?} is linked");
    }
    let whole = "SELECT count(*) || ' ' || sum(x) || ' ' || sum(price) FROM core.t";
    assert_eq!(scalar(&w, whole).await, "3000 4501500 45015.00");
    // Statistics are exact: pruning by them keeps the right rows.
    for (query, expected) in [
        ("SELECT count(*) FROM core.t WHERE x > 2990", "10"),
        ("SELECT count(*) FROM core.t WHERE x <= 1000", "1000"),
        ("SELECT count(*) FROM core.t WHERE n = 'name 2001'", "1"),
        ("SELECT count(*) FROM core.t WHERE price >= 29.99", "2"),
        ("SELECT count(*) FROM core.t WHERE x IS NULL", "0"),
    ] {
        assert_eq!(scalar(&w, query).await, expected, "{query}");
    }
    // A later write to a landing file does not reach the core.
    write_parquet(
        &parquet_files(&land)[0],
        "SELECT CAST(-1 AS BIGINT) AS x, 'changed' AS n, CAST(0 AS DECIMAL(12, 2)) AS price",
    )
    .await;
    assert_eq!(
        scalar(&open_unscheduled(&dir.path().join("w")).await, whole).await,
        "3000 4501500 45015.00"
    );
    // A plain appendable Delta table (writer protocol 2 at most), so the next load can copy.
    let log = std::fs::read_to_string(
        dir.path()
            .join("w/core/t/_delta_log/00000000000000000000.json"),
    )
    .unwrap();
    assert!(log.contains(r#""minWriterVersion":2"#), "{log}");
    // The load's commit names the files it copied.
    let load = std::fs::read_to_string(
        dir.path()
            .join("w/core/t/_delta_log/00000000000000000001.json"),
    )
    .unwrap();
    assert!(
        load.contains(r#""copied":["file:///"#) && load.contains("landing/part-2.parquet"),
        "{load}"
    );
    // A new table made from the files is a copy too, with the files' types.
    run(
        &w,
        &format!(
            "CREATE CORE TABLE u FROM '{}/part-1.parquet'",
            land.display()
        ),
    )
    .await;
    assert!(
        contents(&parquet_files(&dir.path().join("w/core/u")))
            == contents(&[land.join("part-1.parquet")]),
        "the new table's file is not the landing file"
    );
    assert_eq!(
        scalar(
            &w,
            "SELECT count(*) || ' ' || min(x) || ' ' || max(price) FROM core.u"
        )
        .await,
        "1000 1001 20.00"
    );
    let log = std::fs::read_to_string(
        dir.path()
            .join("w/core/u/_delta_log/00000000000000000000.json"),
    )
    .unwrap();
    assert!(
        log.contains(r#""minWriterVersion":2"#) && log.contains(r#""delta.appendOnly":"true""#),
        "{log}"
    );
    // And the next load into it copies too.
    run(
        &w,
        &format!("INGEST INTO u FROM '{}/part-2.parquet'", land.display()),
    )
    .await;
    assert_eq!(parquet_files(&dir.path().join("w/core/u")).len(), 2);
    assert!(
        contents(&parquet_files(&dir.path().join("w/core/u")))
            == contents(&[land.join("part-1.parquet"), land.join("part-2.parquet")]),
        "the second load into the new table was not a copy"
    );
    assert_eq!(
        scalar(
            &w,
            "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) \
             FROM information_schema.columns WHERE table_schema = 'core' AND table_name = 'u'"
        )
        .await,
        "x Int64, n Utf8View, price Decimal128(12, 2)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_that_needs_casting_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let land = dir.path().join("landing");
    std::fs::create_dir_all(&land).unwrap();
    // An INT column into a BIGINT one, and a nullable one into NOT NULL.
    write_parquet(
        &land.join("narrow.parquet"),
        "SELECT CAST(value AS INT) AS x FROM generate_series(1, 100)",
    )
    .await;
    write_parquet(
        &land.join("nullable.parquet"),
        "SELECT CASE WHEN value > 0 THEN value END AS x FROM generate_series(1, 50)",
    )
    .await;
    let w = open_unscheduled(&dir.path().join("w")).await;
    run(&w, "CREATE CORE TABLE t (x BIGINT NOT NULL)").await;
    for file in ["narrow", "nullable"] {
        run(
            &w,
            &format!("INGEST INTO t FROM '{}/{file}.parquet'", land.display()),
        )
        .await;
    }
    assert_eq!(
        scalar(&w, "SELECT count(*) || ' ' || sum(x) FROM core.t").await,
        "150 6325"
    );
    let table = contents(&parquet_files(&dir.path().join("w/core/t")));
    for landed in contents(&parquet_files(&land)) {
        assert!(!table.contains(&landed), "a file needing a cast was copied");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_parquet_or_is_damaged_loads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let land = dir.path().join("landing");
    landing(&land, 1000, 2).await;
    let w = open_unscheduled(&dir.path().join("w")).await;
    run(&w, TABLE).await;
    let table = dir.path().join("w/core/t");
    let before = parquet_files(&table).len();

    // Not Parquet at all.
    std::fs::write(land.join("part-9.parquet"), b"id,name\n1,not parquet\n").unwrap();
    let refused = fails(
        &w,
        &format!("INGEST INTO t FROM '{}/*.parquet'", land.display()),
    )
    .await;
    assert!(
        refused.contains("part-9.parquet") && refused.contains("Parquet"),
        "{refused}"
    );
    assert_eq!(scalar(&w, "SELECT count(*) FROM core.t").await, "0");
    assert_eq!(parquet_files(&table).len(), before);

    // A sound footer over damaged pages: found by reading the copy, before the commit.
    let mut bytes = std::fs::read(land.join("part-1.parquet")).unwrap();
    bytes[4..40].fill(0xff);
    std::fs::write(land.join("part-9.parquet"), bytes).unwrap();
    let refused = fails(
        &w,
        &format!("INGEST INTO t FROM '{}/*.parquet'", land.display()),
    )
    .await;
    assert!(refused.contains("part-9.parquet"), "{refused}");
    assert_eq!(scalar(&w, "SELECT count(*) FROM core.t").await, "0");
    assert_eq!(
        parquet_files(&table).len(),
        before,
        "the copies of a failed load are taken back"
    );

    // Without the bad file, the load works.
    std::fs::remove_file(land.join("part-9.parquet")).unwrap();
    run(
        &w,
        &format!("INGEST INTO t FROM '{}/*.parquet'", land.display()),
    )
    .await;
    assert_eq!(scalar(&w, "SELECT count(*) FROM core.t").await, "1000");
}

/// A local file system on which a whole-file read of a path containing `gone` finds nothing:
/// a file listed, and its footer read, that disappears before it is copied.
#[derive(Debug)]
struct Vanishing {
    inner: LocalFileSystem,
    gone: &'static str,
}

impl std::fmt::Display for Vanishing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vanishing({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Vanishing {
    async fn put_opts(
        &self,
        location: &StorePath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &StorePath,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &StorePath, options: GetOptions) -> Result<GetResult> {
        if options.range.is_none() && location.as_ref().contains(self.gone) {
            return Err(object_store::Error::NotFound {
                path: location.to_string(),
                source: "deleted meanwhile".into(),
            });
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<StorePath>>,
    ) -> BoxStream<'static, Result<StorePath>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&StorePath>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&StorePath>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &StorePath,
        to: &StorePath,
        options: CopyOptions,
    ) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_disappears_mid_load_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let land = dir.path().join("landing");
    let glob = landing(&land, 3000, 3).await;
    let store = Arc::new(Vanishing {
        inner: LocalFileSystem::new(),
        gone: "landing/part-2",
    });
    let w = IcePie::builder(dir.path().join("w").to_string_lossy().to_string())
        .with_object_store(store)
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    run(&w, TABLE).await;
    let refused = fails(&w, &format!("INGEST INTO t FROM '{glob}'")).await;
    assert!(
        refused.contains("part-2.parquet") && refused.contains("deleted meanwhile"),
        "{refused}"
    );
    assert_eq!(scalar(&w, "SELECT count(*) FROM core.t").await, "0");
    assert_eq!(
        parquet_files(&dir.path().join("w/core/t")),
        Vec::<PathBuf>::new(),
        "the files copied before it are taken back"
    );
}
