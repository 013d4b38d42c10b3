//! Meta-commands (`\?` lists them), shared by the REPL and scripts.

use crate::print::Format;
use crate::session::{Outcome, Output, Session};

const HELP: &str = r"Meta-commands:
  \?               this help
  \d               list core tables, slices (state, version) and system tables
  \d NAME          describe a core table or slice
  \history NAME    refresh history of a slice
  \timing on|off   show elapsed time after each statement
  \format FORMAT   table, csv, json, ndjson or markdown
  \maxrows N       rows shown at most by table output (0: no limit)
  \o FILE          send results to FILE; \o alone sends them back to the terminal
  \i FILE          run the SQL statements and meta-commands in FILE
  \echo TEXT       print TEXT (in scripts: headings between statements)
  \expect error    the next statement is meant to fail: its error is shown, not counted
  \q               quit (also Ctrl-D)
SQL statements end with ';' and may span lines; in scripts (-f, \i) a meta-command is a
line of its own between statements. Ctrl-C cancels a running statement
(a cancelled refresh or ingest commits nothing) or clears the line.";

/// How deep `\\i` may nest files.
const MAX_INCLUDE_DEPTH: usize = 16;

/// What comes after a meta-command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// `\q`: stop.
    Quit,
}

/// Runs one meta-command (without its `\`); the outcome counts the statements of `\i`.
pub async fn run(session: &mut Session, meta: &str) -> (Outcome, Flow) {
    let meta = meta.trim_end_matches(';').trim();
    let (cmd, arg) = match meta.split_once(char::is_whitespace) {
        Some((c, a)) => (c, a.trim()),
        None => (meta, ""),
    };
    match (cmd, arg) {
        ("q", _) => return (Outcome::default(), Flow::Quit),
        ("?", _) => println!("{HELP}"),
        ("d", "") => {
            session
                .run_text(
                    "SELECT name AS core_table, version, rows FROM system.core_tables ORDER BY name; \
                     SELECT domain || '.' || name AS slice, state, version, rows FROM system.slices \
                     ORDER BY domain, name; \
                     SELECT table_name AS system_table FROM information_schema.tables \
                     WHERE table_schema = 'system' ORDER BY table_name;",
                    false,
                )
                .await;
        }
        ("d", name) => describe(session, name).await,
        ("history", "") => session.notice("usage: \\history SLICE"),
        ("history", name) => {
            let Some(name) = plain_name(name) else {
                session.notice("usage: \\history SLICE, e.g. \\history finance.revenue");
                return (Outcome::default(), Flow::Continue);
            };
            let name = if name.contains('.') {
                name.to_string()
            } else {
                format!("slices.{name}")
            };
            let sql = format!(
                "SELECT started_at, kind, status, version, rows, bytes, duration_ms, inputs, error \
                 FROM system.refreshes WHERE slice = '{}' ORDER BY started_at",
                name.replace('\'', "''")
            );
            session.run_text(&sql, false).await;
        }
        ("timing", "on") => session.settings.timing = true,
        ("timing", "off") => session.settings.timing = false,
        ("timing", "") => session.settings.timing = !session.settings.timing,
        ("format", f) => match Format::parse(f) {
            Some(f) => session.settings.format = f,
            None => session.notice(&format!("formats: {}", Format::NAMES.join(", "))),
        },
        ("maxrows", n) => match n.parse::<usize>() {
            Ok(0) => session.settings.max_rows = None,
            Ok(n) => session.settings.max_rows = Some(n),
            Err(_) => session.notice("usage: \\maxrows N (0 for no limit)"),
        },
        ("o", "") => {
            if let Output::File(mut f, path) =
                std::mem::replace(&mut session.output, Output::Stdout)
            {
                use std::io::Write;
                let _ = f.flush();
                session.notice(&format!(
                    "results go to the terminal again (were going to {path})"
                ));
            }
        }
        ("o", path) => match std::fs::File::create(path) {
            Ok(f) => session.output = Output::File(std::io::BufWriter::new(f), path.to_string()),
            Err(e) => session.notice(&format!("cannot write {path}: {e}")),
        },
        ("i", "") => session.notice("usage: \\i FILE"),
        ("i", path) => match std::fs::read_to_string(path) {
            Ok(_) if session.include_depth >= MAX_INCLUDE_DEPTH => session.notice(&format!(
                "Error: \\i {path} would nest files more than {MAX_INCLUDE_DEPTH} deep (does a \
                 file include itself?)"
            )),
            // A file run from a file: boxed, as the call is recursive.
            Ok(text) => {
                session.include_depth += 1;
                let ran = Box::pin(session.run_script(&text, false)).await;
                session.include_depth -= 1;
                return ran;
            }
            Err(e) => session.notice(&format!("cannot read {path}: {e}")),
        },
        ("echo", text) => session.write_line(text),
        ("expect", "error") => session.expect_error = true,
        ("expect", _) => session.notice("usage: \\expect error (before a statement meant to fail)"),
        _ => session.notice(&format!("unknown meta-command \\{cmd}; \\? lists them")),
    }
    (Outcome::default(), Flow::Continue)
}

/// `NAME` or `SCHEMA.NAME` of plain identifiers, lower-cased; `None` for anything else, so
/// that no other text is ever spliced into the SQL a meta-command runs.
fn plain_name(text: &str) -> Option<String> {
    let lower = text.trim().to_lowercase();
    let parts: Vec<&str> = lower.split('.').collect();
    let plain = |p: &&str| {
        p.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    (parts.len() <= 2 && parts.iter().all(plain)).then_some(lower)
}

/// `\d NAME`: a slice's description, or a core (or any) table's columns.
async fn describe(session: &mut Session, name: &str) {
    let Some(lower) = plain_name(name) else {
        session.notice(&format!(
            "\\d takes a table or slice name such as orders, core.orders or finance.revenue, \
             not '{name}'"
        ));
        return;
    };
    let is_slice = session.warehouse.slice(&lower).await.is_ok();
    let sql = if is_slice {
        format!("DESCRIBE SLICE {lower}")
    } else if lower.contains('.') {
        format!("DESCRIBE {lower}")
    } else {
        format!("DESCRIBE core.{lower}")
    };
    session.run_text(&sql, false).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn meta_commands_take_plain_names_only() {
        use super::plain_name;
        assert_eq!(plain_name("Core.Orders").as_deref(), Some("core.orders"));
        assert_eq!(plain_name("revenue_2").as_deref(), Some("revenue_2"));
        assert_eq!(plain_name("x; DROP CORE TABLE t"), None);
        assert_eq!(plain_name("a.b.c"), None);
        assert_eq!(plain_name("t'--"), None);
        assert_eq!(plain_name(""), None);
    }
}
