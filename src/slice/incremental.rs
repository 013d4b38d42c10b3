//! Incremental refresh: a refresh that reads only what its inputs gained since the version
//! the slice was last built from, and adds its result to the slice.
//!
//! The core is append-only and every slice version records the exact input versions (and
//! Delta table ids) it was built from ([`super::meta`]). When the inputs' commits since then
//! only added files, the new data of each input is exactly those files, and for a definition
//! made of filters, projections, `UNION ALL` and inner joins the new rows of the result are
//! the definition evaluated over them (the classic delta rules):
//!
//! - Δ(scan of a changed input) = a scan of its new files only; Δ(unchanged) = nothing;
//! - Δ(filter, projection, alias of X) = the same node over ΔX;
//! - Δ(X UNION ALL Y) = ΔX UNION ALL ΔY;
//! - Δ(X ⋈ Y) = ΔX ⋈ Y_new + X_old ⋈ ΔY, where X_old scans the files X had before.
//!
//! Each term is a copy of the definition's plan with some scans swapped, so the whole
//! increment is one `UNION ALL` of terms, planned and streamed by DataFusion like any query,
//! and committed as one Delta append with the new input versions. A `GROUP BY` on top merges
//! the new rows' aggregate states into those the slice keeps ([`super::aggregate`]): in a
//! slice of several files only those of the groups the new rows fall in, which then replace
//! those groups' rows (replaceWhere on the hidden keys), else all of them, rewriting the
//! slice. Partitioned by its group keys, it recomputes and replaces only the partitions the
//! new rows fall in ([`super::partitions`]). Any other node over a changed input (windows,
//! sorts, limits, DISTINCT, HAVING, outer joins, subqueries), anything whose result may
//! change between runs (`now()`, `random()`, LIMIT, window functions), or inputs that changed other than by appends (a
//! rewritten or re-created table, a schema change, a log gap) make a full refresh, and the
//! reason is recorded with the version.
//!
//! # Invariants
//!
//! - An incremental refresh commits exactly what a full refresh from the same input versions
//!   would (invariant 9; tests `incremental::incremental_equals_full_over_random_appends`,
//!   `differential::incremental_equals_full_on_random_definitions`).
//! - It never changes the slice's columns: an incremental plan whose columns differ (names,
//!   Delta types, nullability) from a full build's or the stored version's makes a full build
//!   (`tests::an_incremental_write_never_changes_the_slices_columns`).
//! - A GROUP BY recomputed by group or partition is refreshed in full when a table read by a
//!   subquery beside its input changed
//!   (`incremental::a_subquery_above_a_recomputed_group_by_refreshes_in_full`).
//! - It commits only on top of the version whose inputs it extended: a concurrent commit makes
//!   it a conflict, like any build.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, DFSchemaRef};
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{
    EmptyRelation, Expr, JoinType, LogicalPlan, LogicalPlanBuilder, TableScan, Volatility,
};
use deltalake::kernel::Action;
use deltalake::DeltaTable;
use futures::StreamExt;
use object_store::path::Path;

use super::meta::{BuildMode, Built, CommitKind, InputRead, InputVersion, RefreshMode, SliceMeta};
use super::{aggregate, partitions, SliceSpec};
use crate::catalog::table::{IcePieTable, TableKind};
use crate::error::Result;

/// Commits of one input an incremental refresh reads at most; beyond, a full refresh is
/// cheaper than reading the log.
const MAX_COMMITS: i64 = 1000;

/// What a build writes and why.
pub(crate) struct Decision {
    /// The plan whose rows the build writes.
    pub plan: LogicalPlan,
    /// Incremental refreshes in a row that added files, this one included.
    pub appends: u32,
    /// The partitions the rows replace (a partitioned GROUP BY recomputed where new data fell);
    /// `None` when they replace the whole version or are appended.
    pub replace: Option<Expr>,
    /// Mode, reason and reads, recorded with the version.
    pub built: Built,
    /// Nothing to build: the inputs are those the current version was built from.
    pub unchanged: bool,
}

/// The version a build starts from.
#[derive(Debug, Clone)]
pub(crate) struct Previous {
    /// Its descriptor, when the slice's latest commit is icepie's; `None` when a commit
    /// icepie did not make follows it.
    pub meta: Option<SliceMeta>,
    /// `REFRESH SLICE … FULL`: recompute from all of the inputs.
    pub full: bool,
    /// The damaged file of a quarantined slice: only a full build rewrites it.
    pub damaged: Option<String>,
}

/// Incremental refreshes that added files, in a row, after which a refresh is full: each
/// adds files, and many small files slow every query of the slice. Replacements of an
/// aggregate's groups count too; the one that would reach this merges and rewrites the slice
/// whole instead.
pub(crate) const MAX_APPENDS: u32 = 16;

