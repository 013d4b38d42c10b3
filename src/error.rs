//! The one error type of icepie.
//!
//! Every failure a user can cause (bad SQL, bad names, missing tables, files that do not fit a
//! table) has its own variant whose message says what was wrong and what to do instead. Errors
//! from DataFusion and Delta Lake are carried through unchanged so their detail is not lost, and
//! [`IcePieError`] converts into [`DataFusionError`] at the DataFusion boundary (table providers,
//! schema providers).

use datafusion::error::DataFusionError;
use deltalake::DeltaTableError;

/// Result type of icepie operations.
pub type Result<T, E = IcePieError> = std::result::Result<T, E>;

/// Everything that can go wrong in icepie.
#[derive(Debug, thiserror::Error)]
pub enum IcePieError {
    /// The SQL text could not be parsed.
    #[error("SQL syntax error: {0}")]
    Syntax(String),

    /// A table, slice or domain name is not allowed.
    #[error("invalid name '{name}': {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: String,
    },

    /// No core table of that name exists.
    #[error("core table '{0}' does not exist (SHOW CORE TABLES lists them)")]
    CoreTableNotFound(String),

    /// No slice of that name exists.
    #[error("slice '{0}' does not exist (SHOW SLICES lists them)")]
    SliceNotFound(String),

    /// No proposal of that number stands now.
    #[error(
        "no proposal {0} stands now (it was applied, dismissed, or no longer holds); \
         SELECT * FROM system.proposals lists them"
    )]
    ProposalNotFound(i64),

    /// The object already exists.
    #[error("{kind} '{name}' already exists{hint}")]
    AlreadyExists {
        /// "core table" or "slice".
        kind: &'static str,
        /// Qualified name.
        name: String,
        /// What to do instead.
        hint: &'static str,
    },

    /// A core table cannot be dropped while slices read it.
    #[error("core table '{table}' is read by slice(s) {}; drop or replace them first", .slices.join(", "))]
    CoreTableInUse {
        /// The core table.
        table: String,
        /// The slices that read it.
        slices: Vec<String>,
    },

    /// Data offered to a core table does not fit its schema.
    #[error("data does not fit core table '{table}': {detail}")]
    SchemaMismatch {
        /// The core table.
        table: String,
        /// Which columns are missing, extra or of the wrong type.
        detail: String,
    },

    /// A write was aimed at a table that only icepie statements may change.
    #[error("{0}")]
    ReadOnly(String),

    /// A location given to CREATE CORE TABLE ... FROM or INGEST could not be used.
    #[error("cannot load '{location}': {reason}")]
    BadLocation {
        /// The location as given.
        location: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A slice definition is not acceptable.
    #[error("invalid slice definition for '{slice}': {reason}")]
    InvalidDefinition {
        /// The slice.
        slice: String,
        /// What is wrong.
        reason: String,
    },

    /// Building a slice version failed; nothing was committed.
    #[error("refresh of slice '{slice}' failed, nothing was committed{serving}: {source}")]
    RefreshFailed {
        /// The slice.
        slice: String,
        /// ", still serving version N" when the slice has a version.
        serving: String,
        /// The underlying failure.
        #[source]
        source: Box<IcePieError>,
    },

    /// Another writer (usually another process) committed the slice while this change was
    /// being prepared; nothing was committed.
    #[error(
        "another writer committed slice '{slice}' while this change, based on {base}, was \
         being prepared; nothing was committed and the other writer's version is served. Run \
         it again to build on that version"
    )]
    Conflict {
        /// The slice.
        slice: String,
        /// What the change started from: `version N`, or that the slice did not exist.
        base: String,
    },

    /// The slice was dropped, frozen or given a new definition by another writer while a
    /// refresh of it ran; nothing was committed.
    #[error("slice '{slice}' changed while this refresh ran: {change}. Nothing was committed")]
    ChangedMeanwhile {
        /// The slice.
        slice: String,
        /// What changed, and what to do.
        change: String,
    },

    /// The table a write committed to was dropped (by another process) while the write ran:
    /// its commit was withdrawn, so no table is left half there.
    #[error(
        "{table} was dropped while this change was being written: nothing of the change was kept"
    )]
    DroppedMeanwhile {
        /// The table, as `core table NAME` or `slice DOMAIN.NAME`.
        table: String,
    },

    /// A data file of a table's current version is missing, truncated or not Parquet.
    #[error("{what} is damaged: file {file} is {problem}. {fix}")]
    Damaged {
        /// `slice 'x.y'` or `core table 'core.t'`.
        what: String,
        /// The file, relative to the table.
        file: String,
        /// What is wrong with it.
        problem: String,
        /// What to do.
        fix: String,
    },

    /// A refresh needed more memory than its budget and could not spill.
    #[error(
        "the refresh ran out of its memory budget of {limit} (SET icepie.refresh_memory_limit \
         = '...' to raise it): {detail}"
    )]
    MemoryBudget {
        /// The budget.
        limit: String,
        /// DataFusion's report, naming the biggest consumers.
        detail: String,
    },

    /// The slice is frozen: it changes only after `THAW SLICE`.
    #[error("slice '{slice}' is {detail}")]
    Frozen {
        /// The slice.
        slice: String,
        /// Since when, why, and what was refused.
        detail: String,
    },

    /// A slice is further behind its inputs than its reader allows (`icepie.max_staleness`,
    /// `fresh(...)`) and the reader chose to fail (`icepie.on_stale = 'fail'`).
    #[error(
        "slice '{slice}' is {lag} behind its inputs, more than the {limit} this read allows; \
         REFRESH SLICE {slice}, or allow more staleness, or SET icepie.on_stale = 'serve' or \
         'refresh'"
    )]
    Stale {
        /// The slice.
        slice: String,
        /// How far behind it is.
        lag: String,
        /// The reader's limit.
        limit: String,
    },

    /// A version asked for does not exist or is no longer retained.
    #[error("'{table}': {detail}")]
    VersionNotFound {
        /// The table or slice.
        table: String,
        /// Which versions there are.
        detail: String,
    },

    /// A setting given to the builder has an unknown name or a bad value.
    #[error("setting icepie.{name}: {reason}")]
    Setting {
        /// The setting's name.
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// The error of a refresh that several callers joined.
    #[error(transparent)]
    Joined(std::sync::Arc<IcePieError>),

    /// The warehouse location is not usable.
    #[error("warehouse '{location}': {reason}")]
    Warehouse {
        /// The location as given.
        location: String,
        /// What is wrong.
        reason: String,
    },

    /// A server's client asked for what the server does not let its clients do (a file
    /// outside `--allow-path`).
    #[error("not allowed: {0}")]
    NotAllowed(String),

    /// The network server cannot listen or serve as asked.
    #[error("server: {0}")]
    Server(String),

    /// Metadata icepie wrote could not be read back.
    #[error("corrupt icepie metadata in {what}: {reason}")]
    CorruptMetadata {
        /// Where.
        what: String,
        /// What is wrong.
        reason: String,
    },

    /// The statement names a column that is not there, or one that is ambiguous.
    #[error("{0}")]
    Column(String),

    /// A value read or computed does not fit where it goes: text that is not a number or a
    /// date, a value out of its type's range, a division by zero, a NULL in a NOT NULL
    /// column, a line of a text file with the wrong number of fields. The message names the
    /// value (and, where known, the file, line and column); nothing was written.
    #[error("{0}")]
    BadData(String),

    /// An error from DataFusion (planning or execution).
    #[error("{}", unwrapped(&.0.to_string()))]
    DataFusion(DataFusionError),

    /// An error from Delta Lake (storage, commits, conflicts).
    #[error("{}", unwrapped(&.0.to_string()))]
    Delta(DeltaTableError),

    /// An error from the object store.
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),
}

