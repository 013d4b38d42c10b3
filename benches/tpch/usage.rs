//! The cost of recording usage: a small query on a slice, run by a warehouse that records
//! usage (the default) vs the same warehouse opened with `icepie.usage = off`, on the same
//! files. Target: under 2% more time.

use std::path::Path;

use icepie::IcePie;

use super::{report, run, time_pair};

/// Queries per timed run: one small query takes a few milliseconds.
const BATCH: usize = 50;

pub async fn usage(root: &Path) {
    let dir = root.join("usage");
    let open = |usage: &'static str| {
        IcePie::builder(dir.to_string_lossy().to_string())
            .with_scheduler(false)
            .with_setting("usage", usage)
    };
    let on = open("on").open().await.expect("open the warehouse");
    run(
        &on,
        "CREATE CORE TABLE events AS
             SELECT value AS id, value % 100 AS region, value * 0.5 AS amount
             FROM generate_series(1, 200000);
         CREATE SLICE bench.events AS SELECT * FROM core.events",
    )
    .await;
    let off = open("off").open().await.expect("open the warehouse");
    let sql = "SELECT region, count(*), sum(amount) FROM bench.events WHERE id BETWEEN 1000 AND 1100 GROUP BY region";
    let batch = |w: &IcePie| {
        let w = w.clone();
        async move {
            for _ in 0..BATCH {
                run(&w, sql).await;
            }
        }
    };
    let (with, without) = time_pair(|| batch(&on), || batch(&off)).await;
    report(
        &format!("usage recording, {BATCH} small queries"),
        with,
        without,
        "usage off",
        1.02,
    );
    on.flush().await;
}
