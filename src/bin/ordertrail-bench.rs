//! `ordertrail-bench`: the project's own benchmark. It starts what it
//! measures itself, on loopback, and always measures against a baseline in
//! the same run, alternating A/B/A/B so ratios hold on a noisy machine.
//!
//! Scenarios (so far):
//! - `ingest`: durable webhooks/s and ack latency of ordertrail (default
//!   `fsync` durability) against a bare hyper server that reads the body
//!   and answers 200, with the same load generator and connection counts.
//! - `durability`: the same load against ordertrail in `fsync` and `flush`
//!   mode, against the bare server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ordertrail::config::Config;
use ordertrail::server::{self, Listeners};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "ordertrail-bench", about = "Benchmarks ordertrail against a baseline measured in the same run")]
struct Args {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent connections to measure at (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64, 256])]
    connections: Vec<usize>,
    /// A/B rounds per point (each round measures the baseline and the subject).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scenario {
    Ingest,
    Durability,
}

/// One measurement.
#[derive(Clone, Debug)]
struct Sample {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let seconds = Duration::from_secs(args.seconds.max(1));
    let subjects: Vec<(&str, Option<&str>)> = match args.scenario {
        Scenario::Ingest => vec![("ordertrail fsync", Some("fsync"))],
        Scenario::Durability => vec![("ordertrail fsync", Some("fsync")), ("ordertrail flush", Some("flush"))],
    };
    println!(
        "| subject | connections | webhooks/s (median, min–max) | p50 ms | p99 ms | p99.9 ms | ratio to baseline |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &connections in &args.connections {
        let mut baseline = Vec::new();
        let mut measured: Vec<Vec<Sample>> = vec![Vec::new(); subjects.len()];
        for _ in 0..args.rounds.max(1) {
            baseline.push(measure(None, connections, seconds).await);
            for (i, (_, durability)) in subjects.iter().enumerate() {
                measured[i].push(measure(*durability, connections, seconds).await);
            }
        }
        let base = median(&baseline);
        print_row("bare hyper (baseline)", connections, &baseline, base);
        for (i, (name, _)) in subjects.iter().enumerate() {
            print_row(name, connections, &measured[i], base);
        }
    }
}

fn median(samples: &[Sample]) -> f64 {
    let mut rates: Vec<f64> = samples.iter().map(|s| s.per_second).collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn print_row(name: &str, connections: usize, samples: &[Sample], baseline: f64) {
    let rate = median(samples);
    let min = samples.iter().map(|s| s.per_second).fold(f64::INFINITY, f64::min);
    let max = samples.iter().map(|s| s.per_second).fold(0.0, f64::max);
    let last = samples.last().cloned().unwrap_or(Sample {
        per_second: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        p999_ms: 0.0,
        errors: 0,
    });
    let errors: u64 = samples.iter().map(|s| s.errors).sum();
    let note = if errors > 0 { format!(" ({errors} errors)") } else { String::new() };
    println!(
        "| {name}{note} | {connections} | {rate:.0} ({min:.0}–{max:.0}) | {:.2} | {:.2} | {:.2} | {:.2} |",
        last.p50_ms,
        last.p99_ms,
        last.p999_ms,
        rate / baseline
    );
}

/// Starts the subject (`None`: the bare baseline), drives it, stops it.
async fn measure(durability: Option<&str>, connections: usize, duration: Duration) -> Sample {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let stop = CancellationToken::new();
    let (task, data_dir) = match durability {
        None => (tokio::spawn(bare_server(listener, stop.clone())), None),
        Some(mode) => {
            let dir = std::env::temp_dir().join(format!("ordertrail-bench-{}-{}", std::process::id(), unique()));
            let text = format!("[store]\ndata_dir = {:?}\ndurability = \"{mode}\"\n", dir.display().to_string());
            let config = Config::from_toml(&text, &|_| None).expect("bench config");
            let listeners = Listeners {
                http: listener,
                grpc: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                admin: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            };
            let stop = stop.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = server::run(config, listeners, stop).await {
                    eprintln!("ordertrail-bench: server failed: {e}");
                }
            });
            (task, Some(dir))
        }
    };
    let sample = drive(address, connections, duration).await;
    stop.cancel();
    let _ = task.await;
    if let Some(dir) = data_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    sample
}

/// A bare hyper server: reads the body, answers 200.
async fn bare_server(listener: TcpListener, stop: CancellationToken) {
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

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `connections` workers send unique OrderMesh webhooks back to back for
/// `duration`; returns the rate and latency percentiles of 2xx answers.
async fn drive(address: SocketAddr, connections: usize, duration: Duration) -> Sample {
    let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(connections).build_http::<Full<Bytes>>();
    let deadline = Instant::now() + duration;
    let run = unique();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..connections {
        let client = client.clone();
        workers.spawn(async move {
            let (mut latencies, mut errors, mut n) = (Vec::new(), 0u64, 0u64);
            while Instant::now() < deadline {
                n += 1;
                let body = format!(
                    r#"{{"NewStatus":"ReadyForFulfillment","OldStatus":"Open","OrderId":"b{run}-{worker}-{n}","ExternalOrderId":"E{run}-{worker}-{n}","SafeId":"S{run}-{worker}-{n}","Description":"Order updated: status updated from Open to ReadyForFulfillment","SubscriberId":"261c6102-0b72-4506-9a84-98a80a03e7f0","RequestId":"0HN7A6B4H3FDT:00000009","EventType":"OrderUpdate"}}"#
                );
                let request = hyper::Request::post(format!("http://{address}/webhooks/ordermesh"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .expect("request");
                let started = Instant::now();
                match client.request(request).await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.into_body().collect().await;
                        latencies.push(started.elapsed());
                    }
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        });
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for (mut l, e) in workers.join_all().await {
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = started.elapsed().max(duration).as_secs_f64();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Sample {
        per_second: latencies.len() as f64 / elapsed,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        p999_ms: percentile(0.999),
        errors,
    }
}
