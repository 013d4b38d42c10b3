//! [`IcePieBuilder`]: how a warehouse is opened.

use super::*;

/// Options for opening a warehouse.
#[derive(Debug, Clone)]
pub struct IcePieBuilder {
    location: String,
    store: Option<Arc<dyn ObjectStore>>,
    storage_options: HashMap<String, String>,
    settings: Vec<(String, String)>,
    clock: Option<crate::usage::Clock>,
}

impl IcePieBuilder {
    pub(super) fn new(location: String) -> Self {
        Self {
            location,
            store: None,
            storage_options: HashMap::new(),
            settings: Vec::new(),
            clock: None,
        }
    }

    /// The clock this process judges time by, in milliseconds since the Unix epoch: when a
    /// read happened, whether a slice is unread or dormant, what to propose, and which
    /// refreshes are due. The system's by default; tests and simulations move it forward
    /// instead of waiting. Commits, refresh markers and leases are dated by storage as always.
    pub fn with_clock(mut self, clock: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.clock = Some(crate::usage::Clock::new(clock));
        self
    }

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
            )
            // DataFusion 55's dynamic filter for MIN/MAX aggregates prunes rows that another
            // aggregate of the same node still needs (`min(substr(g, 1, 1)), max(v)` returns
            // a wrong min, apache/datafusion#24816, fixed after 55): a wrong answer is worse
            // than a slower one. `core_tables::min_and_max_side_by_side_are_right` guards it.
            .set_bool(
                "datafusion.optimizer.enable_aggregate_dynamic_filter_pushdown",
                false,
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
        let usage = crate::usage::Usage::start(
            warehouse.store(),
            options.usage_retention.0,
            self.clock.unwrap_or_else(crate::usage::Clock::system),
        );
        let planner = usage_planner::UsagePlanner {
            inner: DeltaPlanner::new(),
            usage: usage.clone(),
        };
        let state = SessionStateBuilder::new()
            .with_default_features()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_query_planner(Arc::new(planner))
            .with_physical_optimizer_rule(Arc::new(yield_points::YieldAfterJoins))
            .with_type_planner(crate::catalog::pg_catalog::type_planner())
            .build();
        let ctx = SessionContext::new_with_state(state);
        let shared = CatalogState::new(Arc::new(crate::slice::SliceContext::new(
            warehouse,
            options,
            usage.clone(),
        )));
        let catalog = Arc::new(IcePieCatalog::new(shared.clone()));
        ctx.register_catalog(CATALOG_NAME, catalog.clone());
        catalog.set_pg_catalog(ctx.state_ref().read().catalog_list())?;
        crate::catalog::pg_catalog::install(&ctx)?;
        for (name, function) in PinnedFunction::all(&shared) {
            ctx.register_udtf(name, function);
        }
        // The names of the core and the domains, for queries planned through `context()`
        // directly; icepie's own statements renew what they need.
        shared.list_names().await?;
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
            usage,
        });
        let weak = Arc::downgrade(&inner);
        inner
            .shared
            .set_refresher(crate::slice::Refresher(Box::new(move |name| {
                let weak = weak.clone();
                Box::pin(async move {
                    let inner = weak
                        .upgrade()
                        .ok_or_else(|| IcePieError::Server("the warehouse was closed".into()))?;
                    IcePie { inner }
                        .refresh_slice(name, false)
                        .await
                        .map(|_| ())
                })
            })));
        let handle = scheduler::spawn(Arc::downgrade(&inner));
        *inner.scheduler.lock().expect("scheduler lock") = Some(handle);
        Ok(IcePie { inner })
    }
}
