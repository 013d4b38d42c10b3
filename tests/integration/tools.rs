//! The programs the tests run besides `icepie`, found or installed on first use so that
//! `cargo test` needs nothing set up by hand: a Python with the client drivers
//! (`tests/clients/drivers.py`), the moto S3 server (`s3.rs`) and `psql` (`pg.rs`).
//!
//! - [`python`]: `ICEPIE_PYTHON` if set (it must have the drivers, else the test fails with the
//!   `pip install` that adds them); otherwise the tests' own virtualenv, made with
//!   `python3 -m venv` under cargo's target directory (`CARGO_TARGET_TMPDIR`) and filled with
//!   [`PACKAGES`] from PyPI the first time a test needs it.
//! - [`moto_server`]: `ICEPIE_MOTO` if set, else that virtualenv's `moto_server`.
//! - [`psql`]: `ICEPIE_PSQL` if set, else `psql` on `PATH`, else, as root with `apt-get`,
//!   Debian's `postgresql-client` installed; otherwise the test fails with that command.
//!
//! A tool that cannot be had fails the test that needs it, saying the command that installs it;
//! none is ever skipped.
//!
//! **Invariants**
//! - Set-up runs once per test process (a `OnceLock`) and once at a time across processes (an
//!   exclusive lock on a file beside the virtualenv, held while it is checked and made), so test
//!   threads and concurrent `cargo test` runs never build one virtualenv twice at once.
//! - The virtualenv counts as made only when its marker file names exactly [`PACKAGES`] and its
//!   Python imports them: one left half-made by an interrupted run, or made with other pins, is
//!   removed and made again.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The Python packages the tests use, pinned (the newest on PyPI when pinned): the S3 server
/// and the drivers `tests/clients/drivers.py` imports, installed into the tests' own venv.
const PACKAGES: [&str; 4] = [
    "moto[server]==5.2.6",
    "psycopg[binary]==3.3.9",
    "adbc-driver-flightsql==1.13.0",
    "pyarrow==26.0.1",
];

/// The modules `tests/clients/drivers.py` imports.
const CLIENT_MODULES: &str = "import psycopg, adbc_driver_flightsql, pyarrow";

/// A Python with the client drivers.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    found(
        PYTHON.get_or_init(|| match std::env::var_os("ICEPIE_PYTHON") {
            Some(given) => given_python(PathBuf::from(given)),
            None => venv().map(|dir| dir.join("bin/python")),
        }),
    )
}

/// The moto S3 server's command.
pub fn moto_server() -> &'static Path {
    static MOTO: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    found(MOTO.get_or_init(|| match std::env::var_os("ICEPIE_MOTO") {
        Some(given) => Ok(PathBuf::from(given)),
        None => venv().map(|dir| dir.join("bin/moto_server")),
    }))
}

/// PostgreSQL's `psql`.
pub fn psql() -> &'static Path {
    static PSQL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    found(PSQL.get_or_init(find_psql))
}

/// Sends `signal` to process `pid` (`libc::kill`, so no `kill` program is needed).
pub fn signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    match unsafe { libc::kill(pid, signal) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn found(tool: &'static Result<PathBuf, String>) -> &'static Path {
    match tool {
        Ok(path) => path,
        Err(why) => panic!("{why}"),
    }
}

/// `ICEPIE_PYTHON`, once it is seen to import the client drivers.
fn given_python(python: PathBuf) -> Result<PathBuf, String> {
    let pins = PACKAGES
        .iter()
        .filter(|p| !p.starts_with("moto"))
        .map(|p| quote(p))
        .collect::<Vec<_>>()
        .join(" ");
    let check = output(Command::new(&python).args(["-c", CLIENT_MODULES]));
    match check {
        Ok(out) if out.status.success() => Ok(python),
        Ok(out) => Err(format!(
            "ICEPIE_PYTHON={} lacks the client drivers ({}): install them with\n  {} -m pip \
             install {pins}\nor unset ICEPIE_PYTHON to let the tests make their own virtualenv",
            python.display(),
            last_line(&out),
            python.display(),
        )),
        Err(e) => Err(format!(
            "cannot run ICEPIE_PYTHON={} ({e}): unset it to let the tests make their own \
             virtualenv",
            python.display()
        )),
    }
}

/// The tests' virtualenv with [`PACKAGES`], made if need be.
fn venv() -> Result<PathBuf, String> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VENV.get_or_init(make_venv).clone()
}

fn make_venv() -> Result<PathBuf, String> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.join("icepie-test-venv");
    let _lock = lock(&tmp.join("icepie-test-venv.lock"))?;
    let marker = dir.join("icepie-packages");
    let wanted = PACKAGES.join("\n");
    let all_modules = format!("{CLIENT_MODULES}, moto");
    let python = dir.join("bin/python");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted)
        && output(Command::new(&python).args(["-c", &all_modules]))
            .is_ok_and(|out| out.status.success())
    {
        return Ok(dir);
    }
    note(&format!(
        "making the tests' Python virtualenv {} with {} (first run only; a minute or two)",
        dir.display(),
        PACKAGES.join(", ")
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| format!("cannot remove the half-made {}: {e}", dir.display()))?;
    }
    let python3 = match on_path("python3") {
        Some(python3) => python3,
        None => {
            apt_install("python3-venv").map_err(|e| {
                format!(
                    "no python3 on PATH for the tests' virtualenv ({e}): install Python 3 \
                     (apt-get install python3-venv), or set ICEPIE_PYTHON and ICEPIE_MOTO"
                )
            })?;
            on_path("python3").ok_or("python3-venv installed no python3 on PATH")?
        }
    };
    let mut make = Command::new(&python3);
    make.args([OsStr::new("-m"), OsStr::new("venv"), dir.as_os_str()]);
    let mut made = succeeded(&mut make);
    if made.is_err() && apt_install("python3-venv").is_ok() {
        // A Debian python3 has no venv module (ensurepip) without python3-venv.
        let _ = std::fs::remove_dir_all(&dir);
        made = succeeded(&mut make);
    }
    made.map_err(|e| {
        format!(
            "cannot make the tests' virtualenv: {e}\ninstall the venv module (Debian: \
             apt-get install python3-venv), or set ICEPIE_PYTHON and ICEPIE_MOTO"
        )
    })?;
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
    ])
    .args(PACKAGES);
    succeeded(&mut pip).map_err(|e| {
        format!(
            "cannot install the tests' Python packages from PyPI: {e}\nset ICEPIE_PYTHON and \
             ICEPIE_MOTO to use a Python that has them"
        )
    })?;
    std::fs::write(&marker, wanted)
        .map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
    Ok(dir)
}

