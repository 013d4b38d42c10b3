//! The context slices are built and read in, one per open warehouse: the warehouse, the
//! session's settings, the refresh logs read so far, the refreshes running in this process,
//! where queries' reads are recorded, and the two hooks through which a slice reaches the
//! layers above it: how a definition is planned ([`Planner`], the catalog's) and how a read
//! that needs a fresher slice refreshes it ([`Refresher`], the engine's).
//!
//! The catalog's state (its `CatalogState`) adds the names of the
//! warehouse's tables and the tables pinned by statements being planned.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use async_trait::async_trait;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;

use super::damage::DamageWatch;
use super::refresh_log::{AttemptSummary, LogCache};
use super::{meta, quarantine, Settling};
use crate::error::{IcePieError, Result};
use crate::options::IcePieOptions;
use crate::sql::Planner;
use crate::storage::names::{validate_name, SliceName, CORE_SCHEMA};
use crate::storage::Warehouse;
use crate::table::live::OpenLatest;
use crate::table::{IcePieTable, TableKind};
use crate::usage::Usage;

/// What slices and the core tables they read need of one open warehouse.
#[derive(Debug)]
pub(crate) struct SliceContext {
    pub warehouse: Warehouse,
    /// Slices with a refresh running in this process.
    pub refreshing: Mutex<HashSet<SliceName>>,
    /// The session's `icepie.*` settings as of its last statement (system tables and the
    /// scheduler have no session to read them from).
    options: RwLock<IcePieOptions>,
    /// What this process has read of the refresh logs.
    log: LogCache,
    /// Successful attempts whose rows are still being written to their refresh logs.
    pub settling: Settling,
    /// How a read that needs a fresher slice refreshes it (set by the engine).
    refresher: OnceLock<Refresher>,
    /// How definitions are planned (set by the catalog, which outlives no one: a weak link).
    planner: OnceLock<Weak<dyn Planner>>,
    /// Where queries' reads are recorded.
    pub usage: Arc<Usage>,
}

/// Refreshes a slice as `REFRESH SLICE` does.
pub(crate) struct Refresher(
    pub Box<dyn Fn(SliceName) -> futures::future::BoxFuture<'static, Result<()>> + Send + Sync>,
);

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refresher")
    }
}

impl SliceContext {
    pub(crate) fn new(warehouse: Warehouse, options: IcePieOptions, usage: Arc<Usage>) -> Self {
        Self {
            usage,
            warehouse,
            refreshing: Mutex::new(HashSet::new()),
            options: RwLock::new(options),
            log: LogCache::default(),
            settling: Settling::default(),
            refresher: OnceLock::new(),
            planner: OnceLock::new(),
        }
    }

    /// Sets how reads refresh the slices they need fresher (once, by the engine).
    pub(crate) fn set_refresher(&self, refresher: Refresher) {
        let _ = self.refresher.set(refresher);
    }

    /// Sets how definitions are planned (once, by the catalog).
    pub(crate) fn set_planner(&self, planner: Weak<dyn Planner>) {
        let _ = self.planner.set(planner);
    }

    /// Refreshes `name` as `REFRESH SLICE` does (joining one that has not started reading).
    pub(crate) async fn refresh(&self, name: &SliceName) -> Result<()> {
        match self.refresher.get() {
            Some(r) => (r.0)(name.clone()).await,
            None => Err(IcePieError::Server(
                "this warehouse cannot refresh slices from here".into(),
            )),
        }
    }

