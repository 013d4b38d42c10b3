//! The differential tester of incremental refresh (invariant 9): definitions drawn at random
//! from a grammar, random appends to random inputs, and after each round every slice, declared
//! INCREMENTAL, AUTO and FULL, compared with its definition run fresh.
//!
//! The grammar covers projections and filters with expressions, scalar, `IN` and `EXISTS`
//! subqueries, the aggregates icepie accepts (mergeable, holistic, approximate, `FILTER`), 0 to
//! 3 group keys (NULLs and computed keys among them), `HAVING`, subqueries above a `GROUP BY`,
//! `DISTINCT`, `UNION ALL`, inner joins of 2 and 3 tables where several sides grow, self-joins,
//! slices over slices, windows and `LIMIT` (under an `ORDER BY` of every output column, so the
//! expected rows are determined), decimals and timestamps with a time zone.
//!
//! A slice equals its definition when it has the same rows, a float within 1e-9 of a bound on
//! the sum of the absolute values of the terms that produced it (so a sum that cancels to about
//! zero does not fail falsely), and when its columns have the names, types and nullability of
//! the same definition's FULL slice.
//!
//! `ICEPIE_DIFFERENTIAL_DEFINITIONS` sets how many definitions to draw (CI: 24), and
//! `ICEPIE_DIFFERENTIAL_SEED` replays one run (each failure names its seed).

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Float64Type, SchemaRef};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use icepie::IcePie;

use crate::support::{run, Rng};

/// Definitions each warehouse holds: they share its appends.
const PER_WAREHOUSE: usize = 6;

/// Rounds of appends then refreshes in each warehouse.
const ROUNDS: usize = 4;

/// The type of a column or expression, as far as the grammar cares.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ty {
    Int,
    Float,
    Text,
    Dec,
    Ts,
}

#[derive(Debug, Clone)]
struct Col {
    sql: String,
    ty: Ty,
}

fn col(sql: &str, ty: Ty) -> Col {
    Col {
        sql: sql.into(),
        ty,
    }
}

/// A `FROM` clause and the columns it offers.
struct Source {
    from: String,
    cols: Vec<Col>,
}

/// The columns of each core table under an alias.
fn f_cols(alias: &str) -> Vec<Col> {
    vec![
        col(&format!("{alias}.k"), Ty::Int),
        col(&format!("{alias}.g"), Ty::Text),
        col(&format!("{alias}.v"), Ty::Float),
    ]
}

fn d_cols() -> Vec<Col> {
    vec![col("d.k", Ty::Int), col("d.name", Ty::Text)]
}

fn e_cols() -> Vec<Col> {
    vec![
        col("e.k", Ty::Int),
        col("e.amount", Ty::Dec),
        col("e.at", Ty::Ts),
    ]
}

/// A `FROM` clause: one table, a join of two or three (several of which grow), a self-join,
/// or a slice drawn earlier (`base`, over `core.f`).
fn source(rng: &mut Rng, base: Option<&str>) -> Source {
    let choice = rng.below(if base.is_some() { 8 } else { 7 });
    let (from, cols) = match choice {
        0 => ("core.f f".to_string(), f_cols("f")),
        1 => ("core.d d".to_string(), d_cols()),
        2 => ("core.e e".to_string(), e_cols()),
        3 => (
            "core.f f JOIN core.d d ON f.k = d.k".to_string(),
            [f_cols("f"), d_cols()].concat(),
        ),
        4 => (
            "core.f f JOIN core.e e ON f.k = e.k".to_string(),
            [f_cols("f"), e_cols()].concat(),
        ),
        5 => (
            "core.f f JOIN core.d d ON f.k = d.k JOIN core.e e ON d.k = e.k".to_string(),
            [f_cols("f"), d_cols(), e_cols()].concat(),
        ),
        6 => (
            "core.f a JOIN core.f f ON a.k = f.k AND a.g = f.g".to_string(),
            [f_cols("f"), vec![col("a.v", Ty::Float)]].concat(),
        ),
        _ => (
            format!("{} f", base.expect("drawn only with a base")),
            f_cols("f"),
        ),
    };
    Source { from, cols }
}