impl From<IcePieError> for DataFusionError {
    fn from(e: IcePieError) -> Self {
        match e {
            IcePieError::DataFusion(e) => e,
            other => DataFusionError::External(Box::new(other)),
        }
    }
}

impl From<DataFusionError> for IcePieError {
    /// Takes back an icepie error that crossed DataFusion (e.g. a write refused by a table
    /// provider) so that it keeps its own variant and message.
    fn from(e: DataFusionError) -> Self {
        match e {
            DataFusionError::External(inner) => match inner.downcast::<IcePieError>() {
                Ok(e) => *e,
                Err(inner) => match bad_data(&inner.to_string()) {
                    Some(message) => IcePieError::BadData(message),
                    None => IcePieError::DataFusion(DataFusionError::External(inner)),
                },
            },
            DataFusionError::Context(ctx, inner) => match IcePieError::from(*inner) {
                IcePieError::DataFusion(inner) => {
                    IcePieError::DataFusion(DataFusionError::Context(ctx, Box::new(inner)))
                }
                ours => ours,
            },
            DataFusionError::SQL(e, _) => IcePieError::Syntax(e.to_string()),
            DataFusionError::SchemaError(e, _) => IcePieError::Column(e.to_string()),
            // The message is the inner error's; the source span is not shown anyway.
            DataFusionError::Diagnostic(_, inner) => IcePieError::from(*inner),
            other => match bad_data(&other.to_string()) {
                Some(message) => IcePieError::BadData(message),
                None => IcePieError::DataFusion(other),
            },
        }
    }
}

