//! The interactive REPL, driven in a pseudo-terminal.

use std::process::Command;

use rexpect::session::{spawn_command, PtySession};

/// The REPL's prompt, drawn once the line editor owns the terminal.
const PROMPT: &str = "icepie> ";

fn start(dir: &std::path::Path) -> PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_icepie"));
    cmd.arg("--data")
        .arg(dir.join("wh"))
        .env("XDG_DATA_HOME", dir.join("xdg"))
        .env("TERM", "xterm")
        .env("NO_COLOR", "1")
        .env("COLUMNS", "100");
    let mut p = spawn_command(cmd, Some(60_000)).expect("spawn icepie in a pty");
    p.exp_string("\\? for help").unwrap();
    p
}

#[test]
fn a_session_edits_completes_cancels_recovers_and_quits() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path());

    // Setup, then a statement spanning two lines.
    p.send_line("CREATE CORE TABLE events (id BIGINT); INGEST INTO events VALUES (1), (2);")
        .unwrap();
    p.exp_string("core.events").unwrap();
    p.exp_string("rows_added").unwrap();
    p.send_line("SELECT 40 +").unwrap();
    p.send_line("2 AS answer;").unwrap();
    p.exp_string("| 42").unwrap();
    p.exp_string("1 row").unwrap();

    // Tab completes a table name.
    p.send("SELECT count(*) AS n FROM core.eve").unwrap();
    p.send("\t").unwrap();
    p.send_line(";").unwrap();
    p.exp_string("| 2 ").unwrap();

    // A long statement, cancelled with Ctrl-C; the next statement runs.
    p.send_line(
        "SELECT count(*) FROM core.events a, (SELECT * FROM generate_series(1, 100000000000)) b;",
    )
    .unwrap();
    // Cancelled once it runs: its progress line says so (a query's counts only what it printed).
    p.exp_string("running").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("cancelled").unwrap();
    p.send_line("SELECT 7 AS seven;").unwrap();
    p.exp_string("| 7 ").unwrap();

    // A syntax error, marked under the statement; the session goes on.
    p.send_line("SELEC 1;").unwrap();
    p.exp_string("SQL syntax error").unwrap();
    p.exp_string("^").unwrap();
    p.send_line("SELECT 8 AS eight;").unwrap();
    p.exp_string("| 8 ").unwrap();

    // Meta-commands.
    p.send_line("\\d").unwrap();
    p.exp_string("system_table").unwrap();
    p.send_line("\\q").unwrap();
    p.exp_eof().unwrap();

    // History was kept under the XDG data dir.
    let history = std::fs::read_to_string(dir.path().join("xdg/icepie/history")).unwrap();
    assert!(history.contains("SELECT 7 AS seven;"), "{history}");
}

#[test]
fn a_cancelled_refresh_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path());
    p.send_line(
        "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1); \
         CREATE SLICE heavy AS SELECT sum(a.n * b.n + c.n) AS c FROM core.t a, core.t b, core.t c;",
    )
    .unwrap();
    p.exp_string("slices.heavy").unwrap();
    p.send_line("INGEST INTO t SELECT value AS n FROM generate_series(1, 2000);")
        .unwrap();
    p.exp_string("rows_added").unwrap();
    p.send_line("REFRESH SLICE heavy;").unwrap();
    // Cancelled once it runs: its progress line says what it has read so far.
    p.exp_string("rows read").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("cancelled; nothing was committed").unwrap();
    p.send_line("SELECT 'v' || version AS v FROM system.slices WHERE name = 'heavy';")
        .unwrap();
    p.exp_string("| v0 ").unwrap();
    // Ctrl-D must reach the line editor: typed while the terminal is still in cooked mode
    // (between statements), the terminal driver swallows it, as it would a person's.
    p.exp_string(PROMPT).unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
}
