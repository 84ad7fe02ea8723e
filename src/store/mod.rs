//! The store: raw log, events, orders, indexes, dedup, quarantine, group
//! commit, the live event feed, consistent snapshots and recovery from
//! storage failures, over one storage engine ([`engine`]).
//!
//! # Pipeline
//!
//! ```text
//!  callers ─submit()─► mpsc(4096) ─► [writer thread]
//!    ▲ oneshot            takes what is queued (≤ 512 deliveries, ≤ 16 MiB)
//!    │                    plan::plan_with(engine reads) ─► WriteSet
//!    │                    engine.apply(WriteSet)  (one atomic batch)
//!    │                    shared.written(); shared.enqueue(replies)
//!    │                           │ Mutex<Queue> + Condvar
//!    └──── [flusher thread] ◄────┘ engine.make_durable()  (many turns, one flush)
//!            ├► durable head: watch<u64>  (wait_durable, Feed, head_sequence)
//!            ├► feed: broadcast<Arc<Published>>  (subscribers, in sequence order)
//!            ├► replies, in order
//!            └► durability mark file, at most once a second
//! ```
//!
//! The domain (dedup, order resolution, the state rules, index entries,
//! quarantine) is engine-neutral, in [`plan`]; the engine only reads keys,
//! commits write sets and makes them durable.
//!
//! # How far: the counters, in the order that always holds
//!
//! assigned (the writer's [`plan::Counters`]) ≥ written (`Shared::written`,
//! applied to the engine) ≥ queued (`Queue.last_*`, waiting for a flush) ≥
//! durable (the `watch` head: flushed, published, answered) ≥ marked (the
//! durability mark file, [`mark`]). After a storage failure everything above
//! durable is discarded: the engine is reopened and recovers at least up to
//! durable (see [`recovery`]).

mod commit;
mod engine;
mod export;
mod feed;
mod follow;
mod keys;
mod layout;
mod mark;
mod plan;
#[doc(hidden)]
pub mod postgres;
mod query;
mod recovery;
mod sled_engine;
mod snapshot;
mod verify;
mod writer;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

pub(crate) use commit::CommitMetrics;
pub use commit::FaultPoint;
pub use export::{ExportSummary, ImportSummary, export, import, rebuild};
pub use feed::{Feed, FeedError, FeedItem, Published};
pub use plan::RefKind;
pub use query::{EventFilter, Lookup, OrderFilter, Page, PageLimit};

use crate::config::StoreConfig;
use crate::ingest::{Mapper, Normalized, Unrecognized};
use crate::proto::RawDelivery;
use commit::{Flusher, Shared};
use engine::Engine;
use plan::{Counters, Work};
use writer::{Command, Writer};

/// The sled engine's key layout and directory, for the bench's sled
/// baselines only: a layout change then breaks the bench's build instead of
/// letting it measure a stale layout.
#[doc(hidden)]
pub mod bench_layout {
    pub use super::keys::*;

    /// sled's directory in a data dir.
    pub fn engine_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
        super::layout::engine_dir(data_dir)
    }
}

/// How many deliveries may wait for the writer before senders wait too.
const WRITER_QUEUE: usize = 4096;

/// The layout of derived state (keys and values) this build writes. Format
/// 1 had one index key per order; format 2 one key per reference; format 3
/// kept an order's event sequences after the order's own fields; format 4
/// stores them beside the order in a storage message; format 5 keys dedup
/// entries by the SHA-256 of the dedup key, keeps an event's provenance to
/// its raw delivery's id and the mapper version, and stores in raw records
/// nothing that can be derived (body SHA-256, dedup key, a content type the
/// headers hold). Raw
/// deliveries of every format read the same, so `ordertrail rebuild`
/// converts any data dir.
const FORMAT: u64 = 5;

/// Creates the data dir if it is missing: every engine keeps the
/// durability mark and the hand-over socket there, and storage is probed
/// there after a failure.
fn create_data_dir(data_dir: &std::path::Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| StoreError::unavailable(format!("cannot create {}", data_dir.display()), e))
}

/// Holds `data_dir` for this process (an flock on a file in it), for an
/// engine that does not hold it itself: the data dir has the hand-over
/// socket and the durability mark, which belong to one process. Another
/// process waits up to 5 s (one that is handing over lets go at close),
/// then is refused.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, StoreError> {
    let path = layout::lock_file(data_dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::unavailable(format!("cannot open {}", path.display()), e))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => {
                return Err(StoreError::unavailable(
                    format!("{} is in use by another ordertrail process", data_dir.display()),
                    std::io::Error::from(e),
                ));
            }
        }
    }
}

