//! The SQL catalog `icepie`: schema `core` (the frozen core), one schema per slice domain
//! (`slices` by default), `system`, and `pg_catalog` (what PostgreSQL clients list tables
//! with).
//!
//! Tables are looked up in the warehouse each time a query is planned, so a query always sees
//! the latest committed version of each table, including those another process committed; the
//! lists of names come from the listing kept in [`CatalogState`].
//!
//! Users may also `CREATE SCHEMA` scratch schemas held in memory by this process; the core,
//! slice domains and `system` refuse plain `CREATE TABLE`/`DROP TABLE` with an error that names
//! the icepie statement to use.

pub(crate) mod cards;
pub(crate) mod pg_catalog;
pub(crate) mod proposals;
mod pushdown;
pub(crate) mod state;
pub(crate) mod system;
pub(crate) mod time_travel;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, SchemaProvider, TableProvider};
use datafusion::error::{DataFusionError, Result as DFResult};

use crate::error::IcePieError;
use crate::storage::names::{validate_name, SliceName, CORE_SCHEMA, DEFAULT_DOMAIN, SYSTEM_SCHEMA};
use state::CatalogState;

/// Name of the catalog icepie registers (and makes the default).
pub(crate) const CATALOG_NAME: &str = "icepie";

pub(crate) fn df(e: IcePieError) -> DataFusionError {
    e.into()
}

/// The `icepie` catalog.
#[derive(Debug)]
pub(crate) struct IcePieCatalog {
    shared: Arc<CatalogState>,
    scratch: RwLock<HashMap<String, Arc<dyn SchemaProvider>>>,
    /// Schema `pg_catalog`, set once the session that lists the catalogs exists.
    pg_catalog: OnceLock<Arc<dyn SchemaProvider>>,
}

impl IcePieCatalog {
    pub(crate) fn new(shared: Arc<CatalogState>) -> Self {
        Self {
            shared,
            scratch: RwLock::new(HashMap::new()),
            pg_catalog: OnceLock::new(),
        }
    }

    /// Gives the catalog its schema `pg_catalog`, which lists the tables of `catalogs` (the
    /// session's catalogs, this one among them).
    pub(crate) fn set_pg_catalog(
        &self,
        catalogs: &Arc<dyn datafusion::catalog::CatalogProviderList>,
    ) -> DFResult<()> {
        let _ = self
            .pg_catalog
            .set(pg_catalog::schema(catalogs, self.shared.clone())?);
        Ok(())
    }
}

impl IcePieCatalog {
    /// True when `name` is a scratch schema of this session.
    pub(crate) fn is_scratch(&self, name: &str) -> bool {
        self.scratch
            .read()
            .expect("scratch lock")
            .contains_key(name)
    }
}

impl CatalogProvider for IcePieCatalog {
    fn schema_names(&self) -> Vec<String> {
        let mut names = vec![
            CORE_SCHEMA.to_string(),
            SYSTEM_SCHEMA.to_string(),
            pg_catalog::PG_CATALOG.to_string(),
        ];
        let listing = self.shared.listing();
        names.extend(listing.domains.keys().cloned());
        names.extend(listing.unlisted.iter().cloned());
        if !listing.domains.contains_key(DEFAULT_DOMAIN)
            && !listing.unlisted.contains(DEFAULT_DOMAIN)
        {
            names.push(DEFAULT_DOMAIN.to_string());
        }
        names.extend(self.scratch.read().expect("scratch lock").keys().cloned());
        names.sort();
        names
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        match name {
            CORE_SCHEMA => Some(Arc::new(CoreSchema(self.shared.clone()))),
            SYSTEM_SCHEMA => Some(Arc::new(system::SystemSchema::new(self.shared.clone()))),
            pg_catalog::PG_CATALOG => self.pg_catalog.get().cloned(),
            _ => {
                // A domain in the warehouse wins over a scratch schema of the same name that
                // this session made before another process created the domain: the
                // warehouse is the source of truth.
                let is_domain = name == DEFAULT_DOMAIN || self.shared.has_domain(name);
                if !is_domain {
                    // A domain exists once it holds a slice (the default one always does).
                    return self
                        .scratch
                        .read()
                        .expect("scratch lock")
                        .get(name)
                        .cloned();
                }
                Some(Arc::new(DomainSchema {
                    shared: self.shared.clone(),
                    domain: name.to_string(),
                }))
            }
        }
    }

