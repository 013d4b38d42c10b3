//! `icepie`: run SQL against a warehouse from the command line.
//!
//! ```text
//! icepie [--data LOCATION] [--format table|csv|json] [-c SQL]... [-f FILE]...
//! ```
//!
//! Statements from `-c` and `-f` run in the order given (SQL is read from standard input when
//! neither is given and input is piped). Each result is printed; the first error is printed on
//! stderr and the exit status is 1.

mod print;

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use clap::{Arg, ArgAction, Command};
use icepie::{IcePie, IcePieError};

use print::Format;

fn cli() -> Command {
    Command::new("icepie")
        .about("SQL over a frozen core and isolated slices (Apache DataFusion + Delta Lake)")
        .version(env!("CARGO_PKG_VERSION"))
        .arg(
            Arg::new("data")
                .long("data")
                .short('d')
                .value_name("LOCATION")
                .default_value(icepie::storage::DEFAULT_LOCATION)
                .help("Warehouse location: a local directory or a URL"),
        )
        .arg(
            Arg::new("format")
                .long("format")
                .value_name("FORMAT")
                .value_parser(["table", "csv", "json"])
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
}

/// The SQL texts to run, in command-line order.
fn scripts(matches: &clap::ArgMatches) -> Result<Vec<(String, String)>, String> {
    let mut items: Vec<(usize, String, String)> = Vec::new();
    if let (Some(values), Some(indices)) = (
        matches.get_many::<String>("command"),
        matches.indices_of("command"),
    ) {
        for (v, i) in values.zip(indices) {
            items.push((i, "-c".into(), v.clone()));
        }
    }
    if let (Some(values), Some(indices)) = (
        matches.get_many::<String>("file"),
        matches.indices_of("file"),
    ) {
        for (path, i) in values.zip(indices) {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read file '{path}': {e}"))?;
            items.push((i, path.clone(), text));
        }
    }
    items.sort_by_key(|(i, _, _)| *i);
    Ok(items
        .into_iter()
        .map(|(_, src, text)| (src, text))
        .collect())
}

async fn run(matches: clap::ArgMatches) -> Result<(), String> {
    let format = Format::parse(matches.get_one::<String>("format").expect("default"));
    let mut scripts = scripts(&matches)?;
    if scripts.is_empty() {
        if std::io::stdin().is_terminal() {
            return Err(
                "nothing to run: give SQL with -c 'SQL' or -f FILE, or pipe it on standard input"
                    .into(),
            );
        }
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        scripts.push(("stdin".into(), text));
    }
    let location = matches.get_one::<String>("data").expect("default");
    let warehouse = IcePie::open(location.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    for (_source, text) in scripts {
        for stmt in IcePie::parse(&text).map_err(|e| e.to_string())? {
            let df = warehouse.execute(stmt).await.map_err(|e| e.to_string())?;
            print::print(df, format, &mut out)
                .await
                .map_err(|e| IcePieError::from(e).to_string())?;
        }
    }
    Ok(())
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
    match runtime.block_on(run(matches)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
