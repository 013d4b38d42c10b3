//! icepie's SQL: DataFusion's dialect plus the statements of the frozen core and of slices.
//!
//! [`parser::parse_sql`] wraps DataFusion's `DFParser`: it peeks at the first words of each
//! statement and parses icepie's own statements itself, handing every other statement to
//! DataFusion untouched, so everything DataFusion accepts keeps working.

pub(crate) mod generalize;
pub(crate) mod parser;
pub(crate) mod planner;

use std::fmt;
use std::time::Duration;

use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{ColumnDef, Query};
use serde::{Deserialize, Serialize};

use crate::error::{IcePieError, Result};
use crate::storage::names::SliceName;

pub(crate) use parser::parse_sql;
pub(crate) use planner::Planner;

/// One parsed statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    /// Any statement DataFusion handles itself.
    DataFusion(DataFusionStatement),
    /// `CREATE CORE TABLE`.
    CreateCoreTable(CreateCoreTable),
    /// `INGEST INTO`.
    Ingest(Ingest),
    /// `DROP CORE TABLE [IF EXISTS] name`.
    DropCoreTable {
        /// Table name (without `core.`).
        name: String,
        /// `IF EXISTS` given.
        if_exists: bool,
    },
    /// `CREATE [OR REPLACE] SLICE`.
    CreateSlice(CreateSlice),
    /// `REFRESH SLICE name [FULL]`.
    RefreshSlice {
        /// The slice.
        name: SliceName,
        /// `FULL` given: recompute from all of the inputs.
        full: bool,
    },
    /// `EXPLAIN REFRESH SLICE name`.
    ExplainRefresh(SliceName),
    /// `DROP SLICE [IF EXISTS] name`.
    DropSlice {
        /// The slice.
        name: SliceName,
        /// `IF EXISTS` given.
        if_exists: bool,
    },
    /// `SHOW CORE TABLES`.
    ShowCoreTables,
    /// `SHOW SLICES`.
    ShowSlices,
    /// `DESCRIBE SLICE name`.
    DescribeSlice(SliceName),
    /// `FREEZE SLICE name ['reason']`.
    FreezeSlice {
        /// The slice.
        name: SliceName,
        /// Why, as given.
        reason: Option<String>,
    },
    /// `THAW SLICE name`.
    ThawSlice(SliceName),
    /// `ALTER SLICE name SET [REFRESH policy] [CLUSTER BY layout]`: changes how the slice
    /// is refreshed or laid out from its next refresh on, without rebuilding it.
    AlterSlice {
        /// The slice.
        name: SliceName,
        /// The new refresh policy, if given.
        refresh: Option<RefreshPolicy>,
        /// The new layout, if given.
        cluster_by: Option<ClusterBy>,
    },
    /// `APPLY PROPOSAL n`: runs the statement of proposal `n` of `system.proposals`.
    ApplyProposal(i64),
    /// `DISMISS PROPOSAL n`: hides proposal `n` of `system.proposals`.
    DismissProposal(i64),
    /// `ROLLBACK SLICE name TO VERSION n`.
    RollbackSlice {
        /// The slice.
        name: SliceName,
        /// The version whose data and definition to restore.
        version: i64,
    },
    /// `SHOW SLICE HISTORY name`.
    ShowSliceHistory(SliceName),
    /// `VACUUM SLICE name` (one slice) or `VACUUM SLICES` (every slice, `None`).
    Vacuum(Option<SliceName>),
    /// `VERIFY SLICE name` (one slice) or `VERIFY SLICES` (every slice, `None`).
    Verify(Option<SliceName>),
}

/// `CREATE CORE TABLE [IF NOT EXISTS] name [(columns)] [FROM 'location' [FORMAT f] | AS query]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateCoreTable {
    /// Table name (without `core.`).
    pub name: String,
    /// `IF NOT EXISTS` given.
    pub if_not_exists: bool,
    /// Declared columns (may be empty when a source gives the schema).
    pub(crate) columns: Vec<ColumnDef>,
    /// Initial data.
    pub source: Option<DataSource>,
}

