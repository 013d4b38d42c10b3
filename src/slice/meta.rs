//! What icepie records in a slice's Delta log.
//!
//! Every commit icepie makes to a slice carries, in its `commitInfo` under the key `icepie`, the
//! slice's whole descriptor: definition, owner, refresh policy, partitioning, the exact input
//! versions that commit's data was built from, and whether the slice is frozen. The descriptor
//! in force is therefore the one of the latest commit, a slice's lineage and lifecycle are its
//! Delta history, and `CREATE OR REPLACE SLICE` swaps definition and data in one commit. The
//! table's `configuration` holds only what never changes: that it is an icepie slice, its name
//! and when it was created.
//!
//! # Invariants
//!
//! - Each version records the exact version of every input its data was built from, and a
//!   build reads each input at one version fixed when it plans (invariant 4): the checker of
//!   `crash::a_killed_process_leaves_whole_versions_and_a_working_warehouse` recomputes each
//!   slice from the input versions it records, and
//!   `crash::the_checker_sees_a_partial_load_and_a_slice_that_does_not_match_its_inputs`
//!   proves that it sees a slice that does not match them.

use std::fmt;

use deltalake::kernel::{Action, CommitInfo};
use deltalake::DeltaTable;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

pub(crate) use crate::sql::RefreshMode;

use super::clustering::{ClusterBy, Clustered};

use crate::error::{IcePieError, Result};
use crate::sql::RefreshPolicy;

/// Key of icepie's entry in `commitInfo`.
pub(crate) const COMMIT_KEY: &str = "icepie";

/// One input of a slice version: a table and the version that was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub struct InputVersion {
    /// `core.name` or `domain.name`.
    pub table: String,
    /// The Delta version read.
    pub version: i64,
    /// True when the definition names this version itself (`core_at`, `slice_at`): newer
    /// versions of the table do not make the slice stale.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// The Delta table id (`metaData.id`) of the table read: a table dropped and created
    /// again under the same name has a new one, so an incremental refresh never mistakes its
    /// versions for the old table's. `None` in descriptors written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Formats inputs as `core.orders@3, finance.revenue@7, core.rates@2 (pinned)`.
pub(crate) fn format_inputs(inputs: &[InputVersion]) -> String {
    inputs
        .iter()
        .map(|i| {
            let pinned = if i.pinned { " (pinned)" } else { "" };
            format!("{}@{}{pinned}", i.table, i.version)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What made a commit of a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitKind {
    /// The first version (`CREATE SLICE`).
    Create,
    /// A new version from the same definition (`REFRESH SLICE`, or the scheduler).
    Refresh,
    /// A new definition and its data (`CREATE OR REPLACE SLICE`).
    Replace,
    /// The data and definition of an earlier version (`ROLLBACK SLICE`).
    Rollback,
    /// Pinned: no refresh until thawed (`FREEZE SLICE`); the data is unchanged.
    Freeze,
    /// Unpinned (`THAW SLICE`); the data is unchanged.
    Thaw,
    /// A new refresh policy or layout (`ALTER SLICE`); the data is unchanged.
    Alter,
}

impl fmt::Display for CommitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Create => "create",
            Self::Refresh => "refresh",
            Self::Replace => "replace",
            Self::Rollback => "rollback",
            Self::Freeze => "freeze",
            Self::Thaw => "thaw",
            Self::Alter => "alter",
        })
    }
}

/// A refresh policy as the descriptor stores it: its SQL text form, as `SHOW SLICES` shows it.
mod policy_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::sql::RefreshPolicy;

    pub(super) fn serialize<S: Serializer>(p: &RefreshPolicy, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(p)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<RefreshPolicy, D::Error> {
        let text = String::deserialize(d)?;
        RefreshPolicy::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// How one version's data was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildMode {
    /// From all of the inputs: the version replaces every file of the previous one.
    Full,
    /// From the inputs' new data only, added to the previous version.
    Incremental,
}

impl fmt::Display for BuildMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
        })
    }
}

/// What a build read of one input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRead {
    /// `core.name` or `domain.name`.
    pub table: String,
    /// The version the previous data was built from (incremental builds only): the build
    /// read what came after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<i64>,
    /// The version read up to.
    pub to: i64,
    /// Data files read.
    pub files: i64,
    /// Rows in those files.
    pub rows: i64,
    /// Bytes of those files.
    pub bytes: i64,
}