/// The new data of one changed input.
struct Change {
    /// Scans only the files added since the previous version.
    new_files: Arc<IcePieTable>,
    /// Scans only the files it had at the previous version.
    old_files: Arc<IcePieTable>,
}

/// `decision`, an incremental one for `plan` on top of the stored version `existing`, or a
/// full build when the columns it would write are not exactly those a full build writes
/// (names, Delta types, nullability) or those the slice stores: an incremental write must
/// never change the slice's schema.
pub(crate) fn keep_columns(
    decision: Decision,
    spec: &SliceSpec,
    plan: &LogicalPlan,
    existing: Option<&DeltaTable>,
) -> Result<Decision> {
    // Nothing is written when nothing changed (an empty relation of the table's columns).
    if decision.built.mode == BuildMode::Full
        || matches!(decision.plan, LogicalPlan::EmptyRelation(_))
    {
        return Ok(decision);
    }
    let full_plan = full_plan(spec, plan)?;
    let written = decision.plan.schema().as_arrow();
    let mut why = columns_differ(
        written,
        full_plan.schema().as_arrow(),
        "a full refresh writes",
    );
    if let (None, Some(table)) = (&why, existing) {
        let stored = table.snapshot()?.snapshot().arrow_schema();
        why = columns_differ(written, &stored, "the slice stores");
    }
    Ok(match why {
        Some(why) => full(
            full_plan,
            format!("an incremental write would change the slice's columns: {why}"),
        ),
        None => decision,
    })
}

/// What a full build of `plan` writes: a GROUP BY definition keeps its aggregates' states,
/// so later refreshes can merge into them, unless it is declared FULL or partitioned (its
/// partitions are rewritten whole).
fn full_plan(spec: &SliceSpec, plan: &LogicalPlan) -> Result<LogicalPlan> {
    Ok(match stateful_shape(spec, plan) {
        Ok(Some(shape)) => shape.plan(None, vec![shape.input.clone()])?,
        _ => plan.clone(),
    })
}

/// The aggregate shape whose states a slice of `spec` keeps (see [`full_plan`]).
fn stateful_shape<'a>(
    spec: &SliceSpec,
    plan: &'a LogicalPlan,
) -> std::result::Result<Option<aggregate::Shape<'a>>, String> {
    match spec.refresh_mode == RefreshMode::Full || !spec.partition_by.is_empty() {
        true => Ok(None),
        false => aggregate::shape(plan),
    }
}

/// How the columns `written` differ from `expected` (which `label` names) as Delta records
/// them (normalized as Delta's writer does): names, Delta types, nullability; `None` when
/// they are the same. Delta stores no string views, unsigned integers or timestamps in
/// seconds, so those differ from their Delta type only in Arrow.
fn columns_differ(
    written: &datafusion::arrow::datatypes::Schema,
    expected: &datafusion::arrow::datatypes::Schema,
    label: &str,
) -> Option<String> {
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
    use deltalake::kernel::schema::cast::normalize_for_delta;
    use deltalake::kernel::StructField;
    // As the writer normalizes them (seconds and nanoseconds to microseconds, ...).
    let written = normalize_for_delta(&Arc::new(written.clone()));
    let expected = normalize_for_delta(&Arc::new(expected.clone()));
    let delta =
        |f: &datafusion::arrow::datatypes::Field| TryIntoKernel::<StructField>::try_into_kernel(f);
    let shown = |f: &StructField| match f.is_nullable() {
        true => f.data_type().to_string(),
        false => format!("{} NOT NULL", f.data_type()),
    };
    if written.fields().len() != expected.fields().len() {
        return Some(format!(
            "{} columns, where {label} {}",
            written.fields().len(),
            expected.fields().len()
        ));
    }
    for field in written.fields() {
        let Ok(other) = expected.field_with_name(field.name()) else {
            return Some(format!(
                "column '{}', which is not among those {label}",
                field.name()
            ));
        };
        let differs = match (delta(field), delta(other)) {
            (Ok(mine), Ok(theirs)) => (mine.data_type() != theirs.data_type()
                || mine.is_nullable() != theirs.is_nullable())
            .then(|| (shown(&mine), shown(&theirs))),
            // A type Delta has no name for: the Arrow types must be the very same.
            _ => (field.data_type() != other.data_type()
                || field.is_nullable() != other.is_nullable())
            .then(|| (field.to_string(), other.to_string())),
        };
        if let Some((mine, theirs)) = differs {
            return Some(format!(
                "column '{}' as {mine}, where {label} {theirs}",
                field.name(),
            ));
        }
    }
    None
}

