//! The parts that touch storage, against a real S3-protocol server: `moto` in server mode on
//! 127.0.0.1, started by each test ([`crate::tools::moto_server`]: `ICEPIE_MOTO`, else the one
//! the tests install in their own virtualenv on first use). Built with `--features s3`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use icepie::IcePie;
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::support::{fails, run, scalar, version, Access, RecordingStore};

const BUCKET: &str = "icepie";

/// A moto server on a free port of 127.0.0.1 with an empty bucket; stopped when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Self {
        // First: making the tests' virtualenv may take minutes, longer than a port stays free.
        let command = crate::tools::moto_server();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(command)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start the S3 server '{}' ({e}): ICEPIE_MOTO, if set, must name \
                     moto_server",
                    command.display()
                )
            });
        let moto = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while moto.request("PUT", &format!("/{BUCKET}")).is_err() {
            assert!(Instant::now() < deadline, "moto did not start on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// One unsigned HTTP request (moto does not check signatures); the status line.
    fn request(&self, method: &str, path: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.port
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        match out.lines().next() {
            Some(status) if status.contains(" 200 ") => Ok(status.to_string()),
            other => Err(std::io::Error::other(format!("{other:?}"))),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    const OPTIONS: [(&'static str, &'static str); 4] = [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_ALLOW_HTTP", "true"),
    ];

    /// A warehouse under `prefix` of the bucket.
    async fn open(&self, prefix: &str, settings: &[(&str, &str)]) -> IcePie {
        self.open_with(prefix, settings, None).await
    }

    async fn open_with(
        &self,
        prefix: &str,
        settings: &[(&str, &str)],
        store: Option<Arc<dyn ObjectStore>>,
    ) -> IcePie {
        let mut b = IcePie::builder(format!("s3://{BUCKET}/{prefix}"))
            .with_storage_option("AWS_ENDPOINT_URL", self.endpoint());
        for (k, v) in Self::OPTIONS {
            b = b.with_storage_option(k, v);
        }
        for (k, v) in settings {
            b = b.with_setting(*k, *v);
        }
        if let Some(store) = store {
            b = b.with_object_store(store);
        }
        b.open().await.unwrap()
    }

    /// The bucket as an object store, every request recorded.
    fn recording(&self) -> Arc<RecordingStore> {
        let s3 = AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(self.endpoint())
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_allow_http(true)
            .build()
            .unwrap();
        Arc::new(RecordingStore::new(Arc::new(s3)))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const OFF: (&str, &str) = ("scheduler", "off");

/// The whole life of a slice on S3: core tables, ingest, slices, refresh, freeze and thaw,
/// rollback, history, vacuum, drops; and a second process sees all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_lives_its_whole_life_on_s3() {
    let moto = Moto::start();
    let w = moto.open("life", &[OFF]).await;
    run(
        &w,
        "CREATE CORE TABLE orders (id BIGINT, amount BIGINT);
         INGEST INTO orders VALUES (1, 10), (2, 20);
         CREATE SLICE sales.totals AS SELECT count(*) AS n, sum(amount) AS total FROM core.orders;",
    )
    .await;
    assert_eq!(scalar(&w, "SELECT total FROM sales.totals").await, "30");
    run(
        &w,
        "INGEST INTO orders VALUES (3, 30); REFRESH SLICE sales.totals",
    )
    .await;
    assert_eq!(scalar(&w, "SELECT total FROM sales.totals").await, "60");
    run(&w, "FREEZE SLICE sales.totals 'audit'").await;
    let refused = fails(&w, "REFRESH SLICE sales.totals").await;
    assert!(refused.contains("frozen"), "{refused}");
    run(
        &w,
        "THAW SLICE sales.totals; ROLLBACK SLICE sales.totals TO VERSION 0",
    )
    .await;
    assert_eq!(scalar(&w, "SELECT total FROM sales.totals").await, "30");
    assert_eq!(
        scalar(&w, "SELECT count(*) FROM slice_history('sales.totals')").await,
        "5"
    );
    assert_eq!(
        scalar(&w, "SELECT total FROM slice_at('sales.totals', 1)").await,
        "60"
    );
    // Another process sees everything, and its refresh builds from the latest core.
    let other = moto.open("life", &[OFF]).await;
    assert_eq!(
        scalar(
            &other,
            "SELECT state FROM system.slices WHERE name = 'totals'"
        )
        .await,
        "stale"
    );
    run(&other, "REFRESH SLICE sales.totals").await;
    assert_eq!(scalar(&w, "SELECT total FROM sales.totals").await, "60");
    assert_eq!(
        scalar(
            &w,
            "SELECT count(*) FROM system.refreshes WHERE slice = 'sales.totals'"
        )
        .await,
        "3"
    );
    // S3 stamps objects in whole seconds, and the store clock VACUUM judges by is measured
    // from such a stamp against a write's round trip: on a busy machine its cutoff may trail
    // the files' times by more than the second `let_files_age` waits (a flake seen in CI).
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    run(
        &w,
        "SET icepie.vacuum_enforce_grace = off; SET icepie.vacuum_grace = '0s';
         SET icepie.retain_versions = 1; VACUUM SLICE sales.totals",
    )
    .await;
    assert_eq!(scalar(&w, "SELECT total FROM sales.totals").await, "60");
    // Another process, whatever its own retain_versions, learns the files are gone.
    let gone = fails(&other, "SELECT * FROM slice_at('sales.totals', 1)").await;
    assert!(gone.contains("VACUUM"), "{gone}");
    run(&w, "DROP SLICE sales.totals; DROP CORE TABLE orders").await;
    assert_eq!(
        scalar(&other, "SELECT count(*) FROM system.slices").await,
        "0"
    );
    assert_eq!(
        scalar(&other, "SELECT count(*) FROM system.core_tables").await,
        "0"
    );
}

/// Two processes refreshing one slice at once on S3: conditional puts settle every commit,
/// so versions are numbered without gaps or duplicates and the data is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_s3_never_lose_or_duplicate_a_version() {
    let moto = Moto::start();
    let a = moto.open("race", &[OFF]).await;
    run(
        &a,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s AS SELECT sum(n) AS total FROM core.t;",
    )
    .await;
    let b = moto.open("race", &[OFF]).await;
    let rounds = 4;
    let (ra, rb) = tokio::join!(
        async {
            for _ in 0..rounds {
                run(&a, "REFRESH SLICE s").await;
            }
        },
        async {
            for _ in 0..rounds {
                run(&b, "REFRESH SLICE s").await;
            }
        }
    );
    let _ = (ra, rb);
    let latest = version(&a, "s").await;
    let history = a.history("s").await.unwrap();
    assert_eq!(history.len() as i64, latest + 1, "one entry per version");
    assert!(history
        .iter()
        .all(|h| h.descriptor.is_some() && h.rows == Some(1)));
    let successes: i64 = scalar(
        &a,
        "SELECT count(*) FROM system.refreshes WHERE kind = 'refresh' AND status = 'success'",
    )
    .await
    .parse()
    .unwrap();
    assert_eq!(successes, latest, "one success per refresh version");
    assert_eq!(scalar(&b, "SELECT total FROM s").await, "1");
}

/// The request budgets of `budgets.rs` hold on S3: a query on a slice read before costs one
/// listing of its log, one GET of its quarantine record and its data reads, with 1 slice or
/// 11; a refresh costs the same with 1 slice or 11 and touches nothing of the others; and the
/// lease and change journal work with S3's conditional puts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_budgets_hold_on_s3() {
    let moto = Moto::start();
    let store = moto.recording();
    let w = moto
        .open_with(
            "budgets",
            &[OFF],
            Some(store.clone() as Arc<dyn ObjectStore>),
        )
        .await;
    run(
        &w,
        "CREATE CORE TABLE a (id BIGINT); INGEST INTO a VALUES (1), (2);
         CREATE SLICE s1 AS SELECT id FROM core.a;",
    )
    .await;
    let query = "SELECT sum(id) FROM slices.s1";
    scalar(&w, query).await;
    store.take();
    scalar(&w, query).await;
    let before = store.take();
    let lists = before
        .iter()
        .filter(|a| matches!(a, Access::List(_)))
        .count();
    let data = before
        .iter()
        .filter(|a| a.path().ends_with(".parquet"))
        .count();
    assert_eq!(lists, 1, "{before:#?}");
    assert_eq!(before.len(), 2 + data, "{before:#?}");
    let refresh = "REFRESH SLICE s1";
    run(&w, refresh).await;
    store.take();
    run(&w, refresh).await;
    let refresh_before = store.take();
    let mut more = String::new();
    for i in 0..10 {
        more.push_str(&format!(
            "CREATE SLICE other.t{i} AS SELECT id FROM core.a;"
        ));
    }
    run(&w, &more).await;
    scalar(&w, query).await;
    store.take();
    assert_eq!(scalar(&w, query).await, "3");
    let after = store.take();
    assert_eq!(after.len(), before.len(), "{after:#?}");
    eprintln!(
        "S3 requests of a query on one slice: {} (1 listing, 1 GET of its quarantine record, {} \
         data reads)",
        after.len(),
        data
    );
    // A refresh costs the same with 1 slice or 11, and touches nothing of the others.
    run(&w, refresh).await;
    store.take();
    run(&w, refresh).await;
    let refresh_after = store.take();
    assert_eq!(
        refresh_after.len(),
        refresh_before.len(),
        "{refresh_before:#?}\n{refresh_after:#?}"
    );
    assert!(
        refresh_after.iter().all(|a| !a.path().contains("/other/")),
        "{refresh_after:#?}"
    );
    eprintln!("S3 requests of REFRESH SLICE: {}", refresh_after.len());
    // A scheduler's idle ticks on S3: listings of the change journal only.
    let scheduled = moto
        .open_with(
            "budgets",
            &[("scheduler_tick", "50ms")],
            Some(store.clone() as Arc<dyn ObjectStore>),
        )
        .await;
    crate::support::until_idle(&store).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let idle = store.take();
    assert!(
        !idle.is_empty() && idle.iter().all(crate::support::journal_listing),
        "{idle:#?}"
    );
    drop(scheduled);
}

/// Leases on S3: one process takes a slice's lease, a second cannot until it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scheduler_per_slice_on_s3() {
    let moto = Moto::start();
    let a = moto.open("lease", &[OFF]).await;
    run(
        &a,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s REFRESH EVERY '1 second' AS SELECT sum(n) AS total, now() AS at FROM core.t;",
    )
    .await;
    // Leases expire after 6 missed heartbeats: long enough that a loaded machine never lets
    // one lapse under a live holder.
    let fast = [("scheduler_tick", "50ms"), ("heartbeat", "1s")];
    let x = moto.open("lease", &fast).await;
    let y = moto.open("lease", &fast).await;
    crate::support::eventually(60, "three scheduled refreshes", || async {
        (version(&a, "s").await >= 3).then_some(())
    })
    .await;
    x.close(Duration::from_secs(30)).await;
    y.close(Duration::from_secs(30)).await;
    let statuses = scalar(
        &a,
        "SELECT string_agg(status, ',' ORDER BY started_at) FROM system.refreshes \
         WHERE kind = 'refresh'",
    )
    .await;
    assert!(statuses.split(',').all(|s| s == "success"), "{statuses}");
    let successes: i64 = scalar(
        &a,
        "SELECT count(*) FROM system.refreshes WHERE kind = 'refresh'",
    )
    .await
    .parse()
    .unwrap();
    assert_eq!(successes, version(&a, "s").await);
}

/// The crash test of `crash.rs` on S3: the real `icepie` binary, pointed at the server by the
/// environment as a user would (`AWS_ENDPOINT_URL`, …), is killed at random moments; every
/// fresh process then sees whole versions only and goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_on_s3_leaves_whole_versions() {
    let moto = Moto::start();
    let endpoint = moto.endpoint();
    let mut env = vec![("AWS_ENDPOINT_URL", endpoint.as_str())];
    env.extend(Moto::OPTIONS);
    let location = format!("s3://{BUCKET}/crash");
    let open = || moto.open("crash", &crate::crash::SETTINGS);
    crate::crash::kill_trials(&location, &env, crate::crash::trials(6), 3000, open).await;
}

