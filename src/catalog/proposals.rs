//! Proposals: what icepie suggests changing, from the usage it records and the slices'
//! refresh logs, each with its evidence, an estimated saving and the exact statement that
//! applies it (`system.proposals`, `APPLY PROPOSAL n`, `DISMISS PROPOSAL n`).
//!
//! - `freeze`: a slice that nobody read, and no slice reading it needed, for
//!   `icepie.unread_after` (30 days, at most `icepie.usage_retention`), and that is older
//!   than that: `FREEZE SLICE`, which stops its refreshes and keeps serving it (`THAW SLICE`
//!   undoes it).
//! - `layout`: a slice with a fixed layout (`CLUSTER BY NONE` or `(cols)`) whose readers
//!   filter on another column, in at least [`clustering::MIN_QUERIES`] queries (and
//!   [`clustering::SWITCH_FACTOR`] times those of the column it is sorted by):
//!   `ALTER SLICE … SET CLUSTER BY (col)`. `CLUSTER BY AUTO` slices follow their readers
//!   by themselves.
//! - `schedule`: a slice refreshed on a schedule (`EVERY`, `ON CHANGE`) at least
//!   [`MIN_REFRESHES_PER_DAY`] times a day and [`REFRESHES_PER_READ`] times as often as it
//!   is read: `ALTER SLICE … SET REFRESH AUTO [LAG 'every']`, which keeps it as fresh while
//!   it is read and stops refreshing it when it is not.
//!
//! - `new_slice`: a query shape (the same core tables, filters and grouping) run at least
//!   [`NEW_SLICE_MIN_QUERIES`] times in the last week against core tables only: `CREATE SLICE
//!   proposed.… REFRESH AUTO AS …`, the query with its literal filters taken out and their
//!   columns kept ([`crate::sql::generalize`]), so that the slice answers the query whatever
//!   values it filters on. Never applied automatically.
//!
//! A proposal's number is derived from its statement, so it stays the same as long as the
//! proposal does. A dismissed proposal is remembered by its statement, in
//! `_system/proposals/dismissed/` (one object per dismissal: processes never contend), and
//! hidden from then on.

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStoreExt;

use super::state::CatalogState;
use crate::error::{IcePieError, Result};
use crate::options::IcePieOptions;
use crate::slice::clustering::{self, ClusterBy};
use crate::slice::{SliceInfo, SliceState};
use crate::sql::RefreshPolicy;
use crate::storage::names::SliceName;
use crate::text::human_duration;
use crate::usage::files::{day_of, Rows};
use crate::usage::Use;

/// Where dismissals are kept.
const DISMISSED: &str = "_system/proposals/dismissed";

/// Queries of one shape over the last week before a slice is proposed for it.
pub(crate) const NEW_SLICE_MIN_QUERIES: i64 = 10;

/// The domain proposed slices go in.
pub(crate) const PROPOSED_DOMAIN: &str = "proposed";

/// Refreshes per day below which a schedule is never worth a proposal.
pub(crate) const MIN_REFRESHES_PER_DAY: f64 = 4.0;

/// How many times as often as it is read a slice must be refreshed for a schedule proposal.
pub(crate) const REFRESHES_PER_READ: f64 = 10.0;

const DAY_MS: i64 = 86_400_000;

/// One suggestion.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    /// Its number (`APPLY PROPOSAL n`), the same for as long as the proposal stands.
    pub id: i64,
    /// `new_slice`, `freeze`, `layout` or `schedule`.
    pub kind: &'static str,
    /// The slice it concerns.
    pub target: String,
    /// What was seen.
    pub evidence: String,
    /// What applying it should save.
    pub saving: String,
    /// The statement that applies it.
    pub statement: String,
}

/// What proposals are drawn from.
pub(crate) struct Evidence<'a> {
    /// Every slice, with its reads applied ([`crate::slice::schedule::apply_demand`]).
    pub slices: &'a [SliceInfo],
    /// When each slice of `slices` was last read, created or needed; `None` when unknown.
    pub touched: &'a [Option<i64>],
    /// The usage recorded over `icepie.usage_retention`; `None` when it cannot be read.
    pub usage: Option<&'a Rows>,
    /// Start times (ms) of each slice's successful refreshes, recent first or not.
    pub refreshes: &'a HashMap<SliceName, Vec<i64>>,
    pub options: &'a IcePieOptions,
    pub now: i64,
}

