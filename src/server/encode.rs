//! Arrow to PostgreSQL: the type each Arrow type is sent as, and its values, batch by batch.
//!
//! Each column is first cast to one Arrow type per PostgreSQL type (all integers of a width
//! to one, every timestamp unit to microseconds, every string layout to `Utf8`), so a row is
//! encoded from a handful of array kinds. Types without a PostgreSQL counterpart here (lists,
//! structs, maps, intervals, durations, unsigned 64-bit integers) are sent as `text`, as Arrow
//! displays them. Decimals go as `numeric`, text or binary.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Float32Array, Float64Array,
    Int16Array, Int32Array, Int64Array, RecordBatch, StringArray, Time64MicrosecondArray,
    TimestampMicrosecondArray,
};
use datafusion::arrow::compute::{can_cast_types, cast_with_options, CastOptions};
use datafusion::arrow::datatypes::{DataType, Schema, TimeUnit};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use pgwire::api::portal::Format;
use pgwire::api::results::{DataRowEncoder, FieldInfo};
use pgwire::api::Type;
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::types::ToSqlText;
use postgres_types::{to_sql_checked, IsNull, ToSql};

/// The PostgreSQL type an Arrow type is sent as, and the Arrow type it is cast to first.
fn pg_type(dt: &DataType) -> (Type, DataType) {
    use DataType as D;
    match dt {
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
        D::Decimal32(..) | D::Decimal64(..) | D::Decimal128(..) | D::Decimal256(..) => {
            (Type::NUMERIC, D::Utf8)
        }
        D::Dictionary(_, value) => pg_type(value),
        _ => (Type::TEXT, D::Utf8),
    }
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
            let (ty, _) = pg_type(f.data_type());
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

/// One column of a batch, cast for encoding.
enum Column {
    Bool(BooleanArray),
    I16(Int16Array),
    I32(Int32Array),
    I64(Int64Array),
    F32(Float32Array),
    F64(Float64Array),
    Text(StringArray),
    /// Decimals, as their exact text.
    Numeric(StringArray),
    Bytes(BinaryArray),
    Date(Date32Array),
    Time(Time64MicrosecondArray),
    Timestamp(TimestampMicrosecondArray),
    TimestampTz(TimestampMicrosecondArray),
}

fn column(array: &ArrayRef, field: &FieldInfo) -> PgWireResult<Column> {
    let (ty, target) = pg_type(array.data_type());
    if &ty != field.datatype() {
        // The rows must be what the row description said, or binary values would lie.
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
    let options = CastOptions {
        safe: false,
        format_options: FormatOptions::default(),
    };
    let cast = if array.data_type() == &target {
        array.clone()
    } else if target == DataType::Utf8 && !can_cast_types(array.data_type(), &target) {
        // Structs, maps and the like: as Arrow displays them.
        displayed(array)?
    } else {
        cast_with_options(array, &target, &options).map_err(api_error)?
    };
    Ok(match ty {
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
        _ => Column::Text(cast.as_string::<i32>().clone()),
    })
}

/// Each value of `array` as Arrow displays it (NULL kept).
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
    fn encode(&self, row: usize, encoder: &mut DataRowEncoder) -> PgWireResult<()> {
        macro_rules! put {
            ($array:expr, $value:expr) => {{
                let value = (!$array.is_null(row)).then(|| $value);
                encoder.encode_field(&value)
            }};
        }
        match self {
            Column::Bool(a) => put!(a, a.value(row)),
            Column::I16(a) => put!(a, a.value(row)),
            Column::I32(a) => put!(a, a.value(row)),
            Column::I64(a) => put!(a, a.value(row)),
            Column::F32(a) => put!(a, a.value(row)),
            Column::F64(a) => put!(a, a.value(row)),
            Column::Text(a) => put!(a, a.value(row)),
            Column::Numeric(a) => put!(a, Numeric(a.value(row))),
            Column::Bytes(a) => put!(a, a.value(row)),
            Column::Date(a) => {
                let value = match a.is_null(row) {
                    true => None,
                    false => Some(
                        a.value(row)
                            .checked_add(719_163)
                            .and_then(NaiveDate::from_num_days_from_ce_opt)
                            .ok_or_else(|| out_of_range("date"))?,
                    ),
                };
                encoder.encode_field(&value)
            }
            Column::Time(a) => {
                let value = match a.is_null(row) {
                    true => None,
                    false => {
                        let us = a.value(row);
                        Some(
                            NaiveTime::from_num_seconds_from_midnight_opt(
                                u32::try_from(us.div_euclid(1_000_000))
                                    .map_err(|_| out_of_range("time"))?,
                                u32::try_from(us.rem_euclid(1_000_000) * 1000)
                                    .map_err(|_| out_of_range("time"))?,
                            )
                            .ok_or_else(|| out_of_range("time"))?,
                        )
                    }
                };
                encoder.encode_field(&value)
            }
            Column::Timestamp(a) => {
                let value: Option<NaiveDateTime> = match a.is_null(row) {
                    true => None,
                    false => Some(
                        DateTime::<Utc>::from_timestamp_micros(a.value(row))
                            .ok_or_else(|| out_of_range("timestamp"))?
                            .naive_utc(),
                    ),
                };
                encoder.encode_field(&value)
            }
            Column::TimestampTz(a) => {
                let value: Option<DateTime<Utc>> = match a.is_null(row) {
                    true => None,
                    false => Some(
                        DateTime::<Utc>::from_timestamp_micros(a.value(row))
                            .ok_or_else(|| out_of_range("timestamp"))?,
                    ),
                };
                encoder.encode_field(&value)
            }
        }
    }
}

/// A decimal's exact text (`-12.3400`), sent as PostgreSQL's `numeric`: as is in text
/// format, as base-10000 digits in binary.
#[derive(Debug)]
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
                (Type::TEXT, FieldFormat::Binary),
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