/// The cause of a storage error, shared (errors are cloned to every reply
/// of a failed batch).
pub type ErrorSource = Arc<dyn std::error::Error + Send + Sync>;

/// A storage problem. Ingest answers 503; queries answer UNAVAILABLE.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage unavailable: {0}")]
    Unavailable(String, #[source] Option<ErrorSource>),
    #[error("store is shutting down")]
    Closed,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Bad input (an unreadable import line, for instance): nothing is
    /// wrong with storage.
    #[error("{0}")]
    Invalid(String),
}

/// Exit code when stored data is damaged or input is bad (EX_DATAERR).
pub const EXIT_DATA: u8 = 65;
/// Exit code when the service cannot run (EX_SOFTWARE).
pub const EXIT_FAILURE: u8 = 70;

impl StoreError {
    /// The process exit code for a command that ended with this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Corrupt(_) | Self::Invalid(_) => EXIT_DATA,
            Self::Unavailable(..) | Self::Closed => EXIT_FAILURE,
        }
    }

    /// Storage failed doing `what`, because of `source`.
    pub fn unavailable(what: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(what.into(), Some(Arc::new(source)))
    }

    /// Storage is unavailable for a reason with no error behind it.
    pub fn unavailable_because(why: impl Into<String>) -> Self {
        Self::Unavailable(why.into(), None)
    }
}

impl From<prost::DecodeError> for StoreError {
    fn from(e: prost::DecodeError) -> Self {
        Self::Corrupt(e.to_string())
    }
}

/// An authenticated delivery with its mapping result, ready to store.
#[derive(Debug)]
pub struct Delivery {
    /// Everything about the request; ids and outcome are filled in by the
    /// store.
    pub raw: RawDelivery,
    /// What the mapper made of it.
    pub mapped: Result<Normalized, Unrecognized>,
}

/// What became of a delivery once it is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Stored and normalized into these events.
    Applied { raw_id: u64, sequences: Vec<u64> },
    /// Stored in quarantine.
    Quarantined { raw_id: u64, reason: String },
    /// Identical to an earlier delivery; nothing new stored.
    Duplicate { raw_id: u64, quarantined: bool },
}

/// Counts of stored state.
#[derive(Clone, Copy, Debug, Default)]
pub struct StateStats {
    pub orders: u64,
    pub quarantined: u64,
    pub size_bytes: u64,
}

/// A handle on the open store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The open engine; `None` while it is being reopened after a storage
    /// failure (see [`recovery`]).
    engine: RwLock<Option<Arc<Engine>>>,
    config: StoreConfig,
    /// What the current mappers make of a raw delivery.
    mapper: Mapper,
    /// The data dir's storage format (see [`FORMAT`]).
    format: u64,
    shared: Arc<Shared>,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    workers: Mutex<Workers>,
    /// The data dir held for this process when the engine does not hold
    /// it (see [`lock_data_dir`]); let go at close.
    data_dir_lock: Mutex<Option<std::fs::File>>,
}

/// The threads that write to the engine, and the one that reopens it.
#[derive(Default)]
struct Workers {
    writer: Option<JoinHandle<Option<mpsc::Receiver<Command>>>>,
    flusher: Option<JoinHandle<()>>,
    recovery: Option<JoinHandle<()>>,
    follower: Option<JoinHandle<()>>,
}

// === impl Store: lifecycle ===

impl Store {
    /// Opens the store of `config` for serving: completes a rebuild
    /// prepared by `Admin/Rebuild` if there is one, opens (the engine
    /// recovers), checks the storage format, and gives back the memory the
    /// recovery used. Runs the blocking parts off the async runtime.
    pub async fn open(config: &StoreConfig, mapper: Mapper) -> Result<Self, StoreError> {
        if let Some(kept) = export::finish_pending_rebuild(config, &mapper).await? {
            tracing::info!(old = %kept.display(), "the rebuilt database is in place");
        }
        let store = Self::open_unchecked(config, mapper).await?;
        if let Err(e) = store.check_format() {
            store.close().await?;
            return Err(e);
        }
        Ok(store)
    }