/// `INGEST INTO [core.]name FROM 'location' [FORMAT f]` or `INGEST INTO name query`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ingest {
    /// Table name (without `core.`).
    pub table: String,
    /// What to append.
    pub source: DataSource,
}

/// Where data to load comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// Files: a path, glob or URL.
    Files {
        /// The location as written.
        location: String,
        /// The format; inferred from the file extension when `None`.
        format: Option<FileFormat>,
    },
    /// The result of a query.
    Query(SourceQuery),
}

/// A statement DataFusion parses and runs itself, as DataFusion parsed it. It displays as
/// the SQL it was parsed from (normalized).
#[derive(Debug, Clone, PartialEq)]
pub struct DataFusionStatement(pub(crate) Box<DFStatement>);

impl fmt::Display for DataFusionStatement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The query whose rows `CREATE CORE TABLE … AS` or `INGEST INTO` loads. It displays as its SQL.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceQuery(pub(crate) Box<Query>);

impl fmt::Display for SourceQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Formats of files that can be loaded into the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// Apache Parquet.
    Parquet,
    /// CSV with a header row.
    Csv,
    /// Newline-delimited JSON.
    Json,
}

impl FileFormat {
    /// The format named `word` (case-insensitive).
    pub fn from_name(word: &str) -> Option<Self> {
        match word.to_ascii_lowercase().as_str() {
            "parquet" => Some(Self::Parquet),
            "csv" => Some(Self::Csv),
            "json" | "ndjson" => Some(Self::Json),
            _ => None,
        }
    }

    /// The format a file extension suggests.
    pub fn from_location(location: &str) -> Option<Self> {
        let lower = location.to_ascii_lowercase();
        let ext = lower.rsplit('.').next()?;
        Self::from_name(ext)
    }

    /// The usual file extension.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Parquet => ".parquet",
            Self::Csv => ".csv",
            Self::Json => ".json",
        }
    }
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Parquet => "parquet",
            Self::Csv => "csv",
            Self::Json => "json",
        })
    }
}

/// `CREATE [OR REPLACE] SLICE [IF NOT EXISTS] name [OWNER 'team'] [REFRESH …]
/// [INCREMENTAL | FULL | AUTO] [PARTITION BY (col, …)] AS query`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSlice {
    /// The slice.
    pub name: SliceName,
    /// `OR REPLACE` given.
    pub or_replace: bool,
    /// `IF NOT EXISTS` given.
    pub if_not_exists: bool,
    /// Owning team.
    pub owner: Option<String>,
    /// Refresh policy.
    pub refresh: RefreshPolicy,
    /// Partition columns.
    pub partition_by: Vec<String>,
    /// `INCREMENTAL`, `FULL` or `AUTO` (the default).
    pub refresh_mode: RefreshMode,
    /// `CLUSTER BY AUTO` (the default), `CLUSTER BY (cols)` or `CLUSTER BY NONE`.
    pub cluster_by: ClusterBy,
    /// The definition.
    pub query: Box<Query>,
}

/// When a slice refreshes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RefreshPolicy {
    /// Only on `REFRESH SLICE`.
    #[default]
    Manual,
    /// Every interval, given as written (e.g. `5 minutes`).
    Every(String),
    /// When an input has a newer version than the slice was built from.
    OnChange,
    /// While it is read, within its lag (given as written; none: as ON CHANGE); a slice
    /// unread for `icepie.cold_after` is dormant until its next read.
    Auto(Option<String>),
}

