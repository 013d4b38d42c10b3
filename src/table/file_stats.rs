//! DataFusion statistics from the per-file statistics Delta keeps in each `add` action.
//!
//! With them, a scan skips whole files whose value ranges cannot match a filter (or a join's
//! or a top-k's dynamic filter) without reading their footers, and the planner sees the same
//! column ranges and null counts as it would from a `ListingTable` that read every footer.
//!
//! Delta's bounds are read conservatively: every bound is `Inexact` (a string bound may be a
//! truncated prefix), a timestamp's upper bound is rounded up to the next millisecond (Delta
//! writes them at millisecond precision), and decimals too wide for the `f64` they travel as in
//! JSON get no bounds. A file without statistics has unknown columns.

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::stats::Precision;
use datafusion::common::{ColumnStatistics, ScalarValue, Statistics};
use serde_json::Value;

/// Widest decimal whose every value survives a trip through `f64` (Delta's JSON statistics).
const EXACT_DECIMAL_DIGITS: u8 = 15;

/// The statistics of one file of `size` bytes from its Delta `stats` JSON.
pub(crate) fn file_statistics(
    schema: &Schema,
    stats: Option<&str>,
    rows: Option<usize>,
    size: u64,
) -> Statistics {
    let parsed: Option<Value> = stats.and_then(|s| serde_json::from_str(s).ok());
    let of = |kind: &str, column: &str| {
        parsed
            .as_ref()
            .and_then(|p| p.get(kind))
            .and_then(|m| m.get(column))
    };
    let column_statistics = schema
        .fields()
        .iter()
        .map(|field| {
            let (name, data_type) = (field.name(), field.data_type());
            ColumnStatistics {
                null_count: of("nullCount", name)
                    .and_then(Value::as_u64)
                    .and_then(|n| usize::try_from(n).ok())
                    .map_or(Precision::Absent, Precision::Exact),
                min_value: bound(of("minValues", name), data_type, false),
                max_value: bound(of("maxValues", name), data_type, true),
                ..ColumnStatistics::new_unknown()
            }
        })
        .collect();
    Statistics {
        num_rows: rows.map_or(Precision::Absent, Precision::Exact),
        total_byte_size: Precision::Inexact(usize::try_from(size).unwrap_or(usize::MAX)),
        column_statistics,
    }
}

/// One bound of a column as DataFusion can prune with, or `Absent` when unusable.
fn bound(value: Option<&Value>, data_type: &DataType, upper: bool) -> Precision<ScalarValue> {
    let text = match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) if *data_type == DataType::Boolean => {
            return Precision::Inexact(ScalarValue::Boolean(Some(*b)))
        }
        _ => return Precision::Absent,
    };
    let usable = match data_type {
        DataType::Decimal32(..) | DataType::Decimal64(..) => true,
        DataType::Decimal128(p, _) | DataType::Decimal256(p, _) => *p <= EXACT_DECIMAL_DIGITS,
        t => {
            t.is_integer()
                || t.is_floating()
                || t.is_temporal() && !matches!(t, DataType::Interval(_) | DataType::Duration(_))
                || matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
        }
    };
    if !usable {
        return Precision::Absent;
    }
    match ScalarValue::try_from_string(text, data_type) {
        Ok(v) if v.is_null() => Precision::Absent,
        Ok(v) if upper => ceil_millisecond(v).map_or(Precision::Absent, Precision::Inexact),
        Ok(v) => Precision::Inexact(v),
        Err(_) => Precision::Absent,
    }
}

/// A timestamp upper bound moved past every value Delta's millisecond rounding may have cut.
fn ceil_millisecond(value: ScalarValue) -> Option<ScalarValue> {
    use ScalarValue::*;
    Some(match value {
        TimestampMicrosecond(Some(v), tz) => TimestampMicrosecond(Some(v.checked_add(999)?), tz),
        TimestampNanosecond(Some(v), tz) => TimestampNanosecond(Some(v.checked_add(999_999)?), tz),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, TimeUnit};

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8View, true),
            Field::new("price", DataType::Decimal128(15, 2), true),
            Field::new("wide", DataType::Decimal128(38, 2), true),
            Field::new("day", DataType::Date32, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("absent", DataType::Float64, true),
        ])
    }

    #[test]
    fn delta_bounds_become_inexact_statistics() {
        let stats = r#"{"numRecords":3,
            "minValues":{"id":1,"name":"a","price":1.25,"wide":1.5,"day":"2024-01-01",
                         "at":"2024-01-01T00:00:00.123Z"},
            "maxValues":{"id":9,"name":"zz","price":99.99,"wide":2.5,"day":"2024-12-31",
                         "at":"2024-01-01T00:00:00.456Z"},
            "nullCount":{"id":0,"name":1,"price":0,"day":0,"at":2}}"#;
        let s = file_statistics(&schema(), Some(stats), Some(3), 100);
        assert_eq!(s.num_rows, Precision::Exact(3));
        let c = &s.column_statistics;
        assert_eq!(
            c[0].min_value,
            Precision::Inexact(ScalarValue::Int64(Some(1)))
        );
        assert_eq!(
            c[0].max_value,
            Precision::Inexact(ScalarValue::Int64(Some(9)))
        );
        assert_eq!(c[1].null_count, Precision::Exact(1));
        assert_eq!(
            c[1].max_value,
            Precision::Inexact(ScalarValue::Utf8View(Some("zz".into())))
        );
        assert_eq!(
            c[2].max_value,
            Precision::Inexact(ScalarValue::Decimal128(Some(9999), 15, 2))
        );
        // Too wide for f64: no bounds, whatever the JSON says.
        assert_eq!(c[3].min_value, Precision::Absent);
        assert_eq!(
            c[4].min_value,
            Precision::Inexact(ScalarValue::Date32(Some(19723)))
        );
        // The upper bound covers microseconds Delta's millisecond rounding dropped.
        let tz = Some("UTC".into());
        assert_eq!(
            c[5].min_value,
            Precision::Inexact(ScalarValue::TimestampMicrosecond(
                Some(1_704_067_200_123_000),
                tz.clone()
            ))
        );
        assert_eq!(
            c[5].max_value,
            Precision::Inexact(ScalarValue::TimestampMicrosecond(
                Some(1_704_067_200_456_999),
                tz
            ))
        );
        assert_eq!(c[6].min_value, Precision::Absent);
        assert_eq!(c[6].null_count, Precision::Absent);
    }

    #[test]
    fn a_file_without_or_with_bad_statistics_is_unknown() {
        for stats in [None, Some("not json"), Some(r#"{"minValues":{"id":"x"}}"#)] {
            let s = file_statistics(&schema(), stats, None, 7);
            assert_eq!(s.num_rows, Precision::Absent);
            assert_eq!(s.total_byte_size, Precision::Inexact(7));
            assert!(s
                .column_statistics
                .iter()
                .all(|c| c.min_value == Precision::Absent && c.max_value == Precision::Absent));
        }
    }
}