/// Decides how to build `plan` (the definition over `inputs` at their latest versions) on top
/// of `previous` (the slice's current version, `existing`), and returns the plan to write
/// (whose columns [`keep_columns`] checks).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn decide(
    state: &SessionState,
    name: &str,
    spec: &SliceSpec,
    kind: CommitKind,
    previous: Option<&Previous>,
    existing: Option<&DeltaTable>,
    plan: LogicalPlan,
    inputs: &[InputVersion],
    max_share: f64,
) -> Result<Decision> {
    let shape = stateful_shape(spec, &plan);
    let full_plan = full_plan(spec, &plan)?;
    let reason = match (kind, previous) {
        (CommitKind::Replace, _) => Some("a new definition".into()),
        (CommitKind::Create, _) | (_, None) => Some("the first version".into()),
        _ if spec.refresh_mode == RefreshMode::Full => Some("the slice is declared FULL".into()),
        (_, Some(p)) if p.full => Some("REFRESH SLICE … FULL asked for it".into()),
        (
            _,
            Some(Previous {
                damaged: Some(file),
                ..
            }),
        ) => Some(format!(
            "the slice is quarantined (damaged file {file}): a full build rewrites it"
        )),
        (_, Some(Previous { meta: Some(m), .. })) if m.appends >= MAX_APPENDS => Some(format!(
            "{} incremental refreshes in a row added files: a full build compacts them",
            m.appends
        )),
        (_, Some(Previous { meta: None, .. })) => {
            Some("a commit icepie did not make follows the slice's last build".into())
        }
        (_, Some(Previous { meta: Some(m), .. }))
            if m.definition != spec.definition || m.partition_by != spec.partition_by =>
        {
            Some("the definition changed".into())
        }
        _ => None,
    };
    if let Some(reason) = reason {
        return Ok(full(full_plan, reason));
    }
    let previous_meta = previous
        .and_then(|p| p.meta.as_ref())
        .expect("checked above");
    let (before, appends_before) = (&previous_meta.inputs, previous_meta.appends);
    if let Err(why) = deterministic(&plan) {
        return Ok(full(full_plan, why));
    }
    // A version the SQL names is read whole each time: it must be the very one read before.
    for input in inputs.iter().filter(|i| i.pinned) {
        if !before.contains(input) || input.id.is_none() {
            let why = format!(
                "{}@{} (pinned) was not read before",
                input.table, input.version
            );
            return Ok(full(full_plan, why));
        }
    }
    let providers = providers(&plan)?;
    let mut changes: HashMap<String, Change> = HashMap::new();
    for input in inputs.iter().filter(|i| !i.pinned) {
        let Some(provider) = providers.get(&input.table) else {
            continue;
        };
        match change(input, before, provider).await? {
            Ok(Some(c)) => {
                let (_, _, new_bytes) = c.new_files.read_size();
                let (_, _, all_bytes) = provider.read_size();
                let share = if all_bytes == 0 {
                    1.0
                } else {
                    new_bytes as f64 / all_bytes as f64
                };
                if spec.refresh_mode == RefreshMode::Auto && share > max_share {
                    let why = format!(
                        "the new data of {} is {:.0}% of it, more than \
                         icepie.incremental_max_share ({:.0}%)",
                        input.table,
                        share * 100.0,
                        max_share * 100.0
                    );
                    return Ok(full(full_plan, why));
                }
                changes.insert(input.table.clone(), c);
            }
            Ok(None) => {}
            Err(why) => return Ok(full(full_plan, why)),
        }
    }
    let mut names: Vec<&str> = changes.keys().map(String::as_str).collect();
    names.sort_unstable();
    let names = names.join(", ");
    let from = |mut reads: Vec<InputRead>| {
        for read in reads.iter_mut().filter(|r| changes.contains_key(&r.table)) {
            read.from = before
                .iter()
                .find(|b| b.table == read.table && !b.pinned)
                .map(|b| b.version);
        }
        reads
    };
    if changes.is_empty() {
        // Nothing to read: the next version is the same data, committed at once.
        // Nothing is written: the table's own columns, whatever a build would write now.
        let schema = match existing {
            Some(table) => Arc::new(DFSchema::try_from(
                table.snapshot()?.snapshot().arrow_schema().as_ref().clone(),
            )?),
            None => full_plan.schema().clone(),
        };
        return Ok(Decision {
            unchanged: false,
            plan: empty(&schema),
            appends: appends_before,
            replace: None,
            built: Built {
                mode: BuildMode::Incremental,
                reason: "no input changed since the previous version".into(),
                reads: Vec::new(),
                appended: true,
            },
        });
    }
    if !spec.partition_by.is_empty() {
        match partitions::partitioned(&plan, &spec.partition_by) {
            // A linear definition appends to its partitions.
            Ok(None) => {}
            Err(why) => {
                let why = format!("the slice is partitioned, but {why}");
                return Ok(full(full_plan, why));
            }
            Ok(Some(parted)) => {
                if let Some(table) = read_beside(&plan, &changes)? {
                    let why = format!("the slice is partitioned, but {}", beside(&table));
                    return Ok(full(full_plan, why));
                }
                let delta = match delta_terms(&parted.aggregate.input, &changes) {
                    Ok(terms) => terms,
                    Err(why) => return Ok(full(full_plan, why)),
                };
                let Some(touched) = parted.touched(state, delta).await? else {
                    let why = format!(
                        "the new data falls in more than {} partitions",
                        partitions::MAX_PARTITIONS
                    );
                    return Ok(full(full_plan, why));
                };
                let (recompute, replace) = parted.recompute(&plan, &touched)?;
                return Ok(Decision {
                    unchanged: false,
                    built: Built {
                        mode: BuildMode::Incremental,
                        reason: format!(
                            "only appends since the previous version ({names}); the {} \
                             partition(s) they fall in were recomputed",
                            touched.len()
                        ),
                        reads: from(reads(std::slice::from_ref(&recompute))?),
                        appended: false,
                    },
                    plan: recompute,
                    appends: 0,
                    replace: Some(replace),
                });
            }
        }
    }
    let (definition, shape) = match shape {
        Ok(Some(shape)) => (shape.input, Some(shape)),
        Ok(None) => (&plan, None),
        Err(why) => {
            let why = format!("the definition has an aggregate that keeps no state ({why})");
            // Its groups can still be recomputed one by one when they are all shown.
            let (Some(existing), Ok(Some(grouped))) = (existing, partitions::grouped(&plan)) else {
                return Ok(full(full_plan, why));
            };
            if let Some(table) = read_beside(&plan, &changes)? {
                return Ok(full(full_plan, format!("{why}, and {}", beside(&table))));
            }
            let delta = match delta_terms(&grouped.aggregate.input, &changes) {
                Ok(terms) => terms,
                Err(why) => return Ok(full(full_plan, why)),
            };
            let Some(touched) = grouped.touched(state, delta).await? else {
                let why = format!(
                    "the new data falls in more than {} groups",
                    partitions::MAX_PARTITIONS
                );
                return Ok(full(full_plan, why));
            };
            let stored =
                IcePieTable::try_new(TableKind::Slice, name.to_string(), existing.clone()).await?;
            let stored =
                LogicalPlanBuilder::scan(name, provider_as_source(Arc::new(stored)), None)?
                    .build()?;
            let rebuilt = grouped.rebuild(&plan, stored, &touched)?;
            return Ok(Decision {
                unchanged: false,
                built: Built {
                    mode: BuildMode::Incremental,
                    reason: format!(
                        "only appends since the previous version ({names}); the {} group(s) \
                         they fall in were recomputed",
                        touched.len()
                    ),
                    reads: from(reads(std::slice::from_ref(&rebuilt))?),
                    appended: false,
                },
                plan: rebuilt,
                appends: 0,
                replace: None,
            });
        }
    };
    let terms = match delta_terms(definition, &changes) {
        Ok(terms) => terms,
        Err(why) => return Ok(full(full_plan, why)),
    };
    let Some(shape) = shape else {
        let delta = union_all(terms, definition.schema())?;
        return Ok(Decision {
            unchanged: false,
            built: Built {
                mode: BuildMode::Incremental,
                reason: format!("only appends since the previous version ({names})"),
                reads: from(reads(std::slice::from_ref(&delta))?),
                appended: true,
            },
            plan: delta,
            appends: appends_before + 1,
            replace: None,
        });
    };
    // An aggregate: the stored states of every group, merged with those of the new rows.
    let Some(existing) = existing.filter(|t| {
        t.snapshot()
            .is_ok_and(|s| aggregate::holds_states(&shape, s.snapshot().arrow_schema().as_ref()))
    }) else {
        let why = "the previous version keeps no aggregate states (built before incremental \
                   refresh, or while declared FULL)";
        return Ok(full(full_plan, why.into()));
    };
    let stored = IcePieTable::with_hidden_columns(name.to_string(), existing.clone()).await?;
    let stored =
        LogicalPlanBuilder::scan(name, provider_as_source(Arc::new(stored)), None)?.build()?;
    // The groups the new rows fall in: only their stored states are read and merged, and
    // they replace those groups' rows (Delta's replaceWhere on the hidden keys), so a file
    // that holds none of them is kept. Each group is in one file, so at most that many files
    // are rewritten; only when that is at most half of them does replacing beat rewriting
    // (measured: 938 groups in 12 files, every file holding some, replaced 1.27x slower than
    // merged and rewritten whole). Several keys take one conjunction per group: at most 100.
    // The slice is merged and rewritten whole instead for a GROUP BY without keys, a clustered
    // slice (whose files each hold a range of its sort columns: merged groups written apart
    // would overlap them), a subquery above the aggregate (its tables' change changes every
    // group), or keys not stored as the new rows give them (a cast could pick other rows than
    // Delta's replaceWhere does; float keys: NaN escapes file statistics).
    let groups = partitions::by_stored_keys(shape.aggregate);
    let snapshot = existing.snapshot()?;
    let files = snapshot.log_data().num_files();
    let sorted = previous
        .and_then(|p| p.meta.as_ref())
        .and_then(|m| m.clustered.as_ref())
        .is_some_and(|c| !c.columns.is_empty());
    let most = match shape.aggregate.group_expr.len() {
        0 => 0,
        1 => (files / 2).min(partitions::MAX_PARTITIONS),
        _ => (files / 2).min(100),
    };
    // A replacement may add files (the groups new to the slice go to a new one): after
    // MAX_APPENDS - 1 of them in a row, the slice is merged and rewritten whole instead,
    // which compacts it without reading the inputs again.
    let compact = appends_before + 1 >= MAX_APPENDS;
    let touched = match most == 0 || sorted || compact || !shape.rows_stand_alone() {
        true => None,
        false => groups
            .touched_at_most(state, terms.clone(), most)
            .await?
            .filter(|t| groups.stored_alike(t, &snapshot.snapshot().arrow_schema())),
    };
    let (stored, replace) = match &touched {
        Some(touched) => {
            let picked = groups.picking(touched);
            let stored = LogicalPlanBuilder::from(stored)
                .filter(picked.clone())?
                .build()?;
            (stored, Some(picked))
        }
        None => (stored, None),
    };
    let merged = shape.plan(Some(stored), terms)?;
    Ok(Decision {
        unchanged: false,
        built: Built {
            mode: BuildMode::Incremental,
            reason: match &touched {
                Some(touched) => format!(
                    "only appends since the previous version ({names}); their aggregate \
                     states were merged into those of the {} group(s) they fall in, which \
                     replaced those groups",
                    touched.len()
                ),
                None if compact && most > 0 => format!(
                    "only appends since the previous version ({names}); their aggregate \
                     states were merged into the stored ones, rewriting the slice whole: \
                     {appends_before} refreshes in a row replaced groups and may have added \
                     files"
                ),
                None => format!(
                    "only appends since the previous version ({names}); their aggregate \
                     states were merged into the stored ones"
                ),
            },
            reads: from(reads(std::slice::from_ref(&merged))?),
            appended: false,
        },
        plan: merged,
        // Replacements count as appends; a whole rewrite compacts.
        appends: match &touched {
            Some(_) => appends_before + 1,
            None => 0,
        },
        replace,
    })
}

