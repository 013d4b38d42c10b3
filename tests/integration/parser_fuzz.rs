//! The parser never panics: random token sequences, random mutations of valid statements and
//! random text all parse or give an error.
//!
//! CI runs 256 cases of each property; `ICEPIE_PROPTEST_CASES=100000` runs the long form.

use icepie::IcePie;
use proptest::prelude::*;
use proptest::sample::{select, Index};

/// Words and punctuation of icepie's and DataFusion's SQL, and some hostile ones.
const TOKENS: &[&str] = &[
    "CREATE",
    "CORE",
    "TABLE",
    "SLICE",
    "SLICES",
    "OR",
    "REPLACE",
    "IF",
    "NOT",
    "EXISTS",
    "INGEST",
    "INTO",
    "FROM",
    "FORMAT",
    "parquet",
    "csv",
    "AS",
    "SELECT",
    "WITH",
    "VALUES",
    "REFRESH",
    "EVERY",
    "ON",
    "CHANGE",
    "MANUAL",
    "PARTITION",
    "BY",
    "OWNER",
    "FREEZE",
    "THAW",
    "ROLLBACK",
    "TO",
    "VERSION",
    "DROP",
    "SHOW",
    "HISTORY",
    "VACUUM",
    "VERIFY",
    "DESCRIBE",
    "DESC",
    "INSERT",
    "DELETE",
    "COPY",
    "SET",
    "icepie.retain_versions",
    "(",
    ")",
    ",",
    ";",
    ".",
    "'x'",
    "''",
    "'5 minutes'",
    "'soon'",
    "1",
    "0",
    "-1",
    "99999999999999999999",
    "1e99",
    "t",
    "s",
    "core.t",
    "a.b",
    "a.b.c",
    "\"../x\"",
    "\"\"",
    "\"a/b\"",
    "*",
    "core_at('t', 1)",
    "slice_at(",
    "slice_history",
    "=",
    "--",
    "/*",
    "*/",
    "'",
    "\"",
    "\\",
    "$1",
    "?",
    "NULL",
    "🧊",
    "\u{0}",
    "\n",
];

/// Statements that parse, to mutate.
const VALID: &[&str] = &[
    "CREATE CORE TABLE IF NOT EXISTS orders (id BIGINT NOT NULL, amount DOUBLE)",
    "CREATE CORE TABLE c FROM 'sql/data/customers.csv' FORMAT csv",
    "INGEST INTO orders FROM 'sql/data/orders_2024_01.csv'",
    "INGEST INTO core.orders SELECT * FROM core.orders WHERE id > 3",
    "CREATE OR REPLACE SLICE finance.revenue OWNER 'finance' REFRESH EVERY '5 minutes' \
     PARTITION BY (country) AS SELECT country, sum(amount) AS r FROM core.orders GROUP BY 1",
    "CREATE SLICE IF NOT EXISTS s REFRESH ON CHANGE AS SELECT * FROM core_at('orders', 3)",
    "REFRESH SLICE finance.revenue",
    "REFRESH SLICE finance.revenue FULL; EXPLAIN REFRESH SLICE finance.revenue",
    "CREATE SLICE s REFRESH MANUAL INCREMENTAL AS SELECT * FROM core.orders WHERE id > 3",
    "FREEZE SLICE s 'upstream bug'; THAW SLICE s",
    "ROLLBACK SLICE s TO VERSION 3",
    "DROP SLICE IF EXISTS s; DROP CORE TABLE IF EXISTS orders",
    "SHOW CORE TABLES; SHOW SLICES; SHOW SLICE HISTORY s; DESCRIBE SLICE s",
    "VACUUM SLICE s; VACUUM SLICES; VERIFY SLICE s; VERIFY SLICES",
    "SELECT * FROM slice_history('s') WHERE kind = 'refresh'",
    "SET icepie.retain_versions = 20",
];

fn config() -> ProptestConfig {
    let cases = std::env::var("ICEPIE_PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The text of `valid` changed by one edit: cut short, a token put in, a word dropped or
/// repeated.
fn mutate(valid: &str, at: Index, token: &str, edit: u8) -> String {
    let words: Vec<&str> = valid.split(' ').collect();
    let i = at.index(words.len() + 1);
    match edit {
        0 => {
            let chars: Vec<char> = valid.chars().collect();
            chars[..at.index(chars.len() + 1)].iter().collect()
        }
        1 => {
            let mut w = words.clone();
            w.insert(i, token);
            w.join(" ")
        }
        2 => {
            let mut w = words.clone();
            if i < w.len() {
                w.remove(i);
            }
            w.join(" ")
        }
        _ => {
            let mut w = words.clone();
            if i < w.len() {
                w.insert(i, w[i]);
            }
            w.join(" ")
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_token_sequences_never_panic(tokens in prop::collection::vec(select(TOKENS), 0..24)) {
        let _ = IcePie::parse(&tokens.join(" "));
    }

    #[test]
    fn mutated_statements_never_panic(
        valid in select(VALID),
        at in any::<Index>(),
        token in select(TOKENS),
        edit in 0u8..4,
    ) {
        let _ = IcePie::parse(&mutate(valid, at, token, edit));
    }

    #[test]
    fn random_text_never_panics(chars in prop::collection::vec(any::<char>(), 0..200)) {
        let text: String = chars.into_iter().collect();
        let _ = IcePie::parse(&text);
    }
}

#[test]
fn every_statement_to_mutate_parses() {
    for valid in VALID {
        assert!(IcePie::parse(valid).is_ok(), "{valid}");
    }
}
