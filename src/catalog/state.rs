//! The state one `IcePie` shares between the engine, the catalog, the system tables and the
//! scheduler: the slices' context ([`SliceContext`]: the warehouse, the session's settings,
//! the refresh logs read so far), what this process knows of the warehouse's names, and the
//! tables pinned by statements being planned.
//!
//! Tables are looked up in the warehouse each time a query is planned, so a query always sees
//! the latest committed version of each table, including those another process committed. The
//! *lists* of names come from a listing of the warehouse, renewed only when a statement needs
//! it ([`CatalogState::know_schemas`]): `SHOW TABLES` and `information_schema` list everything, a
//! schema not known yet costs one listing of its folder, and a statement that names only
//! known schemas lists nothing, so its cost does not grow with the number of slices.
//!
//! # Invariants
//!
//! - Opening a warehouse, and planning a statement on one slice, cost the same however many
//!   other slices there are (invariant 8; `budgets::opening_a_warehouse_costs_the_same_however_many_slices`,
//!   `budgets::a_query_on_one_slice_costs_the_same_however_big_the_warehouse_and_its_history`).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{SchemaName, Statement as SQLStatement};
use futures::{StreamExt, TryStreamExt};

use super::{pg_catalog, time_travel, CATALOG_NAME};
use crate::error::{IcePieError, Result};
use crate::slice::SliceContext;
use crate::sql::Planner;
use crate::storage::names::{
    validate_domain, SliceName, CORE_SCHEMA, DEFAULT_DOMAIN, SYSTEM_SCHEMA,
};
use crate::storage::{CORE_DIR, SLICES_DIR};

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
    /// Domains whose folder was seen but not listed yet ([`CatalogState::list_names`]): a slice of
    /// one loads by its name; what lists them all lists them first.
    pub unlisted: BTreeSet<String>,
}

/// State shared by the engine, the catalog and the system tables of one `IcePie`: the slices'
/// context, which it dereferences to, and what only the catalog needs.
#[derive(Debug)]
pub(crate) struct CatalogState {
    /// What slices need (the warehouse, settings, refresh logs, hooks).
    pub slices: Arc<SliceContext>,
    pub listing: RwLock<Listing>,
    /// Tables opened for the time-travel calls of statements being planned.
    pub pins: time_travel::Pins,
    /// What this process knows of every slice.
    pub cards: super::cards::Cards,
}

impl Deref for CatalogState {
    type Target = SliceContext;

    fn deref(&self) -> &SliceContext {
        &self.slices
    }
}

#[async_trait]
impl Planner for CatalogState {
    async fn plan_statement(&self, state: &SessionState, stmt: DFStatement) -> Result<LogicalPlan> {
        time_travel::plan_statement(state, self, stmt).await
    }
}

impl CatalogState {
    /// The state of a warehouse whose slices' context is `slices`; the context plans
    /// definitions through it from then on.
    pub(crate) fn new(slices: Arc<SliceContext>) -> Arc<Self> {
        let state = Arc::new(Self {
            slices,
            listing: RwLock::new(Listing::default()),
            pins: time_travel::Pins::default(),
            cards: super::cards::Cards::default(),
        });
        let planner: std::sync::Weak<dyn Planner> = Arc::downgrade(&state) as _;
        state.slices.set_planner(planner);
        state
    }

    /// Lists the warehouse again: the core, the domains, and each domain's slices, up to
    /// [`LISTING_FANOUT`] domains at a time.
    pub(crate) async fn refresh_listing(&self) -> Result<()> {
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
    pub(crate) async fn list_names(&self) -> Result<()> {
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
    pub(crate) async fn know_schemas(
        &self,
        state: &SessionState,
        stmt: &DFStatement,
    ) -> Result<()> {
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
                || (schema == pg_catalog::PG_CATALOG
                    && pg_catalog::LISTINGS.contains(&reference.table()))
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
    pub(crate) fn has_domain(&self, name: &str) -> bool {
        let listing = self.listing.read().expect("listing lock");
        listing.domains.contains_key(name) || listing.unlisted.contains(name)
    }

    /// The last listing.
    pub(crate) fn listing(&self) -> Listing {
        self.listing.read().expect("listing lock").clone()
    }

    /// Every slice in the last listing.
    pub(crate) fn slice_names(&self) -> Vec<SliceName> {
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
}