/// Formats reads as `core.orders@3..5: 2 files, 1000 rows, 40.0 KiB`.
pub(crate) fn format_reads(reads: &[InputRead]) -> String {
    reads
        .iter()
        .map(|r| {
            let range = match r.from {
                Some(from) => format!("{from}..{}", r.to),
                None => r.to.to_string(),
            };
            format!(
                "{}@{range}: {} files, {} rows, {}",
                r.table,
                r.files,
                r.rows,
                crate::text::human_bytes(u64::try_from(r.bytes).unwrap_or_default())
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// How a version was built: the mode, why, and what it read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Built {
    /// Full or incremental.
    pub mode: BuildMode,
    /// Why this mode (for a full build, what prevented an incremental one).
    pub reason: String,
    /// What was read of each input.
    pub reads: Vec<InputRead>,
    /// True when the commit only added the new rows to the previous version's (an
    /// incremental refresh of a filter, projection, union or join); false when it wrote the
    /// whole version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub appended: bool,
}

/// Why and since when a slice is frozen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frozen {
    /// The reason given to `FREEZE SLICE`, if any.
    pub reason: Option<String>,
    /// When it was frozen (ms since the epoch).
    pub since: i64,
}

/// The descriptor of a slice as recorded with each of its commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceDescriptor {
    /// What made this commit.
    pub kind: CommitKind,
    /// The refresh attempt that made it (matches `system.refreshes.attempt_id`).
    pub attempt_id: String,
    /// The defining query.
    pub definition: String,
    /// Owning team.
    pub owner: Option<String>,
    /// Refresh policy (stored in its SQL text form, e.g. `every '5 minutes'`).
    #[serde(with = "policy_text")]
    pub refresh: RefreshPolicy,
    /// Partition columns.
    pub partition_by: Vec<String>,
    /// How refreshes run (`INCREMENTAL`, `FULL` or `AUTO`).
    #[serde(default)]
    pub refresh_mode: RefreshMode,
    /// Input versions this commit's data was built from.
    pub inputs: Vec<InputVersion>,
    /// Set while the slice is frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<Frozen>,
    /// Rows of this version, for commits that write no data (freeze, thaw, rollback); a
    /// data commit's rows are in Delta's own `operationMetrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<i64>,
    /// The version a rollback restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<i64>,
    /// How this commit's data was built (commits that build data: create, refresh, replace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built: Option<Built>,
    /// Incremental refreshes in a row, up to this commit, that added files to the slice.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub appends: u32,
    /// How full builds order the rows (`CLUSTER BY`); slices created before it read `none`.
    #[serde(default)]
    pub cluster_by: ClusterBy,
    /// The layout of this version's data, when a build of this version of icepie wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clustered: Option<Clustered>,
    /// When the slice was created or last replaced (ms since the epoch), for slices this
    /// version of icepie created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<i64>,
    /// When this commit's build began planning (ms since the epoch; builds only): with the
    /// commit's own timestamp, how long the build took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_started_at: Option<i64>,
    /// The measured costs of the builds before this one from the same definition, which an
    /// `AUTO` slice's refresh predicts both modes from.
    #[serde(default, skip_serializing_if = "BuildCosts::is_empty")]
    pub costs: BuildCosts,
}

/// What one build cost: the bytes its plan read (as `Built::reads` counts them) and the time
/// from planning to its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildCost {
    /// Bytes of the files the build read.
    pub bytes: i64,
    /// Milliseconds from planning to commit.
    pub ms: i64,
}

/// The costs of a slice's latest builds by mode, oldest first, at most
/// [`BuildCosts::KEPT`] of each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildCosts {
    /// Full builds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub full: Vec<BuildCost>,
    /// Incremental builds that read new data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incremental: Vec<BuildCost>,
}

impl BuildCosts {
    /// Builds kept per mode: the latest ones, so that what is predicted follows what the
    /// slice costs now.
    pub const KEPT: usize = 8;

    /// True when no build was measured.
    pub fn is_empty(&self) -> bool {
        self.full.is_empty() && self.incremental.is_empty()
    }

    /// Adds the cost of a `mode` build, dropping the oldest beyond [`Self::KEPT`].
    pub(crate) fn push(&mut self, mode: BuildMode, cost: BuildCost) {
        let kept = match mode {
            BuildMode::Full => &mut self.full,
            BuildMode::Incremental => &mut self.incremental,
        };
        kept.push(cost);
        if kept.len() > Self::KEPT {
            kept.remove(0);
        }
    }
}

