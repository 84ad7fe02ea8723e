//! `ordertrail-bench`: the project's own benchmark. It starts what it
//! measures itself, on loopback, and always measures against a baseline in
//! the same run, alternating A/B/A/B so ratios hold on a noisy machine.
//!
//! The servers run on their own runtime (threads `bench-server`), the load
//! generator on another (`bench-client`), so server CPU can be told apart:
//! "CPU ms/1000" is server CPU-seconds per 1000 acknowledged requests.
//!
//! Webhooks are unique and authenticated, taken in turn from the three
//! providers' documented payloads (OrderMesh JSON with an HMAC signature,
//! Winkelstraat JSON with an API key, Withings form with an IP allowlist and
//! token), so neither the duplicate path nor the auth rejection path is
//! what gets measured.
//!
//! Scenarios: `ingest`, `ingest-latency`, `durability`, `lookup`,
//! `fan-out`, `catch-up`, `scale` (see `--help` and BENCHMARKS.md).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ordertrail::config::Config;
use ordertrail::proto::get_order_request::Reference;
use ordertrail::proto::order_trail_client::OrderTrailClient;
use ordertrail::proto::order_trail_server::OrderTrailServer;
use ordertrail::proto::subscribe_response::Message as Streamed;
use ordertrail::proto::{GetOrderRequest, Order, SubscribeRequest};
use ordertrail::server::{self, Listeners};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

mod wire;

#[derive(Parser)]
#[command(name = "ordertrail-bench", about = "Benchmarks ordertrail against a baseline measured in the same run")]
struct Args {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent connections (ingest, durability) or lookups in flight
    /// (lookup, scale), comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64, 256])]
    connections: Vec<usize>,
    /// A/B rounds per point (each round measures the baseline and the subject).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Orders (and events) stored first (lookup, catch-up, scale: the large case).
    #[arg(long, default_value_t = 1_000_000)]
    orders: u64,
    /// The small case of `scale`.
    #[arg(long, default_value_t = 10_000)]
    small_orders: u64,
    /// Subscriber counts for `fan-out`, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [0, 10, 100, 1000])]
    subscribers: Vec<usize>,
    /// Webhooks per second offered in `fan-out`.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// GetOrder calls per second offered in `scale`'s open-loop measurement.
    #[arg(long, default_value_t = 5000)]
    lookup_rate: u64,
    /// sled's cache for every ordertrail started (MiB; default: ordertrail's default).
    #[arg(long)]
    cache_mib: Option<u64>,
    /// Keep the stored data sets of lookup, catch-up and scale under this
    /// directory and reuse them in later runs (filling 1M orders takes minutes).
    #[arg(long)]
    keep_data: Option<PathBuf>,
    /// (internal, `serve`) the data dir.
    #[arg(long, hide = true)]
    data_dir: Option<PathBuf>,
}

/// `--cache-mib` and `--keep-data`, for code far from `main`.
static SETTINGS: std::sync::OnceLock<(Option<u64>, Option<PathBuf>)> = std::sync::OnceLock::new();

/// `--cache-mib`, if given.
fn cache_mib() -> Option<u64> {
    SETTINGS.get().and_then(|s| s.0)
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Durable webhooks/s and ack latency vs a bare hyper server, closed loop.
    Ingest,
    /// Open-loop ack latency at 25/50/80 % of the measured maximum.
    IngestLatency,
    /// `fsync` vs `flush` vs non-durable (bench-only) ingest.
    Durability,
    /// GetOrder by each reference kind with `--orders` stored vs a bare tonic unary call.
    Lookup,
    /// Ingest at `--rate` with 0/10/100/1000 live subscribers.
    FanOut,
    /// Replay of `--orders` stored events to one subscriber vs a raw sled scan.
    CatchUp,
    /// GetOrder p99, RSS and start-up time with `--small-orders` vs `--orders`.
    Scale,
    /// (internal) serve `--data-dir` until stdin closes; `scale` runs it as
    /// a separate process to measure its memory alone.
    #[value(hide = true)]
    Serve,
}

fn main() {
    let args = Args::parse();
    SETTINGS.set((args.cache_mib, args.keep_data.clone())).expect("settings");
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("client runtime");
    client.block_on(async move {
        match args.scenario {
            Scenario::Ingest => ingest(&args, &[("ordertrail fsync", Mode::Fsync)]).await,
            Scenario::Durability => {
                let modes =
                    [("ordertrail fsync", Mode::Fsync), ("ordertrail flush", Mode::Flush), ("non-durable", Mode::None)];
                ingest(&args, &modes).await;
                sled_alone(&args).await;
            }
            Scenario::IngestLatency => ingest_latency(&args).await,
            Scenario::Lookup => lookup(&args).await,
            Scenario::FanOut => fan_out(&args).await,
            Scenario::CatchUp => catch_up(&args).await,
            Scenario::Scale => scale(&args).await,
            Scenario::Serve => match args.data_dir.as_deref() {
                Some(dir) => serve(dir).await,
                None => {
                    eprintln!("ordertrail-bench: serve needs --data-dir");
                    std::process::exit(2);
                }
            },
        }
    });
}

// === the load ===

const HMAC_KEY: &str = "bench-ordermesh-signing-key-32-bytes!!";
const API_KEY: &str = "bench-winkelstraat-api-key";
const TOKEN: &str = "bench-withings-token";

