//! Listening sockets that outlive a process, so restarts and deploys refuse
//! nothing: taken over from a running ordertrail on the same data dir
//! (hand-over), inherited from systemd (socket activation), or bound anew.
//!
//! Hand-over, as haproxy `-x` and nginx's binary upgrade do it: a serving
//! process offers its listening sockets on a Unix socket in its data dir
//! ([`SOCKET_NAME`]). A process started with the same config connects
//! there and receives them (`SCM_RIGHTS`): the listening sockets never
//! close, so a connection is never refused, only queued. The old process
//! then stops accepting, answers what it has, closes its idle keep-alive
//! connections, closes its store and says so ([`RELEASED`]). The new one
//! accepts at once and holds the requests it accepts until the store is its
//! own (bounded by `handover_timeout_ms`).

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The Unix socket in the data dir where a serving process offers its
/// listening sockets.
pub const SOCKET_NAME: &str = "ordertrail.sock";

/// Sent by the old process once its store is closed.
const RELEASED: u8 = b'R';

/// How long a new process waits for the old one to send its sockets.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a listening socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Http,
    Grpc,
    Admin,
}

impl Role {
    const ALL: [Role; 3] = [Role::Http, Role::Grpc, Role::Admin];

    fn byte(self) -> u8 {
        match self {
            Role::Http => b'h',
            Role::Grpc => b'g',
            Role::Admin => b'a',
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.byte() == byte)
    }

    /// The name systemd gives it with `FileDescriptorName=`.
    fn name(self) -> &'static str {
        match self {
            Role::Http => "http",
            Role::Grpc => "grpc",
            Role::Admin => "admin",
        }
    }

    fn addr(self, config: &Config) -> SocketAddr {
        match self {
            Role::Http => config.http.addr,
            Role::Grpc => config.grpc.addr,
            Role::Admin => config.admin.addr,
        }
    }
}

/// Listening sockets that were not bound by this process.
#[derive(Default)]
pub struct Inherited {
    sockets: Vec<(Role, StdListener)>,
}

impl Inherited {
    /// The sockets systemd passed (`LISTEN_FDS`), named by `LISTEN_FDNAMES`
    /// (`http`, `grpc`, `admin`) or else taken in that order. Must run
    /// before any other thread starts: it clears those variables.
    pub fn from_systemd() -> std::io::Result<Self> {
        let names = std::env::var("LISTEN_FDNAMES").ok();
        let mut fds = listenfd::ListenFd::from_env();
        let mut sockets = Vec::new();
        for index in 0..fds.len() {
            let role = match &names {
                Some(names) => names.split(':').nth(index).and_then(|n| Role::ALL.into_iter().find(|r| r.name() == n)),
                None => Role::ALL.get(index).copied(),
            };
            if let (Some(role), Some(listener)) = (role, fds.take_tcp_listener(index)?) {
                sockets.push((role, listener));
            }
        }
        Ok(Self { sockets })
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The inherited socket for `role`, if any and if it listens where the
    /// config says (`check_addr`), else a newly bound one.
    async fn listener(&mut self, role: Role, config: &Config, check_addr: bool) -> std::io::Result<TcpListener> {
        let addr = role.addr(config);
        let found = self.sockets.iter().position(|(r, listener)| {
            *r == role && (!check_addr || listener.local_addr().is_ok_and(|local| same_place(local, addr)))
        });
        match found {
            Some(index) => {
                let (_, listener) = self.sockets.swap_remove(index);
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)
            }
            None => TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))),
        }
    }
}

/// Whether a socket listening on `local` is where the config says: port 0
/// (any port) matches the port the predecessor was given.
fn same_place(local: SocketAddr, configured: SocketAddr) -> bool {
    local == configured || (configured.port() == 0 && local.ip() == configured.ip())
}

/// The three listening sockets and, after a hand-over, the process that
/// still holds the store.
pub struct Acquired {
    pub http: TcpListener,
    pub grpc: TcpListener,
    pub admin: TcpListener,
    pub predecessor: Option<Predecessor>,
}

/// Gets the listening sockets: systemd's if it passed any, else those of an
/// ordertrail serving the same data dir (which then hands over), else
/// newly bound ones.
pub async fn acquire(config: &Config, mut inherited: Inherited) -> std::io::Result<Acquired> {
    let mut predecessor = None;
    let from_systemd = !inherited.is_empty();
    if !from_systemd {
        let path = socket_path(&config.store.data_dir);
        if let Some((running, sockets)) = tokio::task::spawn_blocking(move || request(&path)).await?? {
            tracing::info!("taking over from the running ordertrail");
            inherited = sockets;
            predecessor = Some(running);
        }
    }
    let check_addr = !from_systemd;
    Ok(Acquired {
        http: inherited.listener(Role::Http, config, check_addr).await?,
        grpc: inherited.listener(Role::Grpc, config, check_addr).await?,
        admin: inherited.listener(Role::Admin, config, check_addr).await?,
        predecessor,
    })
}

