//! icepie's settings: a DataFusion configuration extension under the prefix `icepie`.
//!
//! Being a [`ConfigExtension`], the settings live in the session's configuration like
//! DataFusion's own: `SET icepie.max_concurrent_refreshes = 4` changes them, `SHOW
//! icepie.retain_versions` and `information_schema.df_settings` show them, and
//! [`IcePieBuilder::with_setting`](crate::IcePieBuilder::with_setting) sets them before the
//! warehouse opens. A value that does not parse is refused by `SET` itself, with the reason.
//!
//! # Invariants
//!
//! - A bad value is refused with what was expected, and the setting keeps its value
//!   (invariant 7; `tests::settings_are_set_by_name_and_bad_values_say_what_is_expected`).
//!
//! Sizes are written `512MB`, `2 GiB`, `1000000` (bytes); durations `30 seconds`, `250ms`,
//! `1 hour`.

use std::fmt;
use std::time::Duration;

use datafusion::common::config::{
    ConfigEntry, ConfigExtension, ConfigField, ExtensionOptions, Visit,
};
use datafusion::error::{DataFusionError, Result as DFResult};

/// Declares the settings once: the struct, its defaults, `SET` by name and the listing.
///
/// DataFusion's own `extensions_options!` lists extension settings without their prefix
/// (`retain_versions`, not `icepie.retain_versions`), so `SHOW icepie.retain_versions` and
/// `information_schema.df_settings` would not find them; this lists them prefixed.
macro_rules! settings {
    ($(#[doc = $sd:literal])* pub struct $name:ident {
        $($(#[doc = $d:literal])* pub $field:ident: $ty:ty = $default:expr,)*
    }) => {
        $(#[doc = $sd])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $($(#[doc = $d])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $($field: $default,)* }
            }
        }

        impl ExtensionOptions for $name {
            fn as_any(&self) -> &dyn std::any::Any {
                self
            }

            fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
                self
            }

            fn cloned(&self) -> Box<dyn ExtensionOptions> {
                Box::new(self.clone())
            }

            fn set(&mut self, key: &str, value: &str) -> DFResult<()> {
                let mut next = self.clone();
                match key {
                    $(stringify!($field) => ConfigField::set(&mut next.$field, key, value),)*
                    _ => Err(DataFusionError::Configuration(format!(
                        "unknown setting icepie.{key}; the settings are {}",
                        [$(concat!("icepie.", stringify!($field))),*].join(", ")
                    ))),
                }?;
                next.check(key, value)?;
                *self = next;
                Ok(())
            }

            fn entries(&self) -> Vec<ConfigEntry> {
                let mut v = Prefixed(Vec::new());
                $(self.$field.visit(
                    &mut v,
                    concat!("icepie.", stringify!($field)),
                    concat!($($d),*).trim(),
                );)*
                v.0
            }
        }
    };
}

/// Collects entries under their full names.
struct Prefixed(Vec<ConfigEntry>);

impl Visit for Prefixed {
    fn some<V: fmt::Display>(&mut self, key: &str, value: V, description: &'static str) {
        self.0.push(ConfigEntry {
            key: key.to_string(),
            value: Some(value.to_string()),
            description,
        });
    }

    fn none(&mut self, key: &str, description: &'static str) {
        self.0.push(ConfigEntry {
            key: key.to_string(),
            value: None,
            description,
        });
    }
}

