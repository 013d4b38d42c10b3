//! One command-line session: runs SQL text statement by statement, prints each result,
//! reports errors and timings, shows progress and cancels on Ctrl-C. Presentation only: every
//! statement runs through `IcePie::execute`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use icepie::{IcePie, IcePieError};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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

/// A warehouse plus presentation state.
pub struct Session {
    pub warehouse: IcePie,
    pub settings: Settings,
    pub output: Output,
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
        }
    }

    /// Runs every statement of `text`; with `bail`, stops at the first failure.
    pub async fn run_text(&mut self, text: &str, bail: bool) -> Outcome {
        let mut outcome = Outcome::default();
        let statements = match IcePie::parse(text) {
            Ok(s) => s,
            Err(e) => {
                self.report(&e, text);
                outcome.failed += 1;
                return outcome;
            }
        };
        for stmt in statements {
            match self.run_statement(stmt).await {
                Ok(()) => outcome.ok += 1,
                Err(stop) => {
                    match stop {
                        Stop::Error(e) => self.report(&e, text),
                        Stop::Cancelled => self.notice("cancelled; nothing was committed"),
                    }
                    outcome.failed += 1;
                    if bail {
                        break;
                    }
                }
            }
        }
        outcome
    }

    async fn run_statement(&mut self, stmt: icepie::Statement) -> Result<(), Stop> {
        let started = Instant::now();
        let rows = Arc::new(AtomicU64::new(0));
        let progress = self.settings.progress.then(|| spinner(rows.clone()));
        let layout = self.layout();
        let warehouse = self.warehouse.clone();
        let out: &mut dyn Write = match &mut self.output {
            Output::Stdout => &mut std::io::stdout(),
            Output::File(f, _) => f,
        };
        let work = async {
            let df = warehouse.execute(stmt).await?;
            print::print(df, layout, out, &rows)
                .await
                .map_err(IcePieError::from)
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

    /// Prints an error on stderr: in red on a terminal, with a syntax error's position marked
    /// under the line of the statement it is in.
    pub fn report(&self, e: &IcePieError, text: &str) {
        let color = self.settings.color && std::io::stderr().is_terminal();
        let (red, reset) = if color {
            ("\x1b[31m", "\x1b[0m")
        } else {
            ("", "")
        };
        let mut msg = format!("{red}Error: {e}{reset}");
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

/// The `Line: L, Column: C` sqlparser puts in its messages.
fn position(msg: &str) -> Option<(usize, usize)> {
    let rest = &msg[msg.rfind("Line: ")? + 6..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.trim().parse().ok()?, column.parse().ok()?))
}

/// A progress line on stderr that appears once a statement has run for half a second.
fn spinner(rows: Arc<AtomicU64>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("valid template"),
    );
    let handle = bar.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        while !handle.is_finished() {
            let n = rows.load(Ordering::Relaxed) as usize;
            handle.set_message(if n > 0 {
                format!("{} rows", print::thousands(n))
            } else {
                "running".to_string()
            });
            handle.tick();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    bar
}

#[cfg(test)]
mod tests {
    use super::position;

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
