//! `system.usage` (one row per table per day) and `system.usage_columns` (per table and
//! column: how many queries filtered, grouped and joined on it), from the usage files of the
//! days within `icepie.usage_retention`.
//!
//! The files hold sums already ([`crate::usage::files`]), so what is read grows with the
//! tables and query shapes in use and the days kept, not with the number of queries.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::error::Result as DFResult;
use datafusion::prelude::SessionContext;

use super::ts;
use crate::catalog::state::CatalogState;
use crate::usage::files::{batch, day_of, read};

/// Schema of `system.usage`.
pub(super) static USAGE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let int = |name| Field::new(name, DataType::Int64, true);
    Arc::new(Schema::new(vec![
        Field::new("day", DataType::Date32, false),
        Field::new("table", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        int("queries"),
        int("processes"),
        int("rows_returned"),
        int("bytes_returned"),
        int("rows_scanned"),
        int("bytes_scanned"),
        int("files_scanned"),
        int("files_skipped"),
        Field::new("avg_latency_ms", DataType::Float64, true),
        Field::new("max_latency_ms", DataType::Float64, true),
        Field::new("first_read", ts(), true),
        Field::new("last_read", ts(), true),
    ]))
});

/// Schema of `system.usage_columns`.
pub(super) static USAGE_COLUMNS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let int = |name| Field::new(name, DataType::Int64, true);
    Arc::new(Schema::new(vec![
        Field::new("table", DataType::Utf8, false),
        Field::new("column", DataType::Utf8, false),
        int("filters"),
        int("equality"),
        int("range"),
        int("in_list"),
        int("other_filters"),
        int("groups"),
        int("joins"),
        Field::new("last_used", ts(), true),
    ]))
});

const USAGE_SQL: &str = r#"
SELECT day, "table", kind,
    sum(queries) AS queries,
    count(DISTINCT process) AS processes,
    sum(rows_returned) AS rows_returned,
    sum(bytes_returned) AS bytes_returned,
    sum(rows_scanned) AS rows_scanned,
    sum(bytes_scanned) AS bytes_scanned,
    sum(files_scanned) AS files_scanned,
    sum(files_skipped) AS files_skipped,
    CAST(sum(latency_us_total) AS DOUBLE) / sum(queries) / 1000.0 AS avg_latency_ms,
    CAST(max(latency_us_max) AS DOUBLE) / 1000.0 AS max_latency_ms,
    min(first_at) AS first_read,
    max(last_at) AS last_read
FROM usage
GROUP BY day, "table", kind
ORDER BY day, "table"
"#;

const USAGE_COLUMNS_SQL: &str = r#"
WITH used AS (
    SELECT "table", queries, last_at, unnest(columns) AS used FROM usage
), split AS (
    SELECT "table", queries, last_at,
        split_part(used, ':', 1) AS how,
        substr(used, strpos(used, ':') + 1) AS "column"
    FROM used
)
SELECT "table", "column",
    sum(CASE WHEN how LIKE 'filter%' THEN queries ELSE 0 END) AS filters,
    sum(CASE WHEN how = 'filter_eq' THEN queries ELSE 0 END) AS equality,
    sum(CASE WHEN how = 'filter_range' THEN queries ELSE 0 END) AS range,
    sum(CASE WHEN how = 'filter_in' THEN queries ELSE 0 END) AS in_list,
    sum(CASE WHEN how = 'filter_other' THEN queries ELSE 0 END) AS other_filters,
    sum(CASE WHEN how = 'group' THEN queries ELSE 0 END) AS groups,
    sum(CASE WHEN how = 'join' THEN queries ELSE 0 END) AS joins,
    max(last_at) AS last_used
FROM split
GROUP BY "table", "column"
ORDER BY "table", "column"
"#;

/// `system.usage`, or `system.usage_columns` when `columns`, as of now.
pub(super) async fn usage_table(
    shared: &CatalogState,
    columns: bool,
) -> DFResult<Arc<dyn TableProvider>> {
    let retention = shared.options().usage_retention.0;
    let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let since = day_of(shared.usage.clock.now_ms().saturating_sub(retention));
    let rows = read(shared.warehouse.store().as_ref(), since)
        .await
        .map_err(super::super::df)?;
    let raw = batch(&rows).map_err(super::super::df)?;
    // The sums are small (tables × shapes × days): summed again in memory.
    let ctx = SessionContext::new();
    ctx.register_batch("usage", raw)?;
    let (sql, schema) = match columns {
        false => (USAGE_SQL, USAGE_SCHEMA.clone()),
        true => (USAGE_COLUMNS_SQL, USAGE_COLUMNS_SCHEMA.clone()),
    };
    let batches = ctx.sql(sql).await?.collect().await?;
    let batches = batches
        .into_iter()
        .map(|b| {
            datafusion::arrow::record_batch::RecordBatch::try_new(
                schema.clone(),
                b.columns().to_vec(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(MemTable::try_new(schema, vec![batches])?))
}