    fn register_schema(
        &self,
        name: &str,
        schema: Arc<dyn SchemaProvider>,
    ) -> DFResult<Option<Arc<dyn SchemaProvider>>> {
        if [
            CORE_SCHEMA,
            SYSTEM_SCHEMA,
            DEFAULT_DOMAIN,
            pg_catalog::PG_CATALOG,
        ]
        .contains(&name)
            || self.shared.has_domain(name)
        {
            return Err(df(IcePieError::ReadOnly(format!(
                "schema '{name}' belongs to icepie; scratch schemas need another name"
            ))));
        }
        Ok(self
            .scratch
            .write()
            .expect("scratch lock")
            .insert(name.to_string(), schema))
    }

    fn deregister_schema(
        &self,
        name: &str,
        _cascade: bool,
    ) -> DFResult<Option<Arc<dyn SchemaProvider>>> {
        match self.scratch.write().expect("scratch lock").remove(name) {
            Some(s) => Ok(Some(s)),
            None => Err(df(IcePieError::ReadOnly(format!(
                "schema '{name}' is not a scratch schema; drop slices with DROP SLICE"
            )))),
        }
    }
}

/// Schema `core`.
#[derive(Debug)]
struct CoreSchema(Arc<CatalogState>);

#[async_trait]
impl SchemaProvider for CoreSchema {
    fn table_names(&self) -> Vec<String> {
        self.0.listing().core
    }

    async fn table(&self, name: &str) -> DFResult<Option<Arc<dyn TableProvider>>> {
        if validate_name(name).is_err() {
            return Ok(None);
        }
        Ok(self
            .0
            .load_core(name)
            .await
            .map_err(df)?
            .map(|t| Arc::new(t) as _))
    }

    fn register_table(
        &self,
        name: String,
        _table: Arc<dyn TableProvider>,
    ) -> DFResult<Option<Arc<dyn TableProvider>>> {
        Err(df(IcePieError::ReadOnly(format!(
            "core tables are created with CREATE CORE TABLE {name} (...) [FROM 'files' | AS query], \
             and filled with INGEST INTO {name}"
        ))))
    }

    fn deregister_table(&self, name: &str) -> DFResult<Option<Arc<dyn TableProvider>>> {
        Err(df(IcePieError::ReadOnly(format!(
            "core tables are dropped with DROP CORE TABLE {name}"
        ))))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.0.listing().core.iter().any(|n| n == name)
    }
}

/// One slice domain.
#[derive(Debug)]
struct DomainSchema {
    shared: Arc<CatalogState>,
    domain: String,
}

#[async_trait]
impl SchemaProvider for DomainSchema {
    fn table_names(&self) -> Vec<String> {
        self.shared
            .listing()
            .domains
            .get(&self.domain)
            .cloned()
            .unwrap_or_default()
    }

    async fn table(&self, name: &str) -> DFResult<Option<Arc<dyn TableProvider>>> {
        let Ok(slice) = SliceName::new(self.domain.clone(), name) else {
            return Ok(None);
        };
        Ok(self
            .shared
            .load_slice(&slice, None)
            .await
            .map_err(df)?
            .map(|t| Arc::new(t) as _))
    }

    fn register_table(
        &self,
        name: String,
        _table: Arc<dyn TableProvider>,
    ) -> DFResult<Option<Arc<dyn TableProvider>>> {
        Err(df(IcePieError::ReadOnly(format!(
            "schema '{d}' holds slices: create one with CREATE SLICE {d}.{name} AS SELECT ...; \
             for a scratch table, CREATE SCHEMA scratch and CREATE TABLE scratch.{name} ...",
            d = self.domain
        ))))
    }

    fn deregister_table(&self, name: &str) -> DFResult<Option<Arc<dyn TableProvider>>> {
        Err(df(IcePieError::ReadOnly(format!(
            "slices are dropped with DROP SLICE {}.{name}",
            self.domain
        ))))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.table_names().iter().any(|n| n == name)
    }
}