/// The sources every ordertrail under test is configured with.
fn sources_toml() -> String {
    format!(
        r#"
[[sources]]
name = "ordermesh"
provider = "ordermesh"
auth = {{ scheme = "hmac", header = "x-signature", secrets = ["{HMAC_KEY}"], encoding = "hex" }}
[[sources]]
name = "winkelstraat"
provider = "winkelstraat"
auth = {{ scheme = "header", header = "x-api-key", secrets = ["{API_KEY}"] }}
[[sources]]
name = "withings"
provider = "withings"
auth = {{ scheme = "ip_allowlist", allow = ["127.0.0.1/32"], second_factor = {{ query = "token", secrets = ["{TOKEN}"] }} }}
"#
    )
}

const ORDERMESH: &str = include_str!("../../../tests/fixtures/ordermesh/order-creation.json");
const WINKELSTRAAT: &str = include_str!("../../../tests/fixtures/winkelstraat/order.json");
const WITHINGS: &str = include_str!("../../../tests/fixtures/withings/documented-example.form");

/// Webhook `n` of a run: provider `n % 3`, references derived from
/// `(run, n)` so a lookup can name them later.
struct Webhook {
    path: String,
    content_type: &'static str,
    header: Option<(&'static str, String)>,
    body: Bytes,
}

fn webhook(run: u64, n: u64) -> Webhook {
    match n % 3 {
        0 => {
            let body = ORDERMESH
                .replace("670e58fe7741035996cf7d20", &ordermesh_id(run, n))
                .replace("WBTEST22", &merchant_ref(run, n))
                .replace("WebhooksTest22", &safe_id(run, n));
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(HMAC_KEY.as_bytes()).expect("key");
            mac.update(body.as_bytes());
            let signature = hex::encode(mac.finalize().into_bytes());
            Webhook {
                path: "/webhooks/ordermesh".into(),
                content_type: "application/json",
                header: Some(("x-signature", signature)),
                body: body.into(),
            }
        }
        1 => Webhook {
            path: "/webhooks/winkelstraat/order".into(),
            content_type: "application/json",
            header: Some(("x-api-key", API_KEY.into())),
            body: WINKELSTRAAT
                .replace("000000549", &format!("{run}{n:012}"))
                .replace("YOUR_ORDER_REFERENCE", &format!("PO-{run}-{n}"))
                .into(),
        },
        _ => Webhook {
            path: format!("/webhooks/withings?token={TOKEN}"),
            content_type: "application/x-www-form-urlencoded",
            header: None,
            body: WITHINGS
                .trim()
                .replace("MREF-1001", &format!("MREF-{run}-{n}"))
                .replace("D12345678", &format!("D{run}-{n}"))
                .replace("1ZY1111111", &tracking(run, n))
                .into(),
        },
    }
}

fn ordermesh_id(run: u64, n: u64) -> String {
    format!("om{run}-{n}")
}
fn merchant_ref(run: u64, n: u64) -> String {
    format!("E{run}-{n}")
}
fn safe_id(run: u64, n: u64) -> String {
    format!("S{run}-{n}")
}
fn tracking(run: u64, n: u64) -> String {
    format!("1Z{run}X{n}")
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client(connections: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(connections).build(connector)
}

/// Sends webhook `n`; true on a 2xx answer.
async fn send(client: &HttpClient, address: SocketAddr, run: u64, n: u64) -> bool {
    let hook = webhook(run, n);
    let mut request = hyper::Request::post(format!("http://{address}{}", hook.path))
        .header("content-type", hook.content_type)
        .header("content-length", hook.body.len());
    if let Some((name, value)) = hook.header {
        request = request.header(name, value);
    }
    let request = request.body(Full::new(hook.body)).expect("request");
    match client.request(request).await {
        Ok(response) if response.status().is_success() => response.into_body().collect().await.is_ok(),
        _ => false,
    }
}

fn next_run() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) * 1000 + std::process::id() as u64 % 1000
}

/// One measurement.
#[derive(Clone, Debug, Default)]
struct Sample {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: u64,
    /// Requests answered successfully.
    acknowledged: u64,
    /// Server CPU milliseconds per 1000 acknowledged requests.
    cpu_per_1000_ms: f64,
}

/// The `p` quantile of sorted latencies, in milliseconds (0 if none).
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn sample(mut latencies: Vec<Duration>, errors: u64, elapsed: Duration, cpu: Duration) -> Sample {
    latencies.sort();
    let percentile = |p: f64| percentile_ms(&latencies, p);
    let done = latencies.len().max(1) as f64;
    Sample {
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        p999_ms: percentile(0.999),
        errors,
        acknowledged: latencies.len() as u64,
        cpu_per_1000_ms: cpu.as_secs_f64() * 1000.0 * 1000.0 / done,
    }
}

/// `connections` workers send webhooks back to back for `duration`.
async fn closed_loop(address: SocketAddr, connections: usize, duration: Duration) -> Sample {
    let client = http_client(connections);
    let run = next_run();
    let next = Arc::new(AtomicU64::new(0));
    let cpu = ServerCpu::start();
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (client, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                if send(&client, address, run, n).await {
                    latencies.push(sent.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        });
    }
    let (latencies, errors) = join_latencies(workers).await;
    let elapsed = started.elapsed();
    sample(latencies, errors, elapsed, cpu.used())
}

/// Webhooks at a fixed `rate` (see [`scheduled`]).
async fn open_loop(address: SocketAddr, rate: f64, duration: Duration) -> Sample {
    let client = http_client(1024);
    let run = next_run();
    scheduled(rate, duration, move |n| {
        let client = client.clone();
        async move { send(&client, address, run, n).await }
    })
    .await
}

