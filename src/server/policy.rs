//! What a server's clients may do: the files they may name (`--allow-path`), the settings they
//! may change and, in read-only mode, that they only read.
//!
//! The server's own files are not its clients' files: a statement that names a location
//! (`INGEST … FROM`, `CREATE CORE TABLE … FROM`, `CREATE EXTERNAL TABLE … LOCATION`, `COPY … TO`,
//! inside an `EXPLAIN` too) runs only when that location is under one the server was started
//! with. Each is judged on what it will actually open ([`location::resolve`]: DataFusion's own
//! parsing, percent-decoding and `..`, then the links of the part that exists), never on its
//! text; a location that cannot be judged is refused. The runtime settings (memory limit,
//! spill directory) are the server's: no client may `SET` or `RESET` them.
//!
//! **Invariants**
//! - No location outside the allowed ones is read or written, however it is spelt
//!   (`tests::hostile_locations_are_refused`, over the corpus in
//!   `tests/data/hostile_locations.txt`, which the servers' integration tests send too;
//!   `tests::percent_encoded_dot_segments_cannot_leave_allow_path`), and the check is no
//!   blanket refusal (`tests::allowed_locations_are_allowed`).
//! - No client changes a `datafusion.runtime` setting
//!   (`tests::reset_of_runtime_settings_is_refused`).

