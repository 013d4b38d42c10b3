//! When a slice's refresh policy makes a refresh due, and why or why not: what the scheduler
//! acts on and `system.slices.scheduling` shows.
//!
//! - `REFRESH EVERY 'interval'`: once the interval has passed since the slice's latest commit.
//! - `REFRESH ON CHANGE`: once an input has a newer version.
//! - `REFRESH AUTO [LAG 'interval']`: while the slice is read, once its lag reaches half of
//!   LAG (so that it stays within LAG; without LAG, as ON CHANGE). A slice not read for
//!   `icepie.cold_after` (7 days; nor created more recently) is `dormant`: not refreshed
//!   until its next read, which wakes it.
//!
//! Frozen, refreshing and suspended slices are never due; a slice whose last refreshes failed
//! waits out an exponential backoff; a damaged slice with a policy is due at once (its next
//! refresh writes all files anew).

use std::collections::HashMap;

use crate::options::IcePieOptions;
use crate::sql::{parse_interval, RefreshPolicy};
use crate::text::human_duration;
use crate::usage::Demand;

use super::{SliceInfo, SliceState};

/// Whether the scheduler should refresh the slice now, and why.
pub(crate) fn decide(info: &SliceInfo, options: &IcePieOptions, now_ms: i64) -> (bool, String) {
    let no = |why: String| (false, why);
    match info.state {
        SliceState::Frozen => return no("frozen: not refreshed until THAW SLICE".into()),
        SliceState::Refreshing => return no("refreshing".into()),
        SliceState::Dormant => {
            return no(format!(
                "dormant: not read for {}; its next read wakes it",
                options.cold_after
            ))
        }
        _ => {}
    }
    if options.max_failures > 0 && info.failures as usize >= options.max_failures {
        return no(format!(
            "suspended after {} failures in a row: REFRESH SLICE or THAW SLICE resumes it",
            info.failures
        ));
    }
    if info.failures > 0 {
        let wait = i64::try_from(options.backoff(info.failures).as_millis()).unwrap_or(i64::MAX);
        if let Some(at) = info.last_failure_at {
            let retry = at.saturating_add(wait);
            if now_ms < retry {
                return no(format!(
                    "failed {} times in a row: retried in {}",
                    info.failures,
                    human_duration(retry - now_ms)
                ));
            }
        }
    }
    let policy = info.descriptor.refresh.clone();
    // A damaged slice with a policy heals itself: its next refresh writes all files anew.
    if info.state == SliceState::Quarantined && policy != RefreshPolicy::Manual {
        return (true, "quarantined: a refresh writes all files anew".into());
    }
    match policy {
        RefreshPolicy::Manual => no("manual: refreshed by REFRESH SLICE only".into()),
        RefreshPolicy::OnChange => match info.stale {
            true => (true, "on change: an input moved on".into()),
            false => no("on change: up to date".into()),
        },
        RefreshPolicy::Every(text) => {
            let Ok(every) = parse_interval(&text) else {
                return no(format!("unreadable interval '{text}'"));
            };
            let every = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
            // From the latest refresh that committed or found nothing to do.
            let last = info.refreshed_at.max(info.checked_at);
            match last.map(|at| at.saturating_add(every)) {
                Some(next) if now_ms < next => no(format!(
                    "every '{text}': next in {}",
                    human_duration(next - now_ms)
                )),
                _ => (true, format!("every '{text}': due")),
            }
        }
        RefreshPolicy::Auto(lag) => {
            if !info.stale {
                return no("auto: up to date".into());
            }
            let Some(lag) = lag else {
                return (true, "auto: read, and an input moved on".into());
            };
            let Ok(limit) = parse_interval(&lag) else {
                return no(format!("unreadable lag '{lag}'"));
            };
            let half = i64::try_from(limit.as_millis() / 2).unwrap_or(i64::MAX);
            match info.lag_ms {
                Some(behind) if behind < half => no(format!(
                    "auto: {} behind, within LAG '{lag}'",
                    human_duration(behind)
                )),
                _ => (
                    true,
                    format!("auto: read, and half of LAG '{lag}' has passed"),
                ),
            }
        }
    }
}

