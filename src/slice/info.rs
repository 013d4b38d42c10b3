//! What `system.slices` shows of a slice: its state, version, size, staleness, failures and
//! who is refreshing it, read from the warehouse.

use serde::{Deserialize, Serialize};

use crate::options::IcePieOptions;

use super::*;
use crate::text::sql_type_name;

/// State of a slice (DESIGN §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceState {
    /// Built from the latest versions of its inputs.
    Fresh,
    /// An input has moved on since the version being served.
    Stale,
    /// A build is running in this process.
    Refreshing,
    /// The last build failed; the previous version is served.
    Failed,
    /// Pinned by `FREEZE SLICE`: no refresh until `THAW SLICE`.
    Frozen,
    /// Failed `icepie.max_failures` times in a row: the scheduler leaves it alone until a
    /// `REFRESH SLICE` succeeds or `THAW SLICE`.
    Suspended,
    /// A file of the version served is damaged: queries fail naming it until a `REFRESH
    /// SLICE` or `ROLLBACK SLICE` commits a version without it.
    Quarantined,
    /// A `REFRESH AUTO` slice neither read nor created for `icepie.cold_after`: the scheduler
    /// leaves it alone until its next read.
    Dormant,
}

impl fmt::Display for SliceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fresh => "fresh",
            Self::Stale => "stale",
            Self::Refreshing => "refreshing",
            Self::Failed => "failed",
            Self::Frozen => "frozen",
            Self::Suspended => "suspended",
            Self::Quarantined => "quarantined",
            Self::Dormant => "dormant",
        })
    }
}

/// Everything known about one slice.
#[derive(Debug, Clone)]
pub struct SliceInfo {
    /// The slice.
    pub name: SliceName,
    /// Its descriptor, from the version served.
    pub descriptor: SliceDescriptor,
    /// Version served.
    pub version: i64,
    /// Size of that version.
    pub stats: TableStats,
    /// When that version was committed (ms since the epoch).
    pub refreshed_at: Option<i64>,
    /// When a refresh last ended with nothing to do (its inputs unchanged since that
    /// version), if one did since: `REFRESH EVERY` counts from the later of the two.
    pub checked_at: Option<i64>,
    /// Its state.
    pub state: SliceState,
    /// The error of the last build, if it failed.
    pub last_error: Option<String>,
    /// Failed builds in a row since the version served was committed.
    pub failures: u32,
    /// When the last of them ended (ms since the epoch).
    pub last_failure_at: Option<i64>,
    /// True when an input has a newer version than this version was built from.
    pub stale: bool,
    /// How long ago the oldest input change this version has not consumed was committed (ms).
    pub lag_ms: Option<i64>,
    /// Output columns and their types.
    pub columns: Vec<(String, String)>,
    /// The process (host:pid) holding the slice's scheduler lease: running a scheduled
    /// refresh of it now.
    pub refreshing_by: Option<String>,
    /// Its latest read recorded (ms since the epoch), where the reads were looked up
    /// (`system.slices`, the scheduler).
    pub last_read: Option<i64>,
    /// Queries reading it per day over the last week, where the reads were looked up.
    pub reads_per_day: Option<f64>,
    /// Its Delta table id: a slice dropped and made again under its name has a new one
    /// (`system.refreshes.slice_id` tells whose an attempt was).
    pub slice_id: Option<String>,
}

impl SliceInfo {
    /// Set while the slice is frozen.
    pub fn frozen(&self) -> Option<&Frozen> {
        self.descriptor.frozen.as_ref()
    }
}

/// What inputs are at now, read once for all the slices described together: each input's
/// latest version, and when its versions were committed.
#[derive(Debug, Default)]
pub(crate) struct InputCache {
    latest: std::sync::Mutex<HashMap<String, Option<i64>>>,
    committed: std::sync::Mutex<HashMap<(String, i64), Option<i64>>>,
}