settings! {
    /// icepie's settings (`SET icepie.<name> = <value>`).
    pub struct IcePieOptions {
        /// Run due refreshes (REFRESH EVERY, REFRESH ON CHANGE) in this process: on or off.
        pub scheduler: Switch = Switch(true),
        /// How often the scheduler looks for due refreshes.
        pub scheduler_tick: Span = Span(Duration::from_secs(5)),
        /// Scheduled refreshes running at once in this process.
        pub max_concurrent_refreshes: usize = 2,
        /// Wait after the first failed refresh of a slice before the scheduler retries it;
        /// doubled after each further failure, up to max_retry_backoff.
        pub retry_backoff: Span = Span(Duration::from_secs(10)),
        /// Longest wait between scheduled retries of a failing slice.
        pub max_retry_backoff: Span = Span(Duration::from_secs(600)),
        /// Failed refreshes in a row after which a slice is suspended: the scheduler leaves
        /// it alone until a REFRESH SLICE succeeds or THAW SLICE (0: never suspend).
        pub max_failures: usize = 5,
        /// Slices of refresh mode AUTO (the default mode, not the REFRESH AUTO policy)
        /// refresh incrementally when each changed input's new data is at most this share
        /// of the input's bytes (0 to 1), in full otherwise.
        pub incremental_max_share: f64 = 0.5,
        /// Largest data file a build writes; smaller files let filters skip more of a
        /// clustered slice, at more files to list and open.
        pub target_file_size: Size = Size(100 * 1024 * 1024),
        /// Memory one refresh may use before it spills to disk or fails (alone).
        pub refresh_memory_limit: Size = Size(default_refresh_memory()),
        /// Slice versions kept for time travel and rollback; VACUUM deletes files that only
        /// older versions reference.
        pub retain_versions: usize = 10,
        /// VACUUM keeps files newer than this, and files of versions that were current this
        /// recently, so that running refreshes and readers of an old version never break.
        pub vacuum_grace: Span = Span(Duration::from_secs(3600)),
        /// VACUUM refuses a vacuum_grace under 10 minutes (off: allow it, for when nothing
        /// reads or refreshes the warehouse in any process, as delta-rs's
        /// enforce_retention_duration).
        pub vacuum_enforce_grace: Switch = Switch(true),
        /// How often a running refresh renews its record in the warehouse; one not renewed
        /// for 6 heartbeats counts as abandoned (its process died).
        pub heartbeat: Span = Span(Duration::from_secs(10)),
        /// Record which core tables and slices queries read, and which of their columns they
        /// filter, group and join on (system.usage, system.usage_columns): on or off.
        pub usage: Switch = Switch(true),
        /// How long recorded usage is kept.
        pub usage_retention: Span = Span(Duration::from_secs(30 * 86_400)),
        /// A REFRESH AUTO slice neither read nor created for this long (at most
        /// usage_retention, beyond which reads are forgotten) is dormant: the scheduler
        /// leaves it until its next read.
        pub cold_after: Span = Span(Duration::from_secs(7 * 86_400)),
        /// How far behind its inputs (its lag, as system.slices shows it) a slice this
        /// session reads may be, e.g. '5 minutes'; none: no limit.
        pub max_staleness: Staleness = Staleness(None),
        /// What reading a slice staler than max_staleness does: serve (it, with a notice),
        /// refresh (it first, then read) or fail.
        pub on_stale: OnStale = OnStale::Serve,
        /// A slice neither read, created nor needed by a slice reading it for this long (at
        /// most usage_retention) gets a proposal to freeze it (system.proposals).
        pub unread_after: Span = Span(Duration::from_secs(30 * 86_400)),
        /// The kinds of proposals (system.proposals) the scheduler applies without a
        /// statement: none, or a list of layout, schedule and freeze, e.g. 'layout,schedule'.
        pub auto_apply: AutoApply = AutoApply::default(),
    }
}

impl ConfigExtension for IcePieOptions {
    const PREFIX: &'static str = "icepie";
}

impl IcePieOptions {
    /// Refuses a value of `key` that parses but cannot work.
    fn check(&self, key: &str, value: &str) -> DFResult<()> {
        let zero = match key {
            "target_file_size" => self.target_file_size.0 == 0,
            "cold_after" => self.cold_after.0.is_zero(),
            "usage_retention" => self.usage_retention.0.is_zero(),
            "scheduler_tick" => self.scheduler_tick.0.is_zero(),
            "unread_after" => self.unread_after.0.is_zero(),
            "heartbeat" => self.heartbeat.0.is_zero(),
            _ => false,
        };
        if zero {
            return Err(DataFusionError::Configuration(format!(
                "invalid value '{value}' for icepie.{key}: it must be more than zero"
            )));
        }
        if key == "incremental_max_share" && !(0.0..=1.0).contains(&self.incremental_max_share) {
            return Err(DataFusionError::Configuration(format!(
                "invalid value '{value}' for icepie.{key}: it is a share of the input's bytes, \
                 from 0 (always refresh in full) to 1 (incremental whatever the new data's size)"
            )));
        }
        Ok(())
    }