impl RefreshPolicy {
    /// Parses the policy's text form (`manual`, `every '5 minutes'`, `on change`).
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        let lower = t.to_ascii_lowercase();
        if lower == "manual" {
            return Ok(Self::Manual);
        }
        if lower.split_whitespace().collect::<Vec<_>>() == ["on", "change"] {
            return Ok(Self::OnChange);
        }
        if let Some(rest) = lower.strip_prefix("auto") {
            let rest = rest.trim();
            if rest.is_empty() {
                return Ok(Self::Auto(None));
            }
            if let Some(lag) = rest.strip_prefix("lag") {
                let lag = lag.trim().trim_matches('\'').to_string();
                parse_interval(&lag)?;
                return Ok(Self::Auto(Some(lag)));
            }
        }
        if let Some(rest) = lower.strip_prefix("every") {
            let interval = rest.trim().trim_matches('\'').to_string();
            parse_interval(&interval)?;
            return Ok(Self::Every(interval));
        }
        Err(IcePieError::Syntax(format!(
            "unknown refresh policy '{text}': use MANUAL, EVERY 'interval', ON CHANGE or AUTO \
             [LAG 'interval']"
        )))
    }
}

impl fmt::Display for RefreshPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Manual => f.write_str("manual"),
            Self::Every(i) => write!(f, "every '{i}'"),
            Self::OnChange => f.write_str("on change"),
            Self::Auto(None) => f.write_str("auto"),
            Self::Auto(Some(lag)) => write!(f, "auto lag '{lag}'"),
        }
    }
}

/// How a slice's rows are ordered (`CLUSTER BY ...`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterBy {
    /// As the definition gives them.
    #[default]
    None,
    /// By the column readers filter on most.
    Auto,
    /// By these columns.
    Columns(Vec<String>),
}

impl fmt::Display for ClusterBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Auto => f.write_str("auto"),
            Self::Columns(c) => write!(f, "({})", c.join(", ")),
        }
    }
}

/// How a slice's refreshes run, as declared by `CREATE SLICE … INCREMENTAL | FULL | AUTO`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefreshMode {
    /// Incremental when the definition allows it and the new data is a small share of the
    /// input (`icepie.incremental_max_share`), full otherwise.
    #[default]
    Auto,
    /// Incremental whenever the new data allows it; the definition must be of a shape that
    /// refreshes incrementally.
    Incremental,
    /// Always recomputed from all of its inputs.
    Full,
}

impl fmt::Display for RefreshMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Incremental => "incremental",
            Self::Full => "full",
        })
    }
}

/// Parses an interval such as `250ms`, `30 seconds`, `5 minutes`, `1 hour` or `2 days`, as
/// settings read durations; zero is refused.
pub(crate) fn parse_interval(text: &str) -> Result<Duration> {
    // One reading of durations everywhere: the one `SET icepie.*` uses.
    match crate::options::Span::parse(text) {
        Some(span) if !span.0.is_zero() => Ok(span.0),
        _ => Err(IcePieError::Syntax(format!(
            "invalid interval '{text}': write a positive whole number and a unit, e.g. \
             '30 seconds', '5 minutes', '1 hour', '1 day' or '250ms'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(
            parse_interval("30 seconds").unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            parse_interval("5 MINUTES").unwrap(),
            Duration::from_secs(300)
        );
        assert_eq!(parse_interval("1 hour").unwrap(), Duration::from_secs(3600));
        // As SET reads durations.
        assert_eq!(parse_interval("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_interval("2h").unwrap(), Duration::from_secs(7200));
        for bad in [
            "",
            "5",
            "five minutes",
            "0 seconds",
            "5 fortnights",
            "1 2 3",
        ] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policies_round_trip_through_text() {
        for p in [
            RefreshPolicy::Manual,
            RefreshPolicy::OnChange,
            RefreshPolicy::Every("5 minutes".into()),
            RefreshPolicy::Auto(None),
            RefreshPolicy::Auto(Some("10 minutes".into())),
        ] {
            assert_eq!(RefreshPolicy::parse(&p.to_string()).unwrap(), p);
        }
    }
}