/// An expression of `c`'s type family built on it.
fn expr(rng: &mut Rng, c: &Col) -> Col {
    let x = &c.sql;
    let (sql, ty) = match (c.ty, rng.below(5)) {
        (_, 0) => (x.clone(), c.ty),
        (Ty::Int, 1) => (format!("{x} % 3"), Ty::Int),
        (Ty::Int, 2) => (format!("coalesce({x}, -1)"), Ty::Int),
        (Ty::Int, 3) => (
            format!("CASE WHEN {x} > 1 THEN {x} * 10 ELSE 0 END"),
            Ty::Int,
        ),
        (Ty::Int, _) => (format!("abs({x} - 2)"), Ty::Int),
        (Ty::Float, 1) => (format!("{x} * 2"), Ty::Float),
        (Ty::Float, 2) => (format!("coalesce({x}, 0.5)"), Ty::Float),
        (Ty::Float, 3) => (format!("round({x})"), Ty::Float),
        (Ty::Float, _) => (format!("{x} - 0.25"), Ty::Float),
        (Ty::Text, 1) => (format!("upper({x})"), Ty::Text),
        (Ty::Text, 2) => (format!("coalesce({x}, '?')"), Ty::Text),
        (Ty::Text, 3) => (format!("{x} || '_x'"), Ty::Text),
        (Ty::Text, _) => (format!("substr({x}, 1, 1)"), Ty::Text),
        (Ty::Dec, 1) => (format!("{x} * 2"), Ty::Dec),
        (Ty::Dec, 2) => (format!("coalesce({x}, 0)"), Ty::Dec),
        (Ty::Dec, _) => (format!("{x} + CAST(1.25 AS DECIMAL(10,2))"), Ty::Dec),
        (Ty::Ts, 1) => (format!("date_trunc('day', {x})"), Ty::Ts),
        (Ty::Ts, _) => (format!("{x} + INTERVAL '1 hour'"), Ty::Ts),
    };
    Col { sql, ty }
}

/// A literal comparable with values of type `ty`.
fn literal(rng: &mut Rng, ty: Ty) -> String {
    match ty {
        Ty::Int => rng.below(4).to_string(),
        Ty::Float => rng.pick(&["-1.5", "0.0", "2.25", "10.0"]).to_string(),
        Ty::Text => format!("'{}'", rng.pick(&["a", "b", "c", "x"])),
        Ty::Dec => format!(
            "CAST({} AS DECIMAL(10,2))",
            rng.pick(&["0.5", "3.25", "-2"])
        ),
        Ty::Ts => "TIMESTAMP '2026-01-02T00:00:00Z'".to_string(),
    }
}

/// A predicate over `cols`: comparisons, NULL tests, `IN` lists, and now and then a
/// subquery (`IN`, scalar, correlated `EXISTS`).
fn predicate(rng: &mut Rng, cols: &[Col], depth: usize) -> String {
    let c = rng.pick(cols).clone();
    let e = expr(rng, &c);
    match rng.below(if depth == 0 { 9 } else { 6 }) {
        0 => format!("{} IS NULL", c.sql),
        1 => format!("{} IS NOT NULL", c.sql),
        2 => format!(
            "{} {} {}",
            e.sql,
            rng.pick(&["<", "<=", ">", ">=", "=", "<>"]),
            literal(rng, e.ty)
        ),
        3 => format!(
            "{} IN ({}, {})",
            e.sql,
            literal(rng, e.ty),
            literal(rng, e.ty)
        ),
        4 => format!(
            "({} OR {})",
            predicate(rng, cols, depth + 1),
            predicate(rng, cols, depth + 1)
        ),
        5 => format!("NOT ({})", predicate(rng, cols, depth + 1)),
        6 => {
            let int = cols.iter().find(|c| c.ty == Ty::Int).unwrap_or(&cols[0]);
            match int.ty {
                Ty::Int => format!(
                    "{} IN (SELECT k FROM core.d WHERE name {} 'b')",
                    int.sql,
                    rng.pick(&["<>", "=", "<"])
                ),
                _ => format!("{} IS NOT NULL", int.sql),
            }
        }
        7 => {
            let num = cols.iter().find(|c| c.ty == Ty::Float);
            match num {
                Some(n) => format!(
                    "{} > (SELECT {}(v) FROM core.f)",
                    n.sql,
                    rng.pick(&["min", "avg"])
                ),
                None => format!("{} IS NOT NULL", cols[0].sql),
            }
        }
        _ => {
            let int = cols.iter().find(|c| c.ty == Ty::Int).unwrap_or(&cols[0]);
            match int.ty {
                Ty::Int => format!(
                    "EXISTS (SELECT 1 FROM core.d d2 WHERE d2.k = {} AND d2.name IS NOT NULL)",
                    int.sql
                ),
                _ => format!("{} IS NOT NULL", int.sql),
            }
        }
    }
}

