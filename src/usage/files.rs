//! The usage files: one Parquet file per process and day, `compacted.parquet` per past day.
//!
//! ```text
//! <warehouse>/_system/usage/<YYYY-MM-DD>/<process>.parquet   what one process recorded that day
//! <warehouse>/_system/usage/<YYYY-MM-DD>/compacted.parquet   a past day's files merged, once
//! ```
//!
//! Each row sums the queries of one process that read one table in one way (the query's
//! *shape*) on one day. A compacted day's file names, in its Parquet metadata, the files it
//! replaces: readers skip those even before they are deleted, so a row is never counted twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use chrono::NaiveDate;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Int64Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Field, Int64Type, Schema, SchemaRef, TimestampMillisecondType,
};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::WriterProperties;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions};

use super::ColumnUse;
use crate::error::{IcePieError, Result};

/// Folder of the usage files, one folder per day under it.
pub(crate) const USAGE_PATH: &str = "_system/usage";

/// A past day's files merged into one.
const COMPACTED: &str = "compacted.parquet";

/// Parquet metadata key of a compacted file: the files it replaces, as a JSON list of names.
const SOURCES_KEY: &str = "icepie.usage.sources";

/// What one row sums: queries of one process that read one table in one shape on one day.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    /// Days since 1970-01-01 (UTC).
    pub day: i32,
    pub process: String,
    /// Qualified name: `core.orders`, `finance.revenue`.
    pub table: String,
    /// `core` or `slice`.
    pub kind: String,
    /// How the query read its tables ([`super::shape`]).
    pub shape: String,
}

/// The sums of one row.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Sums {
    /// The table's columns the shape uses, and how (stored as `filter_eq:region`).
    pub columns: Vec<ColumnUse>,
    pub queries: i64,
    pub rows_returned: i64,
    pub bytes_returned: i64,
    pub rows_scanned: i64,
    pub bytes_scanned: i64,
    pub files_scanned: i64,
    pub files_skipped: i64,
    pub latency_us_total: i64,
    pub latency_us_max: i64,
    /// Milliseconds since the epoch.
    pub first_at: i64,
    pub last_at: i64,
    /// The definition of a slice that would answer the shape's queries (the latest seen):
    /// recorded for queries of core tables only.
    pub example: Option<String>,
}

impl Sums {
    /// Adds `other`'s counts to these.
    pub(crate) fn add(&mut self, other: &Sums) {
        if self.queries == 0 {
            self.columns = other.columns.clone();
            self.first_at = other.first_at;
        }
        self.queries += other.queries;
        self.rows_returned += other.rows_returned;
        self.bytes_returned += other.bytes_returned;
        self.rows_scanned += other.rows_scanned;
        self.bytes_scanned += other.bytes_scanned;
        self.files_scanned += other.files_scanned;
        self.files_skipped += other.files_skipped;
        self.latency_us_total += other.latency_us_total;
        self.latency_us_max = self.latency_us_max.max(other.latency_us_max);
        self.first_at = self.first_at.min(other.first_at);
        self.last_at = self.last_at.max(other.last_at);
        if other.example.is_some() {
            self.example.clone_from(&other.example);
        }
    }
}

/// Rows keyed as they are summed.
pub(crate) type Rows = HashMap<Key, Sums>;

/// Schema of the usage files (and of what [`read`] returns).
pub(crate) static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let ts = super::ts();
    let int = |name| Field::new(name, DataType::Int64, false);
    Arc::new(Schema::new(vec![
        Field::new("day", DataType::Date32, false),
        Field::new("process", DataType::Utf8, false),
        Field::new("table", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("shape", DataType::Utf8, false),
        Field::new(
            "columns",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            false,
        ),
        int("queries"),
        int("rows_returned"),
        int("bytes_returned"),
        int("rows_scanned"),
        int("bytes_scanned"),
        int("files_scanned"),
        int("files_skipped"),
        int("latency_us_total"),
        int("latency_us_max"),
        Field::new("first_at", ts.clone(), false),
        Field::new("last_at", ts, false),
        Field::new("example", DataType::Utf8, true),
    ]))
});

/// Columns of the usage files written before [`Sums::example`] was recorded: the first ones
/// of [`SCHEMA`].
const COLUMNS_BEFORE_EXAMPLE: usize = 17;

