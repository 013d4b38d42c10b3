//! Races between processes (two independent handles on one location: no lock, cache or memory
//! shared): FREEZE vs REFRESH, CREATE vs CREATE of one name, VACUUM vs REFRESH, DROP CORE
//! TABLE vs CREATE SLICE reading it. No version is lost or mixed, no file a version
//! references is deleted, and each loser says why.
//!
//! CI runs each race 5 times; `ICEPIE_RACES=200` runs the long form.

use icepie::{IcePie, SliceState};

use crate::support::{create_workload, load_sql, run, scalar, violations};

fn rounds() -> usize {
    rounds_or(5)
}

/// Rounds of a race: `ICEPIE_RACES`, else `default`.
pub(crate) fn rounds_or(default: usize) -> usize {
    std::env::var("ICEPIE_RACES")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// Two handles on a warehouse holding the workload (`core.t`, slice `s`).
async fn two_processes() -> (tempfile::TempDir, IcePie, IcePie) {
    let dir = tempfile::tempdir().unwrap();
    let open = || async {
        IcePie::builder(dir.path().to_string_lossy().to_string())
            .with_scheduler(false)
            .with_setting("retain_versions", "1000")
            .with_setting("vacuum_enforce_grace", "off")
            .with_setting("vacuum_grace", "0 seconds")
            .open()
            .await
            .unwrap()
    };
    let (a, b) = (open().await, open().await);
    create_workload(&a).await;
    (dir, a, b)
}

/// Every version of `slice` is one icepie commit, numbered without gaps, and the warehouse
/// holds whole versions only.
async fn whole(w: &IcePie, slice: &str) {
    let history = w.history(slice).await.unwrap();
    let versions: Vec<i64> = history.iter().rev().map(|h| h.version).collect();
    assert_eq!(versions, (0..versions.len() as i64).collect::<Vec<_>>());
    assert!(
        history.iter().all(|h| h.descriptor.is_some()),
        "{history:?}"
    );
    let broken = violations(w).await;
    assert!(broken.is_empty(), "{broken:?}");
    let verified = w.verify(slice).await.unwrap();
    assert!(verified.files.iter().all(|f| f.ok()), "{verified:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_racing_refresh_never_commits_a_refresh_over_a_freeze() {
    let (_dir, a, b) = two_processes().await;
    for _ in 0..rounds() {
        run(&a, &load_sql()).await;
        let (frozen, refreshed) = tokio::join!(a.freeze("s", Some("race".into())), b.refresh("s"));
        if let Err(e) = &refreshed {
            let msg = e.to_string();
            assert!(
                msg.contains("frozen"),
                "the refresh lost to the freeze: {msg}"
            );
        }
        let frozen = frozen.unwrap();
        assert!(frozen.committed);
        // Whatever the order, the freeze holds at the end.
        assert_eq!(b.slice("s").await.unwrap().state, SliceState::Frozen);
        run(&b, "THAW SLICE s").await;
        whole(&a, "s").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_creates_of_one_name_make_one_slice() {
    let (_dir, a, b) = two_processes().await;
    for round in 0..rounds() {
        let name = format!("c{round}");
        let (first, second) = (
            format!("CREATE SLICE {name} AS SELECT count(*) AS n FROM core.t"),
            format!("CREATE SLICE {name} AS SELECT sum(x) AS n FROM core.t"),
        );
        let (x, y) = tokio::join!(a.sql(&first), b.sql(&second));
        let winners = [x.is_ok(), y.is_ok()].iter().filter(|ok| **ok).count();
        assert_eq!(winners, 1, "{:?} / {:?}", x.err(), y.err());
        let loser = x.err().or(y.err()).unwrap().to_string();
        assert!(
            loser.contains("already exists") || loser.contains("another writer"),
            "{loser}"
        );
        assert_eq!(a.history(&name).await.unwrap().len(), 1);
        whole(&b, &name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vacuum_racing_refresh_never_deletes_a_referenced_file() {
    let (_dir, a, b) = two_processes().await;
    vacuum_racing_refresh(&a, &b, rounds()).await;
}

/// `rounds` times, a load then VACUUM through `a` racing REFRESH through `b` (two handles on
/// one warehouse holding the workload): both succeed, versions stay whole and the slice
/// counts every loaded row.
pub(crate) async fn vacuum_racing_refresh(a: &IcePie, b: &IcePie, rounds: usize) {
    for _ in 0..rounds {
        run(a, &load_sql()).await;
        let (vacuumed, refreshed) = tokio::join!(a.vacuum("s"), b.refresh("s"));
        vacuumed.unwrap();
        refreshed.unwrap();
        whole(a, "s").await;
        assert_eq!(
            scalar(a, "SELECT n FROM s").await,
            scalar(a, "SELECT count(*) FROM core.t").await
        );
    }
}

/// A new core table `u<round>`, then `DROP CORE TABLE` through `dropper` racing `CREATE SLICE
/// y<round>` reading it through `creator`: the table and slice names and both outcomes.
async fn drop_racing_create(
    dropper: &IcePie,
    creator: &IcePie,
    round: usize,
) -> (String, String, icepie::Result<()>, icepie::Result<()>) {
    let (table, slice) = (format!("u{round}"), format!("y{round}"));
    run(
        dropper,
        &format!("CREATE CORE TABLE {table} (x BIGINT); INGEST INTO {table} VALUES (7)"),
    )
    .await;
    let (drop, create) = (
        format!("DROP CORE TABLE {table}"),
        format!("CREATE SLICE {slice} AS SELECT sum(x) AS v FROM core.{table}"),
    );
    let (dropped, created) = tokio::join!(dropper.sql(&drop), creator.sql(&create));
    (table, slice, dropped.map(|_| ()), created.map(|_| ()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_core_table_racing_a_slice_that_reads_it() {
    let (_dir, a, b) = two_processes().await;
    for round in 0..rounds() {
        let (table, slice, dropped, created) = drop_racing_create(&a, &b, round).await;
        match (dropped, created) {
            // The drop saw the slice and refused, naming it.
            (Err(e), Ok(())) => assert!(e.to_string().contains(&slice), "{e}"),
            // The slice was planned after the drop: no such table.
            (Ok(()), Err(e)) => assert!(e.to_string().contains(&table), "{e}"),
            // Both ran: the slice serves what it read, and says its input is gone.
            (Ok(()), Ok(())) => {
                assert_eq!(scalar(&a, &format!("SELECT v FROM {slice}")).await, "7");
                let e = b.refresh(&slice).await.unwrap_err().to_string();
                assert!(e.contains(&table), "{e}");
            }
            (Err(d), Err(c)) => panic!("both failed: {d} / {c}"),
        }
        if let Ok(info) = a.slice(&slice).await {
            assert!(a.verify(&slice).await.unwrap().files.iter().all(|f| f.ok()));
            assert_eq!(info.version, 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_one_process_a_dropped_core_table_never_gains_a_reader() {
    let (_dir, a, _b) = two_processes().await;
    for round in 0..rounds() {
        let (table, slice, dropped, created) = drop_racing_create(&a, &a, round).await;
        match (dropped, created) {
            (Err(e), Ok(())) => assert!(e.to_string().contains(&slice), "{e}"),
            (Ok(()), Err(e)) => assert!(e.to_string().contains(&table), "{e}"),
            (d, c) => panic!("drop {d:?}, create {c:?}"),
        }
    }
}
