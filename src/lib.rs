//! # icepie
//!
//! The "Ice Pie" data architecture on Apache DataFusion and Delta Lake: raw data in an
//! immutable, append-only **frozen core**, and business domains served by **slices**:
//! physically isolated, versioned tables materialized from SQL over the core, each refreshed on
//! its own. A slice whose refresh fails keeps serving its last good version; nothing else
//! notices.
//!
//! Everything DataFusion's SQL accepts works, plus `CREATE CORE TABLE`, `INGEST INTO`,
//! `CREATE [OR REPLACE] SLICE … [INCREMENTAL | FULL | AUTO]`, `REFRESH SLICE … [FULL]`
//! (incremental when the new core data allows), `EXPLAIN REFRESH SLICE`, `FREEZE SLICE`,
//! `THAW SLICE`, `ALTER SLICE … SET REFRESH … | CLUSTER BY …`, `APPLY PROPOSAL n`,
//! `DISMISS PROPOSAL n`,
//! `ROLLBACK SLICE ... TO VERSION n`, `DROP SLICE`, `VACUUM SLICE(S)`, `VERIFY SLICE(S)`,
//! `SHOW SLICES`,
//! `SHOW SLICE HISTORY`, `DESCRIBE SLICE`, the table functions `slice_at`, `core_at`,
//! `slice_history` and `fresh`, the `system.core_tables`, `system.slices`, `system.refreshes`,
//! `system.usage`, `system.usage_columns` and `system.proposals` tables, and the settings `icepie.*`
//! ([`IcePieOptions`]).
//!
//! While an [`IcePie`] is open, its scheduler runs the refreshes that slices' policies
//! (`REFRESH EVERY 'interval'`, `REFRESH ON CHANGE`) make due.
//!
//! ## Embedding icepie
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> icepie::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let location = dir.path().to_str().unwrap();
//! use datafusion::arrow::util::pretty::pretty_format_batches;
//! use icepie::IcePie;
//!
//! let warehouse = IcePie::open(location).await?; // a local path, or s3://… with feature `s3`
//! warehouse
//!     .sql(
//!         "CREATE CORE TABLE orders (id INT NOT NULL, customer TEXT, amount DOUBLE);
//!          INGEST INTO orders VALUES (1, 'ada', 10.0), (2, 'bob', 5.5), (3, 'ada', 2.5);
//!          CREATE SLICE finance.revenue OWNER 'finance' AS
//!              SELECT customer, sum(amount) AS revenue FROM core.orders GROUP BY customer;",
//!     )
//!     .await?;
//!
//! let batches = warehouse
//!     .sql("SELECT * FROM finance.revenue ORDER BY customer")
//!     .await?
//!     .collect()
//!     .await?;
//! assert_eq!(
//!     pretty_format_batches(&batches)?.to_string(),
//!     "+----------+---------+\n\
//!      | customer | revenue |\n\
//!      +----------+---------+\n\
//!      | ada      | 12.5    |\n\
//!      | bob      | 5.5     |\n\
//!      +----------+---------+"
//! );
//!
//! // New core data, then a new slice version built from it:
//! warehouse.sql("INGEST INTO orders VALUES (4, 'bob', 1.0)").await?;
//! let version = warehouse.refresh("finance.revenue").await?.version;
//! assert_eq!(version, 1);
//! # Ok(())
//! # }
//! ```
//!
//! ## The API an embedder uses
//!
//! - Opening: [`IcePie::open`], or [`IcePie::builder`] for an object store, storage options,
//!   `icepie.*` settings ([`IcePieOptions`]), the scheduler and the clock ([`IcePieBuilder`]);
//!   [`IcePie::close`] stops the scheduler and waits for refresh records being written.
//! - SQL: [`IcePie::sql`] (a DataFusion `DataFrame`), [`IcePie::parse`] and
//!   [`IcePie::execute`] ([`Statement`]), [`IcePie::execute_with_params`],
//!   [`IcePie::execute_with_progress`] ([`Progress`]), [`IcePie::with_notices`], and
//!   [`IcePie::context`], the DataFusion `SessionContext` for functions and tables of one's own.
//! - Typed methods on slices: [`IcePie::refresh`] ([`BuildOutcome`]), `refresh_full`,
//!   `explain_refresh`, `freeze`, `thaw`, `alter`, `rollback` ([`LifecycleOutcome`]),
//!   `history` ([`HistoryEntry`]), `vacuum` ([`VacuumOutcome`]), `verify` ([`Verified`]),
//!   [`IcePie::slices`] and [`IcePie::slice`] ([`SliceInfo`]), [`IcePie::proposals`]
//!   ([`Proposal`]) and `dismiss_proposal`.
//! - Refreshes the scheduler ran: [`IcePie::subscribe`] ([`RefreshEvent`]).
//! - Serving: [`server::serve_pg`] and [`server::serve_flight`] ([`server::ServerOptions`]).
//! - Errors: [`IcePieError`], with its SQLSTATE ([`server::sqlstate`]).
//!
//! ## Layers
//!
//! Each module uses only the modules to its right; peers (`|`) use neither each other. The test
//! `layers` fails on a `crate::` path that points left or sideways. Where a lower layer must
//! reach a higher one it does so through a small trait the higher one implements: slices and
//! the core plan SQL through `sql::Planner` (the catalog's time travel), table providers open
//! the latest version through `table::live::OpenLatest` and report damaged files through
//! `table::damage::Diagnose` (the slice layer's), and a read refreshes a slice through the
//! engine's `slice::Refresher`.
//!
//! ```text
//! server → engine → catalog → slice | core → table → usage → sql → storage → options | notices → error → text
//! ```
//!
//! - `text`, `error`, `options`, `notices`: formatting, the error type, the `icepie.*`
//!   settings, and the notices a statement gives its caller.
//! - `storage`: the warehouse on object_store: paths, names, Delta tables, the journal.
//! - `sql`: icepie's statements, their parser, and the `Planner` hook.
//! - `usage`: recording which tables and columns queries read.
//! - `table`: the table providers of core tables and slices, and what instruments their plans
//!   (progress, damage, pass-through watches).
//! - `slice`: defining, building, refreshing and keeping slices; `core`: creating and
//!   ingesting into core tables.
//! - `catalog`: the schemas `core`, the domains and `system`, time travel, proposals.
//! - `engine`: [`IcePie`], the entry point: statements, the scheduler.
//! - `server`: the PostgreSQL and Flight SQL servers.

