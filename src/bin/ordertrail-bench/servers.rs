//! The servers measured: bare hyper and bare tonic baselines, and ordertrail
//! itself (in this process, or as a separate one for memory).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ordertrail::config::Config;
use ordertrail::proto::Order;
use ordertrail::proto::order_trail_client::OrderTrailClient;
use ordertrail::proto::order_trail_server::OrderTrailServer;
use ordertrail::server::{self, Listeners};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::Settings;
use crate::load::{http_client, next_run, sources_toml};
use crate::measure::rss_mib;
use crate::wire;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Fsync,
    Flush,
    /// Acknowledges before the write and the flush: bench only, never for real use.
    None,
}

/// A running server on its own runtime and threads.
pub(crate) struct Subject {
    pub(crate) http: SocketAddr,
    pub(crate) grpc: SocketAddr,
    /// The admin listener (metrics, console); the bare servers have none
    /// and name their HTTP address.
    pub(crate) admin: SocketAddr,
    pub(crate) stop: CancellationToken,
    pub(crate) thread: std::thread::JoinHandle<()>,
}

impl Subject {
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        tokio::task::spawn_blocking(move || self.thread.join()).await.expect("join").expect("server thread");
    }
}

pub(crate) fn server_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-server")
        .enable_all()
        .build()
        .expect("server runtime")
}

pub(crate) fn loopback() -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    listener
}

/// The baseline: a bare hyper server that reads the body and answers 200,
/// and a bare tonic server with `grpc.health.v1` (its unary `Check`) and a
/// `GetOrder` that answers `order` from memory.
pub(crate) fn start_bare() -> Subject {
    start_bare_with(Order::default())
}

pub(crate) fn start_bare_with(order: Order) -> Subject {
    let (http, grpc) = (loopback(), loopback());
    let addresses = (http.local_addr().expect("address"), grpc.local_addr().expect("address"));
    let stop = CancellationToken::new();
    let token = stop.clone();
    let thread = std::thread::spawn(move || {
        server_runtime().block_on(async move {
            let http = tokio::net::TcpListener::from_std(http).expect("listener");
            // Custom incoming: tonic's own tcp_nodelay applies only to
            // listeners it binds, so set it here (else Nagle stalls replies).
            let grpc = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(
                    tokio::net::TcpListener::from_std(grpc).expect("listener"),
                ),
                |stream| {
                    stream.inspect(|s| {
                        let _ = s.set_nodelay(true);
                    })
                },
            );
            let (_reporter, health) = tonic_health::server::health_reporter();
            let tonic = tonic::transport::Server::builder()
                .add_service(health)
                .add_service(OrderTrailServer::new(wire::BareOrders(order)))
                .serve_with_incoming_shutdown(grpc, token.clone().cancelled_owned());
            tokio::join!(bare_http(http, token), async {
                let _ = tonic.await;
            });
        });
    });
    Subject { http: addresses.0, grpc: addresses.1, admin: addresses.0, stop, thread }
}

pub(crate) async fn bare_http(listener: tokio::net::TcpListener, stop: CancellationToken) {
    serve_http(listener, stop, |request| async move {
        let _ = request.into_body().collect().await;
        hyper::Response::new(Full::new(Bytes::from_static(b"{\"outcome\":\"applied\"}")))
    })
    .await;
}

