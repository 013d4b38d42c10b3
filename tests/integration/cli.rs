//! The `icepie` command line without a terminal: statements in order, formats, errors and
//! exit status. Outputs are snapshots (`tests/integration/snapshots/`), temp paths filtered.

use std::process::{Command, Output, Stdio};

fn icepie(dir: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_icepie"));
    cmd.arg("--data").arg(dir).args(args).env("NO_COLOR", "1");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

/// Exit status, stdout and stderr as one text, for a snapshot.
fn transcript(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}--- stderr\n{}",
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts `value` against the snapshot `name`, with the temp dir and timings filtered.
fn snapshot(name: &str, dir: &std::path::Path, value: String) {
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(&regex::escape(&dir.to_string_lossy()), "[DIR]");
    settings.add_filter(r"Elapsed \d+\.\d+ s", "Elapsed [TIME] s");
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_snapshot!(name, value));
}

#[test]
fn runs_commands_and_files_in_order_and_prints_each_result() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("s.sql");
    std::fs::write(
        &script,
        "INGEST INTO t VALUES (2); SELECT sum(n) AS total FROM core.t;",
    )
    .unwrap();
    let out = icepie(
        &dir.path().join("wh"),
        &[
            "--format",
            "csv",
            "-c",
            "CREATE CORE TABLE t (n INT)",
            "-c",
            "INGEST INTO t VALUES (1)",
            "-f",
            script.to_str().unwrap(),
            "-c",
            "SELECT count(*) AS c FROM core.t",
        ],
        None,
    );
    snapshot("cli_order", dir.path(), transcript(&out));
}

#[test]
fn formats() {
    let dir = tempfile::tempdir().unwrap();
    let sql =
        "SELECT 1 AS one, 'a' AS s, NULL AS nothing UNION ALL SELECT 2, 'b', NULL ORDER BY one";
    let mut all = String::new();
    for format in ["table", "csv", "json", "ndjson", "markdown"] {
        let out = icepie(dir.path(), &["--format", format, "-c", sql], None);
        all.push_str(&format!("== {format}\n{}", transcript(&out)));
    }
    snapshot("cli_formats", dir.path(), all);
}

#[test]
fn sql_piped_on_stdin_runs_statements_spanning_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out = icepie(
        dir.path(),
        &["-q"],
        Some("CREATE CORE TABLE t (n INT);\nINGEST INTO t\n  VALUES (1), (2);\nSELECT\n  sum(n) AS s\nFROM core.t;\n"),
    );
    snapshot("cli_stdin", dir.path(), transcript(&out));
}

#[test]
fn failures_are_reported_and_counted_and_bail_stops_at_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "-c",
        "SELECT 1 AS a",
        "-c",
        "SELECT * FROM core.nope",
        "-c",
        "SELEC 2",
        "-c",
        "SELECT 3 AS b",
    ];
    let out = icepie(dir.path(), &args, None);
    let mut all = format!("== going on\n{}", transcript(&out));
    let mut with_bail = vec!["--bail"];
    with_bail.extend(args);
    let out = icepie(dir.path(), &with_bail, None);
    all.push_str(&format!("== --bail\n{}", transcript(&out)));
    snapshot("cli_failures", dir.path(), all);
}