/// Why `plan` cannot refresh incrementally whatever its inputs gain, or `Ok(None)` when it can:
/// checks a definition declared `INCREMENTAL`.
pub(crate) fn refuses_incremental(
    plan: &LogicalPlan,
    partition_by: &[String],
) -> Result<Option<String>> {
    if let Err(why) = deterministic(plan) {
        return Ok(Some(why));
    }
    // Every input changes at once: the delta rules must hold at every node.
    let changes: HashMap<String, Change> = providers(plan)?
        .into_iter()
        .map(|(name, provider)| {
            let change = Change {
                new_files: provider.clone(),
                old_files: provider,
            };
            (name, change)
        })
        .collect();
    // The input of a GROUP BY whose partitions or groups are recomputed where new rows fall.
    let recomputed = match partition_by.is_empty() {
        true => None,
        false => match partitions::partitioned(plan, partition_by) {
            Ok(found) => found.map(|p| p.aggregate.input.as_ref()),
            Err(why) => return Ok(Some(format!("the slice is partitioned, but {why}"))),
        },
    };
    let found = match recomputed {
        Some(input) => Ok(Some((input, true))),
        None => match aggregate::shape(plan) {
            Ok(shape) => Ok(shape.map(|s| (s.input, false))),
            // Groups that keep no state are recomputed when all of their keys are shown.
            Err(why) => match partitions::grouped(plan) {
                Ok(Some(grouped)) => Ok(Some((grouped.aggregate.input.as_ref(), true))),
                _ => Err(why),
            },
        },
    };
    let definition = match found {
        Ok(Some((input, recomputed))) => {
            if let (true, Some(table)) = (recomputed, read_beside(plan, &changes)?) {
                return Ok(Some(beside(&table)));
            }
            input
        }
        Ok(None) => plan,
        Err(why) => {
            return Ok(Some(format!(
                "the definition has an aggregate that keeps no state ({why})"
            )))
        }
    };
    Ok(delta_terms(definition, &changes).err())
}

