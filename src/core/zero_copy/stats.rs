//! Delta statistics of a file, counted from its decoded rows: `numRecords`, and per column
//! `nullCount`, `minValues` and `maxValues` (bounds for the types Delta readers prune with,
//! never narrower than the values).

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::ScalarValue;
use datafusion::functions_aggregate::min_max::{MaxAccumulator, MinAccumulator};
use datafusion::logical_expr::Accumulator;

/// Columns with statistics, as Delta's `delta.dataSkippingNumIndexedCols` default.
const INDEXED_COLUMNS: usize = 32;
/// Characters of a string bound kept, as Delta's `delta.dataSkippingStringPrefixLength`.
const STRING_PREFIX: usize = 32;

/// Whether a column of `data_type` gets Delta bounds from icepie (floats do not: a NaN is
/// outside any bound).
fn bounded(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::Date32
            | DataType::Decimal128(..)
            | DataType::Timestamp(..)
            | DataType::Utf8
            | DataType::LargeUtf8
    )
}

/// Statistics being counted over the batches of one row group.
pub(super) struct Counting {
    rows: u64,
    columns: Vec<(u64, Option<(MinAccumulator, MaxAccumulator)>)>,
}

impl Counting {
    pub(super) fn new(schema: &Schema) -> datafusion::common::Result<Self> {
        let columns = schema
            .fields()
            .iter()
            .take(INDEXED_COLUMNS)
            .map(|f| {
                let bounds = if bounded(f.data_type()) {
                    Some((
                        MinAccumulator::try_new(f.data_type())?,
                        MaxAccumulator::try_new(f.data_type())?,
                    ))
                } else {
                    None
                };
                Ok((0, bounds))
            })
            .collect::<datafusion::common::Result<_>>()?;
        Ok(Self { rows: 0, columns })
    }

    pub(super) fn add(&mut self, batch: &RecordBatch) -> datafusion::common::Result<()> {
        self.rows += batch.num_rows() as u64;
        for (i, (nulls, bounds)) in self.columns.iter_mut().enumerate() {
            let column = batch.column(i);
            *nulls += column.null_count() as u64;
            if let Some((min, max)) = bounds {
                min.update_batch(std::slice::from_ref(column))?;
                max.update_batch(std::slice::from_ref(column))?;
            }
        }
        Ok(())
    }

    pub(super) fn totals(self) -> datafusion::common::Result<Totals> {
        let columns = self
            .columns
            .into_iter()
            .map(|(nulls, bounds)| {
                let (min, max) = match bounds {
                    Some((mut min, mut max)) => (known(min.evaluate()?), known(max.evaluate()?)),
                    None => (None, None),
                };
                Ok(ColumnTotals { nulls, min, max })
            })
            .collect::<datafusion::common::Result<_>>()?;
        Ok(Totals {
            rows: self.rows,
            columns,
        })
    }
}

fn known(value: ScalarValue) -> Option<ScalarValue> {
    (!value.is_null()).then_some(value)
}

/// What Delta's statistics of a file say of its rows.
#[derive(Debug, Clone)]
pub(super) struct Totals {
    rows: u64,
    columns: Vec<ColumnTotals>,
}

#[derive(Debug, Clone)]
struct ColumnTotals {
    nulls: u64,
    min: Option<ScalarValue>,
    max: Option<ScalarValue>,
}

impl Totals {
    pub(super) fn empty(schema: &Schema) -> Self {
        let columns = schema
            .fields()
            .iter()
            .take(INDEXED_COLUMNS)
            .map(|_| ColumnTotals {
                nulls: 0,
                min: None,
                max: None,
            })
            .collect();
        Self { rows: 0, columns }
    }

    pub(super) fn merge(mut self, other: Totals) -> Totals {
        self.rows += other.rows;
        for (a, b) in self.columns.iter_mut().zip(other.columns) {
            a.nulls += b.nulls;
            a.min = pick(a.min.take(), b.min, std::cmp::Ordering::Less);
            a.max = pick(a.max.take(), b.max, std::cmp::Ordering::Greater);
        }
        self
    }
}

/// Of two bounds, `b` when it is further in direction `beyond`.
fn pick(
    a: Option<ScalarValue>,
    b: Option<ScalarValue>,
    beyond: std::cmp::Ordering,
) -> Option<ScalarValue> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.partial_cmp(&a) == Some(beyond) {
            b
        } else {
            a
        }),
        (a, b) => a.or(b),
    }
}

/// A file's Delta statistics (`numRecords`, `minValues`, `maxValues`, `nullCount`) as JSON.
pub(super) fn stats_json(schema: &Schema, totals: &Totals) -> String {
    let (mut mins, mut maxes, mut nulls) = (Vec::new(), Vec::new(), Vec::new());
    for (field, column) in schema.fields().iter().zip(&totals.columns) {
        if field.data_type().is_nested() {
            continue;
        }
        let key = serde_json::Value::from(field.name().as_str()).to_string();
        nulls.push(format!("{key}:{}", column.nulls));
        if let Some(v) = column.min.as_ref().and_then(|v| json_bound(v, false)) {
            mins.push(format!("{key}:{v}"));
        }
        if let Some(v) = column.max.as_ref().and_then(|v| json_bound(v, true)) {
            maxes.push(format!("{key}:{v}"));
        }
    }
    format!(
        r#"{{"numRecords":{},"minValues":{{{}}},"maxValues":{{{}}},"nullCount":{{{}}}}}"#,
        totals.rows,
        mins.join(","),
        maxes.join(","),
        nulls.join(",")
    )
}

