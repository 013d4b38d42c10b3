//! Crash test: the real `icepie` binary runs INGEST (of a query's rows, and of Parquet files
//! copied as they are), REFRESH (full and incremental), CREATE OR REPLACE, FREEZE,
//! THAW, ROLLBACK and VACUUM in a loop and is killed (SIGKILL) at random moments. After each
//! kill a fresh process must see exactly one whole committed version of every table (the core
//! holds whole loads; each slice holds what its definition gives over the core version it
//! records), and the next statements must work.
//!
//! CI runs 24 kills on local disk and 6 on S3 (`s3.rs`); `ICEPIE_CRASH_TRIALS=1000` runs the
//! long form, `ICEPIE_CRASH_SEED=n` replays a run (the seed is printed).

use std::process::{Command, Stdio};
use std::time::Duration;

use icepie::IcePie;

use crate::support::{create_workload, load_sql, run, scalar, violations, LOAD};

/// A small, seedable random number generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }
}

/// One round of the work the child does, repeated until it is killed: `landing` names
/// Parquet files holding one whole load, which INGEST copies in as they are.
fn round(landing: &str) -> String {
    format!(
        "{};
         INGEST INTO t FROM '{landing}';
         REFRESH SLICE s;
         REFRESH SLICE i;
         CREATE OR REPLACE SLICE r AS SELECT count(*) * 2 AS n FROM core.t;
         FREEZE SLICE s 'crash test';
         THAW SLICE s;
         ROLLBACK SLICE s TO VERSION 0;
         CREATE OR REPLACE SLICE r AS SELECT count(*) * 1 AS n FROM core.t;
         REFRESH SLICE s;
         VACUUM SLICES;
         ",
        load_sql()
    )
}

/// The settings of the warehouse under test and of the child: every version kept, vacuum
/// deletes at once.
pub(crate) const SETTINGS: [(&str, &str); 4] = [
    ("scheduler", "off"),
    ("retain_versions", "1000"),
    ("vacuum_enforce_grace", "off"),
    ("vacuum_grace", "0 seconds"),
];

/// Kills per run: `ICEPIE_CRASH_TRIALS`, else `default`.
pub(crate) fn trials(default: usize) -> usize {
    std::env::var("ICEPIE_CRASH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(default)
}

/// The crash trials on the warehouse at `location` (created by `open`, which applies
/// [`SETTINGS`]): `trials` times, a child `icepie` with `env` runs the workload and is killed
/// after a random delay of up to `max_delay_ms`; then a fresh process checks the invariants and
/// runs the next statements. Panics with every violation found.
pub(crate) async fn kill_trials<F, Fut>(
    location: &str,
    env: &[(&str, &str)],
    trials: usize,
    max_delay_ms: u64,
    open: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = IcePie>,
{
    let seed = std::env::var("ICEPIE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("crash test on {location}: {trials} kills, ICEPIE_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    create_workload(&open().await).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("work.sql");
    let landing = crate::zero_copy::workload_landing(&dir.path().join("landing")).await;
    std::fs::write(&script, round(&landing).repeat(50)).unwrap();
    let mut broken = Vec::new();
    for trial in 0..trials {
        let mut child = Command::new(env!("CARGO_BIN_EXE_icepie"))
            .args(["--data", location, "-q"])
            .args(
                SETTINGS
                    .iter()
                    .flat_map(|(k, v)| ["--set".into(), format!("{k}={v}")]),
            )
            .arg("-f")
            .arg(&script)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.between(30, max_delay_ms))).await;
        let finished = child.try_wait().unwrap();
        assert!(
            finished.is_none(),
            "the child stopped before it was killed ({finished:?}): it cannot reach the \
             warehouse"
        );
        child.kill().unwrap();
        child.wait().unwrap();

        // A fresh process: whole versions only, and the next statements work.
        let w = open().await;
        for v in violations(&w).await {
            broken.push(format!("after kill {trial}: {v}"));
        }
        let next = async {
            w.thaw("s").await?;
            w.refresh("s").await?;
            w.sql(&load_sql()).await?;
            w.refresh("r").await
        };
        if let Err(e) = next.await {
            broken.push(format!(
                "after kill {trial}: the next statement failed: {e}"
            ));
        }
    }
    let w = open().await;
    let reached = scalar(
        &w,
        "SELECT string_agg(name || ' v' || version, ', ' ORDER BY name) FROM system.slices",
    )
    .await;
    eprintln!(
        "crash test on {location}: {trials} kills, {} violations, reached {reached} \
         (ICEPIE_CRASH_SEED={seed})",
        broken.len()
    );
    assert!(broken.is_empty(), "{broken:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_leaves_whole_versions_and_a_working_warehouse() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_string_lossy().to_string();
    let open = || async {
        let mut b = IcePie::builder(location.clone());
        for (k, v) in SETTINGS {
            b = b.with_setting(k, v);
        }
        b.open().await.unwrap()
    };
    kill_trials(&location, &[], trials(24), 900, open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_sees_a_partial_load_and_a_slice_that_does_not_match_its_inputs() {
    let (_dir, w) = crate::support::open_with(&[("scheduler", "off")]).await;
    run(
        &w,
        &format!(
            "CREATE CORE TABLE t (x BIGINT);
             INGEST INTO t SELECT value AS x FROM generate_series(1, {LOAD});
             CREATE SLICE s AS SELECT count(*) AS n FROM core.t;"
        ),
    )
    .await;
    assert!(violations(&w).await.is_empty());
    // What a broken commit would leave: a slice that is not its definition over its inputs,
    // and part of a load.
    run(
        &w,
        "CREATE SLICE noisy AS SELECT count(*) AS n, random() AS noise FROM core.t;
         INGEST INTO t VALUES (1)",
    )
    .await;
    let found = violations(&w).await;
    assert!(
        found.iter().any(|v| v.contains("part of a load")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|v| v.contains("slices.noisy")),
        "{found:?}"
    );
}