/// The changed input that `plan` reads beside the input of its GROUP BY: in a subquery of
/// the SELECT list above it or of the aggregate's own expressions. A change there changes
/// every group, not only those the new rows fall in.
fn read_beside(plan: &LogicalPlan, changes: &HashMap<String, Change>) -> Result<Option<String>> {
    let mut found = None;
    let mut node = plan;
    loop {
        node.apply_subqueries(|subquery| {
            found = touched_input(subquery, changes);
            Ok(match found {
                Some(_) => TreeNodeRecursion::Stop,
                None => TreeNodeRecursion::Continue,
            })
        })?;
        let inputs = node.inputs();
        match (&found, node, inputs.as_slice()) {
            (None, LogicalPlan::Projection(_) | LogicalPlan::SubqueryAlias(_), [input]) => {
                node = input
            }
            _ => return Ok(found),
        }
    }
}

/// Why a GROUP BY recomputed group by group (or partition by partition) refreshes in full
/// when `table`, which a subquery beside it reads, changed.
fn beside(table: &str) -> String {
    format!(
        "a subquery above its GROUP BY reads {table}, whose change may change every group, \
         not only those the new rows fall in"
    )
}

/// The decision of a refresh with nothing to do: the slice's version `version` was built from
/// the very inputs it would read. Nothing is written (its plan is never run).
pub(crate) fn nothing_to_do(appends: u32, version: i64) -> Decision {
    Decision {
        plan: empty(&Arc::new(DFSchema::empty())),
        appends,
        replace: None,
        built: Built {
            mode: BuildMode::Incremental,
            reason: format!("nothing to do: no input changed since version {version}"),
            reads: Vec::new(),
            appended: false,
        },
        unchanged: true,
    }
}

