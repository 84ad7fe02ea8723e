//! Group commit and the durable event feed.
//!
//! The writer queues each delivery's reply and events here. The flusher
//! thread takes everything queued so far, makes it durable with one flush
//! (plus fsync), then advances the durable head, publishes the events to
//! subscribers in sequence order, and answers the requests. While it
//! flushes, the writer keeps applying the next deliveries (a turn of only a
//! few waits for the flush, so what arrives meanwhile joins it), so many
//! requests share one flush. Nothing is answered or published before it is
//! durable.

use std::path::PathBuf;
#[cfg(any(test, feature = "test-util"))]
use std::sync::atomic::AtomicU8;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{broadcast, oneshot, watch};

use super::engine::Engine;
use super::feed::Published;
use super::follow;
use super::mark::{self, Mark};
use super::{IngestOutcome, StoreError};
use crate::config::{Durability, StoreConfig};

pub(super) type Reply = oneshot::Sender<Result<IngestOutcome, StoreError>>;

/// How often the durability mark is brought up to date while writing.
const MARK_INTERVAL: Duration = Duration::from_secs(1);

/// What the group commit measures; registered by [`crate::metrics`].
#[derive(Clone)]
pub struct CommitMetrics {
    /// Deliveries answered by one commit.
    pub group_size: Histogram,
    /// Time to make one commit durable.
    pub flush_seconds: Histogram,
    /// Committed events by kind.
    pub events: Family<Vec<(&'static str, String)>, Counter>,
    /// Storage failures (each stops acknowledgements until a reopen).
    pub failures: Counter,
    /// Times the store was reopened after a failure.
    pub reopens: Counter,
}

impl Default for CommitMetrics {
    fn default() -> Self {
        Self {
            group_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            flush_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            events: Family::default(),
            failures: Counter::default(),
            reopens: Counter::default(),
        }
    }
}

/// A delivery written but not yet durable.
struct Pending {
    reply: Reply,
    outcome: IngestOutcome,
    events: Vec<Published>,
}

/// State shared by the writer, the flusher and readers, by concern.
pub(super) struct Shared {
    handoff: Handoff,
    reach: Reach,
    /// False after a storage failure, until the store is reopened (see
    /// [`super::recovery`]): nothing written after a failed write or flush
    /// is acknowledged by this engine instance.
    healthy: AtomicBool,
    /// What a read found damaged, if anything did: the store is then not
    /// ready (ingest goes on).
    damage: Mutex<Option<String>>,
    pub stats: Stats,
    /// Events reach the feed from [`super::follow`], not from the group
    /// commit (several processes share the engine).
    followed: bool,
    /// Signalled after each group commit, for the follower.
    commits: Condvar,
    /// Held while events are read from the engine and published to the
    /// feed, by the follower or the flusher: each is published once, in
    /// order.
    follow: Mutex<()>,
    /// An injected storage fault (fault-injection tests): 0 none, else a
    /// [`FaultPoint`] as u8.
    #[cfg(any(test, feature = "test-util"))]
    fault: AtomicU8,
    /// Held by a test to make the writer wait before each turn.
    #[cfg(test)]
    pub writer_gate: Mutex<()>,
    /// Held by a test to make the flusher wait inside each flush.
    #[cfg(test)]
    pub flush_gate: Mutex<()>,
}

/// The writer's hand-off to the flusher: the replies waiting for a flush,
/// and the signals of a failure or a close.
struct Handoff {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Signalled when storage fails or the store closes.
    changed: Condvar,
    /// Signalled when the flusher finishes a flush.
    flushed: Condvar,
}

/// How far the store got: written (`written`), durable (`durable`, which
/// readers wait on) and marked (`mark`); and the feed of durable events.
struct Reach {
    /// The newest durable sequence.
    durable: watch::Sender<u64>,
    /// Durable events, in sequence order.
    feed: broadcast::Sender<Arc<Published>>,
    /// The newest sequence written (durable or not).
    written: AtomicU64,
    /// How far the database is durable (for the durability mark).
    mark: Mutex<Mark>,
}

/// Counters for stats and metrics.
pub(super) struct Stats {
    /// Successful group commits so far.
    pub group_commits: AtomicU64,
    /// Replies answered by those commits.
    pub group_commit_replies: AtomicU64,
    /// Turns the writer committed (each holds one or more deliveries).
    pub turns: AtomicU64,
    /// Times a subscriber fell behind the live feed and went back to the store.
    pub subscriber_store_reads: AtomicU64,
    pub metrics: CommitMetrics,
}

/// Where an injected storage fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// Committing a turn's write set fails.
    Write = 1,
    /// Making committed write sets durable fails.
    Flush = 2,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
    last_sequence: u64,
    last_raw: u64,
    closed: bool,
    /// The flusher is making a taken group durable.
    flushing: bool,
    /// Commits are held (tests only).
    #[cfg(any(test, feature = "test-util"))]
    held: bool,
}