/// True when the scheduler should refresh the slice now.
pub(crate) fn is_due(info: &SliceInfo, options: &IcePieOptions, now_ms: i64) -> bool {
    decide(info, options, now_ms).0
}

/// Adds what is known of the slices' reads to `infos`, and makes an AUTO slice that is fresh
/// or stale `dormant` when it was neither read nor created within `icepie.cold_after` (at
/// most `icepie.usage_retention`: older reads are forgotten), and no slice whose refreshes
/// read it needs it. A slice refreshed on a schedule (`EVERY`, `ON CHANGE`) needs its inputs
/// always; any other needs them as recently as it was read or created itself, so that demand
/// flows down a chain of slices. `demand` is `None` when the reads are not known (usage is
/// not recorded, or cannot be read): then no slice is dormant.
///
/// Returns, per slice of `infos`, when it was last touched (read, created or needed), `None`
/// for each when the reads are not known.
pub(crate) fn apply_demand(
    infos: &mut [SliceInfo],
    demand: Option<&HashMap<String, Demand>>,
    options: &IcePieOptions,
    now_ms: i64,
) -> Vec<Option<i64>> {
    let Some(demand) = demand else {
        for info in infos.iter_mut() {
            info.last_read = None;
            info.reads_per_day = None;
        }
        return vec![None; infos.len()];
    };
    for info in infos.iter_mut() {
        let d = demand.get(&info.name.to_string());
        info.last_read = d.and_then(|d| d.last_read);
        info.reads_per_day = Some(d.map_or(0.0, |d| d.reads_per_day));
    }
    // When each slice was last touched: read, created, or needed by a slice reading it.
    let mut touched: Vec<Option<i64>> = infos
        .iter()
        .map(|i| i.last_read.max(i.descriptor.created_at))
        .collect();
    let index: HashMap<String, usize> = infos
        .iter()
        .enumerate()
        .map(|(n, i)| (i.name.to_string(), n))
        .collect();
    // Chains are acyclic: demand reaches the bottom in at most one round per slice.
    for _ in 0..infos.len() {
        let mut changed = false;
        for (n, info) in infos.iter().enumerate() {
            let needs = match info.descriptor.refresh {
                _ if info.descriptor.frozen.is_some() => None,
                RefreshPolicy::Every(_) | RefreshPolicy::OnChange => Some(now_ms),
                _ => touched[n],
            };
            for input in &info.descriptor.inputs {
                if let Some(&i) = index.get(&input.table) {
                    if touched[i] < needs {
                        touched[i] = needs;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    let cold = options.cold_after.0.min(options.usage_retention.0);
    let cold = i64::try_from(cold.as_millis()).unwrap_or(i64::MAX);
    for (info, touched) in infos.iter_mut().zip(&touched) {
        let auto = matches!(info.descriptor.refresh, RefreshPolicy::Auto(_));
        if auto
            && matches!(info.state, SliceState::Fresh | SliceState::Stale)
            && touched.unwrap_or(i64::MIN) < now_ms.saturating_sub(cold)
        {
            info.state = SliceState::Dormant;
        }
    }
    touched
}

/// The order in which due slices are refreshed when more are due than may run: the most
/// read first, aged by how long each has gone without a refresh, so that a slice nobody
/// reads still gets its turn: (reads per day + 1) × time since its latest commit.
pub(crate) fn priority(info: &SliceInfo, now_ms: i64) -> f64 {
    let waited = now_ms.saturating_sub(info.refreshed_at.unwrap_or(0)).max(0) as f64;
    (info.reads_per_day.unwrap_or(0.0) + 1.0) * waited
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slice::meta::{CommitKind, Frozen, SliceDescriptor};
    use crate::storage::names::SliceName;
    use crate::storage::TableStats;

    fn info(refresh: &str) -> SliceInfo {
        SliceInfo {
            name: SliceName::parse("d.s").unwrap(),
            descriptor: SliceDescriptor {
                kind: CommitKind::Refresh,
                attempt_id: "a".into(),
                definition: "SELECT 1".into(),
                owner: None,
                refresh: RefreshPolicy::parse(refresh).unwrap(),
                partition_by: vec![],
                refresh_mode: Default::default(),
                inputs: vec![],
                frozen: None,
                rows: None,
                restored_from: None,
                built: None,
                appends: 0,
                cluster_by: Default::default(),
                clustered: None,
                created_at: None,
                build_started_at: None,
                costs: Default::default(),
            },
            version: 3,
            stats: TableStats::default(),
            refreshed_at: Some(1_000_000),
            checked_at: None,
            state: SliceState::Fresh,
            last_error: None,
            failures: 0,
            last_failure_at: None,
            stale: false,
            lag_ms: None,
            columns: vec![],
            refreshing_by: None,
            last_read: None,
            reads_per_day: None,
            slice_id: None,
        }
    }

    fn options() -> IcePieOptions {
        use datafusion::common::config::ExtensionOptions;
        let mut o = IcePieOptions::default();
        o.set("retry_backoff", "10 seconds").unwrap();
        o.set("max_retry_backoff", "1 minute").unwrap();
        o.set("max_failures", "3").unwrap();
        o
    }

    #[test]
    fn every_is_due_once_the_interval_has_passed_since_the_latest_commit() {
        let s = info("every '30 seconds'");
        assert!(!is_due(&s, &options(), 1_000_000 + 29_999));
        assert!(is_due(&s, &options(), 1_000_000 + 30_000));
    }

    #[test]
    fn on_change_is_due_when_stale_and_manual_never() {
        let mut s = info("on change");
        assert!(!is_due(&s, &options(), 9_999_999));
        s.stale = true;
        assert!(is_due(&s, &options(), 1_000_001));
        let mut m = info("manual");
        m.stale = true;
        assert!(!is_due(&m, &options(), 9_999_999));
    }

    #[test]
    fn failures_back_off_exponentially_then_suspend() {
        let mut s = info("on change");
        s.stale = true;
        s.failures = 2;
        s.last_failure_at = Some(2_000_000);
        // Second failure in a row: 10 s doubled.
        assert!(!is_due(&s, &options(), 2_000_000 + 19_999));
        assert!(is_due(&s, &options(), 2_000_000 + 20_000));
        s.failures = 3;
        assert!(!is_due(&s, &options(), 9_999_999_999), "suspended");
    }

    #[test]
    fn frozen_and_refreshing_slices_are_skipped() {
        let mut s = info("every '1 second'");
        s.state = SliceState::Frozen;
        s.descriptor.frozen = Some(Frozen {
            reason: None,
            since: 0,
        });
        assert!(!is_due(&s, &options(), 9_999_999));
        s.state = SliceState::Refreshing;
        assert!(!is_due(&s, &options(), 9_999_999));
    }

    #[test]
    fn auto_keeps_a_read_slice_within_half_its_lag_and_says_why() {
        let mut s = info("auto lag '10 minutes'");
        assert_eq!(
            decide(&s, &options(), 0),
            (false, "auto: up to date".into())
        );
        s.stale = true;
        s.lag_ms = Some(4 * 60_000);
        let (due, why) = decide(&s, &options(), 0);
        assert!(!due && why.contains("within LAG '10 minutes'"), "{why}");
        s.lag_ms = Some(5 * 60_000);
        assert!(is_due(&s, &options(), 0));
        let mut plain = info("auto");
        plain.stale = true;
        assert!(is_due(&plain, &options(), 0));
    }

    #[test]
    fn an_auto_slice_neither_read_nor_created_lately_is_dormant() {
        let day = 86_400_000;
        let now = 30 * day;
        let none = HashMap::new();
        let mut s = info("auto");
        s.stale = true;
        s.descriptor.created_at = Some(now - 10 * day);
        let mut all = [s];
        apply_demand(&mut all, Some(&none), &options(), now);
        assert_eq!(all[0].state, SliceState::Dormant);
        let (due, why) = decide(&all[0], &options(), now);
        assert!(!due && why.starts_with("dormant"), "{why}");
        // Read yesterday: awake, and due since an input moved on.
        let mut s = info("auto");
        s.stale = true;
        let read = HashMap::from([(
            "d.s".to_string(),
            Demand {
                last_read: Some(now - day),
                reads_per_day: 3.0,
            },
        )]);
        let mut all = [s];
        apply_demand(&mut all, Some(&read), &options(), now);
        assert_eq!(
            (all[0].state, all[0].reads_per_day),
            (SliceState::Fresh, Some(3.0))
        );
        assert!(is_due(&all[0], &options(), now));
        // Created yesterday and never read: not dormant yet. Other policies never are.
        let mut s = info("auto");
        s.descriptor.created_at = Some(now - day);
        let mut all = [s, info("on change")];
        all[1].name = SliceName::parse("d.t").unwrap();
        apply_demand(&mut all, Some(&none), &options(), now);
        assert_eq!(
            (all[0].state, all[1].state),
            (SliceState::Fresh, SliceState::Fresh)
        );
        // Reads unknown: nothing is dormant.
        let mut all = [info("auto")];
        apply_demand(&mut all, None, &options(), now);
        assert_eq!(
            (all[0].state, all[0].reads_per_day),
            (SliceState::Fresh, None)
        );
    }

    fn reading(slice: &str, input: &str, refresh: &str) -> SliceInfo {
        let mut s = info(refresh);
        s.name = SliceName::parse(slice).unwrap();
        s.descriptor.inputs = vec![crate::slice::meta::InputVersion {
            table: input.into(),
            version: 1,
            pinned: false,
            id: None,
        }];
        s
    }

    #[test]
    fn demand_flows_to_the_slices_a_read_or_scheduled_slice_reads() {
        let day = 86_400_000;
        let now = 30 * day;
        // d.c reads d.b reads d.a; only d.c is read.
        let mut all = [
            reading("d.c", "d.b", "auto"),
            reading("d.b", "d.a", "auto"),
            info("auto"),
        ];
        all[2].name = SliceName::parse("d.a").unwrap();
        let read = HashMap::from([(
            "d.c".to_string(),
            Demand {
                last_read: Some(now - day),
                reads_per_day: 1.0,
            },
        )]);
        apply_demand(&mut all, Some(&read), &options(), now);
        assert!(all.iter().all(|s| s.state == SliceState::Fresh));
        assert_eq!(all[2].last_read, None, "last_read stays the slice's own");
        // Nobody reads d.c: the chain sleeps. A scheduled reader keeps its input awake.
        let mut all = [
            reading("d.c", "d.b", "auto"),
            reading("d.b", "d.a", "auto"),
            reading("d.e", "d.a", "every '1 hour'"),
            info("auto"),
        ];
        all[3].name = SliceName::parse("d.a").unwrap();
        apply_demand(&mut all, Some(&HashMap::new()), &options(), now);
        let states: Vec<_> = all.iter().map(|s| s.state).collect();
        use SliceState::*;
        assert_eq!(states, [Dormant, Dormant, Fresh, Fresh]);
    }

    #[test]
    fn a_slice_nobody_reads_gets_its_turn_after_waiting_long_enough() {
        let minute = 60_000;
        let now = 1_000 * minute;
        let mut hot = info("auto");
        hot.reads_per_day = Some(100.0);
        hot.refreshed_at = Some(now - minute);
        let mut cold = info("auto");
        cold.reads_per_day = Some(0.0);
        cold.refreshed_at = Some(now - 30 * minute);
        assert!(priority(&hot, now) > priority(&cold, now));
        cold.refreshed_at = Some(now - 200 * minute);
        assert!(priority(&cold, now) > priority(&hot, now));
    }
}
