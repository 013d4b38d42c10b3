//! [`IcePie`]'s typed methods on slices: those that change them (create, refresh, joining a
//! refresh not yet started and retrying lost races, freeze, thaw, alter, rollback, vacuum,
//! drops, proposals applied or dismissed) and those that read them (`slices`, `slice`,
//! `history`, `verify`, `proposals`).

use super::*;
use crate::catalog::cards::Purpose;
use crate::catalog::proposals::{self, Proposal};
use crate::slice::clustering::ClusterBy;
use crate::slice::meta::Built;
use crate::sql::RefreshPolicy;
use deltalake::DeltaTable;

impl IcePie {
    pub(super) fn lock(&self, name: &SliceName) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .locks
            .lock()
            .expect("locks")
            .entry(name.clone())
            .or_default()
            .clone()
    }

    /// Builds a version of `name` on the build pool ([`background`]), at a lower priority
    /// than queries.
    async fn build_in_background(
        &self,
        name: &SliceName,
        spec: &SliceSpec,
        kind: CommitKind,
        existing: Option<&DeltaTable>,
        previous: Option<Previous>,
    ) -> Result<BuildOutcome> {
        let state = self.inner.ctx.state();
        let shared = self.inner.shared.clone();
        let (name, spec, existing) = (name.clone(), spec.clone(), existing.cloned());
        // The statement's progress, if it has one, goes with the build to the pool.
        let progress = progress::current();
        background::run(async move {
            // Boxed: a build's future is large, and the pool's threads have ordinary stacks.
            let request = slice::BuildRequest {
                context: &shared,
                name: &name,
                spec: &spec,
                kind,
                existing: existing.as_ref(),
                previous: previous.as_ref(),
            };
            let build = Box::pin(slice::build(&state, request));
            match progress {
                Some(p) => progress::scope(p, build).await,
                None => build.await,
            }
        })
        .await
    }

    pub(super) async fn create_slice(&self, c: &CreateSlice) -> Result<Option<BuildOutcome>> {
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
            refresh: c.refresh.clone(),
            partition_by: c.partition_by.clone(),
            refresh_mode: c.refresh_mode,
            cluster_by: c.cluster_by.clone(),
            created_at: None,
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
                (None, _, _) => {
                    // What a dropped slice left is no slice: it goes, and the new one is made.
                    let rel = Warehouse::slice_path(&c.name);
                    shared.warehouse.clear_remains(&rel).await?;
                    CommitKind::Create
                }
            };
        let out = self
            .build_in_background(&c.name, &spec, kind, existing.as_ref(), None)
            .await;
        out.map(Some)
    }

    /// Builds and commits the next version of slice `name` (`domain.name` or `name`) from its
    /// definition, with every input pinned at its current version. On failure nothing is
    /// committed and the slice keeps serving its last version. When the inputs are the very
    /// versions the current version was built from, nothing is committed either: the outcome
    /// is that version, with [`BuildOutcome::unchanged`] set (use
    /// [`refresh_full`](Self::refresh_full) to rebuild it all the same).
    ///
    /// The version returned is always built from inputs at least as new as those current when
    /// this was called. Requests for a slice whose refresh is waiting for its turn join that
    /// refresh and share its outcome; once a refresh has begun reading its inputs, a new
    /// request queues one more refresh behind it instead of returning a version built from
    /// older data.
    pub async fn refresh(&self, name: &str) -> Result<BuildOutcome> {
        let name = SliceName::parse(name)?;
        self.refresh_slice(name, false).await
    }

    /// Like [`refresh`](Self::refresh), but recomputes the slice from all of its inputs even
    /// when it could refresh incrementally (`REFRESH SLICE name FULL`). It never joins a
    /// pending refresh, which may be incremental.
    pub async fn refresh_full(&self, name: &str) -> Result<BuildOutcome> {
        let name = SliceName::parse(name)?;
        self.refresh_slice(name, true).await
    }

    /// What `REFRESH SLICE name` would do now, without doing it (`EXPLAIN REFRESH SLICE`):
    /// the mode, why, and what it would read of each input.
    pub async fn explain_refresh(&self, name: &str) -> Result<Built> {
        let name = SliceName::parse(name)?;
        let shared = &self.inner.shared;
        let (table, meta, previous) = lifecycle::load_previous(shared, &name, false).await?;
        if let Some(frozen) = &meta.frozen {
            return Err(frozen_error(&name, frozen, "REFRESH SLICE"));
        }
        let state = self.inner.ctx.state();
        let spec = SliceSpec::from(&meta);
        let request = slice::BuildRequest {
            context: shared,
            name: &name,
            spec: &spec,
            kind: CommitKind::Refresh,
            existing: Some(&table),
            previous: Some(&previous),
        };
        slice::explain(&state, request).await
    }

    pub(super) async fn refresh_slice(&self, name: SliceName, full: bool) -> Result<BuildOutcome> {
        if full {
            return self.refresh_now(&name, &AtomicBool::new(false), true).await;
        }
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
                    let fut: SharedFuture<RefreshFuture> = async move {
                        this.refresh_now(&slice, &flag, false)
                            .await
                            .map_err(Arc::new)
                    }
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
    /// (`by_another_writer`); otherwise it builds again on top of the winner, deciding anew
    /// between full and incremental from the winner's recorded inputs. Only a change of
    /// definition, a freeze or a drop in between fails it, with an error saying which.
    /// `full` is `REFRESH SLICE … FULL`.
    async fn refresh_now(
        &self,
        name: &SliceName,
        started: &AtomicBool,
        full: bool,
    ) -> Result<BuildOutcome> {
        let shared = &self.inner.shared;
        let lock = self.lock(name);
        let _guard = lock.lock().await;
        let _no_drop = self.inner.core_drop.read().await;
        let mut races = 0;
        loop {
            let (table, meta, previous) = lifecycle::load_previous(shared, name, full).await?;
            // From here on the build reads its inputs: later requests must not join it.
            started.store(true, Ordering::SeqCst);
            if let Some(frozen) = &meta.frozen {
                return Err(frozen_error(name, frozen, "REFRESH SLICE"));
            }
            let result = self
                .build_in_background(
                    name,
                    &SliceSpec::from(&meta),
                    CommitKind::Refresh,
                    Some(&table),
                    Some(previous),
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

    /// `ALTER SLICE name SET [REFRESH policy] [CLUSTER BY layout]`: changes how the slice is
    /// refreshed or laid out from its next refresh on, keeping its data.
    pub async fn alter(
        &self,
        name: &str,
        refresh: Option<RefreshPolicy>,
        cluster_by: Option<ClusterBy>,
    ) -> Result<LifecycleOutcome> {
        let name = SliceName::parse(name)?;
        let lock = self.lock(&name);
        let _guard = lock.lock().await;
        retrying(|| {
            lifecycle::alter(
                &self.inner.shared,
                &name,
                refresh.as_ref(),
                cluster_by.as_ref(),
            )
        })
        .await
    }

    /// What icepie proposes now (`system.proposals`), dismissed proposals left out.
    pub async fn proposals(&self) -> Result<Vec<Proposal>> {
        proposals::list(&self.inner.shared).await
    }

    /// `APPLY PROPOSAL n`: runs proposal `n`'s statement, as it stands now.
    pub(super) async fn apply_proposal(&self, n: i64) -> Result<DataFrame> {
        let proposal = proposals::find(&self.inner.shared, n).await?;
        if let Some(Statement::CreateSlice(c)) = parse_sql(&proposal.statement)?.pop() {
            let out = self.create_slice(&c).await?;
            return output::builds(&self.inner.ctx, out);
        }
        let out = self.run_proposal(&proposal).await?;
        self.lifecycle_result(out).await
    }

    /// Runs `proposal`'s statement when it is an `ALTER SLICE` or a `FREEZE SLICE` (the kinds
    /// `icepie.auto_apply` may name).
    pub(crate) async fn run_proposal(&self, proposal: &Proposal) -> Result<LifecycleOutcome> {
        match parse_sql(&proposal.statement)?.pop() {
            Some(Statement::AlterSlice {
                name,
                refresh,
                cluster_by,
            }) => self.alter(&name.to_string(), refresh, cluster_by).await,
            Some(Statement::FreezeSlice { name, reason }) => {
                self.freeze(&name.to_string(), reason).await
            }
            _ => Err(IcePieError::NotAllowed(format!(
                "proposal {} is not applied automatically; APPLY PROPOSAL {} runs it: {}",
                proposal.id, proposal.id, proposal.statement
            ))),
        }
    }

    /// `DISMISS PROPOSAL n`: hides proposal `n` from `system.proposals` from now on.
    pub async fn dismiss_proposal(&self, n: i64) -> Result<Proposal> {
        proposals::dismiss(&self.inner.shared, n).await
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
        let shared = &self.inner.shared;
        Ok(shared.cards.infos(shared, Purpose::Show).await?.0)
    }

    /// One slice's state, version, size, lineage and definition.
    pub async fn slice(&self, name: &str) -> Result<SliceInfo> {
        let name = SliceName::parse(name)?;
        let shared = &self.inner.shared;
        slice::info(shared, &name, &InputCache::default())
            .await?
            .ok_or_else(|| IcePieError::SliceNotFound(name.to_string()))
    }

    pub(super) async fn drop_slice(&self, name: &SliceName, if_exists: bool) -> Result<bool> {
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

    pub(super) async fn drop_core_table(&self, name: &str, if_exists: bool) -> Result<bool> {
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
}
