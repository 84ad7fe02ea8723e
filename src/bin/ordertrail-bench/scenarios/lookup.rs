//! `lookup` and `scale`: GetOrder against a bare tonic server answering from
//! memory, and how it changes from a small store to a large one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ordertrail::proto::get_order_request::Reference;
use ordertrail::proto::order_trail_client::OrderTrailClient;
use ordertrail::proto::{GetOrderRequest, Order};
use tonic::transport::Channel;

use crate::load::{join_latencies, merchant_ref, next_run, ordermesh_id, populate, safe_id, scheduled, tracking};
use crate::measure::{Sample, ServerCpu, dir_bytes, sample};
use crate::report::{header, median, median_of, row};
use crate::servers::{Mode, ServeProcess, fresh_dir, grpc_channel, grpc_client, start_bare_with, start_ordertrail};
use crate::{Args, Settings};

/// A reference kind to look orders up by, and the request for order `n`.
pub(crate) type LookupKind = (&'static str, fn(u64, u64) -> Option<Reference>);

pub(crate) const LOOKUPS: [LookupKind; 4] = [
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
pub(crate) enum Call {
    /// GetOrder for random stored orders by this reference kind.
    GetOrder(LookupKind),
    /// `grpc.health.v1.Health/Check` (a 2-byte answer).
    Health,
}

impl Call {
    /// Makes the call (for stored order `n`); true if it was answered OK.
    pub(crate) async fn make(
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
pub(crate) async fn unary_open_loop(
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
pub(crate) async fn unary_load(
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
pub(crate) async fn typical_order(address: SocketAddr, run: u64) -> Order {
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
pub(crate) async fn prepared(orders: u64, settings: &Settings) -> (PathBuf, u64) {
    let kept = settings.keep_data.as_ref().map(|keep| keep.join(format!("orders-{orders}")));
    if let Some(dir) = &kept
        && let Ok(run) = std::fs::read_to_string(dir.join("bench-run"))
    {
        return (dir.clone(), run.trim().parse().expect("bench-run"));
    }
    let dir = kept.clone().unwrap_or_else(fresh_dir);
    let _ = std::fs::remove_dir_all(&dir);
    let run = next_run();
    let (subject, _) = start_ordertrail(&dir, Mode::Flush, "", settings).await;
    populate(subject.http, run, orders).await;
    subject.stop().await;
    std::fs::write(dir.join("bench-run"), run.to_string()).expect("write bench-run");
    (dir, run)
}

/// Removes a data dir unless `--keep-data` keeps it.
pub(crate) fn discard(dir: &Path, settings: &Settings) {
    let keep = settings.keep_data.as_deref();
    if !keep.is_some_and(|keep| dir.starts_with(keep)) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

pub(crate) async fn lookup(args: &Args) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    let settings = args.settings();
    let (dir, run) = prepared(args.orders, &settings).await;
    let (subject, _) = start_ordertrail(&dir, Mode::Fsync, "", &settings).await;
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
            let (subject, _) = start_ordertrail(&dir, Mode::Fsync, "", &settings).await;
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
    discard(&dir, &settings);
}

/// What `scale` measured of one data set size, a value per round.
#[derive(Default)]
pub(crate) struct ScaleRuns {
    /// 16 in flight.
    pub(crate) closed: Vec<Sample>,
    /// At `--lookup-rate`.
    pub(crate) open: Vec<Sample>,
    pub(crate) startups: Vec<f64>,
    pub(crate) rss: Vec<f64>,
}

pub(crate) async fn scale(args: &Args) {
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
    let settings = args.settings();
    let cases = [prepared(args.small_orders, &settings).await, prepared(args.orders, &settings).await];
    let sizes = [args.small_orders, args.orders];
    let mut measured: [ScaleRuns; 2] = Default::default();
    for _ in 0..args.rounds.max(1) {
        for (i, (dir, run)) in cases.iter().enumerate() {
            let child = ServeProcess::start(dir, &settings).await;
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
        println!(
            "| {} | {:.0} | {:.2} | {p99:.2} | {:.2} | {open_cell} | {:.2} | {:.2} | {:.0} | {:.0} |",
            sizes[i],
            median(closed, |s| s.per_second).0,
            median(closed, |s| s.p50_ms).0,
            p99 / small_p99,
            open_p99 / small_open_p99,
            median_of(startups.clone()).0,
            median_of(rss.clone()).0,
            dir_bytes(&cases[i].0) as f64 / (1 << 20) as f64,
        );
    }
    for (dir, _) in &cases {
        discard(dir, &settings);
    }
}