impl Shared {
    /// `feed_capacity`: published events kept for slow subscribers before
    /// they lag (and catch up from the store instead).
    pub fn new(durable: Mark, feed_capacity: usize, followed: bool) -> Self {
        let durable_head = durable.durable_sequence;
        Self {
            handoff: Handoff {
                queue: Mutex::new(Queue {
                    last_sequence: durable.durable_sequence,
                    last_raw: durable.durable_raw,
                    ..Queue::default()
                }),
                wake: Condvar::new(),
                changed: Condvar::new(),
                flushed: Condvar::new(),
            },
            reach: Reach {
                durable: watch::Sender::new(durable_head),
                feed: broadcast::Sender::new(feed_capacity.max(1)),
                written: AtomicU64::new(durable_head),
                mark: Mutex::new(durable),
            },
            healthy: AtomicBool::new(true),
            damage: Mutex::new(None),
            stats: Stats {
                group_commits: AtomicU64::new(0),
                group_commit_replies: AtomicU64::new(0),
                turns: AtomicU64::new(0),
                subscriber_store_reads: AtomicU64::new(0),
                metrics: CommitMetrics::default(),
            },
            followed,
            commits: Condvar::new(),
            follow: Mutex::new(()),
            #[cfg(any(test, feature = "test-util"))]
            fault: AtomicU8::new(0),
            #[cfg(test)]
            writer_gate: Mutex::new(()),
            #[cfg(test)]
            flush_gate: Mutex::new(()),
        }
    }

    /// Waits until a group commit happened or `timeout` passed.
    pub fn wait_for_commit(&self, timeout: Duration) {
        let queue = self.lock();
        if !queue.closed {
            let _ = self.commits.wait_timeout(queue, timeout);
        }
    }

