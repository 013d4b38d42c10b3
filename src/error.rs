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

    /// Metadata icepie wrote could not be read back.
    #[error("corrupt icepie metadata in {what}: {reason}")]
    CorruptMetadata {
        /// Where.
        what: String,
        /// What is wrong.
        reason: String,
    },

    /// An error from DataFusion (planning or execution).
    #[error(transparent)]
    DataFusion(DataFusionError),

    /// An error from Delta Lake (storage, commits, conflicts).
    #[error(transparent)]
    Delta(#[from] DeltaTableError),

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
                Err(inner) => IcePieError::DataFusion(DataFusionError::External(inner)),
            },
            DataFusionError::Context(ctx, inner) => match IcePieError::from(*inner) {
                IcePieError::DataFusion(inner) => {
                    IcePieError::DataFusion(DataFusionError::Context(ctx, Box::new(inner)))
                }
                ours => ours,
            },
            DataFusionError::SQL(e, _) => IcePieError::Syntax(e.to_string()),
            other => IcePieError::DataFusion(other),
        }
    }
}

impl From<datafusion::sql::sqlparser::parser::ParserError> for IcePieError {
    fn from(e: datafusion::sql::sqlparser::parser::ParserError) -> Self {
        IcePieError::Syntax(e.to_string())
    }
}

impl From<datafusion::arrow::error::ArrowError> for IcePieError {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        IcePieError::DataFusion(e.into())
    }
}