impl InputCache {
    async fn latest(&self, shared: &SliceContext, input: &str) -> Result<Option<i64>> {
        if let Some(v) = self.latest.lock().expect("input cache").get(input) {
            return Ok(*v);
        }
        let v = shared.latest_version(input).await?;
        self.latest
            .lock()
            .expect("input cache")
            .insert(input.to_string(), v);
        Ok(v)
    }

    async fn commit_time(
        &self,
        shared: &SliceContext,
        input: &str,
        version: i64,
    ) -> Result<Option<i64>> {
        let key = (input.to_string(), version);
        if let Some(at) = self.committed.lock().expect("input cache").get(&key) {
            return Ok(*at);
        }
        let at = shared.commit_time(input, version).await?;
        self.committed.lock().expect("input cache").insert(key, at);
        Ok(at)
    }
}

/// Whether an input of a slice version described by `meta` has moved on, and when the oldest
/// input change that version has not consumed was committed (ms since the epoch; `None`
/// when none, or when that commit's time cannot be read).
pub(crate) async fn behind(
    shared: &SliceContext,
    meta: &SliceDescriptor,
    inputs: &InputCache,
) -> Result<(bool, Option<i64>)> {
    let mut stale = false;
    let mut oldest_change: Option<i64> = None;
    for input in meta.inputs.iter().filter(|i| !i.pinned) {
        if inputs.latest(shared, &input.table).await? != Some(input.version) {
            stale = true;
            let next = input.version + 1;
            if let Some(at) = inputs.commit_time(shared, &input.table, next).await? {
                oldest_change = Some(oldest_change.map_or(at, |o: i64| o.min(at)));
            }
        }
    }
    Ok((stale, oldest_change))
}

/// What is known of one slice from the warehouse, whoever reads it and whenever: what
/// [`SliceInfo`] shows but for what depends on the reader (the process refreshing it, the
/// time, reads). Cards are kept, and saved for other processes, by the catalog's view of
/// every slice; [`Card::info`] makes the info a reader sees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Card {
    pub domain: String,
    pub name: String,
    pub descriptor: SliceDescriptor,
    pub version: i64,
    pub files: i64,
    pub rows: i64,
    pub bytes: i64,
    pub refreshed_at: Option<i64>,
    pub checked_at: Option<i64>,
    /// Why a file of the version served is damaged, or the error of the last failed build.
    pub last_error: Option<String>,
    /// Whether a file of the version served is damaged (quarantined).
    pub damaged: bool,
    pub failures: u32,
    pub last_failure_at: Option<i64>,
    pub stale: bool,
    /// When the oldest input change the version served has not consumed was committed.
    pub oldest_change: Option<i64>,
    pub columns: Vec<(String, String)>,
    pub slice_id: Option<String>,
}

impl Card {
    /// Reads the card of slice `name`; `inputs` caches input versions across slices. `None`
    /// when the slice does not exist.
    pub(crate) async fn read(
        shared: &SliceContext,
        name: &SliceName,
        inputs: &InputCache,
    ) -> Result<Option<Self>> {
        let Some(table) = shared
            .warehouse
            .load(&Warehouse::slice_path(name), None)
            .await?
        else {
            return Ok(None);
        };
        let (meta, committed) = meta::latest_meta(&table, &name.to_string()).await?;
        let stats = table_stats(&table)?;
        let attempts = shared.attempts_of(name, &table).await?;
        let since = committed.unwrap_or(0);
        let checked = attempts
            .iter()
            .filter(|a| a.status == refresh_log::NO_CHANGE && a.started_at >= since)
            .map(|a| a.ended_at)
            .max();
        // A refresh that found nothing to do ends the failures before it, as a commit does.
        let failures = refresh_log::failures_since(&attempts, checked.unwrap_or(since));
        let (stale, oldest_change) = behind(shared, &meta, inputs).await?;
        let rel = Warehouse::slice_path(name);
        let damaged = quarantine::in_force(&shared.warehouse, &rel, &table).await?;
        let schema = table.snapshot()?.snapshot().arrow_schema();
        let columns = schema
            .fields()
            .iter()
            .filter(|f| !f.name().starts_with(super::aggregate::HIDDEN))
            .map(|f| (f.name().clone(), sql_type_name(f.data_type())))
            .collect();
        Ok(Some(Self {
            domain: name.domain.clone(),
            name: name.name.clone(),
            descriptor: meta,
            version: table.version().unwrap_or_default() as i64,
            files: stats.files,
            rows: stats.rows,
            bytes: stats.bytes,
            refreshed_at: committed,
            checked_at: checked,
            last_error: match &damaged {
                Some(q) => Some(format!("damaged file {}: {}", q.file, q.problem)),
                None => failures.last.as_ref().and_then(|a| a.error.clone()),
            },
            damaged: damaged.is_some(),
            failures: failures.count,
            last_failure_at: failures.last.as_ref().map(|a| a.ended_at),
            stale,
            oldest_change,
            columns,
            slice_id: crate::storage::table_id(&table),
        }))
    }

