//! A Flight SQL client's connection: the socket, its place among `--max-connections`, and
//! whether it has logged in (it is closed at `--auth-timeout` otherwise); what a call knows of
//! its connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic::{Request, Status};

/// A client's connection, its place among `--max-connections`, and whether it has logged in.
pub(super) struct Connection {
    pub(super) stream: tokio::net::TcpStream,
    pub(super) place: Place,
    /// Set by the first call that authenticates.
    pub(super) logged_in: Arc<AtomicBool>,
    /// When the connection is closed unless it has logged in; `None` once it has.
    pub(super) login_by: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Whether a connection holds one of the `--max-connections` places.
pub(super) enum Place {
    /// No limit.
    Unlimited,
    /// One of the places, given back when the connection closes.
    Taken(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
    /// Every place was taken when it connected: its calls are refused (with a gRPC status the
    /// client can show, which closing it would not give).
    Refused,
}

/// What a call knows of its connection.
#[derive(Clone, Debug)]
pub(super) struct ConnectionInfo {
    /// The connection holds no place.
    refused: bool,
    /// Set when a call on it authenticates.
    logged_in: Arc<AtomicBool>,
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            refused: matches!(self.place, Place::Refused),
            logged_in: self.logged_in.clone(),
        }
    }
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // The server always waits to read from an open connection, so this runs (and the
        // timer wakes it) even when the client sends nothing.
        let this = &mut *self;
        if let Some(login_by) = &mut this.login_by {
            if this.logged_in.load(Ordering::Acquire) {
                this.login_by = None;
            } else if login_by.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not authenticate in time (--auth-timeout)",
                )));
            }
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    // Forwarded, so that HTTP/2 writes a frame's header and payload in one call.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What `request` knows of its connection.
fn connection<T>(request: &Request<T>) -> Option<&ConnectionInfo> {
    let extensions = request.extensions();
    extensions.get::<ConnectionInfo>().or_else(|| {
        extensions
            .get::<tonic::transport::server::TlsConnectInfo<ConnectionInfo>>()
            .map(|tls| tls.get_ref())
    })
}

/// Records that `request`'s connection has logged in: it stays open past `--auth-timeout`.
pub(super) fn logged_in<T>(request: &Request<T>) {
    if let Some(info) = connection(request) {
        info.logged_in.store(true, Ordering::Release);
    }
}

/// Refuses a call on a connection that came beyond `--max-connections`.
pub(super) fn admitted<T>(request: &Request<T>) -> std::result::Result<(), Status> {
    match connection(request).is_some_and(|i| i.refused) {
        false => Ok(()),
        true => Err(Status::resource_exhausted(
            "sorry, too many clients already: this server takes a limited number of connections \
             at once (--max-connections); close another or try again later",
        )),
    }
}
