//! Arrow to PostgreSQL: the type each Arrow type is sent as, and its values, batch by batch.
//!
//! Each column is first cast to one Arrow type per PostgreSQL type (all integers of a width
//! to one, every timestamp unit to microseconds, every string layout to `Utf8`), so a row is
//! encoded from a handful of array kinds. The mapping is arrow-pg's (datafusion-postgres's
//! encoder): decimals and unsigned 64-bit integers go as `numeric`, intervals and durations as
//! `interval`, lists of those types as PostgreSQL arrays. Types without a PostgreSQL
//! counterpart here (structs, maps, lists of lists) are sent as `text`, as Arrow displays
//! them. The README's "PostgreSQL server" says why this is not arrow-pg itself: arrow-pg is
//! built on an older pgwire than the one icepie's SCRAM login needs.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Float32Array, Float64Array,
    Int16Array, Int32Array, Int64Array, ListArray, RecordBatch, StringArray,
    Time64MicrosecondArray, TimestampMicrosecondArray,
};
use datafusion::arrow::compute::{can_cast_types, cast_with_options, CastOptions};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use pg_interval::Interval;
use pgwire::api::portal::Format;
use pgwire::api::results::{DataRowEncoder, FieldInfo};
use pgwire::api::Type;
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::types::ToSqlText;
use postgres_types::{to_sql_checked, IsNull, ToSql};

/// The PostgreSQL type an Arrow type is sent as, and the Arrow type it is cast to first;
/// `None` for a type sent as its text.
fn direct(dt: &DataType) -> Option<(Type, DataType)> {
    use DataType as D;
    Some(match dt {
        D::Null => (Type::TEXT, D::Utf8),
        D::Boolean => (Type::BOOL, D::Boolean),
        D::Int8 | D::Int16 | D::UInt8 => (Type::INT2, D::Int16),
        D::Int32 | D::UInt16 => (Type::INT4, D::Int32),
        D::Int64 | D::UInt32 => (Type::INT8, D::Int64),
        D::Float16 | D::Float32 => (Type::FLOAT4, D::Float32),
        D::Float64 => (Type::FLOAT8, D::Float64),
        D::Utf8 | D::LargeUtf8 | D::Utf8View => (Type::TEXT, D::Utf8),
        D::Binary | D::LargeBinary | D::BinaryView | D::FixedSizeBinary(_) => {
            (Type::BYTEA, D::Binary)
        }
        D::Date32 | D::Date64 => (Type::DATE, D::Date32),
        D::Time32(_) | D::Time64(_) => (Type::TIME, D::Time64(TimeUnit::Microsecond)),
        D::Timestamp(_, None) => (Type::TIMESTAMP, D::Timestamp(TimeUnit::Microsecond, None)),
        D::Timestamp(_, Some(_)) => (
            Type::TIMESTAMPTZ,
            D::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
        ),
        // Sent as their exact decimal text: PostgreSQL's numeric.
        D::UInt64 | D::Decimal32(..) | D::Decimal64(..) | D::Decimal128(..) | D::Decimal256(..) => {
            (Type::NUMERIC, D::Utf8)
        }
        // Read as they are (three interval layouts, four duration units).
        D::Interval(_) | D::Duration(_) => (Type::INTERVAL, dt.clone()),
        D::Dictionary(_, value) => return direct(value),
        // Lists of the types above are PostgreSQL arrays; lists of lists, of structs, ...
        // are sent as their text.
        D::List(item) | D::LargeList(item) | D::FixedSizeList(item, _) => {
            let (element, target) = direct(item.data_type())?;
            let array = ARRAYS.iter().find(|(e, _)| *e == element)?.1.clone();
            (
                array,
                D::List(Arc::new(Field::new_list_field(target, true))),
            )
        }
        _ => return None,
    })
}

/// The PostgreSQL array type of each element type [`direct`] gives.
static ARRAYS: [(Type, Type); 14] = [
    (Type::BOOL, Type::BOOL_ARRAY),
    (Type::INT2, Type::INT2_ARRAY),
    (Type::INT4, Type::INT4_ARRAY),
    (Type::INT8, Type::INT8_ARRAY),
    (Type::FLOAT4, Type::FLOAT4_ARRAY),
    (Type::FLOAT8, Type::FLOAT8_ARRAY),
    (Type::TEXT, Type::TEXT_ARRAY),
    (Type::BYTEA, Type::BYTEA_ARRAY),
    (Type::DATE, Type::DATE_ARRAY),
    (Type::TIME, Type::TIME_ARRAY),
    (Type::TIMESTAMP, Type::TIMESTAMP_ARRAY),
    (Type::TIMESTAMPTZ, Type::TIMESTAMPTZ_ARRAY),
    (Type::NUMERIC, Type::NUMERIC_ARRAY),
    (Type::INTERVAL, Type::INTERVAL_ARRAY),
];

