//! `fan-out`: ingest at a fixed rate with live subscribers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ordertrail::proto::SubscribeRequest;
use ordertrail::proto::order_trail_client::OrderTrailClient;
use ordertrail::proto::subscribe_response::Message as Streamed;
use tokio_util::sync::CancellationToken;

use crate::load::open_loop;
use crate::measure::{Sample, percentile_ms};
use crate::report::median;
use crate::servers::{Mode, fresh_dir, grpc_channel, start_ordertrail};
use crate::{Args, Settings};

/// What the subscribers of one fan-out run saw.
#[derive(Default)]
pub(crate) struct Fanned {
    /// Per subscriber: events received, and whether they were gap-free.
    pub(crate) counts: Vec<(u64, bool)>,
    /// Webhook received → event at a (sampled) subscriber.
    pub(crate) latencies: Vec<Duration>,
}

pub(crate) async fn fan_out(args: &Args) {
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
            let (sample, complete, latencies) =
                fan_out_once(subscribers, args.rate, seconds, extra, &args.settings()).await;
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
pub(crate) async fn fan_out_once(
    subscribers: usize,
    rate: u64,
    seconds: Duration,
    extra: &str,
    settings: &Settings,
) -> (Sample, bool, Vec<Duration>) {
    let dir = fresh_dir();
    let (subject, _) = start_ordertrail(&dir, Mode::Fsync, extra, settings).await;
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
pub(crate) async fn start_subscribers(
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
