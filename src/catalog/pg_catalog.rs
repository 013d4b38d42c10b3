//! Schema `pg_catalog`: PostgreSQL's catalog tables and functions, as the clients of the
//! PostgreSQL server query them (psql's `\d`, DBeaver's, Metabase's and Grafana's browsers).
//!
//! They come from `datafusion-pg-catalog`, which datafusion-postgres maintains for this
//! DataFusion version: `pg_class`, `pg_namespace`, `pg_attribute`, `pg_database` and
//! `pg_tables` describe the warehouse's tables (core tables, slices and system tables, whose
//! columns are read from each table's current schema); the other tables hold PostgreSQL's own
//! constants (`pg_type`, `pg_proc`, ...). The functions (`format_type`, `pg_get_userbyid`,
//! `has_table_privilege`, `current_schemas`, ...) and the planner of PostgreSQL's oid types
//! (`regclass`, `regtype`, ...) are installed into the session by [`install`].

use std::sync::{Arc, LazyLock, Weak};

use async_trait::async_trait;
use datafusion::arrow::array::Array;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::catalog::{CatalogProviderList, SchemaProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::logical_expr::{create_udf, ColumnarValue, Volatility};
use datafusion::prelude::SessionContext;
use datafusion_pg_catalog::pg_catalog as pg;
use datafusion_pg_catalog::pg_catalog::catalog_info::CatalogInfo;

use super::state::CatalogState;
use super::CATALOG_NAME;
use crate::storage::names::{CORE_SCHEMA, DEFAULT_DOMAIN, SYSTEM_SCHEMA};

/// The schema's name.
pub(crate) const PG_CATALOG: &str = "pg_catalog";

/// The tables of `pg_catalog` that list the warehouse's schemas and tables (the others hold
/// constants).
pub(crate) const LISTINGS: [&str; 5] = [
    "pg_attribute",
    "pg_class",
    "pg_database",
    "pg_namespace",
    "pg_tables",
];

/// PostgreSQL's constant catalog tables, read once per process from the crate's embedded
/// Arrow files.
static CONSTANTS: LazyLock<Result<Arc<pg::PgCatalogStaticTables>, String>> = LazyLock::new(|| {
    pg::PgCatalogStaticTables::try_new()
        .map(Arc::new)
        .map_err(|e| e.to_string())
});

fn constants() -> DFResult<Arc<pg::PgCatalogStaticTables>> {
    CONSTANTS.clone().map_err(|e| {
        DataFusionError::Internal(format!("PostgreSQL's catalog constants did not load: {e}"))
    })
}

/// The schema `pg_catalog` of a session whose catalogs are `catalogs`.
///
/// It holds the catalogs weakly: the session's catalog holds this schema. The tables named
/// in `shared`'s listing are told apart without opening them.
pub(crate) fn schema(
    catalogs: &Arc<dyn CatalogProviderList>,
    shared: Arc<CatalogState>,
) -> DFResult<Arc<dyn SchemaProvider>> {
    Ok(Arc::new(pg::PgCatalogSchemaProvider::try_new(
        Catalogs {
            list: Arc::downgrade(catalogs),
            shared,
        },
        constants()?,
        pg::context::EmptyContextProvider,
    )?))
}

/// Installs the functions PostgreSQL's clients call into `ctx` (the type planner of the oid
/// types is set where the session state is built: [`type_planner`]).
pub(crate) fn install(ctx: &SessionContext) -> DFResult<()> {
    use datafusion_pg_catalog::pg_catalog::{
        array_bounds_udf, format_type, has_privilege_udf, pg_get_expr_udf, quote_ident_udf,
    };
    let constants = constants()?;
    for f in [
        pg::create_current_database_udf(CATALOG_NAME),
        pg::create_pg_get_userbyid_udf(),
        has_privilege_udf::create_has_privilege_udf("has_table_privilege"),
        has_privilege_udf::create_has_privilege_udf("has_schema_privilege"),
        has_privilege_udf::create_has_privilege_udf("has_database_privilege"),
        has_privilege_udf::create_has_privilege_udf("has_any_column_privilege"),
        pg::create_pg_table_is_visible(),
        format_type::create_format_type_udf(),
        pg::create_session_user_udf(),
        pg_get_expr_udf::create_pg_get_expr_udf(),
        pg::create_pg_get_partkeydef_udf(),
        pg::create_pg_relation_is_publishable_udf(),
        pg::create_pg_get_statisticsobjdef_columns_udf(),
        pg::create_pg_encoding_to_char_udf(),
        pg::create_pg_backend_pid_udf(),
        pg::create_pg_relation_size_udf(),
        pg::create_pg_total_relation_size_udf(),
        pg::create_pg_stat_get_numscans(),
        pg::create_pg_get_constraintdef(),
        pg::create_pg_get_partition_ancestors_udf(),
        quote_ident_udf::create_quote_ident_udf(),
        quote_ident_udf::create_parse_ident_udf(),
        array_bounds_udf::create_array_upper_udf(),
        array_bounds_udf::create_array_lower_udf(),
        current_schema(),
        current_schemas(),
    ] {
        ctx.register_udf(f);
    }
    ctx.register_udtf("pg_get_keywords", constants.pg_get_keywords.clone());
    // generate_series/range take PostgreSQL's int4 bounds too.
    pg::generate_series_arg_coercion::CoerceIntArgsToBigInt::widen(ctx);
    Ok(())
}

/// The planner of PostgreSQL's oid type names (`::regclass`, `::pg_catalog.regtype`, ...).
pub(crate) fn type_planner() -> Arc<dyn datafusion::logical_expr::planner::TypePlanner> {
    Arc::new(pg::oid_type_planner::PgOidTypePlanner)
}

/// `current_schema()`: the schema unqualified names resolve in, the default slice domain
/// (the crate's says `public`, which icepie has not).
fn current_schema() -> datafusion::logical_expr::ScalarUDF {
    create_udf(
        "current_schema",
        vec![],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(|_| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(
                DEFAULT_DOMAIN.to_string(),
            ))))
        }),
    )
}