/// Request `n` (from 0) made by `request(n)` at its scheduled time
/// `n / rate`, however long earlier ones take, for `duration`; latency
/// counts from the scheduled time, so a stall shows up in every request it
/// delays (no coordinated omission).
async fn scheduled<F, R>(rate: f64, duration: Duration, request: F) -> Sample
where
    F: Fn(u64) -> R,
    R: Future<Output = bool> + Send + 'static,
{
    let cpu = ServerCpu::start();
    let started = tokio::time::Instant::now();
    let total = (rate * duration.as_secs_f64()) as u64;
    let mut requests = tokio::task::JoinSet::new();
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due).await;
        let made = request(n);
        requests.spawn(async move {
            let ok = made.await;
            (due.elapsed(), ok)
        });
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    while let Some(result) = requests.join_next().await {
        match result {
            Ok((latency, true)) => latencies.push(latency),
            _ => errors += 1,
        }
    }
    sample(latencies, errors, started.elapsed(), cpu.used())
}

async fn join_latencies(workers: tokio::task::JoinSet<(Vec<Duration>, u64)>) -> (Vec<Duration>, u64) {
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for (mut l, e) in workers.join_all().await {
        latencies.append(&mut l);
        errors += e;
    }
    (latencies, errors)
}

/// Stores webhooks `0..count` of `run` (as many connections as useful).
async fn populate(address: SocketAddr, run: u64, count: u64) {
    let client = http_client(128);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..128 {
        let (client, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return;
                }
                while !send(&client, address, run, n).await {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    workers.join_all().await;
    eprintln!("ordertrail-bench: stored {count} webhooks in {:.0} s", started.elapsed().as_secs_f64());
}

// === CPU and memory of the servers ===

/// Server CPU over an interval: the process's CPU time minus that of the
/// load generator's threads (the servers run on their own threads, and
/// sled's short-lived I/O threads are counted by the process total).
struct ServerCpu {
    process: Duration,
    client: Duration,
}

impl ServerCpu {
    fn start() -> Self {
        Self { process: process_cpu(), client: client_cpu() }
    }

    fn used(&self) -> Duration {
        (process_cpu().saturating_sub(self.process)).saturating_sub(client_cpu().saturating_sub(self.client))
    }
}

fn process_cpu() -> Duration {
    std::fs::read_to_string("/proc/self/stat").map(|s| stat_cpu(&s)).unwrap_or_default()
}

/// CPU of the threads that are not the servers': the load generator's
/// runtime and the main thread.
fn client_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Duration::ZERO };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter(|stat| stat.contains("(bench-client)") || stat.contains("(ordertrail-benc)"))
        .map(|stat| stat_cpu(&stat))
        .sum()
}

/// utime + stime of a `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> Duration {
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

fn rss_mib(status_file: &str) -> f64 {
    let status = std::fs::read_to_string(status_file).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

// === the servers ===

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fsync,
    Flush,
    /// Acknowledges before the write and the flush: bench only, never for real use.
    None,
}

/// A running server on its own runtime and threads.
struct Subject {
    http: SocketAddr,
    grpc: SocketAddr,
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl Subject {
    async fn stop(self) {
        self.stop.cancel();
        tokio::task::spawn_blocking(move || self.thread.join()).await.expect("join").expect("server thread");
    }
}

fn server_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-server")
        .enable_all()
        .build()
        .expect("server runtime")
}

fn loopback() -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    listener
}

/// The baseline: a bare hyper server that reads the body and answers 200,
/// and a bare tonic server with `grpc.health.v1` (its unary `Check`) and a
/// `GetOrder` that answers `order` from memory.
fn start_bare() -> Subject {
    start_bare_with(Order::default())
}

fn start_bare_with(order: Order) -> Subject {
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
    Subject { http: addresses.0, grpc: addresses.1, stop, thread }
}

async fn bare_http(listener: tokio::net::TcpListener, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let service = service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
            let _ = request.into_body().collect().await;
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                b"{\"outcome\":\"applied\"}",
            ))))
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

fn fresh_dir() -> PathBuf {
    std::env::temp_dir().join(format!("ordertrail-bench-{}-{}", std::process::id(), next_run()))
}

/// ordertrail with `mode` on `dir`; returns once it answers `/readyz`.
async fn start_ordertrail(dir: &Path, mode: Mode, extra: &str) -> (Subject, Duration) {
    let durability = if mode == Mode::Fsync { "fsync" } else { "flush" };
    let unsafe_ack = mode == Mode::None;
    let cache = cache_mib().map(|mib| format!("cache_capacity_bytes = {}\n", mib << 20));
    let text = format!(
        // The one-off background verification after start is not what the
        // scenarios measure.
        "[store]\ndata_dir = {:?}\ndurability = \"{durability}\"\nunsafe_ack_before_durable = {unsafe_ack}\n\
         verify_on_start = false\n{}{extra}\n{}",
        dir.display().to_string(),
        cache.unwrap_or_default(),
        sources_toml()
    );
    let config = Config::from_toml(&text, &|_| None).expect("bench config");
    let (http, grpc, admin) = (loopback(), loopback(), loopback());
    let (http_addr, grpc_addr) = (http.local_addr().expect("address"), grpc.local_addr().expect("address"));
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
    (Subject { http: http_addr, grpc: grpc_addr, stop, thread }, startup)
}