    /// Plans SQL text holding one statement (a definition) as icepie's statements are.
    pub(crate) async fn plan_sql(&self, state: &SessionState, sql: &str) -> Result<LogicalPlan> {
        let planner = self
            .planner
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| IcePieError::Server("the warehouse was closed".into()))?;
        crate::sql::planner::plan_sql(planner.as_ref(), state, sql).await
    }

    /// The settings as of the session's last statement.
    pub(crate) fn options(&self) -> IcePieOptions {
        self.options.read().expect("options lock").clone()
    }

    /// Records the session's settings.
    pub(crate) fn set_options(&self, options: IcePieOptions) {
        *self.options.write().expect("options lock") = options;
    }

    /// The recent refresh attempts of a slice, oldest first, reading only what its log gained.
    pub(crate) async fn attempts(&self, slice: &SliceName) -> Result<Vec<AttemptSummary>> {
        self.log.attempts(&self.warehouse, slice, None).await
    }

    /// The recent refresh attempts of the slice `table` is a version of, oldest first: not
    /// those of a slice dropped before it was made under the same name.
    pub(crate) async fn attempts_of(
        &self,
        slice: &SliceName,
        table: &deltalake::DeltaTable,
    ) -> Result<Vec<AttemptSummary>> {
        let all = self.attempts(slice).await?;
        Ok(super::refresh_log::of_slice(
            all,
            crate::storage::table_id(table).as_deref(),
            crate::storage::table_created(table),
        ))
    }

    /// The recent refresh attempts of a slice as of version `upto` of its refresh log (or a
    /// later one this process has read).
    pub(crate) async fn attempts_upto(
        &self,
        slice: &SliceName,
        upto: u64,
    ) -> Result<Vec<AttemptSummary>> {
        self.log.attempts(&self.warehouse, slice, Some(upto)).await
    }

    /// The core table `name` at its latest version.
    pub(crate) async fn load_core(&self, name: &str) -> Result<Option<IcePieTable>> {
        validate_name(name)?;
        let rel = Warehouse::core_path(name);
        let Some(t) = self.warehouse.load(&rel, None).await? else {
            return Ok(None);
        };
        let qualified = format!("{CORE_SCHEMA}.{name}");
        let watch = self.watch(&rel, TableKind::Core, &qualified);
        Ok(Some(
            IcePieTable::try_new(TableKind::Core, qualified, t)
                .await?
                .watched(watch),
        ))
    }

    fn watch(&self, rel: &str, kind: TableKind, name: &str) -> Arc<DamageWatch> {
        Arc::new(DamageWatch {
            warehouse: self.warehouse.clone(),
            rel: rel.to_string(),
            kind,
            name: name.to_string(),
        })
    }

    /// The usage recorded by every process over `icepie.usage_retention` (and at least the
    /// span [`SliceContext::demand`] needs), as [`Usage::recorded`] serves it.
    pub(crate) async fn recorded_usage(&self) -> Result<Arc<crate::usage::files::Rows>> {
        let options = self.options();
        let span = i64::try_from(options.usage_retention.0.as_millis())
            .unwrap_or(i64::MAX)
            .max(crate::usage::demand_window(options.cold_after.0));
        let since = crate::usage::files::day_of(self.usage.clock.now_ms().saturating_sub(span));
        self.usage.recorded(since).await
    }

    /// How much each table is read: the recorded usage of the last `icepie.cold_after` or
    /// `icepie.unread_after`, whichever is longer (at least a week), with this process's reads
    /// not written yet. `None` when it is not known: this process does not record usage
    /// (`icepie.usage = off`), or the usage could never be read.
    pub(crate) async fn demand(
        &self,
    ) -> Option<std::collections::HashMap<String, crate::usage::Demand>> {
        let options = self.options();
        if !options.usage.0 {
            return None;
        }
        let rows = self.recorded_usage().await.ok()?;
        // Far enough back for dormancy and for freeze proposals.
        let window = options.cold_after.0.max(options.unread_after.0);
        let mut demand = crate::usage::demand(&rows, window, self.usage.clock.now_ms());
        for (table, at) in self.usage.local_reads() {
            let d = demand.entry(table).or_default();
            d.last_read = d.last_read.max(Some(at));
        }
        Some(demand)
    }

    /// The slice `name` at `version` (latest when `None`). A quarantined slice (a file of the
    /// version it serves is damaged) is refused with the damage and the fix.
    pub(crate) async fn load_slice(
        &self,
        name: &SliceName,
        version: Option<i64>,
    ) -> Result<Option<IcePieTable>> {
        let rel = Warehouse::slice_path(name);
        let Some(t) = self.warehouse.load(&rel, version).await? else {
            return Ok(None);
        };
        let qualified = name.to_string();
        let table = IcePieTable::try_new(TableKind::Slice, qualified.clone(), t.clone()).await?;
        if version.is_some() {
            // An old version's damage is not the slice's: it serves the latest.
            return Ok(Some(table));
        }
        if let Some(q) = quarantine::in_force(&self.warehouse, &rel, &t).await? {
            return Err(quarantine::slice_damaged(&qualified, &q.file, &q.problem));
        }
        Ok(Some(table.watched(self.watch(
            &rel,
            TableKind::Slice,
            &qualified,
        ))))
    }

    /// The path of an input named as in lineage (`core.x` or `domain.name`).
    fn input_path(qualified: &str) -> Result<String> {
        Ok(match qualified.split_once('.') {
            Some((CORE_SCHEMA, name)) => {
                validate_name(name)?;
                Warehouse::core_path(name)
            }
            _ => Warehouse::slice_path(&SliceName::parse(qualified)?),
        })
    }

    /// When `version` of an input named as in lineage was committed (ms since the epoch).
    pub(crate) async fn commit_time(&self, qualified: &str, version: i64) -> Result<Option<i64>> {
        let table = self.warehouse.handle(&Self::input_path(qualified)?)?;
        Ok(meta::commit_info(&table, version)
            .await?
            .and_then(|i| i.timestamp))
    }

    /// The latest version of an input named as in lineage (`core.x` or `domain.name`).
    pub(crate) async fn latest_version(&self, qualified: &str) -> Result<Option<i64>> {
        self.warehouse
            .latest_version(&Self::input_path(qualified)?)
            .await
    }
}

#[async_trait]
impl OpenLatest for SliceContext {
    async fn open_latest(&self, kind: TableKind, name: &str) -> Result<Option<IcePieTable>> {
        match kind {
            TableKind::Core => {
                self.load_core(name.strip_prefix("core.").unwrap_or(name))
                    .await
            }
            _ => self.load_slice(&SliceName::parse(name)?, None).await,
        }
    }
}
