//! Noticing damaged files while reading them.
//!
//! The Parquet scan of a core table or slice reads its files through the table layer's
//! watched readers ([`crate::table::damage`]), which hand a failed read to the table's
//! [`DamageWatch`]. The file is checked ([`quarantine::check_files`]'s check: present, of the recorded size,
//! with a readable footer): a damaged file is recorded (see [`quarantine`]) and the query
//! fails with an error naming the table, the file and the fix; an error of another kind (a
//! network fault, say) is passed on as it was, and quarantines nothing.

use std::sync::Arc;

use datafusion::parquet::errors::ParquetError;
use futures::future::BoxFuture;
use futures::FutureExt;
use object_store::path::Path;
use object_store::ObjectStore;

use super::meta;
use super::quarantine::{self, check_file};
use crate::storage::names::SliceName;
use crate::storage::{Warehouse, SLICES_DIR};
use crate::table::damage::Diagnose;
use crate::table::TableKind;

/// Which table a scan reads, and where to record what is wrong with it.
#[derive(Debug)]
pub(crate) struct DamageWatch {
    pub warehouse: Warehouse,
    /// The table's path in the warehouse.
    pub rel: String,
    pub kind: TableKind,
    /// Qualified name (`core.events`, `finance.revenue`).
    pub name: String,
}

impl Diagnose for DamageWatch {
    /// Turns the failed read of `file` (relative to the table) into a damage report when the
    /// file is damaged; otherwise gives the error back unchanged.
    fn diagnose(
        &self,
        store: Arc<dyn ObjectStore>,
        location: Path,
        file: String,
        bytes: u64,
        error: ParquetError,
    ) -> BoxFuture<'_, ParquetError> {
        async move {
            let size = i64::try_from(bytes).unwrap_or(i64::MAX);
            let check = check_file(store, location, size, false).await;
            if check.ok() {
                return error;
            }
            let problem = format!(
                "{}: {}",
                check.status,
                check.detail.unwrap_or_else(|| error.to_string())
            );
            // Reporting matters more than recording; a failed record is found again next read.
            let _ = quarantine::record(&self.warehouse, &self.rel, &file, &problem).await;
            let damaged = match self.kind {
                TableKind::Core => {
                    let readers = readers_of(&self.warehouse, &self.name).await;
                    quarantine::core_damaged(&self.name, &file, &problem, &readers)
                }
                _ => quarantine::slice_damaged(&self.name, &file, &problem),
            };
            ParquetError::External(Box::new(damaged))
        }
        .boxed()
    }
}

/// The slices whose latest version reads `table` (a qualified name); those that cannot be
/// read are left out.
pub(crate) async fn readers_of(warehouse: &Warehouse, table: &str) -> Vec<String> {
    let mut readers = Vec::new();
    let Ok(domains) = warehouse.list_children(SLICES_DIR).await else {
        return readers;
    };
    for domain in domains {
        let Ok(names) = warehouse
            .list_children(&format!("{SLICES_DIR}/{domain}"))
            .await
        else {
            continue;
        };
        for name in names {
            let Ok(slice) = SliceName::new(domain.clone(), &name) else {
                continue;
            };
            let Ok(Some(t)) = warehouse.load(&Warehouse::slice_path(&slice), None).await else {
                continue;
            };
            if let Ok((m, _)) = meta::latest_meta(&t, &slice.to_string()).await {
                if m.inputs.iter().any(|i| i.table == table) {
                    readers.push(slice.to_string());
                }
            }
        }
    }
    readers
}