/// A connected gRPC channel to `address` (TCP_NODELAY, as the servers).
async fn grpc_channel(address: SocketAddr) -> Channel {
    let channel = Channel::from_shared(format!("http://{address}")).expect("uri").tcp_nodelay(true);
    channel.connect().await.expect("connect")
}

async fn grpc_client(address: SocketAddr) -> OrderTrailClient<Channel> {
    OrderTrailClient::new(grpc_channel(address).await).max_decoding_message_size(64 << 20)
}

// === output ===

fn median(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    let mut values: Vec<f64> = samples.iter().map(value).collect();
    values.sort_by(f64::total_cmp);
    let min = values.first().copied().unwrap_or(0.0);
    let max = values.last().copied().unwrap_or(0.0);
    (values.get(values.len() / 2).copied().unwrap_or(0.0), min, max)
}

fn header(what: &str) {
    println!(
        "| subject | {what} | per second (median, min–max) | p50 ms | p99 ms | p99.9 ms | ratio to baseline | server CPU ms per 1000 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
}

/// One table row: medians over the rounds (latencies too), min–max of the rate.
fn row(name: &str, point: &str, samples: &[Sample], baseline: f64) {
    let (rate, min, max) = median(samples, |s| s.per_second);
    let errors: u64 = samples.iter().map(|s| s.errors).sum();
    let note = if errors > 0 { format!(" ({errors} errors)") } else { String::new() };
    println!(
        "| {name}{note} | {point} | {rate:.0} ({min:.0}–{max:.0}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
        median(samples, |s| s.p50_ms).0,
        median(samples, |s| s.p99_ms).0,
        median(samples, |s| s.p999_ms).0,
        if baseline > 0.0 { rate / baseline } else { 0.0 },
        median(samples, |s| s.cpu_per_1000_ms).0,
    );
}

// === scenarios ===

async fn ingest(args: &Args, subjects: &[(&str, Mode)]) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    header("connections");
    let mut disk = Vec::new();
    for &connections in &args.connections {
        let mut baseline = Vec::new();
        let mut measured: Vec<Vec<Sample>> = vec![Vec::new(); subjects.len()];
        for _ in 0..args.rounds.max(1) {
            let bare = start_bare();
            baseline.push(closed_loop(bare.http, connections, seconds).await);
            bare.stop().await;
            for (i, (_, mode)) in subjects.iter().enumerate() {
                let dir = fresh_dir();
                let (subject, _) = start_ordertrail(&dir, *mode, "").await;
                let sample = closed_loop(subject.http, connections, seconds).await;
                subject.stop().await;
                disk.push(dir_bytes(&dir) as f64 / (sample.acknowledged as f64 * average_body_bytes()));
                let _ = std::fs::remove_dir_all(&dir);
                measured[i].push(sample);
            }
        }
        let base = median(&baseline, |s| s.per_second).0;
        row("bare hyper (baseline)", &connections.to_string(), &baseline, base);
        for (i, (name, _)) in subjects.iter().enumerate() {
            row(name, &connections.to_string(), &measured[i], base);
        }
    }
    disk.sort_by(f64::total_cmp);
    println!(
        "\nBytes on disk per raw webhook byte (data dir after a clean stop, median of {} runs): {:.1}",
        disk.len(),
        disk.get(disk.len() / 2).copied().unwrap_or(0.0)
    );
}

/// The storage engine's own ceiling: one thread doing, per delivery, the
/// sled reads and writes ordertrail's writer does for a new order (dedup
/// and three index reads; raw record, event, order, three index entries and
/// a dedup entry written, with the value sizes measured in a real store;
/// 128 deliveries per batch; ordertrail's default cache), no HTTP, no
/// mapping, no flush.
async fn sled_alone(args: &Args) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    let mut rates = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let dir = fresh_dir();
        let path = dir.clone();
        let cache_bytes = cache_mib().map_or(ordertrail::config::DEFAULT_CACHE_CAPACITY_BYTES, |mib| mib << 20);
        let rate = std::thread::Builder::new()
            .name("bench-sled".into())
            .spawn(move || {
                let db = sled::Config::new().path(path).cache_capacity(cache_bytes).open().expect("open sled");
                let key = |space: u8, parts: &[&[u8]]| [&[space][..], &parts.concat()].concat();
                let hash = |n: u64| n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes();
                let (raw, event, order) = (vec![7u8; 947], vec![8u8; 365], vec![9u8; 263]);
                let started = Instant::now();
                let mut batch = sled::Batch::default();
                let mut n = 0u64;
                while started.elapsed() < seconds {
                    n += 1;
                    let id = n.to_be_bytes();
                    let _ = db.get(key(b'd', &[&hash(n)])).expect("read");
                    for kind in [b'm', b'p', b's'] {
                        let _ = db.get(key(b'i', &[&[kind], &hash(n + u64::from(kind))])).expect("read");
                        batch.insert(key(b'i', &[&[kind], &hash(n + u64::from(kind))]), &id);
                    }
                    batch.insert(key(b'r', &[&id]), raw.clone());
                    batch.insert(key(b'e', &[&id]), event.clone());
                    batch.insert(key(b'o', &[&id]), order.clone());
                    batch.insert(key(b'd', &[&hash(n)]), &[1u8; 9]);
                    if n.is_multiple_of(128) {
                        db.apply_batch(std::mem::take(&mut batch)).expect("write");
                    }
                }
                n as f64 / started.elapsed().as_secs_f64()
            })
            .expect("thread")
            .join()
            .expect("sled alone");
        let _ = std::fs::remove_dir_all(&dir);
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "\nsled alone (the writer's sled reads and writes of a new order, one thread, no HTTP, no flush): \
         {:.0} deliveries/s (median of {}, {:.0}–{:.0}).",
        rates[rates.len() / 2],
        rates.len(),
        rates[0],
        rates[rates.len() - 1]
    );
}