/// An aggregate call over `cols`, and whether its result is a number (so that arithmetic
/// above it makes sense).
fn aggregate(rng: &mut Rng, cols: &[Col]) -> (String, bool) {
    let c = rng.pick(cols).clone();
    let x = expr(rng, &c).sql;
    let numeric = matches!(c.ty, Ty::Int | Ty::Float | Ty::Dec);
    if rng.chance(0.1) {
        let p = predicate(rng, cols, 1);
        return (format!("count(*) FILTER (WHERE {p})"), true);
    }
    if rng.chance(0.08) {
        let p = predicate(rng, cols, 1);
        return (format!("bool_or({p})"), false);
    }
    if !numeric || rng.chance(0.3) {
        if matches!(c.ty, Ty::Int | Ty::Text) && rng.chance(0.2) {
            return (format!("approx_distinct({x})"), true);
        }
        return match rng.below(5) {
            0 => ("count(*)".into(), true),
            1 => (format!("count({x})"), true),
            2 => (format!("count(DISTINCT {x})"), true),
            3 => (format!("min({x})"), numeric),
            _ => (format!("max({x})"), numeric),
        };
    }
    let mut numeric_aggs = vec![
        format!("sum({x})"),
        format!("avg({x})"),
        format!("median({x})"),
        format!("sum({x}) FILTER (WHERE {})", predicate(rng, cols, 1)),
    ];
    if c.ty != Ty::Dec {
        numeric_aggs.push(format!("stddev({x})"));
        numeric_aggs.push(format!("var_pop({x})"));
    }
    if c.ty == Ty::Int {
        numeric_aggs.push(format!("bit_or({x})"));
    }
    (rng.pick(&numeric_aggs).clone(), true)
}

