//! The results of icepie's own statements, as one-batch DataFrames.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::dataframe::DataFrame;
use datafusion::prelude::SessionContext;

use crate::core::LoadOutcome;
use crate::error::Result;
use crate::slice::lifecycle::LifecycleOutcome;
use crate::slice::meta::{format_inputs, Built, InputRead};
use crate::slice::quarantine::{FileCheck, Verified};
use crate::slice::vacuum::VacuumOutcome;
use crate::slice::{BuildOutcome, SliceInfo};
use crate::text::{human_duration, sql_type_name};

fn frame(ctx: &SessionContext, fields: Vec<(&str, ArrayRef)>) -> Result<DataFrame> {
    let schema = Schema::new(
        fields
            .iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        fields.into_iter().map(|(_, a)| a).collect(),
    )?;
    Ok(ctx.read_batch(batch)?)
}

fn strings(values: impl Iterator<Item = String>) -> ArrayRef {
    Arc::new(StringArray::from(values.collect::<Vec<_>>()))
}

fn ints(values: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(Int64Array::from(values.collect::<Vec<_>>()))
}

fn rfc3339(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

/// One row naming what was dropped, or no row when `IF EXISTS` found nothing.
pub(super) fn dropped(ctx: &SessionContext, name: Option<String>) -> Result<DataFrame> {
    frame(ctx, vec![("dropped", strings(name.into_iter()))])
}

/// One row with one message, for statements whose outcome is a sentence.
pub(super) fn message(ctx: &SessionContext, text: &str) -> Result<DataFrame> {
    frame(
        ctx,
        vec![("result", strings(std::iter::once(text.to_string())))],
    )
}

/// `CREATE CORE TABLE` and `INGEST`.
pub(super) fn loads(ctx: &SessionContext, out: Option<LoadOutcome>) -> Result<DataFrame> {
    let out: Vec<LoadOutcome> = out.into_iter().collect();
    frame(
        ctx,
        vec![
            ("table", strings(out.iter().map(|o| o.table.clone()))),
            ("version", ints(out.iter().map(|o| o.version))),
            ("rows_added", ints(out.iter().map(|o| o.rows_added))),
            ("rows", ints(out.iter().map(|o| o.stats.rows))),
            ("files", ints(out.iter().map(|o| o.stats.files))),
        ],
    )
}

/// `CREATE SLICE` and `REFRESH SLICE`.
pub(super) fn builds(ctx: &SessionContext, out: Option<BuildOutcome>) -> Result<DataFrame> {
    let out: Vec<BuildOutcome> = out.into_iter().collect();
    frame(
        ctx,
        vec![
            ("slice", strings(out.iter().map(|o| o.slice.to_string()))),
            ("version", ints(out.iter().map(|o| o.version))),
            ("rows", ints(out.iter().map(|o| o.stats.rows))),
            ("bytes", ints(out.iter().map(|o| o.stats.bytes))),
            (
                "inputs",
                strings(out.iter().map(|o| format_inputs(&o.inputs))),
            ),
            ("duration_ms", ints(out.iter().map(|o| o.duration_ms))),
            (
                "mode",
                Arc::new(StringArray::from(
                    out.iter()
                        .map(|o| match o.unchanged {
                            true => None,
                            false => o.built.as_ref().map(|b| b.mode.to_string()),
                        })
                        .collect::<Vec<_>>(),
                )) as ArrayRef,
            ),
            (
                "note",
                Arc::new(StringArray::from(
                    out.iter()
                        .map(|o| match (o.by_another_writer, o.unchanged) {
                            (true, _) => Some(format!(
                                "already refreshed to version {} by another writer",
                                o.version
                            )),
                            (_, true) => Some(format!(
                                "nothing to do: no input changed since version {}",
                                o.version
                            )),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                )) as ArrayRef,
            ),
        ],
    )
}

/// `EXPLAIN REFRESH SLICE`: the mode and why, then one row per input with the versions and
/// what the refresh would read of it.
pub(super) fn explained(ctx: &SessionContext, built: &Built) -> Result<DataFrame> {
    // A definition that reads no table still says its mode, on one row.
    let rows: Vec<Option<&InputRead>> = match built.reads.is_empty() {
        true => vec![None],
        false => built.reads.iter().map(Some).collect(),
    };
    explained_rows(ctx, built, &rows)
}

/// The columns of `EXPLAIN REFRESH SLICE`, without rows: what a server describes before it
/// runs.
pub(super) fn explained_columns(ctx: &SessionContext) -> Result<DataFrame> {
    let none = Built {
        mode: crate::slice::meta::BuildMode::Full,
        reason: String::new(),
        reads: vec![],
        appended: false,
    };
    explained_rows(ctx, &none, &[])
}

fn explained_rows(
    ctx: &SessionContext,
    built: &Built,
    rows: &[Option<&InputRead>],
) -> Result<DataFrame> {
    let opt_ints = |f: fn(&InputRead) -> Option<i64>| -> ArrayRef {
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.and_then(f)).collect::<Vec<_>>(),
        ))
    };
    frame(
        ctx,
        vec![
            ("mode", strings(rows.iter().map(|_| built.mode.to_string()))),
            ("reason", strings(rows.iter().map(|_| built.reason.clone()))),
            (
                "input",
                Arc::new(StringArray::from(
                    rows.iter()
                        .map(|r| r.map(|r| r.table.clone()))
                        .collect::<Vec<_>>(),
                )),
            ),
            ("from_version", opt_ints(|r| r.from)),
            ("to_version", opt_ints(|r| Some(r.to))),
            ("files", opt_ints(|r| Some(r.files))),
            ("rows", opt_ints(|r| Some(r.rows))),
            ("bytes", opt_ints(|r| Some(r.bytes))),
        ],
    )
}

