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

mod output;
pub mod scheduler;
pub(crate) mod state;
mod yield_points;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::common::config::ExtensionOptions;
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
use futures::future::{BoxFuture, FutureExt, Shared as SharedFuture, WeakShared};
use futures::TryStreamExt;
use tokio::sync::broadcast;
use url::Url;

use crate::catalog::table::IcePieTable;
use crate::catalog::time_travel::{self, PinnedFunction};
use crate::catalog::{live, system, IcePieCatalog, CATALOG_NAME};
use crate::core::{self};
use crate::error::{IcePieError, Result};
use crate::options::IcePieOptions;
use crate::slice::lifecycle::{self, frozen_error, LifecycleOutcome};
use crate::slice::meta::{self, CommitKind, HistoryEntry};
use crate::slice::quarantine::{self, Verified};
use crate::slice::vacuum::{self, VacuumOutcome};
use crate::slice::{self, BuildOutcome, InputCache, SliceInfo, SliceSpec};
use crate::sql::{parse_sql, CreateSlice, Statement};
use crate::storage::names::{SliceName, CORE_SCHEMA, DEFAULT_DOMAIN, SYSTEM_SCHEMA};
use crate::storage::{Warehouse, DEFAULT_LOCATION};
pub use scheduler::RefreshEvent;
use state::Shared;

/// Options for opening a warehouse.
#[derive(Debug, Clone)]
pub struct IcePieBuilder {
    location: String,
    store: Option<Arc<dyn ObjectStore>>,
    storage_options: HashMap<String, String>,
    settings: Vec<(String, String)>,
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

    /// Sets one of the `icepie.*` settings ([`IcePieOptions`]) as `SET` would, e.g.
    /// `("retain_versions", "20")` or `("icepie.refresh_memory_limit", "2GB")`. A bad name or
    /// value makes [`open`](Self::open) fail with the reason.
    pub fn with_setting(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((key.into(), value.into()));
        self
    }

    /// Turns the scheduler of due refreshes on (the default) or off.
    pub fn with_scheduler(self, on: bool) -> Self {
        self.with_setting("scheduler", if on { "on" } else { "off" })
    }

    /// How many scheduled refreshes may run at once in this process (default 2).
    pub fn with_max_concurrent_refreshes(self, n: usize) -> Self {
        self.with_setting("max_concurrent_refreshes", n.to_string())
    }

