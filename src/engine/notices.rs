//! Statements' notices for the embedder ([`crate::notices`] keeps them per task).

use std::future::Future;

use super::IcePie;

impl IcePie {
    /// Runs `work` (statements of this warehouse, e.g. `w.sql(...)` and reading its result)
    /// and returns, with its output, the notices its statements gave, in order.
    pub async fn with_notices<F: Future>(work: F) -> (F::Output, Vec<String>) {
        crate::notices::collect(work).await
    }
}
