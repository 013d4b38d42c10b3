//! [`IcePie`]: the library API and the only entry point of the command line.
//!
//! One `IcePie` wraps one DataFusion [`SessionContext`] whose default catalog is the warehouse
//! (schemas `core`, the slice domains and `system`; default schema `slices`). It runs icepie's
//! statements itself and hands every other statement to DataFusion. While it is open, its
//! [`scheduler`] runs the refreshes that slices' policies make due.
//!
//! Changes of one slice are serialized in this process (a per-slice lock), and a refresh asked
//! for while one of the same slice waits for its turn joins it instead of running twice.
//! Between processes Delta's commit protocol decides: a change commits only on the version it
//! started from; a refresh, freeze, thaw or rollback that loses the race runs again on the
//! winner's version (or, for a refresh, reports the winner's version when it is fresh).

mod background;
mod builder;
pub(crate) mod notices;
mod output;
pub(crate) mod scheduler;
mod slice_methods;
pub(crate) mod usage_planner;
mod yield_points;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::config::ExtensionOptions;
use datafusion::common::ParamValues;
use datafusion::dataframe::DataFrame;
use datafusion::datasource::source_as_provider;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::{DdlStatement, DropTable, LogicalPlan, WriteOp};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement as SQLStatement;
use deltalake::delta_datafusion::planner::DeltaPlanner;
use deltalake::ObjectStore;
use futures::future::{BoxFuture, FutureExt, Shared as SharedFuture, WeakShared};
use futures::TryStreamExt;
use tokio::sync::broadcast;
use url::Url;

use crate::catalog::state::CatalogState;
use crate::catalog::time_travel::{self, PinnedFunction};
use crate::catalog::{IcePieCatalog, CATALOG_NAME};
use crate::core::{self};
use crate::error::{IcePieError, Result};
use crate::options::IcePieOptions;
use crate::slice::lifecycle::{self, frozen_error, LifecycleOutcome};
use crate::slice::meta::{self, CommitKind, HistoryEntry};
use crate::slice::quarantine::{self, Verified};
use crate::slice::vacuum::{self, VacuumOutcome};
use crate::slice::{self, BuildOutcome, InputCache, Previous, SliceInfo, SliceSpec};
use crate::sql::{parse_sql, CreateSlice, Statement};
use crate::storage::location::{self, Opening, Unjudgeable};
use crate::storage::names::{SliceName, CORE_SCHEMA, DEFAULT_DOMAIN, SYSTEM_SCHEMA};
use crate::storage::{Warehouse, DEFAULT_LOCATION};
use crate::table::IcePieTable;
use crate::table::{live, progress};
pub use builder::IcePieBuilder;
pub use scheduler::RefreshEvent;

/// `SHOW CORE TABLES`.
const SHOW_CORE_TABLES: &str = "SELECT name, version, rows, files, bytes, created_at, \
     last_ingest_at FROM system.core_tables ORDER BY name";
/// `SHOW SLICES`.
const SHOW_SLICES: &str = "SELECT domain, name, state, version, rows, bytes, refreshed_at, lag, \
     refresh, owner, last_error FROM system.slices ORDER BY domain, name";

/// How many times a refresh that keeps losing races to other writers builds again before it
/// reports the conflict.
const MAX_REFRESH_RACES: usize = 3;

/// Runs a FREEZE, THAW or ROLLBACK again when another writer committed the slice first: none
/// depends on the version it lands on, and each run checks the slice's state anew (a slice
/// frozen meanwhile refuses a rollback, a thaw finds nothing to do).
async fn retrying<F, Fut>(mut change: F) -> Result<LifecycleOutcome>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<LifecycleOutcome>>,
{
    let mut races = 0;
    loop {
        match change().await {
            Err(IcePieError::Conflict { .. }) if races < MAX_REFRESH_RACES => races += 1,
            other => return other,
        }
    }
}

/// What the core's statements need of `shared`.
fn core_context(shared: &CatalogState) -> core::CoreContext<'_> {
    core::CoreContext {
        warehouse: &shared.warehouse,
        planner: shared,
    }
}

/// Runs a statement's plan to its end, dropping its rows as they come.
async fn drain(df: DataFrame) -> Result<()> {
    let mut stream = df.execute_stream().await?;
    while stream.try_next().await?.is_some() {}
    Ok(())
}