/// `FREEZE`, `THAW` and `ROLLBACK SLICE`: the slice, the version it serves now, its state.
pub(super) fn lifecycle(
    ctx: &SessionContext,
    out: &LifecycleOutcome,
    info: Option<&SliceInfo>,
) -> Result<DataFrame> {
    lifecycle_rows(
        ctx,
        &[(
            out.slice.to_string(),
            out.version,
            info.map(|i| i.state.to_string()),
            out.committed,
        )],
    )
}

/// The columns of `FREEZE`, `THAW`, `ROLLBACK` and `ALTER SLICE`, without rows.
pub(super) fn lifecycle_columns(ctx: &SessionContext) -> Result<DataFrame> {
    lifecycle_rows(ctx, &[])
}

fn lifecycle_rows(
    ctx: &SessionContext,
    rows: &[(String, i64, Option<String>, bool)],
) -> Result<DataFrame> {
    frame(
        ctx,
        vec![
            ("slice", strings(rows.iter().map(|r| r.0.clone()))),
            ("version", ints(rows.iter().map(|r| r.1))),
            (
                "state",
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.2.clone()).collect::<Vec<_>>(),
                )) as ArrayRef,
            ),
            (
                "committed",
                Arc::new(BooleanArray::from(
                    rows.iter().map(|r| r.3).collect::<Vec<_>>(),
                )) as ArrayRef,
            ),
        ],
    )
}

/// `VACUUM SLICE` and `VACUUM SLICES`.
pub(super) fn vacuums(ctx: &SessionContext, out: &[VacuumOutcome]) -> Result<DataFrame> {
    frame(
        ctx,
        vec![
            ("slice", strings(out.iter().map(|o| o.slice.to_string()))),
            ("retained_from", ints(out.iter().map(|o| o.retained_from))),
            ("files_deleted", ints(out.iter().map(|o| o.files_deleted))),
            ("bytes_deleted", ints(out.iter().map(|o| o.bytes_deleted))),
            (
                "log_files_deleted",
                ints(out.iter().map(|o| o.log_files_deleted as i64)),
            ),
        ],
    )
}