/// A full build of `plan`, for `reason`.
fn full(plan: LogicalPlan, reason: String) -> Decision {
    let reads = reads(std::slice::from_ref(&plan)).unwrap_or_default();
    Decision {
        unchanged: false,
        plan,
        appends: 0,
        replace: None,
        built: Built {
            mode: BuildMode::Full,
            reason,
            reads,
            appended: false,
        },
    }
}

/// The icepie providers `plan` scans at their latest versions (not `core_at`, `slice_at`),
/// by table name.
fn providers(plan: &LogicalPlan) -> Result<HashMap<String, Arc<IcePieTable>>> {
    let mut out = HashMap::new();
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let provider = source_as_provider(&scan.source)?;
            if let Some(table) = provider.downcast_ref::<IcePieTable>() {
                if !table.is_pinned() {
                    out.insert(table.name().to_string(), Arc::new(table.clone()));
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(out)
}

/// What scanning every table of `plans` reads, per input.
fn reads(plans: &[LogicalPlan]) -> Result<Vec<InputRead>> {
    let mut out: Vec<InputRead> = Vec::new();
    for plan in plans {
        plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                let provider = source_as_provider(&scan.source)?;
                if let Some(table) = provider.downcast_ref::<IcePieTable>() {
                    let (files, rows, bytes) = table.read_size();
                    let at = match out.iter().position(|r| r.table == table.name()) {
                        Some(at) => at,
                        None => {
                            out.push(InputRead {
                                table: table.name().to_string(),
                                from: None,
                                to: table.version(),
                                files: 0,
                                rows: 0,
                                bytes: 0,
                            });
                            out.len() - 1
                        }
                    };
                    out[at].files += files;
                    out[at].rows += rows;
                    out[at].bytes += bytes;
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
    }
    out.sort_by(|a, b| a.table.cmp(&b.table));
    Ok(out)
}

/// Refuses functions whose result may differ between two runs over the same data: an
/// incremental refresh would keep rows a full one would compute differently.
pub(crate) fn deterministic(plan: &LogicalPlan) -> std::result::Result<(), String> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        // Parts over unchanged inputs run again in every refresh: whatever may pick other
        // rows each time (LIMIT, window functions, order-dependent aggregates) would mix
        // two different answers.
        match node {
            LogicalPlan::Limit(_) => {
                found = Some("LIMIT, which may pick other rows each run".into())
            }
            LogicalPlan::Window(_) => {
                found = Some("a window function, which may number rows differently each run".into())
            }
            _ => {}
        }
        if found.is_some() {
            return Ok(TreeNodeRecursion::Stop);
        }
        node.apply_expressions(|e| {
            e.apply(|e| {
                match e {
                    Expr::ScalarFunction(f)
                        if f.func.signature().volatility != Volatility::Immutable =>
                    {
                        found = Some(format!(
                            "{}(), whose result can change between refreshes",
                            f.func.name()
                        ));
                    }
                    Expr::AggregateFunction(f)
                        if f.params.order_by.is_empty()
                            && aggregate::ORDER_DEPENDENT.contains(&f.func.name()) =>
                    {
                        found = Some(format!(
                            "{}() without ORDER BY, whose result depends on the order rows \
                             arrive in",
                            f.func.name()
                        ));
                    }
                    _ => return Ok(TreeNodeRecursion::Continue),
                }
                Ok(TreeNodeRecursion::Stop)
            })
        })
    });
    match found {
        Some(what) => Err(format!("the definition has {what}")),
        None => Ok(()),
    }
}

