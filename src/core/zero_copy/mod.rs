//! Zero-copy loads: Parquet files that already have the table's schema are copied into it as
//! they are and committed with their statistics, instead of being decoded and written again.
//!
//! A file qualifies when its Arrow schema, read from its Parquet schema as a Delta reader reads
//! it (embedded Arrow metadata ignored), is the table's: the same column names in the same
//! order, the same types (time unit and zone included), and no nulls where the table allows
//! none (a column the file declares required may go into a nullable one). A load copies only
//! when every file qualifies; otherwise all of them take the rewriting path, which casts.
//! A new table made from files qualifies when the files agree and need no table feature.
//!
//! Nothing unread enters the core: each copy (the bytes that will be committed, not the
//! landing file, which may change meanwhile) is decoded in full before the commit. That proves
//! it readable (pages, compression, UTF-8) and gives its exact statistics, so no writer's
//! footer statistics are trusted. Copies keep their own row groups. A load is one commit; a
//! load that fails takes its copies back.

mod read;
mod stats;

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::execution::SessionState;
use deltalake::kernel::engine::arrow_conversion::{TryFromArrow, TryIntoArrow};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TableReference};
use deltalake::kernel::{Action, Add, StructType};
use deltalake::operations::create::CreateBuilder;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::{DeltaTable, DeltaTableError};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;

use super::{listing_extension, CoreContext};
use crate::error::{IcePieError, Result};
use crate::sql::{DataSource, FileFormat};
use crate::storage::copy::Landing;
use crate::storage::tracked::TakeBack;
use crate::storage::{WriteBase, NO_EXPIRED_LOG_CLEANUP};
use read::StoreFile;
use stats::{stats_json, Totals};

/// Files copied, or footers read, at once.
const COPIES: usize = 4;

/// Files that can be copied in as they are, and the schema of the table they go into.
pub(super) struct ZeroCopy {
    /// The location as the statement gave it.
    location: String,
    files: Vec<Landing>,
    schema: SchemaRef,
}

impl ZeroCopy {
    /// What is wrong with `file`, said of the location the statement gave (naming the file
    /// when the location names more than one).
    fn bad(&self, file: &Landing, problem: &str) -> IcePieError {
        bad_file(&self.location, self.files.len(), file, problem)
    }
}

fn bad_file(location: &str, files: usize, file: &Landing, problem: &str) -> IcePieError {
    IcePieError::BadLocation {
        location: location.to_string(),
        reason: match files {
            1 => problem.to_string(),
            _ => format!("{}: {problem}", file.url()),
        },
    }
}

/// The files of `source` when all of them can be copied as they are into a table of schema
/// `target`, or, when `create`, into a new table of the schema `target` declares (the files'
/// own when `None`); `None` when the load must rewrite them. A file that is not Parquet at all
/// is an error.
pub(super) async fn plan(
    state: &SessionState,
    source: &DataSource,
    target: Option<&Schema>,
    create: bool,
) -> Result<Option<ZeroCopy>> {
    let DataSource::Files { location, format } = source else {
        return Ok(None);
    };
    let format = format.or_else(|| FileFormat::from_location(location));
    if format != Some(FileFormat::Parquet) {
        return Ok(None);
    }
    // Anything amiss with the location itself is for the rewriting path to report.
    let Ok(url) = ListingTableUrl::parse(location) else {
        return Ok(None);
    };
    let Ok(store) = state.runtime_env().object_store(url.object_store()) else {
        return Ok(None);
    };
    let Ok(store_url) = url::Url::parse(url.object_store().as_str()) else {
        return Ok(None);
    };
    let ext = listing_extension(location, FileFormat::Parquet);
    let Ok(listed) = url.list_all_files(state, store.as_ref(), ext).await else {
        return Ok(None);
    };
    let Ok(mut listed) = listed.try_collect::<Vec<_>>().await else {
        return Ok(None);
    };
    if listed.is_empty() {
        return Ok(None);
    }
    listed.sort_by(|a, b| a.location.cmp(&b.location));
    let files: Vec<Landing> = listed
        .into_iter()
        .map(|meta| Landing {
            store: store.clone(),
            store_url: store_url.clone(),
            path: meta.location,
            size: meta.size,
        })
        .collect();
    let footers: Vec<_> = files
        .iter()
        .map(|file| {
            let (at, count) = (landed(file), files.len());
            async move {
                let footer = at.footer().await.map_err(|reason| {
                    let problem = format!("not a readable Parquet file: {reason}");
                    bad_file(location, count, file, &problem)
                })?;
                Ok::<_, IcePieError>(footer.schema().clone())
            }
        })
        .collect();
    let schemas: Vec<SchemaRef> = futures::stream::iter(footers)
        .buffered(COPIES)
        .try_collect()
        .await?;
    let schema = match (target, create) {
        (Some(target), false) => Arc::new(target.clone()),
        (None, false) => return Ok(None),
        (declared, true) => match delta_schema(declared.unwrap_or(&schemas[0])) {
            Some(schema) => schema,
            None => return Ok(None),
        },
    };
    if !schemas.iter().all(|s| fits(s, &schema)) {
        return Ok(None);
    }
    Ok(Some(ZeroCopy {
        location: location.clone(),
        files,
        schema,
    }))
}