/// A bound as Delta writes it in JSON, or `None` when it cannot be written exactly enough: a
/// string bound keeps [`STRING_PREFIX`] characters (a longer upper bound is left out, as its
/// prefix is below it); timestamps are written to the millisecond, rounded down, which Delta
/// readers widen by a millisecond for upper bounds.
fn json_bound(value: &ScalarValue, upper: bool) -> Option<String> {
    use ScalarValue::*;
    let text = |s: String| Some(serde_json::Value::from(s).to_string());
    match value {
        Int8(Some(v)) => Some(v.to_string()),
        Int16(Some(v)) => Some(v.to_string()),
        Int32(Some(v)) => Some(v.to_string()),
        Int64(Some(v)) => Some(v.to_string()),
        Date32(Some(days)) => {
            let date = NaiveDate::from_ymd_opt(1970, 1, 1)?
                .checked_add_signed(chrono::Duration::days(i64::from(*days)))?;
            text(date.format("%Y-%m-%d").to_string())
        }
        Decimal128(Some(v), _, scale) => decimal_text(*v, *scale),
        TimestampSecond(Some(v), tz) => timestamp_text(DateTime::from_timestamp(*v, 0)?, tz),
        TimestampMillisecond(Some(v), tz) => {
            timestamp_text(DateTime::from_timestamp_millis(*v)?, tz)
        }
        TimestampMicrosecond(Some(v), tz) => {
            timestamp_text(DateTime::from_timestamp_micros(*v)?, tz)
        }
        TimestampNanosecond(Some(v), tz) => timestamp_text(DateTime::from_timestamp_nanos(*v), tz),
        Utf8(Some(s)) | LargeUtf8(Some(s)) => {
            if s.chars().count() <= STRING_PREFIX {
                text(s.clone())
            } else if upper {
                None
            } else {
                text(s.chars().take(STRING_PREFIX).collect())
            }
        }
        _ => None,
    }
}

fn timestamp_text(at: DateTime<Utc>, zone: &Option<Arc<str>>) -> Option<String> {
    let format = if zone.is_some() {
        "%Y-%m-%dT%H:%M:%S%.3fZ"
    } else {
        "%Y-%m-%d %H:%M:%S%.3f"
    };
    Some(serde_json::Value::from(at.format(format).to_string()).to_string())
}

/// The exact decimal text of `value` at `scale`, as a JSON number.
fn decimal_text(value: i128, scale: i8) -> Option<String> {
    let scale = u32::try_from(scale).ok()?;
    if scale == 0 {
        return Some(value.to_string());
    }
    let unit = 10u128.checked_pow(scale)?;
    let magnitude = value.unsigned_abs();
    let sign = if value < 0 { "-" } else { "" };
    Some(format!(
        "{sign}{}.{:0width$}",
        magnitude / unit,
        magnitude % unit,
        width = scale as usize
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::Field;

    #[test]
    fn decimals_are_written_exactly() {
        assert_eq!(decimal_text(12345, 2).as_deref(), Some("123.45"));
        assert_eq!(decimal_text(-5, 2).as_deref(), Some("-0.05"));
        assert_eq!(decimal_text(7, 0).as_deref(), Some("7"));
        assert_eq!(
            decimal_text(i128::MAX, 38).as_deref(),
            Some("1.70141183460469231731687303715884105727")
        );
        assert_eq!(decimal_text(1, -2), None);
    }

    #[test]
    fn bounds_are_never_narrower_than_the_values() {
        let long = "x".repeat(40);
        assert_eq!(
            json_bound(&ScalarValue::Utf8(Some(long.clone())), false),
            Some(format!("\"{}\"", "x".repeat(32)))
        );
        assert_eq!(json_bound(&ScalarValue::Utf8(Some(long)), true), None);
        // 1.9999 s after the epoch: written as 1.999 s, which readers widen for upper bounds.
        let at = ScalarValue::TimestampMicrosecond(Some(1_999_900), Some("UTC".into()));
        assert_eq!(
            json_bound(&at, true).as_deref(),
            Some("\"1970-01-01T00:00:01.999Z\"")
        );
        // Before the epoch, still rounded down.
        let before = ScalarValue::TimestampMicrosecond(Some(-1), Some("UTC".into()));
        assert_eq!(
            json_bound(&before, false).as_deref(),
            Some("\"1969-12-31T23:59:59.999Z\"")
        );
        assert_eq!(
            json_bound(&ScalarValue::Date32(Some(-1)), false).as_deref(),
            Some("\"1969-12-31\"")
        );
        assert_eq!(json_bound(&ScalarValue::Float64(Some(1.0)), false), None);
    }

    #[test]
    fn statistics_are_delta_json() {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("price", DataType::Decimal128(15, 2), true),
            Field::new("score", DataType::Float64, true),
        ]);
        let totals = Totals {
            rows: 3,
            columns: vec![
                ColumnTotals {
                    nulls: 0,
                    min: Some(ScalarValue::Int64(Some(1))),
                    max: Some(ScalarValue::Int64(Some(9))),
                },
                ColumnTotals {
                    nulls: 1,
                    min: Some(ScalarValue::Decimal128(Some(150), 15, 2)),
                    max: Some(ScalarValue::Decimal128(Some(2599), 15, 2)),
                },
                ColumnTotals {
                    nulls: 2,
                    min: None,
                    max: None,
                },
            ],
        };
        let json: serde_json::Value = serde_json::from_str(&stats_json(&schema, &totals)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "numRecords": 3,
                "minValues": {"id": 1, "price": 1.50},
                "maxValues": {"id": 9, "price": 25.99},
                "nullCount": {"id": 0, "price": 1, "score": 2}
            })
        );
    }
}