/// A refresh of one slice that requests may join while `started` is false: until then it has
/// not read its inputs, so it builds from data at least as new as any joiner saw.
struct Joinable {
    future: WeakShared<RefreshFuture>,
    started: Arc<AtomicBool>,
}

/// What a refresh that several callers may join resolves to.
type RefreshResult = std::result::Result<BuildOutcome, Arc<IcePieError>>;
type RefreshFuture = BoxFuture<'static, RefreshResult>;

/// An open warehouse: the frozen core, its slices, and a DataFusion session over them.
///
/// Cloning is cheap and clones share the session. The scheduler stops when the last clone
/// is dropped, or earlier with [`close`](Self::close).
#[derive(Clone)]
pub struct IcePie {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    shared: Arc<CatalogState>,
    catalog: Arc<IcePieCatalog>,
    ctx: SessionContext,
    /// One change at a time per slice in this process.
    locks: Mutex<HashMap<SliceName, Arc<tokio::sync::Mutex<()>>>>,
    /// Held shared by every build and ingest, exclusively by DROP CORE TABLE: in this process
    /// no slice can start reading a core table while it is checked for readers and deleted.
    core_drop: tokio::sync::RwLock<()>,
    /// The refresh of each slice that later requests may still join: one that has not yet
    /// read its inputs (see [`IcePie::refresh`]).
    inflight: Mutex<HashMap<SliceName, Joinable>>,
    /// What the scheduler did.
    events: broadcast::Sender<RefreshEvent>,
    scheduler: Mutex<Option<scheduler::Handle>>,
    /// Where queries' reads are recorded.
    usage: Arc<crate::usage::Usage>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut handle) = self.scheduler.lock() {
            if let Some(h) = handle.take() {
                h.abort();
            }
        }
    }
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
        IcePieBuilder::new(location.into())
    }

    /// The warehouse root.
    pub fn location(&self) -> &Url {
        self.inner.shared.warehouse.url()
    }

    /// The DataFusion session (catalog `icepie`), e.g. to register functions or tables.
    ///
    /// Queries planned here directly read the latest version of every table they name, but
    /// the lists of names (the domains, `information_schema`, `SHOW TABLES`) are as of the
    /// opening or the last statement [`IcePie::sql`] ran that listed them: a domain created
    /// since by another process is found through [`IcePie::sql`].
    pub fn context(&self) -> &SessionContext {
        &self.inner.ctx
    }

    /// The `icepie.*` settings in force (`SET icepie.<name> = ...` changes them).
    pub fn options(&self) -> IcePieOptions {
        self.sync_options();
        self.inner.shared.options()
    }

    /// Copies the session's settings to where system tables and the scheduler read them.
    fn sync_options(&self) {
        let config = self.inner.ctx.copied_config();
        if let Some(o) = config.options().extensions.get::<IcePieOptions>() {
            self.inner.usage.set_retention(o.usage_retention.0);
            self.inner.shared.set_options(o.clone());
        }
    }

    /// What the scheduler does from now on: one event per scheduled refresh that ended.
    pub fn subscribe(&self) -> broadcast::Receiver<RefreshEvent> {
        self.inner.events.subscribe()
    }

    /// Stops the scheduler: it starts no more refreshes, lets those running finish for up to
    /// `grace`, then cancels the rest (a cancelled refresh commits nothing), and waits for
    /// the refresh records still being written ([`IcePie::flush`]). Statements still run
    /// afterwards; only scheduling has stopped.
    pub async fn close(&self, grace: Duration) {
        let handle = self.inner.scheduler.lock().expect("scheduler lock").take();
        if let Some(h) = handle {
            h.stop(grace).await;
        }
        self.flush().await;
    }

    /// Waits until the rows of `system.refreshes` for the refreshes that succeeded so far are
    /// written. A refresh returns once its version is committed and writes its row in the
    /// background; this process shows it at once, other processes a few milliseconds later.
    /// Call this (or [`IcePie::close`]) before dropping the last handle: a row not written
    /// when the process ends is recorded later, from the slice's commit, by the slice's next
    /// refresh or VACUUM after `icepie.heartbeat` × 6.
    pub async fn flush(&self) {
        self.inner.shared.settling.flush().await;
        self.inner.usage.flush().await;
    }

    /// Parses SQL text into statements without running them.
    pub fn parse(text: &str) -> Result<Vec<Statement>> {
        parse_sql(text)
    }

    /// Runs every statement of `text` in order and returns the result of the last one.
    ///
    /// Every statement but the last runs to completion before the next starts (a `COPY` or
    /// `INSERT` early in the text writes what it says; a query's rows are read and dropped,
    /// never held). The last is returned as DataFusion returns it: a query is lazy, so
    /// collect or stream the returned [`DataFrame`] to run it.
    pub async fn sql(&self, text: &str) -> Result<DataFrame> {
        let mut statements = parse_sql(text)?.into_iter().peekable();
        while let Some(stmt) = statements.next() {
            let df = self.execute(stmt).await?;
            if statements.peek().is_none() {
                return Ok(df);
            }
            drain(df).await?;
        }
        Ok(self.inner.ctx.read_empty()?)
    }

    /// Runs one statement, adding the rows and bytes it writes to `progress` as it goes
    /// (`INGEST`, `CREATE CORE TABLE ... FROM`, `CREATE SLICE`, `REFRESH SLICE`), so that
    /// another task can show how far it has got.
    pub async fn execute_with_progress(
        &self,
        stmt: Statement,
        progress: Arc<progress::Progress>,
    ) -> Result<DataFrame> {
        progress::scope(progress, self.execute(stmt)).await
    }

    /// Runs one statement.
    pub async fn execute(&self, stmt: Statement) -> Result<DataFrame> {
        self.execute_with_params(stmt, ParamValues::List(vec![]))
            .await
    }

    /// The plan of one of DataFusion's own statements (a query, DDL, `INSERT`, `COPY`, `SET`,
    /// ...) without running it: for a query, its result schema, and for any, the types of its
    /// `$n` parameters (a server's prepared statements). `None` for icepie's statements
    /// (`CREATE SLICE`, `INGEST`, ...), whose rows are known only once they ran.
    pub async fn plan(&self, stmt: &Statement) -> Result<Option<LogicalPlan>> {
        let Statement::DataFusion(inner) = stmt else {
            return Ok(None);
        };
        self.sync_options();
        let state = self.inner.ctx.state();
        // Planned only: staleness limits are applied when it runs.
        let planning = time_travel::plan_statement(&state, &self.inner.shared, (*inner.0).clone());
        let plan = slice::freshness::with_mode(slice::freshness::Mode::Describe, planning).await?;
        Ok(Some(plan))
    }

    /// The schema of the rows one of icepie's own statements returns, known before it runs,
    /// for a server to describe them: all of them but `APPLY PROPOSAL` (which answers as the
    /// statement it applies). `None` for that one, and for DataFusion's statements (see
    /// [`plan`](Self::plan)).
    pub async fn result_schema(&self, stmt: &Statement) -> Result<Option<SchemaRef>> {
        let ctx = &self.inner.ctx;
        let empty = match stmt {
            Statement::CreateCoreTable(_) | Statement::Ingest(_) => output::loads(ctx, None)?,
            Statement::DropCoreTable { .. } | Statement::DropSlice { .. } => {
                output::dropped(ctx, None)?
            }
            Statement::CreateSlice(_) | Statement::RefreshSlice { .. } => {
                output::builds(ctx, None)?
            }
            Statement::Vacuum(_) => output::vacuums(ctx, &[])?,
            Statement::Verify(_) => output::verifies(ctx, &[])?,
            Statement::ShowCoreTables => ctx.sql(SHOW_CORE_TABLES).await?,
            Statement::ShowSlices => ctx.sql(SHOW_SLICES).await?,
            Statement::DescribeSlice(_) => output::describe_columns(ctx)?,
            Statement::ExplainRefresh(_) => output::explained_columns(ctx)?,
            Statement::FreezeSlice { .. }
            | Statement::ThawSlice(_)
            | Statement::RollbackSlice { .. }
            | Statement::AlterSlice { .. } => output::lifecycle_columns(ctx)?,
            Statement::DismissProposal(_) => output::message(ctx, "")?,
            // Fixed columns: the log is read only when it runs.
            Statement::ShowSliceHistory(_) => {
                return Ok(Some(crate::catalog::system::history_schema()))
            }
            // APPLY PROPOSAL answers as the statement it applies does.
            _ => return Ok(None),
        };
        Ok(Some(Arc::new(empty.schema().as_arrow().clone())))
    }

    /// Runs one statement whose `$n` placeholders take `params` (none for statements without
    /// any; only DataFusion's own statements can have them).
    pub async fn execute_with_params(
        &self,
        stmt: Statement,
        params: ParamValues,
    ) -> Result<DataFrame> {
        let shared = &self.inner.shared;
        self.sync_options();
        let state = self.inner.ctx.state();
        let ctx = &self.inner.ctx;
        match stmt {
            Statement::DataFusion(stmt) => {
                let mut plan =
                    time_travel::plan_statement(&state, shared, (*stmt.0).clone()).await?;
                // The session's limit on how stale the slices it reads may be.
                let options = shared.options();
                if let Some(limit) = options.max_staleness.0 {
                    let action = options.on_stale;
                    if slice::freshness::check_plan(shared, &plan, limit, action).await? {
                        plan =
                            time_travel::plan_statement(&state, shared, (*stmt.0).clone()).await?;
                    }
                }
                // A query of core tables tells usage the slice that would answer it.
                let example = match (options.usage.0, stmt.0.as_ref()) {
                    (true, DFStatement::Statement(inner)) => match inner.as_ref() {
                        SQLStatement::Query(query) => usage_planner::example(&plan, query),
                        _ => None,
                    },
                    _ => None,
                };
                let plan = match &params {
                    ParamValues::List(v) if v.is_empty() => plan,
                    _ => plan.with_param_values(params)?,
                };
                self.refuse_writes(&plan)?;
                // DESCRIBE names types as SQL does (BIGINT, TEXT), not as Arrow does.
                if let LogicalPlan::DescribeTable(describe) = &plan {
                    return output::columns(ctx, &describe.schema);
                }
                // A view over slices and core tables reads their latest versions, always.
                let plan = match plan {
                    LogicalPlan::Ddl(DdlStatement::CreateView(mut view)) => {
                        let input = Arc::unwrap_or_clone(view.input);
                        view.input = Arc::new(live::follow_latest(
                            &(shared.slices.clone() as Arc<dyn live::OpenLatest>),
                            input,
                        )?);
                        LogicalPlan::Ddl(DdlStatement::CreateView(view))
                    }
                    other => other,
                };
                let df = match example {
                    // A query: a DataFrame of it on this session, as `execute_logical_plan`
                    // makes one.
                    Some(example) => {
                        DataFrame::new(usage_planner::with_example(ctx.state(), example), plan)
                    }
                    None => ctx.execute_logical_plan(plan).await?,
                };
                self.sync_options();
                Ok(df)
            }
            Statement::CreateCoreTable(c) => {
                let out = core::create(&state, &core_context(shared), &c).await?;
                output::loads(ctx, out)
            }
            Statement::Ingest(i) => {
                let _no_drop = self.inner.core_drop.read().await;
                let out = core::ingest(&state, &core_context(shared), &i.table, &i.source).await?;
                output::loads(ctx, Some(out))
            }
            Statement::DropCoreTable { name, if_exists } => {
                let dropped = self.drop_core_table(&name, if_exists).await?;
                output::dropped(ctx, dropped.then(|| format!("{CORE_SCHEMA}.{name}")))
            }
            Statement::CreateSlice(c) => {
                let out = self.create_slice(&c).await?;
                output::builds(ctx, out)
            }
            Statement::RefreshSlice { name, full } => {
                let out = self.refresh_slice(name, full).await?;
                output::builds(ctx, Some(out))
            }
            Statement::ExplainRefresh(name) => {
                let built = self.explain_refresh(&name.to_string()).await?;
                output::explained(ctx, &built)
            }
            Statement::DropSlice { name, if_exists } => {
                let dropped = self.drop_slice(&name, if_exists).await?;
                output::dropped(ctx, dropped.then(|| name.to_string()))
            }
            Statement::ShowCoreTables => Ok(ctx.sql(SHOW_CORE_TABLES).await?),
            Statement::ShowSlices => Ok(ctx.sql(SHOW_SLICES).await?),
            Statement::DescribeSlice(name) => {
                let info = self.slice(&name.to_string()).await?;
                output::describe(ctx, &info)
            }
            Statement::FreezeSlice { name, reason } => {
                let out = self.freeze(&name.to_string(), reason).await?;
                self.lifecycle_result(out).await
            }
            Statement::ThawSlice(name) => {
                let out = self.thaw(&name.to_string()).await?;
                self.lifecycle_result(out).await
            }
            Statement::AlterSlice {
                name,
                refresh,
                cluster_by,
            } => {
                let out = self.alter(&name.to_string(), refresh, cluster_by).await?;
                self.lifecycle_result(out).await
            }
            Statement::ApplyProposal(n) => self.apply_proposal(n).await,
            Statement::DismissProposal(n) => {
                let proposal = self.dismiss_proposal(n).await?;
                output::message(
                    ctx,
                    &format!("dismissed proposal {n}: {}", proposal.statement),
                )
            }
            Statement::RollbackSlice { name, version } => {
                let out = self.rollback(&name.to_string(), version).await?;
                self.lifecycle_result(out).await
            }
            Statement::ShowSliceHistory(name) => {
                let sql = format!(
                    "SELECT * FROM {}('{name}') ORDER BY version DESC",
                    time_travel::SLICE_HISTORY
                );
                let plan = crate::sql::planner::plan_sql(&**shared, &state, &sql).await?;
                Ok(ctx.execute_logical_plan(plan).await?)
            }
            Statement::Vacuum(Some(name)) => {
                let out = self.vacuum(&name.to_string()).await?;
                output::vacuums(ctx, &[out])
            }
            Statement::Verify(Some(name)) => {
                let out = self.verify(&name.to_string()).await?;
                output::verifies(ctx, &[out])
            }
            Statement::Verify(None) => {
                let out = self.verify_all().await?;
                output::verifies(ctx, &out)
            }
            Statement::Vacuum(None) => {
                let out = self.vacuum_all().await?;
                output::vacuums(ctx, &out)
            }
        }
    }

    async fn lifecycle_result(&self, out: LifecycleOutcome) -> Result<DataFrame> {
        // The change is made: a state that cannot be read now is shown as unknown (NULL).
        let info = self.slice(&out.slice.to_string()).await.ok();
        output::lifecycle(&self.inner.ctx, &out, info.as_ref())
    }

    /// True when `location` (a path or URL) is the warehouse or lies inside it, judged on
    /// what DataFusion will open (`..`, percent-encoding, links followed), not on its text.
    fn inside_warehouse(&self, location: &str) -> std::result::Result<bool, Unjudgeable> {
        let target = location::resolve(location, Opening::Listing)?;
        let root = location::resolve(self.location().as_str(), Opening::Listing)?;
        Ok(target.is_within(&root))
    }

    /// Refuses plain-SQL writes and drops aimed at core tables, slices and system tables
    /// before they run, naming the icepie statement to use instead.
    fn refuse_writes(&self, plan: &LogicalPlan) -> Result<()> {
        let dml = match plan {
            LogicalPlan::Dml(dml) => dml,
            LogicalPlan::Copy(copy) => {
                return match self.inside_warehouse(&copy.output_url) {
                    Ok(false) => Ok(()),
                    Ok(true) => Err(IcePieError::ReadOnly(format!(
                        "COPY ... TO '{}' would write inside the warehouse {}, whose files \
                         change only through icepie's statements; write to a location outside it",
                        copy.output_url,
                        self.location()
                    ))),
                    // What cannot be told to be outside the warehouse may be inside it.
                    Err(e) => Err(IcePieError::NotAllowed(format!(
                        "COPY ... TO '{}': cannot tell whether it writes inside the warehouse \
                         {} ({e}); write to a plain path or URL outside it",
                        copy.output_url,
                        self.location()
                    ))),
                };
            }
            LogicalPlan::Ddl(DdlStatement::DropTable(DropTable { name, .. })) => {
                let schema = name.schema().unwrap_or(DEFAULT_DOMAIN);
                let table = name.table();
                let msg = if schema == CORE_SCHEMA {
                    format!("core tables are dropped with DROP CORE TABLE {table}")
                } else if schema == SYSTEM_SCHEMA {
                    format!("'{SYSTEM_SCHEMA}.{table}' is a system table and cannot be dropped")
                } else if schema == DEFAULT_DOMAIN || self.inner.shared.has_domain(schema) {
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