/// Mean body size of the generated webhooks.
fn average_body_bytes() -> f64 {
    (0..3).map(|n| webhook(1, n).body.len() as f64).sum::<f64>() / 3.0
}

async fn ingest_latency(args: &Args) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    let dir = fresh_dir();
    let (subject, _) = start_ordertrail(&dir, Mode::Fsync, "").await;
    let max_ordertrail = closed_loop(subject.http, 64, seconds).await.per_second;
    subject.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    println!("Measured maximum (64 connections, closed loop): ordertrail {max_ordertrail:.0} webhooks/s.\n");
    println!("Open loop; latency from each request's scheduled send time. The baseline gets the same offered rates.\n");
    header("offered rate");
    for share in [0.25, 0.5, 0.8] {
        let rate = max_ordertrail * share;
        let (mut baseline, mut measured) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds.max(1) {
            let bare = start_bare();
            baseline.push(open_loop(bare.http, rate, seconds).await);
            bare.stop().await;
            let dir = fresh_dir();
            let (subject, _) = start_ordertrail(&dir, Mode::Fsync, "").await;
            measured.push(open_loop(subject.http, rate, seconds).await);
            subject.stop().await;
            let _ = std::fs::remove_dir_all(&dir);
        }
        let point = format!("{:.0} % ({rate:.0}/s)", share * 100.0);
        let base = median(&baseline, |s| s.per_second).0;
        row("bare hyper (baseline)", &point, &baseline, base);
        row("ordertrail fsync", &point, &measured, base);
    }
}

