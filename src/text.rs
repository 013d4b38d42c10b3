//! Values in people's words: SQL type names for Arrow types, short durations and sizes.

use datafusion::arrow::datatypes::DataType;

/// The SQL name of an Arrow type, as a user writes it in `CREATE CORE TABLE` (`BIGINT`,
/// `TEXT`, `DOUBLE`, `TIMESTAMP`, `DECIMAL(10,2)`, `INT[]`); Arrow's own name for the few
/// types SQL has no word for.
pub(crate) fn sql_type_name(data_type: &DataType) -> String {
    use DataType::*;
    match data_type {
        Null => "NULL".into(),
        Boolean => "BOOLEAN".into(),
        Int8 => "TINYINT".into(),
        Int16 => "SMALLINT".into(),
        Int32 => "INT".into(),
        Int64 => "BIGINT".into(),
        UInt8 => "TINYINT UNSIGNED".into(),
        UInt16 => "SMALLINT UNSIGNED".into(),
        UInt32 => "INT UNSIGNED".into(),
        UInt64 => "BIGINT UNSIGNED".into(),
        Float32 => "REAL".into(),
        Float64 => "DOUBLE".into(),
        Utf8 | LargeUtf8 | Utf8View => "TEXT".into(),
        Binary | LargeBinary | BinaryView | FixedSizeBinary(_) => "BYTEA".into(),
        Date32 | Date64 => "DATE".into(),
        Time32(_) | Time64(_) => "TIME".into(),
        Timestamp(_, None) => "TIMESTAMP".into(),
        Timestamp(_, Some(_)) => "TIMESTAMP WITH TIME ZONE".into(),
        Duration(_) | Interval(_) => "INTERVAL".into(),
        Decimal32(p, s) | Decimal64(p, s) | Decimal128(p, s) | Decimal256(p, s) => {
            format!("DECIMAL({p},{s})")
        }
        List(f) | LargeList(f) | ListView(f) | LargeListView(f) | FixedSizeList(f, _) => {
            format!("{}[]", sql_type_name(f.data_type()))
        }
        Struct(fields) => format!(
            "STRUCT({})",
            fields
                .iter()
                .map(|f| format!("{} {}", f.name(), sql_type_name(f.data_type())))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Map(entries, _) => match entries.data_type() {
            Struct(kv) if kv.len() == 2 => format!(
                "MAP({}, {})",
                sql_type_name(kv[0].data_type()),
                sql_type_name(kv[1].data_type())
            ),
            _ => data_type.to_string(),
        },
        Dictionary(_, values) => sql_type_name(values),
        RunEndEncoded(_, values) => sql_type_name(values.data_type()),
        other => other.to_string(),
    }
}

/// A duration of `ms` milliseconds as a person says it: `0.1 s`, `42 s`, `5 min`,
/// `5 min 30 s`, `2 h 3 min`, `3 d 4 h` (two units at most; negative counts as zero).
pub(crate) fn human_duration(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    let two = |big: i64, big_unit: &str, small: i64, small_unit: &str| {
        if small == 0 {
            format!("{big} {big_unit}")
        } else {
            format!("{big} {big_unit} {small} {small_unit}")
        }
    };
    if s < 10 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if s < 60 {
        format!("{s} s")
    } else if h == 0 {
        two(m, "min", s % 60, "s")
    } else if d == 0 {
        two(h, "h", m % 60, "min")
    } else {
        two(d, "d", h % 24, "h")
    }
}

/// A number of bytes as a person reads it: `999 B`, `1.5 KB`, `3.0 GB` (powers of 1024).
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Fields, TimeUnit};
    use std::sync::Arc;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_duration(133), "0.1 s");
        assert_eq!(human_duration(-5), "0.0 s");
        assert_eq!(human_duration(9_949), "9.9 s");
        assert_eq!(human_duration(42_900), "42 s");
        assert_eq!(human_duration(300_000), "5 min");
        assert_eq!(human_duration(330_000), "5 min 30 s");
        assert_eq!(human_duration((2 * 3600 + 3 * 60 + 59) * 1000), "2 h 3 min");
        assert_eq!(human_duration(7_200_000), "2 h");
        assert_eq!(human_duration((3 * 86_400 + 4 * 3600) * 1000), "3 d 4 h");
    }

    #[test]
    fn sizes_read_as_people_say_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1536), "1.5 KB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024 + 1), "3.0 GB");
    }

    #[test]
    fn arrow_types_get_their_sql_names() {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
        let tz = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        assert_eq!(sql_type_name(&DataType::Int64), "BIGINT");
        assert_eq!(sql_type_name(&DataType::Utf8View), "TEXT");
        assert_eq!(sql_type_name(&DataType::Float64), "DOUBLE");
        assert_eq!(sql_type_name(&ts), "TIMESTAMP");
        assert_eq!(sql_type_name(&tz), "TIMESTAMP WITH TIME ZONE");
        assert_eq!(sql_type_name(&DataType::Decimal128(10, 2)), "DECIMAL(10,2)");
        let list = DataType::List(Arc::new(Field::new("item", DataType::Int32, true)));
        assert_eq!(sql_type_name(&list), "INT[]");
        let st = DataType::Struct(Fields::from(vec![
            Field::new("a", DataType::Date32, true),
            Field::new("b", DataType::Boolean, true),
        ]));
        assert_eq!(sql_type_name(&st), "STRUCT(a DATE, b BOOLEAN)");
        let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        assert_eq!(sql_type_name(&dict), "TEXT");
    }
}
