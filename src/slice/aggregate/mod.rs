//! Incremental aggregates: a `GROUP BY` slice keeps, beside each group's values, the
//! aggregates' intermediate states (DataFusion's own: a sum and a count for `avg`, a sketch for
//! `approx_distinct`), so that a refresh merges the states of the new data into them instead
//! of reading all of the input again.
//!
//! A slice whose definition is `SELECT … FROM (filters, projections, UNION ALL, inner joins)
//! GROUP BY keys` is built as
//!
//! ```text
//! definition's projections ( final(state) per group )
//!   └ GROUP BY key columns: final(state), merge(state)
//!       └ UNION ALL ( the slice's stored keys and states,            -- incremental only
//!                     GROUP BY keys: partial(args) over the new data ) -- all of the input when full
//! ```
//!
//! where `partial`, `merge` and `final` wrap each aggregate's own accumulator
//! ([`StateUdaf`](state::StateUdaf)): `partial` updates it with rows and outputs its state,
//! `merge` merges states and outputs the state, `final` merges states and outputs the value.
//! The keys and states are stored in hidden columns (`__icepie_key_<i>`, `__icepie_state_<i>`)
//! that the slice's table provider does not show. Every aggregate whose accumulator merges its
//! states is supported; DISTINCT and ordered aggregates, and those whose state is every value
//! (median, percentiles, array_agg, string_agg), are refreshed in full.
//!
//! # Invariants
//!
//! - Merging stored states with the new rows' gives what aggregating all rows gives
//!   (invariant 9; `incremental::incremental_equals_full_over_random_appends`, shapes
//!   `grouped`, `joined_totals`, `self_totals`, `overall`).
//! - States are merged only into stored states of the same fields, names and order
//!   ([`holds_states`]); anything else is a full refresh.
//! - The hidden columns never show in a slice's schema, however it is read
//!   (`incremental::hidden_state_stays_hidden_when_delta_rs_reads_the_slice`).

mod rewrite;
mod shape;
mod state;

pub(crate) use shape::{holds_states, shape, split, Shape};
pub(crate) use state::ORDER_DEPENDENT;

pub(crate) use crate::table::HIDDEN;

pub(crate) fn key_column(i: usize) -> String {
    format!("{HIDDEN}key_{i}")
}

fn state_column(i: usize) -> String {
    format!("{HIDDEN}state_{i}")
}