/// A definition drawn from the grammar; `base` names a slice it may read.
fn definition(rng: &mut Rng, base: Option<&str>) -> String {
    let src = source(rng, base);
    let filter = match rng.chance(0.6) {
        true => format!(" WHERE {}", predicate(rng, &src.cols, 0)),
        false => String::new(),
    };
    match rng.below(10) {
        // Projections and filters.
        0..=2 => {
            let n = 1 + rng.below(3);
            let list: Vec<String> = (0..n)
                .map(|i| {
                    let c = rng.pick(&src.cols).clone();
                    format!("{} AS c{i}", expr(rng, &c).sql)
                })
                .collect();
            format!("SELECT {} FROM {}{filter}", list.join(", "), src.from)
        }
        // GROUP BY.
        3..=6 => {
            let mut keys: Vec<Col> = Vec::new();
            for _ in 0..rng.below(4) {
                let c = rng.pick(&src.cols).clone();
                let key = expr(rng, &c);
                if keys.iter().all(|k| k.sql != key.sql) {
                    keys.push(key);
                }
            }
            let shown = rng.chance(0.8);
            let mut list: Vec<String> = Vec::new();
            if shown {
                for (i, k) in keys.iter().enumerate() {
                    list.push(format!("{} AS k{i}", k.sql));
                }
            }
            for i in 0..1 + rng.below(3) {
                let (agg, numeric) = aggregate(rng, &src.cols);
                let above = match (numeric, rng.below(6)) {
                    (true, 0) => format!("{agg} * 2"),
                    (true, 1) => format!(
                        "{agg} * 1.0 / nullif((SELECT count(*) FROM core.{}), 0)",
                        rng.pick(&["d", "f"])
                    ),
                    _ => agg,
                };
                list.push(format!("{above} AS a{i}"));
            }
            let group = match keys.is_empty() {
                true => String::new(),
                false => format!(
                    " GROUP BY {}",
                    keys.iter()
                        .map(|k| k.sql.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let having = match (keys.is_empty(), rng.chance(0.2)) {
                (false, true) => " HAVING count(*) > 1".to_string(),
                _ => String::new(),
            };
            format!(
                "SELECT {} FROM {}{filter}{group}{having}",
                list.join(", "),
                src.from
            )
        }
        // DISTINCT.
        7 => {
            let c = rng.pick(&src.cols).clone();
            let d = rng.pick(&src.cols).clone();
            format!(
                "SELECT DISTINCT {} AS c0, {} AS c1 FROM {}{filter}",
                expr(rng, &c).sql,
                expr(rng, &d).sql,
                src.from
            )
        }
        // UNION ALL of two filtered projections of one type.
        8 => {
            let other = format!(
                "SELECT d.k AS c0, d.name AS c1 FROM core.d d WHERE {}",
                predicate(rng, &d_cols(), 1)
            );
            format!(
                "SELECT f.k AS c0, f.g AS c1 FROM core.f f WHERE {} UNION ALL {other}",
                predicate(rng, &f_cols("f"), 1)
            )
        }
        // Windows and LIMIT, under an ORDER BY of every column.
        _ => {
            let cols = f_cols("f");
            let all = "f.k, f.g, f.v";
            match rng.chance(0.5) {
                true => format!(
                    "SELECT f.k AS c0, f.g AS c1, f.v AS c2, {} OVER (PARTITION BY f.g ORDER BY \
                     {all}) AS w FROM core.f f{}",
                    rng.pick(&["row_number()", "sum(f.v)", "count(*)"]),
                    match rng.chance(0.5) {
                        true => format!(" WHERE {}", predicate(rng, &cols, 1)),
                        false => String::new(),
                    }
                ),
                false => format!(
                    "SELECT f.k AS c0, f.g AS c1, f.v AS c2 FROM core.f f ORDER BY {all} LIMIT {}",
                    1 + rng.below(5)
                ),
            }
        }
    }
}

/// An `INGEST` of 0 to 5 random rows (NULLs among them) into a random core table; returns it
/// and the sum of the absolute values of its numbers.
fn append(rng: &mut Rng) -> (String, f64) {
    let n = rng.below(6);
    let mut abs = 0.0;
    let key = |rng: &mut Rng| match rng.chance(0.9) {
        true => rng.below(4).to_string(),
        false => "NULL".into(),
    };
    let table = rng.below(3);
    let rows: Vec<String> = (0..n)
        .map(|_| match table {
            0 => {
                let k = key(rng);
                let g = match rng.chance(0.85) {
                    true => format!("'{}'", rng.pick(&["a", "b", "c"])),
                    false => "NULL".into(),
                };
                let v = match rng.chance(0.85) {
                    true => {
                        let v = *rng.pick(&[-1.5, 0.0, 2.25, 10.0, 0.5]);
                        abs += f64::abs(v);
                        format!("{v:?}")
                    }
                    false => "NULL".into(),
                };
                format!("({k}, {g}, {v})")
            }
            1 => {
                let k = key(rng);
                let name = match rng.chance(0.85) {
                    true => format!("'{}'", rng.pick(&["a", "b", "x"])),
                    false => "NULL".into(),
                };
                format!("({k}, {name})")
            }
            _ => {
                let k = key(rng);
                let amount = match rng.chance(0.85) {
                    true => {
                        let a = *rng.pick(&[-2.0, 0.5, 3.25, 100.75]);
                        abs += f64::abs(a);
                        format!("{a:?}")
                    }
                    false => "NULL".into(),
                };
                let at = match rng.chance(0.85) {
                    true => format!(
                        "'2026-01-0{}T{:02}:30:00+02:00'",
                        1 + rng.below(3),
                        rng.below(24)
                    ),
                    false => "NULL".into(),
                };
                format!("({k}, {amount}, {at})")
            }
        })
        .collect();
    let (name, columns) = match table {
        0 => (
            "f",
            "CAST(column1 AS BIGINT) AS k, CAST(column2 AS VARCHAR) AS g, CAST(column3 AS \
             DOUBLE) AS v",
        ),
        1 => (
            "d",
            "CAST(column1 AS BIGINT) AS k, CAST(column2 AS VARCHAR) AS name",
        ),
        _ => (
            "e",
            "CAST(column1 AS BIGINT) AS k, CAST(column2 AS DECIMAL(10,2)) AS amount, \
             CAST(column3 AS TIMESTAMP WITH TIME ZONE) AS at",
        ),
    };
    let sql = match rows.is_empty() {
        true => format!("INGEST INTO core.{name} SELECT * FROM core.{name} WHERE false"),
        false => format!(
            "INGEST INTO core.{name} SELECT {columns} FROM (VALUES {})",
            rows.join(", ")
        ),
    };
    (sql, abs)
}

/// One cell of a result: floats apart, to be compared within a tolerance.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Float(f64),
    Other(String),
}

/// The rows of `batches`, sorted by their text with floats rounded (to pair them up).
fn cells(batches: &[RecordBatch]) -> Vec<Vec<Cell>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for batch in batches {
        let formatters: Vec<ArrayFormatter> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for row in 0..batch.num_rows() {
            let cells = batch
                .columns()
                .iter()
                .zip(&formatters)
                .map(|(c, f)| match c.data_type() {
                    DataType::Float64 if c.is_valid(row) => {
                        Cell::Float(c.as_primitive::<Float64Type>().value(row))
                    }
                    _ => Cell::Other(f.value(row).to_string()),
                })
                .collect();
            out.push(cells);
        }
    }
    let key = |row: &Vec<Cell>| -> String {
        row.iter()
            .map(|c| match c {
                Cell::Float(f) => format!("{f:.4e}"),
                Cell::Other(s) => s.clone(),
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    out.sort_by_key(key);
    out
}

/// True when `a` and `b` are the same rows, floats within `tolerance`.
fn same(a: &[Vec<Cell>], b: &[Vec<Cell>], tolerance: f64) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.len() == y.len()
                && x.iter().zip(y).all(|(p, q)| match (p, q) {
                    (Cell::Float(p), Cell::Float(q)) => {
                        (p.is_nan() && q.is_nan()) || p == q || (p - q).abs() <= tolerance
                    }
                    _ => p == q,
                })
        })
}

async fn collect(w: &IcePie, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>), String> {
    let df = w.sql(sql).await.map_err(|e| e.to_string())?;
    let schema = df.schema().inner().clone();
    let batches = df.collect().await.map_err(|e| e.to_string())?;
    Ok((schema, batches))
}

/// The columns of `schema` as names, types and nullability.
fn columns(schema: &SchemaRef) -> Vec<(String, DataType, bool)> {
    schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
        .collect()
}

/// What a run found: definitions drawn, refreshes by mode.
#[derive(Debug, Default)]
struct Tally {
    definitions: usize,
    incremental: usize,
    full: usize,
    refused_incremental: usize,
}

async fn last_mode(w: &IcePie, slice: &str) -> String {
    let (_, batches) = collect(
        w,
        &format!(
            "SELECT mode || ': ' || reason FROM slice_history('{slice}') ORDER BY version DESC \
             LIMIT 1"
        ),
    )
    .await
    .unwrap();
    let batch = batches.iter().find(|b| b.num_rows() > 0).unwrap();
    datafusion::arrow::util::display::array_value_to_string(batch.column(0), 0).unwrap()
}

/// One warehouse: `PER_WAREHOUSE` definitions, each as three slices, through `ROUNDS` rounds
/// of appends and refreshes.
async fn check_warehouse(seed: u64, tally: &mut Tally) {
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let w = IcePie::builder(dir.path().to_string_lossy().to_string())
        .with_setting("scheduler", "off")
        .open()
        .await
        .unwrap();
    run(
        &w,
        "CREATE CORE TABLE f (k BIGINT, g VARCHAR, v DOUBLE); \
         CREATE CORE TABLE d (k BIGINT, name VARCHAR); \
         CREATE CORE TABLE e (k BIGINT, amount DECIMAL(10,2), at TIMESTAMP WITH TIME ZONE); \
         SET icepie.incremental_max_share = 1; \
         SET icepie.target_file_size = 1; SET datafusion.execution.batch_size = 2",
    )
    .await;
    let mut abs = 0.0;
    for _ in 0..1 + rng.below(3) {
        let (sql, a) = append(&mut rng);
        run(&w, &sql).await;
        abs += a;
    }
    // (definition, [(slice, mode)]) in creation order, so a slice is refreshed after the
    // slice it reads.
    let mut slices: Vec<(String, Vec<String>)> = Vec::new();
    let base_definition = format!(
        "SELECT f.k AS k, f.g AS g, f.v AS v FROM core.f f WHERE {}",
        predicate(&mut rng, &f_cols("f"), 1)
    );
    let mut drawn = vec![base_definition];
    for i in 1..PER_WAREHOUSE {
        let base = (i > 1).then_some("slices.d0_auto");
        drawn.push(definition(&mut rng, base));
    }
    for (i, definition) in drawn.iter().enumerate() {
        let mut made = Vec::new();
        for mode in ["full", "auto", "incremental"] {
            let name = format!("d{i}_{mode}");
            let create = format!("CREATE SLICE {name} {mode} AS {definition}");
            match (w.sql(&create).await, mode) {
                (Ok(df), _) => {
                    df.collect().await.unwrap();
                    made.push(name);
                }
                (Err(e), "incremental") if e.to_string().contains("declared INCREMENTAL") => {
                    tally.refused_incremental += 1;
                }
                (Err(e), _) => panic!("seed {seed}: {create}: {e}"),
            }
        }
        tally.definitions += 1;
        slices.push((definition.clone(), made));
    }
    for round in 0..ROUNDS {
        for _ in 0..1 + rng.below(3) {
            let (sql, a) = append(&mut rng);
            run(&w, &sql).await;
            abs += a;
        }
        // A bound on the sum of the absolute values of the terms of any float: products of
        // two inputs at most (variances).
        let tolerance = 1e-9 * (1.0 + abs) * (1.0 + abs);
        for (definition, made) in &slices {
            for name in made {
                if let Err(e) = w.sql(&format!("REFRESH SLICE {name}")).await {
                    panic!("seed {seed}, round {round}: REFRESH SLICE {name} ({definition}): {e}");
                }
                let mode = last_mode(&w, name).await;
                match mode.starts_with("incremental") {
                    true => tally.incremental += 1,
                    false => tally.full += 1,
                }
            }
            let (_, want) = collect(&w, definition)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: {definition}: {e}"));
            let want = cells(&want);
            let (full_schema, _) = collect(&w, &format!("SELECT * FROM {}", made[0]))
                .await
                .unwrap();
            for name in made {
                let (schema, got) = collect(&w, &format!("SELECT * FROM {name}"))
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed}: {name}: {e}"));
                let got = cells(&got);
                let mode = last_mode(&w, name).await;
                assert!(
                    same(&got, &want, tolerance),
                    "seed {seed}, round {round}: slice {name} ({mode}) differs from its \
                     definition\n  {definition}\n  slice:      {got:?}\n  definition: {want:?}"
                );
                assert_eq!(
                    columns(&schema),
                    columns(&full_schema),
                    "seed {seed}, round {round}: slice {name} ({mode}) has other columns than \
                     a full refresh writes\n  {definition}"
                );
            }
        }
    }
}

