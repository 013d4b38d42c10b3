//! Both servers through the Python drivers users connect with: psycopg (PostgreSQL) and ADBC's
//! Flight SQL driver, running `tests/clients/drivers.py` against one warehouse served with a
//! password. `ICEPIE_PYTHON` names a Python with `psycopg[binary]`, `adbc-driver-flightsql` and
//! `pyarrow` (`bash .ci/run` installs them in `~/.cache/icepie/venv`); `python3` by default.

use icepie::server::ServerOptions;

use crate::support::{serve, Protocol};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drivers_create_query_and_list_slices() {
    let (dir, warehouse) = crate::support::open_with(&[]).await;
    let options = ServerOptions {
        password: Some("s3cret".into()),
        ..ServerOptions::default()
    };
    let pg = serve(Protocol::Pg, warehouse.clone(), options.clone()).await;
    let flight = serve(Protocol::Flight, warehouse, options).await;
    let ports = (pg.addr.port(), flight.addr.port());
    let python = std::env::var("ICEPIE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/drivers.py");
    let run = python.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&run)
            .arg(script)
            .args([ports.0.to_string(), ports.1.to_string(), "s3cret".into()])
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot run '{python}' ({e}): set ICEPIE_PYTHON"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("all clients ok"),
        "the Python drivers' checks failed (they need psycopg[binary], adbc-driver-flightsql and \
         pyarrow: bash .ci/run installs them, or set ICEPIE_PYTHON):\n{stdout}\n{stderr}"
    );
    drop((pg, flight, dir));
}