#[test]
fn settings_are_given_with_set_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = icepie(
        dir.path(),
        &[
            "--set",
            "retain_versions=3",
            "--set",
            "icepie.refresh_memory_limit=64MB",
            "--format",
            "csv",
            "-c",
            "SELECT name, value FROM information_schema.df_settings \
             WHERE name IN ('icepie.retain_versions', 'icepie.refresh_memory_limit', \
             'icepie.scheduler') ORDER BY name",
        ],
        None,
    );
    // A script schedules nothing unless asked to.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "name,value\nicepie.refresh_memory_limit,64MB\nicepie.retain_versions,3\nicepie.scheduler,off\n"
    );
    let out = icepie(
        dir.path(),
        &["--set", "retain_versions=many", "-c", "SELECT 1"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("setting icepie.retain_versions"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refreshes_due_slices_and_stops_cleanly_on_sigterm() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join("wh").to_string_lossy().to_string();
    {
        let w = icepie::IcePie::builder(location.clone())
            .with_scheduler(false)
            .open()
            .await
            .unwrap();
        crate::support::run(
            &w,
            "CREATE CORE TABLE t (n BIGINT); INGEST INTO t VALUES (1);
             CREATE SLICE s REFRESH EVERY '1 second' AS SELECT sum(n) AS total, now() AS at FROM core.t;",
        )
        .await;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_icepie"))
        .args([
            "serve",
            "--data",
            &location,
            "--set",
            "scheduler_tick=100ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let line = seen.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(
        line.contains("refreshed slices.s: version 1, 1 rows"),
        "{line}"
    );

    crate::tools::signal(child.id(), libc::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");

    // Whatever it committed is whole: every version is an icepie refresh, the last is served.
    let w = icepie::IcePie::builder(location)
        .with_scheduler(false)
        .open()
        .await
        .unwrap();
    let history = w.history("s").await.unwrap();
    let latest = history[0].version;
    assert!(latest >= 1);
    assert!(history.iter().all(|h| h.descriptor.is_some()));
    assert_eq!(w.slice("s").await.unwrap().version, latest);
    assert_eq!(crate::support::scalar(&w, "SELECT total FROM s").await, "1");
}

/// `text` with table padding removed and the cells of columns whose values change from run
/// to run (times, durations, lags, file sizes) replaced by `*`.
fn steady(text: &str) -> String {
    const VOLATILE: [&str; 8] = [
        "bytes",
        "duration_ms",
        "refreshed_at",
        "created_at",
        "last_ingest_at",
        "lag",
        "committed_at",
        "frozen_since",
    ];
    let mut out = String::new();
    let mut header: Vec<String> = Vec::new();
    // 0: outside a table, 1: after its top border, 2: after its header, 3: in its rows.
    let mut state = 0;
    for line in text.lines() {
        if line.starts_with('+') {
            state = match state {
                0 | 1 => 1,
                2 => 3,
                _ => 0,
            };
            out.push_str("+--+\n");
        } else if line.starts_with('|') {
            let mut cells: Vec<String> = line
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect();
            if state < 2 {
                header = cells.clone();
                state = 2;
            } else {
                for (i, c) in cells.iter_mut().enumerate() {
                    let name = header.get(i).map(String::as_str).unwrap_or_default();
                    if VOLATILE.contains(&name) && c != "NULL" {
                        *c = "*".into();
                    }
                }
            }
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        } else {
            state = 0;
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn the_demo_tells_its_story_and_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let wh = dir.path().join("wh");
    let out = icepie(&wh, &["-f", "sql/demo.sql"], None);
    let text = transcript(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    snapshot("cli_demo", dir.path(), steady(&text));
    // It runs again on its own warehouse: the clean-up drops what the first run made.
    let again = icepie(&wh, &["-f", "sql/demo.sql"], None);
    let again_text = String::from_utf8_lossy(&again.stdout);
    assert_eq!(again.status.code(), Some(0), "{}", transcript(&again));
    assert!(
        again_text.contains("| dropped") && again_text.contains("| core.events"),
        "{again_text}"
    );
}

#[test]
fn scripts_run_meta_commands_between_statements() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("inner.sql");
    std::fs::write(&inner, "\\echo from inner\nSELECT 2 AS two;\n").unwrap();
    let script = format!(
        "\\echo == heading\n\
         DROP SLICE IF EXISTS nothing_here;\n\
         SELECT 1 AS one;\n\
         -- a comment, then a statement meant to fail\n\
         \\expect error\n\
         SELECT * FROM core.missing;\n\
         SELECT '\n\\echo inside a string\n' AS text;\n\
         \\format csv\n\
         \\i {}\n\
         \\q\n\
         SELECT 'not reached' AS never;\n",
        inner.display()
    );
    let out = icepie(&dir.path().join("wh"), &["-q"], Some(&script));
    snapshot("cli_meta_commands", dir.path(), transcript(&out));

    // A statement after \expect error that succeeds is a failure, as is a syntax error
    // without one; line numbers are the script's. \expect covers one statement only; a
    // meta-command inside a statement runs, and the statement goes on; CRLF lines work.
    let out = icepie(
        &dir.path().join("wh"),
        &["-q"],
        Some(
            "\\echo a\n\\expect error\nSELECT 1 AS fine;\n\\echo b\nSELECT\n  1 +;\n\
             \\expect error\nSELEC 1; SELECT 2 AS two;\n\
             SELECT\n\\echo inside a statement\n3 AS three;\r\n\\echo crlf\r\n",
        ),
    );
    snapshot("cli_meta_failures", dir.path(), transcript(&out));
}

#[test]
fn help_has_examples_and_version_names_the_engines() {
    let dir = tempfile::tempdir().unwrap();
    let help = icepie(dir.path(), &["--help"], None);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    for example in ["icepie -c ", "icepie --data s3://", " serve"] {
        assert!(text.contains(example), "{example} missing from:\n{text}");
    }
    let version = icepie(dir.path(), &["--version"], None);
    let text = String::from_utf8_lossy(&version.stdout);
    assert_eq!(
        text.trim(),
        format!(
            "icepie {} (DataFusion {}, delta-rs {})",
            env!("CARGO_PKG_VERSION"),
            datafusion::DATAFUSION_VERSION,
            deltalake::crate_version()
        )
    );
}

#[test]
fn describe_shows_sql_types() {
    let dir = tempfile::tempdir().unwrap();
    let out = icepie(
        &dir.path().join("wh"),
        &[
            "--format",
            "csv",
            "-c",
            "CREATE CORE TABLE t (n INT NOT NULL, at TIMESTAMP, price DECIMAL(10,2))",
            "-c",
            "CREATE SLICE s AS SELECT sum(n) AS total, max(at) AS last, min(price) AS low \
             FROM core.t",
            "-c",
            "DESCRIBE core.t",
            "-c",
            "DESCRIBE SLICE s",
        ],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", transcript(&out));
    for line in [
        "n,INT,NO",
        "at,TIMESTAMP,YES",
        "price,\"DECIMAL(10,2)\",YES",
        "column total,BIGINT",
        "refresh_mode,auto",
        "column last,TIMESTAMP",
        "column low,\"DECIMAL(10,2)\"",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}

#[test]
fn errors_about_data_name_the_file_line_column_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("sales.csv");
    std::fs::write(
        &csv,
        "id,region,amount,units\n300,south,12.5,4\n301,north,99.5,XX\n",
    )
    .unwrap();
    let load = format!("INGEST INTO sales FROM '{}'", csv.display());
    let out = icepie(
        &dir.path().join("wh"),
        &[
            "-c",
            "CREATE CORE TABLE sales (id BIGINT NOT NULL, region TEXT, amount DOUBLE, units BIGINT)",
            "-c",
            &load,
            "-c",
            "INGEST INTO sales VALUES (NULL, 'west', 1.0, 1)",
            "-c",
            "INGEST INTO sales VALUES (302, 'west', 'lots', 1)",
            "-c",
            "CREATE SLICE per_unit AS SELECT id, CAST(amount AS BIGINT) / units AS price \
             FROM core.sales",
            "-c",
            "INGEST INTO sales VALUES (303, 'east', 10.0, 0)",
            "-c",
            "REFRESH SLICE per_unit",
            "-c",
            "SELECT count(*) AS loaded FROM core.sales",
        ],
        None,
    );
    snapshot("cli_data_errors", dir.path(), steady(&transcript(&out)));
}