fn definitions() -> usize {
    std::env::var("ICEPIE_DIFFERENTIAL_DEFINITIONS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(24)
}

#[test]
fn incremental_equals_full_on_random_definitions() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The short form checks the same definitions each run; the long form new ones, unless
    // a seed is given to replay.
    let long = std::env::var("ICEPIE_DIFFERENTIAL_DEFINITIONS").is_ok();
    let first = std::env::var("ICEPIE_DIFFERENTIAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| match long {
            true => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
            false => 26,
        });
    let warehouses = definitions().div_ceil(PER_WAREHOUSE);
    let mut tally = Tally::default();
    // Every warehouse runs, so that a long run counts all it finds, not only the first.
    let mut failures = Vec::new();
    for i in 0..warehouses as u64 {
        let seed = first.wrapping_add(i);
        let run = std::panic::AssertUnwindSafe(|| {
            runtime.block_on(check_warehouse(seed, &mut tally));
        });
        if let Err(panic) = std::panic::catch_unwind(run) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(why.lines().take(3).collect::<Vec<_>>().join(" / "));
        }
    }
    eprintln!(
        "differential: seeds {first}.. : {tally:?}, {} failed warehouses",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {warehouses} warehouses failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The tester must exercise incremental refreshes, not only full ones.
    assert!(
        tally.incremental * 4 >= tally.full,
        "too few incremental refreshes to mean anything: {tally:?}"
    );
}
