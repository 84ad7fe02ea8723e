//! Restarts and deploys refuse nothing: the real binary under continuous
//! load (fresh connections and a keep-alive pool, plus one silent gRPC
//! connection) is replaced by a second one started with the same config
//! (hand-over), or restarted on sockets it inherits (systemd socket
//! activation). Not one request may fail, and every 2xx must be stored.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ordertrail::proto::GetDeliveryRequest;
use ordertrail::proto::admin_client::AdminClient;
use ordertrail::testing::free_addr;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_ordertrail");
/// Long enough that a process held by an idle connection would be caught.
const GRACE_MS: u64 = 30_000;

/// What became of one request.
#[derive(Debug)]
struct Sent {
    body: String,
    /// `Ok(raw_id)` for a 2xx, else what went wrong.
    answer: Result<u64, String>,
}

struct Setup {
    /// Kept until the test ends.
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    http: SocketAddr,
    grpc: SocketAddr,
    admin: SocketAddr,
}

impl Setup {
    fn new() -> Self {
        Self::with_store("")
    }

    /// `store`: extra `[store]` keys (none: sled in the data dir).
    fn with_store(store: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (http, grpc, admin) = (free_addr(), free_addr(), free_addr());
        let config = dir.path().join("ordertrail.toml");
        let text = format!(
            "shutdown_grace_ms = {GRACE_MS}\n[http]\naddr = \"{http}\"\n[grpc]\naddr = \"{grpc}\"\n\
             [admin]\naddr = \"{admin}\"\n[store]\ndata_dir = {:?}\n{store}\n",
            dir.path().join("data").display().to_string()
        );
        std::fs::write(&config, text).unwrap();
        Self { _dir: dir, config, http, grpc, admin }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(BIN);
        command.args(["--config", self.config.to_str().unwrap()]).env("RUST_LOG", "warn").stdout(Stdio::null());
        command.stderr(Stdio::inherit());
        command
    }

    /// Starts a server and waits until it is ready.
    async fn start(&self) -> Process {
        let mut process = Process::spawn(&mut self.command());
        self.wait_ready(&mut process).await;
        process
    }

    async fn wait_ready(&self, child: &mut Child) {
        // No pooled connection is left behind: tests count connections.
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http::<Full<Bytes>>();
        for _ in 0..3000 {
            assert!(child.try_wait().unwrap().is_none(), "the server exited on start-up");
            let uri = format!("http://{}/readyz", self.http).parse().unwrap();
            if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(1), client.get(uri)).await
                && response.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the server never became ready");
    }

    /// Waits until the running server has exactly `open` webhook
    /// connections: it has seen (or let go of) the test's connections.
    async fn http_connections_become(&self, open: u64) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let uri: hyper::Uri = format!("http://{}/metrics", self.admin).parse().unwrap();
        for _ in 0..6000 {
            if let Ok(response) = client.get(uri.clone()).await {
                let page = response.into_body().collect().await.unwrap().to_bytes();
                let page = String::from_utf8_lossy(&page);
                if crate::common::sample(&page, "ordertrail_http_connections") == Some(open as f64) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the server never had {open} webhook connections");
    }

    /// Lets the load run a little longer, stops it, checks what it got, and
    /// stops the server.
    async fn finish(&self, stop: CancellationToken, loading: tokio::task::JoinHandle<Vec<Sent>>, mut running: Process) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
        let sent = loading.await.unwrap();
        assert!(sent.len() > 500, "too little load to mean anything: {}", sent.len());
        self.verify(&sent).await;
        terminate(&running);
        assert!(exited(&mut running).await.success());
    }

    /// Every 2xx must be stored with the bytes that were sent.
    async fn verify(&self, sent: &[Sent]) {
        let failed: Vec<_> = sent.iter().filter(|s| s.answer.is_err()).collect();
        assert!(failed.is_empty(), "{} of {} requests failed: {failed:#?}", failed.len(), sent.len());
        let mut admin = AdminClient::connect(format!("http://{}", self.grpc)).await.unwrap();
        for s in sent {
            let raw_id = *s.answer.as_ref().unwrap();
            let stored = admin.get_delivery(GetDeliveryRequest { raw_id }).await.unwrap().into_inner();
            assert_eq!(stored.body, s.body.as_bytes(), "delivery {raw_id} was acknowledged but is not stored");
        }
    }
}

