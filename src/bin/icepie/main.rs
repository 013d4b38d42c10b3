//! `icepie`: the SQL REPL and command line of an icepie warehouse.
//!
//! ```text
//! icepie [--data LOCATION] [--set NAME=VALUE]... [--format FORMAT] [-q] [--bail]
//!        [-c SQL]... [-f FILE]...
//! icepie serve [--data LOCATION] [--set NAME=VALUE]... [--grace SECONDS]
//!              [--pg [ADDR]] [--flight [ADDR]] [--tls-cert PEM --tls-key PEM [--require-tls]]
//!              [--auth-timeout SECONDS]
//!              [--allow-path DIR]... [--read-only] [--statement-timeout SECONDS]
//!              [--statement-memory SIZE] [--max-connections N]
//! ```
//!
//! With a terminal on standard input and no `-c`/`-f`, `icepie` starts the interactive REPL,
//! whose warehouse runs its scheduler of due refreshes. Otherwise it runs the statements of
//! `-c` and `-f` in the order given (or SQL piped on standard input), prints each result, and
//! exits with status 1 if any statement failed (`--bail` stops at the first failure); such a
//! script runs no scheduled refreshes unless `--set scheduler=on`. A script's lines that start
//! with `\` are meta-commands (`\echo`, `\expect error`, ...; `\?` in the REPL lists them).
//!
//! `icepie serve` runs the scheduler alone until SIGINT or SIGTERM, printing one line per
//! scheduled refresh; on a signal it lets running refreshes finish (a second signal, or
//! `--grace` seconds, cancels them: a cancelled refresh commits nothing). With `--pg` it also
//! serves SQL over the PostgreSQL wire protocol (`psql`, drivers, BI tools), and with
//! `--flight` over Arrow Flight SQL (ADBC, JDBC's Flight SQL driver).

mod meta;
mod print;
mod repl;
mod serve;
mod session;

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use clap::{Arg, ArgAction, Command};
use icepie::IcePie;

use print::Format;
use session::{Output, Session, Settings};

/// Worked examples at the end of `--help`.
const EXAMPLES: &str = "\
Examples:
  Ask a question of the warehouse in ./icepie-data:
    icepie -c \"SELECT name, state, version, lag FROM system.slices\"

  Run a script (statements, and meta-commands such as \\echo on lines of their own),
  stopping at the first error, on a warehouse in S3:
    icepie --data s3://bucket/warehouse --bail -f nightly.sql

  Keep the slices of a warehouse refreshed (their REFRESH EVERY / ON CHANGE policies)
  until Ctrl-C or SIGTERM, at most two refreshes at once:
    icepie --data /srv/warehouse --set max_concurrent_refreshes=2 serve

With no -c/-f and a terminal, icepie starts its REPL (\\? lists its meta-commands).";

/// `--version`: icepie's own and those of the engines it was built with.
fn version() -> String {
    format!(
        "{} (DataFusion {}, delta-rs {})",
        env!("CARGO_PKG_VERSION"),
        datafusion::DATAFUSION_VERSION,
        deltalake::crate_version()
    )
}