    /// The wait before retry number `failures` (1 after the first failure): `retry_backoff`
    /// doubled per further failure, at most `max_retry_backoff`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.retry_backoff
            .0
            .saturating_mul(1 << doublings)
            .min(self.max_retry_backoff.0)
    }
}

/// A quarter of this machine's memory (of its cgroup's limit when lower), or 1 GiB when
/// neither can be read.
fn default_refresh_memory() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => t.min(c) / 4,
        (Some(t), None) | (None, Some(t)) => t / 4,
        (None, None) => 1 << 30,
    }
}

/// The field setters get no key (DataFusion strips it), so the message names the value.
fn config_error(value: &str, expected: &str) -> DataFusionError {
    DataFusionError::Configuration(format!("invalid value '{value}': expected {expected}"))
}

/// Implements [`ConfigField`] for a setting type with a `parse` function, so that `SET`
/// refuses a bad value with what was expected.
macro_rules! parsed_setting {
    ($ty:ident, $expected:literal) => {
        impl ConfigField for $ty {
            fn visit<V: Visit>(&self, v: &mut V, key: &str, description: &'static str) {
                v.some(key, self, description)
            }

            fn set(&mut self, _key: &str, value: &str) -> DFResult<()> {
                *self = $ty::parse(value).ok_or_else(|| config_error(value, $expected))?;
                Ok(())
            }
        }
    };
}

parsed_setting!(Switch, "on or off");
parsed_setting!(Size, "a size such as 512MB, 2GB or 1000000");
parsed_setting!(Span, "a duration such as '250ms', '30 seconds' or '1 hour'");
parsed_setting!(Staleness, "a duration such as '5 minutes', or none");
parsed_setting!(OnStale, "serve, refresh or fail");
parsed_setting!(
    AutoApply,
    "none, or a comma-separated list of layout, schedule and freeze"
);

/// A whole number and the unit after it (`512MB`, `'30 seconds'`), the unit in lower case.
fn number_and_unit(text: &str) -> Option<(u64, String)> {
    let t = text.trim().trim_matches('\'').trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    Some((n.parse().ok()?, unit.trim().to_ascii_lowercase()))
}

/// On or off, written `on`/`off`, `true`/`false`, `yes`/`no` or `1`/`0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch(pub bool);

impl Switch {
    /// Parses `on`, `off`, `true`, `false`, `yes`, `no`, `1` or `0` (any case).
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().trim_matches('\'').to_ascii_lowercase().as_str() {
            "on" | "true" | "yes" | "1" => Some(Switch(true)),
            "off" | "false" | "no" | "0" => Some(Switch(false)),
            _ => None,
        }
    }
}

impl fmt::Display for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0 { "on" } else { "off" })
    }
}