/// `rows` as one batch of [`SCHEMA`], in key order.
pub(crate) fn batch(rows: &Rows) -> Result<RecordBatch> {
    let sorted: BTreeMap<&Key, &Sums> = rows.iter().collect();
    let text = |f: &dyn Fn(&Key) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(sorted.keys().map(|k| f(k))))
    };
    let int = |f: &dyn Fn(&Sums) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(sorted.values().map(|s| f(s))))
    };
    let ts = |f: &dyn Fn(&Sums) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMillisecondArray::from_iter_values(sorted.values().map(|s| f(s)))
                .with_timezone("UTC"),
        )
    };
    let mut columns = ListBuilder::new(StringBuilder::new());
    for sums in sorted.values() {
        for c in &sums.columns {
            columns.values().append_value(c.to_string());
        }
        columns.append(true);
    }
    let columns: ArrayRef = Arc::new(columns.finish());
    let arrays = vec![
        Arc::new(Date32Array::from_iter_values(sorted.keys().map(|k| k.day))) as ArrayRef,
        text(&|k| &k.process),
        text(&|k| &k.table),
        text(&|k| &k.kind),
        text(&|k| &k.shape),
        columns,
        int(&|s| s.queries),
        int(&|s| s.rows_returned),
        int(&|s| s.bytes_returned),
        int(&|s| s.rows_scanned),
        int(&|s| s.bytes_scanned),
        int(&|s| s.files_scanned),
        int(&|s| s.files_skipped),
        int(&|s| s.latency_us_total),
        int(&|s| s.latency_us_max),
        ts(&|s| s.first_at),
        ts(&|s| s.last_at),
        Arc::new(StringArray::from_iter(
            sorted.values().map(|s| s.example.as_deref()),
        )),
    ];
    Ok(RecordBatch::try_new(SCHEMA.clone(), arrays)?)
}

