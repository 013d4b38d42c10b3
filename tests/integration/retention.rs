//! Retention: VACUUM deletes only files no retained version references, never while a reader
//! or a refresh may still need them, and never a file of the core.

use crate::support::{data_files, fails, open_with, run, scalar, table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_keeps_what_readers_may_need_and_deletes_the_rest() {
    let (dir, w) = open_with(&[("scheduler", "off"), ("retain_versions", "1")]).await;
    run(
        &w,
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
         CREATE SLICE s AS SELECT sum(n) AS total FROM core.t;
         INGEST INTO t VALUES (2); REFRESH SLICE s;",
    )
    .await;
    let slice_dir = dir.path().join("slices/slices/s");
    let core_dir = dir.path().join("core/t");

    // A reader plans a query on version 1; a refresh then commits version 2.
    let reader = w.sql("SELECT total FROM s").await.unwrap();
    run(&w, "INGEST INTO t VALUES (3); REFRESH SLICE s").await;
    assert_eq!(data_files(&slice_dir).len(), 3);
    let core_files = data_files(&core_dir);

    // Only one version is retained, but versions 0 and 1 were current less than the grace
    // period (1 hour by default) ago: their files stay, and the reader still reads.
    assert_eq!(
        table(&w, "VACUUM SLICE s").await,
        "+----------+---------------+---------------+---------------+-------------------+\n\
         | slice    | retained_from | files_deleted | bytes_deleted | log_files_deleted |\n\
         +----------+---------------+---------------+---------------+-------------------+\n\
         | slices.s | 0             | 0             | 0             | 0                 |\n\
         +----------+---------------+---------------+---------------+-------------------+"
    );
    let batches = reader.collect().await.unwrap();
    assert_eq!(
        datafusion::arrow::util::display::array_value_to_string(batches[0].column(0), 0).unwrap(),
        "3"
    );

    // A file of a refresh still being written is newer than the grace period: kept.
    let in_flight = slice_dir.join("part-in-flight.parquet");
    std::fs::write(&in_flight, b"not committed yet").unwrap();
    run(&w, "VACUUM SLICES").await;
    assert!(in_flight.exists());

    // A grace too short for other processes' refreshes and readers is refused...
    run(&w, "SET icepie.vacuum_grace = '0 seconds'").await;
    let err = fails(&w, "VACUUM SLICE s").await;
    assert!(
        err.contains("vacuum_grace") && err.contains("vacuum_enforce_grace = off"),
        "{err}"
    );
    assert!(in_flight.exists());
    // ...unless asked for: everything but version 2's file goes, orphans included.
    run(&w, "SET icepie.vacuum_enforce_grace = off").await;
    crate::support::let_files_age().await;
    let out = w.vacuum("s").await.unwrap();
    assert_eq!((out.retained_from, out.files_deleted), (2, 3));
    assert!(!in_flight.exists());
    assert_eq!(data_files(&slice_dir).len(), 1);
    assert_eq!(scalar(&w, "SELECT total FROM s").await, "6");
    // The core is never vacuumed.
    assert_eq!(data_files(&core_dir), core_files);

    // Versions not retained are refused with a clear error, not a missing file.
    run(&w, "SET icepie.retain_versions = 10").await;
    let err = fails(&w, "ROLLBACK SLICE s TO VERSION 0").await;
    assert!(
        err.contains("deleted by VACUUM, which kept versions 2 and later"),
        "{err}"
    );
    // Also for another process whose own retention would allow it.
    let err = fails(&w, "SELECT * FROM slice_at('s', 1)").await;
    assert!(err.contains("deleted by VACUUM"), "{err}");
    assert_eq!(scalar(&w, "SELECT total FROM s").await, "6");
}

/// VACUUM's watermark belongs to the table it vacuumed: a slice dropped and made again under
/// its name inherits nothing, and its own old versions stay readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_made_again_inherits_no_vacuum_watermark() {
    let (_dir, w) = open_with(&[("scheduler", "off"), ("retain_versions", "1")]).await;
    let three_versions = "INGEST INTO t VALUES (2); REFRESH SLICE s;
                          INGEST INTO t VALUES (3); REFRESH SLICE s;";
    run(
        &w,
        &format!(
            "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
             CREATE SLICE s AS SELECT sum(n) AS total FROM core.t; {three_versions}
             SET icepie.vacuum_grace = '0 seconds'; SET icepie.vacuum_enforce_grace = off;"
        ),
    )
    .await;
    crate::support::let_files_age().await;
    assert_eq!(w.vacuum("s").await.unwrap().retained_from, 2);
    run(&w, "SET icepie.retain_versions = 10").await;
    let err = fails(&w, "SELECT * FROM slice_at('s', 1)").await;
    assert!(err.contains("deleted by VACUUM"), "{err}");

    run(
        &w,
        &format!(
            "DROP SLICE s; CREATE SLICE s AS SELECT sum(n) * 10 AS total FROM core.t;
             {three_versions}"
        ),
    )
    .await;
    assert_eq!(scalar(&w, "SELECT total FROM slice_at('s', 1)").await, "80");
    run(&w, "ROLLBACK SLICE s TO VERSION 0").await;
    assert_eq!(scalar(&w, "SELECT total FROM s").await, "60");
}
