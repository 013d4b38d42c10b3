//! Recording usage ([`crate::usage`]): the query planner that wraps each query reading core
//! tables or slices, and the node above its plan that reports the query's reads when it ends.
//!
//! Planning learns which tables the query scans (the scans log themselves,
//! [`logging_scans`]) and, from the optimized logical plan, which of their columns it
//! filters (and how: equality, range, `IN`), groups and joins on. Execution adds what it read:
//! the Parquet scans' own metrics (rows, bytes, files skipped by statistics) and the rows the
//! query returned. When the last of the query's output streams is dropped (the query ended,
//! failed or was abandoned), one reading per table goes to [`Usage::record`], which never
//! waits. A plan that is never executed (`EXPLAIN`, a server describing a statement) records
//! nothing; nor do refreshes reading their inputs ([`quiet`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Column, TableReference};
use datafusion::datasource::source_as_provider;
use datafusion::error::Result as DFResult;
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::SessionState;
use datafusion::logical_expr::utils::{split_binary, split_conjunction};
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator, TableScan};
use datafusion::physical_plan::metrics::{MetricValue, MetricsSet};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::sql::sqlparser::ast::Query;

use crate::options::IcePieOptions;
use crate::table::live::LatestTable;
use crate::table::watch::{Watch, WatchExec};
use crate::table::{logging_scans, logging_scans_now, IcePieTable, ScanRecord, TableKind};
use crate::usage::{shape, ColumnUse, ColumnUses, Quiet, Reading, Usage, Use};

/// Plans as `inner` does; a plan that reads core tables or slices gets a [`UsageExec`] on top.
#[derive(Debug)]
pub(crate) struct UsagePlanner {
    pub inner: Arc<dyn QueryPlanner + Send + Sync>,
    pub usage: Arc<Usage>,
}

#[async_trait]
impl QueryPlanner for UsagePlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let config = session.config();
        let example = config.get_extension::<Example>().map(|e| e.0.clone());
        let recording = !matches!(logical_plan, LogicalPlan::Explain(_))
            && config.get_extension::<Quiet>().is_none()
            && config
                .options()
                .extensions
                .get::<IcePieOptions>()
                .is_none_or(|o| o.usage.0);
        // A plan planned while another is (a view's, inside a query's): its scans log into
        // that planning, and it gets no node of its own.
        if !recording || logging_scans_now() {
            return self.inner.create_physical_plan(logical_plan, session).await;
        }
        let started = Instant::now();
        let (plan, scans) =
            logging_scans(self.inner.create_physical_plan(logical_plan, session)).await;
        let plan = plan?;
        if scans.is_empty() {
            return Ok(plan);
        }
        let recorder = Recorder {
            usage: self.usage.clone(),
            example,
            started,
            uses: column_uses(logical_plan),
            scans,
            partitions: AtomicUsize::new(plan.properties().partitioning.partition_count()),
            ended: AtomicUsize::new(0),
            executed: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        };
        Ok(Arc::new(WatchExec::new(plan, Arc::new(recorder))))
    }
}

/// What one query read, reported once when it ends.
#[derive(Debug)]
struct Recorder {
    usage: Arc<Usage>,
    /// The slice that would answer the query, for a query of core tables only ([`Example`]).
    example: Option<Arc<str>>,
    started: Instant,
    uses: BTreeMap<String, ColumnUses>,
    scans: Vec<ScanRecord>,
    /// Output partitions of the plan, and how many of their streams ended.
    partitions: AtomicUsize,
    ended: AtomicUsize,
    executed: AtomicBool,
    reported: AtomicBool,
    /// Rows and bytes returned.
    rows: AtomicU64,
    bytes: AtomicU64,
}

/// Sums of the scans of one table in a query.
#[derive(Debug, Default)]
struct Scanned {
    kind: Option<TableKind>,
    rows: u64,
    bytes: u64,
    files: u64,
    skipped: u64,
}

