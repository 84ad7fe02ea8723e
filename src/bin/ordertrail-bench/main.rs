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
//! `fan-out`, `catch-up`, `scale`, `cluster`, `console`, `grown` (see
//! `--help` and BENCHMARKS.md).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::scenarios::catch_up::catch_up;
use crate::scenarios::cluster::cluster;
use crate::scenarios::console::console;
use crate::scenarios::fan_out::fan_out;
use crate::scenarios::ingest::{grown, ingest, ingest_latency, sled_alone};
use crate::scenarios::lookup::{lookup, scale};
use crate::servers::Mode;

mod load;
mod measure;
mod report;
mod scenarios;
mod servers;
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

/// The options every ordertrail the bench starts shares.
#[derive(Clone, Debug, Default)]
struct Settings {
    /// sled's cache in MiB (`--cache-mib`; default: ordertrail's default).
    cache_mib: Option<u64>,
    /// Where stored data sets are kept between runs (`--keep-data`).
    keep_data: Option<PathBuf>,
}

impl Args {
    fn settings(&self) -> Settings {
        Settings { cache_mib: self.cache_mib, keep_data: self.keep_data.clone() }
    }
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
    /// Durable webhooks/s on one private PostgreSQL: 1 and 3 nodes vs the
    /// PostgreSQL ceiling, a hand-written receiver and sled.
    Cluster,
    /// Each console page with `--orders` stored, against `/healthz` on
    /// the same listener.
    Console,
    /// Durable ingest into a store holding `--orders` webhooks vs into an
    /// empty one, alternating in one run.
    Grown,
    /// (internal) serve `--data-dir` until stdin closes; `scale` runs it as
    /// a separate process to measure its memory alone.
    #[value(hide = true)]
    Serve,
}

fn main() {
    let args = Args::parse();
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
            Scenario::Cluster => cluster(&args).await,
            Scenario::Console => console(&args).await,
            Scenario::Grown => grown(&args).await,
            Scenario::Serve => match args.data_dir.as_deref() {
                Some(dir) => servers::serve(dir, &args.settings()).await,
                None => {
                    eprintln!("ordertrail-bench: serve needs --data-dir");
                    std::process::exit(2);
                }
            },
        }
    });
}
