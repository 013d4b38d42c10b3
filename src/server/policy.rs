//! What a server's clients may do: the files they may name (`--allow-path`) and, in read-only
//! mode, that they only read.
//!
//! The server's own files are not its clients' files: a statement that names a location
//! (`INGEST … FROM`, `CREATE CORE TABLE … FROM`, `CREATE EXTERNAL TABLE … LOCATION`, `COPY … TO`,
//! inside an `EXPLAIN` too) runs only when that location is under one the server was started
//! with. Local paths are compared after resolving `.`, `..` and symbolic links of the part that
//! exists, so `allowed/../etc` is refused; URLs (`s3://bucket/prefix`) by prefix.

use std::path::{Component, Path, PathBuf};

use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use crate::error::{IcePieError, Result};
use crate::sql::{DataSource, Statement};

/// A location clients may name, and everything under it.
#[derive(Debug, Clone)]
enum Allowed {
    /// A local directory, resolved.
    Dir(PathBuf),
    /// An object-store URL prefix (`s3://bucket/prefix/`).
    Url(String),
}

/// What a server's clients may do.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    allowed: Vec<Allowed>,
    read_only: bool,
    statement_memory: Option<u64>,
}

impl Policy {
    /// Clients may name locations under `allow` (local directories or object-store URLs);
    /// with `read_only`, they may only read.
    pub fn new(allow: &[String], read_only: bool) -> Result<Self> {
        let allowed = allow
            .iter()
            .map(|a| match url_scheme(a) {
                Some(scheme) if scheme != "file" => {
                    Ok(Allowed::Url(format!("{}/", a.trim_end_matches('/'))))
                }
                _ => {
                    let path = a.strip_prefix("file://").unwrap_or(a);
                    std::fs::canonicalize(path).map(Allowed::Dir).map_err(|e| {
                        IcePieError::Server(format!(
                            "--allow-path {a}: {e}; give a directory that exists"
                        ))
                    })
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
    pub fn with_statement_memory(mut self, limit: Option<u64>) -> Self {
        self.statement_memory = limit;
        self
    }

    /// The memory each statement's query may use.
    pub fn statement_memory(&self) -> Option<u64> {
        self.statement_memory
    }

    /// True when clients may only read.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Refuses `statement` when it writes in read-only mode or names a location that is not
    /// allowed.
    pub fn check(&self, statement: &Statement) -> Result<()> {
        if self.read_only && !reads_only(statement) {
            return Err(IcePieError::ReadOnly(
                "this server is read-only (--read-only): it runs queries, SHOW, DESCRIBE and \
                 EXPLAIN only"
                    .into(),
            ));
        }
        for location in locations(statement) {
            self.check_location(location)?;
        }
        if let Statement::DataFusion(inner) = statement {
            // The runtime settings name the spill directory (where files get written) and the
            // memory of every client: they are the server's.
            let text = inner.to_string().to_ascii_lowercase();
            let words: Vec<&str> = text.split_whitespace().take(2).collect();
            if words.first() == Some(&"set") && words.get(1).is_some_and(|w| w.contains("runtime."))
            {
                return Err(IcePieError::NotAllowed(
                    "the datafusion.runtime settings are the server's; clients may not SET them"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    fn check_location(&self, location: &str) -> Result<()> {
        let refused = |why: &str| {
            Err(IcePieError::NotAllowed(format!(
                "'{location}' is not among the locations this server's clients may use{why}; \
                 start the server with --allow-path naming a directory or URL above it"
            )))
        };
        match url_scheme(location) {
            Some(scheme) if scheme != "file" => {
                let ok = self.allowed.iter().any(|a| match a {
                    Allowed::Url(prefix) => location.starts_with(prefix.as_str()),
                    Allowed::Dir(_) => false,
                });
                if ok {
                    Ok(())
                } else {
                    refused("")
                }
            }
            _ => {
                let path = location.strip_prefix("file://").unwrap_or(location);
                let Some(resolved) = resolve(path) else {
                    return refused(" (it cannot be resolved)");
                };
                let ok = self.allowed.iter().any(|a| match a {
                    Allowed::Dir(dir) => resolved.starts_with(dir),
                    Allowed::Url(_) => false,
                });
                if ok {
                    Ok(())
                } else if self.allowed.is_empty() {
                    refused(" (it was started without --allow-path)")
                } else {
                    refused("")
                }
            }
        }
    }
}

/// The scheme of a URL (`s3` of `s3://…`), `None` for a path.
fn url_scheme(location: &str) -> Option<&str> {
    let (scheme, _) = location.split_once("://")?;
    (!scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+'))
    .then_some(scheme)
}

/// `path` made absolute, `.` and `..` resolved, and the symbolic links of its longest
/// existing part (a glob's fixed part included) followed.
fn resolve(path: &str) -> Option<PathBuf> {
    // A glob matches under its fixed part: the components before the first wildcard.
    let fixed: PathBuf = Path::new(path)
        .components()
        .take_while(|c| {
            !c.as_os_str()
                .to_string_lossy()
                .contains(['*', '?', '[', '{'])
        })
        .collect();
    let absolute = std::path::absolute(&fixed).ok()?;
    let mut normal = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    // Follow links in the part that exists; what does not exist yet cannot be a link.
    let mut existing = normal.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        rest.push(existing.file_name()?.to_owned());
        if !existing.pop() {
            return None;
        }
    }
    let mut resolved = std::fs::canonicalize(&existing).ok()?;
    for part in rest.into_iter().rev() {
        resolved.push(part);
    }
    Some(resolved)
}

/// The locations `statement` reads or writes.
fn locations(statement: &Statement) -> Vec<&str> {
    match statement {
        Statement::CreateCoreTable(c) => match &c.source {
            Some(DataSource::Files { location, .. }) => vec![location.as_str()],
            _ => vec![],
        },
        Statement::Ingest(i) => match &i.source {
            DataSource::Files { location, .. } => vec![location.as_str()],
            DataSource::Query(_) => vec![],
        },
        Statement::DataFusion(inner) => df_locations(inner),
        _ => vec![],
    }
}

fn df_locations(statement: &DFStatement) -> Vec<&str> {
    match statement {
        DFStatement::CreateExternalTable(c) => c.locations.iter().map(String::as_str).collect(),
        DFStatement::CopyTo(c) => vec![c.target.as_str()],
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
        Statement::DataFusion(inner) => df_reads_only(inner),
        _ => false,
    }
}

fn df_reads_only(statement: &DFStatement) -> bool {
    match statement {
        DFStatement::Statement(s) => matches!(
            **s,
            SqlStatement::Query(_)
                | SqlStatement::ShowTables { .. }
                | SqlStatement::ShowColumns { .. }
                | SqlStatement::ShowVariable { .. }
                | SqlStatement::ShowFunctions { .. }
                | SqlStatement::ExplainTable { .. }
                | SqlStatement::StartTransaction { .. }
                | SqlStatement::Commit { .. }
                | SqlStatement::Rollback { .. }
        ),
        DFStatement::Explain(e) => df_reads_only(&e.statement),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: &Policy, sql: &str) -> std::result::Result<(), String> {
        let statements = crate::sql::parse_sql(sql).unwrap();
        policy.check(&statements[0]).map_err(|e| e.to_string())
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
        ] {
            let e = check(&policy, refused).unwrap_err();
            assert!(e.contains("read-only"), "{refused}: {e}");
        }
    }
}
