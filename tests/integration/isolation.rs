//! Invariant 3: a query on a slice reads that slice's files only; a refresh reads only its
//! inputs. Proven by recording every object-store access.

use std::sync::Arc;

use icepie::IcePie;
use object_store::local::LocalFileSystem;

use crate::support::{run, scalar, Access, RecordingStore};

/// The path prefix (relative to the file system root, as object_store names it) of `rel`.
fn prefix(root: &std::path::Path, rel: &str) -> String {
    format!("{}/{rel}", root.to_string_lossy().trim_start_matches('/'))
}

async fn warehouse() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<RecordingStore>,
    IcePie,
) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let store = Arc::new(RecordingStore::new(Arc::new(LocalFileSystem::new())));
    let warehouse = IcePie::builder(root.to_string_lossy().to_string())
        .with_object_store(store.clone())
        // Only the statements under test may touch storage.
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    run(
        &warehouse,
        "CREATE CORE TABLE a (id INT, v TEXT); CREATE CORE TABLE b (id INT, w TEXT);
         INGEST INTO a VALUES (1, 'x'), (2, 'y'); INGEST INTO b VALUES (1, 'p');
         CREATE SLICE s1 AS SELECT id, v FROM core.a;
         CREATE SLICE sales.s2 AS SELECT id, w FROM core.b;",
    )
    .await;
    (dir, root, store, warehouse)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_on_a_slice_reads_only_that_slices_files() {
    let (_dir, root, store, warehouse) = warehouse().await;
    store.take();
    assert_eq!(
        scalar(&warehouse, "SELECT count(*) FROM slices.s1 WHERE v = 'x'").await,
        "1"
    );
    let accesses = store.take();
    let own = prefix(&root, "slices/slices/s1/");
    // The slice's own quarantine record (whether a file of it is known to be damaged).
    let own_record = prefix(&root, "_system/quarantine/slices/slices/s1/");
    let reads: Vec<&String> = accesses
        .iter()
        .filter_map(|a| match a {
            Access::Read(p) => Some(p),
            _ => None,
        })
        .collect();
    assert!(
        reads.iter().any(|p| p.ends_with(".parquet")),
        "the query read no data file: {accesses:?}"
    );
    for p in &reads {
        assert!(
            p.starts_with(&own) || p.starts_with(&own_record),
            "read {p} outside {own}"
        );
    }
    // Listings may enumerate names (folders of the warehouse), never look inside another table.
    for a in &accesses {
        if let Access::List(p) = a {
            for other in ["core/a", "core/b", "slices/sales/s2", "_system"] {
                assert!(
                    !p.starts_with(&prefix(&root, other)),
                    "listed {p}, inside {other}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_reads_only_its_inputs_and_its_own_table() {
    let (_dir, root, store, warehouse) = warehouse().await;
    // New data in both tables, so the refresh has something to read (a refresh with no new
    // data commits at once and reads nothing), and s2's input has moved on too.
    run(
        &warehouse,
        "INGEST INTO a VALUES (3, 'z'); INGEST INTO b VALUES (2, 'q')",
    )
    .await;
    let allowed = [
        prefix(&root, "core/a/"),
        prefix(&root, "slices/slices/s1/"),
        prefix(&root, "_system/refreshes/slices/s1/"),
        // Whether s1 is quarantined (only a full refresh rewrites a damaged file).
        prefix(&root, "_system/quarantine/slices/slices/s1/"),
    ];
    // Incremental (the new rows of a), then full (all of a).
    for refresh in ["REFRESH SLICE s1", "REFRESH SLICE s1 FULL"] {
        store.take();
        run(&warehouse, refresh).await;
        let accesses = store.take();
        let reads: Vec<String> = accesses
            .into_iter()
            .filter_map(|a| match a {
                Access::Read(p) => Some(p),
                _ => None,
            })
            .collect();
        assert!(
            reads
                .iter()
                .any(|p| p.starts_with(&allowed[0]) && p.ends_with(".parquet")),
            "{refresh} read no data file of its input: {reads:?}"
        );
        for p in reads {
            assert!(
                allowed.iter().any(|ok| p.starts_with(ok)),
                "{refresh} of s1 read {p}"
            );
        }
    }
    assert_eq!(scalar(&warehouse, "SELECT count(*) FROM s1").await, "3");
}
