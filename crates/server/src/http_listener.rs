//! The HTTP listener: accepts client connections up to a cap, serves each with hyper under
//! per-connection deadlines, and keeps file descriptors in reserve for peers and storage.
//!
//! `axum::serve` has no connection cap and no timeouts, so a client with 20,000 idle sockets
//! could use up the open-file limit and stop the node from accepting anything. Here:
//! - at most `http.max_connections` connections are served; one beyond the cap is answered
//!   503 JSON and closed at once, so a flood costs an accept and a close, never a descriptor
//!   held;
//! - the cap is lowered at start to the soft open-file limit minus a reserve, and the soft
//!   limit is first raised to the hard limit;
//! - an accept error that means the process or system is out of resources (EMFILE, ENFILE,
//!   ENOBUFS) backs off exponentially instead of spinning;
//! - every connection's bytes pass through a [`GuardedStream`]: request heads are checked by
//!   [`RequestFramer`] (SPEC's JSON for the errors hyper would answer with an empty body) and
//!   must arrive within `header_timeout_ms`; a write the client does not read for
//!   `idle_timeout_ms` fails; hyper closes a connection idle that long between requests.
//!
//! # Shutdown
//! When the shutdown signal turns true the listener stops accepting, asks every connection to
//! finish its request under way and close, and waits (bounded) for them.

use crate::request_head::{Refusal, RequestFramer, Verdict};
use axum::Router;
use bytes::{Buf, BytesMut};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

/// File descriptors the HTTP cap leaves to everything else: peer links, storage segments and
/// journals, hint files, logs. At most half the limit when the limit is small.
pub const RESERVED_FILE_DESCRIPTORS: u64 = 1024;
/// How long shutdown waits for open connections to finish their requests.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// Back-off bounds after an accept error that means resources ran out.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Per-connection bounds (SPEC section 4, `[http]`).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// The metrics the listener keeps.
#[derive(Clone)]
pub struct ListenerMetrics {
    pub connections: Gauge,
    pub refused: Counter,
}

/// Raises the soft open-file limit to the hard limit, and returns the soft limit in force
/// (None where the platform has no such limit or it cannot be read).
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(error) => {
            tracing::warn!(%error, "cannot raise the open-file limit");
            rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
        }
    }
}

/// The connection cap in force: the configured one, lowered so that the HTTP listener can
/// never take the descriptors peers and storage need.
pub fn connection_cap(configured: usize, open_file_limit: Option<u64>) -> usize {
    let Some(limit) = open_file_limit else {
        return configured;
    };
    let reserve = RESERVED_FILE_DESCRIPTORS.min(limit / 2);
    let allowed = usize::try_from(limit - reserve).unwrap_or(usize::MAX);
    configured.min(allowed).max(1)
}

/// True for accept errors that mean the process or the system is out of a resource: retrying
/// at once would spin. Errors about one connection (reset or aborted before it was accepted)
/// are not among them.
fn is_resource_exhaustion(error: &io::Error) -> bool {
    !matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Serves `app` on `listener` until `shutdown` turns true (see the module doc).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    metrics: ListenerMetrics,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cap = limits.max_connections.min(Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(cap));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(error) if is_resource_exhaustion(&error) => {
                if backoff == ACCEPT_BACKOFF_MIN {
                    let listen = listener
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    tracing::warn!(%listen, %error, "HTTP accept failed; backing off");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
            Err(error) => {
                tracing::debug!(%error, "HTTP connection lost before it was accepted");
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if tls.is_some() {
                // A plain-text answer means nothing to a TLS client: just close.
                metrics.refused.inc();
                drop(stream);
            } else {
                refuse(stream, cap, &metrics);
            }
            continue;
        };
        tokio::spawn(serve_connection(
            stream,
            tls.clone(),
            app.clone(),
            limits,
            metrics.connections.clone(),
            slot,
            shutdown.clone(),
        ));
    }
    drop(listener);
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_DEADLINE, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after the drain deadline");
    }
}

/// Answers a connection beyond the cap and closes it. The socket is fresh, so its send buffer
/// takes the short answer without waiting; nothing is read, and the descriptor is freed now.
fn refuse(stream: TcpStream, cap: usize, metrics: &ListenerMetrics) {
    metrics.refused.inc();
    let _ = stream.try_write(&Refusal::TooManyConnections(cap).response_bytes());
    tracing::debug!(cap, "HTTP connection refused: at max_connections");
}

/// Keeps `mendkv_http_connections` equal to the connections being served.
struct CountedConnection {
    gauge: Gauge,
    _slot: OwnedSemaphorePermit,
}

