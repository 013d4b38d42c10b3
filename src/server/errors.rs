//! SQLSTATE codes for icepie's errors, and errors as the protocol carries them.

use pgwire::error::{ErrorInfo, PgWireError};

use crate::error::IcePieError;

/// The SQLSTATE of an error: what kind of failure it is, for clients to act on.
pub fn sqlstate(e: &IcePieError) -> &'static str {
    match e {
        IcePieError::Syntax(_) => "42601",
        IcePieError::InvalidName { .. } => "42602",
        IcePieError::CoreTableNotFound(_) | IcePieError::SliceNotFound(_) => "42P01",
        IcePieError::AlreadyExists { .. } => "42P07",
        IcePieError::CoreTableInUse { .. } => "2BP01",
        IcePieError::SchemaMismatch { .. } => "42804",
        // read_only_sql_transaction: the core is append-only.
        IcePieError::ReadOnly(_) => "25006",
        IcePieError::BadLocation { .. } => "58P01",
        IcePieError::InvalidDefinition { .. } => "42P17",
        IcePieError::RefreshFailed { source, .. } => sqlstate(source),
        // serialization_failure: another writer went first; running it again is the remedy.
        IcePieError::Conflict { .. }
        | IcePieError::ChangedMeanwhile { .. }
        | IcePieError::DroppedMeanwhile { .. } => "40001",
        IcePieError::Damaged { .. } | IcePieError::CorruptMetadata { .. } => "XX001",
        IcePieError::MemoryBudget { .. } => "53200",
        // object_not_in_prerequisite_state: thaw it first.
        IcePieError::Frozen { .. } | IcePieError::Stale { .. } => "55000",
        IcePieError::VersionNotFound { .. } | IcePieError::ProposalNotFound(_) => "42704",
        IcePieError::Setting { .. } => "22023",
        IcePieError::Joined(inner) => sqlstate(inner),
        IcePieError::Column(_) => "42703",
        IcePieError::BadData(_) => "22000",
        IcePieError::DataFusion(e) => datafusion_sqlstate(e),
        IcePieError::Warehouse { .. } | IcePieError::Delta(_) | IcePieError::ObjectStore(_) => {
            "58030"
        }
        IcePieError::Server(_) => "58000",
        IcePieError::NotAllowed(_) => "42501",
    }
}

fn datafusion_sqlstate(e: &datafusion::error::DataFusionError) -> &'static str {
    use datafusion::error::DataFusionError as E;
    match e.find_root() {
        E::SQL(..) => "42601",
        E::SchemaError(..) => "42703",
        E::Plan(text) if text.contains("not found") => "42P01",
        E::Plan(_) => "42000",
        E::NotImplemented(_) => "0A000",
        E::ResourcesExhausted(_) => "53200",
        E::Execution(_) | E::ArrowError(..) => "22000",
        _ => "XX000",
    }
}

pub(super) fn error_info(e: &IcePieError) -> ErrorInfo {
    ErrorInfo::new("ERROR".into(), sqlstate(e).into(), e.to_string())
}

pub(super) fn user_error(e: &IcePieError) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(e)))
}
