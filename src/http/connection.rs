//! Webhook connections: accepting them, serving them, and ending them
//! without failing a request.
//!
//! At shutdown a connection is never cut while a client may be using it:
//! - with a successor taking over (see [`crate::handover`]), a connection
//!   between two requests, or before its first, is handed over as it is,
//!   unread bytes included; one in the middle of a request is answered with
//!   `Connection: close` first;
//! - without one, the next request on a connection is answered with
//!   `Connection: close`, and a connection that stays idle for
//!   [`IDLE_DRAIN`] is closed (hyper closes one that never sent a byte
//!   too; `tests/handover.rs` checks it).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderValue, header};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Door;
use crate::config::Config;
use crate::gate;
use crate::handover::{HandedConnection, Successor};

/// Without a successor, how long an idle keep-alive connection is kept at
/// shutdown for one more request (answered with `Connection: close`).
const IDLE_DRAIN: Duration = Duration::from_millis(500);

/// Connections accepted beyond `http.max_connections`, so that `/healthz`
/// and `/readyz` never queue behind webhooks: on such a connection a probe
/// is answered at once, and a webhook waits for a regular slot.
const PROBE_SLOTS: usize = 64;
/// How long a connection taken beyond the limit has to send its headers.
const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts connections (and those a predecessor hands over) until
/// `shutdown`, then ends each as the module says, within `shutdown_grace`;
/// `connections` tracks the open ones (the metrics read it).
pub async fn serve(
    listener: TcpListener,
    door: Door,
    config: Arc<Config>,
    shutdown: CancellationToken,
    mut handed: Option<mpsc::UnboundedReceiver<HandedConnection>>,
    successor: Arc<Successor>,
    connections: TaskTracker,
) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(config.http.header_read_timeout);
    let mut overflow_builder = builder.clone();
    overflow_builder.header_read_timeout(config.http.header_read_timeout.min(PROBE_HEADER_TIMEOUT));
    let slots = Arc::new(tokio::sync::Semaphore::new(config.http.max_connections));
    let overflow = Arc::new(tokio::sync::Semaphore::new(PROBE_SLOTS));
    loop {
        // A regular slot if there is one, else one beyond the limit.
        let (slot, beyond) = tokio::select! {
            biased;
            slot = gate::slot(&slots, &shutdown) => (slot, false),
            slot = gate::slot(&overflow, &shutdown) => (slot, true),
        };
        let Some(slot) = slot else { break };
        let (stream, prefix) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => (stream, Bytes::new()),
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(connection) = recv(&mut handed) => match adopt(connection) {
                Ok(adopted) => adopted,
                Err(e) => {
                    tracing::warn!(error = %e, "a handed-over connection could not be used");
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(peer) = stream.peer_addr() else { continue };
        // Answers are small and must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let connection = match beyond {
            false => Connection::new(stream, prefix, peer, &builder, door.clone(), None),
            true => Connection::new(stream, prefix, peer, &overflow_builder, door.clone(), Some(slots.clone())),
        };
        let (shutdown, successor) = (shutdown.clone(), successor.clone());
        connections.spawn(async move {
            connection.run(shutdown, successor).await;
            drop(slot);
        });
    }
    drop(listener);
    connections.close();
    let grace = config.shutdown_grace;
    if tokio::time::timeout(grace, connections.wait()).await.is_err() {
        tracing::warn!(?grace, "webhook connections still open after the grace period");
    }
}

