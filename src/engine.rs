//! [`IcePie`]: the library API and the only entry point of the command line.
//!
//! One `IcePie` wraps one DataFusion [`SessionContext`] whose default catalog is the warehouse
//! (schemas `core`, the slice domains and `system`; default schema `slices`). It runs icepie's
//! statements itself and hands every other statement to DataFusion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::source_as_provider;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::{DdlStatement, DropTable, LogicalPlan, WriteOp};
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::delta_datafusion::planner::DeltaPlanner;
use deltalake::ObjectStore;
use url::Url;

use crate::catalog::table::IcePieTable;
use crate::catalog::{system, IcePieCatalog, Shared, CATALOG_NAME};
use crate::core::{self, LoadOutcome};
use crate::error::{IcePieError, Result};
use crate::slice::{self, meta, BuildKind, BuildOutcome, SliceInfo, SliceSpec};
use crate::sql::{parse_sql, CreateSlice, Statement};
use crate::storage::names::{SliceName, CORE_SCHEMA, DEFAULT_DOMAIN, SYSTEM_SCHEMA};
use crate::storage::{Warehouse, DEFAULT_LOCATION};

/// Options for opening a warehouse.
#[derive(Debug, Clone)]
pub struct IcePieBuilder {
    location: String,
    store: Option<Arc<dyn ObjectStore>>,
    storage_options: HashMap<String, String>,
}

impl IcePieBuilder {
    /// Uses `store` for every read and write of the warehouse instead of the object store the
    /// location's URL implies. Its "/" must be the root of that URL's store (for a local
    /// path, the file system root). Useful to wrap storage, e.g. to observe reads.
    pub fn with_object_store(mut self, store: Arc<dyn ObjectStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Options of the object store (credentials, region, endpoint, ...), as object_store and
    /// delta-rs name them, e.g. `AWS_REGION`.
    pub fn with_storage_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.storage_options.insert(key.into(), value.into());
        self
    }