/// A reference kind to look orders up by, and the request for order `n`.
type LookupKind = (&'static str, fn(u64, u64) -> Option<Reference>);

const LOOKUPS: [LookupKind; 4] = [
    ("external_order_id", |run, n| Some(Reference::ExternalOrderId(merchant_ref(run, n - n % 3)))),
    ("provider_order_id", |run, n| Some(Reference::ProviderOrderId(ordermesh_id(run, n - n % 3)))),
    ("safe_id", |run, n| Some(Reference::SafeId(safe_id(run, n - n % 3)))),
    ("tracking_number", |run, n| {
        let n = n - n % 3 + 2;
        Some(Reference::TrackingNumber(tracking(run, n)))
    }),
];

/// A unary call the lookup scenario makes.
#[derive(Clone, Copy)]
enum Call {
    /// GetOrder for random stored orders by this reference kind.
    GetOrder(LookupKind),
    /// `grpc.health.v1.Health/Check` (a 2-byte answer).
    Health,
}

impl Call {
    /// Makes the call (for stored order `n`); true if it was answered OK.
    async fn make(
        self,
        orders: &mut OrderTrailClient<Channel>,
        health: &mut tonic_health::pb::health_client::HealthClient<Channel>,
        run: u64,
        n: u64,
    ) -> bool {
        match self {
            Self::GetOrder((_, reference)) => {
                let request = GetOrderRequest { reference: reference(run, n), source: String::new() };
                orders.get_order(request).await.is_ok()
            }
            Self::Health => health.check(tonic_health::pb::HealthCheckRequest::default()).await.is_ok(),
        }
    }
}

/// `call` at a fixed `rate` for `duration` (see [`scheduled`]), for random
/// stored orders.
async fn unary_open_loop(
    address: SocketAddr,
    call: Call,
    run: u64,
    orders: u64,
    rate: f64,
    duration: Duration,
) -> Sample {
    let channel = grpc_channel(address).await;
    scheduled(rate, duration, move |i| {
        let channel = channel.clone();
        // splitmix64 of i: a spread of stored orders, the same in every run.
        let mut z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let n = (z ^ (z >> 31)) % orders.saturating_sub(3).max(1);
        async move {
            let mut orders_client = OrderTrailClient::new(channel.clone());
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            call.make(&mut orders_client, &mut health, run, n).await
        }
    })
    .await
}

/// `concurrency` callers making `call` for `duration`.
async fn unary_load(
    address: SocketAddr,
    call: Call,
    run: u64,
    orders: u64,
    concurrency: usize,
    duration: Duration,
) -> Sample {
    let channel = grpc_channel(address).await;
    let cpu = ServerCpu::start();
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let channel = channel.clone();
        workers.spawn(async move {
            let mut orders_client = OrderTrailClient::new(channel.clone());
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let mut random = 0x9E37_79B9_7F4A_7C15u64 ^ (worker as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                let sent = Instant::now();
                let ok =
                    call.make(&mut orders_client, &mut health, run, random % orders.saturating_sub(3).max(1)).await;
                if ok {
                    latencies.push(sent.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        });
    }
    let (latencies, errors) = join_latencies(workers).await;
    sample(latencies, errors, started.elapsed(), cpu.used())
}

/// A stored order of median encoded size (over a sample of every kind), for
/// the baseline to answer from memory.
async fn typical_order(address: SocketAddr, run: u64) -> Order {
    let mut client = grpc_client(address).await;
    let mut found = Vec::new();
    for n in 0..30 {
        for (_, reference) in LOOKUPS {
            let request = GetOrderRequest { reference: reference(run, n), source: String::new() };
            if let Ok(order) = client.get_order(request).await {
                found.push(order.into_inner());
            }
        }
    }
    found.sort_by_key(prost::Message::encoded_len);
    found.get(found.len() / 2).cloned().expect("stored orders")
}

/// A data dir with `orders` webhooks stored; returns it and the run id.
/// With `--keep-data` it is kept and reused by later runs.
async fn prepared(orders: u64) -> (PathBuf, u64) {
    let kept = SETTINGS.get().and_then(|s| s.1.clone()).map(|keep| keep.join(format!("orders-{orders}")));
    if let Some(dir) = &kept
        && let Ok(run) = std::fs::read_to_string(dir.join("bench-run"))
    {
        return (dir.clone(), run.trim().parse().expect("bench-run"));
    }
    let dir = kept.clone().unwrap_or_else(fresh_dir);
    let _ = std::fs::remove_dir_all(&dir);
    let run = next_run();
    let (subject, _) = start_ordertrail(&dir, Mode::Flush, "").await;
    populate(subject.http, run, orders).await;
    subject.stop().await;
    std::fs::write(dir.join("bench-run"), run.to_string()).expect("write bench-run");
    (dir, run)
}

/// Removes a data dir unless `--keep-data` keeps it.
fn discard(dir: &Path) {
    let keep = SETTINGS.get().and_then(|s| s.1.as_deref());
    if !keep.is_some_and(|keep| dir.starts_with(keep)) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

async fn lookup(args: &Args) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    let (dir, run) = prepared(args.orders).await;
    let (subject, _) = start_ordertrail(&dir, Mode::Fsync, "").await;
    let order = typical_order(subject.grpc, run).await;
    subject.stop().await;
    println!(
        "GetOrder with {} webhooks stored (a third each per provider). Baseline: a bare tonic server answering the \
         same GetOrder call with one stored order ({} bytes encoded) from memory; a bare health Check (2 bytes) for \
         reference.\n",
        args.orders,
        prost::Message::encoded_len(&order)
    );
    header("in flight");
    for &concurrency in &args.connections {
        let (mut baseline, mut health) = (Vec::new(), Vec::new());
        let mut measured: Vec<Vec<Sample>> = vec![Vec::new(); LOOKUPS.len()];
        for _ in 0..args.rounds.max(1) {
            let bare = start_bare_with(order.clone());
            baseline
                .push(unary_load(bare.grpc, Call::GetOrder(LOOKUPS[0]), run, args.orders, concurrency, seconds).await);
            health.push(unary_load(bare.grpc, Call::Health, run, args.orders, concurrency, seconds).await);
            bare.stop().await;
            let (subject, _) = start_ordertrail(&dir, Mode::Fsync, "").await;
            for (i, kind) in LOOKUPS.iter().enumerate() {
                let call = Call::GetOrder(*kind);
                measured[i].push(unary_load(subject.grpc, call, run, args.orders, concurrency, seconds).await);
            }
            subject.stop().await;
        }
        let base = median(&baseline, |s| s.per_second).0;
        row("bare tonic GetOrder from memory (baseline)", &concurrency.to_string(), &baseline, base);
        row("bare tonic health Check (reference)", &concurrency.to_string(), &health, base);
        for (i, (name, _)) in LOOKUPS.iter().enumerate() {
            row(&format!("GetOrder by {name}"), &concurrency.to_string(), &measured[i], base);
        }
    }
    discard(&dir);
}

/// What `scale` measured of one data set size, a value per round.
#[derive(Default)]
struct ScaleRuns {
    /// 16 in flight.
    closed: Vec<Sample>,
    /// At `--lookup-rate`.
    open: Vec<Sample>,
    startups: Vec<f64>,
    rss: Vec<f64>,
}

async fn scale(args: &Args) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    let rate = args.lookup_rate as f64;
    println!(
        "ordertrail as its own process; GetOrder by external_order_id for random stored orders, measured twice: \
         closed loop with 16 in flight (saturated: latency there is mostly queueing, 16 / rate), and open loop at \
         {} lookups/s for both sizes (latency from each request's scheduled send time); start-up = process start to \
         /readyz answering (open + recovery); rounds alternate the two sizes.\n",
        args.lookup_rate
    );
    println!(
        "| orders stored | GetOrder/s, 16 in flight | p50 ms | p99 ms | p99 ratio to the small case | open loop {}/s: p99 ms | open-loop p99 ratio | start-up s | RSS MiB after the lookups | data dir MiB |",
        args.lookup_rate
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // Both data sets first, then rounds alternating small and large.
    let cases = [prepared(args.small_orders).await, prepared(args.orders).await];
    let sizes = [args.small_orders, args.orders];
    let mut measured: [ScaleRuns; 2] = Default::default();
    for _ in 0..args.rounds.max(1) {
        for (i, (dir, run)) in cases.iter().enumerate() {
            let child = ServeProcess::start(dir).await;
            let runs = &mut measured[i];
            runs.startups.push(child.startup.as_secs_f64());
            let call = Call::GetOrder(LOOKUPS[0]);
            runs.closed.push(unary_load(child.grpc, call, *run, sizes[i], 16, seconds).await);
            runs.open.push(unary_open_loop(child.grpc, call, *run, sizes[i], rate, seconds).await);
            runs.rss.push(child.rss_mib());
            child.stop().await;
        }
    }
    let small_p99 = median(&measured[0].closed, |s| s.p99_ms).0;
    let small_open_p99 = median(&measured[0].open, |s| s.p99_ms).0;
    for (i, ScaleRuns { closed, open, startups, rss }) in measured.iter_mut().enumerate() {
        let p99 = median(closed, |s| s.p99_ms).0;
        let open_p99 = median(open, |s| s.p99_ms).0;
        let errors: u64 = closed.iter().chain(open.iter()).map(|s| s.errors).sum();
        let open_cell = if errors > 0 { format!("{open_p99:.2} ({errors} errors)") } else { format!("{open_p99:.2}") };
        startups.sort_by(f64::total_cmp);
        rss.sort_by(f64::total_cmp);
        println!(
            "| {} | {:.0} | {:.2} | {p99:.2} | {:.2} | {open_cell} | {:.2} | {:.2} | {:.0} | {:.0} |",
            sizes[i],
            median(closed, |s| s.per_second).0,
            median(closed, |s| s.p50_ms).0,
            p99 / small_p99,
            open_p99 / small_open_p99,
            startups[startups.len() / 2],
            rss[rss.len() / 2],
            dir_bytes(&cases[i].0) as f64 / (1 << 20) as f64,
        );
    }
    for (dir, _) in &cases {
        discard(dir);
    }
}

async fn serve(dir: &Path) {
    let (subject, _) = start_ordertrail(dir, Mode::Fsync, "").await;
    println!("{} {}", subject.http, subject.grpc);
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1])).await;
    subject.stop().await;
}

