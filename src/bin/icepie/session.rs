//! One command-line session: runs SQL text statement by statement, prints each result,
//! reports errors and timings, shows progress and cancels on Ctrl-C. Presentation only: every
//! statement runs through `IcePie::execute`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use icepie::{IcePie, IcePieError, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::meta::{self, Flow};
use crate::print::{self, Format, Layout};

/// Where results go.
pub enum Output {
    /// Standard output.
    Stdout,
    /// A file (`\o FILE`).
    File(std::io::BufWriter<std::fs::File>, String),
}

/// Settings a session runs with; the REPL's meta-commands change them.
pub struct Settings {
    pub format: Format,
    pub max_rows: Option<usize>,
    pub timing: bool,
    /// ANSI colour on stderr (red errors, dim NULLs on a terminal).
    pub color: bool,
    /// Live progress line on stderr.
    pub progress: bool,
    /// Ctrl-C cancels the running statement instead of ending the process.
    pub cancel_on_ctrl_c: bool,
}

/// What running some SQL text came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub ok: usize,
    pub failed: usize,
}

impl std::ops::AddAssign for Outcome {
    fn add_assign(&mut self, other: Self) {
        self.ok += other.ok;
        self.failed += other.failed;
    }
}

/// A warehouse plus presentation state.
pub struct Session {
    pub warehouse: IcePie,
    pub settings: Settings,
    pub output: Output,
    /// `\expect error` was given: the next statement is meant to fail.
    pub expect_error: bool,
    /// How many `\i` files are running inside each other.
    pub include_depth: usize,
}

/// Why a statement did not complete.
enum Stop {
    Error(IcePieError),
    Cancelled,
}

impl Session {
    /// Terminal width when results go to a terminal.
    fn width(&self) -> Option<u16> {
        match self.output {
            Output::Stdout if std::io::stdout().is_terminal() => {
                terminal_size::terminal_size().map(|(w, _)| w.0)
            }
            _ => None,
        }
    }

    fn layout(&self) -> Layout {
        let to_terminal = matches!(self.output, Output::Stdout) && std::io::stdout().is_terminal();
        Layout {
            format: self.settings.format,
            max_rows: self.settings.max_rows,
            width: self.width(),
            color: self.settings.color && to_terminal,
            hide_empty: false,
        }
    }

    /// Runs a script: SQL statements and, on lines of their own, meta-commands (`\echo`,
    /// `\expect error`, `\timing`, ...). With `bail`, stops at the first failure; `\q` stops
    /// it too, and is passed on.
    pub async fn run_script(&mut self, text: &str, bail: bool) -> (Outcome, Flow) {
        let mut outcome = Outcome::default();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // The SQL not run yet, after blank lines standing for the lines before it, so that
        // a syntax error's line number is the script's.
        let mut pending = String::new();
        let mut quit = false;
        for line in text.lines() {
            if let Some(meta) = line.trim_start().strip_prefix('\\') {
                if !inside_literal(&pending) {
                    // The statements finished so far run first; one not finished yet goes on
                    // after the meta-command, as in psql.
                    let (complete, tail) = split_statements(&pending);
                    for statement in complete {
                        outcome += self.run_text(&statement, bail).await;
                        if bail && outcome.failed > 0 {
                            return (outcome, Flow::Continue);
                        }
                    }
                    pending = tail;
                    pending.push('\n');
                    // `\expect error` is for the next statement, not a meta-command's own.
                    let expect = std::mem::take(&mut self.expect_error);
                    let (inner, flow) = meta::run(self, meta).await;
                    self.expect_error |= expect;
                    outcome += inner;
                    if flow == Flow::Quit {
                        quit = true;
                        pending.clear();
                        break;
                    }
                    if bail && outcome.failed > 0 {
                        return (outcome, flow);
                    }
                    continue;
                }
            }
            pending.push_str(line);
            pending.push('\n');
        }
        let (complete, tail) = split_statements(&pending);
        for statement in complete.into_iter().chain(has_sql(&tail).then_some(tail)) {
            outcome += self.run_text(&statement, bail).await;
            if bail && outcome.failed > 0 {
                break;
            }
        }
        if std::mem::take(&mut self.expect_error) {
            self.notice("Error: \\expect error is not followed by a statement");
            outcome.failed += 1;
        }
        (outcome, if quit { Flow::Quit } else { Flow::Continue })
    }