/// Everything proposed now, dismissed ones included, numbered, in number order.
pub(crate) fn propose(e: &Evidence) -> Vec<Proposal> {
    let mut out = Vec::new();
    for (info, touched) in e.slices.iter().zip(e.touched) {
        if info.descriptor.frozen.is_some() || info.state == SliceState::Quarantined {
            continue;
        }
        out.extend(freeze(info, *touched, e));
        out.extend(layout(info, e));
        out.extend(schedule(info, e));
    }
    out.extend(new_slices(e));
    number(&mut out);
    out
}

fn freeze(info: &SliceInfo, touched: Option<i64>, e: &Evidence) -> Option<Proposal> {
    let window = e.options.unread_after.0.min(e.options.usage_retention.0);
    let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let created = info.descriptor.created_at?;
    // Reads unknown (usage off, or unreadable): nothing to conclude.
    let touched = touched?;
    if touched >= e.now.saturating_sub(window) || created >= e.now.saturating_sub(window) {
        return None;
    }
    let evidence = match info.last_read {
        Some(at) => format!(
            "last read {} ago; no slice reading it needs it",
            human_duration(e.now - at)
        ),
        None => format!(
            "no read recorded in {}; created {} ago; no slice reading it needs it",
            human_duration(window),
            human_duration(e.now - created)
        ),
    };
    let per_day = refreshes_per_day(info, e);
    let saving = match per_day {
        0.0 => "no refreshes run now; frozen, it is marked as kept for reference only (DROP \
                SLICE would free its storage)"
            .to_string(),
        _ => format!("its refreshes ({per_day:.1} a day)"),
    };
    Some(Proposal {
        id: 0,
        kind: "freeze",
        target: info.name.to_string(),
        evidence,
        saving: format!("{saving}; THAW SLICE {} undoes it", info.name),
        // The same statement for as long as it stands: its number and dismissal go by it.
        statement: format!("FREEZE SLICE {} 'unread: proposed by icepie'", info.name),
    })
}

fn layout(info: &SliceInfo, e: &Evidence) -> Option<Proposal> {
    let current = match &info.descriptor.cluster_by {
        ClusterBy::Auto => return None,
        ClusterBy::None => None,
        ClusterBy::Columns(c) => c.first().cloned(),
    };
    let table = info.name.to_string();
    let columns: HashSet<&str> = info.columns.iter().map(|(c, _)| c.as_str()).collect();
    let filters = clustering::filter_counts(e.usage?, &table, e.since(), |c| {
        columns.contains(c) && !info.descriptor.partition_by.iter().any(|p| p == c)
    });
    let (column, n) = filters
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))?;
    let held = current
        .as_ref()
        .map_or(0, |c| filters.get(c).copied().unwrap_or(0));
    if *n < clustering::MIN_QUERIES
        || current.as_deref() == Some(column.as_str())
        || *n < held.saturating_mul(clustering::SWITCH_FACTOR)
    {
        return None;
    }
    let (scanned, skipped) = e
        .usage?
        .iter()
        .filter(|(k, _)| k.table == table && k.day >= e.since())
        .fold((0, 0), |(a, b), (_, s)| {
            (a + s.files_scanned, b + s.files_skipped)
        });
    let share = match scanned + skipped {
        0 => "its queries read every file".to_string(),
        all => format!(
            "its queries read {:.0}% of the files they could",
            100.0 * scanned as f64 / all as f64
        ),
    };
    Some(Proposal {
        id: 0,
        kind: "layout",
        target: table,
        evidence: format!(
            "{n} queries filtered on '{column}' (equality, range or IN) in \
             icepie.usage_retention; it is clustered by {}",
            info.descriptor.cluster_by
        ),
        saving: format!(
            "{share}; sorted by '{column}', a selective filter on it reads few of them \
             (from its next refresh, which is full)"
        ),
        statement: format!(
            "ALTER SLICE {} SET CLUSTER BY ({})",
            info.name,
            quoted(column)
        ),
    })
}