/// A started server, killed if a failing test leaves it running.
struct Process(Child);

impl Process {
    fn spawn(command: &mut Command) -> Self {
        Self(command.spawn().expect("start ordertrail"))
    }
}

impl Deref for Process {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn terminate(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
}

/// Waits for `child` to exit (at most 20 s, less than the grace period).
async fn exited(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..2000 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the old process did not exit: something held its shutdown");
}

/// Unique webhooks until `stop`: one every 4 ms on a new connection each,
/// and 8 senders reusing the connections of one keep-alive pool.
async fn load(http: SocketAddr, stop: CancellationToken) -> Vec<Sent> {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let fresh = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http::<Full<Bytes>>();
    let pooled = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (pooled, sent, counter, stop) = (pooled.clone(), sent.clone(), counter.clone(), stop.clone());
        senders.spawn(async move {
            while !stop.is_cancelled() {
                let outcome = post(&pooled, http, &counter).await;
                sent.lock().unwrap().push(outcome);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(4));
    while !stop.is_cancelled() {
        ticker.tick().await;
        let (fresh, sent, counter) = (fresh.clone(), sent.clone(), counter.clone());
        senders.spawn(async move {
            let outcome = post(&fresh, http, &counter).await;
            sent.lock().unwrap().push(outcome);
        });
    }
    senders.join_all().await;
    Arc::try_unwrap(sent).unwrap().into_inner().unwrap()
}

async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    http: SocketAddr,
    counter: &std::sync::atomic::AtomicUsize,
) -> Sent {
    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body =
        format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"h-{n}","ExternalOrderId":"HX-{n}"}}"#);
    let request = hyper::Request::post(format!("http://{http}/webhooks/ordermesh"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let answer = async {
        let response = client.request(request).await.map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| format!("{e:?}"))?.to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        match json["raw_id"].as_u64() {
            Some(raw_id) if status.is_success() => Ok(raw_id),
            _ => Err(format!("{status}: {}", String::from_utf8_lossy(&bytes))),
        }
    };
    let answer =
        tokio::time::timeout(Duration::from_secs(20), answer).await.unwrap_or_else(|_| Err("no answer".into()));
    Sent { body, answer }
}

/// Hand-overs under load; each is a chance for a reset keep-alive
/// connection or a refused one to show.
const HANDOVERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_takes_over_without_failing_a_request() {
    hand_over_under_load(Setup::new()).await;
}

/// The same on PostgreSQL: the old process releases its store (its
/// connections) and the new one opens its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_takes_over_on_postgres_without_failing_a_request() {
    let cluster = ordertrail::testing::PostgresCluster::start();
    hand_over_under_load(Setup::with_store(&format!(
        "backend = \"postgres\"\n[store.postgres]\nurl = \"{}\"",
        cluster.url()
    )))
    .await;
}

/// `HANDOVERS` hand-overs under continuous load, each with a silent and a
/// stalled gRPC connection open.
async fn hand_over_under_load(setup: Setup) {
    let mut running = setup.start().await;
    let stop = CancellationToken::new();
    let loading = tokio::spawn(load(setup.http, stop.clone()));
    for _ in 0..HANDOVERS {
        // gRPC connections that never send (all of) the HTTP/2 preface
        // must not hold the old process.
        let silent = tokio::net::TcpStream::connect(setup.grpc).await.unwrap();
        let mut stalled = tokio::net::TcpStream::connect(setup.grpc).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stalled, b"PRI * HTTP/2.0\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut next = Process::spawn(&mut setup.command());
        let status = exited(&mut running).await;
        assert!(status.success(), "the old process exited with {status}");
        setup.wait_ready(&mut next).await;
        running = next;
        drop((silent, stalled));
    }
    setup.finish(stop, loading, running).await;
}

