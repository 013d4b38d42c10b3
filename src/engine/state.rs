//! The state one `IcePie` shares between the engine, the catalog, the system tables and the
//! scheduler: the warehouse, what this process knows of its names, the session's settings,
//! the refresh logs read so far, and the tables pinned by statements being planned.
//!
//! Tables are looked up in the warehouse each time a query is planned, so a query always sees
//! the latest committed version of each table, including those another process committed. The
//! *lists* of names come from a listing of the warehouse, renewed only when a statement needs
//! it ([`Shared::know_schemas`]): `SHOW TABLES` and `information_schema` list everything, a
//! schema not known yet costs one listing of its folder, and a statement that names only
//! known schemas lists nothing, so its cost does not grow with the number of slices.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Mutex, RwLock};

use datafusion::execution::SessionState;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{SchemaName, Statement as SQLStatement};

use crate::catalog::table::{IcePieTable, TableKind};
use crate::catalog::{damage, time_travel, CATALOG_NAME};
use futures::{StreamExt, TryStreamExt};

use crate::error::{IcePieError, Result};
use crate::options::IcePieOptions;
use crate::slice::log::{AttemptSummary, LogCache};
use crate::slice::{meta, quarantine, Settling};
use crate::storage::names::{
    validate_domain, validate_name, SliceName, CORE_SCHEMA, DEFAULT_DOMAIN, SYSTEM_SCHEMA,
};
use crate::storage::{Warehouse, CORE_DIR, SLICES_DIR};

/// How many domains' folders a whole listing lists at a time.
const LISTING_FANOUT: usize = 16;

/// DataFusion's schema of catalog views.
const INFORMATION_SCHEMA: &str = "information_schema";

/// Names of the tables in the warehouse, as last listed.
#[derive(Debug, Default, Clone)]
pub(crate) struct Listing {
    pub core: Vec<String>,
    /// Domains whose slices were listed, with their slices' names.
    pub domains: BTreeMap<String, Vec<String>>,
    /// Domains whose folder was seen but not listed yet ([`Shared::list_names`]): a slice of
    /// one loads by its name; what lists them all lists them first.
    pub unlisted: BTreeSet<String>,
}

/// State shared by the engine, the catalog and the system tables of one `IcePie`.
#[derive(Debug)]
pub(crate) struct Shared {
    pub warehouse: Warehouse,
    pub listing: RwLock<Listing>,
    /// Slices with a refresh running in this process.
    pub refreshing: Mutex<HashSet<SliceName>>,
    /// The session's `icepie.*` settings as of its last statement (system tables and the
    /// scheduler have no session to read them from).
    options: RwLock<IcePieOptions>,
    /// What this process has read of the refresh logs.
    log: LogCache,
    /// Tables opened for the time-travel calls of statements being planned.
    pub pins: time_travel::Pins,
    /// Successful attempts whose rows are still being written to their refresh logs.
    pub settling: Settling,
    /// How a read that needs a fresher slice refreshes it (set by the engine).
    refresher: std::sync::OnceLock<Refresher>,
    /// Where queries' reads are recorded.
    pub usage: std::sync::Arc<crate::usage::Usage>,
    /// Every slice as this process last described it: what demand flows through when only
    /// some slices are described (`catalog::system::apply_known_demand`).
    pub known_slices: Mutex<std::collections::HashMap<SliceName, crate::slice::SliceInfo>>,
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

impl Shared {
    pub fn new(
        warehouse: Warehouse,
        options: IcePieOptions,
        usage: std::sync::Arc<crate::usage::Usage>,
    ) -> Self {
        Self {
            usage,
            known_slices: Mutex::default(),
            warehouse,
            listing: RwLock::new(Listing::default()),
            refreshing: Mutex::new(HashSet::new()),
            options: RwLock::new(options),
            log: LogCache::default(),
            pins: time_travel::Pins::default(),
            settling: Settling::default(),
            refresher: std::sync::OnceLock::new(),
        }
    }

    /// Sets how reads refresh the slices they need fresher (once, by the engine).
    pub fn set_refresher(&self, refresher: Refresher) {
        let _ = self.refresher.set(refresher);
    }

    /// Refreshes `name` as `REFRESH SLICE` does (joining one that has not started reading).
    pub async fn refresh(&self, name: &SliceName) -> Result<()> {
        match self.refresher.get() {
            Some(r) => (r.0)(name.clone()).await,
            None => Err(IcePieError::Server(
                "this warehouse cannot refresh slices from here".into(),
            )),
        }
    }

