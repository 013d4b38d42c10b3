//! AUTO's choice by measured cost: each build's bytes read and time (its descriptor's
//! [`BuildCosts`]) predict what a full and an incremental build would cost now, and an `AUTO`
//! refresh takes the cheaper.
//!
//! Each mode is a line, time = fixed + per byte × bytes read, fitted to that mode's latest
//! builds by least squares when their sizes differ enough to tell the two apart (the largest
//! at least twice the smallest). Otherwise a mode is one rate: a full build's time over its
//! bytes; an incremental build's bytes at the full builds' rate (a byte costs about the same
//! to read either way; no more than its own rate), the rest of its time being its fixed cost.
//! A full build reads every input whole, so its sizes follow the inputs' growth; an
//! incremental build's vary with each append, so its line soon has both terms.

use crate::slice::meta::{BuildCost, BuildCosts};
use crate::text::human_bytes;

/// Sizes differ enough to fit a line when the largest is this many times the smallest.
const SPREAD: f64 = 2.0;

/// A full build is taken only when predicted cheaper by at least this share of the
/// incremental prediction and [`MARGIN_MS`]: below, the two are within what timings of one
/// slice vary by, and an incremental build keeps the slice's files.
const MARGIN_SHARE: f64 = 0.10;

/// See [`MARGIN_SHARE`].
const MARGIN_MS: f64 = 5.0;

/// Time as a line in bytes read.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Line {
    fixed_ms: f64,
    ms_per_byte: f64,
}

impl Line {
    fn at(&self, bytes: i64) -> f64 {
        self.fixed_ms + self.ms_per_byte * bytes as f64
    }

    /// The line of `costs` (none when empty); `prior` is the per-byte time to assume when
    /// their sizes are too alike to tell fixed from per-byte time.
    fn fit(costs: &[BuildCost], prior: Option<f64>) -> Option<Line> {
        if costs.is_empty() {
            return None;
        }
        let n = costs.len() as f64;
        let xs = || costs.iter().map(|c| c.bytes.max(1) as f64);
        let ts = || costs.iter().map(|c| c.ms.max(0) as f64);
        let (mean_x, mean_t) = (xs().sum::<f64>() / n, ts().sum::<f64>() / n);
        let (min, max) = xs().fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        if max >= SPREAD * min {
            let sxx: f64 = xs().map(|x| (x - mean_x).powi(2)).sum();
            let sxt: f64 = xs()
                .zip(ts())
                .map(|(x, t)| (x - mean_x) * (t - mean_t))
                .sum();
            let slope = (sxt / sxx).max(0.0);
            let fixed = mean_t - slope * mean_x;
            if fixed >= 0.0 {
                return Some(Line {
                    fixed_ms: fixed,
                    ms_per_byte: slope,
                });
            }
            // No fixed cost: the best line through the origin.
            let sxx0: f64 = xs().map(|x| x * x).sum();
            let sxt0: f64 = xs().zip(ts()).map(|(x, t)| x * t).sum();
            return Some(Line {
                fixed_ms: 0.0,
                ms_per_byte: sxt0 / sxx0,
            });
        }
        let own = mean_t / mean_x;
        let per_byte = prior.map_or(own, |p| p.min(own));
        Some(Line {
            fixed_ms: mean_t - per_byte * mean_x,
            ms_per_byte: per_byte,
        })
    }
}

/// What both modes are predicted to cost.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Prediction {
    pub incremental_ms: f64,
    pub full_ms: f64,
    incremental_bytes: i64,
    full_bytes: i64,
    measured: (usize, usize),
}

impl Prediction {
    /// Predicts an incremental build reading `incremental_bytes` and a full one reading
    /// `full_bytes` from `costs`; `None` until a build of each mode was measured.
    pub(crate) fn from(
        costs: &BuildCosts,
        incremental_bytes: i64,
        full_bytes: i64,
    ) -> Option<Prediction> {
        let full = Line::fit(&costs.full, None)?;
        let incremental = Line::fit(&costs.incremental, Some(full.ms_per_byte))?;
        Some(Prediction {
            incremental_ms: incremental.at(incremental_bytes),
            full_ms: full.at(full_bytes),
            incremental_bytes,
            full_bytes,
            measured: (costs.incremental.len(), costs.full.len()),
        })
    }

    /// True when a full build is cheaper, by more than timings vary by.
    pub(crate) fn full_is_cheaper(&self) -> bool {
        let margin = (self.incremental_ms * MARGIN_SHARE).max(MARGIN_MS);
        self.full_ms + margin < self.incremental_ms
    }