impl From<DeltaTableError> for IcePieError {
    /// Delta Lake carries DataFusion's and Arrow's errors as text ("Generic DeltaTable error:
    /// Arrow error: Cast error: ..."): those about the data are said plainly.
    fn from(e: DeltaTableError) -> Self {
        match bad_data(&e.to_string()) {
            Some(message) => IcePieError::BadData(message),
            None => IcePieError::Delta(e),
        }
    }
}

/// A dependency's message without the wrappers that name only the layer it passed through
/// ("Generic DeltaTable error: Arrow error: External error: ...").
fn unwrapped(text: &str) -> &str {
    const WRAPPERS: [&str; 6] = [
        "Generic DeltaTable error: ",
        "Error during planning: ",
        "Failed to convert into Arrow schema: ",
        "Arrow error: ",
        "External error: ",
        "Generic error: ",
    ];
    let mut text = text;
    while let Some(rest) = WRAPPERS.iter().find_map(|w| text.strip_prefix(w)) {
        text = rest;
    }
    text
}

/// The text between `start` and the next `end` in `text`, and what follows it.
pub(crate) fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<(&'a str, &'a str)> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some((&text[from..from + len], &text[from + len + end.len()..]))
}

/// An Arrow type name as Arrow's messages print it (`Int64`, `Date32`), in SQL's words.
fn sql_type_of(arrow_name: &str) -> String {
    match arrow_name.parse::<datafusion::arrow::datatypes::DataType>() {
        Ok(t) => crate::text::sql_type_name(&t),
        Err(_) => arrow_name.to_string(),
    }
}

/// A value that does not parse as its type in a text file: `(value, SQL type, column index,
/// record number counted from the header, the row)`, from Arrow's CSV reader's message.
pub(crate) fn csv_value_error(text: &str) -> Option<(String, String, usize, usize, String)> {
    let (value, rest) = between(text, "Error while parsing value '", "' as type '")?;
    let (arrow_type, rest) = between(rest, "", "' for column ")?;
    let (column, rest) = between(rest, "", " at line ")?;
    let (line, rest) = between(rest, "", ".")?;
    let row = between(rest, "Row data: '[", "]'").map_or("", |(r, _)| r);
    Some((
        value.to_string(),
        sql_type_of(arrow_type),
        column.parse().ok()?,
        line.parse().ok()?,
        row.to_string(),
    ))
}

/// A line of a text file with the wrong number of fields: `(record number counted from the
/// header, fields expected, fields found)`, from Arrow's CSV reader's message.
pub(crate) fn csv_fields_error(text: &str) -> Option<(usize, usize, usize)> {
    let (line, rest) = between(text, "incorrect number of fields for line ", ", expected ")?;
    let (expected, rest) = between(rest, "", " got ")?;
    // "got 3", or "got more than 5" when a record has too many fields.
    let rest = rest.strip_prefix("more than ").unwrap_or(rest);
    let got: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((
        line.parse().ok()?,
        expected.parse().ok()?,
        got.parse().ok()?,
    ))
}

