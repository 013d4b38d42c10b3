//! Runs every `sql/*.slt` file against a fresh warehouse, as DataFusion tests its SQL.
//!
//! `cargo test --test sqllogictests [-- FILTER]` runs the files whose name contains FILTER.

use std::path::{Path, PathBuf};

use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use futures::TryStreamExt;
use icepie::{IcePie, IcePieError};
use sqllogictest::{DBOutput, DefaultColumnType};

struct IcePieDb {
    warehouse: IcePie,
}

fn column_type(dt: &DataType) -> DefaultColumnType {
    if dt.is_integer() {
        DefaultColumnType::Integer
    } else if dt.is_floating() || matches!(dt, DataType::Decimal128(..) | DataType::Decimal256(..))
    {
        DefaultColumnType::FloatingPoint
    } else if matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    ) {
        DefaultColumnType::Text
    } else {
        DefaultColumnType::Any
    }
}

fn rows(batch: &RecordBatch, out: &mut Vec<Vec<String>>) -> Result<(), IcePieError> {
    let options = FormatOptions::default().with_null("NULL");
    let formatters = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
        .collect::<Result<Vec<_>, _>>()?;
    for row in 0..batch.num_rows() {
        out.push(
            formatters
                .iter()
                .zip(batch.columns())
                .map(|(f, c)| {
                    let v = f.value(row).to_string();
                    if v.is_empty() && !c.is_null(row) {
                        "(empty)".to_string()
                    } else {
                        v
                    }
                })
                .collect(),
        );
    }
    Ok(())
}

#[async_trait::async_trait]
impl sqllogictest::AsyncDB for IcePieDb {
    type Error = IcePieError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        let df = self.warehouse.sql(sql).await?;
        let schema = df.schema().inner().clone();
        let mut stream = df.execute_stream().await?;
        let mut out = Vec::new();
        while let Some(batch) = stream.try_next().await? {
            rows(&batch, &mut out)?;
        }
        if schema.fields().is_empty() {
            return Ok(DBOutput::StatementComplete(0));
        }
        Ok(DBOutput::Rows {
            types: schema
                .fields()
                .iter()
                .map(|f| column_type(f.data_type()))
                .collect(),
            rows: out,
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "icepie"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn slt_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("sql/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    files
}

#[tokio::main]
async fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(root).expect("cd to the crate root");
    let (mut passed, mut failed) = (0, 0);
    for file in slt_files(&root.join("sql")) {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let location = dir.path().to_string_lossy().to_string();
        let mut runner = sqllogictest::Runner::new(move || {
            let location = location.clone();
            async move {
                Ok(IcePieDb {
                    // Statements alone decide what happens: no scheduled refresh interferes.
                    warehouse: IcePie::builder(location)
                        .with_scheduler(false)
                        .open()
                        .await?,
                })
            }
        });
        match runner.run_file_async(&file).await {
            Ok(()) => {
                passed += 1;
                println!("ok    {name}");
            }
            Err(e) => {
                failed += 1;
                println!("FAIL  {name}\n{e}\n");
            }
        }
    }
    println!("sqllogictest: {passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        std::process::exit(1);
    }
}