fn schedule(info: &SliceInfo, e: &Evidence) -> Option<Proposal> {
    let lag = match &info.descriptor.refresh {
        RefreshPolicy::Every(every) => Some(every.clone()),
        RefreshPolicy::OnChange => None,
        _ => return None,
    };
    // Reads unknown: nothing to conclude. A slice other slices read is refreshed for them.
    let reads = info.reads_per_day?;
    let table = info.name.to_string();
    if e.slices
        .iter()
        .any(|s| s.descriptor.inputs.iter().any(|i| i.table == table))
    {
        return None;
    }
    let per_day = refreshes_per_day(info, e);
    if per_day < MIN_REFRESHES_PER_DAY || per_day < REFRESHES_PER_READ * reads {
        return None;
    }
    let auto = match &lag {
        Some(lag) => format!("AUTO LAG '{lag}'"),
        None => "AUTO".into(),
    };
    Some(Proposal {
        id: 0,
        kind: "schedule",
        target: info.name.to_string(),
        evidence: format!(
            "refreshed {per_day:.1} times a day ({}), read {reads:.1} times a day",
            info.descriptor.refresh
        ),
        saving: format!(
            "about {:.0} refreshes a day: REFRESH {auto} keeps it as fresh while it is read, \
             and stops refreshing it while it is not",
            (per_day - reads.max(1.0)).max(0.0)
        ),
        statement: format!("ALTER SLICE {} SET REFRESH {auto}", info.name),
    })
}

/// One query shape's sums over the last week.
#[derive(Default)]
struct ShapeSums {
    /// Per table read: queries, latency (µs) and bytes scanned.
    tables: HashMap<String, (i64, i64, i64)>,
    core_only: bool,
    /// The latest example, and when.
    example: Option<(i64, String)>,
    /// Columns filtered or grouped on.
    columns: Vec<String>,
}

fn new_slices(e: &Evidence) -> Vec<Proposal> {
    let Some(usage) = e.usage else {
        return vec![];
    };
    let week = day_of(e.now - 7 * DAY_MS);
    let mut shapes: HashMap<&str, ShapeSums> = HashMap::new();
    for (key, sums) in usage.iter().filter(|(k, _)| k.day > week) {
        let shape = shapes
            .entry(key.shape.as_str())
            .or_insert_with(|| ShapeSums {
                core_only: true,
                ..ShapeSums::default()
            });
        shape.core_only &= key.kind == "core";
        let t = shape.tables.entry(key.table.clone()).or_default();
        t.0 += sums.queries;
        t.1 += sums.latency_us_total;
        t.2 += sums.bytes_scanned;
        if let Some(example) = &sums.example {
            if shape
                .example
                .as_ref()
                .is_none_or(|(at, _)| *at < sums.last_at)
            {
                shape.example = Some((sums.last_at, example.clone()));
            }
        }
        for used in &sums.columns {
            if used.how != Use::Join && !shape.columns.contains(&used.column) {
                shape.columns.push(used.column.clone());
            }
        }
    }
    // Shapes whose queries the same slice answers (`day = …` and `day IN (…)`) count together.
    let mut by_definition: BTreeMap<String, (Vec<&str>, ShapeSums)> = BTreeMap::new();
    for (shape, sums) in shapes {
        let Some((at, definition)) = sums.example.clone().filter(|_| sums.core_only) else {
            continue;
        };
        let (names, all) = by_definition.entry(definition.clone()).or_insert_with(|| {
            (
                vec![],
                ShapeSums {
                    core_only: true,
                    example: Some((at, definition)),
                    ..ShapeSums::default()
                },
            )
        });
        names.push(shape);
        for (table, t) in sums.tables {
            let a = all.tables.entry(table).or_default();
            a.0 += t.0;
            a.1 += t.1;
            a.2 += t.2;
        }
        for c in sums.columns {
            if !all.columns.contains(&c) {
                all.columns.push(c);
            }
        }
    }
    let defined: HashSet<String> = e
        .slices
        .iter()
        .map(|s| squeeze(&s.descriptor.definition))
        .collect();
    let mut names: HashSet<String> = e.slices.iter().map(|s| s.name.to_string()).collect();
    let mut out = Vec::new();
    for (definition, (mut names_of_shapes, sums)) in by_definition {
        names_of_shapes.sort();
        let shape = match names_of_shapes.as_slice() {
            [one] => one.to_string(),
            [first, ..] => format!("{} shapes, e.g. {first}", names_of_shapes.len()),
            [] => continue,
        };
        // Every table of a shape is read by each of its queries: the counts agree.
        let (queries, latency_us, bytes) = sums
            .tables
            .values()
            .fold((0, 0, 0), |a, t| (a.0.max(t.0), a.1.max(t.1), a.2 + t.2));
        if queries < NEW_SLICE_MIN_QUERIES || defined.contains(&squeeze(&definition)) {
            continue;
        }
        let mut tables: Vec<&String> = sums.tables.keys().collect();
        tables.sort();
        let Some(name) = proposed_name(tables[0], &sums.columns, &mut names) else {
            continue;
        };
        let per_day = queries as f64 / 7.0;
        out.push(Proposal {
            id: 0,
            kind: "new_slice",
            target: name.to_string(),
            evidence: format!(
                "{queries} queries in the last 7 days read only core tables as {shape}"
            ),
            saving: format!(
                "up to {} of query time a day ({per_day:.1} queries a day, {} scanned each): \
                 they can read the slice instead, kept fresh as the core grows",
                human_duration(latency_us / 7 / 1000),
                crate::text::human_bytes(u64::try_from(bytes / queries.max(1)).unwrap_or(0))
            ),
            statement: format!("CREATE SLICE {name} REFRESH AUTO AS {definition}"),
        });
    }
    out
}

