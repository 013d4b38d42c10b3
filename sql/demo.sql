-- icepie demo: a frozen core, slices for three domains, new data, a refresh, a slice's life,
-- and a failure that stays inside one slice.
-- Run it with `cargo run -- -f sql/demo.sql` (warehouse: ./icepie-data). Lines starting with
-- a backslash are meta-commands of the icepie command line: \echo prints a heading.

-- Start clean so the demo can run again (a DROP ... IF EXISTS that finds nothing prints nothing).
DROP SLICE IF EXISTS finance.revenue_by_country;
DROP SLICE IF EXISTS marketing.customer_360;
DROP SLICE IF EXISTS marketing.tickets_by_day;
DROP SLICE IF EXISTS ops.daily_orders;
DROP CORE TABLE IF EXISTS orders;
DROP CORE TABLE IF EXISTS customers;
DROP CORE TABLE IF EXISTS events;

\echo
\echo == 1. The frozen core: raw data, append-only, loaded from files
CREATE CORE TABLE customers FROM 'sql/data/customers.csv';
CREATE CORE TABLE orders (
    order_id BIGINT NOT NULL, customer_id BIGINT, order_date DATE, amount DOUBLE, status TEXT
) FROM 'sql/data/orders_2024_01.csv';
CREATE CORE TABLE events FROM 'sql/data/events.json' FORMAT json;
SHOW CORE TABLES;

\echo
\echo == 2. Slices: each domain materializes what it needs, in its own tables
CREATE SLICE finance.revenue_by_country OWNER 'finance' AS
    SELECT c.country, count(*) AS orders, sum(o.amount) AS revenue
    FROM core.orders o JOIN core.customers c ON o.customer_id = c.customer_id
    WHERE o.status = 'paid'
    GROUP BY c.country;

CREATE SLICE marketing.customer_360 OWNER 'marketing' REFRESH EVERY '1 hour' AS
    SELECT c.customer_id, c.name, c.segment,
           (SELECT count(*) FROM core.orders o WHERE o.customer_id = c.customer_id) AS orders,
           (SELECT count(*) FROM core.events e
             WHERE e.customer_id = c.customer_id AND e.kind = 'support_ticket') AS tickets
    FROM core.customers c;

CREATE SLICE marketing.tickets_by_day OWNER 'marketing' AS
    SELECT CAST(day AS DATE) AS day, count(*) AS tickets
    FROM core.events WHERE kind = 'support_ticket' GROUP BY 1;

CREATE SLICE ops.daily_orders OWNER 'ops' REFRESH ON CHANGE PARTITION BY (order_date) AS
    SELECT order_date, count(*) AS orders, sum(amount) AS amount
    FROM core.orders GROUP BY order_date;

SELECT * FROM finance.revenue_by_country ORDER BY revenue DESC;

\echo
\echo == 3. New data arrives as one atomic append; slices serve their version, now stale
INGEST INTO orders FROM 'sql/data/orders_2024_02.csv';
SELECT domain, name, state, version FROM system.slices ORDER BY domain, name;

\echo
\echo == 4. Refresh one slice: it reads only its inputs and writes only its own files
REFRESH SLICE finance.revenue_by_country;
SELECT * FROM finance.revenue_by_country ORDER BY revenue DESC;

\echo
\echo == 5. A slice's life: freeze it while investigating, read its past, roll it back
FREEZE SLICE finance.revenue_by_country 'checking February refunds';
SELECT name, state, frozen_reason FROM system.slices WHERE state = 'frozen';
SELECT * FROM slice_at('finance.revenue_by_country', 0) ORDER BY revenue DESC;
THAW SLICE finance.revenue_by_country;
ROLLBACK SLICE finance.revenue_by_country TO VERSION 0;
SELECT version, kind, inputs FROM slice_history('finance.revenue_by_country') ORDER BY version;

\echo
\echo == 6. A bad load breaks one slice, and only that one
-- February's events come from a partner who writes dates as MM/DD/YYYY.
INGEST INTO events FROM 'sql/data/events_2024_02.json';
-- The refresh of tickets_by_day fails on '02/03/2024'; nothing is committed.
\expect error
REFRESH SLICE marketing.tickets_by_day;
-- It still serves its last good version, and the slice next to it refreshes as usual.
SELECT * FROM marketing.tickets_by_day ORDER BY day;
REFRESH SLICE marketing.customer_360;
SELECT domain, name, state, version, last_error FROM system.slices ORDER BY domain, name;

\echo
\echo == 7. Fix the definition and re-slice: only tickets_by_day is rebuilt
CREATE OR REPLACE SLICE marketing.tickets_by_day OWNER 'marketing' AS
    SELECT to_date(day, '%Y-%m-%d', '%m/%d/%Y') AS day, count(*) AS tickets
    FROM core.events WHERE kind = 'support_ticket' GROUP BY 1;
SELECT * FROM marketing.tickets_by_day ORDER BY day;
SHOW SLICES;
