//! Schema `pg_catalog`: the few PostgreSQL catalog tables and functions that clients of the
//! PostgreSQL server query to list what there is (psql's `\d`, table pickers): `pg_namespace`
//! (the schemas), `pg_class` (core tables as tables, slices as materialized views, system
//! tables as views), an empty `pg_am`, and the functions `pg_catalog.pg_get_userbyid` and
//! `pg_catalog.pg_table_is_visible`. Object ids are stable hashes of the names, so the tables
//! join as PostgreSQL's do.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, BooleanArray, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_plan::ExecutionPlan;

use super::system;
use crate::engine::state::Shared;
use crate::storage::names::{CORE_SCHEMA, SYSTEM_SCHEMA};

/// The schema's name.
pub const PG_CATALOG: &str = "pg_catalog";

const TABLES: [&str; 3] = ["pg_am", "pg_class", "pg_namespace"];

/// The owner every object has.
const OWNER: &str = "icepie";

/// A stable object id for `name` (FNV-1a, 31 bits: PostgreSQL's oids are unsigned 32-bit).
fn oid(name: &str) -> i64 {
    let h = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    i64::from(h & 0x7fff_ffff)
}

/// Schema `pg_catalog`.
#[derive(Debug)]
pub(crate) struct PgCatalogSchema(pub Arc<Shared>);

#[async_trait]
impl SchemaProvider for PgCatalogSchema {
    fn table_names(&self) -> Vec<String> {
        TABLES.iter().map(|t| t.to_string()).collect()
    }

    async fn table(&self, name: &str) -> DFResult<Option<Arc<dyn TableProvider>>> {
        Ok(TABLES.contains(&name).then(|| {
            Arc::new(PgTable {
                shared: self.0.clone(),
                name: name.to_string(),
            }) as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        TABLES.contains(&name)
    }
}

/// One catalog table, computed from the warehouse's listing when scanned.
#[derive(Debug)]
struct PgTable {
    shared: Arc<Shared>,
    name: String,
}

fn schema_of(name: &str) -> SchemaRef {
    let int = |n: &str| Field::new(n, DataType::Int64, false);
    let text = |n: &str| Field::new(n, DataType::Utf8, false);
    Arc::new(Schema::new(match name {
        "pg_namespace" => vec![int("oid"), text("nspname"), int("nspowner")],
        "pg_class" => vec![
            int("oid"),
            text("relname"),
            int("relnamespace"),
            text("relkind"),
            int("relowner"),
            int("relam"),
        ],
        _ => vec![int("oid"), text("amname")],
    }))
}

#[async_trait]
impl TableProvider for PgTable {
    fn schema(&self) -> SchemaRef {
        schema_of(&self.name)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        self.shared.refresh_listing().await.map_err(super::df)?;
        let listing = self.shared.listing();
        let mut namespaces = vec![
            CORE_SCHEMA.to_string(),
            SYSTEM_SCHEMA.to_string(),
            PG_CATALOG.to_string(),
            "information_schema".to_string(),
        ];
        namespaces.extend(listing.domains.keys().cloned());
        // (name, namespace, kind)
        let mut classes: Vec<(String, String, &str)> = Vec::new();
        for t in &listing.core {
            classes.push((t.clone(), CORE_SCHEMA.into(), "r"));
        }
        for (domain, slices) in &listing.domains {
            for s in slices {
                classes.push((s.clone(), domain.clone(), "m"));
            }
        }
        for t in system::TABLES {
            classes.push((t.to_string(), SYSTEM_SCHEMA.into(), "v"));
        }
        for t in TABLES {
            classes.push((t.to_string(), PG_CATALOG.into(), "v"));
        }
        let ints = |v: Vec<i64>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let texts = |v: Vec<String>| Arc::new(StringArray::from(v)) as ArrayRef;
        let columns: Vec<ArrayRef> = match self.name.as_str() {
            "pg_namespace" => vec![
                ints(namespaces.iter().map(|n| oid(n)).collect()),
                texts(namespaces.clone()),
                ints(vec![oid(OWNER); namespaces.len()]),
            ],
            "pg_class" => vec![
                ints(
                    classes
                        .iter()
                        .map(|(n, s, _)| oid(&format!("{s}.{n}")))
                        .collect(),
                ),
                texts(classes.iter().map(|(n, _, _)| n.clone()).collect()),
                ints(classes.iter().map(|(_, s, _)| oid(s)).collect()),
                texts(classes.iter().map(|(_, _, k)| k.to_string()).collect()),
                ints(vec![oid(OWNER); classes.len()]),
                ints(vec![0; classes.len()]),
            ],
            _ => vec![ints(vec![]), texts(vec![])],
        };
        let schema = self.schema();
        let batch = datafusion::arrow::record_batch::RecordBatch::try_new(schema.clone(), columns)?;
        MemTable::try_new(schema, vec![vec![batch]])?
            .scan(state, projection, filters, limit)
            .await
    }
}

/// `pg_catalog.pg_get_userbyid(oid)`: the owner's name (every object's is `icepie`), and
/// `pg_catalog.pg_table_is_visible(oid)`: true (every schema is on the search path).
#[derive(Debug, PartialEq, Eq, Hash)]
struct PgFunction {
    name: &'static str,
    signature: Signature,
}

impl ScalarUDFImpl for PgFunction {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DFResult<DataType> {
        Ok(match self.name.ends_with("pg_get_userbyid") {
            true => DataType::Utf8,
            false => DataType::Boolean,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let n = args.number_rows;
        Ok(ColumnarValue::Array(
            match self.name.ends_with("pg_get_userbyid") {
                true => Arc::new(StringArray::from(vec![OWNER; n])) as ArrayRef,
                false => Arc::new(BooleanArray::from(vec![true; n])),
            },
        ))
    }
}

/// The functions of `pg_catalog`, as clients call them (qualified: DataFusion looks a
/// qualified function up by its whole name).
pub(crate) fn functions() -> Vec<ScalarUDF> {
    [
        "pg_catalog.pg_get_userbyid",
        "pg_catalog.pg_table_is_visible",
    ]
    .into_iter()
    .map(|name| {
        ScalarUDF::new_from_impl(PgFunction {
            name,
            signature: Signature::any(1, Volatility::Stable),
        })
    })
    .collect()
}