/// The PostgreSQL type an Arrow type is sent as, and the Arrow type it is cast to first.
fn pg_type(dt: &DataType) -> (Type, DataType) {
    direct(dt).unwrap_or((Type::TEXT, DataType::Utf8))
}

/// The PostgreSQL type values of Arrow type `dt` are sent as.
pub(super) fn pg_type_of(dt: &DataType) -> Type {
    pg_type(dt).0
}

/// The row description of `schema`, each column in the format the client asked for (a
/// format code per column, one for all, or none for text).
pub(super) fn fields(schema: &Schema, format: &Format) -> PgWireResult<Vec<FieldInfo>> {
    let n = schema.fields().len();
    if let Format::Individual(codes) = format {
        if codes.len() != n {
            return Err(protocol_error(format!(
                "{} result format codes for {n} columns",
                codes.len()
            )));
        }
    }
    Ok(schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let ty = pg_type_of(f.data_type());
            FieldInfo::new(f.name().clone(), None, None, ty, format.format_for(i))
        })
        .collect())
}

/// A message that breaks the protocol (SQLSTATE 08P01).
pub(super) fn protocol_error(message: String) -> PgWireError {
    PgWireError::UserError(Box::new(pgwire::error::ErrorInfo::new(
        "ERROR".into(),
        "08P01".into(),
        message,
    )))
}

/// One column of a batch, cast for encoding: one array kind per PostgreSQL type.
enum Column {
    Bool(BooleanArray),
    I16(Int16Array),
    I32(Int32Array),
    I64(Int64Array),
    F32(Float32Array),
    F64(Float64Array),
    Text(StringArray),
    Numeric(StringArray),
    Bytes(BinaryArray),
    Date(Date32Array),
    Time(Time64MicrosecondArray),
    Timestamp(TimestampMicrosecondArray),
    TimestampTz(TimestampMicrosecondArray),
    /// Any interval or duration array.
    Interval(ArrayRef),
    /// A PostgreSQL array per row: the list's offsets, and its values as a column.
    List(ListArray, Box<Column>),
}

fn column(array: &ArrayRef, field: &FieldInfo) -> PgWireResult<Column> {
    let (ty, target) = pg_type(array.data_type());
    if &ty != field.datatype() {
        return Err(PgWireError::ApiError(
            format!(
                "column {} holds {} values where {} was described",
                field.name(),
                ty,
                field.datatype()
            )
            .into(),
        ));
    }
    cast_column(array, &ty, &target)
}

/// `array` cast to `target` (from [`pg_type`]), as the column kind of PostgreSQL type `ty`.
fn cast_column(array: &ArrayRef, ty: &Type, target: &DataType) -> PgWireResult<Column> {
    let options = CastOptions {
        safe: false,
        format_options: FormatOptions::default(),
    };
    let cast = if array.data_type() == target {
        array.clone()
    } else if target == &DataType::Utf8 && !can_cast_types(array.data_type(), target) {
        displayed(array)?
    } else {
        cast_with_options(array, target, &options).map_err(api_error)?
    };
    if let DataType::List(item) = target {
        let list = cast.as_list::<i32>().clone();
        let (element, _) = pg_type(item.data_type());
        let values = cast_column(list.values(), &element, item.data_type())?;
        return Ok(Column::List(list, Box::new(values)));
    }
    Ok(match *ty {
        Type::BOOL => Column::Bool(cast.as_boolean().clone()),
        Type::INT2 => Column::I16(cast.as_primitive().clone()),
        Type::INT4 => Column::I32(cast.as_primitive().clone()),
        Type::INT8 => Column::I64(cast.as_primitive().clone()),
        Type::FLOAT4 => Column::F32(cast.as_primitive().clone()),
        Type::FLOAT8 => Column::F64(cast.as_primitive().clone()),
        Type::BYTEA => Column::Bytes(cast.as_binary::<i32>().clone()),
        Type::DATE => Column::Date(cast.as_primitive().clone()),
        Type::TIME => Column::Time(cast.as_primitive().clone()),
        Type::TIMESTAMP => Column::Timestamp(cast.as_primitive().clone()),
        Type::TIMESTAMPTZ => Column::TimestampTz(cast.as_primitive().clone()),
        Type::NUMERIC => Column::Numeric(cast.as_string::<i32>().clone()),
        Type::INTERVAL => Column::Interval(cast),
        _ => Column::Text(cast.as_string::<i32>().clone()),
    })
}

