//! Planning SQL as icepie does: the hook through which the core and the slices plan their
//! statements and definitions without knowing the catalog that implements it (time travel
//! and `fresh(…)` pin their tables while a statement is planned).

use std::ops::ControlFlow;

use async_trait::async_trait;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::{CopyToSource, DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{TableFactor, Visit, Visitor};
use datafusion::sql::sqlparser::dialect::GenericDialect;

use crate::error::{IcePieError, Result};

/// Name of the table function reading a slice at a version.
pub(crate) const SLICE_AT: &str = "slice_at";
/// Name of the table function reading a core table at a version.
pub(crate) const CORE_AT: &str = "core_at";
/// Name of the table function listing the commits of a slice (`SHOW SLICE HISTORY`).
pub(crate) const SLICE_HISTORY: &str = "slice_history";
/// Name of the table function reading a slice no staler than a limit.
pub(crate) const FRESH: &str = "fresh";

/// Plans statements with icepie's table functions.
#[async_trait]
pub(crate) trait Planner: Send + Sync {
    /// Plans one parsed statement.
    async fn plan_statement(&self, state: &SessionState, stmt: DFStatement) -> Result<LogicalPlan>;
}

/// Plans SQL text holding exactly one statement (a slice definition, a core table's source).
pub(crate) async fn plan_sql(
    planner: &dyn Planner,
    state: &SessionState,
    sql: &str,
) -> Result<LogicalPlan> {
    let mut statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {})?;
    if statements.len() != 1 {
        return Err(IcePieError::Syntax(format!(
            "expected exactly one statement, found {}",
            statements.len()
        )));
    }
    let stmt = statements.pop_front().expect("one statement");
    planner.plan_statement(state, stmt).await
}

/// The names of the table functions a statement calls, lowercased.
#[derive(Default)]
struct Called(Vec<String>);

impl Visitor for Called {
    type Break = ();

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name,
            args: Some(_),
            ..
        } = factor
        {
            self.0.push(name.to_string().to_ascii_lowercase());
        }
        ControlFlow::Continue(())
    }
}

/// Visits the queries of `stmt` (an `EXPLAIN`'s statement, a `COPY`'s query) with `visitor`.
pub(crate) fn visit_queries<V: Visitor<Break = ()>>(stmt: &DFStatement, visitor: &mut V) {
    match stmt {
        DFStatement::Statement(s) => {
            let _ = s.visit(visitor);
        }
        DFStatement::CopyTo(c) => {
            if let CopyToSource::Query(q) = &c.source {
                let _ = q.visit(visitor);
            }
        }
        DFStatement::Explain(e) => visit_queries(&e.statement, visitor),
        DFStatement::CreateExternalTable(_) | DFStatement::Reset(_) => {}
    }
}

/// True when the SQL text `sql` calls table function `function` (false when it does not
/// parse: its planning will say why).
pub(crate) fn calls(sql: &str, function: &str) -> bool {
    let Ok(statements) = DFParser::parse_sql_with_dialect(sql, &GenericDialect {}) else {
        return false;
    };
    statements.iter().any(|stmt| {
        let mut called = Called::default();
        visit_queries(stmt, &mut called);
        called.0.iter().any(|c| c == function)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_finds_a_table_function_wherever_the_statement_reads() {
        assert!(calls("SELECT * FROM fresh('d.s', '1 minute')", FRESH));
        assert!(calls(
            "SELECT * FROM core.t WHERE x IN (SELECT y FROM FRESH('d.s', '1 minute'))",
            FRESH
        ));
        assert!(calls(
            "EXPLAIN SELECT * FROM fresh('d.s', '1 minute')",
            FRESH
        ));
        assert!(!calls("SELECT fresh FROM core.t", FRESH));
        assert!(!calls("SELECT * FROM slice_at('d.s', 1)", FRESH));
        assert!(!calls("SELEC nothing", FRESH));
    }
}
