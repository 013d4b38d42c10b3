//! The frozen core: append-only Delta tables that data enters only through `INGEST`.
//!
//! Each core table is created with `delta.appendOnly = true`, so Delta itself refuses any
//! commit that would remove a file (invariant 6). Each `INGEST` is one Delta append commit:
//! all files of a load become visible together, or none do. Data offered to a table is matched
//! to its columns by name and cast to their types; a load whose columns do not fit is refused
//! before anything is written, with an error that names the columns. Parquet files that
//! already have the table's schema are copied in as they are ([`zero_copy`]).

mod explain;
mod zero_copy;

use std::sync::Arc;

use datafusion::arrow::compute::can_cast_types;
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::FileFormat as DFFileFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::provider_as_source;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{cast, EmptyRelation, Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{ColumnDef, Query, Statement as SQLStatement};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::WriteBuilder;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;

use crate::error::{IcePieError, Result};
use crate::sql::{DataSource, FileFormat, Planner};
use crate::storage::names::CORE_SCHEMA;
use crate::storage::tracked::TakeBack;
use crate::storage::{table_stats, TableStats, Warehouse, WriteBase, NO_EXPIRED_LOG_CLEANUP};
use crate::table::progress;
use crate::text::sql_type_name;

/// What the core's statements need of the warehouse they run in: its storage, and the planner
/// of icepie's statements (a source query may read slices, at versions too).
pub(crate) struct CoreContext<'a> {
    pub warehouse: &'a Warehouse,
    pub planner: &'a dyn Planner,
}

/// The result of creating a core table or ingesting into one.
#[derive(Debug, Clone)]
pub(crate) struct LoadOutcome {
    /// `core.name`.
    pub table: String,
    /// Version committed.
    pub version: i64,
    /// Rows added by this commit.
    pub rows_added: i64,
    /// Size of the table after the commit.
    pub stats: TableStats,
}

/// Plans `query` (an AST) in `state`.
pub(crate) async fn plan_query(
    state: &SessionState,
    ctx: &CoreContext<'_>,
    query: &Query,
) -> Result<LogicalPlan> {
    let stmt = DFStatement::Statement(Box::new(SQLStatement::Query(Box::new(query.clone()))));
    ctx.planner.plan_statement(state, stmt).await
}

/// The Arrow schema of declared columns, with DataFusion's own type mapping.
async fn columns_schema(state: &SessionState, columns: &[ColumnDef]) -> Result<SchemaRef> {
    let cols: Vec<String> = columns.iter().map(ToString::to_string).collect();
    let sql = format!("CREATE TABLE icepie_columns ({})", cols.join(", "));
    let stmt = DFParser::parse_sql(&sql)?
        .pop_front()
        .ok_or_else(|| IcePieError::Syntax("no columns".into()))?;
    match state.statement_to_plan(stmt).await? {
        LogicalPlan::Ddl(datafusion::logical_expr::DdlStatement::CreateMemoryTable(c)) => {
            Ok(Arc::new(c.input.schema().as_arrow().clone()))
        }
        _ => Err(IcePieError::Syntax("unexpected column definitions".into())),
    }
}

/// A plan reading the files at `location`. When `target` is given, CSV columns are read with
/// the target's types (matched by header name), so values parse as the table declares them.
async fn plan_files(
    state: &SessionState,
    location: &str,
    format: Option<FileFormat>,
    target: Option<&Schema>,
) -> Result<LogicalPlan> {
    let bad = |reason: String| IcePieError::BadLocation {
        location: location.to_string(),
        reason,
    };
    let format = format
        .or_else(|| FileFormat::from_location(location))
        .ok_or_else(|| {
            bad("cannot tell the file format from the name; add FORMAT parquet|csv|json".into())
        })?;
    let url = ListingTableUrl::parse(location).map_err(|e| bad(e.to_string()))?;
    let file_format: Arc<dyn DFFileFormat> = match format {
        FileFormat::Parquet => Arc::new(ParquetFormat::default()),
        // Reading into a table: only the header's names are needed, values parse as the
        // table's types (so a bad value is reported as such, not as a type-merge conflict).
        FileFormat::Csv if target.is_some() => Arc::new(
            CsvFormat::default()
                .with_has_header(true)
                .with_schema_infer_max_rec(0),
        ),
        FileFormat::Csv => Arc::new(CsvFormat::default().with_has_header(true)),
        FileFormat::Json => Arc::new(JsonFormat::default()),
    };
    let options =
        ListingOptions::new(file_format).with_file_extension(listing_extension(location, format));
    let inferred = options
        .infer_schema(state, &url)
        .await
        .map_err(|e| bad(first_line(&e.to_string())))?;
    let schema = match (format, target) {
        (FileFormat::Csv, Some(target)) => Arc::new(Schema::new(
            inferred
                .fields()
                .iter()
                .map(|f| match target.field_with_name(f.name()) {
                    Ok(t) => Field::new(f.name(), t.data_type().clone(), true),
                    Err(_) => f.as_ref().clone(),
                })
                .collect::<Vec<_>>(),
        )),
        _ => inferred,
    };
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(schema);
    let provider: Arc<dyn TableProvider> = Arc::new(ListingTable::try_new(config)?);
    Ok(LogicalPlanBuilder::scan("source", provider_as_source(provider), None)?.build()?)
}