impl SliceDescriptor {
    /// Moves this commit's own build (mode, bytes read, and the time from
    /// `build_started_at` to `committed_at`, the commit's timestamp) into `costs`, so that a
    /// descriptor written after it carries it. A build that read nothing (no new data), or
    /// whose commit time is unknown (another writer's commit followed it), is not counted.
    pub(crate) fn count_own_build(&mut self, committed_at: Option<i64>) {
        let started = self.build_started_at.take();
        let (Some(started), Some(committed), Some(built)) = (started, committed_at, &self.built)
        else {
            return;
        };
        let bytes: i64 = built.reads.iter().map(|r| r.bytes).sum();
        if bytes > 0 && committed >= started {
            self.costs.push(
                built.mode,
                BuildCost {
                    bytes,
                    ms: committed - started,
                },
            );
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One commit of a slice's Delta log, as `SHOW SLICE HISTORY` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// The Delta version.
    pub version: i64,
    /// When it was committed (ms since the epoch).
    pub committed_at: Option<i64>,
    /// Its descriptor; `None` for a commit icepie did not make.
    pub descriptor: Option<SliceDescriptor>,
    /// The Delta operation (`WRITE`, `RESTORE`, ...), for commits icepie did not make.
    pub operation: Option<String>,
    /// Rows of that version, when known.
    pub rows: Option<i64>,
}

impl HistoryEntry {
    /// `create`, `refresh`, ... or, for a foreign commit, its Delta operation in lower case.
    pub fn kind(&self) -> String {
        match (&self.descriptor, &self.operation) {
            (Some(m), _) => m.kind.to_string(),
            (None, Some(op)) => op.to_lowercase(),
            (None, None) => "unknown".into(),
        }
    }
}

fn corrupt(name: &str, reason: String) -> IcePieError {
    IcePieError::CorruptMetadata {
        what: format!("slice '{name}'"),
        reason,
    }
}

/// The `commitInfo` of one commit file's content (of `version`).
fn parse_commit_info(version: u64, bytes: &bytes::Bytes) -> Result<Option<CommitInfo>> {
    Ok(deltalake::logstore::get_actions(version, bytes)?
        .into_iter()
        .find_map(|action| match action {
            Action::CommitInfo(info) => Some(info),
            _ => None,
        }))
}

/// The `commitInfo` of `version` of `table`, `None` when that commit file is gone.
pub(crate) async fn commit_info(table: &DeltaTable, version: i64) -> Result<Option<CommitInfo>> {
    let Ok(version) = u64::try_from(version) else {
        return Ok(None);
    };
    match table.log_store().read_commit_entry(version).await? {
        Some(bytes) => parse_commit_info(version, &bytes),
        None => Ok(None),
    }
}

/// The descriptor of one commit, `None` when icepie did not make it.
pub(crate) fn descriptor(info: &CommitInfo, name: &str) -> Result<Option<SliceDescriptor>> {
    info.info
        .get(COMMIT_KEY)
        .map(|v| {
            serde_json::from_value(v.clone())
                .map_err(|e| corrupt(name, format!("unreadable descriptor: {e}")))
        })
        .transpose()
}

/// Rows of the version a commit made: from its descriptor for commits that write no data,
/// from Delta's `operationMetrics` otherwise.
pub(crate) fn commit_rows(info: &CommitInfo, meta: Option<&SliceDescriptor>) -> Option<i64> {
    meta.and_then(|m| m.rows).or_else(|| {
        info.info
            .get("operationMetrics")
            .and_then(|m| m.get("num_added_rows"))
            .and_then(serde_json::Value::as_i64)
    })
}

/// How far back [`latest_meta`] looks past commits icepie did not make.
const FOREIGN_COMMITS_SKIPPED: i64 = 100;

/// The descriptor in force and the time (ms since the epoch) of the table's loaded version.
///
/// Another Delta writer may have committed to the slice since (an `OPTIMIZE` by Spark, say):
/// the descriptor is then the one of the latest commit icepie made.
pub(crate) async fn latest_meta(
    table: &DeltaTable,
    name: &str,
) -> Result<(SliceDescriptor, Option<i64>)> {
    let (meta, committed_at, _) = latest_meta_at(table, name).await?;
    Ok((meta, committed_at))
}

/// [`latest_meta`], with the version whose commit holds the descriptor: older than the
/// table's when commits icepie did not make follow it.
pub(crate) async fn latest_meta_at(
    table: &DeltaTable,
    name: &str,
) -> Result<(SliceDescriptor, Option<i64>, i64)> {
    let latest = table
        .version()
        .ok_or_else(|| corrupt(name, "its Delta log has no commit".into()))?
        as i64;
    let mut committed_at = None;
    for version in (0..=latest).rev().take(FOREIGN_COMMITS_SKIPPED as usize) {
        let Some(info) = commit_info(table, version).await? else {
            break;
        };
        if version == latest {
            committed_at = info.timestamp;
        }
        if let Some(meta) = descriptor(&info, name)? {
            return Ok((meta, committed_at, version));
        }
    }
    Err(corrupt(
        name,
        format!("none of its latest commits (up to version {latest}) was made by icepie"),
    ))
}

/// True when the data of `table`'s version `version` was built by icepie: that commit, and
/// any it leaves the data of unchanged (a freeze, a thaw) or restores (a rollback), back to
/// the build that wrote the data, are all icepie's. Only then does the version hold what its
/// descriptor's definition gives over its recorded inputs.
pub(crate) async fn data_is_ours(table: &DeltaTable, name: &str, version: i64) -> Result<bool> {
    let mut version = version;
    for _ in 0..FOREIGN_COMMITS_SKIPPED {
        let Some(info) = commit_info(table, version).await? else {
            return Ok(false);
        };
        let Some(meta) = descriptor(&info, name)? else {
            return Ok(false);
        };
        version = match (meta.kind, meta.restored_from) {
            (CommitKind::Freeze | CommitKind::Thaw | CommitKind::Alter, _) => version - 1,
            (CommitKind::Rollback, Some(target)) => target,
            (CommitKind::Rollback, None) => return Ok(false),
            (CommitKind::Create | CommitKind::Refresh | CommitKind::Replace, _) => return Ok(true),
        };
    }
    Ok(false)
}

/// Every commit of the slice still in its Delta log, newest first.
pub(crate) async fn history(table: &DeltaTable, name: &str) -> Result<Vec<HistoryEntry>> {
    let latest = table.version().unwrap_or_default() as i64;
    let mut out: Vec<HistoryEntry> = Vec::new();
    // One GET per commit, 16 at a time.
    let mut infos = futures::stream::iter((0..=latest).rev())
        .map(|version| async move { (version, commit_info(table, version).await) })
        .buffered(16);
    while let Some((version, info)) = infos.next().await {
        // Log clean-up (VACUUM's, or another engine's) removes the oldest commit files
        // first: stop at the first gap.
        let Some(info) = info? else {
            break;
        };
        let meta = descriptor(&info, name)?;
        let rows = commit_rows(&info, meta.as_ref());
        out.push(HistoryEntry {
            version,
            committed_at: info.timestamp,
            operation: info.operation.clone(),
            descriptor: meta,
            rows,
        });
    }
    // An appending commit's metrics count the rows it added: its version holds those and
    // the previous version's.
    let mut before: Option<i64> = None;
    for entry in out.iter_mut().rev() {
        if entry
            .descriptor
            .as_ref()
            .and_then(|m| m.built.as_ref())
            .is_some_and(|b| b.appended)
        {
            entry.rows = before.zip(entry.rows).map(|(b, added)| b + added);
        }
        before = entry.rows;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_written_before_freeze_existed_still_read() {
        let old = serde_json::json!({
            "kind": "refresh", "attempt_id": "a", "definition": "SELECT 1", "owner": null,
            "refresh": "manual", "partition_by": [], "inputs": [{"table": "core.t", "version": 2}]
        });
        let meta: SliceDescriptor = serde_json::from_value(old).unwrap();
        assert_eq!(meta.kind, CommitKind::Refresh);
        assert_eq!(meta.frozen, None);
        assert_eq!(format_inputs(&meta.inputs), "core.t@2");
    }

    #[test]
    fn commit_info_is_found_on_any_line() {
        let file = String::from(
            "{\"add\":{\"path\":\"x\",\"partitionValues\":{},\"size\":1,\
             \"modificationTime\":1,\"dataChange\":true}}\n{\"commitInfo\":{\"timestamp\":7,\"operation\":\"WRITE\",\
             \"icepie\":{\"kind\":\"freeze\"}}}\n",
        );
        let info = parse_commit_info(3, &bytes::Bytes::from(file))
            .unwrap()
            .unwrap();
        assert_eq!(info.timestamp, Some(7));
        assert_eq!(info.info["icepie"]["kind"], "freeze");
    }
}
