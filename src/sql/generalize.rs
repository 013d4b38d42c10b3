//! The slice that would answer every query of a shape: a query with its literal filters taken
//! out and their columns kept instead, so that one slice serves the query whatever values it
//! filters on (`system.proposals`, kind `new_slice`).
//!
//! `SELECT region, sum(amount) FROM core.orders WHERE day = '2026-11-01' GROUP BY region`
//! becomes `SELECT region, sum(amount), day FROM core.orders GROUP BY region, day`, and
//! `SELECT o.id, c.name FROM core.orders o JOIN core.customers c ON … WHERE c.region IN
//! ('eu', 'us') ORDER BY o.id LIMIT 10` becomes `SELECT o.id, c.name, c.region FROM …`. Only
//! plain `SELECT`s are taken (no `WITH`, set operations, `DISTINCT`, `HAVING`, `INTO` or
//! window clauses), and not a plain copy of one table's rows (nothing a slice saves); filters
//! that are not a column against literals or parameters (`=`, `<>`, `<`, `<=`, `>`, `>=`,
//! `IN`, `BETWEEN`) stay as they are.

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
    if select.distinct.is_some()
        || select.having.is_some()
        || !select.named_window.is_empty()
        || select.into.is_some()
    {
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
    // Each kept column once, under its own name: a filter column whose name the output
    // already has for something else (`k AS v … WHERE v = 1`, `o.id = 1 AND c.id = 2`)
    // cannot be added.
    let one_table = select.from.len() == 1 && select.from[0].joins.is_empty();
    let mut added: Vec<String> = Vec::new();
    for c in &columns {
        let name = column_name(c)?;
        let taken = select
            .projection
            .iter()
            .find(|item| output_name(item) == Some(name));
        match taken {
            // The same column, named with or without its table (one table: no doubt).
            Some(SelectItem::UnnamedExpr(e)) if column_name(e) == Some(name) => {
                if e != c && !one_table {
                    return None;
                }
            }
            Some(_) => return None,
            // A plain `*` has every column (and an aggregate has none of them).
            None if !aggregate
                && select
                    .projection
                    .iter()
                    .any(|i| matches!(i, SelectItem::Wildcard(_))) => {}
            None => {
                if added.iter().any(|a| a == name) {
                    return None;
                }
                added.push(name.to_string());
                select.projection.push(SelectItem::UnnamedExpr(c.clone()));
            }
        }
    }
    if aggregate {
        match &mut select.group_by {
            GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => {
                for c in columns {
                    if !exprs.iter().any(|e| column_name(e) == column_name(&c)) {
                        exprs.push(c);
                    }
                }
            }
            _ => return None,
        }
    }
    // A copy of one table's rows, or columns of them: nothing a slice saves over the core.
    let bare = !aggregate && select.selection.is_none() && one_table;
    let definition = query.to_string();
    // A parameter left (`SELECT $1 …`) has no value in a definition.
    let parameter = definition
        .as_bytes()
        .windows(2)
        .any(|w| w[0] == b'$' && w[1].is_ascii_digit());
    (!bare && !parameter).then_some(definition)
}

/// The unqualified name of a column reference.
fn column_name(e: &Expr) -> Option<&str> {
    match e {
        Expr::Identifier(id) => Some(&id.value),
        Expr::CompoundIdentifier(ids) => ids.last().map(|id| id.value.as_str()),
        _ => None,
    }
}

/// The name an item of a projection gives its column, when it is known from the text.
fn output_name(item: &SelectItem) -> Option<&str> {
    match item {
        SelectItem::UnnamedExpr(e) => column_name(e),
        SelectItem::ExprWithAlias { alias, .. } => Some(&alias.value),
        _ => None,
    }
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
            "SELECT region, sum(amount) AS total, day, amount FROM core.orders \
             WHERE region <> note GROUP BY region, day, amount"
        );
        assert_eq!(
            general(
                "SELECT count(*) FROM core.t WHERE k IN (1, 2) AND (v BETWEEN -1 AND 9)",
                true
            )
            .unwrap(),
            "SELECT count(*), k, v FROM core.t GROUP BY k, v"
        );
        assert_eq!(
            general(
                "SELECT o.id, c.name FROM core.o AS o JOIN core.c AS c ON o.k = c.k \
                 WHERE 'eu' = c.region",
                false
            )
            .unwrap(),
            "SELECT o.id, c.name, c.region FROM core.o AS o JOIN core.c AS c ON o.k = c.k"
        );
        assert_eq!(
            general("SELECT * FROM core.t WHERE k = 1 AND v > w", false).unwrap(),
            "SELECT * FROM core.t WHERE v > w"
        );
        // Qualified or not, a column is kept once.
        assert_eq!(
            general(
                "SELECT t.k, count(*) FROM core.t AS t WHERE k = 1 GROUP BY t.k",
                true
            )
            .unwrap(),
            "SELECT t.k, count(*) FROM core.t AS t GROUP BY t.k"
        );
        // Positions keep their meaning.
        assert_eq!(
            general(
                "SELECT k, count(*) FROM core.t WHERE v = 1 GROUP BY 1",
                true
            )
            .unwrap(),
            "SELECT k, count(*), v FROM core.t GROUP BY 1, v"
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
            // A copy of the table, or of some of its columns.
            "SELECT * FROM core.t WHERE k = 1",
            "SELECT k FROM core.t WHERE v IN (1, 2)",
            // Names that would clash.
            "SELECT k AS v, count(*) FROM core.t WHERE v = 1 GROUP BY k",
            "SELECT o.x FROM core.o AS o JOIN core.c AS c ON o.k = c.k WHERE o.id = 1 AND c.id = 2",
            // INTO, and parameters left outside the filters.
            "SELECT * INTO tmp FROM core.t WHERE k = 1 AND v > w",
            "SELECT $1, k FROM core.t WHERE v > w",
        ] {
            assert_eq!(general(sql, sql.contains("count")), None, "{sql}");
        }
    }
}
