//! `icepie serve`: the scheduler without a REPL, for a warehouse's refreshes to run
//! unattended (a service, a container, a terminal left open), and with `--pg` a PostgreSQL
//! wire-protocol server for clients to run SQL on the warehouse.
//!
//! It prints one line per scheduled refresh that ended on standard output, and stops cleanly
//! on SIGINT or SIGTERM: no new refresh starts, running ones may finish for `--grace`
//! seconds, and a second signal cancels them at once. A cancelled refresh commits nothing.

use std::time::Duration;

use icepie::RefreshEvent;
use tokio::sync::broadcast::error::RecvError;

use crate::print::thousands;

/// Resolves on the next SIGINT or SIGTERM.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, String> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| format!("cannot watch for SIGTERM: {e}"))?,
        })
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn print_event(e: &RefreshEvent) {
    let at = e.at.format("%Y-%m-%dT%H:%M:%SZ");
    let secs = e.duration_ms as f64 / 1000.0;
    match &e.outcome {
        Ok((version, rows)) => println!(
            "{at} refreshed {}: version {version}, {} rows, {secs:.2} s",
            e.slice,
            thousands(usize::try_from(*rows).unwrap_or_default())
        ),
        Err(error) => println!(
            "{at} refresh of {} failed after {secs:.2} s: {error}",
            e.slice
        ),
    }
}

/// Runs the scheduler until a stop signal.
pub async fn run(matches: &clap::ArgMatches) -> Result<(), String> {
    let grace = Duration::from_secs(*matches.get_one::<u64>("grace").expect("default"));
    let warehouse = crate::open(matches, true).await?;
    let options = warehouse.options();
    if !options.scheduler.0 && matches.get_one::<String>("pg").is_none() {
        return Err(
            "the scheduler is off (--set scheduler=off) and no --pg: nothing to serve".into(),
        );
    }
    let mut events = warehouse.subscribe();
    let mut signals = Signals::new()?;
    // Dropped at the stop signal, which stops the PostgreSQL server taking statements.
    let (stop_pg, stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = matches.get_one::<String>("pg") {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        let password = std::env::var("ICEPIE_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty());
        if password.is_none() && !bound.ip().is_loopback() {
            return Err(format!(
                "{bound} is reachable from other machines and ICEPIE_PASSWORD is not set: set \
                 a password or serve 127.0.0.1"
            ));
        }
        eprintln!(
            "PostgreSQL wire protocol on {bound} ({})",
            if password.is_some() {
                "password required (SCRAM-SHA-256)"
            } else {
                "no password: loopback only"
            }
        );
        let allow_paths: Vec<String> = matches
            .get_many::<String>("allow-path")
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let read_only = matches.get_flag("read-only");
        if !allow_paths.is_empty() {
            eprintln!("clients may name files under: {}", allow_paths.join(", "));
        }
        if read_only {
            eprintln!("read-only: clients may only query");
        }
        let statement_timeout = matches
            .get_one::<u64>("statement-timeout")
            .map(|s| Duration::from_secs(*s));
        let options = icepie::server::PgOptions {
            password,
            allow_paths,
            read_only,
            statement_timeout,
            max_connections: matches
                .get_one::<u32>("max-connections")
                .map(|n| *n as usize),
        };
        let server = warehouse.clone();
        tokio::spawn(async move {
            let stop = async {
                let _ = stopped.await;
            };
            if let Err(e) = icepie::server::serve_pg(server, listener, options, stop).await {
                eprintln!("the PostgreSQL server stopped: {e}");
            }
        });
    }
    eprintln!(
        "icepie serve on warehouse {}: checking for due refreshes every {}, at most {} at once \
         (Ctrl-C or SIGTERM stops)",
        warehouse.location(),
        options.scheduler_tick,
        options.max_concurrent_refreshes
    );
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(e) => print_event(&e),
                Err(RecvError::Lagged(n)) => eprintln!("({n} refresh events were not shown)"),
                Err(RecvError::Closed) => break,
            },
            _ = signals.next() => break,
        }
    }
    drop(stop_pg);
    eprintln!(
        "stopping: no new refreshes; running ones may finish for {} s (a second signal cancels them)",
        grace.as_secs()
    );
    let close = warehouse.close(grace);
    tokio::pin!(close);
    loop {
        tokio::select! {
            _ = &mut close => break,
            event = events.recv() => if let Ok(e) = event { print_event(&e) },
            _ = signals.next() => {
                eprintln!("cancelling running refreshes; nothing of them is committed");
                return Ok(());
            }
        }
    }
    while let Ok(e) = events.try_recv() {
        print_event(&e);
    }
    eprintln!("stopped");
    Ok(())
}