/// Says plainly what is wrong with the data, for the messages of DataFusion, Arrow and Delta
/// Lake that are about a value rather than the statement; `None` for any other message.
pub(crate) fn bad_data(text: &str) -> Option<String> {
    if let Some((value, rest)) = between(text, "Cannot cast string '", "' to value of ") {
        let (arrow_type, _) = between(rest, "", " type")?;
        let sql = sql_type_of(arrow_type);
        return Some(format!(
            "the text '{value}' is not a valid {sql} (TRY_CAST(... AS {sql}) gives NULL for \
             such values)"
        ));
    }
    if let Some((value, rest)) = between(text, "Can't cast value ", " to type ") {
        // The type runs to the end of the line ("Decimal128(10, 2)" has a space in it).
        let arrow_type = first_line(rest).trim_end_matches('.').trim();
        return Some(format!(
            "the value {value} is out of range for {}",
            sql_type_of(arrow_type)
        ));
    }
    if text.contains("Divide by zero error") {
        return Some(
            "division by zero (NULLIF(divisor, 0) gives NULL instead of failing)".to_string(),
        );
    }
    // Arrow numbers CSV records within the part of a file it was given: no number is said
    // unless the file is read again from its start (`core::explain`).
    if let Some((value, sql, column, _, row)) = csv_value_error(text) {
        return Some(format!(
            "'{value}' in field {} of a CSV record is not a valid {sql} (the record: {row})",
            column + 1
        ));
    }
    if let Some((_, expected, got)) = csv_fields_error(text) {
        return Some(format!(
            "a CSV record has {got} field(s) where {expected} were expected"
        ));
    }
    if let Some((column, rest)) = between(text, "Error parsing column ", " at line ") {
        let detail = rest.split_once(": ").map_or(rest, |(_, d)| d);
        return Some(format!(
            "field {} of a CSV record does not parse: {}",
            column.parse::<usize>().map_or(0, |c| c + 1),
            first_line(detail)
        ));
    }
    if let Some((value, _)) = between(text, "Error parsing timestamp from '", "'") {
        return Some(format!(
            "the text '{value}' is not a valid TIMESTAMP (TRY_CAST(... AS TIMESTAMP) gives \
             NULL for such values)"
        ));
    }
    if let Some((value, _)) = between(text, "can't parse the string value ", " to decimal") {
        return Some(format!("the text '{value}' is not a valid DECIMAL"));
    }
    if let Some((field, rest)) = between(text, "whilst decoding field '", "': ") {
        return Some(format!("JSON field '{field}': {}", first_line(rest)));
    }
    if let Some((rows, _)) = between(
        text,
        "Invalid data found: ",
        " rows failed validation check",
    ) {
        return Some(format!(
            "{rows} row(s) have NULL in a NOT NULL column, or break a constraint of the table"
        ));
    }
    if let Some((_, detail)) = between(text, "Arithmetic overflow", ":") {
        return Some(format!("arithmetic overflow:{}", first_line(detail)));
    }
    None
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

impl From<datafusion::sql::sqlparser::parser::ParserError> for IcePieError {
    fn from(e: datafusion::sql::sqlparser::parser::ParserError) -> Self {
        IcePieError::Syntax(e.to_string())
    }
}

impl From<datafusion::parquet::errors::ParquetError> for IcePieError {
    fn from(e: datafusion::parquet::errors::ParquetError) -> Self {
        IcePieError::from(DataFusionError::from(e))
    }
}

impl From<datafusion::arrow::error::ArrowError> for IcePieError {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        IcePieError::from(DataFusionError::from(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_errors_of_dependencies_are_said_plainly() {
        let said = |t: &str| bad_data(t).unwrap();
        assert_eq!(
            said(
                "Generic DeltaTable error: Arrow error: Cast error: Cannot cast string \
                  '02/03/2024' to value of Date32 type"
            ),
            "the text '02/03/2024' is not a valid DATE (TRY_CAST(... AS DATE) gives NULL for \
             such values)"
        );
        assert_eq!(
            said(
                "Failed to convert into Arrow schema: Cast error: Can't cast value 1e23 to \
                  type Int64"
            ),
            "the value 1e23 is out of range for BIGINT"
        );
        assert!(said("Arrow error: Divide by zero error").starts_with("division by zero"));
        assert_eq!(
            said(
                "Arrow error: Parser error: Error while parsing value 'x' as type 'Int64' \
                  for column 1 at line 2. Row data: '[2,x,4]'"
            ),
            "'x' in field 2 of a CSV record is not a valid BIGINT (the record: 2,x,4)"
        );
        assert_eq!(
            said("Csv error: incorrect number of fields for line 2, expected 2 got 1"),
            "a CSV record has 1 field(s) where 2 were expected"
        );
        assert_eq!(
            said("Csv error: incorrect number of fields for line 4, expected 2 got more than 2"),
            "a CSV record has 2 field(s) where 2 were expected"
        );
        assert_eq!(
            said("Cast error: Can't cast value 123456789 to type Decimal128(5, 2)"),
            "the value 123456789 is out of range for DECIMAL(5,2)"
        );
        assert_eq!(
            said("Parser error: Error parsing timestamp from 'soon': error parsing date"),
            "the text 'soon' is not a valid TIMESTAMP (TRY_CAST(... AS TIMESTAMP) gives NULL \
             for such values)"
        );
        assert!(said(
            "External error: Invalid data found: 1 rows failed validation check.\nPreview"
        )
        .starts_with("1 row(s) have NULL in a NOT NULL column"));
        assert_eq!(bad_data("table 'icepie.core.nope' not found"), None);
    }

    #[test]
    fn delta_errors_about_data_become_bad_data() {
        let e = IcePieError::from(DeltaTableError::Generic(
            "Arrow error: Divide by zero error".into(),
        ));
        assert!(matches!(e, IcePieError::BadData(_)), "{e:?}");
        let e = IcePieError::from(DeltaTableError::Generic(
            "Arrow error: External error: something else".into(),
        ));
        assert!(matches!(e, IcePieError::Delta(_)), "{e:?}");
        // Said without the layers it passed through.
        assert_eq!(e.to_string(), "something else");
    }
}