fn find_psql() -> Result<PathBuf, String> {
    const INSTALL: &str = "install psql: apt-get install postgresql-client (or set ICEPIE_PSQL)";
    if let Some(given) = std::env::var_os("ICEPIE_PSQL") {
        let given = PathBuf::from(given);
        return match output(Command::new(&given).arg("--version")) {
            Ok(out) if out.status.success() => Ok(given),
            Ok(out) => Err(format!(
                "ICEPIE_PSQL={} --version failed ({}): {INSTALL}",
                given.display(),
                last_line(&out)
            )),
            Err(e) => Err(format!(
                "cannot run ICEPIE_PSQL={} ({e}): {INSTALL}",
                given.display()
            )),
        };
    }
    if let Some(psql) = on_path("psql") {
        return Ok(psql);
    }
    apt_install("postgresql-client").map_err(|e| format!("no psql on PATH ({e}): {INSTALL}"))?;
    on_path("psql").ok_or_else(|| format!("postgresql-client installed no psql: {INSTALL}"))
}

/// Installs a Debian package when running as root where `apt-get` is; `apt-get update` first
/// if the package is not found.
fn apt_install(package: &str) -> Result<(), String> {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!("not root, so {package} is not installed for you"));
    }
    let apt = on_path("apt-get").ok_or("no apt-get")?;
    let _lock = lock(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("icepie-apt.lock"))?;
    note(&format!("apt-get install {package}"));
    let mut install = Command::new(&apt);
    install
        .args(["install", "-y", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive");
    if succeeded(&mut install).is_ok() {
        return Ok(());
    }
    succeeded(Command::new(&apt).arg("update"))?;
    succeeded(&mut install)
}

/// An exclusive lock on `path`, held until the file is dropped (released by the OS if the
/// process dies).
fn lock(path: &Path) -> Result<File, String> {
    let cannot = |e| format!("cannot lock {}: {e}", path.display());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(cannot)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(cannot)?;
    file.lock().map_err(cannot)?;
    Ok(file)
}

/// The executable `name` in a directory of `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn output(command: &mut Command) -> std::io::Result<Output> {
    command.stdin(std::process::Stdio::null()).output()
}

/// Runs `command`; on failure, the command line (to run by hand) and the end of its output.
fn succeeded(command: &mut Command) -> Result<(), String> {
    let line = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    match output(command) {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let lines: Vec<_> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            Err(format!("`{line}` failed ({}):\n{tail}", out.status))
        }
        Err(e) => Err(format!("cannot run `{line}`: {e}")),
    }
}

fn last_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr.lines().last().unwrap_or("no output").to_string()
}

/// `arg` as a POSIX shell word.
fn quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:@,+".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// A line on the terminal even while libtest captures the test's output: set-up that takes
/// minutes says what it is doing.
fn note(what: &str) {
    let _ = writeln!(std::io::stderr(), "icepie tests: {what}");
}

#[test]
fn quote_makes_shell_words() {
    assert_eq!(quote("pyarrow==26.0.1"), "pyarrow==26.0.1");
    assert_eq!(quote("moto[server]==5.2.6"), "'moto[server]==5.2.6'");
    assert_eq!(quote("it's"), r"'it'\''s'");
}
