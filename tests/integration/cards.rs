//! The view of every slice (`src/catalog/cards.rs`) against reading every slice: two
//! processes make random changes (ingests, refreshes that succeed or fail, new slices, slices
//! over slices, drops, freezes), and after each one both list `system.slices` from their view
//! and by reading each slice named (`WHERE name IN (…)`), which must agree.
//!
//! `ICEPIE_CARDS_STEPS` sets how many changes to make (CI: 30, always the same ones; set, a
//! new seed each run), and `ICEPIE_CARDS_SEED` replays one run (each failure names its seed).

use icepie::IcePie;

use crate::support::{env_or, open_unscheduled, rows, run, Rng};

/// What is compared: everything but what moves with the clock (`lag`, `scheduling`).
const COLUMNS: &str = "domain, name, state, version, rows, bytes, files, refreshed_at, \
                       last_error, failures, lag_ms IS NULL AS caught_up, frozen_reason, \
                       refresh, inputs, definition, slice_id";

/// Slices the warehouse starts with: more than `system.slices` reads whole at each read.
const START: usize = 20;

/// A slice of core table `b`; `fails_above` makes its refreshes fail once `b` holds a larger
/// value.
fn definition(i: usize, rng: &mut Rng, slices: &[String]) -> String {
    match rng.below(4) {
        0 => format!("SELECT n + {i} AS n FROM core.b"),
        1 => "SELECT count(*) AS c, sum(n) AS s FROM core.b".to_string(),
        2 if !slices.is_empty() => format!("SELECT * FROM {}", rng.pick(slices)),
        _ => format!(
            "SELECT CAST(CASE WHEN n > {} THEN 'x' ELSE CAST(n AS TEXT) END AS INT) AS n \
             FROM core.b",
            100 + i
        ),
    }
}

/// `system.slices` from the view and from reading each slice of `names`, in process `w`.
async fn compare(w: &IcePie, names: &[String], seed: u64, step: usize, what: &str) {
    let view = rows(w, &format!("SELECT {COLUMNS} FROM system.slices")).await;
    let list = names
        .iter()
        .map(|n| format!("'{}'", n.split_once('.').unwrap().1))
        .collect::<Vec<_>>()
        .join(", ");
    let read = rows(
        w,
        &format!("SELECT {COLUMNS} FROM system.slices WHERE name IN ({list})"),
    )
    .await;
    assert_eq!(
        view, read,
        "seed {seed}, step {step} ({what}): the view differs from the slices"
    );
    assert_eq!(
        view.len(),
        names.len(),
        "seed {seed}, step {step}: {view:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_of_every_slice_agrees_with_reading_each_one() {
    let steps: usize = env_or("ICEPIE_CARDS_STEPS", 30);
    // The short form checks the same changes each run; the long form new ones, unless a seed
    // is given to replay.
    let long = std::env::var("ICEPIE_CARDS_STEPS").is_ok();
    let seed: u64 = env_or("ICEPIE_CARDS_SEED", if long { clock_seed() } else { 29 });
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let a = open_unscheduled(&root).await;
    run(
        &a,
        "CREATE CORE TABLE b (n INT); INGEST INTO b VALUES (1), (2);",
    )
    .await;
    let mut names: Vec<String> = Vec::new();
    let mut made = 0;
    for _ in 0..START {
        let name = format!("d{}.s{made}", made % 3);
        let sql = definition(made, &mut rng, &names);
        run(&a, &format!("CREATE SLICE {name} AS {sql}")).await;
        names.push(name);
        made += 1;
    }
    a.flush().await;
    compare(&a, &names, seed, 0, "created").await;
    // Takes up the view `a` saved.
    let b = open_unscheduled(&root).await;
    compare(&b, &names, seed, 0, "taken up").await;
    let mut frozen = std::collections::BTreeSet::new();
    for step in 1..=steps {
        let w = if rng.chance(0.5) { &a } else { &b };
        let slice = rng.pick(&names).clone();
        let what = match rng.below(7) {
            0 => {
                let n = if rng.chance(0.3) { 200 } else { rng.below(50) };
                format!("INGEST INTO b VALUES ({n})")
            }
            1 | 2 => format!("REFRESH SLICE {slice}"),
            3 => {
                let name = format!("d{}.s{made}", made % 3);
                let sql = definition(made, &mut rng, &names);
                made += 1;
                format!("CREATE SLICE {name} AS {sql}")
            }
            4 if names.len() > START - 2 => format!("DROP SLICE {slice}"),
            5 if !frozen.contains(&slice) => {
                frozen.insert(slice.clone());
                format!("FREEZE SLICE {slice} 'step {step}'")
            }
            _ => {
                frozen.remove(&slice);
                format!("THAW SLICE {slice}")
            }
        };
        // A refresh that fails (or a statement refused) is part of the test: its state must
        // show.
        let done = match w.sql(&what).await {
            Ok(df) => df.collect().await.is_ok(),
            Err(_) => false,
        };
        w.flush().await;
        if done && what.starts_with("DROP") {
            names.retain(|n| *n != slice);
        }
        if done && what.starts_with("CREATE") {
            names.push(format!("d{}.s{}", (made - 1) % 3, made - 1));
        }
        compare(&a, &names, seed, step, &what).await;
        compare(&b, &names, seed, step, &what).await;
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
