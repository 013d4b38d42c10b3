//! Parsing icepie statements by wrapping DataFusion's `DFParser` (the pattern of DataFusion's
//! `custom_sql_parser` example): the first words of each statement decide whether icepie parses
//! it; everything else goes to `DFParser::parse_statement` unchanged.
//!
//! # Invariants
//!
//! - Bad SQL gets a typed error that says what was wrong, never a panic (invariant 7;
//!   `tests::bad_statements_are_syntax_errors_not_panics`, and the property tests
//!   `parser_fuzz::random_text_never_panics`, `parser_fuzz::mutated_statements_never_panic`).

use datafusion::sql::parser::{DFParser, DFParserBuilder};
use datafusion::sql::sqlparser::ast::{Ident, ObjectName};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::Token;

use super::{ClusterBy, DataFusionStatement, RefreshMode, SourceQuery};
use super::{
    CreateCoreTable, CreateSlice, DataSource, FileFormat, Ingest, RefreshPolicy, Statement,
};
use crate::error::{IcePieError, Result};
use crate::storage::names::{self, SliceName, DEFAULT_DOMAIN};

/// Parses `sql` into statements (several may be separated by `;`).
pub(crate) fn parse_sql(sql: &str) -> Result<Vec<Statement>> {
    let dialect = GenericDialect {};
    let mut df = DFParserBuilder::new(sql)
        .with_dialect(&dialect)
        .build()
        .map_err(syntax)?;
    let mut out = Vec::new();
    let mut expecting_delimiter = false;
    loop {
        while df.parser.consume_token(&Token::SemiColon) {
            expecting_delimiter = false;
        }
        if df.parser.peek_token() == Token::EOF {
            break;
        }
        if expecting_delimiter {
            let found = df.parser.peek_token();
            return Err(IcePieError::Syntax(format!(
                "Expected: end of statement, found: {found}{}",
                found.span.start
            )));
        }
        out.push(parse_statement(&mut df)?);
        expecting_delimiter = true;
    }
    Ok(out)
}

fn syntax(e: impl std::fmt::Display) -> IcePieError {
    let msg = e.to_string();
    let msg = msg
        .strip_prefix("SQL error: ParserError(\"")
        .and_then(|m| m.strip_suffix("\")"))
        .map(str::to_string)
        .unwrap_or(msg);
    IcePieError::Syntax(msg)
}

