//! The `icepie` command line: statements in order, formats, and exit status.

use std::process::{Command, Output};

fn icepie(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_icepie"))
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
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
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.ends_with("total\n3\nc\n2\n"), "{stdout}");
}

#[test]
fn table_format_is_the_default_and_json_is_an_array() {
    let dir = tempfile::tempdir().unwrap();
    let out = icepie(dir.path(), &["-c", "SELECT 1 AS one"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "+-----+\n| one |\n+-----+\n| 1   |\n+-----+\n"
    );
    let out = icepie(
        dir.path(),
        &["--format", "json", "-c", "SELECT 1 AS one, 'a' AS s"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "[{\"one\":1,\"s\":\"a\"}]\n"
    );
}

#[test]
fn the_first_error_stops_the_run_with_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = icepie(
        dir.path(),
        &[
            "-c",
            "SELECT 1 AS a",
            "-c",
            "SELECT * FROM core.nope",
            "-c",
            "SELECT 2 AS b",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("Error: ") && stderr.contains("nope"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("| a |") && !stdout.contains("| b |"),
        "{stdout}"
    );
}
