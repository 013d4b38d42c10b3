//! Printing results: `table` (aligned, like psql), `csv` (with a header row) and `json` (an
//! array of objects). CSV and JSON stream batch by batch; a table needs every row to size its
//! columns.

use std::io::Write;

use datafusion::arrow::csv::WriterBuilder as CsvWriterBuilder;
use datafusion::arrow::json::ArrayWriter;
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::dataframe::DataFrame;
use datafusion::error::{DataFusionError, Result};
use futures::TryStreamExt;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

impl Format {
    pub fn parse(s: &str) -> Self {
        match s {
            "csv" => Self::Csv,
            "json" => Self::Json,
            _ => Self::Table,
        }
    }
}

fn io(e: std::io::Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// Runs `df` and prints its rows to `out`. Results without columns (DDL) print nothing.
pub async fn print(df: DataFrame, format: Format, out: &mut impl Write) -> Result<()> {
    if df.schema().fields().is_empty() {
        df.collect().await?;
        return Ok(());
    }
    match format {
        Format::Table => {
            let schema = df.schema().inner().clone();
            let mut batches = df.collect().await?;
            if batches.is_empty() {
                batches.push(datafusion::arrow::array::RecordBatch::new_empty(schema));
            }
            writeln!(out, "{}", pretty_format_batches(&batches)?).map_err(io)?;
        }
        Format::Csv => {
            let mut stream = df.execute_stream().await?;
            let mut writer = CsvWriterBuilder::new().with_header(true).build(&mut *out);
            let mut wrote = false;
            while let Some(batch) = stream.try_next().await? {
                writer.write(&batch)?;
                wrote = true;
            }
            drop(writer);
            if !wrote {
                let schema = stream.schema();
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                writeln!(out, "{}", names.join(",")).map_err(io)?;
            }
        }
        Format::Json => {
            let mut stream = df.execute_stream().await?;
            let mut writer = ArrayWriter::new(&mut *out);
            while let Some(batch) = stream.try_next().await? {
                writer.write(&batch)?;
            }
            writer.finish()?;
            writeln!(out).map_err(io)?;
        }
    }
    out.flush().map_err(io)
}
