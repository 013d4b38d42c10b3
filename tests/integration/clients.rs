//! Both servers through the Python drivers users connect with: psycopg (PostgreSQL) and ADBC's
//! Flight SQL driver, running `tests/clients/drivers.py` against one warehouse served with a
//! password. The Python is [`crate::tools::python`]: `ICEPIE_PYTHON`, else a virtualenv the
//! tests make under the target directory with the pinned drivers on first use.

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
    let python = crate::tools::python();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/drivers.py");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args([ports.0.to_string(), ports.1.to_string(), "s3cret".into()])
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot run '{}' ({e})", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("all clients ok"),
        "the Python drivers' checks failed:\n{stdout}\n{stderr}"
    );
    drop((pg, flight, dir));
}
