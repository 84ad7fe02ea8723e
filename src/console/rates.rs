//! What the console's rates and charts are made of: a sample of the head
//! sequence, the deliveries this process answered and the largest
//! subscriber lag, every [`EVERY`], for the last [`KEPT`] samples.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::api::Subscriptions;
use crate::store::Store;

/// How often a sample is taken.
pub const EVERY: Duration = Duration::from_secs(2);
/// Samples kept: ten minutes.
const KEPT: usize = 300;

/// One sample.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Instant,
    /// The newest durable event sequence.
    pub head: u64,
    /// Deliveries this process has answered since it started.
    pub answered: u64,
    /// The largest number of events a subscriber is behind.
    pub lag: u64,
}

/// The samples of the last minutes.
#[derive(Default)]
pub struct Rates {
    samples: Mutex<VecDeque<Sample>>,
}

/// Per second, over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PerSecond {
    pub events: f64,
    pub deliveries: f64,
}

impl Rates {
    /// Samples until `shutdown`.
    pub fn start(store: Store, subscriptions: Subscriptions, shutdown: CancellationToken) -> Arc<Self> {
        let rates = Arc::new(Self::default());
        let sampling = rates.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(EVERY);
            loop {
                tokio::select! {
                    _ = every.tick() => sampling.take(&store, &subscriptions),
                    () = shutdown.cancelled() => break,
                }
            }
        });
        rates
    }

    fn take(&self, store: &Store, subscriptions: &Subscriptions) {
        let head = store.head_sequence();
        let lag = subscriptions.positions().into_iter().map(|(_, at)| head.saturating_sub(at)).max().unwrap_or(0);
        let sample = Sample { at: Instant::now(), head, answered: store.commit_stats().1, lag };
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect()
    }

    /// Events and deliveries per second over the last `window`.
    pub fn per_second(&self, window: Duration) -> PerSecond {
        let samples = self.samples();
        let Some(last) = samples.last() else { return PerSecond::default() };
        let Some(first) = samples.iter().find(|s| last.at.duration_since(s.at) <= window) else {
            return PerSecond::default();
        };
        let seconds = last.at.duration_since(first.at).as_secs_f64();
        if seconds <= 0.0 {
            return PerSecond::default();
        }
        PerSecond {
            events: last.head.saturating_sub(first.head) as f64 / seconds,
            deliveries: last.answered.saturating_sub(first.answered) as f64 / seconds,
        }
    }
}

/// Per-second rates between consecutive samples: (events, deliveries).
pub fn steps(samples: &[Sample]) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .map(|pair| {
            let seconds = pair[1].at.duration_since(pair[0].at).as_secs_f64().max(0.001);
            (
                pair[1].head.saturating_sub(pair[0].head) as f64 / seconds,
                pair[1].answered.saturating_sub(pair[0].answered) as f64 / seconds,
            )
        })
        .collect()
}