/// `current_schemas(implicit)`: the schemas unqualified names are looked up in, the default
/// slice domain, after `pg_catalog` when `implicit` (as in PostgreSQL).
fn current_schemas() -> datafusion::logical_expr::ScalarUDF {
    create_udf(
        "current_schemas",
        vec![DataType::Boolean],
        DataType::new_list(DataType::Utf8, true),
        Volatility::Stable,
        Arc::new(|args| {
            let implicit = match &args[0] {
                ColumnarValue::Scalar(ScalarValue::Boolean(b)) => b.unwrap_or(false),
                ColumnarValue::Array(a) => a
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::BooleanArray>()
                    .is_some_and(|b| !b.is_empty() && !b.is_null(0) && b.value(0)),
                _ => false,
            };
            let names: &[&str] = match implicit {
                true => &[PG_CATALOG, DEFAULT_DOMAIN],
                false => &[DEFAULT_DOMAIN],
            };
            let values: Vec<ScalarValue> = names
                .iter()
                .map(|n| ScalarValue::Utf8(Some(n.to_string())))
                .collect();
            Ok(ColumnarValue::Scalar(ScalarValue::List(
                ScalarValue::new_list_nullable(&values, &DataType::Utf8),
            )))
        }),
    )
}

/// The session's catalogs as `pg_catalog` lists them. A table whose schema cannot be read
/// (a damaged slice) is listed without columns rather than failing the client's query.
#[derive(Clone, Debug)]
struct Catalogs {
    list: Weak<dyn CatalogProviderList>,
    shared: Arc<CatalogState>,
}

impl Catalogs {
    fn get(&self) -> DFResult<Arc<dyn CatalogProviderList>> {
        self.list
            .upgrade()
            .ok_or_else(|| DataFusionError::Execution("the warehouse was closed".into()))
    }
}

#[async_trait]
impl CatalogInfo for Catalogs {
    async fn catalog_names(&self) -> DFResult<Vec<String>> {
        CatalogInfo::catalog_names(&self.get()?).await
    }

    async fn schema_names(&self, catalog: &str) -> DFResult<Option<Vec<String>>> {
        CatalogInfo::schema_names(&self.get()?, catalog).await
    }

    async fn table_names(&self, catalog: &str, schema: &str) -> DFResult<Option<Vec<String>>> {
        CatalogInfo::table_names(&self.get()?, catalog, schema).await
    }

    async fn table_schema(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> DFResult<Option<SchemaRef>> {
        let catalogs = self.get()?;
        Ok(
            match CatalogInfo::table_schema(&catalogs, catalog, schema, table).await {
                Ok(found) => found,
                Err(_) => Some(Arc::new(Schema::empty())),
            },
        )
    }

    async fn table_type(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> DFResult<Option<TableType>> {
        if schema == SYSTEM_SCHEMA {
            // Computed from the warehouse's state when read.
            return Ok(Some(TableType::View));
        }
        if catalog == CATALOG_NAME && (schema == CORE_SCHEMA || self.shared.has_domain(schema)) {
            // Core tables and slices, without opening them a second time.
            return Ok(Some(TableType::Base));
        }
        let catalogs = self.get()?;
        Ok(
            match CatalogInfo::table_type(&catalogs, catalog, schema, table).await {
                Ok(found) => found,
                Err(_) => Some(TableType::Base),
            },
        )
    }
}