fn cli() -> Command {
    Command::new("icepie")
        .about("SQL over a frozen core and isolated slices (Apache DataFusion + Delta Lake)")
        .version(&*Box::leak(version().into_boxed_str()))
        .after_help(EXAMPLES)
        .arg(
            Arg::new("data")
                .long("data")
                .short('d')
                .value_name("LOCATION")
                .default_value(icepie::DEFAULT_LOCATION)
                .global(true)
                .help("Warehouse location: a local directory (created if absent) or a URL"),
        )
        .arg(
            Arg::new("set")
                .long("set")
                .value_name("NAME=VALUE")
                .action(ArgAction::Append)
                .global(true)
                .help("An icepie setting, as SET icepie.NAME = VALUE would (repeatable)"),
        )
        .arg(
            Arg::new("format")
                .long("format")
                .value_name("FORMAT")
                .value_parser(Format::NAMES)
                .default_value("table")
                .help("How results are printed"),
        )
        .arg(
            Arg::new("command")
                .short('c')
                .long("command")
                .value_name("SQL")
                .action(ArgAction::Append)
                .help("SQL to run (repeatable; runs in order with -f)"),
        )
        .arg(
            Arg::new("file")
                .short('f')
                .long("file")
                .value_name("FILE")
                .action(ArgAction::Append)
                .help("File of SQL statements to run (repeatable; runs in order with -c)"),
        )
        .arg(
            Arg::new("quiet")
                .short('q')
                .long("quiet")
                .action(ArgAction::SetTrue)
                .help("No banner and no timing"),
        )
        .arg(
            Arg::new("bail")
                .long("bail")
                .action(ArgAction::SetTrue)
                .help("Stop at the first statement that fails"),
        )
        .subcommand(
            Command::new("serve")
                .about("Run the scheduler of due refreshes until SIGINT or SIGTERM")
                .arg(
                    Arg::new("grace")
                        .long("grace")
                        .value_name("SECONDS")
                        .value_parser(clap::value_parser!(u64))
                        .default_value("30")
                        .help("How long running refreshes may finish after a stop signal"),
                )
                .arg(
                    Arg::new("pg")
                        .long("pg")
                        .value_name("ADDR")
                        .num_args(0..=1)
                        .default_missing_value("127.0.0.1:5433")
                        .help(
                            "Also serve SQL over the PostgreSQL wire protocol on ADDR \
                             (127.0.0.1:5433 when no ADDR is given); clients must give the \
                             password in ICEPIE_PASSWORD when it is set, and without it only \
                             a loopback address is served",
                        ),
                )
                .arg(
                    Arg::new("flight")
                        .long("flight")
                        .value_name("ADDR")
                        .num_args(0..=1)
                        .default_missing_value("127.0.0.1:50051")
                        .help(
                            "Also serve SQL over Arrow Flight SQL on ADDR (127.0.0.1:50051 when \
                             no ADDR is given), with the same password rules as --pg",
                        ),
                )
                .arg(
                    Arg::new("tls-cert")
                        .long("tls-cert")
                        .value_name("PEM")
                        .requires("tls-key")
                        .help("Encrypt --pg and --flight connections with this certificate chain"),
                )
                .arg(
                    Arg::new("tls-key")
                        .long("tls-key")
                        .value_name("PEM")
                        .requires("tls-cert")
                        .help("The private key of --tls-cert"),
                )
                .arg(
                    Arg::new("require-tls")
                        .long("require-tls")
                        .action(ArgAction::SetTrue)
                        .requires("tls-cert")
                        .help(
                            "Refuse --pg clients that do not negotiate TLS (sslmode=require); \
                             --flight with a certificate speaks only TLS",
                        ),
                )
                .arg(
                    Arg::new("auth-timeout")
                        .long("auth-timeout")
                        .value_name("SECONDS")
                        .value_parser(clap::value_parser!(u64).range(1..))
                        .default_value("10")
                        .help(
                            "Close a connection that has not logged in within SECONDS, so that \
                             idle sockets cannot hold every --max-connections place",
                        ),
                )
                .arg(
                    Arg::new("allow-path")
                        .long("allow-path")
                        .value_name("DIR")
                        .action(ArgAction::Append)
                        .help(
                            "A directory or object-store URL under which clients may name \
                             files (INGEST ... FROM, COPY ... TO, ...); repeatable; none by \
                             default",
                        ),
                )
                .arg(
                    Arg::new("statement-timeout")
                        .long("statement-timeout")
                        .value_name("SECONDS")
                        .value_parser(clap::value_parser!(u64))
                        .help(
                            "Cancel a client's statement (its rows' sending included) \
                             after SECONDS",
                        ),
                )
                .arg(
                    Arg::new("statement-memory")
                        .long("statement-memory")
                        .value_name("SIZE")
                        .help(
                            "The memory each client statement's rows may use (e.g. 512MB): \
                             beyond it, sorts and aggregations spill to disk, and a statement \
                             that still needs more fails alone",
                        ),
                )
                .arg(
                    Arg::new("max-connections")
                        .long("max-connections")
                        .value_name("N")
                        .value_parser(clap::value_parser!(u32).range(1..))
                        .default_value("100")
                        .help(
                            "How many clients may be connected at once (for --flight, also \
                             how many calls each connection runs at once)",
                        ),
                )
                .arg(
                    Arg::new("read-only")
                        .long("read-only")
                        .action(ArgAction::SetTrue)
                        .help("Clients may only read: queries, SHOW, DESCRIBE, EXPLAIN"),
                ),
        )
}

