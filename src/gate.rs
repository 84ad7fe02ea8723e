//! The gRPC listener's accept loop: a connection limit, and a deadline for
//! a new connection's first bytes.
//!
//! hyper's HTTP/2 server waits for the client's preface without a deadline,
//! and a graceful shutdown waits for such a connection too: one silent TCP
//! connection held a whole shutdown grace period. Here a connection reaches
//! tonic only once its first bytes are there (the whole 24-byte HTTP/2
//! preface in plaintext, the first byte of a TLS hello); until then it is
//! ours, closed after `grpc.preface_timeout_ms` or at once on shutdown, and
//! it counts against `grpc.max_connections` like any other.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::config::GrpcConfig;

/// The client preface every HTTP/2 connection starts with (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How often a connection that sent part of its first bytes is looked at again.
const PARTIAL_PREFACE_POLL: Duration = Duration::from_millis(5);

/// A gRPC connection that sent its first bytes; holds its connection slot.
pub struct GrpcConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

/// Accepts gRPC connections until `shutdown` and yields those that sent
/// their first bytes in time.
pub fn gate(
    listener: TcpListener,
    config: &GrpcConfig,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<GrpcConnection>> {
    let (ready, incoming) = mpsc::channel(64);
    let first_bytes = if config.tls.is_some() { 1 } else { PREFACE.len() };
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let timeout = config.preface_timeout;
    tokio::spawn(async move {
        loop {
            let Some(slot) = slot(&slots, &shutdown).await else { break };
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            let (ready, shutdown) = (ready.clone(), shutdown.clone());
            tokio::spawn(async move {
                let arrived = tokio::select! {
                    arrived = tokio::time::timeout(timeout, first_bytes_of(&stream, first_bytes)) => {
                        matches!(arrived, Ok(Ok(())))
                    }
                    () = shutdown.cancelled() => false,
                };
                if arrived {
                    let connection = GrpcConnection { stream, _slot: slot };
                    tokio::select! {
                        _ = ready.send(Ok(connection)) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

/// A connection slot once one is free (at the limit, accepting waits);
/// `None` once shutdown starts.
pub(crate) async fn slot(slots: &Arc<Semaphore>, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        slot = slots.clone().acquire_owned() => slot.ok(),
        () = shutdown.cancelled() => None,
    }
}

/// Waits until `wanted` bytes can be read (without reading them).
async fn first_bytes_of(stream: &TcpStream, wanted: usize) -> io::Result<()> {
    let mut buffer = [0u8; PREFACE.len()];
    loop {
        stream.readable().await?;
        match stream.peek(&mut buffer[..wanted]).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n >= wanted => return Ok(()),
            // Part of it: readiness stays set, so look again a little later.
            _ => tokio::time::sleep(PARTIAL_PREFACE_POLL).await,
        }
    }
}

// === impl GrpcConnection ===

impl Connected for GrpcConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for GrpcConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