use datafusion::sql::parser::{ResetStatement, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{ObjectName, Query, Set, SetExpr, Statement as SqlStatement};

use crate::error::{IcePieError, Result};
use crate::sql::{DataSource, Statement};
use crate::storage::location::{self, Location, Opening};

/// What a server's clients may do.
#[derive(Debug, Clone, Default)]
pub(super) struct Policy {
    /// The locations clients may name, and everything under them.
    allowed: Vec<Location>,
    read_only: bool,
    statement_memory: Option<u64>,
}

impl Policy {
    /// Clients may name locations under `allow` (local directories or object-store URLs);
    /// with `read_only`, they may only read.
    pub(super) fn new(allow: &[String], read_only: bool) -> Result<Self> {
        let allowed = allow
            .iter()
            .map(|a| {
                let bad = |why: String| IcePieError::Server(format!("--allow-path {a}: {why}"));
                match location::resolve(a, Opening::Listing) {
                    Ok(Location::Local(dir)) if !dir.is_dir() => Err(bad(format!(
                        "{} is not a directory; give a directory that exists",
                        dir.display()
                    ))),
                    Ok(root) => Ok(root),
                    Err(e) => Err(bad(e.to_string())),
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            allowed,
            read_only,
            statement_memory: None,
        })
    }

    /// Each statement's query may use at most `limit` bytes of memory (`None`: only the
    /// server's own limits).
    pub(super) fn with_statement_memory(mut self, limit: Option<u64>) -> Self {
        self.statement_memory = limit;
        self
    }

    /// The memory each statement's query may use.
    pub(super) fn statement_memory(&self) -> Option<u64> {
        self.statement_memory
    }

    /// True when clients may only read.
    pub(super) fn read_only(&self) -> bool {
        self.read_only
    }

    /// Refuses `statement` when it writes in read-only mode, names a location that is not
    /// allowed, or changes a runtime setting.
    pub(super) fn check(&self, statement: &Statement) -> Result<()> {
        if self.read_only && !reads_only(statement) {
            return Err(IcePieError::ReadOnly(
                "this server is read-only (--read-only): it runs queries, SHOW, DESCRIBE and \
                 EXPLAIN only"
                    .into(),
            ));
        }
        for (text, opening) in locations(statement) {
            self.check_location(text, opening)?;
        }
        if let Statement::DataFusion(inner) = statement {
            // The runtime settings name the spill directory (where files get written) and the
            // memory of every client: they are the server's.
            if let Some(name) = runtime_setting(&inner.0) {
                return Err(IcePieError::NotAllowed(format!(
                    "{name}: the datafusion.runtime settings are the server's; clients may not \
                     SET or RESET them"
                )));
            }
        }
        Ok(())
    }

    fn check_location(&self, text: &str, opening: Opening) -> Result<()> {
        let refused = |why: String| {
            Err(IcePieError::NotAllowed(format!(
                "'{text}' is not among the locations this server's clients may use{why}; \
                 start the server with --allow-path naming a directory or URL above it"
            )))
        };
        let resolved = match location::resolve(text, opening) {
            Ok(resolved) => resolved,
            Err(e) => return refused(format!(" (it cannot be judged: {e})")),
        };
        if self.allowed.iter().any(|root| resolved.is_within(root)) {
            Ok(())
        } else if self.allowed.is_empty() {
            refused(" (it was started without --allow-path)".into())
        } else {
            refused(format!(" (it leads to {resolved})"))
        }
    }
}

/// The name of the runtime setting `statement` sets or resets, as DataFusion will name it
/// (`RESET ALL` would reset them too). A name that is not plain identifiers cannot be told
/// apart from one, and is taken for one.
fn runtime_setting(statement: &DFStatement) -> Option<String> {
    let runtime = |name: &ObjectName| match setting_name(name) {
        Some(n) if n.starts_with("datafusion.runtime") => Some(n),
        Some(_) => None,
        None => Some(name.to_string()),
    };
    match statement {
        DFStatement::Reset(ResetStatement::Variable(name)) => match setting_name(name) {
            Some(all) if all == "all" => Some("RESET ALL".into()),
            _ => runtime(name),
        },
        DFStatement::Statement(s) => match &**s {
            SqlStatement::Set(set) => set_names(set).into_iter().find_map(runtime),
            _ => None,
        },
        DFStatement::Explain(e) => runtime_setting(&e.statement),
        DFStatement::CreateExternalTable(_) | DFStatement::CopyTo(_) => None,
    }
}

/// The variables a `SET` names.
fn set_names(set: &Set) -> Vec<&ObjectName> {
    match set {
        Set::SingleAssignment { variable, .. } => vec![variable],
        Set::ParenthesizedAssignments { variables, .. } => variables.iter().collect(),
        Set::MultipleAssignments { assignments } => assignments.iter().map(|a| &a.name).collect(),
        _ => vec![],
    }
}

/// The server-wide setting `statement` would change for every client: a `SET` of a dotted
/// name as written (the servers answer one without a dot, PostgreSQL's, without running it),
/// or a `RESET` of one DataFusion would reset. A name that is not plain identifiers is taken
/// for one.
pub(super) fn shared_setting(statement: &DFStatement) -> Option<String> {
    let dotted = |name: Option<String>, written: &ObjectName| match name {
        Some(n) if !n.contains('.') => None,
        Some(n) => Some(n),
        None => Some(written.to_string()),
    };
    match statement {
        DFStatement::Reset(ResetStatement::Variable(name)) => dotted(setting_name(name), name),
        DFStatement::Statement(s) => match &**s {
            SqlStatement::Set(set) => set_names(set)
                .into_iter()
                .find_map(|name| dotted(written_name(name), name)),
            _ => None,
        },
        _ => None,
    }
}

/// A setting's name as DataFusion's planner makes it: its parts joined by `.`, lower case,
/// `timezone` for `datafusion.execution.time_zone`; `None` when a part is not an identifier.
fn setting_name(name: &ObjectName) -> Option<String> {
    let name = written_name(name)?;
    Some(match name.as_str() {
        "timezone" | "time.zone" => "datafusion.execution.time_zone".into(),
        _ => name,
    })
}

/// A setting's name as written: its parts joined by `.`, lower case (quoted or not, as
/// DataFusion folds it); `None` when a part is not an identifier.
fn written_name(name: &ObjectName) -> Option<String> {
    let parts: Option<Vec<&str>> = name
        .0
        .iter()
        .map(|part| part.as_ident().map(|ident| ident.value.as_str()))
        .collect();
    Some(parts?.join(".").to_lowercase())
}

/// The locations `statement` reads or writes, each with how it will be opened.
fn locations(statement: &Statement) -> Vec<(&str, Opening)> {
    match statement {
        Statement::CreateCoreTable(c) => match &c.source {
            Some(DataSource::Files { location, .. }) => vec![(location.as_str(), Opening::Listing)],
            _ => vec![],
        },
        Statement::Ingest(i) => match &i.source {
            DataSource::Files { location, .. } => vec![(location.as_str(), Opening::Listing)],
            DataSource::Query(_) => vec![],
        },
        Statement::DataFusion(inner) => df_locations(&inner.0),
        _ => vec![],
    }
}

fn df_locations(statement: &DFStatement) -> Vec<(&str, Opening)> {
    match statement {
        DFStatement::CreateExternalTable(c) => {
            // An unbounded table (or one whose options may make it so) is a stream table,
            // which opens its one location as a file path; judged both ways when in doubt.
            let stream = c.unbounded
                || c.options
                    .iter()
                    .any(|(key, _)| key.eq_ignore_ascii_case("unbounded"));
            let openings: &[Opening] = match stream {
                true => &[Opening::Listing, Opening::FilePath],
                false => &[Opening::Listing],
            };
            c.locations
                .iter()
                .flat_map(|l| openings.iter().map(move |o| (l.as_str(), *o)))
                .collect()
        }
        DFStatement::CopyTo(c) => vec![(c.target.as_str(), Opening::Listing)],
        DFStatement::Explain(e) => df_locations(&e.statement),
        DFStatement::Statement(_) | DFStatement::Reset(_) => vec![],
    }
}

/// True for statements that change nothing: queries, SHOW, DESCRIBE, EXPLAIN (of those),
/// and the transaction statements, which group nothing.
fn reads_only(statement: &Statement) -> bool {
    match statement {
        Statement::ShowCoreTables
        | Statement::ShowSlices
        | Statement::DescribeSlice(_)
        | Statement::ShowSliceHistory(_)
        | Statement::ExplainRefresh(_) => true,
        Statement::DataFusion(inner) => df_reads_only(&inner.0),
        _ => false,
    }
}

fn df_reads_only(statement: &DFStatement) -> bool {
    match statement {
        DFStatement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(query) => query_reads_only(query),
            other => matches!(
                other,
                SqlStatement::ShowTables { .. }
                    | SqlStatement::ShowColumns { .. }
                    | SqlStatement::ShowVariable { .. }
                    | SqlStatement::ShowFunctions { .. }
                    | SqlStatement::ExplainTable { .. }
                    | SqlStatement::StartTransaction { .. }
                    | SqlStatement::Commit { .. }
                    | SqlStatement::Rollback { .. }
            ),
        },
        DFStatement::Explain(e) => df_reads_only(&e.statement),
        _ => false,
    }
}

/// True when `query` only reads: no `SELECT … INTO` (which creates a table) and no
/// data-modifying part, in its CTEs either.
fn query_reads_only(query: &Query) -> bool {
    query
        .with
        .as_ref()
        .is_none_or(|with| with.cte_tables.iter().all(|c| query_reads_only(&c.query)))
        && set_reads_only(&query.body)
}

fn set_reads_only(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(select) => select.into.is_none(),
        SetExpr::Query(query) => query_reads_only(query),
        SetExpr::SetOperation { left, right, .. } => set_reads_only(left) && set_reads_only(right),
        SetExpr::Values(_) | SetExpr::Table(_) => true,
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => false,
    }
}

