//! The load: unique, authenticated webhooks from the three providers' documented
//! payloads, sent back to back (closed loop) or on a schedule (open loop).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::measure::{Sample, ServerCpu, sample};

pub(crate) const HMAC_KEY: &str = "bench-ordermesh-signing-key-32-bytes!!";
pub(crate) const API_KEY: &str = "bench-winkelstraat-api-key";
pub(crate) const TOKEN: &str = "bench-withings-token";

/// The sources every ordertrail under test is configured with.
pub(crate) fn sources_toml() -> String {
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

pub(crate) const ORDERMESH: &str = include_str!("../../../tests/fixtures/ordermesh/order-creation.json");
pub(crate) const WINKELSTRAAT: &str = include_str!("../../../tests/fixtures/winkelstraat/order.json");
pub(crate) const WITHINGS: &str = include_str!("../../../tests/fixtures/withings/documented-example.form");

/// Webhook `n` of a run: provider `n % 3`, references derived from
/// `(run, n)` so a lookup can name them later.
pub(crate) struct Webhook {
    pub(crate) path: String,
    pub(crate) content_type: &'static str,
    pub(crate) header: Option<(&'static str, String)>,
    pub(crate) body: Bytes,
}

pub(crate) fn webhook(run: u64, n: u64) -> Webhook {
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

pub(crate) fn ordermesh_id(run: u64, n: u64) -> String {
    format!("om{run}-{n}")
}
pub(crate) fn merchant_ref(run: u64, n: u64) -> String {
    format!("E{run}-{n}")
}
pub(crate) fn safe_id(run: u64, n: u64) -> String {
    format!("S{run}-{n}")
}
pub(crate) fn tracking(run: u64, n: u64) -> String {
    format!("1Z{run}X{n}")
}

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub(crate) fn http_client(connections: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(connections).build(connector)
}

/// Sends webhook `n`; true on a 2xx answer.
pub(crate) async fn send(client: &HttpClient, address: SocketAddr, run: u64, n: u64) -> bool {
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

pub(crate) fn next_run() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) * 1000 + std::process::id() as u64 % 1000
}

/// `connections` workers send webhooks back to back for `duration`.
pub(crate) async fn closed_loop(address: SocketAddr, connections: usize, duration: Duration) -> Sample {
    closed_loop_over(&[address], connections, duration).await
}

/// [`closed_loop`] with the workers spread over `addresses` in turn.
pub(crate) async fn closed_loop_over(addresses: &[SocketAddr], connections: usize, duration: Duration) -> Sample {
    let client = http_client(connections);
    let run = next_run();
    let next = Arc::new(AtomicU64::new(0));
    let cpu = ServerCpu::start();
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..connections {
        let (client, next) = (client.clone(), next.clone());
        let address = addresses[worker % addresses.len()];
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
pub(crate) async fn open_loop(address: SocketAddr, rate: f64, duration: Duration) -> Sample {
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
pub(crate) async fn scheduled<F, R>(rate: f64, duration: Duration, request: F) -> Sample
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

pub(crate) async fn join_latencies(workers: tokio::task::JoinSet<(Vec<Duration>, u64)>) -> (Vec<Duration>, u64) {
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for (mut l, e) in workers.join_all().await {
        latencies.append(&mut l);
        errors += e;
    }
    (latencies, errors)
}

/// Stores webhooks `0..count` of `run` (as many connections as useful).
pub(crate) async fn populate(address: SocketAddr, run: u64, count: u64) {
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
