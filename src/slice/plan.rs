//! Planning a build of a slice: its definition planned over its inputs' latest versions,
//! the checks the plan must pass (a query, no column named like icepie's own, its PARTITION BY
//! columns in the output, INCREMENTAL only where it can be), and the decision how to build it
//! (or that a refresh has nothing to do).

use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;

use super::build::BuildRequest;
use super::clustering::{self, ClusterBy, Clustered};
use super::incremental::{self, Previous};
use super::meta::{BuildMode, CommitKind, InputVersion, RefreshMode};
use super::{plan_inputs, refuse_cycles};
use crate::error::{IcePieError, Result};
use crate::sql::planner;

/// Plans the definition over its inputs' latest versions (recorded in `inputs`) and decides
/// how to build it.
pub(super) async fn plan_build(
    state: &SessionState,
    request: &BuildRequest<'_>,
    inputs: &mut Vec<InputVersion>,
) -> Result<(incremental::Decision, Option<Clustered>)> {
    let BuildRequest {
        context: shared,
        name,
        spec,
        kind,
        existing,
        previous,
    } = *request;
    if planner::calls(&spec.definition, planner::FRESH) {
        return Err(IcePieError::InvalidDefinition {
            slice: name.to_string(),
            reason: "a definition cannot read fresh(...): a slice reads its inputs at their \
                     latest versions when it is built; give the slice a refresh policy instead"
                .into(),
        });
    }
    let plan = shared.plan_sql(state, &spec.definition).await?;
    if !is_query(&plan) {
        return Err(IcePieError::InvalidDefinition {
            slice: name.to_string(),
            reason: "the definition must be a query (SELECT, WITH, VALUES)".into(),
        });
    }
    if let Some(field) = plan
        .schema()
        .fields()
        .iter()
        .find(|f| f.name().starts_with(super::aggregate::HIDDEN))
    {
        return Err(IcePieError::InvalidDefinition {
            slice: name.to_string(),
            reason: format!(
                "its column '{}' starts with '{}', which icepie keeps for its own columns; \
                 name it otherwise",
                field.name(),
                super::aggregate::HIDDEN
            ),
        });
    }
    *inputs = plan_inputs(&plan, name)?;
    refuse_cycles(shared, name, inputs).await?;
    for col in &spec.partition_by {
        if plan.schema().field_with_unqualified_name(col).is_err() {
            return Err(IcePieError::InvalidDefinition {
                slice: name.to_string(),
                reason: format!("PARTITION BY column '{col}' is not in the query's output"),
            });
        }
    }
    if spec.refresh_mode == RefreshMode::Incremental && kind != CommitKind::Refresh {
        if let Some(why) = incremental::refuses_incremental(&plan, &spec.partition_by)? {
            return Err(IcePieError::InvalidDefinition {
                slice: name.to_string(),
                reason: format!(
                    "it is declared INCREMENTAL, but {why}; declare it AUTO to refresh in full \
                     when it cannot go incremental"
                ),
            });
        }
    }
    let laid_out = previous
        .and_then(|p| p.meta.as_ref())
        .and_then(|m| m.clustered.clone());
    let chosen = clustering::choose(
        shared,
        name,
        &spec.cluster_by,
        plan.schema(),
        &spec.partition_by,
        laid_out.as_ref(),
    )
    .await?;
    // A layout changes (AUTO's choice, or ALTER SLICE … SET CLUSTER BY) at the next refresh.
    // A slice declared INCREMENTAL changes layout only when asked to (CLUSTER BY given);
    // data written before clustering existed counts as unsorted.
    let asked = spec.refresh_mode == RefreshMode::Auto || spec.cluster_by != ClusterBy::Auto;
    let relayout = asked && laid_out.as_ref().map_or(&[][..], |l| &l.columns[..]) != chosen.columns;
    if let Some((version, appends)) = nothing_to_do(request, inputs, &plan, relayout) {
        return Ok((incremental::nothing_to_do(appends, version), laid_out));
    }
    let max_share = shared.options().incremental_max_share;
    let qualified = name.to_string();
    let refresh = incremental::Refresh {
        state,
        name: &qualified,
        spec,
        kind,
        previous,
        existing,
        inputs,
        max_share,
    };
    let mut decision = incremental::decide(&refresh, plan.clone()).await?;
    if decision.built.mode == BuildMode::Incremental {
        // A new layout is written by a full build.
        if let (true, Some(previous)) = (relayout, previous) {
            let forced = Previous {
                full: true,
                ..previous.clone()
            };
            let refresh = incremental::Refresh {
                previous: Some(&forced),
                ..refresh
            };
            decision = incremental::decide(&refresh, plan.clone()).await?;
            decision.built.reason = format!(
                "the clustering changes to ({}): {}",
                chosen.columns.join(", "),
                chosen.reason
            );
        }
    }
    let decision = incremental::keep_columns(decision, spec, &plan, existing)?;
    let clustered = match decision.built.mode {
        BuildMode::Full => Some(chosen),
        // New rows are appended, or merged and written, in the previous layout.
        BuildMode::Incremental => laid_out,
    };
    Ok((decision, clustered))
}

/// The slice's current version and its appends in a row, when a refresh has nothing to add
/// to it: its inputs are the very versions it was built from, its definition and
/// layout are as they were, and the definition gives the same rows each time. `None` when
/// the build must run: a first version, a new definition, `REFRESH … FULL`, a quarantined
/// slice, a pending layout, or a definition calling `now()`, `random()` and the like.
fn nothing_to_do(
    request: &BuildRequest<'_>,
    inputs: &[InputVersion],
    plan: &LogicalPlan,
    relayout: bool,
) -> Option<(i64, u32)> {
    let BuildRequest { spec, kind, .. } = *request;
    let (table, previous) = (request.existing?, request.previous?);
    let meta = previous.meta.as_ref()?;
    let same_inputs =
        meta.inputs.len() == inputs.len() && inputs.iter().all(|i| meta.inputs.contains(i));
    let nothing = kind == CommitKind::Refresh
        && !previous.full
        && previous.damaged.is_none()
        && !relayout
        && meta.definition == spec.definition
        && meta.partition_by == spec.partition_by
        && same_inputs
        && incremental::deterministic(plan).is_ok();
    nothing.then(|| (table.version().unwrap_or_default() as i64, meta.appends))
}

/// True for plans that produce rows (not DDL, DML or statements).
pub(crate) fn is_query(plan: &LogicalPlan) -> bool {
    !matches!(
        plan,
        LogicalPlan::Ddl(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::Explain(_)
            | LogicalPlan::Analyze(_)
            | LogicalPlan::DescribeTable(_)
    )
}