/// The corpus of hostile locations and its layout, shared with the servers' tests (whose
/// crate needs its items `pub`).
#[cfg(test)]
#[path = "../../tests/data/hostile.rs"]
#[allow(unreachable_pub)]
mod hostile;

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: &Policy, sql: &str) -> std::result::Result<(), String> {
        let statements = crate::sql::parse_sql(sql).unwrap();
        policy.check(&statements[0]).map_err(|e| e.to_string())
    }

    use super::hostile::{self, statements, ALLOWED, HOSTILE};

    /// The corpus's layout: (its directory, `{root}`, `{allowed}`).
    fn layout() -> (tempfile::TempDir, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let (root, allowed) = hostile::layout(dir.path());
        let text = |p: std::path::PathBuf| p.display().to_string();
        (dir, text(root), text(allowed))
    }

    /// The locations of `corpus` with its placeholders filled in.
    fn corpus(corpus: &str, root: &str, allowed: &str) -> Vec<String> {
        hostile::locations(
            corpus,
            std::path::Path::new(root),
            std::path::Path::new(allowed),
        )
    }

    fn policy_for(allowed: &str) -> Policy {
        Policy::new(&[allowed.to_string(), "s3://bucket/landing".into()], false).unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn hostile_locations_are_refused() {
        let (_dir, root, allowed) = layout();
        let policy = policy_for(&allowed);
        let cases = corpus(HOSTILE, &root, &allowed);
        assert!(cases.len() >= 60, "{}", cases.len());
        for location in &cases {
            for sql in statements(location) {
                let statement = crate::sql::parse_sql(&sql)
                    .unwrap_or_else(|e| panic!("{sql:?}: {e}"))
                    .remove(0);
                match policy.check(&statement) {
                    Err(IcePieError::NotAllowed(_)) => {}
                    other => panic!("{sql:?} was not refused: {other:?}"),
                }
            }
        }
    }

    #[cfg(unix)]
    #[test]
    fn allowed_locations_are_allowed() {
        let (_dir, root, allowed) = layout();
        let policy = policy_for(&allowed);
        let cases = corpus(ALLOWED, &root, &allowed);
        assert!(cases.len() >= 20, "{}", cases.len());
        for location in &cases {
            let l = location.replace('\'', "''");
            for sql in [
                format!("INGEST INTO t FROM '{l}' FORMAT csv"),
                format!("CREATE CORE TABLE c FROM '{l}' FORMAT csv"),
                format!("COPY (SELECT 1 AS x) TO '{l}' STORED AS CSV"),
                format!("CREATE EXTERNAL TABLE e STORED AS CSV LOCATION '{l}'"),
                format!("EXPLAIN COPY (SELECT 1 AS x) TO '{l}' STORED AS CSV"),
            ] {
                assert_eq!(check(&policy, &sql), Ok(()), "{sql}");
            }
        }
        // A stream table opens its text as a file path: a plain path inside is allowed, the
        // same place spelt as a URL is a relative path, elsewhere.
        let stream = |l: &str| {
            format!("CREATE UNBOUNDED EXTERNAL TABLE u (x INT) STORED AS CSV LOCATION '{l}'")
        };
        assert_eq!(
            check(&policy, &stream(&format!("{allowed}/data.csv"))),
            Ok(())
        );
        assert!(check(&policy, &stream(&format!("file://{allowed}/data.csv"))).is_err());
        assert!(check(&policy, &stream(&format!("{allowed}/escape/../data.csv"))).is_err());
    }

    /// The bug: the check stripped `file://` and saw a directory named `%2e%2e`, where
    /// DataFusion opens `..`.
    #[test]
    fn percent_encoded_dot_segments_cannot_leave_allow_path() {
        let (_dir, root, allowed) = layout();
        let policy = policy_for(&allowed);
        for sql in [
            format!("CREATE CORE TABLE t FROM 'file://{allowed}/%2e%2e/secret/s.csv'"),
            format!("INGEST INTO t FROM 'file://{allowed}/%2E%2e/secret/s.csv'"),
            format!("COPY (SELECT 1) TO 'file://{allowed}/%2e%2e/secret/w.csv'"),
            format!("CREATE EXTERNAL TABLE e STORED AS CSV LOCATION 'file:{allowed}/../secret/'"),
            "INGEST INTO t FROM 's3://bucket/landing/%2e%2e/secret/x.parquet'".to_string(),
        ] {
            let e = check(&policy, &sql).unwrap_err();
            assert!(e.contains("not among the locations"), "{sql}: {e}");
        }
        let e = check(
            &policy,
            &format!("COPY (SELECT 1) TO 'file://{allowed}/%2e%2e/secret/w.csv'"),
        )
        .unwrap_err();
        assert!(e.contains(&format!("leads to {root}/secret/w.csv")), "{e}");
    }

    #[test]
    fn reset_of_runtime_settings_is_refused() {
        let policy = Policy::new(&[], false).unwrap();
        for sql in [
            "RESET datafusion.runtime.memory_limit",
            "RESET DataFusion.Runtime.Memory_Limit",
            "RESET \"datafusion.runtime.memory_limit\"",
            "RESET \"datafusion\".\"runtime\".temp_directory",
            "RESET ALL",
            "SET datafusion.runtime.memory_limit = '1G'",
            "SET \"datafusion.runtime.memory_limit\" = '1G'",
            "SET \"datafusion\".\"runtime\".\"memory_limit\" = '1G'",
            "SET DATAFUSION.RUNTIME.TEMP_DIRECTORY = '/tmp'",
            "SET datafusion.runtime.temp_directory TO '/tmp'",
            "EXPLAIN SET datafusion.runtime.memory_limit = '1G'",
        ] {
            let Ok(mut statements) = crate::sql::parse_sql(sql) else {
                continue; // not even parsed: it cannot run
            };
            match policy.check(&statements.remove(0)) {
                Err(IcePieError::NotAllowed(e)) => assert!(e.contains("runtime"), "{sql}: {e}"),
                other => panic!("{sql} was not refused: {other:?}"),
            }
        }
        for sql in [
            "RESET datafusion.execution.batch_size",
            "SET datafusion.execution.batch_size = 10",
            "SET runtime_x = 1",
        ] {
            assert_eq!(check(&policy, sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn shared_settings_are_named_as_datafusion_names_them() {
        let shared = |sql: &str| match crate::sql::parse_sql(sql).unwrap().remove(0) {
            Statement::DataFusion(s) => shared_setting(&s.0),
            _ => None,
        };
        assert_eq!(
            shared("SET \"DataFusion.Execution.Batch_Size\" = 1").as_deref(),
            Some("datafusion.execution.batch_size")
        );
        assert_eq!(
            shared("RESET datafusion.execution.batch_size").as_deref(),
            Some("datafusion.execution.batch_size")
        );
        // `SET timezone` is PostgreSQL's, answered without running; `RESET timezone` would
        // reset DataFusion's.
        assert_eq!(shared("SET timezone = 'UTC'"), None);
        assert_eq!(
            shared("RESET timezone").as_deref(),
            Some("datafusion.execution.time_zone")
        );
        assert_eq!(shared("SET application_name = 'psql'"), None);
        assert_eq!(shared("SELECT 1"), None);
    }

    #[test]
    fn locations_outside_the_allowed_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("in");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(allowed.join("a.csv"), "x\n1\n").unwrap();
        let a = allowed.display();
        let policy =
            Policy::new(&[a.to_string(), "s3://bucket/landing".to_string()], false).unwrap();
        for ok in [
            format!("INGEST INTO t FROM '{a}/a.csv'"),
            format!("INGEST INTO t FROM '{a}/*.csv' FORMAT csv"),
            format!("INGEST INTO t FROM 'file://{a}/a.csv'"),
            format!("COPY (SELECT 1) TO '{a}/new/out.parquet'"),
            "INGEST INTO t FROM 's3://bucket/landing/day=1/' FORMAT parquet".to_string(),
            "SELECT 1".to_string(),
        ] {
            assert_eq!(check(&policy, &ok), Ok(()), "{ok}");
        }
        for refused in [
            "INGEST INTO t FROM '/etc/passwd' FORMAT csv".to_string(),
            format!("INGEST INTO t FROM '{a}/../../etc/passwd' FORMAT csv"),
            format!("CREATE CORE TABLE t FROM '{a}/../secret.csv'"),
            "COPY (SELECT 1) TO '/tmp/elsewhere.csv'".to_string(),
            "EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/elsewhere.csv'".to_string(),
            "CREATE EXTERNAL TABLE e STORED AS CSV LOCATION '/etc/'".to_string(),
            "INGEST INTO t FROM 's3://bucket/landing2/x.parquet'".to_string(),
            "INGEST INTO t FROM 's3://other/landing/x.parquet'".to_string(),
            "INGEST INTO t FROM 'relative/file.csv'".to_string(),
        ] {
            let e = check(&policy, &refused).unwrap_err();
            assert!(e.contains("--allow-path"), "{refused}: {e}");
        }
        // A link inside the allowed directory to outside it is followed, and refused.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc", allowed.join("etc")).unwrap();
            assert!(check(&policy, &format!("INGEST INTO t FROM '{a}/etc/passwd'")).is_err());
        }
        let e = check(&policy, "SET datafusion.runtime.temp_directory = '/etc'").unwrap_err();
        assert!(e.contains("runtime settings"), "{e}");
        assert_eq!(
            check(&policy, "SET datafusion.execution.batch_size = 100"),
            Ok(())
        );
        let none = Policy::new(&[], false).unwrap();
        let e = check(&none, &format!("INGEST INTO t FROM '{a}/a.csv'")).unwrap_err();
        assert!(e.contains("started without --allow-path"), "{e}");
    }

    #[test]
    fn read_only_runs_reads_only() {
        let policy = Policy::new(&[], true).unwrap();
        for ok in [
            "SELECT 1",
            "SHOW SLICES",
            "DESCRIBE SLICE s",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
            "BEGIN",
        ] {
            assert_eq!(check(&policy, ok), Ok(()), "{ok}");
        }
        for refused in [
            "CREATE CORE TABLE t (x INT)",
            "INGEST INTO t VALUES (1)",
            "CREATE SLICE s AS SELECT 1",
            "REFRESH SLICE s",
            "FREEZE SLICE s",
            "DROP SLICE s",
            "CREATE TABLE m AS SELECT 1",
            "SET datafusion.execution.batch_size = 10",
            "VACUUM SLICES",
            "EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'",
            // Creates a table: refused before anything runs.
            "SELECT 1 AS x INTO made",
            "SELECT 1 AS x UNION ALL (SELECT 2 AS x INTO made)",
        ] {
            let e = check(&policy, refused).unwrap_err();
            assert!(e.contains("read-only"), "{refused}: {e}");
        }
    }
}