/// Opens the warehouse of `--data` with the `--set` settings; `scheduler` is the default
/// of the scheduler setting, which `--set scheduler=...` overrides.
pub async fn open(matches: &clap::ArgMatches, scheduler: bool) -> Result<IcePie, String> {
    let location = matches.get_one::<String>("data").expect("default");
    let mut builder = IcePie::builder(location.as_str()).with_scheduler(scheduler);
    for setting in matches.get_many::<String>("set").into_iter().flatten() {
        let Some((name, value)) = setting.split_once('=') else {
            return Err(format!(
                "--set takes NAME=VALUE (e.g. --set retain_versions=20), not '{setting}'"
            ));
        };
        builder = builder.with_setting(name.trim(), value.trim());
    }
    builder.open().await.map_err(|e| e.to_string())
}

/// The SQL texts of `-c` and `-f`, in command-line order.
fn scripts(matches: &clap::ArgMatches) -> Result<Vec<String>, String> {
    let mut items: Vec<(usize, String)> = Vec::new();
    if let (Some(values), Some(indices)) = (
        matches.get_many::<String>("command"),
        matches.indices_of("command"),
    ) {
        items.extend(indices.zip(values.cloned()));
    }
    if let (Some(values), Some(indices)) = (
        matches.get_many::<String>("file"),
        matches.indices_of("file"),
    ) {
        for (i, path) in indices.zip(values) {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read file '{path}': {e}"))?;
            items.push((i, text));
        }
    }
    items.sort_by_key(|(i, _)| *i);
    Ok(items.into_iter().map(|(_, text)| text).collect())
}

async fn run(matches: clap::ArgMatches) -> Result<bool, String> {
    let format = Format::parse(matches.get_one::<String>("format").expect("default"))
        .expect("clap checked the format");
    let quiet = matches.get_flag("quiet");
    let bail = matches.get_flag("bail");
    let mut scripts = scripts(&matches)?;
    let interactive = scripts.is_empty() && std::io::stdin().is_terminal();
    if scripts.is_empty() && !interactive {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        scripts.push(text);
    }
    let warehouse = open(&matches, interactive).await?;
    let stderr_terminal = std::io::stderr().is_terminal();
    let mut session = Session {
        warehouse,
        settings: Settings {
            format,
            max_rows: interactive.then_some(40),
            timing: !quiet && stderr_terminal,
            color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            progress: stderr_terminal,
            cancel_on_ctrl_c: interactive,
        },
        output: Output::Stdout,
        expect_error: false,
        include_depth: 0,
    };
    if interactive {
        let done = repl::run(&mut session, quiet).await;
        // Refreshes return once committed; their records are written before exiting.
        session.warehouse.flush().await;
        done?;
        return Ok(true);
    }
    let mut all_ok = true;
    for text in scripts {
        let (outcome, flow) = session.run_script(&text, bail).await;
        if outcome.failed > 0 {
            all_ok = false;
        }
        if flow == meta::Flow::Quit || (bail && !all_ok) {
            break;
        }
    }
    session.warehouse.flush().await;
    Ok(all_ok)
}

fn main() -> ExitCode {
    let matches = cli().get_matches();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let work = async move {
        match matches.subcommand_matches("serve").cloned() {
            Some(sub) => serve::run(&sub).await.map(|()| true),
            None => run(matches).await,
        }
    };
    match runtime.block_on(work) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