fn displayed(array: &ArrayRef) -> PgWireResult<ArrayRef> {
    let formatter =
        ArrayFormatter::try_new(array.as_ref(), &FormatOptions::default()).map_err(api_error)?;
    let values: StringArray = (0..array.len())
        .map(|i| (!array.is_null(i)).then(|| formatter.value(i).to_string()))
        .collect();
    Ok(Arc::new(values))
}

fn api_error(e: impl std::error::Error + Send + Sync + 'static) -> PgWireError {
    PgWireError::ApiError(Box::new(e))
}

/// A value Arrow holds that chrono cannot (a date or time out of its range).
fn out_of_range(what: &str) -> PgWireError {
    PgWireError::ApiError(format!("a {what} value is out of PostgreSQL's range").into())
}

impl Column {
    /// Encodes row `row` of the column.
    fn encode(&self, row: usize, encoder: &mut DataRowEncoder) -> PgWireResult<()> {
        match self {
            Column::List(list, values) if !list.is_null(row) => {
                let offsets = list.value_offsets();
                let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
                let elements = (start..end)
                    .map(|i| values.value(i))
                    .collect::<PgWireResult<Vec<_>>>()?;
                encoder.encode_field(&elements)
            }
            Column::List(..) => encoder.encode_field(&None::<Value>),
            scalar => encoder.encode_field(&scalar.value(row)?),
        }
    }

    /// The value at `i` of a column that is not a list.
    fn value(&self, i: usize) -> PgWireResult<Option<Value<'_>>> {
        let array: &dyn Array = match self {
            Column::Bool(a) => a,
            Column::I16(a) => a,
            Column::I32(a) => a,
            Column::I64(a) => a,
            Column::F32(a) => a,
            Column::F64(a) => a,
            Column::Text(a) | Column::Numeric(a) => a,
            Column::Bytes(a) => a,
            Column::Date(a) => a,
            Column::Time(a) => a,
            Column::Timestamp(a) | Column::TimestampTz(a) => a,
            Column::Interval(a) => a,
            Column::List(a, _) => a,
        };
        if array.is_null(i) {
            return Ok(None);
        }
        let timestamp = |us: i64| {
            DateTime::<Utc>::from_timestamp_micros(us).ok_or_else(|| out_of_range("timestamp"))
        };
        Ok(Some(match self {
            Column::Bool(a) => Value::Bool(a.value(i)),
            Column::I16(a) => Value::I16(a.value(i)),
            Column::I32(a) => Value::I32(a.value(i)),
            Column::I64(a) => Value::I64(a.value(i)),
            Column::F32(a) => Value::F32(a.value(i)),
            Column::F64(a) => Value::F64(a.value(i)),
            Column::Text(a) => Value::Text(a.value(i)),
            Column::Numeric(a) => Value::Numeric(Numeric(a.value(i))),
            Column::Bytes(a) => Value::Bytes(a.value(i)),
            Column::Date(a) => Value::Date(
                a.value(i)
                    .checked_add(719_163)
                    .and_then(NaiveDate::from_num_days_from_ce_opt)
                    .ok_or_else(|| out_of_range("date"))?,
            ),
            Column::Time(a) => {
                let us = a.value(i);
                Value::Time(
                    NaiveTime::from_num_seconds_from_midnight_opt(
                        u32::try_from(us.div_euclid(1_000_000))
                            .map_err(|_| out_of_range("time"))?,
                        u32::try_from(us.rem_euclid(1_000_000) * 1000)
                            .map_err(|_| out_of_range("time"))?,
                    )
                    .ok_or_else(|| out_of_range("time"))?,
                )
            }
            Column::Timestamp(a) => Value::Timestamp(timestamp(a.value(i))?.naive_utc()),
            Column::TimestampTz(a) => Value::TimestampTz(timestamp(a.value(i))?),
            Column::Interval(a) => Value::Interval(interval(a, i)?),
            Column::List(..) => {
                return Err(PgWireError::ApiError(
                    "a list inside a list is sent as text, not as an array".into(),
                ))
            }
        }))
    }
}