/// `VERIFY SLICE` and `VERIFY SLICES`: one row per file checked.
pub(super) fn verifies(ctx: &SessionContext, out: &[Verified]) -> Result<DataFrame> {
    let rows: Vec<(&Verified, &FileCheck)> = out
        .iter()
        .flat_map(|v| v.files.iter().map(move |f| (v, f)))
        .collect();
    frame(
        ctx,
        vec![
            (
                "slice",
                strings(rows.iter().map(|(v, _)| v.slice.to_string())),
            ),
            ("version", ints(rows.iter().map(|(v, _)| v.version))),
            ("file", strings(rows.iter().map(|(_, f)| f.file.clone()))),
            ("bytes", ints(rows.iter().map(|(_, f)| f.bytes))),
            (
                "status",
                strings(rows.iter().map(|(_, f)| f.status.to_string())),
            ),
            (
                "detail",
                Arc::new(StringArray::from(
                    rows.iter()
                        .map(|(_, f)| f.detail.clone())
                        .collect::<Vec<_>>(),
                )) as ArrayRef,
            ),
        ],
    )
}

/// `DESCRIBE table`: each column's name, SQL type and whether it may be NULL.
pub(super) fn columns(ctx: &SessionContext, schema: &Schema) -> Result<DataFrame> {
    let fields = schema.fields();
    frame(
        ctx,
        vec![
            (
                "column_name",
                strings(fields.iter().map(|f| f.name().clone())),
            ),
            (
                "data_type",
                strings(fields.iter().map(|f| sql_type_name(f.data_type()))),
            ),
            (
                "is_nullable",
                strings(
                    fields
                        .iter()
                        .map(|f| if f.is_nullable() { "YES" } else { "NO" }.to_string()),
                ),
            ),
        ],
    )
}

/// `DESCRIBE SLICE`: one property per row.
pub(super) fn describe(ctx: &SessionContext, info: &SliceInfo) -> Result<DataFrame> {
    let frozen = info.frozen();
    let mut rows: Vec<(String, String)> = vec![
        ("slice".into(), info.name.to_string()),
        ("state".into(), info.state.to_string()),
        ("version".into(), info.version.to_string()),
        (
            "owner".into(),
            info.descriptor.owner.clone().unwrap_or_default(),
        ),
        ("refresh".into(), info.descriptor.refresh.to_string()),
        (
            "refresh_mode".into(),
            info.descriptor.refresh_mode.to_string(),
        ),
        (
            "partition_by".into(),
            info.descriptor.partition_by.join(", "),
        ),
        ("rows".into(), info.stats.rows.to_string()),
        ("bytes".into(), info.stats.bytes.to_string()),
        ("files".into(), info.stats.files.to_string()),
        ("refreshed_at".into(), rfc3339(info.refreshed_at)),
        ("inputs".into(), format_inputs(&info.descriptor.inputs)),
        (
            "lag".into(),
            info.lag_ms.map(human_duration).unwrap_or_default(),
        ),
        ("failures".into(), info.failures.to_string()),
        (
            "last_error".into(),
            info.last_error.clone().unwrap_or_default(),
        ),
        (
            "frozen_reason".into(),
            frozen.and_then(|f| f.reason.clone()).unwrap_or_default(),
        ),
        ("frozen_since".into(), rfc3339(frozen.map(|f| f.since))),
        ("definition".into(), info.descriptor.definition.clone()),
    ];
    rows.extend(
        info.columns
            .iter()
            .map(|(n, t)| (format!("column {n}"), t.clone())),
    );
    properties(ctx, &rows)
}

/// The columns of `DESCRIBE SLICE`, without rows.
pub(super) fn describe_columns(ctx: &SessionContext) -> Result<DataFrame> {
    properties(ctx, &[])
}

fn properties(ctx: &SessionContext, rows: &[(String, String)]) -> Result<DataFrame> {
    frame(
        ctx,
        vec![
            ("property", strings(rows.iter().map(|r| r.0.clone()))),
            ("value", strings(rows.iter().map(|r| r.1.clone()))),
        ],
    )
}