    /// Runs every statement of `text`; with `bail`, stops at the first failure.
    pub async fn run_text(&mut self, text: &str, bail: bool) -> Outcome {
        let mut outcome = Outcome::default();
        let statements = match IcePie::parse(text) {
            Ok(s) => s,
            Err(e) => {
                let expected = std::mem::take(&mut self.expect_error);
                self.report(&e, text, expected);
                if expected {
                    outcome.ok += 1;
                } else {
                    outcome.failed += 1;
                }
                return outcome;
            }
        };
        for stmt in statements {
            let expected = std::mem::take(&mut self.expect_error);
            match self.run_statement(stmt).await {
                Ok(()) if expected => {
                    self.notice("Error: the statement after \\expect error succeeded");
                    outcome.failed += 1;
                }
                Ok(()) => outcome.ok += 1,
                Err(Stop::Error(e)) if expected => {
                    self.report(&e, text, true);
                    outcome.ok += 1;
                }
                Err(stop) => {
                    match stop {
                        Stop::Error(e) => self.report(&e, text, false),
                        Stop::Cancelled => self.notice("cancelled; nothing was committed"),
                    }
                    outcome.failed += 1;
                }
            }
            if bail && outcome.failed > 0 {
                break;
            }
        }
        outcome
    }

    /// Writes a line where results go (`\echo`).
    pub fn write_line(&mut self, text: &str) {
        let written = match &mut self.output {
            Output::Stdout => writeln!(std::io::stdout(), "{text}"),
            Output::File(f, _) => writeln!(f, "{text}"),
        };
        if let Err(e) = written {
            self.notice(&format!("cannot write: {e}"));
        }
    }

    async fn run_statement(&mut self, stmt: icepie::Statement) -> Result<(), Stop> {
        let started = Instant::now();
        let rows = Arc::new(AtomicU64::new(0));
        let written = Progress::new();
        let progress = self
            .settings
            .progress
            .then(|| spinner(rows.clone(), written.clone()));
        let mut layout = self.layout();
        // A DROP ... IF EXISTS that found nothing has nothing to say.
        layout.hide_empty = matches!(
            stmt,
            icepie::Statement::DropSlice {
                if_exists: true,
                ..
            } | icepie::Statement::DropCoreTable {
                if_exists: true,
                ..
            }
        );
        let warehouse = self.warehouse.clone();
        let out: &mut dyn Write = match &mut self.output {
            Output::Stdout => &mut std::io::stdout(),
            Output::File(f, _) => f,
        };
        let work = async {
            let (result, notices) = IcePie::with_notices(async {
                let df = warehouse.execute_with_progress(stmt, written).await?;
                print::print(df, layout, out, &rows)
                    .await
                    .map_err(IcePieError::from)
            })
            .await;
            for n in notices {
                eprintln!("NOTICE: {n}");
            }
            result
        };
        let result = if self.settings.cancel_on_ctrl_c {
            tokio::select! {
                r = work => r.map_err(Stop::Error),
                _ = tokio::signal::ctrl_c() => Err(Stop::Cancelled),
            }
        } else {
            work.await.map_err(Stop::Error)
        };
        if let Some(p) = progress {
            p.finish_and_clear();
        }
        if result.is_ok() && self.settings.timing {
            eprintln!("Elapsed {:.3} s", started.elapsed().as_secs_f64());
        }
        result
    }

    /// Prints an informational line on stderr.
    pub fn notice(&self, text: &str) {
        eprintln!("{text}");
    }

    /// Prints an error on stderr: in red on a terminal (unless `expected`), with a syntax
    /// error's position marked under the line of the statement it is in.
    pub fn report(&self, e: &IcePieError, text: &str, expected: bool) {
        let color = self.settings.color && std::io::stderr().is_terminal() && !expected;
        let (red, reset) = if color {
            ("\x1b[31m", "\x1b[0m")
        } else {
            ("", "")
        };
        let label = if expected {
            "Error (expected)"
        } else {
            "Error"
        };
        let mut msg = format!("{red}{label}: {e}{reset}");
        if let IcePieError::Syntax(s) = e {
            if let Some((line, column)) = position(s) {
                if let Some(src) = text.lines().nth(line.saturating_sub(1)) {
                    msg.push_str(&format!(
                        "\n  {src}\n  {}{red}^{reset}",
                        " ".repeat(column.saturating_sub(1))
                    ));
                }
            }
        }
        eprintln!("{msg}");
    }
}

