//! icepie's Rust integration tests: one test binary, one module per feature.

mod cli;
mod core_tables;
mod failures;
mod isolation;
mod lifetime;
mod persistence;
mod repl;
mod retention;
mod scheduler;
mod support;