/// ordertrail in a child process (this binary's `serve`), for memory and
/// start-up measured without the load generator.
struct ServeProcess {
    child: std::process::Child,
    grpc: SocketAddr,
    startup: Duration,
}

impl ServeProcess {
    async fn start(dir: &Path) -> Self {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let started = Instant::now();
            let mut command = std::process::Command::new(std::env::current_exe().expect("own path"));
            command.args(["serve", "--data-dir"]).arg(dir);
            if let Some(mib) = cache_mib() {
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

    fn rss_mib(&self) -> f64 {
        rss_mib(&format!("/proc/{}/status", self.child.id()))
    }

    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::task::spawn_blocking(move || self.child.wait()).await;
    }
}

async fn catch_up(args: &Args) {
    let (dir, _) = prepared(args.orders).await;
    println!(
        "Replay of {} stored events to one subscriber from sequence 0 until `caught_up`; the client checks each \
         event's sequence (gap-free) without decoding the rest.\n",
        args.orders
    );
    println!("| subject | events | events/s (median, min–max) | ratio to baseline |");
    println!("|---|---|---|---|");
    let (mut baseline, mut measured, mut replayed) = (Vec::new(), Vec::new(), 0);
    // Alternate which side goes first, so neither always meets a cold page cache.
    for round in 0..args.rounds.max(1) {
        if round % 2 == 0 {
            baseline.push(scan_events(&dir).await);
        }
        let (sample, count) = replay_events(&dir).await;
        measured.push(sample);
        replayed = count;
        if round % 2 == 1 {
            baseline.push(scan_events(&dir).await);
        }
    }
    let base = median(&baseline, |s| s.per_second);
    let ours = median(&measured, |s| s.per_second);
    println!(
        "| raw sled scan of the event keys (baseline) | {replayed} | {:.0} ({:.0}–{:.0}) | 1.00 |",
        base.0, base.1, base.2
    );
    println!(
        "| Subscribe replay | {replayed} | {:.0} ({:.0}–{:.0}) | {:.2} |",
        ours.0,
        ours.1,
        ours.2,
        ours.0 / base.0
    );
    discard(&dir);
}

/// A raw sled scan of every event key (the catch-up baseline).
async fn scan_events(dir: &Path) -> Sample {
    let db = dir.join("sled");
    let scan = tokio::task::spawn_blocking(move || {
        let tree = sled::open(db).expect("open sled");
        let started = Instant::now();
        let mut count = 0u64;
        for entry in tree.scan_prefix(b"e") {
            let (_, value) = entry.expect("read");
            count += u64::from(!value.is_empty());
        }
        Sample { per_second: count as f64 / started.elapsed().as_secs_f64(), ..Sample::default() }
    });
    scan.await.expect("scan")
}

/// One subscriber replaying every stored event from sequence 0 until
/// `caught_up`, checking the sequences are gap-free; returns the rate and
/// how many events it got.
async fn replay_events(dir: &Path) -> (Sample, u64) {
    let (subject, _) = start_ordertrail(dir, Mode::Fsync, "").await;
    let channel = grpc_channel(subject.grpc).await;
    let started = Instant::now();
    let request = SubscribeRequest { after_sequence: Some(0), ..SubscribeRequest::default() };
    let mut stream = wire::subscribe_sequences(channel, request).await.expect("subscribe");
    let mut count = 0u64;
    while let Some(seen) = stream.message().await.expect("stream") {
        match seen {
            wire::Seen::Event(sequence) => {
                count += 1;
                assert_eq!(sequence, count, "gap-free replay");
            }
            wire::Seen::CaughtUp(_) => break,
            wire::Seen::Other => {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(stream);
    subject.stop().await;
    (Sample { per_second: count as f64 / elapsed, ..Sample::default() }, count)
}

/// What the subscribers of one fan-out run saw.
#[derive(Default)]
struct Fanned {
    /// Per subscriber: events received, and whether they were gap-free.
    counts: Vec<(u64, bool)>,
    /// Webhook received → event at a (sampled) subscriber.
    latencies: Vec<Duration>,
}

async fn fan_out(args: &Args) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    let extra = "[grpc]\nmax_subscriptions = 5000\nmax_concurrent_streams = 1024\n";
    println!(
        "Open-loop ingest at {} webhooks/s; each subscriber follows every event live; after the load, up to 30 s for every subscriber to receive every event.\n",
        args.rate
    );
    println!(
        "| subscribers | acknowledged webhooks/s (median, min–max) | ratio to 0 subscribers | ack p99 ms | every subscriber got every event | webhook → subscriber p50 / p99 ms | server CPU ms per 1000 |"
    );
    println!("|---|---|---|---|---|---|---|");
    // Rounds outside, subscriber counts inside: A/B/A/B against 0 subscribers.
    let mut runs: Vec<(Vec<Sample>, bool, Vec<Duration>)> =
        vec![(Vec::new(), true, Vec::new()); args.subscribers.len()];
    for _ in 0..args.rounds.max(1) {
        for (i, &subscribers) in args.subscribers.iter().enumerate() {
            let (sample, complete, latencies) = fan_out_once(subscribers, args.rate, seconds, extra).await;
            runs[i].0.push(sample);
            runs[i].1 &= complete;
            runs[i].2.extend(latencies);
        }
    }
    let base = median(&runs[0].0, |s| s.per_second).0;
    for (&subscribers, (samples, complete, mut latencies)) in args.subscribers.iter().zip(runs) {
        let (rate, min, max) = median(&samples, |s| s.per_second);
        latencies.sort();
        let percentile = |p: f64| percentile_ms(&latencies, p);
        let delivered =
            if subscribers == 0 { "—".to_string() } else { if complete { "yes" } else { "NO" }.to_string() };
        let latency = if subscribers == 0 {
            "—".to_string()
        } else {
            format!("{:.2} / {:.2}", percentile(0.5), percentile(0.99))
        };
        println!(
            "| {subscribers} | {rate:.0} ({min:.0}–{max:.0}) | {:.2} | {:.2} | {delivered} | {latency} | {:.0} |",
            rate / base,
            median(&samples, |s| s.p99_ms).0,
            median(&samples, |s| s.cpu_per_1000_ms).0,
        );
    }
}

/// One fan-out run: the ingest sample, whether every subscriber got every
/// acknowledged event gap-free, and the sampled delivery latencies.
async fn fan_out_once(subscribers: usize, rate: u64, seconds: Duration, extra: &str) -> (Sample, bool, Vec<Duration>) {
    let dir = fresh_dir();
    let (subject, _) = start_ordertrail(&dir, Mode::Fsync, extra).await;
    let stop = CancellationToken::new();
    let progress = Arc::new(AtomicU64::new(0));
    let listeners = start_subscribers(subject.grpc, subscribers, stop.clone(), progress.clone()).await;
    let sample = open_loop(subject.http, rate as f64, seconds).await;
    let acked = sample.acknowledged;
    // Let the subscribers drain what was committed (up to 30 s), then stop them.
    let head = Instant::now() + Duration::from_secs(30);
    while subscribers > 0 && progress.load(Ordering::Relaxed) < acked * subscribers as u64 && Instant::now() < head {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let seen = listeners.await.expect("subscribers");
    let complete = seen.counts.iter().all(|&(count, gap_free)| gap_free && count >= acked);
    subject.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    (sample, complete, seen.latencies)
}

/// Starts `count` live subscribers (from now) spread over several
/// connections, counting every event they get into `progress`; the
/// returned task ends once `stop` is cancelled. The first
/// ten measure webhook-received → event-here latency from the event's
/// `received_at` (same clock).
async fn start_subscribers(
    address: SocketAddr,
    count: usize,
    stop: CancellationToken,
    progress: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Fanned> {
    let mut channels = Vec::new();
    for _ in 0..count.div_ceil(200) {
        channels.push(grpc_channel(address).await);
    }
    let mut streams = Vec::new();
    for i in 0..count {
        let mut client = OrderTrailClient::new(channels[i / 200].clone());
        let request = SubscribeRequest::default();
        streams.push(client.subscribe(request).await.expect("subscribe").into_inner());
    }
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, mut stream) in streams.into_iter().enumerate() {
            let (stop, progress) = (stop.clone(), progress.clone());
            tasks.spawn(async move {
                let (mut count, mut gap_free, mut last, mut latencies) = (0u64, true, 0u64, Vec::new());
                loop {
                    let message = tokio::select! {
                        message = stream.message() => message,
                        () = stop.cancelled() => break,
                    };
                    let Ok(Some(message)) = message else { break };
                    if let Some(Streamed::Event(event)) = message.message {
                        gap_free &= last == 0 || event.sequence == last + 1;
                        last = event.sequence;
                        count += 1;
                        progress.fetch_add(1, Ordering::Relaxed);
                        if i < 10
                            && let Some(received) = event.received_at
                        {
                            let at =
                                SystemTime::UNIX_EPOCH + Duration::new(received.seconds as u64, received.nanos as u32);
                            latencies.push(SystemTime::now().duration_since(at).unwrap_or_default());
                        }
                    }
                }
                (count, gap_free, latencies)
            });
        }
        let mut fanned = Fanned::default();
        while let Some(Ok((count, gap_free, mut latencies))) = tasks.join_next().await {
            fanned.counts.push((count, gap_free));
            fanned.latencies.append(&mut latencies);
        }
        fanned
    })
}