impl Drop for CountedConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: HttpLimits,
    gauge: Gauge,
    slot: OwnedSemaphorePermit,
    mut shutdown: watch::Receiver<bool>,
) {
    gauge.inc();
    let _counted = CountedConnection { gauge, _slot: slot };
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = tls else {
        return serve_http(stream, app, limits, shutdown).await;
    };
    // The TLS handshake gets the head deadline: a client that never finishes it holds a
    // slot no longer than one that never sends a head. A plain-text client fails it here.
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)) => accepted,
        _ = shutdown.wait_for(|stop| *stop) => return,
    };
    match accepted {
        Ok(Ok(stream)) => serve_http(stream, app, limits, shutdown).await,
        Ok(Err(error)) => tracing::debug!(%error, "HTTP TLS handshake failed"),
        Err(_) => tracing::debug!("HTTP TLS handshake not finished within header_timeout_ms"),
    }
}

/// Serves HTTP/1 on a (plain or decrypted) byte stream; the request-head checks run on it.
async fn serve_http<S>(
    stream: S,
    app: Router,
    limits: HttpLimits,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = GuardedStream::new(stream, limits.header_timeout, limits.idle_timeout);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper's header timer runs from the end of one response to the end of the next head,
        // which is the idle time between requests; the stricter head deadline is the
        // GuardedStream's.
        .header_read_timeout(limits.idle_timeout)
        // A client that half-closes after its request still gets the answer (for a truncated
        // body, the 400 that says so), and a refused head ends the stream for hyper without
        // cutting off the answers to the requests before it.
        .half_close(true)
        .max_headers(crate::request_head::MAX_HEADERS);
    let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut connection = std::pin::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "HTTP connection ended with an error");
                }
                return;
            }
            _ = shutdown.wait_for(|stop| *stop), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// A client socket as hyper sees it: request heads checked and timed, stalled writes failed.
pub struct GuardedStream<S> {
    inner: S,
    framer: RequestFramer,
    /// Bytes read from the socket that hyper has not taken yet; the first `released` of them
    /// are checked.
    inbound: BytesMut,
    released: usize,
    /// The peer closed its side.
    end_of_input: bool,
    refusal: Option<Refusal>,
    /// The refusal's response and how much of it is written; sent when hyper closes.
    refusal_bytes: Option<(Vec<u8>, usize)>,
    header_timeout: Duration,
    /// Runs while a head is awaited: from the start of the connection, and from the first
    /// byte of each later head.
    head_deadline: Option<Pin<Box<Sleep>>>,
    idle_timeout: Duration,
    /// Runs while the client does not take what is written to it.
    write_deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> GuardedStream<S> {
    pub fn new(inner: S, header_timeout: Duration, idle_timeout: Duration) -> Self {
        GuardedStream {
            inner,
            framer: RequestFramer::default(),
            inbound: BytesMut::new(),
            released: 0,
            end_of_input: false,
            refusal: None,
            refusal_bytes: None,
            header_timeout,
            head_deadline: Some(Box::pin(tokio::time::sleep(header_timeout))),
            idle_timeout,
            write_deadline: None,
        }
    }

    /// Runs the framer over the unchecked bytes.
    fn check(&mut self) {
        loop {
            let unchecked = &self.inbound[self.released..];
            let was_awaiting_head = self.framer.awaiting_head();
            match self.framer.advance(unchecked) {
                Verdict::Release(n) => {
                    self.released += n;
                    if was_awaiting_head {
                        self.head_deadline = None;
                    }
                }
                Verdict::NeedMore => {
                    if self.framer.awaiting_head()
                        && !unchecked.is_empty()
                        && self.head_deadline.is_none()
                    {
                        let deadline = Instant::now() + self.header_timeout;
                        self.head_deadline = Some(Box::pin(tokio::time::sleep_until(deadline)));
                    }
                    return;
                }
                Verdict::Refuse(refusal) => {
                    self.refuse(refusal);
                    return;
                }
            }
        }
    }

    fn refuse(&mut self, refusal: Refusal) {
        tracing::debug!(?refusal, "HTTP request refused by the listener");
        self.refusal_bytes = Some((refusal.response_bytes(), 0));
        self.refusal = Some(refusal);
        self.head_deadline = None;
    }

    /// Fails a write the client has not taken for `idle_timeout`.
    fn write_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let idle_timeout = self.idle_timeout;
        let deadline = self
            .write_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle_timeout)));
        deadline.as_mut().poll(cx).is_ready()
    }
}

