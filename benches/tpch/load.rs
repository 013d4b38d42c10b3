//! `load`: loading the eight TPC-H tables into a fresh core (`CREATE CORE TABLE … FROM` their
//! Parquet files) vs DuckDB's `CREATE TABLE … AS SELECT * FROM read_parquet(…)` of the same
//! files into a fresh database file, checkpointed (so that both have written their data).
//!
//! The two alternate, and which goes first alternates. DuckDB runs in its own Python process
//! (`ICEPIE_DUCKDB_PYTHON`, default `python3`) and times its own work from an open connection,
//! as icepie's side is timed from an open warehouse: neither pays its process start.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{load_core, open, report, runs, TABLES};

/// One DuckDB load of the tables' files into a new database in `dir`: its own timing.
fn duckdb_load(src: &Path, dir: &Path) -> Result<Duration, String> {
    let python = std::env::var("ICEPIE_DUCKDB_PYTHON").unwrap_or_else(|_| "python3".into());
    let loads: Vec<String> = TABLES
        .iter()
        .map(|t| {
            format!(
                "con.execute(\"CREATE TABLE {t} AS SELECT * FROM read_parquet('{}')\")",
                src.join(t).join("*.parquet").display()
            )
        })
        .collect();
    let script = format!(
        "import duckdb, time\n\
         con = duckdb.connect('{}')\n\
         con.execute('SET enable_progress_bar = false')\n\
         s = time.perf_counter()\n\
         {}\n\
         con.execute('CHECKPOINT')\n\
         print(time.perf_counter() - s)\n",
        dir.join("tpch.duckdb").display(),
        loads.join("\n")
    );
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or_default().to_string());
    }
    let secs: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("{e}"))?;
    Ok(Duration::from_secs_f64(secs))
}

/// One icepie load of the tables' files into a new warehouse in `dir`.
async fn icepie_load(src: &Path, dir: &Path) -> Duration {
    let w = open(dir).await;
    let start = Instant::now();
    load_core(&w, src, &TABLES).await;
    start.elapsed()
}

pub(crate) async fn load(src: &Path, out: &Path) {
    let mut n = 0;
    let mut fresh = || {
        n += 1;
        let dir = out.join(format!("load-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    // Warm-up of each, then alternating runs.
    let dir = fresh();
    icepie_load(src, &dir).await;
    std::fs::remove_dir_all(&dir).ok();
    let dir = fresh();
    if let Err(e) = duckdb_load(src, &dir) {
        println!(
            "{:<34} DuckDB not found or failed ({e}): pip install duckdb, or set \
             ICEPIE_DUCKDB_PYTHON",
            "load TPC-H"
        );
        return;
    }
    std::fs::remove_dir_all(&dir).ok();
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for i in 0..runs() {
        for icepie_first in [i % 2 == 0, i % 2 != 0] {
            let dir = fresh();
            if icepie_first {
                ours.push(icepie_load(src, &dir).await);
            } else {
                base.push(duckdb_load(src, &dir).expect("DuckDB load"));
            }
            std::fs::remove_dir_all(&dir).ok();
        }
    }
    ours.sort();
    base.sort();
    report(
        "load TPC-H (8 tables)",
        ours[ours.len() / 2],
        base[base.len() / 2],
        "DuckDB CTAS",
        1.0,
    );
}