/// The test plays systemd: it owns the listening sockets and passes them as
/// fds 3, 4 and 5 (`LISTEN_FDS`) to each process it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_inherited_sockets_refuses_nothing() {
    let setup = Setup::new();
    let sockets = [setup.http, setup.grpc, setup.admin].map(|addr| StdListener::bind(addr).unwrap());
    let fds = sockets.each_ref().map(|s| s.as_raw_fd());
    let spawn = || {
        let mut command = setup.command();
        command.env("LISTEN_FDS", "3").env("LISTEN_FDNAMES", "http:grpc:admin");
        pass_fds(&mut command, fds);
        Process::spawn(&mut command)
    };
    let mut running = spawn();
    setup.wait_ready(&mut running).await;
    let stop = CancellationToken::new();
    let loading = tokio::spawn(load(setup.http, stop.clone()));
    for _ in 0..HANDOVERS {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A plain restart: stop, then start on the same sockets.
        terminate(&running);
        assert!(exited(&mut running).await.success());
        running = spawn();
        setup.wait_ready(&mut running).await;
    }
    setup.finish(stop, loading, running).await;
}

/// Places `fds` at 3, 4, 5 in the child, as systemd does.
fn pass_fds(command: &mut Command, fds: [i32; 3]) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // First out of the way, so no source is overwritten by dup2.
            let mut high = [0; 3];
            for (i, fd) in fds.iter().enumerate() {
                high[i] = libc::fcntl(*fd, libc::F_DUPFD, 100);
            }
            for (i, fd) in high.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Sends one keep-alive webhook on `stream` and reads the answer:
/// (status, head, body); `None` if the connection was closed instead.
fn exchange(stream: &mut std::net::TcpStream, n: usize) -> Option<(u16, String, String)> {
    use std::io::{Read, Write};
    let body =
        format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"k-{n}","ExternalOrderId":"KX-{n}"}}"#);
    let request = format!(
        "POST /webhooks/ordermesh HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer).ok()?;
        if n == 0 {
            return None;
        }
        received.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        let Some(end) = text.find("\r\n\r\n") else { continue };
        let head = text[..end].to_ascii_lowercase();
        let length: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
        if text.len() >= end + 4 + length {
            let status = head[9..12].parse().unwrap();
            return Some((status, head, text[end + 4..end + 4 + length].to_string()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_new_connections_are_handed_over_not_closed() {
    let setup = Setup::new();
    let mut old = setup.start().await;
    let mut idle = std::net::TcpStream::connect(setup.http).unwrap();
    let (status, head, _) = exchange(&mut idle, 1).expect("the first answer");
    assert_eq!(status, 200);
    assert!(!head.contains("connection: close"), "{head}");
    setup.http_connections_become(1).await;
    // Connected, nothing sent yet.
    let mut quiet = std::net::TcpStream::connect(setup.http).unwrap();
    setup.http_connections_become(2).await;

    let mut new = Process::spawn(&mut setup.command());
    assert!(exited(&mut old).await.success());
    setup.wait_ready(&mut new).await;
    // Both connections were the old process's; the new one answers on them.
    let (status, _, body) = exchange(&mut idle, 2).expect("the idle keep-alive connection was closed");
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = exchange(&mut quiet, 3).expect("the connection that had sent nothing was closed");
    assert_eq!(status, 200, "{body}");
    terminate(&new);
    assert!(exited(&mut new).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_a_plain_stop_the_next_request_on_an_idle_connection_is_answered_with_close() {
    let setup = Setup::new();
    let mut server = setup.start().await;
    let mut idle = std::net::TcpStream::connect(setup.http).unwrap();
    assert_eq!(exchange(&mut idle, 1).expect("the first answer").0, 200);
    terminate(&server);
    // Stopping: the listener is closed before connections are drained.
    while std::net::TcpStream::connect(setup.http).is_ok() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, head, body) = exchange(&mut idle, 2).expect("the idle connection was closed at once");
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(exited(&mut server).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_webhook_connection_does_not_hold_a_plain_stop() {
    let setup = Setup::new();
    let mut server = setup.start().await;
    setup.http_connections_become(0).await;
    // Connected, never sends: hyper would wait for its request headers.
    let silent = std::net::TcpStream::connect(setup.http).unwrap();
    setup.http_connections_become(1).await;
    let stopping = std::time::Instant::now();
    terminate(&server);
    assert!(exited(&mut server).await.success());
    // The config's header read timeout is 10 s, the grace period 30 s.
    assert!(stopping.elapsed() < Duration::from_secs(5), "a silent connection held the stop: {:?}", stopping.elapsed());
    drop(silent);
}
