//! Printing results: `table` (aligned, fitted to the terminal), `markdown`, `csv` (with a
//! header row), `json` (an array of objects) and `ndjson`. Rows stream from the query: `csv`,
//! `json` and `ndjson` write batch by batch; `table` and `markdown` keep at most the rows they
//! show (all of them when there is no row limit) and count the rest.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use comfy_table::{Cell, ContentArrangement, Table};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::csv::WriterBuilder as CsvWriterBuilder;
use datafusion::arrow::json::{ArrayWriter, LineDelimitedWriter};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::dataframe::DataFrame;
use datafusion::error::{DataFusionError, Result};
use futures::TryStreamExt;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned table with borders.
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON array of objects.
    Json,
    /// One JSON object per line.
    Ndjson,
    /// A Markdown table.
    Markdown,
}

impl Format {
    /// Names accepted by `--format` and `\format`.
    pub const NAMES: [&'static str; 5] = ["table", "csv", "json", "ndjson", "markdown"];

    /// The format called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "table" => Self::Table,
            "csv" => Self::Csv,
            "json" => Self::Json,
            "ndjson" => Self::Ndjson,
            "markdown" => Self::Markdown,
            _ => return None,
        })
    }
}

/// How a result is shown.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// The format.
    pub format: Format,
    /// Rows shown at most by `table`/`markdown`; with a limit, a footer counts the rows.
    pub max_rows: Option<usize>,
    /// Width to fit tables into (a terminal's), if any.
    pub width: Option<u16>,
    /// Dim `NULL` with ANSI colour.
    pub color: bool,
    /// Print nothing for a result without rows (`table` and `markdown`).
    pub hide_empty: bool,
}

fn io(e: std::io::Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// Runs `df` and prints its rows to `out`, adding each row to `rows` as it arrives. Results
/// without columns (DDL) print nothing.
pub async fn print(
    df: DataFrame,
    layout: Layout,
    out: &mut dyn Write,
    rows: &AtomicU64,
) -> Result<()> {
    let schema = df.schema().inner().clone();
    let mut stream = df.execute_stream().await?;
    if schema.fields().is_empty() {
        while stream.try_next().await?.is_some() {}
        return Ok(());
    }
    let count = |b: &RecordBatch| rows.fetch_add(b.num_rows() as u64, Ordering::Relaxed);
    match layout.format {
        Format::Table | Format::Markdown => {
            let mut kept: Vec<RecordBatch> = Vec::new();
            let (mut shown, mut total) = (0usize, 0usize);
            while let Some(batch) = stream.try_next().await? {
                count(&batch);
                total += batch.num_rows();
                let room = layout
                    .max_rows
                    .map_or(batch.num_rows(), |m| m.saturating_sub(shown));
                if room > 0 {
                    let take = room.min(batch.num_rows());
                    kept.push(batch.slice(0, take));
                    shown += take;
                }
            }
            if total == 0 && layout.hide_empty {
                return Ok(());
            }
            let table = render(&schema, &kept, layout)?;
            writeln!(out, "{table}").map_err(io)?;
            if layout.max_rows.is_some() {
                let noun = if total == 1 { "row" } else { "rows" };
                if shown < total {
                    writeln!(
                        out,
                        "{} {noun} ({} shown)",
                        thousands(total),
                        thousands(shown)
                    )
                } else {
                    writeln!(out, "{} {noun}", thousands(total))
                }
                .map_err(io)?;
            }
        }
        Format::Csv => {
            let mut writer = CsvWriterBuilder::new().with_header(true).build(&mut *out);
            let mut wrote = false;
            while let Some(batch) = stream.try_next().await? {
                count(&batch);
                writer.write(&batch)?;
                wrote = true;
            }
            drop(writer);
            if !wrote {
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                writeln!(out, "{}", names.join(",")).map_err(io)?;
            }
        }
        Format::Json => {
            let mut writer = ArrayWriter::new(&mut *out);
            while let Some(batch) = stream.try_next().await? {
                count(&batch);
                writer.write(&batch)?;
            }
            writer.finish()?;
            drop(writer);
            writeln!(out).map_err(io)?;
        }
        Format::Ndjson => {
            let mut writer = LineDelimitedWriter::new(&mut *out);
            while let Some(batch) = stream.try_next().await? {
                count(&batch);
                writer.write(&batch)?;
            }
            writer.finish()?;
        }
    }
    out.flush().map_err(io)
}

/// 1204 → "1,204".
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn render(
    schema: &datafusion::arrow::datatypes::Schema,
    batches: &[RecordBatch],
    layout: Layout,
) -> Result<Table> {
    let mut table = Table::new();
    match layout.format {
        Format::Markdown => table.load_preset(comfy_table::presets::ASCII_MARKDOWN),
        // The same borders as Arrow's pretty printer and datafusion-cli.
        _ => table.load_preset("||--+-++|    ++++++"),
    };
    if let Some(width) = layout.width {
        table.set_width(width);
        table.set_content_arrangement(ContentArrangement::Dynamic);
    }
    table.set_header(schema.fields().iter().map(|f| Cell::new(f.name())));
    let null = if layout.color {
        "\x1b[2mNULL\x1b[0m"
    } else {
        "NULL"
    };
    let options = FormatOptions::default().with_null(null);
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            table.add_row(formatters.iter().map(|f| Cell::new(f.value(row))));
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1204), "1,204");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
