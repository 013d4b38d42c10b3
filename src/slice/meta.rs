//! What icepie records in a slice's Delta log.
//!
//! Every commit icepie makes to a slice carries, in its `commitInfo` under the key `icepie`, the
//! slice's whole descriptor: definition, owner, refresh policy, partitioning, and the exact input
//! versions that commit was built from. The descriptor in force is therefore the one of the
//! latest commit, a slice's lineage is in its Delta history, and `CREATE OR REPLACE SLICE`
//! swaps definition and data in one commit. The table's `configuration` holds only what never
//! changes: that it is an icepie slice, its name and when it was created.

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use deltalake::DeltaTable;

use crate::error::{IcePieError, Result};

/// Key of icepie's entry in `commitInfo`.
pub const COMMIT_KEY: &str = "icepie";

/// One input of a slice version: a table and the version that was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub struct InputVersion {
    /// `core.name` or `domain.name`.
    pub table: String,
    /// The Delta version read.
    pub version: i64,
}

/// Formats inputs as `core.orders@3, finance.revenue@7`.
pub fn format_inputs(inputs: &[InputVersion]) -> String {
    inputs
        .iter()
        .map(|i| format!("{}@{}", i.table, i.version))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The descriptor of a slice as recorded with each of its commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceMeta {
    /// What made this commit: `create`, `refresh` or `replace`.
    pub kind: String,
    /// The refresh attempt that made it (matches `system.refreshes.attempt_id`).
    pub attempt_id: String,
    /// The defining query.
    pub definition: String,
    /// Owning team.
    pub owner: Option<String>,
    /// Refresh policy, in its SQL text form.
    pub refresh: String,
    /// Partition columns.
    pub partition_by: Vec<String>,
    /// Input versions this commit was built from.
    pub inputs: Vec<InputVersion>,
}

/// The descriptor and commit time (ms since the epoch) of the table's loaded version.
pub async fn latest_meta(table: &DeltaTable, name: &str) -> Result<(SliceMeta, Option<i64>)> {
    let corrupt = |reason: String| IcePieError::CorruptMetadata {
        what: format!("slice '{name}'"),
        reason,
    };
    let mut history = table.history(Some(1));
    let info = history
        .next()
        .await
        .ok_or_else(|| corrupt("its Delta log has no commit".into()))??;
    let value = info
        .info
        .get(COMMIT_KEY)
        .ok_or_else(|| corrupt("its latest commit was not made by icepie".into()))?;
    let meta = serde_json::from_value(value.clone())
        .map_err(|e| corrupt(format!("unreadable descriptor: {e}")))?;
    Ok((meta, info.timestamp))
}