/// True when files can be added to `table` with no more than an `add` action: a writer
/// protocol of at most version 2 (append-only and NOT NULL, which [`fits`] keeps). Later ones
/// (CHECK constraints, generated or identity columns, row tracking, …) want work from the
/// writer that the rewriting path's delta-rs does.
pub(super) fn appendable(table: &DeltaTable) -> bool {
    let Ok(state) = table.snapshot() else {
        return false;
    };
    // Read through serde: delta-rs keeps these accessors internal.
    let protocol = serde_json::to_value(state.protocol()).unwrap_or_default();
    protocol
        .get("minWriterVersion")
        .and_then(|v| v.as_i64())
        .is_some_and(|v| v <= 2)
}

/// The Arrow schema of a new Delta table of columns `schema`, when it needs no table feature
/// (timestamps without zone or in nanoseconds do).
fn delta_schema(schema: &Schema) -> Option<SchemaRef> {
    let needs_feature = schema.fields().iter().any(|f| {
        matches!(
            f.data_type(),
            DataType::Timestamp(_, None) | DataType::Timestamp(TimeUnit::Nanosecond, _)
        )
    });
    if needs_feature {
        return None;
    }
    let delta = StructType::try_from_arrow(schema).ok()?;
    let back: Schema = (&delta).try_into_arrow().ok()?;
    Some(Arc::new(back))
}

/// True when a file of schema `file` can be read as a table of schema `table` as it is.
fn fits(file: &Schema, table: &Schema) -> bool {
    file.fields().len() == table.fields().len()
        && file.fields().iter().zip(table.fields()).all(|(f, t)| {
            f.name() == t.name()
                && f.data_type() == t.data_type()
                && (t.is_nullable() || !f.is_nullable())
        })
}

/// The landing file, to read.
fn landed(file: &Landing) -> StoreFile {
    StoreFile {
        store: file.store.clone(),
        path: file.path.clone(),
        size: file.size,
    }
}

/// Copies the files of `load` into the table `base` writes, reads each copy in full, and
/// commits them (creating the table when `base` has no snapshot) in one commit, whose
/// `icepie` metadata `what` gains `copied`: the files copied.
pub(super) async fn load(
    ctx: &CoreContext<'_>,
    rel: &str,
    base: WriteBase,
    load: ZeroCopy,
    mut what: serde_json::Value,
) -> Result<DeltaTable> {
    // The commit says its files were copied as they were, and from where.
    what["copied"] = load.files.iter().map(Landing::url).collect();
    let tracked = base.tracked.clone();
    let guard = TakeBack::new(base.tracked.clone());
    let adds = match copy_and_read(&base, &load).await {
        Ok(adds) => adds,
        Err(e) => {
            guard.finish(&Err::<(), ()>(())).await;
            return Err(e);
        }
    };
    let properties = CommitProperties::default().with_metadata([("icepie".to_string(), what)]);
    let actions: Vec<Action> = adds.into_iter().map(Action::Add).collect();
    let result = match &base.snapshot {
        Some(snapshot) => commit(&base, snapshot, actions, properties).await,
        None => create(&base, &load.schema, actions, properties).await,
    };
    guard.finish(&result).await;
    ctx.warehouse.landed(rel, &tracked, result).await
}

async fn commit(
    base: &WriteBase,
    snapshot: &deltalake::kernel::EagerSnapshot,
    actions: Vec<Action>,
    properties: CommitProperties,
) -> std::result::Result<DeltaTable, DeltaTableError> {
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: None,
        predicate: None,
    };
    let finalized = CommitBuilder::from(properties)
        .with_actions(actions)
        .build(
            Some(snapshot as &dyn TableReference),
            base.log_store.clone(),
            operation,
        )
        .await?;
    let mut table = DeltaTable::new(base.log_store.clone());
    table.state = Some(finalized.snapshot);
    Ok(table)
}

