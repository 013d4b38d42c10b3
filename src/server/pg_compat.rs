//! PostgreSQL compatibility of the statements a PostgreSQL client sends: the queries that ask
//! PostgreSQL's catalog, parsed as PostgreSQL parses them and rewritten by
//! datafusion-pg-catalog, and `SHOW` of the settings drivers and BI tools ask for.

use std::ops::ControlFlow;
use std::sync::LazyLock;

use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;

use crate::engine::IcePie;
use crate::error::IcePieError;
use crate::sql::{DataFusionStatement, Statement};

/// The statements of a PostgreSQL client's text. A query that asks PostgreSQL's catalog
/// ([`asks_postgres`]: what psql, DBeaver, Metabase and Grafana send to list and describe
/// tables) is parsed as PostgreSQL parses it and goes through datafusion-pg-catalog's rewrites
/// into a query DataFusion runs (`COLLATE pg_catalog.default` dropped, `'name'::regclass`
/// looked up, a few whole queries answered empty, ...). Every other statement, in the same text
/// too, is parsed as everywhere else, so a user's query means over PostgreSQL what it means in
/// the REPL (the rewrites would change some: a scalar subquery they take for correlated
/// becomes NULL).
pub(super) fn parse_pg(sql: &str) -> Result<Vec<Statement>, IcePieError> {
    static POSTGRES: LazyLock<PostgresCompatibilityParser> =
        LazyLock::new(PostgresCompatibilityParser::new);
    let wrap = |s: SqlStatement| {
        Statement::DataFusion(DataFusionStatement(Box::new(DFStatement::Statement(
            Box::new(s),
        ))))
    };
    // PostgreSQL's statements of `text` when they are all queries.
    let queries = |text: &str| {
        POSTGRES
            .parse(text)
            .ok()
            .filter(|p| !p.is_empty() && p.iter().all(|s| matches!(s, SqlStatement::Query(_))))
    };
    let asks = |s: &Statement| {
        matches!(s, Statement::DataFusion(inner)
            if matches!(&*inner.0, DFStatement::Statement(q) if asks_postgres(q)))
    };
    match IcePie::parse(sql) {
        Ok(statements) => {
            // PostgreSQL's reading of the whole text, statement for statement (a statement's
            // own text may not survive being printed by another parser: `ARRAY(SELECT …)`).
            let whole = match statements.iter().any(asks) {
                true => POSTGRES
                    .parse(sql)
                    .ok()
                    .filter(|p| p.len() == statements.len()),
                false => None,
            };
            statements
                .into_iter()
                .enumerate()
                .map(|(i, statement)| {
                    if !asks(&statement) {
                        return show_postgres(statement);
                    }
                    let own = match (whole.as_ref().map(|p| &p[i]), &statement) {
                        (Some(query @ SqlStatement::Query(_)), _) => Some(query.clone()),
                        // Its printed text, when the whole text is not PostgreSQL's.
                        (_, Statement::DataFusion(inner)) => queries(&inner.to_string())
                            .filter(|p| p.len() == 1)
                            .and_then(|mut p| p.pop()),
                        _ => None,
                    };
                    Ok(own.map(wrap).unwrap_or(statement))
                })
                .collect()
        }
        // PostgreSQL syntax beyond icepie's, in a text about the catalog: all of it is
        // PostgreSQL's, when it parses as queries.
        Err(e) => match sql.to_ascii_lowercase().contains("pg_catalog") {
            true => queries(sql)
                .map(|parsed| parsed.into_iter().map(wrap).collect())
                .ok_or(e),
            false => Err(e),
        },
    }
}

/// True when `statement` is a query that names PostgreSQL's catalog: a `pg_catalog` table (or
/// a bare `pg_*` one), a `pg_catalog.` function, a `COLLATE`, an `OPERATOR(...)` or a cast to
/// an oid type (`::regclass`, `::pg_catalog.regtype`).
fn asks_postgres(statement: &SqlStatement) -> bool {
    use datafusion::sql::sqlparser::ast::{
        visit_expressions, visit_relations, BinaryOperator, DataType as SqlType, Expr, ObjectName,
    };
    if !matches!(statement, SqlStatement::Query(_)) {
        return false;
    }
    let parts = |name: &ObjectName| -> Vec<String> {
        name.0
            .iter()
            .filter_map(|p| p.as_ident())
            .map(|i| i.value.to_ascii_lowercase())
            .collect()
    };
    let relation = visit_relations(statement, |name| {
        let parts = parts(name);
        match parts.as_slice() {
            [schema, _] if schema == "pg_catalog" => ControlFlow::Break(()),
            [table] if table.starts_with("pg_") => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    });
    relation.is_break()
        || visit_expressions(statement, |e| match e {
            Expr::Collate { .. }
            | Expr::BinaryOp {
                op: BinaryOperator::PGCustomBinaryOperator(_),
                ..
            }
            | Expr::Cast {
                data_type: SqlType::Regclass,
                ..
            } => ControlFlow::Break(()),
            Expr::Cast {
                data_type: SqlType::Custom(name, _),
                ..
            } if parts(name).last().is_some_and(|t| t.starts_with("reg")) => ControlFlow::Break(()),
            Expr::Function(f) if parts(&f.name).first().is_some_and(|s| s == "pg_catalog") => {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        })
        .is_break()
}

/// `SHOW` of a PostgreSQL setting ([`super::postgres_setting`]) as the query of its one row;
/// any other statement as it is.
fn show_postgres(statement: Statement) -> Result<Statement, IcePieError> {
    let Statement::DataFusion(inner) = &statement else {
        return Ok(statement);
    };
    let DFStatement::Statement(sql) = &*inner.0 else {
        return Ok(statement);
    };
    let SqlStatement::ShowVariable { variable } = &**sql else {
        return Ok(statement);
    };
    let name = variable
        .iter()
        .map(|i| i.value.to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(" ");
    let Some((column, value)) = super::postgres_setting(&name) else {
        return Ok(statement);
    };
    let query = format!("SELECT '{}' AS \"{column}\"", value.replace('\'', "''"));
    Ok(IcePie::parse(&query)?.remove(0))
}