/// `text` with its runs of white space made one space: definitions compare as written.
fn squeeze(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `proposed.<table>_by_<columns>` (at most three), not one of `taken`, which it joins.
fn proposed_name(
    table: &str,
    columns: &[String],
    taken: &mut HashSet<String>,
) -> Option<SliceName> {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    let table = clean(table.rsplit('.').next().unwrap_or(table));
    let mut cols: Vec<String> = columns.iter().map(|c| clean(c)).collect();
    cols.sort();
    cols.dedup();
    cols.truncate(3);
    let base = match cols.is_empty() {
        true => format!("{table}_summary"),
        false => format!("{table}_by_{}", cols.join("_")),
    };
    (1..100).find_map(|n| {
        let candidate = match n {
            1 => base.clone(),
            n => format!("{base}_{n}"),
        };
        let name = SliceName::new(PROPOSED_DOMAIN, candidate).ok()?;
        taken.insert(name.to_string()).then_some(name)
    })
}

/// `column` as SQL names it: bare when SQL would fold it to itself, else in double quotes.
fn quoted(column: &str) -> String {
    let bare = column
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && column
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    match bare {
        true => column.to_string(),
        false => format!("\"{}\"", column.replace('"', "\"\"")),
    }
}

impl Evidence<'_> {
    /// The first day of usage counted: `icepie.usage_retention` ago.
    fn since(&self) -> i32 {
        let retention =
            i64::try_from(self.options.usage_retention.0.as_millis()).unwrap_or(i64::MAX);
        day_of(self.now.saturating_sub(retention))
    }
}

/// Successful refreshes a day over the last week (at least over an hour: a slice refreshed
/// three times in its first minutes is refreshed about three times an hour).
fn refreshes_per_day(info: &SliceInfo, e: &Evidence) -> f64 {
    let week = e.now - 7 * DAY_MS;
    let starts: Vec<i64> = e
        .refreshes
        .get(&info.name)
        .map(|r| r.iter().copied().filter(|at| *at >= week).collect())
        .unwrap_or_default();
    let Some(first) = starts.iter().min() else {
        return 0.0;
    };
    let span = (e.now - first).clamp(3_600_000, 7 * DAY_MS);
    starts.len() as f64 * DAY_MS as f64 / span as f64
}