    /// The settings as of the session's last statement.
    pub fn options(&self) -> IcePieOptions {
        self.options.read().expect("options lock").clone()
    }

    /// Records the session's settings.
    pub fn set_options(&self, options: IcePieOptions) {
        *self.options.write().expect("options lock") = options;
    }

    /// The recent refresh attempts of a slice, oldest first, reading only what its log gained.
    pub async fn attempts(&self, slice: &SliceName) -> Result<Vec<AttemptSummary>> {
        self.log.attempts(&self.warehouse, slice, None).await
    }

    /// The recent refresh attempts of the slice `table` is a version of, oldest first: not
    /// those of a slice dropped before it was made under the same name.
    pub async fn attempts_of(
        &self,
        slice: &SliceName,
        table: &deltalake::DeltaTable,
    ) -> Result<Vec<AttemptSummary>> {
        let all = self.attempts(slice).await?;
        Ok(crate::slice::log::of_slice(
            all,
            crate::storage::table_id(table).as_deref(),
            crate::storage::table_created(table),
        ))
    }

    /// The recent refresh attempts of a slice as of version `upto` of its refresh log (or a
    /// later one this process has read).
    pub async fn attempts_upto(&self, slice: &SliceName, upto: u64) -> Result<Vec<AttemptSummary>> {
        self.log.attempts(&self.warehouse, slice, Some(upto)).await
    }

    /// Lists the warehouse again: the core, the domains, and each domain's slices, up to
    /// [`LISTING_FANOUT`] domains at a time.
    pub async fn refresh_listing(&self) -> Result<()> {
        let (core, names) = futures::try_join!(
            self.warehouse.list_children(CORE_DIR),
            self.warehouse.list_children(SLICES_DIR)
        )?;
        let listed: Vec<(String, Vec<String>)> =
            futures::stream::iter(names.into_iter().filter(|d| validate_domain(d).is_ok()))
                .map(|domain| async move {
                    let path = format!("{SLICES_DIR}/{domain}");
                    let slices = self.warehouse.list_children(&path).await?;
                    Ok::<_, IcePieError>((domain, slices))
                })
                .buffer_unordered(LISTING_FANOUT)
                .try_collect()
                .await?;
        let domains: BTreeMap<String, Vec<String>> = listed
            .into_iter()
            .filter(|(_, slices)| !slices.is_empty())
            .collect();
        *self.listing.write().expect("listing lock") = Listing {
            core,
            domains,
            unlisted: BTreeSet::new(),
        };
        Ok(())
    }

    /// Lists the core and the names of the domains, not their slices: two requests however
    /// many slices the warehouse holds, so that opening it costs the same with 1 or 1,000.
    /// A statement naming a slice loads it by its name; one that needs every name (a system
    /// table, `SHOW TABLES`, `information_schema`) lists the warehouse first.
    pub async fn list_names(&self) -> Result<()> {
        let (core, names) = futures::try_join!(
            self.warehouse.list_children(CORE_DIR),
            self.warehouse.list_children(SLICES_DIR)
        )?;
        let mut listing = self.listing.write().expect("listing lock");
        listing.core = core;
        listing.unlisted = names
            .into_iter()
            .filter(|d| validate_domain(d).is_ok() && !listing.domains.contains_key(d))
            .collect();
        Ok(())
    }

    /// Makes the listing good enough to plan `stmt`: everything for a statement that reads
    /// `information_schema` (or `SHOW TABLES`) or a listing of `pg_catalog`, else the domains
    /// it names that were not known (one listing of each one's folder, so a domain another
    /// process created is found, and a scratch schema gives way to a domain of the same name).
    /// Nothing when every schema it names is known.
    pub async fn know_schemas(&self, state: &SessionState, stmt: &DFStatement) -> Result<()> {
        let default_schema = state.config_options().catalog.default_schema.clone();
        let mut unknown = BTreeSet::new();
        if let DFStatement::Statement(s) = stmt {
            if let SQLStatement::CreateSchema {
                schema_name: SchemaName::Simple(name) | SchemaName::NamedAuthorization(name, _),
                ..
            } = s.as_ref()
            {
                if let Some(last) = name.0.last().and_then(|p| p.as_ident()) {
                    unknown.insert(last.value.clone());
                }
            }
        }
        for reference in state.resolve_table_references(stmt)? {
            if reference.catalog().is_some_and(|c| c != CATALOG_NAME) {
                continue;
            }
            let schema = reference.schema().unwrap_or(&default_schema);
            if schema == INFORMATION_SCHEMA
                || (schema == crate::catalog::pg_catalog::PG_CATALOG
                    && crate::catalog::pg_catalog::LISTINGS.contains(&reference.table()))
            {
                return self.refresh_listing().await;
            }
            if ![CORE_SCHEMA, SYSTEM_SCHEMA, DEFAULT_DOMAIN].contains(&schema)
                && !self.has_domain(schema)
            {
                unknown.insert(schema.to_string());
            }
        }
        for domain in unknown {
            if validate_domain(&domain).is_ok() {
                self.know_domain(&domain).await?;
            }
        }
        Ok(())
    }

