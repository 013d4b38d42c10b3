//! What an input gained since the version a slice was built from, read from the input's
//! Delta log ([`change`]): the files its commits since then added, or why they did more than
//! add files.

use std::collections::HashSet;
use std::sync::Arc;

use deltalake::kernel::Action;
use futures::StreamExt;
use object_store::path::Path;

use super::Change;
use crate::error::Result;
use crate::slice::meta::InputVersion;
use crate::table::IcePieTable;

/// Commits of one input an incremental refresh reads at most; beyond, a full refresh is
/// cheaper than reading the log.
const MAX_COMMITS: i64 = 1000;

/// The new data of `input` since the version the slice was built from (`before`):
/// `Ok(None)` when it has none, `Err(reason)` when it changed other than by appends.
pub(super) async fn change(
    input: &InputVersion,
    before: &[InputVersion],
    provider: &Arc<IcePieTable>,
) -> Result<std::result::Result<Option<Change>, String>> {
    let name = &input.table;
    let Some(prev) = before.iter().find(|b| b.table == *name && !b.pinned) else {
        return Ok(Err(format!("{name} is new to the definition")));
    };
    match (&prev.id, &input.id) {
        (Some(a), Some(b)) if a == b => {}
        (None, _) => {
            return Ok(Err(format!(
                "the previous version did not record which table {name} was (built before \
                 incremental refresh)"
            )))
        }
        _ => return Ok(Err(format!("{name} was dropped and created again"))),
    }
    let (from, to) = (prev.version, input.version);
    if to == from {
        return Ok(Ok(None));
    }
    if to < from {
        return Ok(Err(format!(
            "{name} is at version {to}, older than the {from} the slice was built from"
        )));
    }
    if to - from > MAX_COMMITS {
        return Ok(Err(format!(
            "{name} has {} commits since version {from}, more than {MAX_COMMITS}",
            to - from
        )));
    }
    let Some(files) = provider.files() else {
        return Ok(Err(format!(
            "{name} is read through delta-rs (partitioned, or with Delta reader features), \
             which cannot read only its new files"
        )));
    };
    let table = provider.delta_table();
    let current = serde_json::to_value(table.snapshot()?.metadata()).unwrap_or_default();
    let log = table.log_store();
    let mut commits = futures::stream::iter(from + 1..=to)
        .map(|v| {
            let log = log.clone();
            async move { (v, log.read_commit_entry(v as u64).await) }
        })
        .buffered(16);
    let mut added: HashSet<Path> = HashSet::new();
    while let Some((version, bytes)) = commits.next().await {
        let bytes = match bytes {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                return Ok(Err(format!(
                    "{name}'s log no longer holds version {version} (log clean-up)"
                )))
            }
            Err(e) => {
                return Ok(Err(format!(
                    "{name}'s version {version} is unreadable: {e}"
                )))
            }
        };
        let actions = match deltalake::logstore::get_actions(version as u64, &bytes) {
            Ok(actions) => actions,
            Err(e) => {
                return Ok(Err(format!(
                    "{name}'s version {version} is unreadable: {e}"
                )))
            }
        };
        for action in actions {
            match action {
                Action::Add(add) if add.data_change => match Path::from_url_path(&add.path) {
                    Ok(path) => {
                        added.insert(path);
                    }
                    Err(_) => {
                        return Ok(Err(format!(
                            "{name} version {version} adds a file icepie cannot name ({})",
                            add.path
                        )))
                    }
                },
                Action::Remove(_) => {
                    return Ok(Err(format!(
                        "{name} changed other than by appends: version {version} removed files"
                    )))
                }
                // FREEZE and THAW of an input slice rewrite its properties only.
                Action::Metadata(m) if same_layout(&m, &current) => {}
                Action::Metadata(_) => {
                    return Ok(Err(format!(
                        "{name}'s schema or partitioning changed in version {version}"
                    )))
                }
                _ => {}
            }
        }
    }
    // The snapshot's files are the table root joined with the log's relative paths.
    let root = Path::from_url_path(table.table_url().path()).unwrap_or_default();
    let is_new = |location: &Path| {
        location
            .prefix_match(&root)
            .is_some_and(|rel| added.contains(&Path::from_iter(rel)))
    };
    let found = files
        .iter()
        .filter(|f| is_new(&f.object_meta.location))
        .count();
    if found != added.len() {
        return Ok(Err(format!(
            "{name}'s log names files its version {to} does not hold"
        )));
    }
    let new_files = provider.only_files(|f| is_new(&f.object_meta.location))?;
    let old_files = provider.only_files(|f| !is_new(&f.object_meta.location))?;
    let (Some(new_files), Some(old_files)) = (new_files, old_files) else {
        return Ok(Err(format!("{name} cannot be read by file")));
    };
    Ok(Ok(Some(Change {
        new_files: Arc::new(new_files),
        old_files: Arc::new(old_files),
    })))
}

/// True when the metadata action `m` keeps the schema and partitioning of `current` (a
/// Delta `metaData` as JSON).
fn same_layout(m: &deltalake::kernel::Metadata, current: &serde_json::Value) -> bool {
    let m = serde_json::to_value(m).unwrap_or_default();
    ["schemaString", "partitionColumns"]
        .iter()
        .all(|key| m.get(key).is_some() && m.get(key) == current.get(key))
}
