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
    let policy = match RefreshPolicy::parse(&info.meta.refresh) {
        Ok(p) => p,
        Err(e) => return no(format!("unreadable refresh policy: {e}")),
    };
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
            match info.refreshed_at.map(|at| at.saturating_add(every)) {
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

/// Adds what is known of the slice's reads to `info`, and makes an AUTO slice that is fresh
/// or stale `dormant` when neither read nor created within `icepie.cold_after`.
pub(crate) fn apply_demand(
    info: &mut SliceInfo,
    demand: Option<&Demand>,
    options: &IcePieOptions,
    now_ms: i64,
) {
    info.last_read = demand.and_then(|d| d.last_read);
    info.reads_per_day = Some(demand.map_or(0.0, |d| d.reads_per_day));
    let auto = matches!(
        RefreshPolicy::parse(&info.meta.refresh),
        Ok(RefreshPolicy::Auto(_))
    );
    let cold = i64::try_from(options.cold_after.0.as_millis()).unwrap_or(i64::MAX);
    let touched = info.last_read.max(info.meta.created_at).unwrap_or(i64::MIN);
    if auto
        && matches!(info.state, SliceState::Fresh | SliceState::Stale)
        && touched < now_ms.saturating_sub(cold)
    {
        info.state = SliceState::Dormant;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slice::meta::{CommitKind, Frozen, SliceMeta};
    use crate::storage::names::SliceName;
    use crate::storage::TableStats;

    fn info(refresh: &str) -> SliceInfo {
        SliceInfo {
            name: SliceName::parse("d.s").unwrap(),
            meta: SliceMeta {
                kind: CommitKind::Refresh,
                attempt_id: "a".into(),
                definition: "SELECT 1".into(),
                owner: None,
                refresh: refresh.into(),
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
            },
            version: 3,
            stats: TableStats::default(),
            refreshed_at: Some(1_000_000),
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
        s.meta.frozen = Some(Frozen {
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
        let mut s = info("auto");
        s.stale = true;
        s.meta.created_at = Some(now - 10 * day);
        apply_demand(&mut s, None, &options(), now);
        assert_eq!(s.state, SliceState::Dormant);
        let (due, why) = decide(&s, &options(), now);
        assert!(!due && why.starts_with("dormant"), "{why}");
        // Read yesterday: awake, and due since an input moved on.
        let mut s = info("auto");
        s.stale = true;
        let read = Demand {
            last_read: Some(now - day),
            reads_per_day: 3.0,
        };
        apply_demand(&mut s, Some(&read), &options(), now);
        assert_eq!((s.state, s.reads_per_day), (SliceState::Fresh, Some(3.0)));
        assert!(is_due(&s, &options(), now));
        // Created yesterday and never read: not dormant yet. Other policies never are.
        let mut s = info("auto");
        s.meta.created_at = Some(now - day);
        apply_demand(&mut s, None, &options(), now);
        assert_eq!(s.state, SliceState::Fresh);
        let mut s = info("on change");
        apply_demand(&mut s, None, &options(), now);
        assert_eq!(s.state, SliceState::Fresh);
    }
}