/// The interval at `i` of an interval or duration array. PostgreSQL keeps microseconds:
/// finer parts are dropped.
fn interval(array: &ArrayRef, i: usize) -> PgWireResult<Interval> {
    use datafusion::arrow::datatypes::{
        DurationMicrosecondType as Us, DurationMillisecondType as Ms, DurationNanosecondType as Ns,
        DurationSecondType as S, IntervalDayTimeType, IntervalMonthDayNanoType, IntervalUnit,
        IntervalYearMonthType,
    };
    let micros = |n: Option<i64>| n.ok_or_else(|| out_of_range("interval"));
    Ok(match array.data_type() {
        DataType::Interval(IntervalUnit::YearMonth) => {
            Interval::new(array.as_primitive::<IntervalYearMonthType>().value(i), 0, 0)
        }
        DataType::Interval(IntervalUnit::DayTime) => {
            let v = array.as_primitive::<IntervalDayTimeType>().value(i);
            Interval::new(0, v.days, i64::from(v.milliseconds) * 1000)
        }
        DataType::Interval(IntervalUnit::MonthDayNano) => {
            let v = array.as_primitive::<IntervalMonthDayNanoType>().value(i);
            Interval::new(v.months, v.days, v.nanoseconds / 1000)
        }
        DataType::Duration(TimeUnit::Second) => Interval::new(
            0,
            0,
            micros(array.as_primitive::<S>().value(i).checked_mul(1_000_000))?,
        ),
        DataType::Duration(TimeUnit::Millisecond) => Interval::new(
            0,
            0,
            micros(array.as_primitive::<Ms>().value(i).checked_mul(1000))?,
        ),
        DataType::Duration(TimeUnit::Microsecond) => {
            Interval::new(0, 0, array.as_primitive::<Us>().value(i))
        }
        DataType::Duration(TimeUnit::Nanosecond) => {
            Interval::new(0, 0, array.as_primitive::<Ns>().value(i) / 1000)
        }
        other => {
            return Err(PgWireError::ApiError(
                format!("{other} is not an interval").into(),
            ))
        }
    })
}

/// One value of a row, as its PostgreSQL type encodes it.
#[derive(Debug)]
enum Value<'a> {
    Bool(bool),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Text(&'a str),
    Numeric(Numeric<'a>),
    Bytes(&'a [u8]),
    Date(NaiveDate),
    Time(NaiveTime),
    Timestamp(NaiveDateTime),
    TimestampTz(DateTime<Utc>),
    Interval(Interval),
}

/// Calls `$call` on the value inside a [`Value`].
macro_rules! inside {
    ($value:expr, $v:ident => $call:expr) => {
        match $value {
            Value::Bool($v) => $call,
            Value::I16($v) => $call,
            Value::I32($v) => $call,
            Value::I64($v) => $call,
            Value::F32($v) => $call,
            Value::F64($v) => $call,
            Value::Text($v) => $call,
            Value::Numeric($v) => $call,
            Value::Bytes($v) => $call,
            Value::Date($v) => $call,
            Value::Time($v) => $call,
            Value::Timestamp($v) => $call,
            Value::TimestampTz($v) => $call,
            Value::Interval($v) => $call,
        }
    };
}

impl ToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        inside!(self, v => ToSql::to_sql(v, ty, out))
    }

    /// The type is the one [`pg_type`] chose for the column.
    fn accepts(_ty: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl ToSqlText for Value<'_> {
    fn to_sql_text(
        &self,
        ty: &Type,
        out: &mut BytesMut,
        options: &pgwire::types::format::FormatOptions,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        inside!(self, v => ToSqlText::to_sql_text(v, ty, out, options))
    }
}

/// A decimal's exact text (`-12.3400`), sent as PostgreSQL's `numeric`: as is in text
/// format, as base-10000 digits in binary.
#[derive(Debug, Clone, Copy)]
struct Numeric<'a>(&'a str);

