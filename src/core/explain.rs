//! What a failed load tripped on, said so a person can fix it: the file, line, column, its
//! type and the value, and that nothing was loaded.
//!
//! Data errors reach icepie as text from Arrow and Delta Lake ([`IcePieError::BadData`] says
//! them plainly but cannot know the file or column). For text files, the files are read again
//! one at a time, from their start, until one fails: that names the file and gives the line
//! counted from the top of the file. This costs a second read, on the failure path only.

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_plan::execute_stream;
use futures::TryStreamExt;

use super::*;
use crate::error::{between, csv_fields_error, csv_value_error};
use crate::text::sql_type_name;

/// The columns a fitted load plan casts, and the types it casts them to.
pub(super) fn casts_of(plan: &LogicalPlan) -> Vec<(String, DataType)> {
    let LogicalPlan::Projection(projection) = plan else {
        return vec![];
    };
    projection
        .expr
        .iter()
        .filter_map(|e| match e {
            Expr::Alias(alias) => match alias.expr.as_ref() {
                Expr::Cast(c) => Some((alias.name.clone(), c.field.data_type().clone())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// What a failed load into `table` needs to say. `nothing` ends the message ("nothing was
/// ingested into core.t"). Errors that are not about the data pass unchanged.
pub(super) async fn load_error(
    state: &SessionState,
    source: &DataSource,
    target: Option<&Schema>,
    casts: &[(String, DataType)],
    nothing: &str,
    e: IcePieError,
) -> IcePieError {
    let IcePieError::BadData(said) = e else {
        return e;
    };
    let mut said = said;
    // Only a CSV value or field count can be found again by reading the files.
    let csv_problem = said.contains("of a CSV record") || said.starts_with("a CSV record");
    if let (DataSource::Files { location, format }, true) = (source, csv_problem) {
        if format.or_else(|| FileFormat::from_location(location)) == Some(FileFormat::Csv) {
            if let Some(found) = find_in_csv_files(state, location, target).await {
                said = found;
            }
        }
    }
    if let Some((value, _)) = between(&said, "the text '", "' is not a valid ") {
        let columns: Vec<String> = casts
            .iter()
            .filter(|(_, t)| said.contains(&format!("is not a valid {} ", sql_type_name(t))))
            .map(|(n, t)| format!("{n} ({})", sql_type_name(t)))
            .collect();
        if !columns.is_empty() {
            said = format!(
                "the value '{value}' does not fit column {}",
                columns.join(" or ")
            );
        }
    }
    if said.contains("have NULL in a NOT NULL column") {
        let not_null: Vec<&str> = target
            .map(|t| {
                t.fields()
                    .iter()
                    .filter(|f| !f.is_nullable())
                    .map(|f| f.name().as_str())
                    .collect()
            })
            .unwrap_or_default();
        if !not_null.is_empty() {
            let rows = said.split(' ').next().unwrap_or_default();
            said = match not_null.as_slice() {
                [one] => format!("{rows} row(s) have NULL in NOT NULL column {one}"),
                many => format!(
                    "{rows} row(s) have NULL in one of the NOT NULL columns {}",
                    many.join(", ")
                ),
            };
        }
    }
    IcePieError::BadData(format!("{said}; {nothing}"))
}

/// Reads the CSV files at `location` one at a time, in name order, each from its start in
/// one partition, and says where the first that fails on a value or a line fails.
async fn find_in_csv_files(
    state: &SessionState,
    location: &str,
    target: Option<&Schema>,
) -> Option<String> {
    let url = ListingTableUrl::parse(location).ok()?;
    let store = state.runtime_env().object_store(url.object_store()).ok()?;
    let last = location.rsplit('/').next().unwrap_or_default();
    let ext = if last.contains('.') {
        ""
    } else {
        FileFormat::Csv.extension()
    };
    let mut files: Vec<object_store::ObjectMeta> = url
        .list_all_files(state, store.as_ref(), ext)
        .await
        .ok()?
        .try_collect()
        .await
        .ok()?;
    files.sort_by(|a, b| a.location.cmp(&b.location));
    let mut config = state.config().clone();
    config.options_mut().optimizer.repartition_file_scans = false;
    let single = SessionStateBuilder::new_from_existing(state.clone())
        .with_config(config)
        .build();
    // The columns and types the load read every file with.
    let whole = plan_files(state, location, Some(FileFormat::Csv), target)
        .await
        .ok()?;
    let schema = Arc::new(whole.schema().as_arrow().clone());
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let local = !location.contains("://");
    for file in files {
        let file_url = format!("{}{}", url.object_store().as_str(), file.location);
        let shown = if local {
            format!("/{}", file.location)
        } else {
            file_url.clone()
        };
        let config = ListingTableConfig::new(ListingTableUrl::parse(&file_url).ok()?)
            .with_listing_options(
                // Whatever the file is called: it was listed as CSV already.
                ListingOptions::new(Arc::new(CsvFormat::default().with_has_header(true)))
                    .with_file_extension(""),
            )
            .with_schema(schema.clone());
        let provider = Arc::new(ListingTable::try_new(config).ok()?);
        let plan = LogicalPlanBuilder::scan("source", provider_as_source(provider), None)
            .ok()?
            .build()
            .ok()?;
        let physical = single.create_physical_plan(&plan).await.ok()?;
        let mut stream = execute_stream(physical, single.task_ctx()).ok()?;
        let raw = loop {
            match stream.try_next().await {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(e) => break Some(e.to_string()),
            }
        };
        let Some(raw) = raw else { continue };
        if let Some((value, sql, column, record, row)) = csv_value_error(&raw) {
            let name = names
                .get(column)
                .cloned()
                .unwrap_or_else(|| column.to_string());
            // Arrow counts records from the header (record 1 is the first after it).
            return Some(format!(
                "file {shown}, line {}: '{value}' in column {name} is not a valid {sql} \
                 (the line: {row})",
                record + 1
            ));
        }
        if let Some((line, expected, got)) = csv_fields_error(&raw) {
            return Some(format!(
                "file {shown}, line {line} has {got} field(s) where {expected} were expected"
            ));
        }
        return None;
    }
    None
}