    /// Opens the warehouse, creating it if needed, and starts its scheduler.
    pub async fn open(self) -> Result<IcePie> {
        let mut options = IcePieOptions::default();
        for (key, value) in &self.settings {
            let name = key.strip_prefix("icepie.").unwrap_or(key);
            options.set(name, value).map_err(|e| IcePieError::Setting {
                name: name.to_string(),
                reason: e.strip_backtrace(),
            })?;
        }
        let warehouse = Warehouse::open(&self.location, self.store.clone(), self.storage_options)?;
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG_NAME, DEFAULT_DOMAIN)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true)
            .with_option_extension(options.clone())
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
            .with_physical_optimizer_rule(Arc::new(yield_points::YieldAfterJoins))
            .build();
        let ctx = SessionContext::new_with_state(state);
        let shared = Arc::new(Shared::new(warehouse, options));
        let catalog = Arc::new(IcePieCatalog::new(shared.clone()));
        ctx.register_catalog(CATALOG_NAME, catalog.clone());
        for (name, function) in PinnedFunction::all(&shared) {
            ctx.register_udtf(name, function);
        }
        // The names of the warehouse, for queries planned through `context()` directly; icepie's
        // own statements renew what they need.
        shared.refresh_listing().await?;
        let (events, _) = broadcast::channel(256);
        let inner = Arc::new(Inner {
            shared,
            catalog,
            ctx,
            locks: Mutex::new(HashMap::new()),
            core_drop: tokio::sync::RwLock::new(()),
            inflight: Mutex::new(HashMap::new()),
            events,
            scheduler: Mutex::new(None),
        });
        let handle = scheduler::spawn(Arc::downgrade(&inner));
        *inner.scheduler.lock().expect("scheduler lock") = Some(handle);
        Ok(IcePie { inner })
    }
}

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
    shared: Arc<Shared>,
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
        IcePieBuilder {
            location: location.into(),
            store: None,
            storage_options: HashMap::new(),
            settings: Vec::new(),
        }
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
            self.inner.shared.set_options(o.clone());
        }
    }

    /// What the scheduler does from now on: one event per scheduled refresh that ended.
    pub fn subscribe(&self) -> broadcast::Receiver<RefreshEvent> {
        self.inner.events.subscribe()
    }

    /// Stops the scheduler: it starts no more refreshes, lets those running finish for up to
    /// `grace`, then cancels the rest (a cancelled refresh commits nothing). Statements still
    /// run afterwards; only scheduling has stopped.
    pub async fn close(&self, grace: Duration) {
        let handle = self.inner.scheduler.lock().expect("scheduler lock").take();
        if let Some(h) = handle {
            h.stop(grace).await;
        }
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

    /// Runs one statement.
    pub async fn execute(&self, stmt: Statement) -> Result<DataFrame> {
        let shared = &self.inner.shared;
        self.sync_options();
        let state = self.inner.ctx.state();
        let ctx = &self.inner.ctx;
        match stmt {
            Statement::DataFusion(stmt) => {
                let plan = time_travel::plan_statement(&state, shared, *stmt).await?;
                self.refuse_writes(&plan)?;
                // A view over slices and core tables reads their latest versions, always.
                let plan = match plan {
                    LogicalPlan::Ddl(DdlStatement::CreateView(mut view)) => {
                        let input = Arc::unwrap_or_clone(view.input);
                        view.input = Arc::new(live::follow_latest(shared, input)?);
                        LogicalPlan::Ddl(DdlStatement::CreateView(view))
                    }
                    other => other,
                };
                let df = ctx.execute_logical_plan(plan).await?;
                self.sync_options();
                Ok(df)
            }
            Statement::CreateCoreTable(c) => {
                let out = core::create(&state, shared, &c).await?;
                output::loads(ctx, out)
            }
            Statement::Ingest(i) => {
                let _no_drop = self.inner.core_drop.read().await;
                let out = core::ingest(&state, shared, &i.table, &i.source).await?;
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
            Statement::RefreshSlice(name) => {
                let out = self.refresh(&name.to_string()).await?;
                output::builds(ctx, Some(out))
            }
            Statement::DropSlice { name, if_exists } => {
                let dropped = self.drop_slice(&name, if_exists).await?;
                output::dropped(ctx, dropped.then(|| name.to_string()))
            }
            Statement::ShowCoreTables => Ok(ctx
                .sql(
                    "SELECT name, version, rows, files, bytes, created_at, last_ingest_at \
                      FROM system.core_tables ORDER BY name",
                )
                .await?),
            Statement::ShowSlices => Ok(ctx
                .sql(
                    "SELECT domain, name, state, version, rows, bytes, refreshed_at, lag, refresh, \
                      owner, last_error FROM system.slices ORDER BY domain, name",
                )
                .await?),
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
            Statement::RollbackSlice { name, version } => {
                let out = self.rollback(&name.to_string(), version).await?;
                self.lifecycle_result(out).await
            }
            Statement::ShowSliceHistory(name) => {
                let sql = format!(
                    "SELECT * FROM {}('{name}') ORDER BY version DESC",
                    time_travel::SLICE_HISTORY
                );
                let plan = time_travel::plan_sql(&state, shared, &sql).await?;
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
        if self.inner.catalog.is_scratch(&c.name.domain) {
            return Err(IcePieError::InvalidName {
                name: c.name.to_string(),
                reason: format!(
                    "'{}' is a scratch schema of this session; put the slice in another \
                     domain, or DROP SCHEMA {} first",
                    c.name.domain, c.name.domain
                ),
            });
        }
        let lock = self.lock(&c.name);
        let _guard = lock.lock().await;
        let _no_drop = self.inner.core_drop.read().await;
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
                (Some(table), true, _) => {
                    let (meta, _) = meta::latest_meta(table, &c.name.to_string()).await?;
                    if let Some(frozen) = &meta.frozen {
                        return Err(frozen_error(&c.name, frozen, "CREATE OR REPLACE SLICE"));
                    }
                    CommitKind::Replace
                }
                (None, _, _) => CommitKind::Create,
            };
        let out = slice::build(
            &self.inner.ctx.state(),
            shared,
            &c.name,
            &spec,
            kind,
            existing.as_ref(),
        )
        .await;
        out.map(Some)
    }

    /// Builds and commits the next version of slice `name` (`domain.name` or `name`) from its
    /// definition, with every input pinned at its current version. On failure nothing is
    /// committed and the slice keeps serving its last version.
    ///
    /// The version returned is always built from inputs at least as new as those current when
    /// this was called. Requests for a slice whose refresh is waiting for its turn join that
    /// refresh and share its outcome; once a refresh has begun reading its inputs, a new
    /// request queues one more refresh behind it instead of returning a version built from
    /// older data.
    pub async fn refresh(&self, name: &str) -> Result<BuildOutcome> {
        let name = SliceName::parse(name)?;
        let running = {
            let mut inflight = self.inner.inflight.lock().expect("inflight lock");
            let joinable = inflight
                .get(&name)
                .filter(|j| !j.started.load(Ordering::SeqCst))
                .and_then(|j| j.future.upgrade());
            match joinable {
                Some(running) => running,
                None => {
                    let this = self.clone();
                    let slice = name.clone();
                    let started = Arc::new(AtomicBool::new(false));
                    let flag = started.clone();
                    let fut: SharedFuture<RefreshFuture> =
                        async move { this.refresh_now(&slice, &flag).await.map_err(Arc::new) }
                            .boxed()
                            .shared();
                    if let Some(future) = fut.downgrade() {
                        inflight.insert(name.clone(), Joinable { future, started });
                    }
                    fut
                }
            }
        };
        let result = running.await;
        let mut inflight = self.inner.inflight.lock().expect("inflight lock");
        if inflight
            .get(&name)
            .is_some_and(|j| j.future.upgrade().is_none())
        {
            inflight.remove(&name);
        }
        result.map_err(|e| Arc::try_unwrap(e).unwrap_or_else(IcePieError::Joined))
    }

    /// Refreshes `name` once it holds the slice's lock; sets `started` before reading any
    /// input, from which point later requests no longer join this refresh.
    ///
    /// A refresh means "make it fresh", so losing a race to another writer (another process
    /// committing the slice meanwhile) is not an error in itself: when the winner's version
    /// was built from the inputs' latest versions, this refresh reports it as its outcome
    /// (`by_another_writer`); otherwise it builds again on top of the winner, since a full
    /// rebuild does not depend on the version it replaces. Only a change of definition, a
    /// freeze or a drop in between fails it, with an error saying which.
    async fn refresh_now(&self, name: &SliceName, started: &AtomicBool) -> Result<BuildOutcome> {
        let shared = &self.inner.shared;
        let lock = self.lock(name);
        let _guard = lock.lock().await;
        let _no_drop = self.inner.core_drop.read().await;
        let mut races = 0;
        loop {
            let (table, meta, _) = lifecycle::load(shared, name).await?;
            // From here on the build reads its inputs: later requests must not join it.
            started.store(true, Ordering::SeqCst);
            if let Some(frozen) = &meta.frozen {
                return Err(frozen_error(name, frozen, "REFRESH SLICE"));
            }
            let result = slice::build(
                &self.inner.ctx.state(),
                shared,
                name,
                &SliceSpec::from(&meta),
                CommitKind::Refresh,
                Some(&table),
            )
            .await;
            let lost_race = matches!(
                &result,
                Err(IcePieError::RefreshFailed { source, .. })
                    if matches!(**source, IcePieError::Conflict { .. })
            );
            if !lost_race || races == MAX_REFRESH_RACES {
                return result;
            }
            races += 1;
            if let Some(winner) = slice::after_lost_race(shared, name, &meta).await? {
                return Ok(winner);
            }
        }
    }

    /// `FREEZE SLICE`: pins the slice at its current data; refreshes are refused until
    /// [`thaw`](Self::thaw).
    pub async fn freeze(&self, name: &str, reason: Option<String>) -> Result<LifecycleOutcome> {
        let name = SliceName::parse(name)?;
        let lock = self.lock(&name);
        let _guard = lock.lock().await;
        retrying(|| lifecycle::freeze(&self.inner.shared, &name, reason.clone())).await
    }

    /// `THAW SLICE`: resumes the slice's refresh policy and clears a suspension.
    pub async fn thaw(&self, name: &str) -> Result<LifecycleOutcome> {
        let name = SliceName::parse(name)?;
        let lock = self.lock(&name);
        let _guard = lock.lock().await;
        retrying(|| lifecycle::thaw(&self.inner.shared, &name)).await
    }

    /// `ROLLBACK SLICE name TO VERSION n`: commits a new version whose data and definition
    /// equal version `n`, which must still be retained.
    pub async fn rollback(&self, name: &str, version: i64) -> Result<LifecycleOutcome> {
        let name = SliceName::parse(name)?;
        let lock = self.lock(&name);
        let _guard = lock.lock().await;
        retrying(|| lifecycle::rollback(&self.inner.shared, &name, version)).await
    }

    /// `SHOW SLICE HISTORY`: every commit of the slice still in its log, newest first.
    pub async fn history(&self, name: &str) -> Result<Vec<HistoryEntry>> {
        let name = SliceName::parse(name)?;
        let table = lifecycle::load_table(&self.inner.shared, &name).await?;
        meta::history(&table, &name.to_string()).await
    }

    /// `VACUUM SLICE`: deletes the slice's files that no retained version references.
    pub async fn vacuum(&self, name: &str) -> Result<VacuumOutcome> {
        let name = SliceName::parse(name)?;
        vacuum::vacuum(&self.inner.shared, &name).await
    }

    /// `VACUUM SLICES`: vacuums every slice.
    pub async fn vacuum_all(&self) -> Result<Vec<VacuumOutcome>> {
        self.inner.shared.refresh_listing().await?;
        let mut out = Vec::new();
        for name in self.inner.shared.slice_names() {
            out.push(vacuum::vacuum(&self.inner.shared, &name).await?);
        }
        Ok(out)
    }

    /// `VERIFY SLICE`: checks that every file of the version the slice serves exists, has
    /// the size its Delta log records and reads as Parquet (every row of it). A damaged file
    /// quarantines the slice; all files sound lifts its quarantine.
    pub async fn verify(&self, name: &str) -> Result<Verified> {
        let name = SliceName::parse(name)?;
        quarantine::verify(&self.inner.shared.warehouse, &name).await
    }

    /// `VERIFY SLICES`: verifies every slice.
    pub async fn verify_all(&self) -> Result<Vec<Verified>> {
        self.inner.shared.refresh_listing().await?;
        let mut out = Vec::new();
        for name in self.inner.shared.slice_names() {
            match quarantine::verify(&self.inner.shared.warehouse, &name).await {
                Ok(v) => out.push(v),
                // A folder left by a failed first build holds no slice to verify.
                Err(IcePieError::SliceNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Every slice with its state, version, size and last error. A slice whose metadata
    /// cannot be read is left out rather than failing the others; `system.slices` lists it
    /// as `failed` with the reason.
    pub async fn slices(&self) -> Result<Vec<SliceInfo>> {
        self.sync_options();
        self.inner.shared.refresh_listing().await?;
        let names = self.inner.shared.slice_names();
        Ok(system::describe(&self.inner.shared, names).await?.0)
    }

    /// One slice's state, version, size, lineage and definition.
    pub async fn slice(&self, name: &str) -> Result<SliceInfo> {
        let name = SliceName::parse(name)?;
        let shared = &self.inner.shared;
        slice::info(shared, &name, &InputCache::default())
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
        Ok(true)
    }

    async fn drop_core_table(&self, name: &str, if_exists: bool) -> Result<bool> {
        let shared = &self.inner.shared;
        let _no_reader_starts = self.inner.core_drop.write().await;
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
        shared.refresh_listing().await?;
        for s in shared.slice_names() {
            // A slice that cannot be read (damaged files or log) does not block the drop.
            let Ok(Some(t)) = shared
                .warehouse
                .load(&Warehouse::slice_path(&s), None)
                .await
            else {
                continue;
            };
            let Ok((m, _)) = meta::latest_meta(&t, &s.to_string()).await else {
                continue;
            };
            if m.inputs.iter().any(|i| i.table == qualified) {
                readers.push(s.to_string());
            }
        }
        if !readers.is_empty() {
            return Err(IcePieError::CoreTableInUse {
                table: qualified,
                slices: readers,
            });
        }
        shared.warehouse.delete_prefix(&rel).await?;
        Ok(true)
    }

    /// True when `location` (a path or URL) is the warehouse or lies inside it.
    fn inside_warehouse(&self, location: &str) -> bool {
        let root = self.location();
        if location.contains("://") {
            return Url::parse(location).is_ok_and(|u| {
                let mut text = u.to_string();
                if !text.ends_with('/') {
                    text.push('/');
                }
                text.starts_with(root.as_str())
            });
        }
        let (Ok(root), Ok(path)) = (root.to_file_path(), std::path::absolute(location)) else {
            return false;
        };
        // Lexically: `..` and `.` resolved, so `warehouse/../warehouse/x` is caught too.
        let mut normal = std::path::PathBuf::new();
        for part in path.components() {
            match part {
                std::path::Component::ParentDir => {
                    normal.pop();
                }
                std::path::Component::CurDir => {}
                other => normal.push(other),
            }
        }
        normal.starts_with(root)
    }

    /// Refuses plain-SQL writes and drops aimed at core tables, slices and system tables
    /// before they run, naming the icepie statement to use instead.
    fn refuse_writes(&self, plan: &LogicalPlan) -> Result<()> {
        let dml = match plan {
            LogicalPlan::Dml(dml) => dml,
            LogicalPlan::Copy(copy) if self.inside_warehouse(&copy.output_url) => {
                return Err(IcePieError::ReadOnly(format!(
                    "COPY ... TO '{}' would write inside the warehouse {}, whose files change \
                     only through icepie's statements; write to a location outside it",
                    copy.output_url,
                    self.location()
                )));
            }
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