impl ToSql for Numeric<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let (negative, digits) = match self.0.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, self.0),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return Err(format!("'{}' is not a decimal", self.0).into());
        }
        let int = int.trim_start_matches('0');
        let dscale = i16::try_from(frac.len())?;
        // Base-10000 groups: the integer part's from the point leftwards, the fraction's
        // rightwards.
        let pad_left = (4 - int.len() % 4) % 4;
        let pad_right = (4 - frac.len() % 4) % 4;
        let text: String = "0".repeat(pad_left) + int + frac + &"0".repeat(pad_right);
        let mut groups: Vec<i16> = text
            .as_bytes()
            .chunks(4)
            .map(|c| c.iter().fold(0i16, |n, d| n * 10 + i16::from(d - b'0')))
            .collect();
        let mut weight = i16::try_from((pad_left + int.len()) / 4)? - 1;
        while groups.first() == Some(&0) {
            groups.remove(0);
            weight -= 1;
        }
        while groups.last() == Some(&0) {
            groups.pop();
        }
        if groups.is_empty() {
            weight = 0;
        }
        out.put_i16(i16::try_from(groups.len())?);
        out.put_i16(weight);
        out.put_u16(if negative && !groups.is_empty() {
            0x4000
        } else {
            0
        });
        out.put_i16(dscale);
        for g in groups {
            out.put_i16(g);
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}

impl ToSqlText for Numeric<'_> {
    fn to_sql_text(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
        _options: &pgwire::types::format::FormatOptions,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
}

/// The rows of `batch`, encoded for `fields` (from [`fields`] of the batch's schema).
pub(super) fn rows(
    batch: &RecordBatch,
    fields: &Arc<Vec<FieldInfo>>,
) -> PgWireResult<Vec<DataRow>> {
    let columns = batch
        .columns()
        .iter()
        .zip(fields.iter())
        .map(|(array, field)| column(array, field))
        .collect::<PgWireResult<Vec<_>>>()?;
    let mut encoder = DataRowEncoder::new(fields.clone());
    let mut out = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        for c in &columns {
            c.encode(row, &mut encoder)?;
        }
        out.push(encoder.take_row());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::Field;
    use pgwire::api::results::FieldFormat;

    #[test]
    fn arrow_types_map_to_postgres_types() {
        let schema = Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Utf8View, true),
            Field::new("c", DataType::Decimal128(12, 2), true),
            Field::new("d", DataType::Timestamp(TimeUnit::Nanosecond, None), true),
            Field::new(
                "e",
                DataType::Timestamp(TimeUnit::Second, Some("UTC".into())),
                true,
            ),
            Field::new("f", DataType::UInt8, true),
            Field::new(
                "g",
                DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
                true,
            ),
        ]);
        let got: Vec<(Type, FieldFormat)> = fields(&schema, &Format::UnifiedBinary)
            .unwrap()
            .iter()
            .map(|f| (f.datatype().clone(), f.format()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Type::INT8, FieldFormat::Binary),
                (Type::TEXT, FieldFormat::Binary),
                (Type::NUMERIC, FieldFormat::Binary),
                (Type::TIMESTAMP, FieldFormat::Binary),
                (Type::TIMESTAMPTZ, FieldFormat::Binary),
                (Type::INT2, FieldFormat::Binary),
                (Type::INT4_ARRAY, FieldFormat::Binary),
            ]
        );
        assert!(fields(&schema, &Format::Individual(vec![0, 1])).is_err());
    }

    /// The binary numeric of a decimal's text: ndigits, weight, sign, dscale, digits.
    fn numeric(text: &str) -> Vec<i16> {
        let mut out = BytesMut::new();
        Numeric(text).to_sql(&Type::NUMERIC, &mut out).unwrap();
        out.chunks(2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn decimals_encode_as_binary_numeric() {
        // 12345.678 = 1 2345 . 6780 (weight 1), dscale 3.
        assert_eq!(numeric("12345.678"), vec![3, 1, 0, 3, 1, 2345, 6780]);
        assert_eq!(numeric("-0.0001"), vec![1, -1, 0x4000, 4, 1]);
        assert_eq!(numeric("0.00"), vec![0, 0, 0, 2]);
        assert_eq!(numeric("10000"), vec![1, 1, 0, 0, 1]);
        assert_eq!(numeric("7"), vec![1, 0, 0, 0, 7]);
    }
}