/// A number of bytes, written `512MB`, `2 GiB`, `64k` or `1000000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    /// Parses `512MB`, `2 GiB`, `64k`, `1000000` (units are powers of 1024).
    pub fn parse(text: &str) -> Option<Self> {
        let (n, unit) = number_and_unit(text)?;
        let shift = match unit.as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return None,
        };
        n.checked_mul(1 << shift).map(Size)
    }

    /// The size as a person reads it, rounded: `999 B`, `1.5 KB`, `3.0 GB` (powers of 1024).
    pub fn human(self) -> String {
        crate::text::human_bytes(self.0)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(40, "TB"), (30, "GB"), (20, "MB"), (10, "KB")];
        for (shift, unit) in units {
            let scale = 1u64 << shift;
            if self.0 >= scale && self.0.is_multiple_of(scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A duration, written `30 seconds`, `250ms`, `5 minutes`, `1 hour` or `1 day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl Span {
    /// Parses `250ms`, `30 seconds`, `5 min`, `1 hour`, `2 days` (`0 seconds` is allowed).
    pub fn parse(text: &str) -> Option<Self> {
        let (n, unit) = number_and_unit(text)?;
        let millis: u64 = match unit.as_str() {
            "ms" | "millisecond" | "milliseconds" => 1,
            "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
            "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
            "h" | "hour" | "hours" => 3_600_000,
            "d" | "day" | "days" => 86_400_000,
            _ => return None,
        };
        n.checked_mul(millis)
            .map(|ms| Span(Duration::from_millis(ms)))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let units = [
            (86_400_000, "days"),
            (3_600_000, "hours"),
            (60_000, "minutes"),
        ];
        for (scale, unit) in units {
            if ms >= scale && ms.is_multiple_of(scale) {
                return write!(f, "{} {unit}", ms / scale);
            }
        }
        if ms.is_multiple_of(1000) {
            write!(f, "{} seconds", ms / 1000)
        } else {
            write!(f, "{ms} ms")
        }
    }
}

/// A staleness limit: a duration, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staleness(pub Option<Duration>);

impl Staleness {
    /// Parses a duration as [`Span`] does, or `none` (also `off`) for no limit.
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim().trim_matches('\'').trim().to_ascii_lowercase();
        match t.as_str() {
            "none" | "off" => Some(Self(None)),
            _ => Span::parse(text).map(|s| Self(Some(s.0))),
        }
    }
}

impl fmt::Display for Staleness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => Span(d).fmt(f),
            None => f.write_str("none"),
        }
    }
}

/// What reading a slice staler than its reader allows does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStale {
    /// Serve the version there is, with a notice.
    Serve,
    /// Refresh the slice, then read the new version.
    Refresh,
    /// Fail, naming the slice, its lag and the limit.
    Fail,
}

impl OnStale {
    /// Parses `serve`, `refresh` or `fail`.
    pub fn parse(text: &str) -> Option<Self> {
        match text
            .trim()
            .trim_matches('\'')
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "serve" => Some(Self::Serve),
            "refresh" => Some(Self::Refresh),
            "fail" => Some(Self::Fail),
            _ => None,
        }
    }
}

impl fmt::Display for OnStale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Serve => "serve",
            Self::Refresh => "refresh",
            Self::Fail => "fail",
        })
    }
}

/// The kinds of proposals applied without a statement (`icepie.auto_apply`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoApply(pub std::collections::BTreeSet<String>);

impl AutoApply {
    /// The kinds that may be applied automatically.
    pub const KINDS: [&'static str; 3] = ["layout", "schedule", "freeze"];

    /// Parses `none` (or nothing) or a comma-separated list of [`AutoApply::KINDS`].
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_matches('\'').trim().to_ascii_lowercase();
        if text.is_empty() || text == "none" {
            return Some(Self::default());
        }
        let kinds = text
            .split(',')
            .map(|k| {
                let k = k.trim();
                Self::KINDS.contains(&k).then(|| k.to_string())
            })
            .collect::<Option<_>>()?;
        Some(Self(kinds))
    }

    /// True when proposals of `kind` are applied automatically.
    pub fn allows(&self, kind: &str) -> bool {
        self.0.contains(kind)
    }
}

impl fmt::Display for AutoApply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let kinds: Vec<&str> = self.0.iter().map(String::as_str).collect();
        f.write_str(&kinds.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(o: &mut IcePieOptions, key: &str, value: &str) -> DFResult<()> {
        ExtensionOptions::set(o, key, value)
    }

    #[test]
    fn sizes_and_spans_parse_and_print_back() {
        assert_eq!(Size::parse("512MB"), Some(Size(512 << 20)));
        assert_eq!(Size::parse("2 GiB"), Some(Size(2 << 30)));
        assert_eq!(Size::parse("1000"), Some(Size(1000)));
        assert_eq!(Size::parse("'64k'"), Some(Size(64 << 10)));
        for bad in ["", "MB", "1.5GB", "-1", "12 parsecs"] {
            assert_eq!(Size::parse(bad), None, "{bad}");
        }
        assert_eq!(Size(512 << 20).to_string(), "512MB");
        assert_eq!(Size(1000).to_string(), "1000B");

        assert_eq!(Span::parse("250ms"), Some(Span(Duration::from_millis(250))));
        assert_eq!(
            Span::parse("30 seconds"),
            Some(Span(Duration::from_secs(30)))
        );
        assert_eq!(Span::parse("1 hour"), Some(Span(Duration::from_secs(3600))));
        assert_eq!(Span::parse("0 seconds"), Some(Span(Duration::ZERO)));
        for bad in ["", "soon", "5 fortnights", "1.5 hours"] {
            assert_eq!(Span::parse(bad), None, "{bad}");
        }
        for s in ["250 ms", "30 seconds", "5 minutes", "2 hours", "3 days"] {
            let span = Span::parse(s).unwrap();
            assert_eq!(Span::parse(&span.to_string()), Some(span), "{s}");
        }
    }

    #[test]
    fn settings_are_set_by_name_and_bad_values_say_what_is_expected() {
        let mut o = IcePieOptions::default();
        set(&mut o, "max_concurrent_refreshes", "4").unwrap();
        set(&mut o, "refresh_memory_limit", "64MB").unwrap();
        set(&mut o, "vacuum_grace", "0 seconds").unwrap();
        set(&mut o, "scheduler", "off").unwrap();
        assert!(!o.scheduler.0);
        set(&mut o, "scheduler", "TRUE").unwrap();
        assert!(o.scheduler.0);
        assert!(set(&mut o, "scheduler", "maybe").is_err());
        set(&mut o, "scheduler", "false").unwrap();
        assert_eq!(o.max_concurrent_refreshes, 4);
        assert_eq!(o.refresh_memory_limit, Size(64 << 20));
        assert_eq!(o.vacuum_grace, Span(Duration::ZERO));
        assert!(!o.scheduler.0);
        let err = set(&mut o, "vacuum_grace", "a while")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'a while'") && err.contains("'30 seconds'"),
            "{err}"
        );
        // A value that parses but cannot work is refused, and the setting keeps its value.
        for (key, zero) in [("target_file_size", "0"), ("cold_after", "0 seconds")] {
            let err = set(&mut o, key, zero).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("more than zero"), "{err}");
        }
        assert_eq!(
            o.target_file_size,
            IcePieOptions::default().target_file_size
        );
        assert_eq!(o.cold_after, IcePieOptions::default().cold_after);
        set(&mut o, "auto_apply", "'Layout, schedule'").unwrap();
        assert!(o.auto_apply.allows("layout") && !o.auto_apply.allows("freeze"));
        assert_eq!(o.auto_apply.to_string(), "layout,schedule");
        assert!(set(&mut o, "auto_apply", "layout,everything").is_err());
        set(&mut o, "auto_apply", "none").unwrap();
        assert!(!o.auto_apply.allows("layout"));
        let unknown = set(&mut o, "no_such_setting", "1").unwrap_err().to_string();
        assert!(unknown.contains("icepie.retain_versions"), "{unknown}");
        let retain = o
            .entries()
            .into_iter()
            .find(|e| e.key == "icepie.retain_versions");
        assert_eq!(retain.unwrap().value.as_deref(), Some("10"));
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let mut o = IcePieOptions::default();
        set(&mut o, "retry_backoff", "10 seconds").unwrap();
        set(&mut o, "max_retry_backoff", "1 minute").unwrap();
        let secs: Vec<u64> = (1..=5).map(|k| o.backoff(k).as_secs()).collect();
        assert_eq!(secs, vec![10, 20, 40, 60, 60]);
    }
}