    /// Opens the warehouse, creating it if needed.
    pub async fn open(self) -> Result<IcePie> {
        let warehouse = Warehouse::open(&self.location, self.store.clone(), self.storage_options)?;
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG_NAME, DEFAULT_DOMAIN)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true)
            // delta-rs's workaround for hash-join IN-list pushdown on dictionary keys.
            .set_usize("datafusion.optimizer.hash_join_inlist_pushdown_max_size", 0)
            .set_usize(
                "datafusion.optimizer.hash_join_inlist_pushdown_max_distinct_values",
                0,
            );
        // DataFusion caches directory listings forever by default; INGEST must see the files
        // that are there now, so listings are not cached.
        let caches = CacheManagerConfig::default().with_list_files_cache_limit(0);
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(caches)
            .build_arc()?;
        if let Some(store) = &self.store {
            let url = warehouse.url();
            let root = ObjectStoreUrl::parse(format!("{}://{}", url.scheme(), url.authority()))?;
            runtime.register_object_store(root.as_ref(), store.clone());
        }
        let state = SessionStateBuilder::new()
            .with_default_features()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_query_planner(DeltaPlanner::new())
            .build();
        let ctx = SessionContext::new_with_state(state);
        let shared = Arc::new(Shared::new(warehouse));
        ctx.register_catalog(CATALOG_NAME, Arc::new(IcePieCatalog::new(shared.clone())));
        shared.refresh_listing().await?;
        Ok(IcePie {
            inner: Arc::new(Inner {
                shared,
                ctx,
                locks: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// An open warehouse: the frozen core, its slices, and a DataFusion session over them.
///
/// Cloning is cheap and clones share the session.
#[derive(Clone)]
pub struct IcePie {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    ctx: SessionContext,
    /// One build at a time per slice in this process.
    locks: Mutex<HashMap<SliceName, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for IcePie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IcePie")
            .field("location", &self.location().as_str())
            .finish()
    }
}

impl IcePie {
    /// Opens (creating if needed) the warehouse at a local path or URL.
    pub async fn open(location: impl Into<String>) -> Result<Self> {
        Self::builder(location).open().await
    }

    /// Opens the default warehouse, `./icepie-data`.
    pub async fn open_default() -> Result<Self> {
        Self::open(DEFAULT_LOCATION).await
    }

    /// Options for opening the warehouse at `location`.
    pub fn builder(location: impl Into<String>) -> IcePieBuilder {
        IcePieBuilder {
            location: location.into(),
            store: None,
            storage_options: HashMap::new(),
        }
    }

    /// The warehouse root.
    pub fn location(&self) -> &Url {
        self.inner.shared.warehouse.url()
    }

    /// The DataFusion session (catalog `icepie`), e.g. to register functions or tables.
    pub fn context(&self) -> &SessionContext {
        &self.inner.ctx
    }

    /// Parses SQL text into statements without running them.
    pub fn parse(text: &str) -> Result<Vec<Statement>> {
        parse_sql(text)
    }

    /// Runs every statement of `text` in order and returns the result of the last one.
    /// Queries are lazy: collect or stream the returned [`DataFrame`] to run them.
    pub async fn sql(&self, text: &str) -> Result<DataFrame> {
        let mut last = None;
        for stmt in parse_sql(text)? {
            last = Some(self.execute(stmt).await?);
        }
        match last {
            Some(df) => Ok(df),
            None => Ok(self.inner.ctx.read_empty()?),
        }
    }

    /// Runs one statement.
    pub async fn execute(&self, stmt: Statement) -> Result<DataFrame> {
        let shared = &self.inner.shared;
        shared.refresh_listing().await?;
        let state = self.inner.ctx.state();
        match stmt {
            Statement::DataFusion(stmt) => {
                let plan = state.statement_to_plan(*stmt).await?;
                self.refuse_writes(&plan)?;
                let df = self.inner.ctx.execute_logical_plan(plan).await?;
                Ok(df)
            }
            Statement::CreateCoreTable(c) => {
                let out = core::create(&state, shared, &c).await?;
                shared.refresh_listing().await?;
                self.load_result(out)
            }
            Statement::Ingest(i) => {
                let out = core::ingest(&state, shared, &i.table, &i.source).await?;
                self.load_result(Some(out))
            }
            Statement::DropCoreTable { name, if_exists } => {
                let dropped = self.drop_core_table(&name, if_exists).await?;
                self.dropped(dropped.then(|| format!("{CORE_SCHEMA}.{name}")))
            }
            Statement::CreateSlice(c) => {
                let out = self.create_slice(&c).await?;
                self.build_result(out)
            }
            Statement::RefreshSlice(name) => {
                let out = self.refresh(&name.to_string()).await?;
                self.build_result(Some(out))
            }
            Statement::DropSlice { name, if_exists } => {
                let dropped = self.drop_slice(&name, if_exists).await?;
                self.dropped(dropped.then(|| name.to_string()))
            }
            Statement::ShowCoreTables => Ok(self
                .inner
                .ctx
                .sql(
                    "SELECT name, version, rows, files, bytes, created_at, last_ingest_at \
                      FROM system.core_tables ORDER BY name",
                )
                .await?),
            Statement::ShowSlices => Ok(self
                .inner
                .ctx
                .sql(
                    "SELECT domain, name, state, version, rows, bytes, refreshed_at, refresh, \
                      owner, last_error FROM system.slices ORDER BY domain, name",
                )
                .await?),
            Statement::DescribeSlice(name) => {
                let info = self.slice(&name.to_string()).await?;
                self.describe(&info)
            }
        }
    }

    fn lock(&self, name: &SliceName) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .locks
            .lock()
            .expect("locks")
            .entry(name.clone())
            .or_default()
            .clone()
    }

    async fn create_slice(&self, c: &CreateSlice) -> Result<Option<BuildOutcome>> {
        let shared = &self.inner.shared;
        let lock = self.lock(&c.name);
        let _guard = lock.lock().await;
        let existing = shared
            .warehouse
            .load(&Warehouse::slice_path(&c.name), None)
            .await?;
        let spec = SliceSpec {
            definition: c.query.to_string(),
            owner: c.owner.clone(),
            refresh: c.refresh.to_string(),
            partition_by: c.partition_by.clone(),
        };
        let kind =
            match (&existing, c.or_replace, c.if_not_exists) {
                (Some(_), false, true) => return Ok(None),
                (Some(_), false, false) => return Err(IcePieError::AlreadyExists {
                    kind: "slice",
                    name: c.name.to_string(),
                    hint:
                        "; change it with CREATE OR REPLACE SLICE or rebuild it with REFRESH SLICE",
                }),
                (Some(_), true, _) => BuildKind::Replace,
                (None, _, _) => BuildKind::Create,
            };
        let out = slice::build(
            &self.inner.ctx,
            shared,
            &c.name,
            &spec,
            kind,
            existing.as_ref(),
        )
        .await;
        shared.refresh_listing().await?;
        out.map(Some)
    }

    /// Builds and commits the next version of slice `name` (`domain.name` or `name`) from its
    /// definition, with every input pinned at its current version. On failure nothing is
    /// committed and the slice keeps serving its last version.
    pub async fn refresh(&self, name: &str) -> Result<BuildOutcome> {
        let name = SliceName::parse(name)?;
        let shared = &self.inner.shared;
        let lock = self.lock(&name);
        let _guard = lock.lock().await;
        let Some(table) = shared
            .warehouse
            .load(&Warehouse::slice_path(&name), None)
            .await?
        else {
            return Err(IcePieError::SliceNotFound(name.to_string()));
        };
        let (meta, _) = meta::latest_meta(&table, &name.to_string()).await?;
        slice::build(
            &self.inner.ctx,
            shared,
            &name,
            &SliceSpec::from(&meta),
            BuildKind::Refresh,
            Some(&table),
        )
        .await
    }

    /// Every slice with its state, version, size and last error.
    pub async fn slices(&self) -> Result<Vec<SliceInfo>> {
        self.inner.shared.refresh_listing().await?;
        system::all_slices(&self.inner.shared).await
    }

    /// One slice's state, version, size, lineage and definition.
    pub async fn slice(&self, name: &str) -> Result<SliceInfo> {
        let name = SliceName::parse(name)?;
        let shared = &self.inner.shared;
        let attempts = slice::log::last_attempts(&shared.warehouse).await?;
        slice::info(shared, &name, &attempts, &mut HashMap::new())
            .await?
            .ok_or_else(|| IcePieError::SliceNotFound(name.to_string()))
    }

    async fn drop_slice(&self, name: &SliceName, if_exists: bool) -> Result<bool> {
        let shared = &self.inner.shared;
        let lock = self.lock(name);
        let _guard = lock.lock().await;
        let rel = Warehouse::slice_path(name);
        if !shared.warehouse.has_log(&rel).await? {
            return if if_exists {
                Ok(false)
            } else {
                Err(IcePieError::SliceNotFound(name.to_string()))
            };
        }
        shared.warehouse.delete_prefix(&rel).await?;
        shared.refresh_listing().await?;
        Ok(true)
    }

    async fn drop_core_table(&self, name: &str, if_exists: bool) -> Result<bool> {
        let shared = &self.inner.shared;
        let rel = Warehouse::core_path(name);
        if !shared.warehouse.has_log(&rel).await? {
            return if if_exists {
                Ok(false)
            } else {
                Err(IcePieError::CoreTableNotFound(name.to_string()))
            };
        }
        let qualified = format!("{CORE_SCHEMA}.{name}");
        let mut readers = Vec::new();
        for s in shared.slice_names() {
            if let Some(t) = shared
                .warehouse
                .load(&Warehouse::slice_path(&s), None)
                .await?
            {
                let (m, _) = meta::latest_meta(&t, &s.to_string()).await?;
                if m.inputs.iter().any(|i| i.table == qualified) {
                    readers.push(s.to_string());
                }
            }
        }
        if !readers.is_empty() {
            return Err(IcePieError::CoreTableInUse {
                table: qualified,
                slices: readers,
            });
        }
        shared.warehouse.delete_prefix(&rel).await?;
        shared.refresh_listing().await?;
        Ok(true)
    }

    fn batch(&self, fields: Vec<(&str, ArrayRef)>) -> Result<DataFrame> {
        let schema = Schema::new(
            fields
                .iter()
                .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
                .collect::<Vec<_>>(),
        );
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            fields.into_iter().map(|(_, a)| a).collect(),
        )?;
        Ok(self.inner.ctx.read_batch(batch)?)
    }

    /// One row naming what was dropped, or no row when `IF EXISTS` found nothing.
    fn dropped(&self, name: Option<String>) -> Result<DataFrame> {
        self.batch(vec![("dropped", strings(name.into_iter()))])
    }

    fn load_result(&self, out: Option<LoadOutcome>) -> Result<DataFrame> {
        let out: Vec<LoadOutcome> = out.into_iter().collect();
        self.batch(vec![
            ("table", strings(out.iter().map(|o| o.table.clone()))),
            ("version", ints(out.iter().map(|o| o.version))),
            ("rows_added", ints(out.iter().map(|o| o.rows_added))),
            ("rows", ints(out.iter().map(|o| o.stats.rows))),
            ("files", ints(out.iter().map(|o| o.stats.files))),
        ])
    }

    fn build_result(&self, out: Option<BuildOutcome>) -> Result<DataFrame> {
        let out: Vec<BuildOutcome> = out.into_iter().collect();
        self.batch(vec![
            ("slice", strings(out.iter().map(|o| o.slice.to_string()))),
            ("version", ints(out.iter().map(|o| o.version))),
            ("rows", ints(out.iter().map(|o| o.stats.rows))),
            ("bytes", ints(out.iter().map(|o| o.stats.bytes))),
            (
                "inputs",
                strings(out.iter().map(|o| meta::format_inputs(&o.inputs))),
            ),
            ("duration_ms", ints(out.iter().map(|o| o.duration_ms))),
        ])
    }

    fn describe(&self, info: &SliceInfo) -> Result<DataFrame> {
        let refreshed = info
            .refreshed_at
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        let mut rows: Vec<(String, String)> = vec![
            ("slice".into(), info.name.to_string()),
            ("state".into(), info.state.to_string()),
            ("version".into(), info.version.to_string()),
            ("owner".into(), info.meta.owner.clone().unwrap_or_default()),
            ("refresh".into(), info.meta.refresh.clone()),
            ("partition_by".into(), info.meta.partition_by.join(", ")),
            ("rows".into(), info.stats.rows.to_string()),
            ("bytes".into(), info.stats.bytes.to_string()),
            ("files".into(), info.stats.files.to_string()),
            ("refreshed_at".into(), refreshed),
            ("inputs".into(), meta::format_inputs(&info.meta.inputs)),
            (
                "last_error".into(),
                info.last_error.clone().unwrap_or_default(),
            ),
            ("definition".into(), info.meta.definition.clone()),
        ];
        rows.extend(
            info.columns
                .iter()
                .map(|(n, t)| (format!("column {n}"), t.clone())),
        );
        self.batch(vec![
            ("property", strings(rows.iter().map(|r| r.0.clone()))),
            ("value", strings(rows.iter().map(|r| r.1.clone()))),
        ])
    }

    /// Refuses plain-SQL writes and drops aimed at core tables, slices and system tables
    /// before they run, naming the icepie statement to use instead.
    fn refuse_writes(&self, plan: &LogicalPlan) -> Result<()> {
        let dml = match plan {
            LogicalPlan::Dml(dml) => dml,
            LogicalPlan::Ddl(DdlStatement::DropTable(DropTable { name, .. })) => {
                let schema = name.schema().unwrap_or(DEFAULT_DOMAIN);
                let table = name.table();
                let msg = if schema == CORE_SCHEMA {
                    format!("core tables are dropped with DROP CORE TABLE {table}")
                } else if schema == SYSTEM_SCHEMA {
                    format!("'{SYSTEM_SCHEMA}.{table}' is a system table and cannot be dropped")
                } else if schema == DEFAULT_DOMAIN
                    || self.inner.shared.listing().domains.contains_key(schema)
                {
                    format!("slices are dropped with DROP SLICE {schema}.{table}")
                } else {
                    return Ok(());
                };
                return Err(IcePieError::ReadOnly(msg));
            }
            _ => return Ok(()),
        };
        let what = match dml.op {
            WriteOp::Insert(_) | WriteOp::Ctas => "INSERT",
            WriteOp::Delete => "DELETE",
            WriteOp::Update => "UPDATE",
            WriteOp::Truncate => "TRUNCATE",
            _ => "this write",
        };
        let provider = source_as_provider(&dml.target)?;
        if let Some(t) = provider.downcast_ref::<IcePieTable>() {
            return Err(t.write_refused(what));
        }
        if dml.table_name.schema() == Some(SYSTEM_SCHEMA) {
            return Err(IcePieError::ReadOnly(format!(
                "'{SYSTEM_SCHEMA}.{}' is a read-only system table: {what} is not allowed",
                dml.table_name.table()
            )));
        }
        Ok(())
    }
}

fn strings(values: impl Iterator<Item = String>) -> ArrayRef {
    Arc::new(StringArray::from(values.collect::<Vec<_>>()))
}

fn ints(values: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(Int64Array::from(values.collect::<Vec<_>>()))
}