    /// Opens without the format check (rebuild reads any format).
    async fn open_unchecked(config: &StoreConfig, mapper: Mapper) -> Result<Self, StoreError> {
        let config = config.clone();
        blocking(move || {
            let store = Self::open_blocking(&config, mapper);
            crate::memory::release_free_heap();
            store
        })
        .await?
    }

    /// Opens (or creates) the store under `config.data_dir` and starts the
    /// writer, flusher and recovery threads.
    pub(crate) fn open_blocking(config: &StoreConfig, mapper: Mapper) -> Result<Self, StoreError> {
        create_data_dir(&config.data_dir)?;
        let known = mark::read(&config.data_dir)?;
        let engine = Engine::open(config)?;
        let data_dir_lock = match engine.is_shared() {
            true => Some(lock_data_dir(&config.data_dir)?),
            false => None,
        };
        let counters = engine.counters()?;
        let format = engine.format(FORMAT, counters.last_raw == 0)?;
        let recovered = counters.mark();
        mark::check(&config.data_dir, known, recovered)?;
        let followed = engine.is_shared();
        let shared = Arc::new(Shared::new(recovered, config.feed_buffer_events, followed));
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        #[cfg(any(test, feature = "test-util"))]
        if config.unsafe_ack_before_durable {
            tracing::warn!("store.unsafe_ack_before_durable is set: acknowledged webhooks can be lost in a crash");
        }
        let store = Self {
            inner: Arc::new(Inner {
                engine: RwLock::new(None),
                config: config.clone(),
                mapper,
                format,
                shared,
                commands: Mutex::new(Some(tx)),
                workers: Mutex::default(),
                data_dir_lock: Mutex::new(data_dir_lock),
            }),
        };
        store.start(Arc::new(engine), counters, rx)?;
        let (watched, shared) = (Arc::downgrade(&store.inner), store.inner.shared.clone());
        store.workers().recovery = Some(spawn_thread("ordertrail-recovery", move || recovery::run(watched, shared))?);
        if followed {
            let (followed, shared) = (Arc::downgrade(&store.inner), store.inner.shared.clone());
            store.workers().follower = Some(spawn_thread("ordertrail-follow", move || follow::run(followed, shared))?);
        }
        Ok(store)
    }

    /// Starts the writer and the flusher on `engine`.
    fn start(&self, engine: Arc<Engine>, counters: Counters, rx: mpsc::Receiver<Command>) -> Result<(), StoreError> {
        let (config, shared) = (&self.inner.config, &self.inner.shared);
        let writer = Writer::new(engine.clone(), counters, shared.clone(), config);
        let flusher = Flusher::new(engine.clone(), shared.clone(), config);
        *self.inner.engine.write().unwrap_or_else(|e| e.into_inner()) = Some(engine);
        let mut workers = self.workers();
        workers.writer = Some(spawn_thread("ordertrail-writer", move || writer.run(rx))?);
        workers.flusher = Some(spawn_thread("ordertrail-flusher", move || flusher.run())?);
        Ok(())
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, Workers> {
        self.inner.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open engine, for a read.
    fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        self.inner
            .engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StoreError::unavailable_because("storage failed and the store is being reopened; retry"))
    }

    /// Whether this build can serve the data dir: its derived state must be
    /// in this build's format (the raw deliveries always are).
    fn check_format(&self) -> Result<(), StoreError> {
        match self.inner.format {
            FORMAT => Ok(()),
            found => Err(StoreError::Corrupt(format!(
                "{} holds storage format {found}, this build serves format {FORMAT}: stop it and run \
                 `ordertrail rebuild` to rebuild it from its raw deliveries",
                self.inner.config.data_dir.display()
            ))),
        }
    }

    /// Stops taking deliveries, lets queued ones finish durable, and
    /// flushes. Ends promptly whatever the state of storage: after a
    /// failure nothing more is flushed (what was not durable was answered
    /// 503).
    pub async fn close(&self) -> Result<(), StoreError> {
        let store = self.clone();
        blocking(move || store.close_blocking()).await?
    }