    /// Lists one domain's folder into the listing.
    async fn know_domain(&self, domain: &str) -> Result<()> {
        let slices = self
            .warehouse
            .list_children(&format!("{SLICES_DIR}/{domain}"))
            .await?;
        let mut listing = self.listing.write().expect("listing lock");
        listing.unlisted.remove(domain);
        if slices.is_empty() {
            listing.domains.remove(domain);
        } else {
            listing.domains.insert(domain.to_string(), slices);
        }
        Ok(())
    }

    /// True when the last listing holds the domain `name` (without copying the listing).
    pub fn has_domain(&self, name: &str) -> bool {
        let listing = self.listing.read().expect("listing lock");
        listing.domains.contains_key(name) || listing.unlisted.contains(name)
    }

    /// The last listing.
    pub fn listing(&self) -> Listing {
        self.listing.read().expect("listing lock").clone()
    }

    /// Every slice in the last listing.
    pub fn slice_names(&self) -> Vec<SliceName> {
        self.listing()
            .domains
            .into_iter()
            .flat_map(|(d, names)| {
                names.into_iter().map(move |n| SliceName {
                    domain: d.clone(),
                    name: n,
                })
            })
            .collect()
    }

    /// The core table `name` at its latest version.
    pub async fn load_core(&self, name: &str) -> Result<Option<IcePieTable>> {
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

    fn watch(&self, rel: &str, kind: TableKind, name: &str) -> damage::DamageWatch {
        damage::DamageWatch {
            warehouse: self.warehouse.clone(),
            rel: rel.to_string(),
            kind,
            name: name.to_string(),
        }
    }

    /// The usage recorded by every process over `icepie.usage_retention` (and at least the
    /// span [`Shared::demand`] needs), as [`crate::usage::Usage::recorded`] serves it.
    pub async fn recorded_usage(&self) -> Result<std::sync::Arc<crate::usage::files::Rows>> {
        let options = self.options();
        let span = i64::try_from(options.usage_retention.0.as_millis())
            .unwrap_or(i64::MAX)
            .max(crate::usage::demand_window(options.cold_after.0));
        let since = crate::usage::files::day_of(crate::usage::now_ms().saturating_sub(span));
        self.usage.recorded(since).await
    }

    /// How much each table is read: the recorded usage of the last `icepie.cold_after` or
    /// `icepie.unread_after`, whichever is longer (at least a week), with this process's reads not written yet. `None` when it is not
    /// known: this process does not record usage (`icepie.usage = off`), or the usage could
    /// never be read.
    pub async fn demand(&self) -> Option<std::collections::HashMap<String, crate::usage::Demand>> {
        let options = self.options();
        if !options.usage.0 {
            return None;
        }
        let rows = self.recorded_usage().await.ok()?;
        // Far enough back for dormancy and for freeze proposals.
        let window = options.cold_after.0.max(options.unread_after.0);
        let mut demand = crate::usage::demand(&rows, window);
        for (table, at) in self.usage.local_reads() {
            let d = demand.entry(table).or_default();
            d.last_read = d.last_read.max(Some(at));
        }
        Some(demand)
    }

    /// The slice `name` at `version` (latest when `None`). A quarantined slice (a file of the
    /// version it serves is damaged) is refused with the damage and the fix.
    pub async fn load_slice(
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
    pub async fn commit_time(&self, qualified: &str, version: i64) -> Result<Option<i64>> {
        let table = self.warehouse.handle(&Self::input_path(qualified)?)?;
        Ok(meta::commit_info(&table, version)
            .await?
            .and_then(|i| i.timestamp))
    }

    /// The latest version of an input named as in lineage (`core.x` or `domain.name`).
    pub async fn latest_version(&self, qualified: &str) -> Result<Option<i64>> {
        self.warehouse
            .latest_version(&Self::input_path(qualified)?)
            .await
    }
}