/// True when the token at `n` ahead is the unquoted word `word` (case-insensitive).
fn word_at(p: &Parser, n: usize, word: &str) -> bool {
    matches!(&p.peek_nth_token(n).token,
        Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

fn starts_with(p: &Parser, words: &[&str]) -> bool {
    words.iter().enumerate().all(|(i, w)| word_at(p, i, w))
}

fn parse_statement(df: &mut DFParser) -> Result<Statement> {
    let p = &mut df.parser;
    let stmt = if starts_with(p, &["CREATE", "CORE", "TABLE"]) {
        p.next_token();
        p.next_token();
        p.next_token();
        Statement::CreateCoreTable(parse_create_core(p)?)
    } else if starts_with(p, &["CREATE", "SLICE"])
        || starts_with(p, &["CREATE", "OR", "REPLACE", "SLICE"])
    {
        p.next_token();
        let or_replace = p.parse_keywords(&[Keyword::OR, Keyword::REPLACE]);
        p.next_token();
        Statement::CreateSlice(parse_create_slice(p, or_replace)?)
    } else if starts_with(p, &["INGEST"]) {
        p.next_token();
        Statement::Ingest(parse_ingest(p)?)
    } else if starts_with(p, &["DROP", "CORE", "TABLE"]) {
        p.next_token();
        p.next_token();
        p.next_token();
        let if_exists = p.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
        let name = core_name(p)?;
        Statement::DropCoreTable { name, if_exists }
    } else if starts_with(p, &["DROP", "SLICE"]) {
        p.next_token();
        p.next_token();
        let if_exists = p.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
        Statement::DropSlice {
            name: slice_name(p)?,
            if_exists,
        }
    } else if starts_with(p, &["REFRESH", "SLICE"]) {
        p.next_token();
        p.next_token();
        let name = slice_name(p)?;
        let full = word_at(p, 0, "FULL");
        if full {
            p.next_token();
        }
        Statement::RefreshSlice { name, full }
    } else if starts_with(p, &["EXPLAIN", "REFRESH", "SLICE"]) {
        for _ in 0..3 {
            p.next_token();
        }
        Statement::ExplainRefresh(slice_name(p)?)
    } else if starts_with(p, &["SHOW", "CORE", "TABLES"]) {
        for _ in 0..3 {
            p.next_token();
        }
        Statement::ShowCoreTables
    } else if starts_with(p, &["SHOW", "SLICES"]) {
        p.next_token();
        p.next_token();
        Statement::ShowSlices
    } else if starts_with(p, &["SHOW", "SLICE", "HISTORY"]) {
        for _ in 0..3 {
            p.next_token();
        }
        Statement::ShowSliceHistory(slice_name(p)?)
    } else if starts_with(p, &["FREEZE", "SLICE"]) {
        p.next_token();
        p.next_token();
        let name = slice_name(p)?;
        let reason = match p.peek_token().token {
            Token::SingleQuotedString(_) => Some(p.parse_literal_string()?),
            _ => None,
        };
        Statement::FreezeSlice { name, reason }
    } else if starts_with(p, &["ALTER", "SLICE"]) {
        p.next_token();
        p.next_token();
        parse_alter_slice(p)?
    } else if starts_with(p, &["APPLY", "PROPOSAL"]) {
        p.next_token();
        p.next_token();
        Statement::ApplyProposal(proposal_number(p)?)
    } else if starts_with(p, &["DISMISS", "PROPOSAL"]) {
        p.next_token();
        p.next_token();
        Statement::DismissProposal(proposal_number(p)?)
    } else if starts_with(p, &["THAW", "SLICE"]) {
        p.next_token();
        p.next_token();
        Statement::ThawSlice(slice_name(p)?)
    } else if starts_with(p, &["ROLLBACK", "SLICE"]) {
        p.next_token();
        p.next_token();
        let name = slice_name(p)?;
        p.expect_keyword(Keyword::TO)?;
        p.expect_keyword(Keyword::VERSION)?;
        let version = p.parse_literal_uint()?;
        let version = i64::try_from(version)
            .map_err(|_| IcePieError::Syntax(format!("version {version} is too large")))?;
        Statement::RollbackSlice { name, version }
    } else if starts_with(p, &["VACUUM", "SLICES"]) {
        p.next_token();
        p.next_token();
        Statement::Vacuum(None)
    } else if starts_with(p, &["VACUUM", "SLICE"]) {
        p.next_token();
        p.next_token();
        Statement::Vacuum(Some(slice_name(p)?))
    } else if starts_with(p, &["VERIFY", "SLICES"]) {
        p.next_token();
        p.next_token();
        Statement::Verify(None)
    } else if starts_with(p, &["VERIFY", "SLICE"]) {
        p.next_token();
        p.next_token();
        Statement::Verify(Some(slice_name(p)?))
    } else if starts_with(p, &["DESCRIBE", "SLICE"]) || starts_with(p, &["DESC", "SLICE"]) {
        p.next_token();
        p.next_token();
        Statement::DescribeSlice(slice_name(p)?)
    } else {
        return Ok(Statement::DataFusion(DataFusionStatement(Box::new(
            df.parse_statement().map_err(syntax)?,
        ))));
    };
    Ok(stmt)
}

/// The parts of an object name, unquoted parts lowercased as DataFusion normalizes them.
fn name_parts(p: &mut Parser) -> Result<Vec<String>> {
    let name: ObjectName = p.parse_object_name(false)?;
    Ok(name
        .0
        .iter()
        .map(|part| match part.as_ident() {
            Some(id) if id.quote_style.is_none() => id.value.to_ascii_lowercase(),
            Some(id) => id.value.clone(),
            None => part.to_string(),
        })
        .collect())
}

fn slice_name(p: &mut Parser) -> Result<SliceName> {
    let parts = name_parts(p)?;
    match parts.as_slice() {
        [name] => SliceName::new(DEFAULT_DOMAIN, name.clone()),
        [domain, name] => SliceName::new(domain.clone(), name.clone()),
        _ => Err(IcePieError::InvalidName {
            name: parts.join("."),
            reason: "a slice name is `name` or `domain.name`".into(),
        }),
    }
}

fn core_name(p: &mut Parser) -> Result<String> {
    names::core_name(&name_parts(p)?)
}

fn parse_files(p: &mut Parser) -> Result<DataSource> {
    let location = p.parse_literal_string()?;
    let format = if word_at(p, 0, "FORMAT") {
        p.next_token();
        let tok = p.next_token();
        let fmt = match &tok.token {
            Token::Word(w) => FileFormat::from_name(&w.value),
            Token::SingleQuotedString(s) => FileFormat::from_name(s),
            _ => None,
        };
        match fmt {
            Some(f) => Some(f),
            None => {
                return Err(IcePieError::Syntax(format!(
                    "unknown FORMAT {tok}{}: use parquet, csv or json",
                    tok.span.start
                )))
            }
        }
    } else {
        None
    };
    Ok(DataSource::Files { location, format })
}

fn parse_create_core(p: &mut Parser) -> Result<CreateCoreTable> {
    let if_not_exists = p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = core_name(p)?;
    let (columns, constraints) = p.parse_columns()?;
    if !constraints.is_empty() {
        return Err(IcePieError::Syntax(
            "core tables take no table constraints; declare columns as `name type [NOT NULL]`"
                .into(),
        ));
    }
    let source = if p.parse_keyword(Keyword::FROM) {
        Some(parse_files(p)?)
    } else if p.parse_keyword(Keyword::AS) {
        Some(DataSource::Query(SourceQuery(p.parse_query()?)))
    } else {
        None
    };
    if columns.is_empty() && source.is_none() {
        return Err(IcePieError::Syntax(format!(
            "CREATE CORE TABLE {name} needs columns, FROM 'location' or AS query"
        )));
    }
    Ok(CreateCoreTable {
        name,
        if_not_exists,
        columns,
        source,
    })
}

fn parse_ingest(p: &mut Parser) -> Result<Ingest> {
    p.expect_keyword(Keyword::INTO)?;
    let table = core_name(p)?;
    let source = if p.parse_keyword(Keyword::FROM) {
        parse_files(p)?
    } else {
        DataSource::Query(SourceQuery(p.parse_query()?))
    };
    Ok(Ingest { table, source })
}

fn parse_create_slice(p: &mut Parser, or_replace: bool) -> Result<CreateSlice> {
    let if_not_exists = p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    if or_replace && if_not_exists {
        return Err(IcePieError::Syntax(
            "CREATE OR REPLACE SLICE cannot have IF NOT EXISTS; use one or the other".into(),
        ));
    }
    let name = slice_name(p)?;
    let (mut owner, mut refresh, mut partition_by) = (None, None, None);
    let (mut mode, mut cluster_by) = (None, None);
    loop {
        let named = [
            ("INCREMENTAL", RefreshMode::Incremental),
            ("FULL", RefreshMode::Full),
            ("AUTO", RefreshMode::Auto),
        ]
        .into_iter()
        .find(|(word, _)| word_at(p, 0, word));
        if let Some((word, m)) = named {
            if mode.is_some() {
                return Err(IcePieError::Syntax(format!(
                    "{word} after another refresh mode: give one of INCREMENTAL, FULL or AUTO"
                )));
            }
            p.next_token();
            mode = Some(m);
            continue;
        }
        if word_at(p, 0, "OWNER") && owner.is_none() {
            p.next_token();
            owner = Some(p.parse_literal_string()?);
        } else if word_at(p, 0, "REFRESH") && refresh.is_none() {
            p.next_token();
            refresh = Some(parse_refresh_policy(p)?);
        } else if starts_with(p, &["CLUSTER", "BY"]) && cluster_by.is_none() {
            p.next_token();
            p.next_token();
            cluster_by = Some(parse_cluster_by(p)?);
        } else if p.peek_keyword_pair(Keyword::PARTITION, Keyword::BY) && partition_by.is_none() {
            p.next_token();
            p.next_token();
            p.expect_token(&Token::LParen)?;
            let cols = p.parse_comma_separated(|p| p.parse_identifier())?;
            p.expect_token(&Token::RParen)?;
            partition_by = Some(cols.into_iter().map(column_name).collect());
        } else {
            break;
        }
    }
    p.expect_keyword(Keyword::AS)?;
    let query = p.parse_query()?;
    Ok(CreateSlice {
        name,
        or_replace,
        if_not_exists,
        owner,
        refresh: refresh.unwrap_or_default(),
        partition_by: partition_by.unwrap_or_default(),
        refresh_mode: mode.unwrap_or_default(),
        cluster_by: cluster_by.unwrap_or(ClusterBy::Auto),
        query,
    })
}

/// A refresh policy after `REFRESH`: `MANUAL`, `EVERY 'interval'`, `ON CHANGE` or
/// `AUTO [LAG 'interval']`.
fn parse_refresh_policy(p: &mut Parser) -> Result<RefreshPolicy> {
    Ok(if word_at(p, 0, "MANUAL") {
        p.next_token();
        RefreshPolicy::Manual
    } else if word_at(p, 0, "EVERY") {
        p.next_token();
        let interval = p.parse_literal_string()?;
        RefreshPolicy::parse(&format!("every '{interval}'"))?
    } else if starts_with(p, &["ON", "CHANGE"]) {
        p.next_token();
        p.next_token();
        RefreshPolicy::OnChange
    } else if word_at(p, 0, "AUTO") {
        p.next_token();
        if word_at(p, 0, "LAG") {
            p.next_token();
            let lag = p.parse_literal_string()?;
            RefreshPolicy::parse(&format!("auto lag '{lag}'"))?
        } else {
            RefreshPolicy::Auto(None)
        }
    } else {
        return Err(p
            .expected::<()>(
                "MANUAL, EVERY 'interval', ON CHANGE or AUTO [LAG 'interval']",
                p.peek_token(),
            )
            .unwrap_err()
            .into());
    })
}

/// A layout after `CLUSTER BY`: `AUTO`, `NONE` or `(columns)`.
fn parse_cluster_by(p: &mut Parser) -> Result<ClusterBy> {
    Ok(if word_at(p, 0, "AUTO") {
        p.next_token();
        ClusterBy::Auto
    } else if word_at(p, 0, "NONE") {
        p.next_token();
        ClusterBy::None
    } else if p.peek_token().token == Token::LParen {
        p.next_token();
        let cols = p.parse_comma_separated(|p| p.parse_identifier())?;
        p.expect_token(&Token::RParen)?;
        ClusterBy::Columns(cols.into_iter().map(column_name).collect())
    } else {
        return Err(p
            .expected::<()>("AUTO, NONE or (columns) after CLUSTER BY", p.peek_token())
            .unwrap_err()
            .into());
    })
}

/// `ALTER SLICE name SET REFRESH … [CLUSTER BY …]` (either clause, or both in any order).
fn parse_alter_slice(p: &mut Parser) -> Result<Statement> {
    let name = slice_name(p)?;
    p.expect_keyword(Keyword::SET)?;
    let (mut refresh, mut cluster_by) = (None, None);
    loop {
        if word_at(p, 0, "REFRESH") && refresh.is_none() {
            p.next_token();
            refresh = Some(parse_refresh_policy(p)?);
        } else if starts_with(p, &["CLUSTER", "BY"]) && cluster_by.is_none() {
            p.next_token();
            p.next_token();
            cluster_by = Some(parse_cluster_by(p)?);
        } else {
            break;
        }
        // `SET REFRESH … , CLUSTER BY …` reads as well as without the comma.
        let _ = p.consume_token(&Token::Comma);
    }
    if refresh.is_none() && cluster_by.is_none() {
        return Err(p
            .expected::<()>(
                "REFRESH … or CLUSTER BY … after ALTER SLICE … SET",
                p.peek_token(),
            )
            .unwrap_err()
            .into());
    }
    Ok(Statement::AlterSlice {
        name,
        refresh,
        cluster_by,
    })
}

/// A proposal's number after `APPLY PROPOSAL` or `DISMISS PROPOSAL`.
fn proposal_number(p: &mut Parser) -> Result<i64> {
    let n = p.parse_literal_uint()?;
    i64::try_from(n).map_err(|_| IcePieError::Syntax(format!("no proposal has number {n}")))
}

/// A column named in a clause, as SQL folds it: unquoted names in lower case.
fn column_name(c: Ident) -> String {
    match c.quote_style {
        None => c.value.to_ascii_lowercase(),
        Some(_) => c.value,
    }
}

trait PeekPair {
    fn peek_keyword_pair(&self, a: Keyword, b: Keyword) -> bool;
}

impl PeekPair for Parser<'_> {
    fn peek_keyword_pair(&self, a: Keyword, b: Keyword) -> bool {
        let is = |n: usize, k: Keyword| matches!(&self.peek_nth_token(n).token, Token::Word(w) if w.keyword == k);
        is(0, a) && is(1, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        let mut v = parse_sql(sql).unwrap();
        assert_eq!(v.len(), 1, "{sql}");
        v.remove(0)
    }

    #[test]
    fn alter_slice_and_proposal_statements() {
        let Statement::AlterSlice {
            name,
            refresh,
            cluster_by,
        } = one("alter slice Sales.daily set cluster by (Region) refresh auto lag '1 hour'")
        else {
            panic!()
        };
        assert_eq!(name.to_string(), "sales.daily");
        assert_eq!(refresh, Some(RefreshPolicy::Auto(Some("1 hour".into()))));
        assert_eq!(cluster_by, Some(ClusterBy::Columns(vec!["region".into()])));
        assert!(matches!(
            one("ALTER SLICE s SET REFRESH MANUAL"),
            Statement::AlterSlice {
                refresh: Some(RefreshPolicy::Manual),
                cluster_by: None,
                ..
            }
        ));
        assert_eq!(one("apply proposal 42"), Statement::ApplyProposal(42));
        assert_eq!(one("DISMISS PROPOSAL 7"), Statement::DismissProposal(7));
        for bad in [
            "ALTER SLICE s SET",
            "ALTER SLICE s REFRESH MANUAL",
            "APPLY PROPOSAL x",
        ] {
            assert!(parse_sql(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_slice_with_all_clauses_in_any_order() {
        let Statement::CreateSlice(s) = one(
            "create or replace slice Finance.revenue refresh every '5 minutes' owner 'fin' \
             partition by (day) as select 1 as x",
        ) else {
            panic!()
        };
        assert_eq!(s.name.to_string(), "finance.revenue");
        assert!(s.or_replace && !s.if_not_exists);
        assert_eq!(s.owner.as_deref(), Some("fin"));
        assert_eq!(s.refresh, RefreshPolicy::Every("5 minutes".into()));
        assert_eq!(s.partition_by, vec!["day"]);
        assert_eq!(s.query.to_string(), "SELECT 1 AS x");
        assert_eq!(s.cluster_by, ClusterBy::Auto);
    }

    #[test]
    fn cluster_by_auto_none_or_columns() {
        for (sql, want) in [
            (
                "create slice s cluster by auto as select 1",
                ClusterBy::Auto,
            ),
            (
                "create slice s cluster by none as select 1",
                ClusterBy::None,
            ),
            (
                "create slice s cluster by (Day, \"Region\") incremental as select 1",
                ClusterBy::Columns(vec!["day".into(), "Region".into()]),
            ),
        ] {
            let Statement::CreateSlice(s) = one(sql) else {
                panic!("{sql}")
            };
            assert_eq!(s.cluster_by, want, "{sql}");
        }
        for bad in [
            "create slice s cluster by day as select 1",
            "create slice s cluster by () as select 1",
            "create slice s cluster by auto cluster by none as select 1",
        ] {
            assert!(parse_sql(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mixes_icepie_and_datafusion_statements() {
        let v = parse_sql(
            "SELECT 1; CREATE CORE TABLE IF NOT EXISTS core.e (id INT NOT NULL, v TEXT); \
             INGEST INTO e FROM 'x/*.csv' FORMAT csv; INGEST INTO e SELECT 1, 'a';;\
             REFRESH SLICE s; SHOW SLICES; show core tables; DESCRIBE SLICE a.b; \
             DROP SLICE IF EXISTS s; DROP CORE TABLE e",
        )
        .unwrap();
        assert_eq!(v.len(), 10);
        assert!(matches!(v[0], Statement::DataFusion(_)));
        let Statement::CreateCoreTable(c) = &v[1] else {
            panic!()
        };
        assert!(c.if_not_exists && c.columns.len() == 2 && c.source.is_none());
        assert!(matches!(
            &v[2],
            Statement::Ingest(Ingest {
                source: DataSource::Files {
                    format: Some(FileFormat::Csv),
                    ..
                },
                ..
            })
        ));
        assert!(matches!(
            &v[3],
            Statement::Ingest(Ingest {
                source: DataSource::Query(_),
                ..
            })
        ));
        assert!(matches!(
            &v[9],
            Statement::DropCoreTable {
                if_exists: false,
                ..
            }
        ));
    }

    #[test]
    fn bad_statements_are_syntax_errors_not_panics() {
        for bad in [
            "CREATE SLICE s",
            "CREATE SLICE s AS",
            "CREATE SLICE s REFRESH SOMETIMES AS SELECT 1",
            "CREATE SLICE s REFRESH EVERY 'soon' AS SELECT 1",
            "CREATE OR REPLACE SLICE IF NOT EXISTS s AS SELECT 1",
            "CREATE CORE TABLE t",
            "CREATE CORE TABLE t FROM 'x' FORMAT avro",
            "INGEST INTO t",
            "INGEST t FROM 'x'",
            "REFRESH SLICE",
            "SELECT 1 SELECT 2",
            "SELEC 1",
            "FREEZE SLICE",
            "FREEZE SLICE s 42",
            "THAW SLICE s 'why'",
            "ROLLBACK SLICE s",
            "ROLLBACK SLICE s TO 3",
            "ROLLBACK SLICE s TO VERSION -1",
            "ROLLBACK SLICE s TO VERSION x",
            "SHOW SLICE HISTORY",
            "VACUUM SLICE",
            "VACUUM SLICES s",
            "VERIFY SLICE",
            "VERIFY SLICES s",
        ] {
            assert!(parse_sql(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn lifecycle_statements() {
        let v = parse_sql(
            "FREEZE SLICE finance.revenue 'bad upstream data'; freeze slice s; THAW SLICE s; \
             ROLLBACK SLICE finance.revenue TO VERSION 3; SHOW SLICE HISTORY s; \
             VACUUM SLICE a.b; VACUUM SLICES; ROLLBACK; VERIFY SLICE a.b; verify slices",
        )
        .unwrap();
        assert_eq!(v.len(), 10);
        assert!(matches!(&v[8], Statement::Verify(Some(n)) if n.to_string() == "a.b"));
        assert!(matches!(&v[9], Statement::Verify(None)));
        assert!(
            matches!(&v[0], Statement::FreezeSlice { name, reason: Some(r) }
            if name.to_string() == "finance.revenue" && r == "bad upstream data")
        );
        assert!(matches!(&v[1], Statement::FreezeSlice { reason: None, .. }));
        assert!(matches!(&v[2], Statement::ThawSlice(n) if n.to_string() == "slices.s"));
        assert!(matches!(&v[3], Statement::RollbackSlice { version: 3, .. }));
        assert!(matches!(&v[4], Statement::ShowSliceHistory(_)));
        assert!(matches!(&v[5], Statement::Vacuum(Some(n)) if n.to_string() == "a.b"));
        assert!(matches!(&v[6], Statement::Vacuum(None)));
        // A plain ROLLBACK is DataFusion's (transaction) statement, untouched.
        assert!(matches!(&v[7], Statement::DataFusion(_)));
    }

    #[test]
    fn names_are_checked_while_parsing() {
        for bad in [
            "REFRESH SLICE \"../x\"",
            "CREATE SLICE core.x AS SELECT 1",
            "DROP CORE TABLE finance.x",
            "REFRESH SLICE a.b.c",
        ] {
            assert!(
                matches!(parse_sql(bad), Err(IcePieError::InvalidName { .. })),
                "{bad}"
            );
        }
    }
}