/// Where a process serving `data_dir` offers its sockets.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Asks the process serving at `path` for its listening sockets; `None`
/// when no process serves there.
fn request(path: &Path) -> std::io::Result<Option<(Predecessor, Inherited)>> {
    let stream = match StdUnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut roles = [0u8; Role::ALL.len()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(Role::ALL.len()))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received =
        rustix::net::recvmsg(&stream, &mut [IoSliceMut::new(&mut roles)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received_fds) = message {
            fds.extend(received_fds);
        }
    }
    if received.bytes == 0 || fds.len() != received.bytes {
        // The old process went away meanwhile (or is not ordertrail).
        return Ok(None);
    }
    let sockets = roles[..received.bytes]
        .iter()
        .zip(fds)
        .filter_map(|(byte, fd)| Some((Role::from_byte(*byte)?, StdListener::from(fd))))
        .collect();
    stream.set_read_timeout(None)?;
    Ok(Some((Predecessor { stream }, Inherited { sockets })))
}

/// A connection the old process handed over: between two requests, or
/// before its first; `prefix` holds bytes it had read but not answered.
pub struct HandedConnection {
    pub stream: std::net::TcpStream,
    pub prefix: bytes::Bytes,
}

/// What a handed-over message is.
const CONNECTION: u8 = b'c';

/// The process handing over; it holds the store until it says
/// [`RELEASED`], and hands over its idle connections before that.
pub struct Predecessor {
    stream: StdUnixStream,
}

impl Predecessor {
    /// Follows the old process: the connections it hands over, and the
    /// moment it has closed its store (or is gone), at most `timeout` from
    /// now.
    pub fn follow(
        self,
        timeout: Duration,
    ) -> (mpsc::UnboundedReceiver<HandedConnection>, oneshot::Receiver<std::io::Result<()>>) {
        let (handed, connections) = mpsc::unbounded_channel();
        let (released, on_release) = oneshot::channel();
        let stream = self.stream;
        std::thread::spawn(move || {
            let result = stream.set_read_timeout(Some(timeout)).and_then(|()| receive(&stream, &handed));
            let _ = released.send(result.map_err(|e| {
                std::io::Error::new(e.kind(), format!("the running ordertrail did not release the store: {e}"))
            }));
        });
        (connections, on_release)
    }
}

