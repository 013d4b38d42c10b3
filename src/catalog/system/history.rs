//! The history of a slice as a table: the columns and rows of `slice_history('domain.name')`
//! and `SHOW SLICE HISTORY`, one row per commit.

use std::sync::Arc;

use datafusion::arrow::array::{BooleanArray, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;

use super::{mem, timestamps, ts};
use crate::error::Result;
use crate::slice::lifecycle::retained;
use crate::slice::meta::{format_inputs, format_reads, Built, HistoryEntry};

/// How the commit's data was built, for commits that built data.
fn built(e: &HistoryEntry) -> Option<&Built> {
    e.descriptor.as_ref().and_then(|m| m.built.as_ref())
}

/// The columns of `slice_history('domain.name')` and `SHOW SLICE HISTORY`.
pub(crate) fn history_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("version", DataType::Int64, false),
        Field::new("committed_at", ts(), true),
        Field::new("kind", DataType::Utf8, false),
        Field::new("rows", DataType::Int64, true),
        Field::new("inputs", DataType::Utf8, false),
        Field::new("retained", DataType::Boolean, false),
        Field::new("mode", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
        Field::new("read", DataType::Utf8, true),
    ]))
}

/// The table `slice_history('domain.name')` returns: one row per commit, newest first.
pub(crate) fn history_table(
    entries: &[HistoryEntry],
    latest: i64,
    retain_versions: usize,
) -> Result<Arc<dyn TableProvider>> {
    let kept = retained(latest, retain_versions);
    let schema = history_schema();
    Ok(mem(
        &schema,
        vec![
            Arc::new(Int64Array::from_iter_values(
                entries.iter().map(|e| e.version),
            )),
            timestamps(entries.iter().map(|e| e.committed_at).collect()),
            Arc::new(StringArray::from_iter_values(
                entries.iter().map(HistoryEntry::kind),
            )),
            Arc::new(Int64Array::from(
                entries.iter().map(|e| e.rows).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from_iter_values(entries.iter().map(|e| {
                e.descriptor
                    .as_ref()
                    .map(|m| format_inputs(&m.inputs))
                    .unwrap_or_default()
            }))),
            Arc::new(BooleanArray::from(
                entries
                    .iter()
                    .map(|e| kept.contains(&e.version))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                entries
                    .iter()
                    .map(|e| built(e).map(|b| b.mode.to_string()))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                entries
                    .iter()
                    .map(|e| built(e).map(|b| b.reason.clone()))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                entries
                    .iter()
                    .map(|e| built(e).map(|b| format_reads(&b.reads)))
                    .collect::<Vec<_>>(),
            )),
        ],
    )?)
}
