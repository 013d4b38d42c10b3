//! Reading the past: the table functions `slice_at('domain.name', version)`,
//! `core_at('name', version)` and `slice_history('domain.name')`, and the planning helpers
//! every SQL text of icepie goes through so that they work. `fresh('domain.name', 'limit'
//! [, 'serve' | 'refresh' | 'fail'])`, the latest version within a staleness limit
//! ([`crate::slice::freshness`]), works the same way.
//!
//! DataFusion calls table functions synchronously while it plans, but opening a Delta table at
//! a version is I/O. So before a statement is planned, [`plan_statement`] finds the calls in its
//! syntax tree, opens each table at its version (checking that the version exists and, for a
//! slice, is still retained), and *pins* the provider; the table function then only looks it
//! up. A pin lasts while the statement is planned: the plan holds its provider after that.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArg, FunctionArgExpr, TableFactor, UnaryOperator, Value, Visitor,
};

use super::state::CatalogState;
use super::system;
use crate::error::{IcePieError, Result};
use crate::options::{OnStale, Staleness};
use crate::slice::lifecycle::{self, check_retained};
use crate::slice::{freshness, meta, vacuum};
use crate::sql::planner::visit_queries;
pub(crate) use crate::sql::planner::{CORE_AT, FRESH, SLICE_AT, SLICE_HISTORY};
use crate::storage::names::{core_name, SliceName, CORE_SCHEMA};
use crate::storage::Warehouse;
use crate::table::{IcePieTable, TableKind};

/// Which table a time-travel call reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PinKey {
    function: &'static str,
    /// The name argument as written.
    name: String,
    /// The version argument (none for `slice_history` and `fresh`).
    version: Option<i64>,
    /// `fresh`'s limit and action arguments, as written.
    limit: Option<(String, Option<String>)>,
    /// `fresh`'s statement: each statement applies its own limit, so its pin is its own.
    statement: Option<u64>,
}

tokio::task_local! {
    /// The statement being planned in this task (for `fresh` pins).
    static STATEMENT: u64;
}

/// Numbers the statements planned.
static STATEMENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A pinned provider and how many statements being planned use it.
type Pinned = (Arc<dyn TableProvider>, usize);

/// Providers opened for statements being planned.
#[derive(Debug, Default)]
pub(crate) struct Pins(Mutex<HashMap<PinKey, Pinned>>);

/// Releases a statement's pins when planning is over.
struct PinGuard<'a> {
    pins: &'a Pins,
    keys: Vec<PinKey>,
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        let Ok(mut map) = self.pins.0.lock() else {
            return;
        };
        for key in &self.keys {
            if let Some(entry) = map.get_mut(key) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    map.remove(key);
                }
            }
        }
    }
}

fn usage(function: &str) -> String {
    match function {
        FRESH => "fresh takes a slice name, a staleness limit and, optionally, what to do when \
                  the slice is staler (serve, refresh or fail; icepie.on_stale by default), all \
                  literals, e.g. fresh('finance.revenue', '5 minutes', 'refresh')"
            .into(),
        SLICE_HISTORY => "slice_history takes a slice name as a literal, e.g. \
                          slice_history('finance.revenue')"
            .into(),
        _ => {
            let example = if function == SLICE_AT {
                "slice_at('finance.revenue', 3)"
            } else {
                "core_at('orders', 7)"
            };
            format!(
                "{function} takes a table name and a version number, both literals, e.g. {example}"
            )
        }
    }
}

/// A literal argument of a call in the syntax tree.
fn sql_literal(arg: &FunctionArg) -> Option<ScalarValue> {
    let FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) = arg else {
        return None;
    };
    // `-1` is a minus applied to 1: pinned too, so that its error names the version.
    if let SqlExpr::UnaryOp {
        op: UnaryOperator::Minus,
        expr,
    } = expr
    {
        if let SqlExpr::Value(v) = expr.as_ref() {
            if let Value::Number(n, _) = &v.value {
                return n.parse::<i64>().ok().map(|n| ScalarValue::Int64(Some(-n)));
            }
        }
        return None;
    }
    let SqlExpr::Value(v) = expr else {
        return None;
    };
    match &v.value {
        Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => {
            Some(ScalarValue::Utf8(Some(s.clone())))
        }
        Value::Number(n, _) => n.parse::<i64>().ok().map(|n| ScalarValue::Int64(Some(n))),
        _ => None,
    }
}