/// An HTTP/1 server answering every request with `handle`, until `stop`.
pub(crate) async fn serve_http<F, R>(listener: tokio::net::TcpListener, stop: CancellationToken, handle: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> R + Clone + Send + 'static,
    R: Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        let service = service_fn(move |request| {
            let answer = handle(request);
            async move { Ok::<_, std::convert::Infallible>(answer.await) }
        });
        let stop = stop.clone();
        tokio::spawn(async move {
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

pub(crate) fn fresh_dir() -> PathBuf {
    std::env::temp_dir().join(format!("ordertrail-bench-{}-{}", std::process::id(), next_run()))
}

/// ordertrail with `mode` on `dir`; returns once it answers `/readyz`.
pub(crate) async fn start_ordertrail(dir: &Path, mode: Mode, extra: &str, settings: &Settings) -> (Subject, Duration) {
    let durability = if mode == Mode::Fsync { "fsync" } else { "flush" };
    let unsafe_ack = mode == Mode::None;
    let cache = settings.cache_mib.map(|mib| format!("[store.sled]\ncache_capacity_bytes = {}\n", mib << 20));
    let text = format!(
        // The one-off background verification after start is not what the
        // scenarios measure.
        "[store]\ndata_dir = {:?}\ndurability = \"{durability}\"\nunsafe_ack_before_durable = {unsafe_ack}\n\
         verify_on_start = false\n{extra}\n{}\n{}",
        dir.display().to_string(),
        cache.unwrap_or_default(),
        sources_toml()
    );
    let config = Config::from_toml(&text, &|_| None).expect("bench config");
    let (http, grpc, admin) = (loopback(), loopback(), loopback());
    let (http_addr, grpc_addr) = (http.local_addr().expect("address"), grpc.local_addr().expect("address"));
    let admin_addr = admin.local_addr().expect("address");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let started = Instant::now();
    let thread = std::thread::spawn(move || {
        server_runtime().block_on(async move {
            let listeners = Listeners {
                http: tokio::net::TcpListener::from_std(http).expect("listener"),
                grpc: tokio::net::TcpListener::from_std(grpc).expect("listener"),
                admin: tokio::net::TcpListener::from_std(admin).expect("listener"),
            };
            if let Err(e) = server::run(config, listeners, token).await {
                eprintln!("ordertrail-bench: server failed: {e}");
            }
        });
    });
    let client = http_client(1);
    loop {
        let request = hyper::Request::get(format!("http://{http_addr}/readyz")).body(Full::default()).expect("request");
        if let Ok(response) = client.request(request).await
            && response.status().is_success()
        {
            break;
        }
        assert!(!thread.is_finished(), "ordertrail did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let startup = started.elapsed();
    (Subject { http: http_addr, grpc: grpc_addr, admin: admin_addr, stop, thread }, startup)
}

/// A connected gRPC channel to `address` (TCP_NODELAY, as the servers).
pub(crate) async fn grpc_channel(address: SocketAddr) -> Channel {
    let channel = Channel::from_shared(format!("http://{address}")).expect("uri").tcp_nodelay(true);
    channel.connect().await.expect("connect")
}

pub(crate) async fn grpc_client(address: SocketAddr) -> OrderTrailClient<Channel> {
    OrderTrailClient::new(grpc_channel(address).await).max_decoding_message_size(64 << 20)
}

pub(crate) async fn serve(dir: &Path, settings: &Settings) {
    let (subject, _) = start_ordertrail(dir, Mode::Fsync, "", settings).await;
    println!("{} {}", subject.http, subject.grpc);
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1])).await;
    subject.stop().await;
}

/// ordertrail in a child process (this binary's `serve`), for memory and
/// start-up measured without the load generator.
pub(crate) struct ServeProcess {
    pub(crate) child: std::process::Child,
    pub(crate) grpc: SocketAddr,
    pub(crate) startup: Duration,
}

impl ServeProcess {
    pub(crate) async fn start(dir: &Path, settings: &Settings) -> Self {
        let (dir, cache_mib) = (dir.to_path_buf(), settings.cache_mib);
        tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let started = Instant::now();
            let mut command = std::process::Command::new(std::env::current_exe().expect("own path"));
            command.args(["serve", "--data-dir"]).arg(dir);
            if let Some(mib) = cache_mib {
                command.args(["--cache-mib", &mib.to_string()]);
            }
            let mut child = command
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start the serve process");
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("addresses");
            let startup = started.elapsed();
            let grpc = line.split_whitespace().nth(1).and_then(|a| a.parse().ok()).expect("grpc address");
            Self { child, grpc, startup }
        })
        .await
        .expect("serve process")
    }

    pub(crate) fn rss_mib(&self) -> f64 {
        rss_mib(&format!("/proc/{}/status", self.child.id()))
    }

    pub(crate) async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::task::spawn_blocking(move || self.child.wait()).await;
    }
}
