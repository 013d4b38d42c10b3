//! Deciding how a refresh runs ([`decide`]): in full, or incrementally by which rule (appending
//! the new rows, recomputing the partitions or groups they fall in, or merging their aggregate
//! states), and why.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::DFSchema;
use datafusion::datasource::provider_as_source;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use deltalake::DeltaTable;

use super::appends::change;
use super::costs::Prediction;
use super::refusals::{beside, deterministic, read_beside};
use super::rules::{delta_terms, union_all};
use super::{
    empty, full, full_plan, providers, reads, stateful_shape, Change, Decision, Previous,
    MAX_APPENDS,
};
use crate::error::Result;
use crate::slice::meta::{BuildMode, Built, CommitKind, InputRead, InputVersion, RefreshMode};
use crate::slice::{aggregate, partitions, SliceSpec};
use crate::table::{IcePieTable, TableKind};

/// What a build is decided on: the slice, the version it builds on, and its inputs.
#[derive(Clone, Copy)]
pub(crate) struct Refresh<'a> {
    pub state: &'a SessionState,
    /// The slice's qualified name.
    pub name: &'a str,
    pub spec: &'a SliceSpec,
    pub kind: CommitKind,
    /// The slice's current version (its descriptor and whether it must be rebuilt in full).
    pub previous: Option<&'a Previous>,
    /// The slice's table at that version.
    pub existing: Option<&'a DeltaTable>,
    /// The inputs at their latest versions, as the definition was planned over them.
    pub inputs: &'a [InputVersion],
    /// `icepie.incremental_max_share`.
    pub max_share: f64,
}

/// Decides how to build `plan` (the definition over `r.inputs` at their latest versions) on
/// top of `r.previous` (the slice's current version, `r.existing`), and returns the plan to
/// write (whose columns [`keep_columns`](super::keep_columns) checks).
pub(crate) async fn decide(r: &Refresh<'_>, plan: LogicalPlan) -> Result<Decision> {
    let full_plan = full_plan(r.spec, &plan)?;
    // On the heap: the rules' future is large, and a build's stack deep.
    let decision = Box::pin(by_rules(r, plan, full_plan.clone())).await?;
    Ok(by_cost(r, decision, full_plan))
}

/// An `AUTO` slice's incremental `decision`, or its full build (`full_plan`) when the costs
/// of its earlier builds predict that cheaper; the reason gives the figures either way. Any
/// other decision as it is, and this one too until a build of each mode was measured.
fn by_cost(r: &Refresh<'_>, decision: Decision, full_plan: LogicalPlan) -> Decision {
    let Some(previous) = r.previous else {
        return decision;
    };
    let built = &decision.built;
    if r.spec.refresh_mode != RefreshMode::Auto
        || built.mode != BuildMode::Incremental
        || built.reads.is_empty()
    {
        return decision;
    }
    let bytes = |reads: &[InputRead]| reads.iter().map(|r| r.bytes).sum::<i64>();
    let mut full_build = full(full_plan, String::new());
    let Some(predicted) = Prediction::from(
        &previous.costs,
        bytes(&built.reads),
        bytes(&full_build.built.reads),
    ) else {
        return decision;
    };
    if predicted.full_is_cheaper() {
        full_build.built.reason = predicted.figures();
        return full_build;
    }
    let mut decision = decision;
    decision.built.reason = format!("{}; {}", decision.built.reason, predicted.figures());
    decision
}