    /// The figures, for a build's reason.
    pub(crate) fn figures(&self) -> String {
        format!(
            "AUTO predicted {:.0} ms incremental (reading {}) against {:.0} ms full (reading \
             {}), from the last {} incremental and {} full builds",
            self.incremental_ms,
            human_bytes(self.incremental_bytes.max(0) as u64),
            self.full_ms,
            human_bytes(self.full_bytes.max(0) as u64),
            self.measured.0,
            self.measured.1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slice::meta::BuildMode;

    fn cost(bytes: i64, ms: i64) -> BuildCost {
        BuildCost { bytes, ms }
    }

    fn costs(full: &[(i64, i64)], incremental: &[(i64, i64)]) -> BuildCosts {
        let mut out = BuildCosts::default();
        for &(b, t) in full {
            out.push(BuildMode::Full, cost(b, t));
        }
        for &(b, t) in incremental {
            out.push(BuildMode::Incremental, cost(b, t));
        }
        out
    }

    #[test]
    fn no_prediction_until_both_modes_were_measured() {
        assert!(Prediction::from(&costs(&[(1000, 100)], &[]), 10, 1000).is_none());
        assert!(Prediction::from(&costs(&[], &[(10, 5)]), 10, 1000).is_none());
        assert!(Prediction::from(&costs(&[(1000, 100)], &[(10, 5)]), 10, 1000).is_some());
    }

    #[test]
    fn a_line_separates_fixed_from_per_byte_time_when_sizes_differ() {
        // 10 ms + 1 ms per 100 bytes, exactly.
        let line = Line::fit(&[cost(100, 11), cost(1000, 20), cost(10_000, 110)], None).unwrap();
        assert!((line.fixed_ms - 10.0).abs() < 1e-6, "{line:?}");
        assert!((line.ms_per_byte - 0.01).abs() < 1e-9, "{line:?}");
        assert!((line.at(5000) - 60.0).abs() < 1e-6);
    }

    #[test]
    fn a_line_never_has_negative_fixed_or_per_byte_time() {
        // Falling time with growing size: no per-byte time, the mean as fixed time.
        let line = Line::fit(&[cost(100, 50), cost(1000, 10)], None).unwrap();
        assert_eq!(line.ms_per_byte, 0.0);
        assert!((line.fixed_ms - 30.0).abs() < 1e-9);
        // A steep line would cross below zero: through the origin instead.
        let line = Line::fit(&[cost(100, 1), cost(1000, 100)], None).unwrap();
        assert_eq!(line.fixed_ms, 0.0);
        assert!(line.ms_per_byte > 0.0);
    }

    #[test]
    fn alike_incremental_sizes_read_at_the_full_rate_with_the_rest_fixed() {
        // Full builds: 1 ms per 10 KB. One incremental build: 1 KB in 15 ms, so 14.9 ms of
        // it is fixed, and 100 KB more is predicted at the full rate, not at 15 ms per KB.
        let p = Prediction::from(
            &costs(&[(1_000_000, 100)], &[(1000, 15)]),
            101_000,
            1_000_000,
        )
        .unwrap();
        assert!((p.incremental_ms - 25.0).abs() < 1e-6, "{p:?}");
        assert!((p.full_ms - 100.0).abs() < 1e-6, "{p:?}");
        assert!(!p.full_is_cheaper());
        // Never faster per byte than its own rate: a cheap incremental build stays as cheap.
        let p = Prediction::from(&costs(&[(1000, 100)], &[(1000, 15)]), 1000, 1000).unwrap();
        assert!((p.incremental_ms - 15.0).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn full_is_taken_only_when_cheaper_by_more_than_timings_vary() {
        // Incremental builds: 10 ms fixed + 1 ms per KB; full builds: 1 ms per 4 KB.
        let c = costs(
            &[(100_000, 25), (200_000, 50)],
            &[(1000, 11), (10_000, 20), (100_000, 110)],
        );
        // A small append: incremental.
        let p = Prediction::from(&c, 2000, 400_000).unwrap();
        assert!(!p.full_is_cheaper(), "{p:?}");
        // New data as large as the table: full reads twice as much at a quarter of the time a byte.
        let p = Prediction::from(&c, 400_000, 800_000).unwrap();
        assert!(p.full_is_cheaper(), "{p:?}");
        assert!(
            p.figures().starts_with("AUTO predicted 410 ms incremental"),
            "{}",
            p.figures()
        );
        // Within the margin (less than 10% cheaper): incremental.
        let p = Prediction::from(&c, 100_000, 400_000).unwrap();
        assert!((p.full_ms - 100.0).abs() < 1e-6 && (p.incremental_ms - 110.0).abs() < 1e-6);
        assert!(!p.full_is_cheaper(), "{p:?}");
    }

    #[test]
    fn only_the_latest_builds_are_kept() {
        let mut c = BuildCosts::default();
        for i in 0..20 {
            c.push(BuildMode::Incremental, cost(i, i));
        }
        assert_eq!(c.incremental.len(), BuildCosts::KEPT);
        assert_eq!(c.incremental[0].bytes, 20 - BuildCosts::KEPT as i64);
        assert!(c.full.is_empty());
    }
}
