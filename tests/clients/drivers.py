"""icepie's servers through the Python drivers users connect with: psycopg (PostgreSQL wire
protocol) and ADBC's Flight SQL driver (Arrow Flight SQL).

Run by tests/integration/clients.rs, which starts both servers with a password and passes
their ports: python3 drivers.py PG_PORT FLIGHT_PORT PASSWORD. Exits non-zero at the first
check that fails, saying which.
"""

import sys

import adbc_driver_flightsql.dbapi as flightsql
import psycopg
import pyarrow as pa

pg_port, flight_port, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


# --- psycopg -----------------------------------------------------------------------------
pg = dict(host="127.0.0.1", port=pg_port, user="analyst", dbname="icepie")
try:
    psycopg.connect(**pg, password="wrong").close()
    check(False, "psycopg: a wrong password is refused")
except psycopg.OperationalError as e:
    check("password" in str(e).lower(), f"psycopg: a wrong password is refused ({e})")

with psycopg.connect(**pg, password=password, autocommit=True) as conn:
    conn.execute("CREATE CORE TABLE orders (id BIGINT, amount DOUBLE, status TEXT)")
    conn.execute(
        "INGEST INTO orders VALUES (1, 120.0, 'paid'), (2, 80.0, 'paid'), (3, 300.0, 'open')"
    )
    conn.execute(
        "CREATE SLICE ops.paid AS SELECT id, amount FROM core.orders WHERE status = 'paid'"
    )
    rows = conn.execute(
        "SELECT id, amount FROM ops.paid WHERE amount > %s ORDER BY id", [100]
    ).fetchall()
    check(rows == [(1, 120.0)], f"psycopg: a slice queried with a parameter ({rows})")
    state = conn.execute(
        "SELECT state FROM system.slices WHERE domain = 'ops' AND name = 'paid'"
    ).fetchone()
    check(state is not None and state[0] == "fresh", f"psycopg: system.slices ({state})")
    # A refresh that fails: the slice keeps serving its last good version, and says why.
    conn.execute("CREATE CORE TABLE raw (v TEXT)")
    conn.execute("INGEST INTO raw VALUES ('7')")
    conn.execute("CREATE SLICE ops.casted AS SELECT CAST(v AS BIGINT) AS n FROM core.raw")
    conn.execute("INGEST INTO raw VALUES ('oops')")
    try:
        conn.execute("REFRESH SLICE ops.casted")
        check(False, "psycopg: a refresh over a bad value fails")
    except psycopg.Error as e:
        check("oops" in str(e), f"psycopg: a refresh over a bad value fails ({e})")
    row = conn.execute(
        "SELECT state, last_error FROM system.slices WHERE domain = 'ops' AND name = 'casted'"
    ).fetchone()
    check(row is not None and row[0] == "failed" and "oops" in row[1],
          f"psycopg: the failed refresh in system.slices ({row})")
    rows = conn.execute("SELECT n FROM ops.casted").fetchall()
    check(rows == [(7,)], f"psycopg: the failed slice serves its last version ({rows})")
    try:
        conn.execute("SELECT * FROM nowhere")
        check(False, "psycopg: an unknown table fails")
    except psycopg.Error as e:
        check(e.sqlstate == "42P01", f"psycopg: an unknown table's SQLSTATE ({e.sqlstate})")

# --- ADBC Flight SQL ---------------------------------------------------------------------
uri = f"grpc://127.0.0.1:{flight_port}"
try:
    with flightsql.connect(uri, db_kwargs={"username": "analyst", "password": "wrong"}) as c:
        c.cursor().execute("SELECT 1")
    check(False, "ADBC: a wrong password is refused")
except flightsql.Error as e:
    check("password" in str(e).lower() or "unauthenticated" in str(e).lower(),
          f"ADBC: a wrong password is refused ({e})")

kwargs = {"username": "analyst", "password": password}
with flightsql.connect(uri, db_kwargs=kwargs, autocommit=True) as conn:
    cur = conn.cursor()
    cur.execute("CREATE SLICE ops.big AS SELECT id, amount FROM core.orders WHERE amount > 100")
    cur.fetchall()
    cur.execute("SELECT id, amount FROM ops.big WHERE id > $1 ORDER BY id", parameters=[0])
    table = cur.fetch_arrow_table()
    check(isinstance(table, pa.Table) and table.column("id").to_pylist() == [1, 3],
          f"ADBC: a slice read as Arrow with a parameter ({table.to_pydict()})")
    cur.execute("SELECT id FROM ops.big WHERE amount > ? ORDER BY id", parameters=[200])
    check(cur.fetchall() == [(3,)], "ADBC: ? placeholders")
    cur.execute("CREATE SCHEMA scratch")
    cur.execute("CREATE TABLE scratch.m (x BIGINT)")
    cur.executemany("INSERT INTO scratch.m VALUES (?)", [(1,), (2,), (3,)])
    cur.execute("SELECT sum(x) FROM scratch.m")
    check(cur.fetchone()[0] == 6, "ADBC: executemany runs once per row")
    cur.execute("SELECT count(*) AS n FROM generate_series(1, 1000000)")
    check(cur.fetchone()[0] == 1000000, "ADBC: an aggregate over a million rows")
    objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    tables = {
        (schema["db_schema_name"], table["table_name"])
        for catalog in objects
        for schema in catalog["catalog_db_schemas"] or []
        for table in schema["db_schema_tables"] or []
    }
    check({("core", "orders"), ("ops", "paid"), ("system", "slices")} <= tables,
          "ADBC: get_objects lists core tables, slices and system tables")
    schema = conn.adbc_get_table_schema("big", db_schema_filter="ops")
    check(schema.names == ["id", "amount"], f"ADBC: a slice's schema ({schema.names})")
    cur.execute("SELECT state FROM system.slices WHERE domain = 'ops' AND name = 'casted'")
    check(cur.fetchall() == [("failed",)], "ADBC: the failed refresh in system.slices")
    try:
        cur.execute("REFRESH SLICE ops.casted")
        cur.fetchall()
        check(False, "ADBC: a refresh over a bad value fails")
    except flightsql.Error as e:
        check("oops" in str(e), f"ADBC: a refresh over a bad value fails ({e})")
    try:
        cur.execute("SELECT * FROM nowhere")
        cur.fetchall()
        check(False, "ADBC: an unknown table fails")
    except flightsql.Error as e:
        check("nowhere" in str(e), "ADBC: an unknown table fails with its name")

print("all clients ok")