fn write_timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "client took nothing written to it within idle_timeout_ms",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.released > 0 {
                let n = this.released.min(buf.remaining());
                buf.put_slice(&this.inbound[..n]);
                this.inbound.advance(n);
                this.released -= n;
                return Poll::Ready(Ok(()));
            }
            // A refused head, or input that ended: hyper sees the end of the stream right
            // after the last checked byte.
            if this.refusal.is_some() || this.end_of_input {
                return Poll::Ready(Ok(()));
            }
            if let Some(deadline) = this.head_deadline.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    this.refuse(Refusal::HeadTimeout(this.header_timeout));
                    continue;
                }
            }
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.end_of_input = true;
                continue;
            }
            this.inbound.extend_from_slice(read.filled());
            this.check();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(result) => {
                this.write_deadline = None;
                Poll::Ready(result)
            }
            Poll::Pending if this.write_stalled(cx) => Poll::Ready(Err(write_timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                this.write_deadline = None;
                Poll::Ready(result)
            }
            Poll::Pending if this.write_stalled(cx) => Poll::Ready(Err(write_timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    /// hyper closes the connection once it has answered every request before a refused head;
    /// the refusal's own answer goes out first.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while let Some((bytes, written)) = this.refusal_bytes.as_mut() {
            if *written == bytes.len() {
                this.refusal_bytes = None;
                break;
            }
            match Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    *written += n;
                    this.write_deadline = None;
                }
                // The client is gone or takes nothing: close without the answer.
                Poll::Ready(_) => this.refusal_bytes = None,
                Poll::Pending if this.write_stalled(cx) => this.refusal_bytes = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The cap never exceeds the open-file limit minus the reserve, and never reaches zero.
    #[test]
    fn cap_keeps_descriptors_in_reserve() {
        assert_eq!(connection_cap(4096, None), 4096);
        assert_eq!(connection_cap(4096, Some(1 << 20)), 4096);
        assert_eq!(connection_cap(4096, Some(20_000)), 4096);
        assert_eq!(connection_cap(50_000, Some(20_000)), 20_000 - 1024);
        assert_eq!(connection_cap(4096, Some(1024)), 512);
        assert_eq!(connection_cap(4096, Some(1)), 1);
    }

    /// Out-of-resource accept errors back off; errors about one lost connection do not.
    #[test]
    fn accept_errors_are_classified() {
        let emfile = io::Error::from_raw_os_error(24);
        assert!(is_resource_exhaustion(&emfile));
        assert!(!is_resource_exhaustion(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
    }

    /// Pipelined requests reach the reader intact; a bad head after them ends the stream for
    /// the reader, and its JSON answer is written when the writer shuts down.
    #[tokio::test]
    async fn a_refused_head_is_answered_on_shutdown() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut guarded =
            GuardedStream::new(server, Duration::from_secs(5), Duration::from_secs(5));
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let good = b"GET /a HTTP/1.1\r\n\r\nPUT /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nok";
        client_write.write_all(good).await.unwrap();
        client_write.write_all(b"NOT HTTP\r\n\r\n").await.unwrap();
        let mut seen = Vec::new();
        guarded.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, good);
        guarded.write_all(b"earlier answers").await.unwrap();
        guarded.shutdown().await.unwrap();
        drop(guarded);
        let mut answer = String::new();
        client_read.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("earlier answersHTTP/1.1 400 "),
            "{answer}"
        );
        assert!(answer.contains("\"error\":\"bad_request\""), "{answer}");
    }

    /// A head that is still incomplete at the header deadline is refused with 408.
    #[tokio::test(start_paused = true)]
    async fn a_slow_head_is_refused_at_the_deadline() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut guarded =
            GuardedStream::new(server, Duration::from_millis(300), Duration::from_secs(60));
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(b"GET /hea").await.unwrap();
        let mut seen = Vec::new();
        guarded.read_to_end(&mut seen).await.unwrap();
        assert!(seen.is_empty());
        assert!(matches!(guarded.refusal, Some(Refusal::HeadTimeout(_))));
        guarded.shutdown().await.unwrap();
        drop(guarded);
        let mut answer = String::new();
        client_read.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    }

    /// A write the client never takes fails after the idle timeout instead of waiting forever.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_fails() {
        let (_client, server) = tokio::io::duplex(16);
        let mut guarded =
            GuardedStream::new(server, Duration::from_secs(5), Duration::from_millis(500));
        let error = guarded.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