/// Adds the rows of `batch` (of [`SCHEMA`]) to `rows`.
pub(crate) fn add_batch(rows: &mut Rows, batch: &RecordBatch) -> Result<()> {
    let fields = batch.schema().fields().clone();
    let known =
        fields == *SCHEMA.fields() || fields[..] == SCHEMA.fields()[..COLUMNS_BEFORE_EXAMPLE];
    if !known {
        return Err(unreadable(
            "its columns are not those of this icepie's usage files",
        ));
    }
    let c = batch.columns();
    let text = |i: usize| c[i].as_string::<i32>();
    let int = |i: usize| c[i].as_primitive::<Int64Type>();
    let ts = |i: usize| c[i].as_primitive::<TimestampMillisecondType>();
    let days = c[0].as_primitive::<Date32Type>();
    let lists = c[5].as_list::<i32>();
    for r in 0..batch.num_rows() {
        let key = Key {
            day: days.value(r),
            process: text(1).value(r).to_string(),
            table: text(2).value(r).to_string(),
            kind: text(3).value(r).to_string(),
            shape: text(4).value(r).to_string(),
        };
        let list = lists.value(r);
        let list = list.as_string::<i32>();
        let columns = (0..list.len())
            .map(|i| {
                ColumnUse::parse(list.value(i)).ok_or_else(|| {
                    unreadable(&format!(
                        "`{}` is not a column use this icepie knows (`filter_eq:column`, ...)",
                        list.value(i)
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let sums = Sums {
            columns,
            queries: int(6).value(r),
            rows_returned: int(7).value(r),
            bytes_returned: int(8).value(r),
            rows_scanned: int(9).value(r),
            bytes_scanned: int(10).value(r),
            files_scanned: int(11).value(r),
            files_skipped: int(12).value(r),
            latency_us_total: int(13).value(r),
            latency_us_max: int(14).value(r),
            first_at: ts(15).value(r),
            last_at: ts(16).value(r),
            example: c
                .get(COLUMNS_BEFORE_EXAMPLE)
                .map(|a| a.as_string::<i32>())
                .filter(|a| a.is_valid(r))
                .map(|a| a.value(r).to_string()),
        };
        rows.entry(key).or_default().add(&sums);
    }
    Ok(())
}

fn unreadable(reason: &str) -> IcePieError {
    IcePieError::CorruptMetadata {
        what: "a usage file".into(),
        reason: reason.into(),
    }
}

/// The folder name of a day: `2026-11-26`.
pub(crate) fn day_name(day: i32) -> String {
    NaiveDate::from_num_days_from_ce_opt(day + EPOCH_CE)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| day.to_string())
}

/// The day a folder name stands for.
fn parse_day(name: &str) -> Option<i32> {
    use chrono::Datelike;
    let date = NaiveDate::parse_from_str(name, "%Y-%m-%d").ok()?;
    Some(date.num_days_from_ce() - EPOCH_CE)
}

/// Days from 0001-01-01 (chrono's day 1) to 1970-01-01.
const EPOCH_CE: i32 = 719_163;

/// The day (since the epoch, UTC) of a time in milliseconds since the epoch.
pub(crate) fn day_of(ms: i64) -> i32 {
    let day = ms.div_euclid(86_400_000);
    i32::try_from(day).unwrap_or(if day < 0 { i32::MIN } else { i32::MAX })
}

/// Parquet bytes of `rows`, naming `sources` in the metadata when it replaces them.
fn encode(rows: &Rows, sources: Option<&[String]>) -> Result<Bytes> {
    let mut props = WriterProperties::builder();
    if let Some(sources) = sources {
        let names = serde_json::to_string(sources).unwrap_or_default();
        props = props.set_key_value_metadata(Some(vec![KeyValue::new(SOURCES_KEY.into(), names)]));
    }
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buf, SCHEMA.clone(), Some(props.build()))?;
    writer.write(&batch(rows)?)?;
    writer.close()?;
    Ok(Bytes::from(buf))
}

/// Writes `rows`, everything `process` recorded on `day`, as that process's file of the day,
/// replacing the one it wrote before (a put replaces an object whole, and only this process
/// writes it): a day has one file per process that recorded on it, however often it flushed.
pub(crate) async fn write(
    store: &dyn ObjectStore,
    day: i32,
    process: &str,
    rows: &Rows,
) -> Result<()> {
    let path = Path::from(format!("{USAGE_PATH}/{}/{process}.parquet", day_name(day)));
    store.put(&path, encode(rows, None)?.into()).await?;
    Ok(())
}

/// The files of one day: its compacted file, if any, and the others.
#[derive(Debug, Default)]
struct DayFiles {
    compacted: Option<Path>,
    others: BTreeSet<Path>,
}

/// Every day folder under [`USAGE_PATH`], with its files (one listing).
async fn list_days(store: &dyn ObjectStore) -> Result<BTreeMap<i32, DayFiles>> {
    let mut days: BTreeMap<i32, DayFiles> = BTreeMap::new();
    let mut listing = store.list(Some(&Path::from(USAGE_PATH)));
    while let Some(meta) = listing.try_next().await? {
        let parts: Vec<_> = meta.location.parts().collect();
        let [.., day, file] = parts.as_slice() else {
            continue;
        };
        let Some(day) = parse_day(day.as_ref()) else {
            continue;
        };
        let files = days.entry(day).or_default();
        if file.as_ref() == COMPACTED {
            files.compacted = Some(meta.location);
        } else if file.as_ref().ends_with(".parquet") {
            files.others.insert(meta.location);
        }
    }
    Ok(days)
}

/// What one file holds.
enum FileRead {
    /// Its rows, and the files it replaces (a compacted file).
    Rows(Rows, Vec<String>),
    /// It is gone (compacted meanwhile).
    Gone,
    /// It cannot be read as a usage file (damaged, or another version's): skipped. Usage is
    /// evidence, not data: one bad file must not hide the rest.
    Unreadable,
}

async fn read_file(store: &dyn ObjectStore, path: &Path) -> Result<FileRead> {
    let bytes = match store.get(path).await {
        Ok(got) => got.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => return Ok(FileRead::Gone),
        Err(e) => return Err(e.into()),
    };
    let decode = || -> Result<(Rows, Vec<String>)> {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
        let sources = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|kv| kv.key == SOURCES_KEY))
            .and_then(|kv| kv.value.as_deref())
            .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
            .unwrap_or_default();
        let mut rows = Rows::new();
        for batch in builder.build()? {
            add_batch(&mut rows, &batch?)?;
        }
        Ok((rows, sources))
    };
    Ok(match decode() {
        Ok((rows, sources)) => FileRead::Rows(rows, sources),
        Err(_) => FileRead::Unreadable,
    })
}

/// Files read at once.
const PARALLEL: usize = 16;

/// Reads one day's rows: its compacted file and the files that one does not replace (at
/// most [`PARALLEL`] at a time). `None` when a file vanished while reading (the day was
/// being compacted): the caller lists again.
async fn read_day(store: &dyn ObjectStore, files: &DayFiles) -> Result<Option<Rows>> {
    let mut rows = Rows::new();
    let mut replaced = BTreeSet::new();
    if let Some(compacted) = &files.compacted {
        match read_file(store, compacted).await? {
            FileRead::Rows(r, sources) => {
                rows = r;
                replaced.extend(sources);
            }
            FileRead::Gone => return Ok(None),
            FileRead::Unreadable => {}
        }
    }
    let wanted: Vec<Path> = files
        .others
        .iter()
        .filter(|p| p.filename().is_none_or(|f| !replaced.contains(f)))
        .cloned()
        .collect();
    let mut reads = futures::stream::iter(wanted)
        .map(|p: Path| async move { read_file(store, &p).await })
        .buffer_unordered(PARALLEL);
    while let Some(read) = reads.next().await {
        match read? {
            FileRead::Rows(r, _) => {
                for (key, sums) in r {
                    rows.entry(key).or_default().add(&sums);
                }
            }
            FileRead::Gone => return Ok(None),
            FileRead::Unreadable => {}
        }
    }
    Ok(Some(rows))
}

/// Every row of the days from `since` (days since the epoch) on, summed by key.
pub(crate) async fn read(store: &dyn ObjectStore, since: i32) -> Result<Rows> {
    let mut rows = Rows::new();
    for (day, files) in list_days(store).await?.range(since..) {
        let sums = match read_day(store, files).await? {
            Some(sums) => sums,
            // Compacted while read: its compacted file now holds what was listed.
            None => match list_days(store).await?.get(day) {
                Some(files) => read_day(store, files).await?.unwrap_or_default(),
                None => Rows::new(),
            },
        };
        for (key, s) in sums {
            rows.entry(key).or_default().add(&s);
        }
    }
    Ok(rows)
}

/// Deletes the days before `since`, and compacts each day before `yesterday` (processes
/// may still write yesterday's files just after midnight) that has more than one file and
/// no compacted file yet. Whoever creates a day's compacted file first wins; the others
/// leave the day alone.
pub(crate) async fn tidy(store: &dyn ObjectStore, since: i32, yesterday: i32) -> Result<()> {
    for (day, files) in list_days(store).await? {
        let all = files.compacted.iter().chain(files.others.iter());
        if day < since {
            for path in all {
                delete(store, path).await?;
            }
            continue;
        }
        if day >= yesterday || files.compacted.is_some() || files.others.len() < 2 {
            continue;
        }
        let mut rows = Rows::new();
        let mut sources = Vec::new();
        for path in &files.others {
            // An unreadable file is left where it is, outside the compacted file.
            if let FileRead::Rows(r, _) = read_file(store, path).await? {
                for (key, sums) in r {
                    rows.entry(key).or_default().add(&sums);
                }
                sources.extend(path.filename().map(str::to_string));
            }
        }
        let target = Path::from(format!("{USAGE_PATH}/{}/{COMPACTED}", day_name(day)));
        let put = store
            .put_opts(
                &target,
                encode(&rows, Some(&sources))?.into(),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match put {
            Ok(_) => {
                for path in files
                    .others
                    .iter()
                    .filter(|p| p.filename().is_some_and(|f| sources.iter().any(|s| s == f)))
                {
                    delete(store, path).await?;
                }
            }
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn delete(store: &dyn ObjectStore, path: &Path) -> Result<()> {
    match store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn row(process: &str, table: &str, queries: i64) -> (Key, Sums) {
        let key = Key {
            day: 20_000,
            process: process.into(),
            table: table.into(),
            kind: "core".into(),
            shape: format!("{table}()"),
        };
        let sums = Sums {
            columns: ["group:g", "join:k"]
                .into_iter()
                .map(|u| ColumnUse::parse(u).unwrap())
                .collect(),
            queries,
            rows_scanned: queries * 10,
            latency_us_total: queries,
            latency_us_max: 1,
            first_at: 5,
            last_at: 7,
            ..Sums::default()
        };
        (key, sums)
    }

    #[test]
    fn rows_survive_a_round_trip_through_a_batch() {
        let rows: Rows = [row("p", "core.a", 2), row("q", "core.b", 3)].into();
        let mut back = Rows::new();
        add_batch(&mut back, &batch(&rows).unwrap()).unwrap();
        assert_eq!(back, rows);
        // An example survives too; a file written before examples were recorded still reads.
        let (key, mut sums) = row("p", "core.a", 2);
        sums.example = Some("SELECT 1".into());
        let rows: Rows = [(key, sums)].into();
        let full = batch(&rows).unwrap();
        let mut back = Rows::new();
        add_batch(&mut back, &full).unwrap();
        assert_eq!(back, rows);
        let old = full
            .project(&(0..COLUMNS_BEFORE_EXAMPLE).collect::<Vec<_>>())
            .unwrap();
        let mut back = Rows::new();
        add_batch(&mut back, &old).unwrap();
        assert_eq!(back.values().next().unwrap().example, None);
        assert_eq!(back.values().next().unwrap().queries, 2);
        assert_eq!(day_name(20_000), "2024-10-04");
        assert_eq!(parse_day("2024-10-04"), Some(20_000));
    }

    async fn write_one(store: &InMemory, day: i32, process: &str, queries: i64) {
        let (mut key, sums) = row(process, "core.a", queries);
        key.day = day;
        write(store, day, process, &[(key, sums)].into())
            .await
            .unwrap();
    }

    fn total(rows: &Rows) -> i64 {
        rows.values().map(|s| s.queries).sum()
    }

    #[tokio::test]
    async fn a_process_rewrites_its_own_file_of_the_day() {
        let store = InMemory::new();
        write_one(&store, 20_000, "p", 2).await;
        write_one(&store, 20_000, "p", 5).await;
        write_one(&store, 20_000, "q", 1).await;
        assert_eq!(total(&read(&store, 0).await.unwrap()), 6);
        assert_eq!(list_days(&store).await.unwrap()[&20_000].others.len(), 2);
    }

    #[tokio::test]
    async fn a_compacted_day_counts_each_row_once() {
        let store = InMemory::new();
        for (p, n) in [("p", 2), ("q", 3), ("r", 4)] {
            write_one(&store, 20_000, p, n).await;
        }
        let before = read(&store, 0).await.unwrap();
        assert_eq!(total(&before), 9);

        // A compaction that stopped before deleting what it replaced: still counted once.
        let days = list_days(&store).await.unwrap();
        let mut merged = Rows::new();
        let mut sources = Vec::new();
        for path in &days[&20_000].others {
            if let FileRead::Rows(r, _) = read_file(&store, path).await.unwrap() {
                merged.extend(r);
            }
            sources.extend(path.filename().map(str::to_string));
        }
        let target = Path::from(format!("{USAGE_PATH}/2024-10-04/{COMPACTED}"));
        store
            .put(&target, encode(&merged, Some(&sources)).unwrap().into())
            .await
            .unwrap();
        assert_eq!(read(&store, 0).await.unwrap(), before);

        // A process's first file of the day after it was compacted is read alongside.
        write_one(&store, 20_000, "s", 1).await;
        let after = read(&store, 0).await.unwrap();
        assert_eq!(total(&after), 10);

        // A file that is not a usage file is skipped, not fatal.
        let junk = Path::from(format!("{USAGE_PATH}/2024-10-04/junk.parquet"));
        store
            .put(&junk, Bytes::from_static(b"not parquet").into())
            .await
            .unwrap();
        assert_eq!(read(&store, 0).await.unwrap(), after);

        // Tidying leaves a compacted day alone, and deletes days before the window.
        tidy(&store, 0, 30_000).await.unwrap();
        assert_eq!(read(&store, 0).await.unwrap(), after);
        tidy(&store, 20_001, 30_000).await.unwrap();
        assert!(list_days(&store).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn tidying_compacts_days_before_yesterday_into_one_file() {
        let store = InMemory::new();
        for p in ["p", "q", "r"] {
            write_one(&store, 20_000, p, 1).await;
            // Yesterday's files may still be rewritten: left alone.
            write_one(&store, 20_001, p, 1).await;
        }
        let before = read(&store, 0).await.unwrap();
        tidy(&store, 0, 20_001).await.unwrap();
        let days = list_days(&store).await.unwrap();
        assert!(days[&20_000].compacted.is_some());
        assert!(days[&20_000].others.is_empty());
        assert_eq!(days[&20_001].others.len(), 3);
        assert!(days[&20_001].compacted.is_none());
        assert_eq!(read(&store, 0).await.unwrap(), before);
        // A second tidy (another process) finds the day compacted and changes nothing.
        tidy(&store, 0, 20_001).await.unwrap();
        assert_eq!(read(&store, 0).await.unwrap(), before);
    }

    #[test]
    fn far_times_saturate_instead_of_wrapping() {
        assert_eq!(day_of(i64::MAX), i32::MAX);
        assert_eq!(day_of(i64::MIN), i32::MIN);
        assert_eq!(day_of(-1), -1);
    }
}
