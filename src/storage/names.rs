//! Names of core tables, slices and domains.
//!
//! Every name is checked here before it is turned into a storage path, so that no user input can
//! address a location outside the warehouse: a valid name is `^[a-z][a-z0-9_]{0,62}$` and not one
//! of the reserved schema names.
//!
//! # Invariants
//!
//! - A bad name is refused with an error naming it and the rule, before any path is made of it
//!   (invariant 7; `tests::refuses_path_like_and_odd_names`,
//!   `tests::slice_names_default_their_domain_and_refuse_reserved_ones`).

use std::fmt;

use crate::error::{IcePieError, Result};

/// The domain of slices whose name has no domain.
pub(crate) const DEFAULT_DOMAIN: &str = "slices";
/// The schema of the frozen core.
pub(crate) const CORE_SCHEMA: &str = "core";
/// The schema of the system tables.
pub(crate) const SYSTEM_SCHEMA: &str = "system";

/// Names that cannot be domains because a schema of that name already means something else.
const RESERVED_DOMAINS: &[&str] = &[
    CORE_SCHEMA,
    SYSTEM_SCHEMA,
    "information_schema",
    "pg_catalog",
    "icepie",
    "public",
];

/// Checks one name part against `^[a-z][a-z0-9_]{0,62}$`.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("a name cannot be empty")
    } else if name.len() > 63 {
        Some("a name has at most 63 characters")
    } else if !name.as_bytes()[0].is_ascii_lowercase() {
        Some("a name starts with a lowercase letter a-z")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Some("a name has only lowercase letters, digits and '_'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(IcePieError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

/// Checks a domain name: a valid name that is not a reserved schema.
pub(crate) fn validate_domain(domain: &str) -> Result<()> {
    validate_name(domain)?;
    if RESERVED_DOMAINS.contains(&domain) {
        return Err(IcePieError::InvalidName {
            name: domain.to_string(),
            reason: format!(
                "'{domain}' is a reserved schema and cannot be a slice domain; choose another"
            ),
        });
    }
    Ok(())
}

/// A slice name with its domain, e.g. `finance.revenue`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SliceName {
    /// The domain (SQL schema).
    pub domain: String,
    /// The slice's name within the domain.
    pub name: String,
}

impl SliceName {
    /// A validated slice name.
    pub fn new(domain: impl Into<String>, name: impl Into<String>) -> Result<Self> {
        let (domain, name) = (domain.into(), name.into());
        validate_domain(&domain)?;
        validate_name(&name)?;
        Ok(Self { domain, name })
    }

    /// Parses `name` or `domain.name`; the domain defaults to `slices`.
    pub fn parse(text: &str) -> Result<Self> {
        match text.split_once('.') {
            Some((domain, name)) => Self::new(domain, name),
            None => Self::new(DEFAULT_DOMAIN, text),
        }
    }
}

impl fmt::Display for SliceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.domain, self.name)
    }
}

/// The core table named by the parts of a SQL name: `name` or `core.name`.
pub(crate) fn core_name(parts: &[String]) -> Result<String> {
    let refuse = |reason: String| IcePieError::InvalidName {
        name: parts.join("."),
        reason,
    };
    match parts {
        [name] => validate_name(name).map(|_| name.clone()),
        [schema, name] if schema == CORE_SCHEMA => validate_name(name).map(|_| name.clone()),
        [schema, _] => Err(refuse(format!(
            "core tables live in schema 'core', not '{schema}'"
        ))),
        _ => Err(refuse("a core table name is `name` or `core.name`".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["a", "orders", "a1_b2", &"x".repeat(63)] {
            validate_name(ok).unwrap();
        }
    }

    #[test]
    fn refuses_path_like_and_odd_names() {
        for bad in [
            "",
            "../x",
            "a/b",
            "A",
            "1a",
            "_x",
            "a b",
            "a.b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn slice_names_default_their_domain_and_refuse_reserved_ones() {
        assert_eq!(SliceName::parse("x").unwrap().to_string(), "slices.x");
        assert_eq!(SliceName::parse("finance.rev").unwrap().domain, "finance");
        assert!(SliceName::parse("core.x").is_err());
        assert!(SliceName::parse("system.x").is_err());
        assert!(SliceName::parse("a.b.c").is_err());
    }

    #[test]
    fn core_names_accept_only_the_core_schema() {
        let parts = |s: &str| s.split('.').map(String::from).collect::<Vec<_>>();
        assert_eq!(core_name(&parts("core.events")).unwrap(), "events");
        assert_eq!(core_name(&parts("events")).unwrap(), "events");
        assert!(core_name(&parts("finance.events")).is_err());
        assert!(core_name(&parts("core.a.b")).is_err());
        assert!(core_name(&["../x".to_string()]).is_err());
    }
}