/// [`decide`] by the rules alone: the definition's shape, what changed, and (`AUTO`) each
/// changed input's share of new data; `full_plan` builds it in full.
async fn by_rules(r: &Refresh<'_>, plan: LogicalPlan, full_plan: LogicalPlan) -> Result<Decision> {
    let &Refresh {
        state,
        spec,
        kind,
        previous,
        existing,
        inputs,
        max_share,
        ..
    } = r;
    let shape = stateful_shape(spec, &plan);
    if let Some(reason) = full_reason(spec, kind, previous) {
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
    let changes = match changes_since(spec, inputs, before, &providers, max_share).await? {
        Ok(changes) => changes,
        Err(why) => return Ok(full(full_plan, why)),
    };
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
                return recompute_partitions(
                    state, &plan, parted, &changes, &names, &from, full_plan,
                )
                .await;
            }
        }
    }
    let (definition, shape) = match shape {
        Ok(Some(shape)) => (shape.input, Some(shape)),
        Ok(None) => (&plan, None),
        Err(why) => {
            let why = format!("the definition has an aggregate that keeps no state ({why})");
            // Its groups can still be recomputed one by one when they are all shown.
            return recompute_groups(r, &plan, &changes, &names, &from, full_plan, why).await;
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
    merge_states(r, shape, terms, appends_before, &names, &from, full_plan).await
}

/// Why a build of `spec`, a `kind` commit on top of `previous`, is full whatever its inputs
/// gained; `None` when it may be incremental.
fn full_reason(spec: &SliceSpec, kind: CommitKind, previous: Option<&Previous>) -> Option<String> {
    match (kind, previous) {
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
    }
}

/// The new data of each input of `inputs` no SQL pins, by table name, since `before` (the
/// inputs the previous version was built from): `Err(reason)` when one changed other than by
/// appends, or (AUTO) when its new data is more than `max_share` of it.
async fn changes_since(
    spec: &SliceSpec,
    inputs: &[InputVersion],
    before: &[InputVersion],
    providers: &HashMap<String, Arc<IcePieTable>>,
    max_share: f64,
) -> Result<std::result::Result<HashMap<String, Change>, String>> {
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
                    return Ok(Err(why));
                }
                changes.insert(input.table.clone(), c);
            }
            Ok(None) => {}
            Err(why) => return Ok(Err(why)),
        }
    }
    Ok(Ok(changes))
}

/// The build of a GROUP BY partitioned by its keys (`parted`, at the top of `plan`): the
/// partitions the new rows (`changes`) fall in, recomputed to replace the slice's; a full
/// build when a subquery beside the GROUP BY reads a changed input, its input has no delta
/// rule, or the new rows fall in more than [`partitions::MAX_PARTITIONS`] partitions.
async fn recompute_partitions(
    state: &SessionState,
    plan: &LogicalPlan,
    parted: partitions::Partitioned<'_>,
    changes: &HashMap<String, Change>,
    names: &str,
    from: &impl Fn(Vec<InputRead>) -> Vec<InputRead>,
    full_plan: LogicalPlan,
) -> Result<Decision> {
    if let Some(table) = read_beside(plan, changes)? {
        let why = format!("the slice is partitioned, but {}", beside(&table));
        return Ok(full(full_plan, why));
    }
    let delta = match delta_terms(&parted.aggregate.input, changes) {
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
    let (recompute, replace) = parted.recompute(plan, &touched)?;
    Ok(Decision {
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
    })
}

/// The build of a GROUP BY whose aggregates keep no state (`why` says so): the groups the new
/// rows (`changes`) fall in, recomputed, and the other rows of the stored version `existing`;
/// a full build for `why` when they cannot be.
async fn recompute_groups(
    r: &Refresh<'_>,
    plan: &LogicalPlan,
    changes: &HashMap<String, Change>,
    names: &str,
    from: &impl Fn(Vec<InputRead>) -> Vec<InputRead>,
    full_plan: LogicalPlan,
    why: String,
) -> Result<Decision> {
    let &Refresh {
        state,
        name,
        existing,
        ..
    } = r;
    // Its groups can still be recomputed one by one when they are all shown.
    let (Some(existing), Ok(Some(grouped))) = (existing, partitions::grouped(plan)) else {
        return Ok(full(full_plan, why));
    };
    if let Some(table) = read_beside(plan, changes)? {
        return Ok(full(full_plan, format!("{why}, and {}", beside(&table))));
    }
    let delta = match delta_terms(&grouped.aggregate.input, changes) {
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
    let stored = IcePieTable::try_new(TableKind::Slice, name.to_string(), existing.clone()).await?;
    let stored =
        LogicalPlanBuilder::scan(name, provider_as_source(Arc::new(stored)), None)?.build()?;
    let rebuilt = grouped.rebuild(plan, stored, &touched)?;
    Ok(Decision {
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
    })
}

/// The build of a GROUP BY that keeps its aggregates' states (`shape`): the states of the new
/// rows (`terms`) merged into those the stored version `existing` keeps, replacing only the
/// groups they fall in when that pays; a full build when `existing` keeps no states.
async fn merge_states(
    r: &Refresh<'_>,
    shape: aggregate::Shape<'_>,
    terms: Vec<LogicalPlan>,
    appends_before: u32,
    names: &str,
    from: &impl Fn(Vec<InputRead>) -> Vec<InputRead>,
    full_plan: LogicalPlan,
) -> Result<Decision> {
    let &Refresh {
        state,
        name,
        previous,
        existing,
        ..
    } = r;
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