    /// The slice the card is of.
    pub(crate) fn slice(&self) -> Option<SliceName> {
        SliceName::new(self.domain.clone(), self.name.clone()).ok()
    }

    /// Works out again whether an input has moved on since the version served (after an
    /// input changed).
    pub(crate) async fn behind(
        &mut self,
        shared: &SliceContext,
        inputs: &InputCache,
    ) -> Result<()> {
        (self.stale, self.oldest_change) = behind(shared, &self.descriptor, inputs).await?;
        Ok(())
    }

    /// The info a reader with settings `options` sees now: refreshing when this process is
    /// refreshing the slice or `holder` holds its lease (see [`lease`]).
    pub(crate) fn info(
        &self,
        shared: &SliceContext,
        options: &IcePieOptions,
        name: SliceName,
        holder: Option<&lease::Holder>,
    ) -> SliceInfo {
        let elsewhere = holder.is_some_and(|h| h.process != running::process());
        let state = if elsewhere
            || shared
                .refreshing
                .lock()
                .expect("refreshing lock")
                .contains(&name)
        {
            SliceState::Refreshing
        } else if self.damaged {
            SliceState::Quarantined
        } else if self.descriptor.frozen.is_some() {
            SliceState::Frozen
        } else if options.max_failures > 0 && self.failures as usize >= options.max_failures {
            SliceState::Suspended
        } else if self.last_failure_at.is_some() {
            SliceState::Failed
        } else if self.stale {
            SliceState::Stale
        } else {
            SliceState::Fresh
        };
        let now = Utc::now().timestamp_millis();
        SliceInfo {
            name,
            descriptor: self.descriptor.clone(),
            version: self.version,
            stats: TableStats {
                files: self.files,
                rows: self.rows,
                bytes: self.bytes,
            },
            refreshed_at: self.refreshed_at,
            checked_at: self.checked_at,
            state,
            last_error: self.last_error.clone(),
            failures: self.failures,
            last_failure_at: self.last_failure_at,
            stale: self.stale,
            lag_ms: self.oldest_change.map(|at| (now - at).max(0)),
            columns: self.columns.clone(),
            refreshing_by: holder.map(|h| h.process.clone()),
            last_read: None,
            reads_per_day: None,
            slice_id: self.slice_id.clone(),
        }
    }
}

/// Reads what `system.slices` shows of one slice; `inputs` caches input versions across
/// slices.
pub(crate) async fn info(
    shared: &SliceContext,
    name: &SliceName,
    inputs: &InputCache,
) -> Result<Option<SliceInfo>> {
    let Some(card) = Card::read(shared, name, inputs).await? else {
        return Ok(None);
    };
    let options = shared.options();
    let holder = lease::holder(&shared.warehouse, name, options.heartbeat.0).await?;
    Ok(Some(card.info(
        shared,
        &options,
        name.clone(),
        holder.as_ref(),
    )))
}
