//! `catch-up`: one subscriber replaying the stored events vs a raw scan.

use std::path::Path;
use std::time::Instant;

use ordertrail::proto::SubscribeRequest;
use ordertrail::store::bench_layout as keys;

use crate::measure::Sample;
use crate::report::median;
use crate::scenarios::lookup::{discard, prepared};
use crate::servers::{Mode, grpc_channel, start_ordertrail};
use crate::wire;
use crate::{Args, Settings};

pub(crate) async fn catch_up(args: &Args) {
    let settings = args.settings();
    let (dir, _) = prepared(args.orders, &settings).await;
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
        let (sample, count) = replay_events(&dir, &settings).await;
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
    discard(&dir, &settings);
}

/// A raw sled scan of every event key (the catch-up baseline).
pub(crate) async fn scan_events(dir: &Path) -> Sample {
    let db = keys::engine_dir(dir);
    let scan = tokio::task::spawn_blocking(move || {
        let tree = sled::open(db).expect("open sled");
        let started = Instant::now();
        let mut count = 0u64;
        for entry in tree.scan_prefix([keys::EVENT]) {
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
pub(crate) async fn replay_events(dir: &Path, settings: &Settings) -> (Sample, u64) {
    let (subject, _) = start_ordertrail(dir, Mode::Fsync, "", settings).await;
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