async fn recv(handed: &mut Option<mpsc::UnboundedReceiver<HandedConnection>>) -> Option<HandedConnection> {
    match handed {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

fn adopt(connection: HandedConnection) -> io::Result<(TcpStream, Bytes)> {
    connection.stream.set_nonblocking(true)?;
    Ok((TcpStream::from_std(connection.stream)?, connection.prefix))
}

type Service = Box<
    dyn hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<http_body_util::Full<Bytes>>,
            Error = Infallible,
            Future = Pin<
                Box<dyn Future<Output = Result<http::Response<http_body_util::Full<Bytes>>, Infallible>> + Send>,
            >,
        > + Send
        + Sync,
>;

/// One webhook connection and what is known about it.
struct Connection {
    http: http1::Connection<TokioIo<Tracked>, Service>,
    counts: Arc<Counts>,
    /// Set at shutdown: answers carry `Connection: close`.
    closing: Arc<AtomicBool>,
    peer: SocketAddr,
}

impl Connection {
    /// `borrow`: for a connection beyond the limit, the regular slots a
    /// webhook on it must wait for (probes need none).
    fn new(
        stream: TcpStream,
        prefix: Bytes,
        peer: SocketAddr,
        builder: &http1::Builder,
        door: Door,
        borrow: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Self {
        let counts = Arc::new(Counts::default());
        let closing = Arc::new(AtomicBool::new(false));
        let tracked = Tracked { stream, prefix, counts: counts.clone() };
        let service: Service = {
            let closing = closing.clone();
            Box::new(service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (door, closing, borrow) = (door.clone(), closing.clone(), borrow.clone());
                Box::pin(async move {
                    let probe = matches!(req.uri().path(), "/healthz" | "/readyz");
                    let _slot = match borrow {
                        Some(slots) if !probe => match door.wait_for_slot(slots).await {
                            Some(slot) => Some(slot),
                            None => return Ok(super::busy_response()),
                        },
                        _ => None,
                    };
                    let mut response = door.handle(req, peer).await;
                    if closing.load(Ordering::SeqCst) {
                        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(response)
                }) as Pin<Box<dyn Future<Output = _> + Send>>
            }))
        };
        Self { http: builder.serve_connection(TokioIo::new(tracked), service), counts, closing, peer }
    }

    async fn run(mut self, shutdown: CancellationToken, successor: Arc<Successor>) {
        tokio::select! {
            result = self.until_done() => return self.close(result).await,
            () = shutdown.cancelled() => {}
        }
        if successor.is_taking() {
            self.hand_over(&successor).await;
        } else {
            self.drain().await;
        }
    }

    /// Polls the connection until it is done, without closing it.
    async fn until_done(&mut self) -> hyper::Result<()> {
        std::future::poll_fn(|cx| self.http.poll_without_shutdown(cx)).await
    }

    /// Shutdown with a successor: hand the connection over unless it was
    /// answering a request (then that answer said `Connection: close`).
    async fn hand_over(mut self, successor: &Successor) {
        if self.counts.read.load(Ordering::SeqCst) == 0 {
            // Nothing read yet: whatever the client sends goes to the successor.
            return self.give(successor).await;
        }
        let written = self.counts.written.load(Ordering::SeqCst);
        Pin::new(&mut self.http).graceful_shutdown();
        let result = self.until_done().await;
        if result.is_ok() && self.counts.written.load(Ordering::SeqCst) == written {
            // It was between two requests: nothing was said to the client.
            self.give(successor).await;
        } else {
            self.close(result).await;
        }
    }

    async fn give(self, successor: &Successor) {
        let parts = self.http.into_parts();
        let tracked = parts.io.into_inner();
        let mut prefix = tracked.prefix;
        if !parts.read_buf.is_empty() {
            prefix = [&prefix[..], &parts.read_buf[..]].concat().into();
        }
        let stream = match tracked.stream.into_std() {
            Ok(stream) => stream,
            Err(e) => return tracing::warn!(error = %e, "cannot hand a connection over"),
        };
        if let Err(HandedConnection { stream, .. }) = successor.hand(HandedConnection { stream, prefix }) {
            // The successor is gone: close as without one.
            if let Ok(stream) = TcpStream::from_std(stream) {
                let _ = shut(stream).await;
            }
        }
    }

    /// Shutdown without a successor: the next request is answered with
    /// `Connection: close`; a connection idle that long is closed.
    async fn drain(mut self) {
        self.closing.store(true, Ordering::SeqCst);
        let result = match tokio::time::timeout(IDLE_DRAIN, self.until_done()).await {
            Ok(result) => result,
            Err(_) => {
                Pin::new(&mut self.http).graceful_shutdown();
                self.until_done().await
            }
        };
        self.close(result).await;
    }

    async fn close(self, result: hyper::Result<()>) {
        if let Err(e) = result {
            tracing::debug!(error = %e, peer = %self.peer, "connection ended with an error");
        }
        let _ = shut(self.http.into_parts().io.into_inner().stream).await;
    }
}

/// How long a closing connection keeps reading what the client still sends.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much of it at most.
const LINGER_BYTES: usize = 64 << 20;

/// Closes a connection so the client reads its answer (a lingering close,
/// as nginx does): closing a socket with unread data makes the kernel send
/// a reset, which can destroy the answer before the client read it, e.g. a
/// 413 sent while the client was still sending its body. So: say we are
/// done (FIN), then read and discard what still comes, bounded in time and
/// bytes, and only then close.
async fn shut(mut stream: TcpStream) -> io::Result<()> {
    stream.shutdown().await?;
    let mut discard = vec![0u8; 64 * 1024];
    let mut drained = 0;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while drained < LINGER_BYTES {
            match stream.read(&mut discard).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    Ok(())
}

/// Bytes read from and written to a connection.
#[derive(Default)]
struct Counts {
    read: AtomicU64,
    written: AtomicU64,
}

/// A connection's stream, counting bytes; reads `prefix` first (bytes a
/// predecessor had read but not answered).
struct Tracked {
    stream: TcpStream,
    prefix: Bytes,
    counts: Arc<Counts>,
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            self.counts.read.fetch_add(n as u64, Ordering::SeqCst);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counts.read.fetch_add(n as u64, Ordering::SeqCst);
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.counts.written.fetch_add(*n as u64, Ordering::SeqCst);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            self.counts.written.fetch_add(*n as u64, Ordering::SeqCst);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