/// True when `text` ends inside a string literal or a block comment, where a line starting
/// with `\\` is text, not a meta-command.
fn inside_literal(text: &str) -> bool {
    Tokenizer::new(&GenericDialect {}, text).tokenize().is_err()
}

/// The statements of `text` that end with `;`, each after blank lines standing for the lines
/// before it, and what follows the last of them (likewise).
fn split_statements(text: &str) -> (Vec<String>, String) {
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, text).tokenize() else {
        // Unfinished (an open string or comment): nothing is complete yet.
        return (vec![], text.to_string());
    };
    let (mut complete, mut current, mut lines, mut start) = (vec![], String::new(), 0, 0);
    for token in tokens {
        let piece = token.to_string();
        lines += piece.matches('\n').count();
        current.push_str(&piece);
        if token == Token::SemiColon {
            if has_sql(&current) {
                complete.push(format!("{}{current}", "\n".repeat(start)));
            }
            current.clear();
            start = lines;
        }
    }
    (complete, format!("{}{current}", "\n".repeat(start)))
}

/// True when `text` holds anything but whitespace and comments.
fn has_sql(text: &str) -> bool {
    match Tokenizer::new(&GenericDialect {}, text).tokenize() {
        Ok(tokens) => tokens.iter().any(|t| !matches!(t, Token::Whitespace(_))),
        Err(_) => !text.trim().is_empty(),
    }
}

/// The `Line: L, Column: C` sqlparser puts in its messages.
fn position(msg: &str) -> Option<(usize, usize)> {
    let rest = &msg[msg.rfind("Line: ")? + 6..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.trim().parse().ok()?, column.parse().ok()?))
}

/// A progress line on stderr that appears once a statement has run for half a second: the
/// rows and bytes a load or build has processed, or the rows of a result printed so far.
fn spinner(rows: Arc<AtomicU64>, written: Arc<Progress>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("valid template"),
    );
    let handle = bar.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        while !handle.is_finished() {
            handle.set_message(progress_message(
                written.rows(),
                written.bytes(),
                written.rows_written(),
                rows.load(Ordering::Relaxed),
            ));
            handle.tick();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    bar
}

/// What the progress line says: what was read and written, else the result rows printed.
fn progress_message(read: u64, read_bytes: u64, written: u64, printed: u64) -> String {
    if read > 0 || written > 0 {
        format!(
            "{} rows read ({}), {} written",
            print::thousands(read as usize),
            icepie::Size(read_bytes).human(),
            print::thousands(written as usize)
        )
    } else if printed > 0 {
        format!("{} rows", print::thousands(printed as usize))
    } else {
        "running".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::position;

    #[test]
    fn progress_says_what_was_processed_then_what_was_printed() {
        use super::progress_message;
        assert_eq!(progress_message(0, 0, 0, 0), "running");
        assert_eq!(progress_message(0, 0, 0, 1204), "1,204 rows");
        assert_eq!(
            progress_message(2_500_000, 3 * 1024 * 1024 * 1024 + 1, 7, 0),
            "2,500,000 rows read (3.0 GB), 7 written"
        );
    }

    #[test]
    fn scripts_split_into_statements_keeping_their_lines() {
        use super::split_statements;
        let (done, rest) = split_statements("SELECT 1;\n-- note\nSELECT ';'\n  ;\nSELECT");
        assert_eq!(done, vec!["SELECT 1;", "\n-- note\nSELECT ';'\n  ;"]);
        assert_eq!(rest, "\n\n\n\nSELECT");
        let (done, rest) = split_statements("SELECT 'open\n");
        assert!(done.is_empty());
        assert_eq!(rest, "SELECT 'open\n");
    }

    #[test]
    fn finds_the_position_in_parser_messages() {
        assert_eq!(
            position(
                "SQL syntax error: Expected: an expression, found: FROM at Line: 2, Column: 8"
            ),
            Some((2, 8))
        );
        assert_eq!(position("no position here"), None);
    }
}
