//! The slice that would answer every query of a shape: a query with its literal filters taken
//! out and their columns kept instead, so that one slice serves the query whatever values it
//! filters on (`system.proposals`, kind `new_slice`).
//!
//! `SELECT region, sum(amount) FROM core.orders WHERE day = '2026-11-01' GROUP BY region`
//! becomes `SELECT day, region, sum(amount) FROM core.orders GROUP BY region, day`, and
//! `SELECT id, amount FROM core.orders WHERE region IN ('eu', 'us') ORDER BY id LIMIT 10`
//! becomes `SELECT region, id, amount FROM core.orders`. Only plain `SELECT`s are taken (no
//! `WITH`, set operations, `DISTINCT`, `HAVING` or window clauses); filters that are not a
//! column against literals (`=`, `<>`, `<`, `<=`, `>`, `>=`, `IN`, `BETWEEN`) stay as they are.

use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, GroupByExpr, Query, SelectItem, SetExpr, UnaryOperator,
};

/// The slice definition generalizing `query`, whose plan aggregates when `aggregate`; `None`
/// when the query is not of a shape this handles.
pub(crate) fn slice_definition(query: &Query, aggregate: bool) -> Option<String> {
    if query.with.is_some() || !query.pipe_operators.is_empty() {
        return None;
    }
    let mut query = query.clone();
    // A slice holds every row: order and limits are the readers'.
    query.order_by = None;
    query.limit_clause = None;
    query.fetch = None;
    let SetExpr::Select(select) = query.body.as_mut() else {
        return None;
    };
    if select.distinct.is_some() || select.having.is_some() || !select.named_window.is_empty() {
        return None;
    }
    let mut kept = Vec::new();
    let mut columns: Vec<Expr> = Vec::new();
    for conjunct in select.selection.take().map(conjuncts).unwrap_or_default() {
        match literal_filter(&conjunct) {
            Some(column) => {
                if !columns.contains(column) {
                    columns.push(column.clone());
                }
            }
            None => kept.push(conjunct),
        }
    }
    select.selection = kept.into_iter().reduce(|a, b| Expr::BinaryOp {
        left: Box::new(a),
        op: BinaryOperator::And,
        right: Box::new(b),
    });
    let projected = |select: &[SelectItem], c: &Expr| {
        select.iter().any(|item| match item {
            SelectItem::UnnamedExpr(e) => e == c,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => !aggregate,
            _ => false,
        })
    };
    let missing: Vec<SelectItem> = columns
        .iter()
        .filter(|c| !projected(&select.projection, c))
        .map(|c| SelectItem::UnnamedExpr(c.clone()))
        .collect();
    select.projection.splice(0..0, missing);
    if aggregate {
        match &mut select.group_by {
            GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => {
                for c in columns {
                    if !exprs.contains(&c) {
                        exprs.push(c);
                    }
                }
            }
            _ => return None,
        }
    }
    Some(query.to_string())
}

/// The conjuncts of `e` (`a AND b AND c`).
fn conjuncts(e: Expr) -> Vec<Expr> {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut out = conjuncts(*left);
            out.extend(conjuncts(*right));
            out
        }
        Expr::Nested(inner)
            if matches!(
                *inner,
                Expr::BinaryOp {
                    op: BinaryOperator::And,
                    ..
                }
            ) =>
        {
            conjuncts(*inner)
        }
        other => vec![other],
    }
}

/// The column of a filter comparing a column with literals, if `e` is one.
fn literal_filter(e: &Expr) -> Option<&Expr> {
    match e {
        Expr::BinaryOp {
            left,
            op:
                BinaryOperator::Eq
                | BinaryOperator::NotEq
                | BinaryOperator::Lt
                | BinaryOperator::LtEq
                | BinaryOperator::Gt
                | BinaryOperator::GtEq,
            right,
        } => {
            if is_column(left) && is_literal(right) {
                Some(left)
            } else if is_column(right) && is_literal(left) {
                Some(right)
            } else {
                None
            }
        }
        Expr::InList { expr, list, .. } if is_column(expr) && list.iter().all(is_literal) => {
            Some(expr)
        }
        Expr::Between {
            expr, low, high, ..
        } if is_column(expr) && is_literal(low) && is_literal(high) => Some(expr),
        Expr::Nested(inner) => literal_filter(inner),
        _ => None,
    }
}

fn is_column(e: &Expr) -> bool {
    matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
}

fn is_literal(e: &Expr) -> bool {
    match e {
        Expr::Value(_) | Expr::TypedString { .. } => true,
        Expr::UnaryOp {
            op: UnaryOperator::Minus | UnaryOperator::Plus,
            expr,
        } => is_literal(expr),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => is_literal(expr),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::ast::Statement;
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn general(sql: &str, aggregate: bool) -> Option<String> {
        let Statement::Query(q) = Parser::parse_sql(&GenericDialect {}, sql)
            .unwrap()
            .remove(0)
        else {
            panic!("{sql}")
        };
        slice_definition(&q, aggregate)
    }

    #[test]
    fn literal_filters_become_kept_columns() {
        assert_eq!(
            general(
                "SELECT region, sum(amount) AS total FROM core.orders \
                 WHERE day = DATE '2026-11-01' AND amount > 5 AND region <> note \
                 GROUP BY region ORDER BY total DESC LIMIT 3",
                true
            )
            .unwrap(),
            "SELECT day, amount, region, sum(amount) AS total FROM core.orders \
             WHERE region <> note GROUP BY region, day, amount"
        );
        assert_eq!(
            general(
                "SELECT count(*) FROM core.t WHERE k IN (1, 2) AND (v BETWEEN -1 AND 9)",
                true
            )
            .unwrap(),
            "SELECT k, v, count(*) FROM core.t GROUP BY k, v"
        );
        assert_eq!(
            general("SELECT id, amount FROM core.t WHERE 'eu' = region", false).unwrap(),
            "SELECT region, id, amount FROM core.t"
        );
        assert_eq!(
            general("SELECT * FROM core.t WHERE k = 1", false).unwrap(),
            "SELECT * FROM core.t"
        );
        // The same shape with other values: the same slice.
        assert_eq!(
            general(
                "SELECT k, count(*) FROM core.t WHERE k = 7 GROUP BY k",
                true
            ),
            general(
                "SELECT k, count(*) FROM core.t WHERE k = 9 GROUP BY k",
                true
            ),
        );
    }

    #[test]
    fn other_shapes_are_left_alone() {
        for sql in [
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "SELECT k FROM core.t UNION ALL SELECT k FROM core.u",
            "SELECT DISTINCT k FROM core.t WHERE v = 1",
            "SELECT k, count(*) FROM core.t GROUP BY k HAVING count(*) > 1",
        ] {
            assert_eq!(general(sql, sql.contains("count")), None, "{sql}");
        }
    }
}