fn key_of(function: &'static str, args: &[ScalarValue]) -> Option<PinKey> {
    let text = |v: &ScalarValue| match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => Some(s.clone()),
        _ => None,
    };
    match args {
        [name] if function == SLICE_HISTORY => Some(PinKey {
            function,
            name: text(name)?,
            version: None,
            limit: None,
            statement: None,
        }),
        [name, limit] | [name, limit, _] if function == FRESH => Some(PinKey {
            function,
            name: text(name)?,
            version: None,
            limit: Some((
                text(limit)?,
                match args.get(2) {
                    Some(action) => Some(text(action)?),
                    None => None,
                },
            )),
            statement: STATEMENT.try_with(|s| *s).ok(),
        }),
        [name, version] if function != SLICE_HISTORY && function != FRESH => {
            let name = text(name)?;
            let version = match version {
                ScalarValue::Int64(Some(v)) => *v,
                ScalarValue::Int32(Some(v)) => i64::from(*v),
                ScalarValue::UInt64(Some(v)) => i64::try_from(*v).ok()?,
                ScalarValue::Int16(Some(v)) => i64::from(*v),
                ScalarValue::Int8(Some(v)) => i64::from(*v),
                _ => return None,
            };
            Some(PinKey {
                function,
                name,
                version: Some(version),
                limit: None,
                statement: None,
            })
        }
        _ => None,
    }
}

/// The time-travel calls of a statement.
#[derive(Default)]
struct Calls(Vec<PinKey>);

impl Visitor for Calls {
    type Break = ();

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name,
            args: Some(args),
            ..
        } = factor
        {
            let called = name.to_string().to_ascii_lowercase();
            let function = match called.as_str() {
                SLICE_AT => SLICE_AT,
                CORE_AT => CORE_AT,
                SLICE_HISTORY => SLICE_HISTORY,
                FRESH => FRESH,
                _ => return ControlFlow::Continue(()),
            };
            let values: Option<Vec<ScalarValue>> = args.args.iter().map(sql_literal).collect();
            if let Some(key) = values.and_then(|v| key_of(function, &v)) {
                self.0.push(key);
            }
        }
        ControlFlow::Continue(())
    }
}

/// Opens the table a call names at its version.
async fn open(
    shared: &CatalogState,
    key: &PinKey,
    explained: bool,
) -> Result<Arc<dyn TableProvider>> {
    let version = key.version.unwrap_or_default();
    if key.function == CORE_AT {
        let parts: Vec<String> = key.name.split('.').map(str::to_string).collect();
        let name = core_name(&parts)?;
        let qualified = format!("{CORE_SCHEMA}.{name}");
        let latest = shared
            .latest_version(&qualified)
            .await?
            .ok_or_else(|| IcePieError::CoreTableNotFound(name.clone()))?;
        // The core keeps every version: only existence is checked.
        check_retained(&qualified, version, latest, usize::MAX)?;
        let table = shared
            .warehouse
            .load(&Warehouse::core_path(&name), Some(version))
            .await
            .map_err(|e| log_gone(&qualified, version, Some(e)))?
            .ok_or_else(|| log_gone(&qualified, version, None))?;
        return Ok(Arc::new(
            IcePieTable::try_new(TableKind::Core, qualified, table)
                .await?
                .pinned(),
        ));
    }
    let name = SliceName::parse(&key.name)?;
    if let Some((limit, action)) = &key.limit {
        let read = fresh(shared, &name, limit, action.as_deref());
        return match explained {
            // An explained statement reads nothing now: its limit is not applied.
            true => freshness::with_mode(freshness::Mode::Describe, read).await,
            false => read.await,
        };
    }
    let latest = shared
        .latest_version(&name.to_string())
        .await?
        .ok_or_else(|| IcePieError::SliceNotFound(name.to_string()))?;
    let retain = shared.options().retain_versions;
    if key.function == SLICE_HISTORY {
        let table = lifecycle::load_table(shared, &name).await?;
        let history = meta::history(&table, &name.to_string()).await?;
        return system::history_table(&history, latest, retain);
    }
    check_retained(&name.to_string(), version, latest, retain)?;
    let loaded = shared.load_slice(&name, Some(version)).await;
    // The watermark of the table read (a slice made again under the name has its own).
    let id = match &loaded {
        Ok(Some(t)) => t.table_id(),
        _ => None,
    };
    vacuum::check_not_vacuumed(shared, &name, version, id.as_deref()).await?;
    let qualified = name.to_string();
    Ok(Arc::new(
        loaded
            .map_err(|e| log_gone(&qualified, version, Some(e)))?
            .ok_or_else(|| log_gone(&qualified, version, None))?
            .pinned(),
    ))
}

