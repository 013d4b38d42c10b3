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

mod appends;
mod columns;
mod costs;
mod decide;
mod refusals;
mod rules;

pub(crate) use columns::keep_columns;
pub(crate) use decide::{decide, Refresh};
pub(crate) use refusals::{deterministic, refuses_incremental};

#[cfg(test)]
use columns::columns_differ;

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, DFSchemaRef};
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::{EmptyRelation, Expr, LogicalPlan};

use super::meta::{BuildCosts, BuildMode, Built, InputRead, RefreshMode, SliceDescriptor};
use super::{aggregate, SliceSpec};
use crate::error::Result;
use crate::table::IcePieTable;

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
    pub meta: Option<SliceDescriptor>,
    /// `REFRESH SLICE … FULL`: recompute from all of the inputs.
    pub full: bool,
    /// The damaged file of a quarantined slice: only a full build rewrites it.
    pub damaged: Option<String>,
    /// The measured costs of the slice's builds from its definition, its current version's
    /// included, which an `AUTO` refresh chooses its mode by.
    pub costs: BuildCosts,
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

/// An empty relation with `schema`.
fn empty(schema: &DFSchemaRef) -> LogicalPlan {
    LogicalPlan::EmptyRelation(EmptyRelation {
        produce_one_row: false,
        schema: schema.clone(),
    })
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
