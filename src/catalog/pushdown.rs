//! What a query's filters say about the key columns of a system table, so that the table
//! reads only the slices (or core tables) the query asks for.

use std::collections::BTreeSet;

use datafusion::logical_expr::expr::InList;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};

/// The values `column` is limited to by `filters` (ANDed): from `column = 'v'`,
/// `column IN ('v', …)` and ORs of those; `None` when the filters do not limit it.
pub(crate) fn wanted(filters: &[Expr], column: &str) -> Option<BTreeSet<String>> {
    let mut out: Option<BTreeSet<String>> = None;
    for conjunct in filters.iter().flat_map(split_conjunction) {
        if let Some(values) = values_of(conjunct, column) {
            out = Some(match out {
                None => values,
                Some(prev) => prev.intersection(&values).cloned().collect(),
            });
        }
    }
    out
}

fn values_of(e: &Expr, column: &str) -> Option<BTreeSet<String>> {
    let is_column = |e: &Expr| matches!(e, Expr::Column(c) if c.name == column);
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::Eq if is_column(left) => text(right).map(|v| BTreeSet::from([v])),
            Operator::Eq if is_column(right) => text(left).map(|v| BTreeSet::from([v])),
            Operator::Or => {
                let mut l = values_of(left, column)?;
                l.extend(values_of(right, column)?);
                Some(l)
            }
            Operator::And => {
                // Either side limits the column; both do to their intersection.
                match (values_of(left, column), values_of(right, column)) {
                    (Some(l), Some(r)) => Some(l.intersection(&r).cloned().collect()),
                    (l, r) => l.or(r),
                }
            }
            _ => None,
        },
        Expr::InList(InList {
            expr,
            list,
            negated: false,
        }) if is_column(expr) => list.iter().map(text).collect(),
        _ => None,
    }
}

/// The text of a string literal.
fn text(e: &Expr) -> Option<String> {
    match e {
        Expr::Literal(v, _) => v.try_as_str().flatten().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{col, lit};

    fn set(values: &[&str]) -> Option<BTreeSet<String>> {
        Some(values.iter().map(|v| v.to_string()).collect())
    }

    #[test]
    fn equalities_in_lists_and_ors_limit_a_column() {
        assert_eq!(wanted(&[col("name").eq(lit("x"))], "name"), set(&["x"]));
        assert_eq!(wanted(&[lit("x").eq(col("name"))], "name"), set(&["x"]));
        assert_eq!(
            wanted(
                &[col("name").in_list(vec![lit("a"), lit("b")], false)],
                "name"
            ),
            set(&["a", "b"])
        );
        assert_eq!(
            wanted(
                &[col("name").eq(lit("a")).or(col("name").eq(lit("b")))],
                "name"
            ),
            set(&["a", "b"])
        );
        assert_eq!(
            wanted(
                &[
                    col("name").eq(lit("a")),
                    col("name").in_list(vec![lit("a"), lit("b")], false)
                ],
                "name"
            ),
            set(&["a"])
        );
        assert_eq!(
            wanted(
                &[col("domain").eq(lit("d")).and(col("name").eq(lit("x")))],
                "name"
            ),
            set(&["x"])
        );
    }

    #[test]
    fn anything_else_does_not() {
        assert_eq!(wanted(&[], "name"), None);
        assert_eq!(wanted(&[col("name").not_eq(lit("x"))], "name"), None);
        assert_eq!(wanted(&[col("other").eq(lit("x"))], "name"), None);
        assert_eq!(
            wanted(
                &[col("name").eq(lit("a")).or(col("state").eq(lit("fresh")))],
                "name"
            ),
            None
        );
        assert_eq!(
            wanted(&[col("name").in_list(vec![lit("a")], true)], "name"),
            None
        );
        assert_eq!(wanted(&[col("name").eq(lit(1))], "name"), None);
    }
}