impl Recorder {
    fn partition_ended(&self) {
        let partitions = self.partitions.load(Ordering::Acquire);
        if self.ended.fetch_add(1, Ordering::AcqRel) + 1 >= partitions {
            self.report();
        }
    }

    /// Hands the query's readings to the usage task, once, if the query ran.
    fn report(&self) {
        if !self.executed.load(Ordering::Acquire) || self.reported.swap(true, Ordering::AcqRel) {
            return;
        }
        let latency = self.started.elapsed();
        let mut tables: BTreeMap<&str, Scanned> = BTreeMap::new();
        for scan in &self.scans {
            let t = tables.entry(&scan.name).or_default();
            t.kind = Some(scan.kind);
            t.files += scan.files as u64;
            let Some(metrics) = &scan.metrics else {
                continue;
            };
            let metrics = metrics.clone_inner();
            t.rows += metrics.output_rows().unwrap_or(0) as u64;
            t.bytes += metrics
                .sum_by_name("bytes_scanned")
                .map(|v| v.as_usize())
                .unwrap_or(0) as u64;
            let read = files_read(&metrics) as u64;
            t.skipped += (scan.files as u64).saturating_sub(read);
        }
        let none = ColumnUses::new();
        let used: BTreeMap<&String, &ColumnUses> = self
            .scans
            .iter()
            .map(|s| (&s.name, self.uses.get(&s.name).unwrap_or(&none)))
            .collect();
        let shape: Arc<str> = shape(used.iter().map(|(t, u)| (*t, *u))).into();
        let example = self
            .example
            .clone()
            .filter(|_| tables.values().all(|t| t.kind == Some(TableKind::Core)));
        let at = self.usage.clock.now_ms();
        let readings = tables
            .into_iter()
            .map(|(table, t)| Reading {
                at,
                table: table.to_string(),
                kind: match t.kind {
                    Some(TableKind::Core) => "core",
                    _ => "slice",
                },
                shape: shape.clone(),
                columns: self
                    .uses
                    .get(table)
                    .map(|u| {
                        u.iter()
                            .map(|(how, column)| ColumnUse {
                                how: *how,
                                column: column.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                rows_returned: self.rows.load(Ordering::Relaxed),
                bytes_returned: self.bytes.load(Ordering::Relaxed),
                rows_scanned: t.rows,
                bytes_scanned: t.bytes,
                files_scanned: t.files.saturating_sub(t.skipped),
                files_skipped: t.skipped,
                latency,
                example: example.clone(),
            })
            .collect();
        self.usage.record(readings);
    }
}

/// How many files a Parquet scan read data of: the files it opened (each has metrics labelled
/// with its name) less those whose statistics ruled out every row group, or the whole file.
fn files_read(metrics: &MetricsSet) -> usize {
    // Per file: (ruled out whole, row groups kept, row groups ruled out).
    let mut files: HashMap<&str, (bool, usize, usize)> = HashMap::new();
    for metric in metrics.iter() {
        let Some(file) = metric.labels().iter().find(|l| l.name() == "filename") else {
            continue;
        };
        let MetricValue::PruningMetrics {
            name,
            pruning_metrics,
        } = metric.value()
        else {
            files.entry(file.value()).or_default();
            continue;
        };
        let f = files.entry(file.value()).or_default();
        match name.as_ref() {
            "files_ranges_pruned_statistics" => f.0 |= pruning_metrics.pruned() > 0,
            "row_groups_pruned_statistics" => {
                f.1 += pruning_metrics.matched();
                f.2 += pruning_metrics.pruned();
            }
            _ => {}
        }
    }
    files
        .values()
        .filter(|(whole, kept, pruned)| !(*whole || *kept == 0 && *pruned > 0))
        .count()
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.report();
    }
}

/// Ends one output stream of a query: dropped with the stream.
struct PartitionEnd(Arc<Recorder>);

impl Drop for PartitionEnd {
    fn drop(&mut self) {
        self.0.partition_ended();
    }
}

/// The definition of a slice that would answer a query of core tables only, whatever values
/// it filters on ([`crate::sql::generalize`]): set on the session of the query's
/// `DataFrame`, where the usage planner finds it.
#[derive(Debug)]
struct Example(Arc<str>);

/// The definition of the slice that would answer `plan` (a query, as planned from `query`),
/// when it reads core tables only and a slice can be drawn from it.
pub(crate) fn example(plan: &LogicalPlan, query: &Query) -> Option<Arc<str>> {
    let mut core = false;
    let mut other = false;
    let _ = plan.apply_with_subqueries(|p| {
        if let LogicalPlan::TableScan(scan) = p {
            let kind = source_as_provider(&scan.source)
                .ok()
                .and_then(|t| t.downcast_ref::<IcePieTable>().map(IcePieTable::kind));
            match kind {
                Some(TableKind::Core) => core = true,
                _ => other = true,
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if !core || other || !crate::slice::is_query(plan) {
        return None;
    }
    // What the outer SELECT does: aggregate, or compute window functions (then no slice of
    // the rows answers it). A derived table's aggregate is not the outer query's.
    let mut top = plan;
    let aggregate = loop {
        match top {
            LogicalPlan::Projection(p) => top = &p.input,
            LogicalPlan::Sort(s) => top = &s.input,
            LogicalPlan::Limit(l) => top = &l.input,
            LogicalPlan::Filter(f) => top = &f.input,
            LogicalPlan::Window(_) => return None,
            LogicalPlan::Aggregate(_) => break true,
            _ => break false,
        }
    };
    crate::sql::generalize::slice_definition(query, aggregate).map(Arc::from)
}

/// `state` with `example` set for the usage planner.
pub(crate) fn with_example(mut state: SessionState, example: Arc<str>) -> SessionState {
    state.config_mut().set_extension(Arc::new(Example(example)));
    state
}

impl Watch for Recorder {
    const NAME: &'static str = "UsageExec";

    /// Counts the query's output; reports the query's reads when its last partition ends.
    fn partition(
        self: &Arc<Self>,
        input: &Arc<dyn ExecutionPlan>,
    ) -> Box<dyn FnMut(&RecordBatch) + Send> {
        let partitions = input.properties().partitioning.partition_count();
        self.partitions.store(partitions, Ordering::Release);
        self.executed.store(true, Ordering::Release);
        let end = PartitionEnd(self.clone());
        Box::new(move |batch| {
            let r = &end.0;
            r.rows.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
            r.bytes
                .fetch_add(batch.get_array_memory_size() as u64, Ordering::Relaxed);
        })
    }

    fn benefits_from_input_partitioning(&self) -> bool {
        false
    }
}

/// A core table or slice a plan scans, as its columns are qualified.
#[derive(Debug, Clone)]
struct KnownTable {
    name: String,
    columns: Vec<String>,
}

/// The core table or slice `scan` reads, if it reads one.
fn icepie_scan(scan: &TableScan) -> Option<KnownTable> {
    let provider = source_as_provider(&scan.source).ok()?;
    let name = if let Some(t) = provider.downcast_ref::<IcePieTable>() {
        (t.kind() != TableKind::System).then(|| t.name().to_string())?
    } else {
        provider.downcast_ref::<LatestTable>()?.name().to_string()
    };
    let schema = scan.source.schema();
    let columns = schema.fields().iter().map(|f| f.name().clone()).collect();
    Some(KnownTable { name, columns })
}

/// The one table scan under a chain of projections, filters, aliases, sorts and limits.
fn single_scan(plan: &LogicalPlan) -> Option<KnownTable> {
    match plan {
        LogicalPlan::TableScan(scan) => icepie_scan(scan),
        LogicalPlan::Projection(_)
        | LogicalPlan::Filter(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_) => match plan.inputs().as_slice() {
            [input] => single_scan(input),
            _ => None,
        },
        _ => None,
    }
}

/// Which table a qualified column comes from.
#[derive(Debug, Default)]
struct Qualifiers(HashMap<TableReference, KnownTable>);

impl Qualifiers {
    fn learn(&mut self, node: &LogicalPlan) {
        match node {
            LogicalPlan::TableScan(scan) => {
                if let Some(t) = icepie_scan(scan) {
                    self.0.insert(scan.table_name.clone(), t);
                }
            }
            LogicalPlan::SubqueryAlias(alias) => {
                if let Some(t) = single_scan(&alias.input) {
                    self.0.insert(alias.alias.clone(), t);
                }
            }
            _ => {}
        }
    }

    /// The table `column` is a column of, if the plan makes that clear.
    fn resolve(&self, column: &Column) -> Option<&str> {
        let has = |t: &KnownTable| t.columns.contains(&column.name);
        match &column.relation {
            Some(r) => self.0.get(r).filter(|t| has(t)).map(|t| t.name.as_str()),
            None => {
                let mut found = self.0.values().filter(|t| has(t)).map(|t| &t.name);
                let first = found.next()?;
                found.all(|n| n == first).then_some(first.as_str())
            }
        }
    }
}

/// The columns of each core table and slice `plan` (optimized) and the views it reads
/// filter, group and join on.
fn column_uses(plan: &LogicalPlan) -> BTreeMap<String, ColumnUses> {
    let mut plans = vec![plan.clone()];
    let mut out: BTreeMap<String, ColumnUses> = BTreeMap::new();
    // A view read is planned with its own plan: its tables' columns are used there.
    let mut seen = 0;
    while let Some(plan) = plans.get(seen).cloned() {
        seen += 1;
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                if let Ok(provider) = source_as_provider(&scan.source) {
                    if let Some(view) = provider.get_logical_plan() {
                        if plans.len() < 64 {
                            plans.push(view.into_owned());
                        }
                    }
                }
            }
            Ok(TreeNodeRecursion::Continue)
        });
        for (table, uses) in plan_column_uses(&plan) {
            out.entry(table).or_default().extend(uses);
        }
    }
    out
}

/// [`column_uses`] of one plan, without the views it reads.
fn plan_column_uses(plan: &LogicalPlan) -> BTreeMap<String, ColumnUses> {
    let mut qualifiers = Qualifiers::default();
    let _ = plan.apply_with_subqueries(|node| {
        qualifiers.learn(node);
        Ok(TreeNodeRecursion::Continue)
    });
    let mut out: BTreeMap<String, ColumnUses> = BTreeMap::new();
    let mut add = |table: &str, u: Use, column: &str| {
        out.entry(table.to_string())
            .or_default()
            .insert((u, column.to_string()));
    };
    let _ = plan.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::TableScan(scan) => {
                if let Some(t) = icepie_scan(scan) {
                    for (u, c) in scan.filters.iter().flat_map(filter_uses) {
                        if t.columns.contains(&c.name) {
                            add(&t.name, u, &c.name);
                        }
                    }
                }
            }
            LogicalPlan::Filter(filter) => {
                for (u, c) in filter_uses(&filter.predicate) {
                    if let Some(t) = qualifiers.resolve(&c) {
                        add(t, u, &c.name);
                    }
                }
            }
            LogicalPlan::Join(join) => {
                for (l, r) in &join.on {
                    for c in l.column_refs().into_iter().chain(r.column_refs()) {
                        if let Some(t) = qualifiers.resolve(c) {
                            add(t, Use::Join, &c.name);
                        }
                    }
                }
            }
            LogicalPlan::Aggregate(agg) => {
                for e in &agg.group_expr {
                    for c in e.column_refs() {
                        if let Some(t) = qualifiers.resolve(c) {
                            add(t, Use::Group, &c.name);
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

/// The columns a filter uses, each with how: `col = v` equality, `col < v` and `BETWEEN`
/// range, `col IN (...)`, and anything else (`LIKE`, `OR`, functions of columns) other.
fn filter_uses(predicate: &Expr) -> Vec<(Use, Column)> {
    split_conjunction(predicate)
        .into_iter()
        .flat_map(conjunct_uses)
        .collect()
}

fn conjunct_uses(e: &Expr) -> Vec<(Use, Column)> {
    match e {
        // `col = a OR col = b`: how the optimizer writes a short IN list.
        Expr::BinaryExpr(BinaryExpr {
            op: Operator::Or, ..
        }) => {
            let mut column = None;
            let all_equal = split_binary(e, Operator::Or).into_iter().all(|d| {
                let c = match conjunct_uses(d).as_slice() {
                    [(Use::FilterEq | Use::FilterIn, c)] => c.clone(),
                    _ => return false,
                };
                column.get_or_insert_with(|| c.clone()) == &c
            });
            if let (true, Some(c)) = (all_equal, column) {
                return vec![(Use::FilterIn, c)];
            }
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let kind = match op {
                Operator::Eq => Some(Use::FilterEq),
                Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq => {
                    Some(Use::FilterRange)
                }
                _ => None,
            };
            if let Some(kind) = kind {
                match (column_of(left), column_of(right)) {
                    (Some(c), None) if is_value(right) => return vec![(kind, c)],
                    (None, Some(c)) if is_value(left) => return vec![(kind, c)],
                    _ => {}
                }
            }
        }
        Expr::Between(b) if !b.negated => {
            if let Some(c) = column_of(&b.expr) {
                return vec![(Use::FilterRange, c)];
            }
        }
        Expr::InList(l) if !l.negated => {
            if let Some(c) = column_of(&l.expr) {
                return vec![(Use::FilterIn, c)];
            }
        }
        _ => {}
    }
    e.column_refs()
        .into_iter()
        .map(|c| (Use::FilterOther, c.clone()))
        .collect()
}

/// The column `e` is, through casts.
fn column_of(e: &Expr) -> Option<Column> {
    match e {
        Expr::Column(c) => Some(c.clone()),
        Expr::Cast(c) => column_of(&c.expr),
        Expr::TryCast(c) => column_of(&c.expr),
        _ => None,
    }
}

/// True for an expression of no column: a literal, a parameter, a function of those.
fn is_value(e: &Expr) -> bool {
    e.column_refs().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::{col, lit};

    #[test]
    fn filters_are_classified_by_how_they_use_their_columns() {
        let p = col("a")
            .eq(lit(1))
            .and(lit(5).gt(col("b")))
            .and(col("c").in_list(vec![lit(1), lit(2)], false))
            .and(col("d").between(lit(1), lit(2)))
            .and(col("e").like(lit("x%")))
            .and(col("f").eq(lit(1)).or(col("f").eq(lit(2))))
            .and(col("i").eq(lit(1)).or(col("j").eq(lit(2))))
            .and(col("g").eq(col("h")));
        let mut got: Vec<(Use, String)> = filter_uses(&p)
            .into_iter()
            .map(|(u, c)| (u, c.name))
            .collect();
        got.sort();
        let want = [
            (Use::FilterEq, "a"),
            (Use::FilterRange, "b"),
            (Use::FilterRange, "d"),
            (Use::FilterIn, "c"),
            (Use::FilterOther, "e"),
            (Use::FilterIn, "f"),
            (Use::FilterOther, "g"),
            (Use::FilterOther, "h"),
            (Use::FilterOther, "i"),
            (Use::FilterOther, "j"),
        ];
        let mut want: Vec<(Use, String)> = want.iter().map(|(u, c)| (*u, c.to_string())).collect();
        want.sort();
        assert_eq!(got, want);
    }
}
