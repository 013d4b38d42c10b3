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
        Ok(built) if built.unchanged => println!(
            "{at} {}: nothing to do, no input changed since version {} ({secs:.2} s)",
            e.slice, built.version
        ),
        Ok(built) => println!(
            "{at} refreshed {}: version {}, {} rows, {secs:.2} s",
            e.slice,
            built.version,
            thousands(usize::try_from(built.stats.rows).unwrap_or_default())
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
    let pg = matches.get_one::<String>("pg");
    let flight = matches.get_one::<String>("flight");
    if !options.scheduler.0 && pg.is_none() && flight.is_none() {
        return Err(
            "the scheduler is off (--set scheduler=off) and no --pg nor --flight: nothing to serve"
                .into(),
        );
    }
    let mut events = warehouse.subscribe();
    let mut signals = Signals::new()?;
    // Dropped at the stop signal, which stops the servers taking statements.
    let (stop_servers, stopped) = tokio::sync::watch::channel(());
    if pg.is_some() || flight.is_some() {
        let server_options = server_options(matches)?;
        for (addr, protocol) in [(pg, Protocol::Pg), (flight, Protocol::Flight)] {
            let Some(addr) = addr else { continue };
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let bound = listener.local_addr().map_err(|e| e.to_string())?;
            if server_options.password.is_none() && !bound.ip().is_loopback() {
                return Err(format!(
                    "{bound} is reachable from other machines and ICEPIE_PASSWORD is not set: \
                     set a password or serve 127.0.0.1"
                ));
            }
            if server_options.tls.is_none() && !bound.ip().is_loopback() {
                eprintln!(
                    "warning: {} on {bound} is reachable from other machines without TLS: \
                     statements and their rows cross the network in clear; give --tls-cert \
                     and --tls-key{}",
                    protocol.name(),
                    match protocol {
                        Protocol::Pg => " (and --require-tls)",
                        Protocol::Flight => "",
                    }
                );
            }
            eprintln!(
                "{} on {bound} ({}{})",
                protocol.name(),
                match (server_options.password.is_some(), protocol) {
                    (true, Protocol::Pg) => "password required (SCRAM-SHA-256)",
                    (true, Protocol::Flight) => "password required (basic, then a bearer token)",
                    (false, _) => "no password: loopback only",
                },
                match (&server_options.tls, server_options.require_tls, protocol) {
                    (None, _, _) => "",
                    (Some(_), true, Protocol::Pg) => ", TLS required",
                    (Some(_), false, Protocol::Pg) => ", TLS when the client asks",
                    (Some(_), _, Protocol::Flight) => ", TLS",
                }
            );
            let server = warehouse.clone();
            let options = server_options.clone();
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                let stop = async move {
                    let _ = stopped.changed().await;
                };
                let served = match protocol {
                    Protocol::Pg => icepie::server::serve_pg(server, listener, options, stop).await,
                    Protocol::Flight => {
                        icepie::server::serve_flight(server, listener, options, stop).await
                    }
                };
                if let Err(e) = served {
                    eprintln!("the {} server stopped: {e}", protocol.name());
                }
            });
        }
        if !server_options.allow_paths.is_empty() {
            eprintln!(
                "clients may name files under: {}",
                server_options.allow_paths.join(", ")
            );
        }
        if server_options.read_only {
            eprintln!("read-only: clients may only query");
        }
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
    drop(stop_servers);
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

#[derive(Clone, Copy)]
enum Protocol {
    Pg,
    Flight,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Pg => "PostgreSQL wire protocol",
            Protocol::Flight => "Arrow Flight SQL",
        }
    }
}

/// What the servers' clients may do, from the command line and `ICEPIE_PASSWORD`.
fn server_options(matches: &clap::ArgMatches) -> Result<icepie::server::ServerOptions, String> {
    let tls = match (
        matches.get_one::<String>("tls-cert"),
        matches.get_one::<String>("tls-key"),
    ) {
        (Some(cert), Some(key)) => {
            Some(icepie::server::TlsFiles::read(cert, key).map_err(|e| e.to_string())?)
        }
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together: give both".into()),
    };
    Ok(icepie::server::ServerOptions {
        password: std::env::var("ICEPIE_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty()),
        allow_paths: matches
            .get_many::<String>("allow-path")
            .into_iter()
            .flatten()
            .cloned()
            .collect(),
        read_only: matches.get_flag("read-only"),
        statement_timeout: matches
            .get_one::<u64>("statement-timeout")
            .map(|s| Duration::from_secs(*s)),
        max_connections: matches
            .get_one::<u32>("max-connections")
            .map(|n| *n as usize),
        statement_memory: match matches.get_one::<String>("statement-memory") {
            None => None,
            Some(text) => Some(
                icepie::Size::parse(text)
                    .filter(|s| s.0 > 0)
                    .ok_or_else(|| {
                        format!(
                            "--statement-memory takes a size such as 256MB or 2GB, not '{text}'"
                        )
                    })?
                    .0,
            ),
        },
        tls,
        require_tls: matches.get_flag("require-tls"),
        auth_timeout: Some(Duration::from_secs(
            *matches.get_one::<u64>("auth-timeout").expect("default"),
        )),
    })
}
