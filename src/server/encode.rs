//! Arrow to PostgreSQL: the type each Arrow type is sent as, and its values, batch by batch.
//!
//! Each column is first cast to one Arrow type per PostgreSQL type (all integers of a width
//! to one, every timestamp unit to microseconds, every string layout to `Utf8`), so a row is
//! encoded from a handful of array kinds. Types without a PostgreSQL counterpart here (lists,
//! structs, maps, intervals, durations, unsigned 64-bit integers) are sent as `text`, as Arrow
//! displays them.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Float32Array, Float64Array,
    Int16Array, Int32Array, Int64Array, RecordBatch, StringArray, Time64MicrosecondArray,
    TimestampMicrosecondArray,
};
use datafusion::arrow::compute::{cast_with_options, CastOptions};
use datafusion::arrow::datatypes::{DataType, Schema, TimeUnit};
use datafusion::arrow::util::display::FormatOptions;
use pgwire::api::portal::Format;
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo};
use pgwire::api::Type;
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;

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
pub fn pg_type_of(dt: &DataType) -> Type {
    pg_type(dt).0
}

/// The row description of `schema`, each column in the format the client asked for.
/// `numeric` goes as text whatever the client asked: its binary form is not written here.
pub fn fields(schema: &Schema, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let (ty, _) = pg_type(f.data_type());
            let format = match ty {
                Type::NUMERIC => FieldFormat::Text,
                _ => format.format_for(i),
            };
            FieldInfo::new(f.name().clone(), None, None, ty, format)
        })
        .collect()
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
    Bytes(BinaryArray),
    Date(Date32Array),
    Time(Time64MicrosecondArray),
    Timestamp(TimestampMicrosecondArray),
    TimestampTz(TimestampMicrosecondArray),
}

fn column(array: &ArrayRef) -> PgWireResult<Column> {
    let (ty, target) = pg_type(array.data_type());
    let options = CastOptions {
        safe: false,
        format_options: FormatOptions::default(),
    };
    let cast = if array.data_type() == &target {
        array.clone()
    } else {
        cast_with_options(array, &target, &options).map_err(api_error)?
    };
    Ok(match (ty, target) {
        (Type::BOOL, _) => Column::Bool(cast.as_boolean().clone()),
        (Type::INT2, _) => Column::I16(cast.as_primitive().clone()),
        (Type::INT4, _) => Column::I32(cast.as_primitive().clone()),
        (Type::INT8, _) => Column::I64(cast.as_primitive().clone()),
        (Type::FLOAT4, _) => Column::F32(cast.as_primitive().clone()),
        (Type::FLOAT8, _) => Column::F64(cast.as_primitive().clone()),
        (Type::BYTEA, _) => Column::Bytes(cast.as_binary::<i32>().clone()),
        (Type::DATE, _) => Column::Date(cast.as_primitive().clone()),
        (Type::TIME, _) => Column::Time(cast.as_primitive().clone()),
        (Type::TIMESTAMP, _) => Column::Timestamp(cast.as_primitive().clone()),
        (Type::TIMESTAMPTZ, _) => Column::TimestampTz(cast.as_primitive().clone()),
        _ => Column::Text(cast.as_string::<i32>().clone()),
    })
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
            Column::Bytes(a) => put!(a, a.value(row)),
            Column::Date(a) => {
                let value = match a.is_null(row) {
                    true => None,
                    false => Some(
                        NaiveDate::from_num_days_from_ce_opt(a.value(row) + 719_163)
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

/// The rows of `batch`, encoded for `fields` (from [`fields`] of the batch's schema).
pub fn rows(batch: &RecordBatch, fields: &Arc<Vec<FieldInfo>>) -> PgWireResult<Vec<DataRow>> {
    let columns = batch
        .columns()
        .iter()
        .map(column)
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
            .iter()
            .map(|f| (f.datatype().clone(), f.format()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Type::INT8, FieldFormat::Binary),
                (Type::TEXT, FieldFormat::Binary),
                (Type::NUMERIC, FieldFormat::Text),
                (Type::TIMESTAMP, FieldFormat::Binary),
                (Type::TIMESTAMPTZ, FieldFormat::Binary),
                (Type::INT2, FieldFormat::Binary),
                (Type::TEXT, FieldFormat::Binary),
            ]
        );
    }
}
