//! The interactive REPL: line editing and history (rustyline), statements that span lines
//! until `;`, completion of keywords and names, and meta-commands (`\?` lists them).

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use futures::TryStreamExt;
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Context, Editor, Helper};

use crate::meta::{self, Flow};
use crate::session::Session;

const KEYWORDS: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "ORDER",
    "HAVING",
    "LIMIT",
    "OFFSET",
    "JOIN",
    "LEFT",
    "RIGHT",
    "FULL",
    "INNER",
    "OUTER",
    "ON",
    "USING",
    "AS",
    "AND",
    "OR",
    "NOT",
    "IN",
    "IS",
    "NULL",
    "LIKE",
    "BETWEEN",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "DISTINCT",
    "UNION",
    "ALL",
    "WITH",
    "VALUES",
    "CAST",
    "COUNT",
    "SUM",
    "AVG",
    "MIN",
    "MAX",
    "EXPLAIN",
    "ANALYZE",
    "DESCRIBE",
    "SHOW",
    "TABLES",
    "CREATE",
    "OR",
    "REPLACE",
    "DROP",
    "IF",
    "EXISTS",
    "SCHEMA",
    "TABLE",
    "VIEW",
    "CORE",
    "SLICE",
    "SLICES",
    "INGEST",
    "INTO",
    "FORMAT",
    "REFRESH",
    "MANUAL",
    "EVERY",
    "CHANGE",
    "OWNER",
    "PARTITION",
    "PARQUET",
    "CSV",
    "JSON",
    "SET",
    "FREEZE",
    "THAW",
    "ROLLBACK",
    "TO",
    "VERSION",
    "HISTORY",
    "VACUUM",
    "VERIFY",
    "INCREMENTAL",
    "FULL",
    "AUTO",
    "ALTER",
    "CLUSTER",
    "NONE",
    "LAG",
    "APPLY",
    "DISMISS",
    "PROPOSAL",
];

/// Completion, multi-line validation; no hints or highlighting.
struct IcePieHelper {
    names: Arc<Mutex<Vec<String>>>,
}

/// True when `text` is a meta-command or ends with `;` outside strings and comments.
pub fn is_complete(text: &str) -> bool {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.starts_with('\\') {
        return true;
    }
    let dialect = GenericDialect {};
    match Tokenizer::new(&dialect, text).tokenize() {
        Ok(tokens) => tokens
            .iter()
            .rev()
            .find(|t| !matches!(t, Token::Whitespace(_)))
            .is_some_and(|t| *t == Token::SemiColon),
        Err(_) => false,
    }
}

impl Validator for IcePieHelper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        Ok(if is_complete(ctx.input()) {
            ValidationResult::Valid(None)
        } else {
            ValidationResult::Incomplete
        })
    }
}

impl Completer for IcePieHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let start = line[..pos]
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
            .map_or(0, |i| i + 1);
        let word = &line[start..pos];
        if word.is_empty() {
            return Ok((start, vec![]));
        }
        let lower = word.to_lowercase();
        let upper = word.chars().next().is_some_and(char::is_uppercase);
        let mut out: Vec<Pair> = Vec::new();
        for name in self.names.lock().expect("names").iter() {
            if name.starts_with(&lower) && name.len() > lower.len() {
                out.push(Pair {
                    display: name.clone(),
                    replacement: name.clone(),
                });
            }
        }
        for kw in KEYWORDS {
            if kw.to_lowercase().starts_with(&lower) && kw.len() > word.len() {
                let kw = if upper {
                    kw.to_string()
                } else {
                    kw.to_lowercase()
                };
                out.push(Pair {
                    display: kw.clone(),
                    replacement: format!("{kw} "),
                });
            }
        }
        out.dedup_by(|a, b| a.display == b.display);
        Ok((start, out))
    }
}

impl Hinter for IcePieHelper {
    type Hint = String;
}

impl Highlighter for IcePieHelper {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(
        &'s self,
        prompt: &'p str,
        _default: bool,
    ) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}

impl Helper for IcePieHelper {}