#![warn(missing_docs)]
#![warn(unnameable_types)]
#![warn(unreachable_pub)]

pub(crate) mod catalog;
pub(crate) mod core;
pub(crate) mod engine;
pub(crate) mod error;
pub(crate) mod notices;
pub(crate) mod options;
pub mod server;
pub(crate) mod slice;
pub(crate) mod sql;
pub(crate) mod storage;
pub(crate) mod table;
pub(crate) mod text;
pub(crate) mod usage;

pub use catalog::proposals::Proposal;
pub use engine::{IcePie, IcePieBuilder, RefreshEvent};
pub use error::{IcePieError, Result};
pub use options::{AutoApply, IcePieOptions, OnStale, Size, Span, Staleness, Switch};
pub use slice::clustering::Clustered;
pub use slice::lifecycle::LifecycleOutcome;
pub use slice::meta::{
    BuildCost, BuildCosts, BuildMode, Built, CommitKind, Frozen, HistoryEntry, InputRead,
    InputVersion, SliceDescriptor,
};
pub use slice::quarantine::{FileCheck, Verified};
pub use slice::vacuum::VacuumOutcome;
pub use slice::{BuildOutcome, SliceInfo, SliceState};
pub use sql::{
    ClusterBy, CreateCoreTable, CreateSlice, DataFusionStatement, DataSource, FileFormat, Ingest,
    RefreshMode, RefreshPolicy, SourceQuery, Statement,
};
pub use storage::names::SliceName;
pub use storage::{TableStats, DEFAULT_LOCATION};
pub use table::progress::Progress;
