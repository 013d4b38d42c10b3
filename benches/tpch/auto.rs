//! The `auto` section: AUTO's choice by measured cost against both modes, as the appended
//! share grows. For lineitem rows appended as 0.1%, 1%, 10%, 25%, 50% and 100% of its rows
//! (each share in a fresh warehouse: the core loaded, the slices built, the rows ingested),
//! the filter/projection, aggregate and join slices of the `incremental` section are
//! refreshed incrementally (a slice declared `INCREMENTAL`), in full (`REFRESH SLICE … FULL`
//! of the same slice) and as AUTO chooses (a slice declared `AUTO`). Every refresh starts from
//! the version before the append (rolled back untimed) with the disk's writes settled
//! (`sync`, untimed), the three take each of their orders in turn, and each is the median of
//! `runs()` after a warm-up. The AUTO slice learns as a slice in use does: from its
//! own earlier refreshes (a rollback keeps the costs measured).
//!
//! Printed per slice and share: the crossover curve (incremental / full), AUTO's time and the
//! modes it chose, and AUTO against the better of the two modes (target: within 10% or 5 ms).

use super::incremental::SLICES;
use super::*;

/// The appended shares, as 1 / parts of the scale factor's lineitem rows.
const PARTS: [i32; 6] = [1000, 100, 10, 4, 2, 1];

/// AUTO is within target when at most this many times the better mode...
const AUTO_TARGET: f64 = 1.10;
/// ... or at most this much slower.
const AUTO_SLACK: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Incremental,
    Full,
    Auto,
}

/// The six orders of the three ways.
const ORDERS: [[Way; 3]; 6] = {
    use Way::{Auto as A, Full as F, Incremental as I};
    [
        [I, F, A],
        [F, A, I],
        [A, I, F],
        [I, A, F],
        [A, F, I],
        [F, I, A],
    ]
};

/// Writes back what the last refresh wrote (`sync`), untimed, so that the next one does
/// not pay for it.
fn settle_disk() {
    let _ = std::process::Command::new("sync").status();
}

/// The mode of the slice's latest version: `incremental` or `full`.
async fn last_mode(w: &IcePie, slice: &str) -> String {
    let sql = format!("SELECT mode FROM slice_history('{slice}') ORDER BY version DESC LIMIT 1");
    let batches = w.sql(&sql).await.unwrap().collect().await.unwrap();
    datafusion::arrow::util::display::array_value_to_string(batches[0].column(0), 0).unwrap()
}

/// Rolls `slice` back to `version` unless it is there.
async fn back_to(w: &IcePie, slice: &str, version: i64) {
    if w.slice(slice).await.unwrap().version != version {
        run(w, &format!("ROLLBACK SLICE {slice} TO VERSION {version}")).await;
    }
    w.flush().await;
}

pub(super) async fn auto(src: &Path, root: &Path, sf: f64) {
    let extra = root.join("auto_extra");
    std::fs::create_dir_all(&extra).unwrap();
    println!(
        "{:<16} {:>8} {:>12} {:>12} {:>8} {:>12} {:>14} {:>9}",
        "auto", "appended", "incremental", "full", "inc/full", "AUTO", "AUTO chose", "AUTO/best"
    );
    for parts in PARTS {
        let dir = root.join(format!("auto_{parts}"));
        let w = IcePie::builder(dir.to_string_lossy().to_string())
            .with_scheduler(false)
            // Every run rolls back to the version before the append.
            .with_setting("retain_versions", "1000")
            .open()
            .await
            .expect("open the warehouse");
        load_core(&w, src, &["lineitem", "orders", "customer"]).await;
        let mut before = Vec::new();
        for (name, sql, _) in SLICES {
            run(
                &w,
                &format!(
                    "CREATE SLICE a.{name}_inc INCREMENTAL AS {sql}; \
                     CREATE SLICE a.{name}_auto AUTO AS {sql}"
                ),
            )
            .await;
            let inc = w.slice(&format!("a.{name}_inc")).await.unwrap().version;
            let auto = w.slice(&format!("a.{name}_auto")).await.unwrap().version;
            before.push((inc, auto));
        }
        let file = extra.join(format!("lineitem_{parts}.parquet"));
        write_parquet(
            &file,
            LineItemArrow::new(LineItemGenerator::new(sf, 1, parts)).map(|b| b.expect("generate")),
        );
        run(
            &w,
            &format!(
                "INGEST INTO core.lineitem FROM '{}' FORMAT parquet",
                file.display()
            ),
        )
        .await;
        w.flush().await;
        let share = format!("{:.1}%", 100.0 / parts as f64);
        for ((name, _, _), (inc_version, auto_version)) in SLICES.into_iter().zip(before) {
            let (inc_slice, auto_slice) = (format!("a.{name}_inc"), format!("a.{name}_auto"));
            let (mut inc, mut full, mut auto) = (Vec::new(), Vec::new(), Vec::new());
            let mut chose = (0, 0);
            for run_no in 0..=runs() {
                // Each order of the three in turn: a refresh right after a full one (its
                // files still being written back) must not fall to one way more than another.
                let ways = ORDERS[run_no % ORDERS.len()];
                for way in ways {
                    let (slice, version) = match way {
                        Way::Auto => (&auto_slice, auto_version),
                        _ => (&inc_slice, inc_version),
                    };
                    back_to(&w, slice, version).await;
                    let start = Instant::now();
                    match way {
                        Way::Full => w.refresh_full(slice).await,
                        _ => w.refresh(slice).await,
                    }
                    .expect("refresh");
                    let took = start.elapsed();
                    w.flush().await;
                    settle_disk();
                    let mode = last_mode(&w, slice).await;
                    if way == Way::Incremental && mode != "incremental" {
                        println!("({slice} did not refresh incrementally)");
                    }
                    if run_no == 0 {
                        continue;
                    }
                    match way {
                        Way::Incremental => inc.push(took),
                        Way::Full => full.push(took),
                        Way::Auto => {
                            auto.push(took);
                            match mode.as_str() {
                                "incremental" => chose.0 += 1,
                                _ => chose.1 += 1,
                            }
                        }
                    }
                }
            }
            let (inc, full, auto) = (median(inc), median(full), median(auto));
            let best = inc.min(full);
            let ratio = auto.as_secs_f64() / best.as_secs_f64();
            let within = ratio <= AUTO_TARGET || auto <= best + AUTO_SLACK;
            let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
            println!(
                "{name:<16} {share:>8} {:>12} {:>12} {:>8.2} {:>12} {:>14} {ratio:>9.2}{}",
                ms(inc),
                ms(full),
                inc.as_secs_f64() / full.as_secs_f64(),
                ms(auto),
                format!("{} inc, {} full", chose.0, chose.1),
                if within {
                    ""
                } else {
                    "  ABOVE TARGET (1.10 or +5 ms)"
                }
            );
        }
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&file);
    }
}