/// The new data of `input` since the version the slice was built from (`before`):
/// `Ok(None)` when it has none, `Err(reason)` when it changed other than by appends.
async fn change(
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

/// True when `plan` reads a changed input anywhere, subqueries included.
fn touches(plan: &LogicalPlan, changes: &HashMap<String, Change>) -> bool {
    touched_input(plan, changes).is_some()
}

/// The first changed input `plan` reads, subqueries included.
fn touched_input(plan: &LogicalPlan, changes: &HashMap<String, Change>) -> Option<String> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            if changed(scan, changes).is_some() {
                found = Some(scan.table_name.to_string());
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// The change of the input `scan` reads at its latest version, if it changed.
fn changed<'a>(scan: &TableScan, changes: &'a HashMap<String, Change>) -> Option<&'a Change> {
    let provider = source_as_provider(&scan.source).ok()?;
    let table = provider.downcast_ref::<IcePieTable>()?;
    match table.is_pinned() {
        true => None,
        false => changes.get(table.name()),
    }
}

/// `scan` reading `table` instead.
fn swapped(scan: &TableScan, table: Arc<IcePieTable>) -> LogicalPlan {
    LogicalPlan::TableScan(TableScan {
        source: provider_as_source(table),
        ..scan.clone()
    })
}

/// One UNION ALL of `terms` (all of one schema, named as the first), or an empty relation
/// of `schema` when there is none.
fn union_all(terms: Vec<LogicalPlan>, schema: &DFSchemaRef) -> Result<LogicalPlan> {
    let mut terms = terms.into_iter();
    Ok(match terms.next() {
        Some(first) => {
            let mut union = LogicalPlanBuilder::from(first);
            for term in terms {
                union = union.union(term)?;
            }
            union.build()?
        }
        None => empty(schema),
    })
}

/// An empty relation with `schema`.
fn empty(schema: &DFSchemaRef) -> LogicalPlan {
    LogicalPlan::EmptyRelation(EmptyRelation {
        produce_one_row: false,
        schema: schema.clone(),
    })
}

/// `plan` with its inputs replaced by `children`, in order; schemas are unchanged.
fn with_children(plan: &LogicalPlan, children: Vec<LogicalPlan>) -> Result<LogicalPlan> {
    let mut children = children.into_iter();
    Ok(plan
        .clone()
        .map_children(|c| Ok(Transformed::yes(children.next().unwrap_or(c))))?
        .data)
}

/// `plan` reading each changed input as it was at the previous version.
fn old(plan: &LogicalPlan, changes: &HashMap<String, Change>) -> Result<LogicalPlan> {
    Ok(plan
        .clone()
        .transform_up(|node| {
            if let LogicalPlan::TableScan(scan) = &node {
                if let Some(change) = changed(scan, changes) {
                    return Ok(Transformed::yes(swapped(scan, change.old_files.clone())));
                }
            }
            Ok(Transformed::no(node))
        })?
        .data)
}

/// The terms whose `UNION ALL` is the rows `plan` gains from `changes`; `Err` says which
/// part of the definition has no delta rule.
fn delta_terms(
    plan: &LogicalPlan,
    changes: &HashMap<String, Change>,
) -> std::result::Result<Vec<LogicalPlan>, String> {
    terms(plan, changes).map_err(|e| match e {
        Unsupported::Shape(why) => why,
        Unsupported::Error(e) => format!("the definition could not be rewritten: {e}"),
    })
}

enum Unsupported {
    Shape(String),
    Error(crate::error::IcePieError),
}

impl<E: Into<crate::error::IcePieError>> From<E> for Unsupported {
    fn from(e: E) -> Self {
        Self::Error(e.into())
    }
}