async fn create(
    base: &WriteBase,
    schema: &Schema,
    actions: Vec<Action>,
    properties: CommitProperties,
) -> std::result::Result<DeltaTable, DeltaTableError> {
    let columns = StructType::try_from_arrow(schema)?;
    CreateBuilder::new()
        .with_log_store(base.log_store.clone())
        .with_columns(columns.fields().cloned())
        .with_save_mode(SaveMode::ErrorIfExists)
        .with_configuration([("delta.appendOnly", Some("true")), NO_EXPIRED_LOG_CLEANUP])
        .with_actions(actions)
        .with_commit_properties(properties)
        .await
}

/// Copies every file in, then reads every copy, a row group per task (as many at once as
/// there are cores), into `add` actions.
async fn copy_and_read(base: &WriteBase, load: &ZeroCopy) -> Result<Vec<Add>> {
    let names: Vec<String> = (0..load.files.len())
        .map(|i| format!("part-{i:05}-{}-c000.parquet", uuid::Uuid::new_v4()))
        .collect();
    let copies: Vec<_> = load
        .files
        .iter()
        .zip(&names)
        .map(|(file, name)| base.copy_in(file, name))
        .collect();
    // Every copy ends before the load does, failed or not, so that taking back the copies
    // finds each one that was made.
    let copied: Vec<Result<u64>> = futures::stream::iter(copies)
        .buffered(COPIES)
        .collect()
        .await;
    let sizes = copied.into_iter().collect::<Result<Vec<u64>>>()?;
    let store = base.table_store();
    let copied: Vec<StoreFile> = names
        .iter()
        .zip(&sizes)
        .map(|(name, size)| StoreFile {
            store: store.clone(),
            path: Path::from(name.as_str()),
            size: *size,
        })
        .collect();
    let mut units = Vec::new();
    for (index, (copy, file)) in copied.iter().zip(&load.files).enumerate() {
        let footer = copy
            .footer()
            .await
            .map_err(|reason| load.bad(file, &format!("not a readable Parquet file: {reason}")))?;
        if !fits(footer.schema(), &load.schema) {
            return Err(load.bad(
                file,
                "the file changed while it was being loaded; load it again",
            ));
        }
        for row_group in 0..footer.metadata().num_row_groups() {
            let (copy, footer) = (copy.clone(), footer.clone());
            let unreadable = move |reason: String| {
                load.bad(file, &format!("not a readable Parquet file: {reason}"))
            };
            // Spawned when polled, so that at most `parallel` row groups are in memory.
            units.push(async move {
                let totals = tokio::spawn(copy.read_row_group(footer, row_group))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
                    .map_err(unreadable)?;
                Ok::<_, IcePieError>((index, totals))
            });
        }
    }
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let read: Vec<(usize, Totals)> = futures::stream::iter(units)
        .buffer_unordered(parallel)
        .try_collect()
        .await?;
    let mut per_file: Vec<Option<Totals>> = vec![None; names.len()];
    for (index, totals) in read {
        per_file[index] = Some(match per_file[index].take() {
            Some(sum) => sum.merge(totals),
            None => totals,
        });
    }
    let now = chrono::Utc::now().timestamp_millis();
    Ok(names
        .into_iter()
        .zip(sizes)
        .zip(per_file)
        .map(|((path, size), totals)| {
            let totals = totals.unwrap_or_else(|| Totals::empty(&load.schema));
            Add {
                path,
                size: size as i64,
                partition_values: Default::default(),
                modification_time: now,
                data_change: true,
                stats: Some(stats_json(&load.schema, &totals)),
                tags: None,
                deletion_vector: None,
                base_row_id: None,
                default_row_commit_version: None,
                clustering_provider: None,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::Field;

    #[test]
    fn a_file_fits_a_table_of_its_schema_or_one_allowing_more_nulls() {
        let table = Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Utf8, false),
        ]);
        let stricter = Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Utf8, false),
        ]);
        assert!(fits(&stricter, &table));
        let looser = Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Utf8, true),
        ]);
        assert!(!fits(&looser, &table));
        let other_type = Schema::new(vec![
            Field::new("a", DataType::Int32, true),
            Field::new("b", DataType::Utf8, false),
        ]);
        assert!(!fits(&other_type, &table));
        let other_order = Schema::new(vec![
            Field::new("b", DataType::Utf8, false),
            Field::new("a", DataType::Int64, true),
        ]);
        assert!(!fits(&other_order, &table));
    }
}