/// Receives handed-over connections until [`RELEASED`] or the end of the
/// stream (a process that died holds no lock either).
fn receive(stream: &StdUnixStream, handed: &mpsc::UnboundedSender<HandedConnection>) -> std::io::Result<()> {
    loop {
        let mut header = [0u8; 5];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received =
            rustix::net::recvmsg(stream, &mut [IoSliceMut::new(&mut header)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
        let mut fd: Option<OwnedFd> = None;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(mut fds) = message {
                fd = fds.next();
            }
        }
        match (received.bytes, header[0]) {
            (0, _) | (_, RELEASED) => return Ok(()),
            (n, CONNECTION) => {
                let mut stream_ref = stream;
                if n < header.len() {
                    stream_ref.read_exact(&mut header[n..])?;
                }
                let length = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
                let mut prefix = vec![0u8; length];
                stream_ref.read_exact(&mut prefix)?;
                if let Some(fd) = fd {
                    let connection = HandedConnection { stream: fd.into(), prefix: prefix.into() };
                    let _ = handed.send(connection);
                }
            }
            (_, other) => {
                return Err(std::io::Error::other(format!("unexpected hand-over message {other}")));
            }
        }
    }
}

// === impl Successor ===

/// Where a process that hands over sends its idle connections, once a
/// successor has taken its sockets.
#[derive(Default)]
pub struct Successor {
    connections: std::sync::Mutex<Option<mpsc::UnboundedSender<HandedConnection>>>,
}

impl Successor {
    /// Whether a successor takes connections.
    pub fn is_taking(&self) -> bool {
        self.lock().is_some()
    }

    /// Hands `connection` to the successor; gives it back if there is none.
    pub fn hand(&self, connection: HandedConnection) -> Result<(), HandedConnection> {
        match &*self.lock() {
            Some(sender) => sender.send(connection).map_err(|e| e.0),
            None => Err(connection),
        }
    }

    /// No more connections will be handed over.
    pub fn close(&self) {
        self.lock().take();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<mpsc::UnboundedSender<HandedConnection>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// === impl Offer ===

/// A serving process's offer of its sockets to a successor.
pub struct Offer {
    released: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Offer {
    /// Offers `sockets` (duplicates of the serving listeners) at the data
    /// dir's hand-over socket until `shutdown`. A successor that takes them
    /// cancels `shutdown` and is given the idle connections through
    /// `successor`. `None` when the socket cannot be created (logged; the
    /// service then runs without hand-over).
    pub fn start(
        data_dir: &Path,
        sockets: Vec<(Role, OwnedFd)>,
        successor: Arc<Successor>,
        shutdown: CancellationToken,
    ) -> Option<Self> {
        let path = socket_path(data_dir);
        // Only the process holding the store gets here: a file left behind
        // is stale (a crash), never another server's.
        let _ = std::fs::remove_file(&path);
        let listener = match UnixListener::bind(&path) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "no hand-over socket; restarts will refuse connections");
                return None;
            }
        };
        let (released, on_release) = oneshot::channel();
        let task = tokio::spawn(offer(listener, path, sockets, successor, shutdown, on_release));
        Some(Self { released: Some(released), task })
    }

    /// The store is closed: tells a successor, if there is one.
    pub async fn finish(mut self) {
        if let Some(released) = self.released.take() {
            let _ = released.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

async fn offer(
    listener: UnixListener,
    path: PathBuf,
    sockets: Vec<(Role, OwnedFd)>,
    successor: Arc<Successor>,
    shutdown: CancellationToken,
    on_release: oneshot::Receiver<()>,
) {
    let taken = loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break None,
        };
        let Ok((stream, _)) = accepted else { continue };
        // Whatever happens next, this process stops offering.
        let _ = std::fs::remove_file(&path);
        match send_sockets(stream, &sockets) {
            Ok(stream) => break Some(stream),
            Err(e) => tracing::warn!(error = %e, "hand-over failed; still serving"),
        }
    };
    let _ = std::fs::remove_file(&path);
    drop(sockets);
    drop(listener);
    let Some(stream) = taken else { return };
    let (connections, handed) = mpsc::unbounded_channel();
    *successor.lock() = Some(connections);
    tracing::info!("handing over to a new ordertrail: no longer accepting, finishing what is in flight");
    shutdown.cancel();
    let _ = tokio::task::spawn_blocking(move || forward(stream, handed, on_release)).await;
}

/// Sends each handed connection to the successor; once they are all sent
/// and the store is closed, says [`RELEASED`].
fn forward(
    mut stream: StdUnixStream,
    mut handed: mpsc::UnboundedReceiver<HandedConnection>,
    on_release: oneshot::Receiver<()>,
) {
    while let Some(connection) = handed.blocking_recv() {
        if let Err(e) = send_connection(&stream, &connection) {
            tracing::warn!(error = %e, "could not hand a connection over; closing it");
        }
    }
    if on_release.blocking_recv().is_ok() {
        let _ = stream.write_all(&[RELEASED]);
    }
}

fn send_connection(stream: &StdUnixStream, connection: &HandedConnection) -> std::io::Result<()> {
    let length = u32::try_from(connection.prefix.len()).map_err(std::io::Error::other)?;
    let mut header = [CONNECTION, 0, 0, 0, 0];
    header[1..].copy_from_slice(&length.to_le_bytes());
    let fds = [connection.stream.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let sent = rustix::net::sendmsg(stream, &[IoSlice::new(&header)], &mut control, SendFlags::empty())?;
    let mut rest = stream;
    rest.write_all(&header[sent..])?;
    rest.write_all(&connection.prefix)
}

fn send_sockets(stream: tokio::net::UnixStream, sockets: &[(Role, OwnedFd)]) -> std::io::Result<StdUnixStream> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let roles: Vec<u8> = sockets.iter().map(|(role, _)| role.byte()).collect();
    let fds: Vec<_> = sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(Role::ALL.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("too many sockets for one message"));
    }
    rustix::net::sendmsg(&stream, &[IoSlice::new(&roles)], &mut control, SendFlags::empty())?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inherited_socket_serves_the_address_the_config_names() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(same_place(addr("127.0.0.1:8080"), addr("127.0.0.1:8080")));
        assert!(same_place(addr("127.0.0.1:45149"), addr("127.0.0.1:0")), "port 0: any port");
        assert!(!same_place(addr("127.0.0.1:8080"), addr("127.0.0.1:8081")));
        assert!(!same_place(addr("127.0.0.1:8080"), addr("0.0.0.0:8080")));
        assert!(!same_place(addr("127.0.0.1:45149"), addr("0.0.0.0:0")));
    }
}
