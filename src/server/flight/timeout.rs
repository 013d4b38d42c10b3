//! A statement's deadline, when the server has a statement timeout: when the statement must
//! end, and the timeout error that ends its work, or the stream of its rows, at that time.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tonic::metadata::MetadataValue;
use tonic::Status;

use super::{status, Flight};
use crate::error::IcePieError;

/// The end of a statement's time, when the server has a statement timeout.
pub(super) type Deadline = Option<(tokio::time::Instant, Duration)>;

impl Flight {
    /// When a statement starting now must end.
    pub(super) fn deadline(&self) -> Deadline {
        self.statement_timeout
            .map(|limit| (tokio::time::Instant::now() + limit, limit))
    }
}

/// Runs `work` until `deadline`.
pub(super) async fn within<T>(
    deadline: Deadline,
    work: impl Future<Output = std::result::Result<T, IcePieError>>,
) -> std::result::Result<T, Status> {
    match deadline {
        None => work.await,
        Some((at, limit)) => tokio::time::timeout_at(at, work)
            .await
            .map_err(|_| timed_out(limit))?,
    }
    .map_err(|e| status(&e))
}

/// Ends `stream` with a timeout error at `deadline`.
pub(super) fn with_deadline<S>(
    stream: S,
    deadline: Deadline,
) -> BoxStream<'static, std::result::Result<arrow_flight::FlightData, Status>>
where
    S: Stream<Item = std::result::Result<arrow_flight::FlightData, Status>> + Send + 'static,
{
    let Some((at, limit)) = deadline else {
        return stream.boxed();
    };
    let expired = Arc::new(AtomicBool::new(false));
    let flag = expired.clone();
    let deadline = async move {
        tokio::time::sleep_until(at).await;
        flag.store(true, Ordering::SeqCst);
    };
    stream
        .take_until(deadline)
        .chain(
            futures::stream::once(async move {
                expired
                    .load(Ordering::SeqCst)
                    .then(|| Err(timed_out(limit)))
            })
            .filter_map(futures::future::ready),
        )
        .boxed()
}

fn timed_out(limit: Duration) -> Status {
    let mut status = Status::deadline_exceeded(format!(
        "canceling statement due to statement timeout ({} s)",
        limit.as_secs_f64()
    ));
    status
        .metadata_mut()
        .insert("x-sqlstate", MetadataValue::from_static("57014"));
    status
}