/// Schemas, tables (`schema.table` and bare) and columns, for completion.
async fn completion_names(session: &Session) -> Vec<String> {
    let sql = "SELECT table_schema, table_name, column_name FROM information_schema.columns \
               WHERE table_schema <> 'information_schema'";
    let mut names = vec![];
    let Ok(df) = session.warehouse.sql(sql).await else {
        return names;
    };
    let Ok(mut stream) = df.execute_stream().await else {
        return names;
    };
    while let Ok(Some(batch)) = stream.try_next().await {
        let cols: Vec<_> = (0..3)
            .map(|i| {
                datafusion::arrow::compute::cast(
                    batch.column(i),
                    &datafusion::arrow::datatypes::DataType::Utf8,
                )
            })
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        if cols.len() != 3 {
            continue;
        }
        let (s, t, c) = (
            cols[0].as_string::<i32>(),
            cols[1].as_string::<i32>(),
            cols[2].as_string::<i32>(),
        );
        for row in 0..batch.num_rows() {
            if s.is_null(row) || t.is_null(row) {
                continue;
            }
            names.push(s.value(row).to_string());
            names.push(format!("{}.{}", s.value(row), t.value(row)));
            names.push(t.value(row).to_string());
            if !c.is_null(row) {
                names.push(c.value(row).to_string());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// False for input that only reads (queries, SHOW, DESCRIBE, EXPLAIN, most meta-commands),
/// after which the completion names cannot have changed.
fn may_change_names(text: &str) -> bool {
    // Splitting at every ';' may cut a string literal; that only costs a needless refresh.
    text.split(';').any(|part| {
        let first = part
            .trim_start()
            .split(|c: char| c.is_whitespace() || c == '(')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        !first.is_empty() && !READ_ONLY_STARTS.contains(&first.as_str())
    })
}

/// First words of input that cannot create or drop anything.
const READ_ONLY_STARTS: [&str; 14] = [
    "SELECT",
    "WITH",
    "VALUES",
    "SHOW",
    "DESCRIBE",
    "DESC",
    "EXPLAIN",
    "\\D",
    "\\?",
    "\\HISTORY",
    "\\TIMING",
    "\\FORMAT",
    "\\MAXROWS",
    "\\O",
];

/// Where the REPL keeps its history: `$XDG_DATA_HOME/icepie/history`
/// (`~/.local/share/icepie/history` by default).
fn history_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    let dir = base.join("icepie");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join("history"))
}

/// Runs the REPL until `\q` or Ctrl-D.
pub async fn run(session: &mut Session, quiet: bool) -> Result<(), String> {
    let names = Arc::new(Mutex::new(completion_names(session).await));
    let mut editor: Editor<IcePieHelper, DefaultHistory> =
        Editor::new().map_err(|e| format!("cannot start the line editor: {e}"))?;
    editor.set_helper(Some(IcePieHelper {
        names: names.clone(),
    }));
    let history = history_path();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    if !quiet {
        println!(
            "icepie {} on warehouse {} (\\? for help, \\q to quit)",
            env!("CARGO_PKG_VERSION"),
            session.warehouse.location()
        );
    }
    loop {
        // Waiting for a line blocks this thread; let the scheduler's tasks run elsewhere.
        match tokio::task::block_in_place(|| editor.readline("icepie> ")) {
            Ok(input) => {
                let text = input.trim();
                if text.is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(text);
                if let Some(meta) = text.strip_prefix('\\') {
                    if meta::run(session, meta).await.1 == Flow::Quit {
                        break;
                    }
                } else {
                    session.run_text(text, false).await;
                }
                // Listing names plans every table; do it only when names may have changed.
                if may_change_names(text) {
                    *names.lock().expect("names") = completion_names(session).await;
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(format!("cannot read input: {e}")),
        }
        if let Some(h) = &history {
            let _ = editor.save_history(h);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_complete;

    #[test]
    fn statements_are_complete_at_a_semicolon_outside_strings() {
        assert!(is_complete("SELECT 1;"));
        assert!(is_complete("SELECT 1;  "));
        assert!(is_complete("\\d"));
        assert!(!is_complete("SELECT 1"));
        assert!(!is_complete("SELECT ';"));
        assert!(!is_complete("SELECT 1 -- ;"));
        assert!(is_complete("SELECT 1; SELECT 2;"));
    }

    #[test]
    fn only_input_that_may_create_or_drop_refreshes_completion_names() {
        use super::may_change_names;
        assert!(!may_change_names("select 1;"));
        assert!(!may_change_names("  SHOW SLICES;"));
        assert!(!may_change_names("\\d core.t"));
        assert!(may_change_names("CREATE SLICE s AS SELECT 1;"));
        assert!(may_change_names("drop core table t;"));
        assert!(may_change_names("\\i script.sql"));
        assert!(may_change_names("SELECT 1; CREATE CORE TABLE t (n INT);"));
    }
}
