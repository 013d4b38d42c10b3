//! Flight SQL's metadata: the server's SQL info, and the catalogs, schemas, tables and table
//! types, listed from `information_schema`, each answered as one Arrow batch.

use std::sync::Arc;

use arrow_flight::error::FlightError;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, ProstMessageExt, SqlInfo,
};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use datafusion::arrow::array::{Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::TableReference;
use futures::stream::BoxStream;
use prost::Message;
use tonic::{Response, Status};

use super::{flight_stream, status, DoGet, Flight, FlightResult};
use crate::error::{IcePieError, Result};

/// What the server tells of itself (`CommandGetSqlInfo`).
pub(super) fn sql_info(read_only: bool) -> Result<SqlInfoData> {
    let mut info = SqlInfoDataBuilder::new();
    info.append(SqlInfo::FlightSqlServerName, "icepie");
    info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    info.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    info.append(SqlInfo::FlightSqlServerReadOnly, read_only);
    info.append(SqlInfo::FlightSqlServerSql, true);
    info.append(SqlInfo::FlightSqlServerSubstrait, false);
    info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    info.append(SqlInfo::FlightSqlServerCancel, false);
    info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    info.build()
        .map_err(|e| IcePieError::Server(format!("the Flight SQL server's info: {e}")))
}

impl Flight {
    /// A catalog listing of `information_schema` (names only: small), as string columns.
    async fn listing(&self, sql: &str) -> std::result::Result<Vec<RecordBatch>, Status> {
        let frame = self.warehouse.sql(sql).await.map_err(|e| status(&e))?;
        frame.collect().await.map_err(|e| status(&e.into()))
    }

    /// The catalogs, by name (`CommandGetCatalogs`).
    pub(super) async fn catalogs(&self, query: CommandGetCatalogs) -> FlightResult<DoGet> {
        let mut builder = query.into_builder();
        let mut names = self.warehouse.context().catalog_names();
        names.sort();
        for name in names {
            builder.append(name);
        }
        one_batch(builder.build())
    }

    /// The schemas `query` asks for (`CommandGetDbSchemas`), from `information_schema`.
    pub(super) async fn schemas(&self, query: CommandGetDbSchemas) -> FlightResult<DoGet> {
        let mut filters = vec!["TRUE".to_string()];
        if let Some(catalog) = &query.catalog {
            filters.push(format!("catalog_name = {}", sql_string(catalog)));
        }
        if let Some(pattern) = &query.db_schema_filter_pattern {
            filters.push(format!("schema_name LIKE {}", sql_string(pattern)));
        }
        let rows = string_rows(
            &self
                .listing(&format!(
                    "SELECT catalog_name, schema_name FROM information_schema.schemata \
                     WHERE {} ORDER BY catalog_name, schema_name",
                    filters.join(" AND ")
                ))
                .await?,
        );
        let mut builder = query.into_builder();
        for row in rows {
            builder.append(&row[0], &row[1]);
        }
        one_batch(builder.build())
    }

    /// The tables `query` asks for (`CommandGetTables`), from `information_schema`, with their
    /// Arrow schemas when it asks for them.
    pub(super) async fn tables(&self, query: CommandGetTables) -> FlightResult<DoGet> {
        // The filters go to the listing, so that only the tables asked for are looked up.
        let mut filters = vec!["TRUE".to_string()];
        if let Some(catalog) = &query.catalog {
            filters.push(format!("table_catalog = {}", sql_string(catalog)));
        }
        if let Some(pattern) = &query.db_schema_filter_pattern {
            filters.push(format!("table_schema LIKE {}", sql_string(pattern)));
        }
        if let Some(pattern) = &query.table_name_filter_pattern {
            filters.push(format!("table_name LIKE {}", sql_string(pattern)));
        }
        let rows = string_rows(
            &self
                .listing(&format!(
                    "SELECT table_catalog, table_schema, table_name, table_type \
                     FROM information_schema.tables WHERE {} \
                     ORDER BY table_catalog, table_schema, table_name",
                    filters.join(" AND ")
                ))
                .await?,
        );
        let include_schema = query.include_schema;
        let mut builder = query.into_builder();
        let empty = Schema::empty();
        for row in rows {
            let schema = match include_schema {
                // Each table's schema is looked up only when asked for (a slice's is read
                // from its log); one that cannot be read is listed without its columns.
                true => self
                    .warehouse
                    .context()
                    .table_provider(TableReference::full(
                        row[0].as_str(),
                        row[1].as_str(),
                        row[2].as_str(),
                    ))
                    .await
                    .map(|t| t.schema())
                    .unwrap_or_else(|_| Arc::new(empty.clone())),
                false => Arc::new(empty.clone()),
            };
            builder
                .append(&row[0], &row[1], &row[2], table_type(&row[3]), &schema)
                .map_err(Status::from)?;
        }
        one_batch(builder.build())
    }

    /// The table types (`CommandGetTableTypes`).
    pub(super) async fn table_types(&self, query: CommandGetTableTypes) -> FlightResult<DoGet> {
        let mut builder = query.into_builder();
        for kind in ["TABLE", "VIEW"] {
            builder.append(kind);
        }
        one_batch(builder.build())
    }

    /// The server's SQL info `query` asks for (`CommandGetSqlInfo`).
    pub(super) async fn server_info(&self, query: CommandGetSqlInfo) -> FlightResult<DoGet> {
        one_batch(query.into_builder(&self.sql_info).build())
    }
}

/// The columns of `batches` as text, row by row.
fn string_rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for batch in batches {
        let columns: Vec<Option<StringArray>> = batch
            .columns()
            .iter()
            .map(|c| {
                datafusion::arrow::compute::cast(c, &DataType::Utf8)
                    .ok()
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
            })
            .collect();
        for i in 0..batch.num_rows() {
            rows.push(
                columns
                    .iter()
                    .map(|c| {
                        c.as_ref()
                            .map(|c| c.value(i).to_string())
                            .unwrap_or_default()
                    })
                    .collect(),
            );
        }
    }
    rows
}

/// `text` as a SQL string literal.
fn sql_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Flight SQL's name for a table type of `information_schema`.
fn table_type(kind: &str) -> &str {
    match kind {
        "BASE TABLE" => "TABLE",
        other => other,
    }
}

/// One metadata batch as a Flight response.
fn one_batch(
    batch: std::result::Result<RecordBatch, FlightError>,
) -> std::result::Result<
    Response<BoxStream<'static, std::result::Result<arrow_flight::FlightData, Status>>>,
    Status,
> {
    let batch = batch.map_err(Status::from)?;
    Ok(flight_stream(
        batch.schema(),
        futures::stream::iter([Ok(batch)]),
    ))
}

/// A `FlightInfo` whose ticket is the metadata command itself.
pub(super) fn metadata_info(
    command: impl ProstMessageExt,
    schema: &Schema,
    descriptor: FlightDescriptor,
) -> std::result::Result<Response<FlightInfo>, Status> {
    let ticket = Ticket::new(command.as_any().encode_to_vec());
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| status(&e.into()))?
        .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}