fn terms(
    plan: &LogicalPlan,
    changes: &HashMap<String, Change>,
) -> std::result::Result<Vec<LogicalPlan>, Unsupported> {
    if !touches(plan, changes) {
        return Ok(Vec::new());
    }
    let shape = |what: &str| {
        Unsupported::Shape(format!(
            "the definition has {what} over new data, which has no incremental rule yet"
        ))
    };
    let no_subqueries = |node: &LogicalPlan| {
        let mut found = false;
        let _ = node.apply_subqueries(|_| {
            found = true;
            Ok(TreeNodeRecursion::Stop)
        });
        match found {
            true => Err(shape("a subquery")),
            false => Ok(()),
        }
    };
    match plan {
        LogicalPlan::TableScan(scan) => {
            let change = changed(scan, changes).ok_or_else(|| shape("a table scan"))?;
            Ok(vec![swapped(scan, change.new_files.clone())])
        }
        LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
            no_subqueries(plan)?;
            let child = plan.inputs()[0];
            terms(child, changes)?
                .into_iter()
                .map(|t| Ok(with_children(plan, vec![t])?))
                .collect()
        }
        LogicalPlan::Union(union) => {
            let mut out = Vec::new();
            for (i, input) in union.inputs.iter().enumerate() {
                for term in terms(input, changes)? {
                    let children = union
                        .inputs
                        .iter()
                        .enumerate()
                        .map(|(j, other)| {
                            if i == j {
                                term.clone()
                            } else {
                                empty(other.schema())
                            }
                        })
                        .collect();
                    out.push(with_children(plan, children)?);
                }
            }
            Ok(out)
        }
        LogicalPlan::Join(join) if join.join_type == JoinType::Inner && !join.null_aware => {
            no_subqueries(plan)?;
            let mut out = Vec::new();
            for term in terms(&join.left, changes)? {
                out.push(with_children(plan, vec![term, (*join.right).clone()])?);
            }
            let left_old = old(&join.left, changes)?;
            for term in terms(&join.right, changes)? {
                out.push(with_children(plan, vec![left_old.clone(), term])?);
            }
            Ok(out)
        }
        LogicalPlan::Join(join) => Err(shape(&format!("a {} join", join.join_type))),
        LogicalPlan::Aggregate(_) => Err(shape("an aggregate (GROUP BY)")),
        LogicalPlan::Window(_) => Err(shape("a window function")),
        LogicalPlan::Sort(_) => Err(shape("ORDER BY")),
        LogicalPlan::Limit(_) => Err(shape("LIMIT")),
        LogicalPlan::Distinct(_) => Err(shape("DISTINCT (or UNION without ALL)")),
        other => {
            let node = other.display().to_string();
            let node = node.split(':').next().unwrap_or_default();
            Err(shape(&format!("a {node} node")))
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    use super::columns_differ;

    fn schema(fields: &[(&str, DataType, bool)]) -> Schema {
        Schema::new(
            fields
                .iter()
                .map(|(n, t, null)| Field::new(*n, t.clone(), *null))
                .collect::<Vec<_>>(),
        )
    }

    /// Issue 26: an incremental write must not change a column's type or nullability (the
    /// write overwrites the schema); types Delta stores alike are alike.
    #[test]
    fn an_incremental_write_never_changes_the_slices_columns() {
        let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let stored = [
            ("k", DataType::Int64, false),
            ("g", DataType::Utf8, true),
            ("n", DataType::Int64, true),
            ("at", utc.clone(), true),
        ];
        let differ = |written: &[(&str, DataType, bool)]| {
            columns_differ(&schema(written), &schema(&stored), "the slice stores")
        };
        // Other order, a string view, an unsigned count: as Delta records them, the same.
        let alike = [
            ("g", DataType::Utf8View, true),
            ("k", DataType::Int64, false),
            ("n", DataType::UInt64, true),
            ("at", utc, true),
        ];
        assert_eq!(differ(&alike), None);
        // Written in seconds, stored in microseconds (how Delta's writer normalizes them).
        assert_eq!(
            columns_differ(
                &schema(&[("t", DataType::Timestamp(TimeUnit::Second, None), true)]),
                &schema(&[("t", DataType::Timestamp(TimeUnit::Microsecond, None), true)]),
                "the slice stores"
            ),
            None
        );
        // One column changed at a time.
        let changed = |at: usize, field: (&'static str, DataType, bool)| {
            let mut written = stored.to_vec();
            written[at] = field;
            differ(&written)
        };
        for (written, want) in [
            (
                changed(0, ("k", DataType::Int32, false)),
                "column 'k' as integer NOT NULL, where the slice stores long NOT NULL",
            ),
            (
                changed(0, ("k", DataType::Int64, true)),
                "column 'k' as long, where the slice stores long NOT NULL",
            ),
            (
                changed(
                    3,
                    ("at", DataType::Timestamp(TimeUnit::Microsecond, None), true),
                ),
                "column 'at' as timestamp_ntz, where the slice stores timestamp",
            ),
            (
                changed(2, ("m", DataType::Int64, true)),
                "column 'm', which is not among those the slice stores",
            ),
            (differ(&stored[..1]), "1 columns, where the slice stores 4"),
        ] {
            assert_eq!(written.as_deref(), Some(want));
        }
    }
}
