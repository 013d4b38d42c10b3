//! icepie's Rust integration tests: one test binary, one module per feature.

mod budgets;
mod cards;
mod cli;
mod clients;
mod clustering;
mod core_tables;
mod crash;
mod differential;
mod failures;
mod faults;
mod flight;
mod freshness;
mod identity;
mod incremental;
mod isolation;
mod layers;
mod lifetime;
mod parser_fuzz;
mod persistence;
mod pg;
mod proposals;
mod races;
mod repl;
mod retention;
#[cfg(feature = "s3")]
mod s3;
mod scheduler;
mod support;
mod tools;
mod usage;
mod zero_copy;
