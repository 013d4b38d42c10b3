//! Notices: what a statement tells its caller besides its result, such as a slice served
//! staler than the reader allows (`icepie.on_stale = 'serve'`).
//!
//! A caller that shows notices runs the statement inside
//! [`IcePie::with_notices`](crate::IcePie::with_notices) (the REPL prints them, the PostgreSQL
//! server sends them as NoticeResponse); notices of a statement run without it are dropped.
//! They are kept per task, so concurrent statements never see each other's.

use std::future::Future;
use std::sync::{Arc, Mutex};

tokio::task_local! {
    static NOTICES: Arc<Mutex<Vec<String>>>;
}

/// Tells the statement running in this task's caller `text`, if it listens.
pub(crate) fn notice(text: String) {
    let _ = NOTICES.try_with(|n| {
        if let Ok(mut n) = n.lock() {
            n.push(text);
        }
    });
}

/// Runs `work`, and returns with its output the notices given while it ran, in order.
pub(crate) async fn collect<F: Future>(work: F) -> (F::Output, Vec<String>) {
    let notices = Arc::<Mutex<Vec<String>>>::default();
    let out = NOTICES.scope(notices.clone(), work).await;
    let notices = std::mem::take(&mut *notices.lock().unwrap_or_else(|e| e.into_inner()));
    (out, notices)
}