    pub(crate) fn close_blocking(&self) -> Result<(), StoreError> {
        self.inner.commands.lock().unwrap_or_else(|e| e.into_inner()).take();
        let recovery = self.workers().recovery.take();
        if let Some(writer) = self.workers().writer.take() {
            let _ = writer.join();
        }
        // The writer closes the queue when it ends; after a failure it may
        // be gone already.
        self.inner.shared.close();
        if let Ok(engine) = self.engine() {
            engine.wake();
        }
        if let Some(recovery) = recovery {
            let _ = recovery.join();
        }
        let workers = std::mem::take(&mut *self.workers());
        for thread in [workers.flusher, workers.follower].into_iter().flatten() {
            let _ = thread.join();
        }
        if let Some(writer) = workers.writer {
            let _ = writer.join();
        }
        let closed = self.finish_close();
        self.inner.data_dir_lock.lock().unwrap_or_else(|e| e.into_inner()).take();
        closed
    }

    /// Flushes and writes the durability mark, unless storage failed.
    fn finish_close(&self) -> Result<(), StoreError> {
        if !self.is_healthy() {
            tracing::warn!(
                durable_sequence = self.inner.shared.durable_mark().durable_sequence,
                "closing after a storage failure: nothing after the last durable sequence was acknowledged"
            );
            return Ok(());
        }
        self.engine()?.flush()?;
        let sync = self.inner.config.durability == crate::config::Durability::Fsync;
        mark::write(&self.inner.config.data_dir, self.inner.shared.durable_mark(), sync)
            .map_err(|e| StoreError::unavailable("cannot write the durability mark", e))
    }

    /// Starts reading the whole database once in the background, paced,
    /// so that damage is found without a client hitting it (see
    /// [`verify`]).
    pub fn verify_in_background(&self) -> Result<(), StoreError> {
        let (store, shared) = (Arc::downgrade(&self.inner), self.inner.shared.clone());
        spawn_thread("ordertrail-verify", move || verify::run(store, shared)).map(drop)
    }
}

// === impl Store: ingest ===

impl Store {
    /// Maps a raw delivery with the current mappers, stores it and waits
    /// until it is durable.
    pub async fn ingest(&self, raw: RawDelivery) -> Result<IngestOutcome, StoreError> {
        self.submit_raw(raw).await?.await
    }

    /// Maps a raw delivery with the current mappers and hands it to the
    /// writer: the one place where "map, then store" happens (the front
    /// door, import and rebuild all come through here).
    pub(crate) async fn submit_raw(
        &self,
        raw: RawDelivery,
    ) -> Result<impl Future<Output = Result<IngestOutcome, StoreError>> + use<>, StoreError> {
        let mapped = self.inner.mapper.map(&raw);
        self.submit(Delivery { raw, mapped }).await
    }

    /// Stores a mapped delivery and waits until it is durable.
    pub async fn commit(&self, delivery: Delivery) -> Result<IngestOutcome, StoreError> {
        self.submit(delivery).await?.await
    }