    /// The turn to read and publish followed events (see [`super::follow`]).
    pub fn follow_turn(&self) -> std::sync::MutexGuard<'_, ()> {
        self.follow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the durable head over `events` (dense, in order, after the
    /// head), then publishes them: the head moves before events are
    /// published, as for the group commit's own. Called with
    /// [`Self::follow_turn`] held.
    pub fn publish_followed(&self, events: Vec<Published>) {
        let Some(last) = events.last().map(|e| e.sequence) else { return };
        self.written(last.max(self.written_head()));
        self.reach.durable.send_if_modified(|head| {
            let moved = last > *head;
            *head = (*head).max(last);
            moved
        });
        for published in events {
            self.count_event(&published);
            let _ = self.reach.feed.send(Arc::new(published));
        }
    }

    fn count_event(&self, published: &Published) {
        if let Some(event) = &published.event {
            let kind = event.kind().as_str_name().trim_start_matches("EVENT_KIND_").to_ascii_lowercase();
            self.stats.metrics.events.get_or_create(&vec![("kind", kind)]).inc();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A poisoned lock only means a thread panicked while holding it; the
        // queue itself is still consistent.
        self.handoff.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Storage failed: from now on nothing is acknowledged until the store
    /// is reopened. Logged once per failure.
    pub fn fail(&self, error: &dyn std::fmt::Display) {
        if self.healthy.swap(false, Ordering::SeqCst) {
            self.stats.metrics.failures.inc();
            tracing::error!(%error, "storage failed: answering 503 until the store is reopened");
        }
        let _queue = self.lock();
        self.handoff.wake.notify_all();
        self.handoff.changed.notify_all();
        self.handoff.flushed.notify_all();
    }

    /// Waits until storage fails (true) or the store closes (false).
    pub fn wait_for_failure(&self) -> bool {
        let mut queue = self.lock();
        loop {
            if queue.closed {
                return false;
            }
            if !self.is_healthy() {
                return true;
            }
            queue = self.handoff.changed.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The store was reopened: it recovered up to `recovered`, and that is
    /// durable.
    pub fn recovered(&self, recovered: Mark) {
        {
            let mut queue = self.lock();
            queue.last_sequence = recovered.durable_sequence;
            queue.last_raw = recovered.durable_raw;
        }
        self.written(recovered.durable_sequence);
        *self.reach.mark.lock().unwrap_or_else(|e| e.into_inner()) = recovered;
        self.reach.durable.send_if_modified(|head| {
            let moved = recovered.durable_sequence > *head;
            *head = (*head).max(recovered.durable_sequence);
            moved
        });
        self.stats.metrics.reopens.inc();
        self.healthy.store(true, Ordering::SeqCst);
    }

    /// A read found stored data damaged; logged once.
    pub fn note_damage(&self, why: &str) {
        let mut damage = self.damage.lock().unwrap_or_else(|e| e.into_inner());
        if damage.is_none() {
            tracing::error!(%why, "stored data is damaged: not ready; salvage with `ordertrail export`");
            *damage = Some(why.to_string());
        }
    }

    pub fn damage(&self) -> Option<String> {
        self.damage.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Whether the store is closing.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    #[cfg(any(test, feature = "test-util"))]
    pub fn set_fault(&self, fault: Option<FaultPoint>) {
        self.fault.store(fault.map_or(0, |f| f as u8), Ordering::SeqCst);
    }

    /// An injected fault at `point`, if one is set (tests only).
    #[cfg(any(test, feature = "test-util"))]
    pub fn fault(&self, point: FaultPoint) -> Result<(), std::io::Error> {
        if self.fault.load(Ordering::SeqCst) == point as u8 {
            return Err(std::io::Error::other(format!("injected storage fault ({point:?})")));
        }
        Ok(())
    }

    #[cfg(not(any(test, feature = "test-util")))]
    #[inline(always)]
    pub fn fault(&self, _point: FaultPoint) -> Result<(), std::io::Error> {
        Ok(())
    }

    pub fn durable_head(&self) -> u64 {
        *self.reach.durable.borrow()
    }

    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.reach.durable.subscribe()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.reach.feed.subscribe()
    }

    /// Events published and still kept for subscribers that lag.
    pub fn feed_backlog(&self) -> usize {
        self.reach.feed.len()
    }

    pub fn written_head(&self) -> u64 {
        self.reach.written.load(Ordering::SeqCst)
    }

    pub fn written(&self, sequence: u64) {
        self.reach.written.store(sequence, Ordering::SeqCst);
    }

    /// Queues a turn's replies (in sequence order) for the next flush.
    pub fn enqueue(&self, turn: impl IntoIterator<Item = (Reply, IngestOutcome, Vec<Published>)>) {
        let mut queue = self.lock();
        // Written after storage failed: never acknowledged (see `take`).
        let failed = !self.healthy.load(Ordering::SeqCst);
        for (reply, outcome, events) in turn {
            if failed {
                let _ = reply.send(Err(StoreError::unavailable_because("storage failed")));
                continue;
            }
            if let Some(last) = events.last() {
                queue.last_sequence = last.sequence;
            }
            if let IngestOutcome::Applied { raw_id, .. } | IngestOutcome::Quarantined { raw_id, .. } = &outcome {
                queue.last_raw = queue.last_raw.max(*raw_id);
            }
            queue.waiting.push(Pending { reply, outcome, events });
        }
        self.handoff.wake.notify_one();
    }

    pub fn close(&self) {
        self.lock().closed = true;
        self.handoff.wake.notify_all();
        self.handoff.flushed.notify_all();
        self.handoff.changed.notify_all();
        self.commits.notify_all();
    }

    /// Holds or releases commits: while held, replies queue up unanswered.
    #[cfg(any(test, feature = "test-util"))]
    pub fn hold(&self, held: bool) {
        self.lock().held = held;
        self.handoff.wake.notify_one();
    }

    /// Replies waiting for a flush.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Waits for queued replies; `None` once closed and drained, or once
    /// storage failed (what waits then is answered 503).
    fn take(&self) -> Option<(Vec<Pending>, Mark)> {
        let mut queue = self.lock();
        if std::mem::take(&mut queue.flushing) {
            self.handoff.flushed.notify_all();
        }
        loop {
            if !self.healthy.load(Ordering::SeqCst) {
                for pending in std::mem::take(&mut queue.waiting) {
                    let _ = pending.reply.send(Err(StoreError::unavailable_because("storage failed")));
                }
                return None;
            }
            if !(queue.waiting.is_empty() || queue.is_held()) {
                break;
            }
            if queue.closed {
                if queue.waiting.is_empty() {
                    return None;
                }
                break;
            }
            queue = self.handoff.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
        let marks = queue.marks();
        queue.flushing = true;
        Some((std::mem::take(&mut queue.waiting), marks))
    }

    /// Waits until the flusher is not making a group durable (or storage
    /// failed, or the store closed). A turn committed during a flush waits
    /// for the next one anyway; committed after it, together with what
    /// arrived meanwhile, it costs the engine one batch instead of several.
    pub fn wait_until_flushed(&self) {
        let mut queue = self.lock();
        while queue.flushing && !queue.closed && self.healthy.load(Ordering::SeqCst) {
            queue = self.handoff.flushed.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// What the queue's writes reach once durable.
    pub fn durable_mark(&self) -> Mark {
        *self.reach.mark.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Queue {
    #[cfg(any(test, feature = "test-util"))]
    fn is_held(&self) -> bool {
        self.held
    }

    #[cfg(not(any(test, feature = "test-util")))]
    fn is_held(&self) -> bool {
        false
    }

    fn marks(&self) -> Mark {
        Mark { durable_sequence: self.last_sequence, durable_raw: self.last_raw }
    }
}

// === impl Flusher ===

/// Makes everything written so far durable, then publishes and answers it.
pub(super) struct Flusher {
    engine: Arc<Engine>,
    durability: Durability,
    /// The data directory, where the durability mark lives.
    data_dir: PathBuf,
    shared: Arc<Shared>,
    /// When the durability mark was last written.
    mark_written: Instant,
}

impl Flusher {
    pub fn new(engine: Arc<Engine>, shared: Arc<Shared>, config: &StoreConfig) -> Self {
        Self {
            engine,
            durability: config.durability,
            data_dir: config.data_dir.clone(),
            shared,
            mark_written: Instant::now(),
        }
    }

    /// Runs until the store closes, or until storage fails: a failed flush
    /// leaves the pages it covered in doubt (a later successful fsync does
    /// not prove they reached the disk), so nothing more is acknowledged
    /// through this engine instance; [`super::recovery`] reopens it. This
    /// is the fsync-failure policy: never retry a failed flush in place.
    pub fn run(mut self) {
        while let Some((waiting, marks)) = self.shared.take() {
            let started = Instant::now();
            #[cfg(test)]
            drop(self.shared.flush_gate.lock().unwrap_or_else(|e| e.into_inner()));
            let durable = self.shared.fault(FaultPoint::Flush).and_then(|()| self.engine.make_durable(self.durability));
            match durable {
                Ok(()) => {
                    if !waiting.is_empty() {
                        self.shared.stats.metrics.flush_seconds.observe(started.elapsed().as_secs_f64());
                        self.shared.stats.metrics.group_size.observe(waiting.len() as f64);
                    }
                    self.committed(waiting, marks);
                    self.maybe_write_mark();
                }
                Err(e) => {
                    self.shared.fail(&format_args!("flush failed: {e}"));
                    let e = StoreError::unavailable("flush failed", e);
                    for pending in waiting {
                        let _ = pending.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// The head moves before events are published: a subscriber that misses
    /// a published event can always find it in the store below the head.
    fn committed(&self, waiting: Vec<Pending>, marks: Mark) {
        let shared = &self.shared;
        let last_sequence = marks.durable_sequence;
        *shared.reach.mark.lock().unwrap_or_else(|e| e.into_inner()) = marks;
        shared.stats.group_commits.fetch_add(1, Ordering::Relaxed);
        shared.stats.group_commit_replies.fetch_add(waiting.len() as u64, Ordering::Relaxed);
        if shared.followed {
            // Every node's events are published in order, from the
            // database; this node's own before it answers, so what it
            // acknowledged is in its feed and below its head at once.
            let (replies, own): (Vec<_>, Vec<_>) =
                waiting.into_iter().map(|pending| ((pending.reply, pending.outcome), pending.events)).unzip();
            follow::publish_through(&self.engine, shared, last_sequence, own.into_iter().flatten());
            for (reply, outcome) in replies {
                let _ = reply.send(Ok(outcome));
            }
            shared.commits.notify_all();
            return;
        }
        shared.reach.durable.send_if_modified(|head| {
            let moved = last_sequence > *head;
            *head = (*head).max(last_sequence);
            moved
        });
        for pending in waiting {
            for published in pending.events {
                shared.count_event(&published);
                // Sent as stored to every subscriber; no subscriber is not an error.
                let _ = shared.reach.feed.send(Arc::new(published));
            }
            let _ = pending.reply.send(Ok(pending.outcome));
        }
    }

    /// Records how far the database is durable, at most once per
    /// [`MARK_INTERVAL`] (and once more on close).
    fn maybe_write_mark(&mut self) {
        if self.mark_written.elapsed() < MARK_INTERVAL {
            return;
        }
        self.mark_written = Instant::now();
        let sync = self.durability == Durability::Fsync;
        if let Err(e) = mark::write(&self.data_dir, self.shared.durable_mark(), sync) {
            tracing::warn!(error = %e, "cannot write the durability mark");
        }
    }
}