/// The extension files at `location` are listed by: none for a path or glob naming files (it
/// decides itself), the format's for a directory.
fn listing_extension(location: &str, format: FileFormat) -> &'static str {
    let last = location.rsplit('/').next().unwrap_or_default();
    if last.contains('.') {
        ""
    } else {
        format.extension()
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// Projects `plan` onto `target`'s columns, matched by name and cast to its types; refuses
/// with the names of missing, extra and incompatible columns.
fn fit(plan: LogicalPlan, target: &Schema, table: &str) -> Result<LogicalPlan> {
    let plan = name_values_columns(plan, target)?;
    let source = plan.schema().clone();
    let source_names: Vec<&str> = source.fields().iter().map(|f| f.name().as_str()).collect();
    let mut problems = Vec::new();
    let missing: Vec<&str> = target
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .filter(|n| !source_names.contains(n))
        .collect();
    if !missing.is_empty() {
        problems.push(format!("missing column(s) {}", missing.join(", ")));
    }
    let extra: Vec<&str> = source_names
        .iter()
        .copied()
        .filter(|n| target.field_with_name(n).is_err())
        .collect();
    if !extra.is_empty() {
        problems.push(format!("unknown column(s) {}", extra.join(", ")));
    }
    let mut exprs: Vec<Expr> = Vec::new();
    for field in target.fields() {
        let Some((_, src)) = source
            .qualified_field_with_unqualified_name(field.name())
            .ok()
        else {
            continue;
        };
        if !can_cast_types(src.data_type(), field.data_type()) {
            problems.push(format!(
                "column {} is {} but the table has {}",
                field.name(),
                sql_type_name(src.data_type()),
                sql_type_name(field.data_type())
            ));
            continue;
        }
        let column = Expr::Column(Column::new_unqualified(field.name()));
        let expr = if src.data_type() == field.data_type() {
            column
        } else {
            cast(column, field.data_type().clone())
        };
        exprs.push(expr.alias(field.name()));
    }
    if !problems.is_empty() {
        return Err(IcePieError::SchemaMismatch {
            table: table.to_string(),
            detail: problems.join("; "),
        });
    }
    Ok(LogicalPlanBuilder::from(plan).project(exprs)?.build()?)
}

/// `VALUES` rows have no column names (`column1`, `column2`, ...): they take the table's
/// columns in order, as in `INSERT INTO t VALUES ...`. Every other source is matched by name.
fn name_values_columns(plan: LogicalPlan, target: &Schema) -> Result<LogicalPlan> {
    let fields = plan.schema().fields().clone();
    let positional = fields.len() == target.fields().len()
        && fields
            .iter()
            .enumerate()
            .all(|(i, f)| f.name() == &format!("column{}", i + 1));
    if !positional {
        return Ok(plan);
    }
    let exprs: Vec<Expr> = fields
        .iter()
        .zip(target.fields())
        .map(|(f, t)| Expr::Column(Column::new_unqualified(f.name())).alias(t.name()))
        .collect();
    Ok(LogicalPlanBuilder::from(plan).project(exprs)?.build()?)
}

/// The plan producing a source's rows, fitted to `target` when the table has a schema.
async fn source_plan(
    state: &SessionState,
    ctx: &CoreContext<'_>,
    source: &DataSource,
    target: Option<&Schema>,
    table: &str,
) -> Result<LogicalPlan> {
    let plan = match source {
        DataSource::Files { location, format } => {
            plan_files(state, location, *format, target).await?
        }
        DataSource::Query(q) => plan_query(state, ctx, &q.0).await?,
    };
    match target {
        Some(t) => fit(plan, t, table),
        None => Ok(plan),
    }
}

/// Appends (or, without a snapshot, creates the table with) the rows of `plan` in one
/// commit. A load that fails deletes the files it wrote, and only those: another process may
/// be writing the same table.
async fn commit(
    state: &SessionState,
    ctx: &CoreContext<'_>,
    rel: &str,
    base: WriteBase,
    plan: LogicalPlan,
    what: serde_json::Value,
) -> Result<DeltaTable> {
    let tracked = base.tracked.clone();
    let create = base.snapshot.is_none();
    let mut write = WriteBuilder::new(base.log_store, base.snapshot)
        .with_input_plan(plan)
        .with_session_state(Arc::new(progress::counting(state)))
        .with_commit_properties(
            CommitProperties::default().with_metadata([("icepie".to_string(), what)]),
        );
    write = if create {
        write
            .with_save_mode(SaveMode::ErrorIfExists)
            .with_configuration([("delta.appendOnly", Some("true")), NO_EXPIRED_LOG_CLEANUP])
    } else {
        write.with_save_mode(SaveMode::Append)
    };
    let guard = TakeBack::new(base.tracked);
    let result = write.await;
    guard.finish(&result).await;
    ctx.warehouse.landed(rel, &tracked, result).await
}

fn outcome(name: &str, before_rows: i64, table: &DeltaTable) -> Result<LoadOutcome> {
    let stats = table_stats(table)?;
    Ok(LoadOutcome {
        table: format!("{CORE_SCHEMA}.{name}"),
        version: table.version().unwrap_or_default() as i64,
        rows_added: stats.rows - before_rows,
        stats,
    })
}

/// `CREATE CORE TABLE`; `None` when it exists and `IF NOT EXISTS` was given.
pub(crate) async fn create(
    state: &SessionState,
    ctx: &CoreContext<'_>,
    stmt: &crate::sql::CreateCoreTable,
) -> Result<Option<LoadOutcome>> {
    let name = &stmt.name;
    let rel = Warehouse::core_path(name);
    // What a dropped table left is no table: it goes, and the new one is made.
    if ctx.warehouse.clear_remains(&rel).await? {
        if stmt.if_not_exists {
            return Ok(None);
        }
        return Err(IcePieError::AlreadyExists {
            kind: "core table",
            name: format!("{CORE_SCHEMA}.{name}"),
            hint: "; add data with INGEST INTO",
        });
    }
    let qualified = format!("{CORE_SCHEMA}.{name}");
    let declared = if stmt.columns.is_empty() {
        None
    } else {
        Some(columns_schema(state, &stmt.columns).await?)
    };
    let base = ctx.warehouse.write_base(&rel, None)?;
    let what = serde_json::json!({"kind": "create", "source": source_text(stmt.source.as_ref())});
    if let Some(source) = &stmt.source {
        if let Some(load) = zero_copy::plan(state, source, declared.as_deref(), true).await? {
            let table = zero_copy::load(ctx, &rel, base, load, what).await?;
            return outcome(name, 0, &table).map(Some);
        }
    }
    let plan = match (&stmt.source, &declared) {
        (Some(source), declared) => {
            source_plan(state, ctx, source, declared.as_deref(), &qualified).await?
        }
        (None, Some(schema)) => LogicalPlan::EmptyRelation(EmptyRelation {
            produce_one_row: false,
            schema: Arc::new(DFSchema::try_from(schema.as_ref().clone())?),
        }),
        (None, None) => unreachable!("the parser requires columns or a source"),
    };
    let casts = explain::casts_of(&plan);
    let table = match commit(state, ctx, &rel, base, plan, what).await {
        Ok(table) => table,
        Err(e) => {
            let Some(source) = &stmt.source else {
                return Err(e);
            };
            let nothing = format!("core table {qualified} was not created");
            let target = declared.as_deref();
            // Boxed, as in `ingest`.
            return Err(Box::pin(explain::load_error(
                state, source, target, &casts, &nothing, e,
            ))
            .await);
        }
    };
    outcome(name, 0, &table).map(Some)
}

fn source_text(source: Option<&DataSource>) -> String {
    match source {
        Some(DataSource::Files { location, .. }) => location.clone(),
        Some(DataSource::Query(q)) => q.to_string(),
        None => String::new(),
    }
}

/// `INGEST INTO`: one atomic append.
pub(crate) async fn ingest(
    state: &SessionState,
    ctx: &CoreContext<'_>,
    name: &str,
    source: &DataSource,
) -> Result<LoadOutcome> {
    let Some(table) = ctx
        .warehouse
        .load(&Warehouse::core_path(name), None)
        .await?
    else {
        return Err(IcePieError::CoreTableNotFound(name.to_string()));
    };
    let before = table_stats(&table)?.rows;
    let schema = table.snapshot()?.snapshot().arrow_schema();
    let qualified = format!("{CORE_SCHEMA}.{name}");
    let what = serde_json::json!({"kind": "ingest", "source": source_text(Some(source))});
    let rel = Warehouse::core_path(name);
    let base = ctx.warehouse.write_base(&rel, Some(&table))?;
    if zero_copy::appendable(&table) {
        if let Some(load) = zero_copy::plan(state, source, Some(schema.as_ref()), false).await? {
            let table = zero_copy::load(ctx, &rel, base, load, what).await?;
            return outcome(name, before, &table);
        }
    }
    let plan = source_plan(state, ctx, source, Some(schema.as_ref()), &qualified).await?;
    let casts = explain::casts_of(&plan);
    let table = match commit(state, ctx, &rel, base, plan, what).await {
        Ok(table) => table,
        Err(e) => {
            let nothing = format!("nothing was ingested into {qualified}");
            let target = Some(schema.as_ref());
            // Boxed: this rare path should not grow every load's future.
            return Err(Box::pin(explain::load_error(
                state, source, target, &casts, &nothing, e,
            ))
            .await);
        }
    };
    outcome(name, before, &table)
}