    /// Hands a delivery to the writer (deliveries are written in the order
    /// they are submitted); the returned future resolves once it is durable.
    pub(crate) async fn submit(
        &self,
        delivery: Delivery,
    ) -> Result<impl Future<Output = Result<IngestOutcome, StoreError>> + use<>, StoreError> {
        if !self.is_healthy() {
            return Err(StoreError::unavailable_because("storage failed; retry later"));
        }
        let sender = self.sender().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let mut delivery = delivery;
        plan::compress_body(&mut delivery.raw);
        sender
            .send(Command::Do { work: Work::Ingest(Box::new(delivery)), reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(async move { answer.await.map_err(|_| StoreError::Closed)? })
    }

    /// Applies a quarantined delivery with what the current mappers make of
    /// it, if they understand it now; waits until that is durable.
    /// `Ok(Err(reason))` when the mappers still do not understand it;
    /// `Duplicate` when it was not quarantined (nothing done) or its
    /// content was applied meanwhile.
    pub async fn redrive(&self, raw: &RawDelivery) -> Result<Result<IngestOutcome, Unrecognized>, StoreError> {
        let normalized = match self.inner.mapper.map(raw) {
            Ok(normalized) => normalized,
            Err(reason) => return Ok(Err(reason)),
        };
        let sender = self.sender().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let work = Work::Redrive { raw_id: raw.id, normalized };
        sender.send(Command::Do { work, reply }).await.map_err(|_| StoreError::Closed)?;
        Ok(Ok(answer.await.map_err(|_| StoreError::Closed)??))
    }

    /// What the current mappers make of a stored delivery (a re-drive's
    /// dry run).
    pub fn map(&self, raw: &RawDelivery) -> Result<Normalized, Unrecognized> {
        self.inner.mapper.map(raw)
    }

    fn sender(&self) -> Option<mpsc::Sender<Command>> {
        self.inner.commands.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

// === impl Store: state ===

impl Store {
    /// False after a storage failure until a flush succeeds again.
    pub fn is_healthy(&self) -> bool {
        self.inner.shared.is_healthy()
    }

    /// Notes that a read found stored data damaged (see [`Store::damage`]).
    pub fn note_damage(&self, why: &str) {
        self.inner.shared.note_damage(why);
    }

    /// What weakens "acknowledged means durable" in the engine's settings
    /// (said at start and in `/readyz`).
    pub fn warnings(&self) -> Vec<String> {
        self.engine().map(|engine| engine.warnings()).unwrap_or_default()
    }

    /// What a read found damaged, if anything did: the store then serves
    /// what it can but is not ready.
    pub fn damage(&self) -> Option<String> {
        self.inner.shared.damage()
    }

    /// The newest durable sequence.
    pub fn head_sequence(&self) -> u64 {
        self.inner.shared.durable_head()
    }

    /// Waits until `sequence` is durable.
    pub(crate) async fn wait_durable(&self, sequence: u64) -> Result<(), StoreError> {
        let mut head = self.inner.shared.watch_durable();
        head.wait_for(|h| *h >= sequence).await.map(|_| ()).map_err(|_| StoreError::Closed)
    }

    /// The oldest sequence still kept (events before it were pruned by
    /// `store.retain_events`).
    pub fn oldest_retained(&self) -> u64 {
        match self.inner.config.retain_events {
            0 => 1,
            keep => self.inner.shared.written_head().saturating_sub(keep) + 1,
        }
    }

    /// A gap-free feed of durable events after `after`: stored ones first,
    /// then live ones.
    pub fn feed(&self, after: u64) -> Feed {
        Feed::new(self.clone(), self.inner.shared.subscribe(), after)
    }

    /// The group commit's metrics (shared handles).
    pub(crate) fn commit_metrics(&self) -> CommitMetrics {
        self.inner.shared.stats.metrics.clone()
    }

    /// Counts of stored state, for metrics.
    pub(crate) async fn state_stats(&self) -> Result<StateStats, StoreError> {
        self.read_off_runtime(move |engine| {
            let orders = engine.counters()?.last_order;
            Ok(StateStats { orders, quarantined: engine.quarantined_count(), size_bytes: engine.size_on_disk() })
        })
        .await
    }

    /// Live-feed statistics: (events kept for slow subscribers, times a
    /// subscriber lagged and went back to reading the store).
    pub(crate) fn feed_stats(&self) -> (usize, u64) {
        let shared = &self.inner.shared;
        (shared.feed_backlog(), shared.stats.subscriber_store_reads.load(Ordering::Relaxed))
    }

    fn note_feed_lag(&self) {
        self.inner.shared.stats.subscriber_store_reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Group-commit statistics: (commits, replies they answered).
    pub(crate) fn commit_stats(&self) -> (u64, u64) {
        let shared = &self.inner.shared;
        (shared.stats.group_commits.load(Ordering::Relaxed), shared.stats.group_commit_replies.load(Ordering::Relaxed))
    }
}

// === impl Store: test hooks ===

#[cfg(any(test, feature = "test-util"))]
impl Store {
    /// Makes storage fail at `point` until called again with `None`.
    pub fn inject_fault(&self, point: Option<FaultPoint>) {
        self.inner.shared.set_fault(point);
    }

    /// Holds (or releases) group commits, so tests can see what waits for one.
    pub fn hold_commits(&self, held: bool) {
        self.inner.shared.hold(held);
    }

    /// Records an older storage format in a closed data dir (tests of the
    /// format check and of `rebuild`).
    pub fn downgrade_format(data_dir: &std::path::Path, format: u64) -> Result<(), StoreError> {
        Engine::open_existing(data_dir)?.set_format(format)
    }

    /// Overwrites (`Some`) or removes (`None`) the stored record of raw
    /// delivery `id` in a closed data dir, bypassing every check (tests of
    /// damage).
    pub fn tamper_raw_record(data_dir: &std::path::Path, id: u64, bytes: Option<&[u8]>) -> Result<(), StoreError> {
        Engine::open_existing(data_dir)?.put_raw_record(id, bytes)
    }
}

fn spawn_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, StoreError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| StoreError::unavailable(format!("cannot start {name}"), e))
}

/// Runs blocking work on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::unavailable("a storage task failed", e))
}

#[cfg(test)]
mod tests;