/// `fresh('name', 'limit' [, 'action'])`.
async fn fresh(
    shared: &CatalogState,
    name: &SliceName,
    limit: &str,
    action: Option<&str>,
) -> Result<Arc<dyn TableProvider>> {
    let bad = |what: String| IcePieError::Syntax(format!("{what}: {}", usage(FRESH)));
    let limit = Staleness::parse(limit)
        .ok_or_else(|| bad(format!("'{limit}' is not a staleness limit")))?;
    let action = match action {
        Some(a) => OnStale::parse(a).ok_or_else(|| bad(format!("'{a}' is not an action")))?,
        None => shared.options().on_stale,
    };
    let table = match limit.0 {
        Some(limit) => freshness::read_fresh(shared, name, limit, action).await?,
        None => shared
            .load_slice(name, None)
            .await?
            .ok_or_else(|| IcePieError::SliceNotFound(name.to_string()))?,
    };
    Ok(Arc::new(table))
}

/// The error of a version of an existing table that cannot be loaded any more.
fn log_gone(table: &str, version: i64, cause: Option<IcePieError>) -> IcePieError {
    IcePieError::VersionNotFound {
        table: table.to_string(),
        detail: format!(
            "version {version} can no longer be read: the log entries it needs were removed \
             from the table's Delta log{}",
            cause.map(|e| format!(" ({e})")).unwrap_or_default()
        ),
    }
}

/// Pins the providers of a statement's time-travel calls until the guard is dropped.
async fn pin<'a>(shared: &'a CatalogState, stmt: &DFStatement) -> Result<PinGuard<'a>> {
    let mut calls = Calls::default();
    visit_queries(stmt, &mut calls);
    let mut guard = PinGuard {
        pins: &shared.pins,
        keys: Vec::new(),
    };
    for key in calls.0 {
        let pinned = match shared.pins.0.lock().expect("pins lock").get_mut(&key) {
            Some(entry) => {
                entry.1 += 1;
                true
            }
            None => false,
        };
        if !pinned {
            let explained = matches!(stmt, DFStatement::Explain(_));
            let table = open(shared, &key, explained).await?;
            let mut map = shared.pins.0.lock().expect("pins lock");
            map.entry(key.clone()).or_insert((table, 0)).1 += 1;
        }
        guard.keys.push(key);
    }
    Ok(guard)
}

/// Plans one parsed statement, time-travel calls included.
pub(crate) async fn plan_statement(
    state: &SessionState,
    shared: &CatalogState,
    stmt: DFStatement,
) -> Result<LogicalPlan> {
    shared.know_schemas(state, &stmt).await?;
    let id = STATEMENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    STATEMENT
        .scope(id, async {
            let _pins = pin(shared, &stmt).await?;
            Ok(state.statement_to_plan(stmt).await?)
        })
        .await
}

/// `slice_at`, `core_at` or `slice_history`: hands out the provider pinned for the call.
#[derive(Debug)]
pub(crate) struct PinnedFunction {
    function: &'static str,
    shared: Arc<CatalogState>,
}

impl PinnedFunction {
    /// The functions, by name, to register in a session.
    pub(crate) fn all(
        shared: &Arc<CatalogState>,
    ) -> Vec<(&'static str, Arc<dyn TableFunctionImpl>)> {
        [SLICE_AT, CORE_AT, SLICE_HISTORY, FRESH]
            .into_iter()
            .map(|function| {
                let f: Arc<dyn TableFunctionImpl> = Arc::new(Self {
                    function,
                    shared: shared.clone(),
                });
                (function, f)
            })
            .collect()
    }
}

impl TableFunctionImpl for PinnedFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> DFResult<Arc<dyn TableProvider>> {
        let values: Option<Vec<ScalarValue>> = args
            .exprs()
            .iter()
            .map(|e| match e {
                Expr::Literal(v, _) => Some(v.clone()),
                _ => None,
            })
            .collect();
        let key = values
            .and_then(|v| key_of(self.function, &v))
            .ok_or_else(|| DataFusionError::Plan(usage(self.function)))?;
        let map = self.shared.pins.0.lock().expect("pins lock");
        match map.get(&key) {
            Some((table, _)) => Ok(table.clone()),
            None => Err(DataFusionError::Plan(format!(
                "{}; and it works only in SQL run by icepie (IcePie::sql), not through the \
                 bare DataFusion context",
                usage(self.function)
            ))),
        }
    }
}