/// INGEST of Parquet files in the warehouse's own bucket copies them in the store (a
/// server-side copy): the table's files are the landing files byte for byte, none of the data
/// travels through icepie's process but its reading of the copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_in_the_bucket_is_copied_server_side() {
    let moto = Moto::start();
    let store = moto.recording();
    let local = tempfile::tempdir().unwrap();
    crate::zero_copy::workload_landing(local.path()).await;
    let mut landed = Vec::new();
    for name in ["a", "b"] {
        let bytes = std::fs::read(local.path().join(format!("{name}.parquet"))).unwrap();
        let path = object_store::path::Path::from(format!("landing/{name}.parquet"));
        store.put(&path, bytes.clone().into()).await.unwrap();
        landed.push(bytes);
    }
    let w = moto.open_with("zero", &[OFF], Some(store.clone())).await;
    run(&w, "CREATE CORE TABLE t (x BIGINT)").await;
    store.take();
    run(
        &w,
        &format!("INGEST INTO t FROM 's3://{BUCKET}/landing/' FORMAT parquet"),
    )
    .await;
    let accesses = store.take();
    let copies: Vec<&str> = accesses
        .iter()
        .filter(|a| matches!(a, Access::Copy(_)))
        .map(Access::path)
        .collect();
    assert_eq!(copies.len(), 2, "{accesses:#?}");
    assert!(
        copies.iter().all(|p| p.starts_with("zero/core/t/")),
        "{copies:?}"
    );
    assert!(
        !accesses
            .iter()
            .any(|a| matches!(a, Access::Write(p) if p.ends_with(".parquet"))),
        "a data file was uploaded: {accesses:#?}"
    );
    let load = crate::support::LOAD;
    assert_eq!(
        scalar(&w, "SELECT count(*) || ' ' || sum(x) FROM core.t").await,
        format!("{load} {}", load * (load + 1) / 2)
    );
    let mut copied = Vec::new();
    for path in copies {
        let path = object_store::path::Path::from(path);
        copied.push(
            store
                .get(&path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec(),
        );
    }
    copied.sort();
    landed.sort();
    assert!(copied == landed, "the copies differ from the landing files");
}

/// VACUUM racing REFRESH from two processes on S3 (`races.rs`): no file a version references
/// is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_racing_refresh_on_s3_never_deletes_a_referenced_file() {
    let moto = Moto::start();
    let a = moto.open("vacuum", &crate::crash::SETTINGS).await;
    let b = moto.open("vacuum", &crate::crash::SETTINGS).await;
    crate::support::create_workload(&a).await;
    crate::races::vacuum_racing_refresh(&a, &b, crate::races::rounds_or(3)).await;
}