/// A 64-bit FNV-1a hash: stable across processes and versions.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Numbers the proposals from their statements (1 to 999999; a collision takes the next
/// free number, in statement order), and sorts them by number.
fn number(proposals: &mut [Proposal]) {
    proposals.sort_by(|a, b| a.statement.cmp(&b.statement));
    let mut taken = HashSet::new();
    for p in proposals.iter_mut() {
        let mut id = (fnv(&p.statement) % 999_999) as i64 + 1;
        while !taken.insert(id) {
            id = id % 999_999 + 1;
        }
        p.id = id;
    }
    proposals.sort_by_key(|p| p.id);
}

fn dismissed_path(statement: &str) -> Path {
    Path::from(format!("{DISMISSED}/{:016x}", fnv(statement)))
}

/// The statements of dismissed proposals.
async fn dismissed(shared: &CatalogState) -> Result<HashSet<String>> {
    let store = shared.warehouse.store();
    let mut out = HashSet::new();
    let listed: Vec<_> = store
        .list(Some(&Path::from(DISMISSED)))
        .try_collect()
        .await?;
    for meta in listed {
        match store.get(&meta.location).await {
            Ok(got) => {
                let bytes = got.bytes().await?;
                out.insert(String::from_utf8_lossy(&bytes).into_owned());
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The proposals standing now and not dismissed.
pub(crate) async fn list(shared: &CatalogState) -> Result<Vec<Proposal>> {
    let (mut slices, _unreadable) = shared
        .cards
        .infos(shared, super::cards::Purpose::Show)
        .await?;
    let options = shared.options();
    let now = shared.usage.clock.now_ms();
    let demand = shared.demand().await;
    let touched = crate::slice::schedule::apply_demand(&mut slices, demand.as_ref(), &options, now);
    let usage = shared.recorded_usage().await.ok();
    let mut refreshes = HashMap::new();
    for info in &slices {
        // A refresh log that cannot be read now counts no refreshes.
        let all = shared.attempts(&info.name).await.unwrap_or_default();
        let starts = crate::slice::refresh_log::of_slice(
            all,
            info.slice_id.as_deref(),
            info.descriptor.created_at,
        )
        .into_iter()
        .filter(|a| a.kind == "refresh" && a.status == crate::slice::refresh_log::SUCCESS)
        .map(|a| a.started_at)
        .collect::<Vec<_>>();
        refreshes.insert(info.name.clone(), starts);
    }
    let all = propose(&Evidence {
        slices: &slices,
        touched: &touched,
        usage: usage.as_deref(),
        refreshes: &refreshes,
        options: &options,
        now,
    });
    let hidden = dismissed(shared).await?;
    Ok(all
        .into_iter()
        .filter(|p| !hidden.contains(&p.statement))
        .collect())
}

/// Proposal `n` as it stands now, or an error saying it does not.
pub(crate) async fn find(shared: &CatalogState, n: i64) -> Result<Proposal> {
    list(shared)
        .await?
        .into_iter()
        .find(|p| p.id == n)
        .ok_or_else(|| IcePieError::ProposalNotFound(n))
}

/// Hides proposal `n` from now on.
pub(crate) async fn dismiss(shared: &CatalogState, n: i64) -> Result<Proposal> {
    let proposal = find(shared, n).await?;
    shared
        .warehouse
        .store()
        .put(
            &dismissed_path(&proposal.statement),
            Bytes::from(proposal.statement.clone()).into(),
        )
        .await?;
    Ok(proposal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_statements_and_collisions_take_the_next() {
        let p = |s: &str| Proposal {
            id: 0,
            kind: "freeze",
            target: "d.s".into(),
            evidence: String::new(),
            saving: String::new(),
            statement: s.into(),
        };
        let mut a = vec![p("FREEZE SLICE d.a 'x'"), p("FREEZE SLICE d.b 'x'")];
        let mut b = vec![p("FREEZE SLICE d.b 'x'")];
        number(&mut a);
        number(&mut b);
        let id_b = a.iter().find(|p| p.statement.contains("d.b")).unwrap().id;
        assert_eq!(id_b, b[0].id, "a proposal keeps its number");
        assert!(a.iter().all(|p| (1..=999_999).contains(&p.id)));
        let mut same = vec![p("x"), p("x")];
        number(&mut same);
        assert_ne!(same[0].id, same[1].id);
    }
}
