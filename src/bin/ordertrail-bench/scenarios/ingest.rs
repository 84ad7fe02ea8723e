//! `ingest`, `durability` (with "sled alone"), `ingest-latency` and
//! `grown`.

use std::time::{Duration, Instant};

use ordertrail::store::{RefKind, bench_layout as keys};

use crate::Args;
use crate::load::{closed_loop, open_loop, webhook};
use crate::measure::{Sample, dir_bytes};
use crate::report::{header, median, median_of, row};
use crate::scenarios::lookup::{discard, prepared};
use crate::servers::{Mode, fresh_dir, start_bare, start_ordertrail};

pub(crate) async fn ingest(args: &Args, subjects: &[(&str, Mode)]) {
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
                let (subject, _) = start_ordertrail(&dir, *mode, "", &args.settings()).await;
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

/// `grown`: durable ingest into a store that already holds `--orders`
/// webhooks, against the same load into an empty store, alternating in one
/// run: short runs on a fresh data dir flatter a storage engine.
pub(crate) async fn grown(args: &Args) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    let settings = args.settings();
    let (dir, _) = prepared(args.orders, &settings).await;
    println!(
        "Durable ingest (fsync) into a store holding {} webhooks vs an empty store, alternating; each round adds \
         to the grown store.\n",
        args.orders
    );
    header("connections");
    for &connections in &args.connections {
        let (mut empty, mut grown) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds.max(1) {
            let fresh = fresh_dir();
            let (subject, _) = start_ordertrail(&fresh, Mode::Fsync, "", &settings).await;
            empty.push(closed_loop(subject.http, connections, seconds).await);
            subject.stop().await;
            let _ = std::fs::remove_dir_all(&fresh);
            let (subject, _) = start_ordertrail(&dir, Mode::Fsync, "", &settings).await;
            grown.push(closed_loop(subject.http, connections, seconds).await);
            subject.stop().await;
        }
        let base = median(&empty, |s| s.per_second).0;
        row("empty store (baseline)", &connections.to_string(), &empty, base);
        row(&format!("store holding {} webhooks", args.orders), &connections.to_string(), &grown, base);
    }
    discard(&dir, &settings);
}

/// The storage engine's own ceiling: one thread doing, per delivery, the
/// sled reads and writes ordertrail's writer does for a new order (dedup
/// and three index reads; raw record, event, order, three index entries and
/// a dedup entry written, with the value sizes measured in a real store of
/// the bench's webhooks in storage format 5: raw record 524 bytes (its
/// body zstd-compressed), event 120, order 260; no counters, which are
/// derived at open; 128 deliveries per batch; ordertrail's default cache),
/// no HTTP, no mapping, no flush.
pub(crate) async fn sled_alone(args: &Args) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    let mut rates = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let dir = fresh_dir();
        let path = dir.clone();
        let cache_bytes = args.cache_mib.map_or(ordertrail::config::DEFAULT_CACHE_CAPACITY_BYTES, |mib| mib << 20);
        let rate = std::thread::Builder::new()
            .name("bench-sled".into())
            .spawn(move || {
                let db = sled::Config::new()
                    .path(keys::engine_dir(&path))
                    .cache_capacity(cache_bytes)
                    .open()
                    .expect("open sled");
                let (raw, event, order) = (vec![7u8; 524], vec![8u8; 120], vec![9u8; 260]);
                let source = "ordermesh";
                let started = Instant::now();
                let mut batch = sled::Batch::default();
                let mut n = 0u64;
                while started.elapsed() < seconds {
                    n += 1;
                    let id = n.to_be_bytes();
                    let dedup = keys::dedup(source, &format!("{n:024x}:OrderCreation"));
                    let _ = db.get(&dedup).expect("read");
                    let references = [
                        (RefKind::ProviderOrder, format!("{n:024x}")),
                        (RefKind::Safe, format!("S{n:08}")),
                        (RefKind::Merchant, format!("E{n:08}")),
                    ];
                    for (kind, value) in references {
                        let key = keys::index(kind, &value, source);
                        let _ = db.get(&key).expect("read");
                        batch.insert(key, &id);
                    }
                    batch.insert(&keys::numbered(keys::RAW, n), raw.clone());
                    batch.insert(&keys::numbered(keys::EVENT, n), event.clone());
                    batch.insert(&keys::numbered(keys::ORDER, n), order.clone());
                    batch.insert(dedup, &[1u8; 9]);
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
    let rounds = rates.len();
    let (rate, min, max) = median_of(rates);
    println!(
        "\nsled alone (the writer's sled reads and writes of a new order, one thread, no HTTP, no flush): \
         {rate:.0} deliveries/s (median of {rounds}, {min:.0}–{max:.0})."
    );
}

/// Mean body size of the generated webhooks.
pub(crate) fn average_body_bytes() -> f64 {
    (0..3).map(|n| webhook(1, n).body.len() as f64).sum::<f64>() / 3.0
}

pub(crate) async fn ingest_latency(args: &Args) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    let dir = fresh_dir();
    let (subject, _) = start_ordertrail(&dir, Mode::Fsync, "", &args.settings()).await;
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
            let (subject, _) = start_ordertrail(&dir, Mode::Fsync, "", &args.settings()).await;
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
