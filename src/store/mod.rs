//! The store: the only module that imports sled.
//!
//! One sled tree holds everything under one-byte keyspaces (see [`keys`]):
//! raw deliveries, events, orders, reference indexes, dedup entries,
//! quarantine and counters. A single writer thread assigns ids in commit
//! order and applies the deliveries queued at each turn as one atomic batch
//! (each delivery all or nothing); a flusher thread makes batches durable in
//! groups before any reply is sent.

mod commit;
mod export;
mod feed;
mod keys;
mod mark;
mod overlay;
mod recovery;
mod snapshot;
mod verify;
mod writer;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use prost::Message;
use tokio::sync::{mpsc, oneshot};

pub use commit::{CommitMetrics, FaultPoint};
pub use export::{
    Aliases, ExportSummary, ExportedDelivery, ImportSummary, export, finish_pending_rebuild, import, rebuild,
};
pub use feed::{Feed, FeedError, FeedItem, Published};
pub use keys::RefKind;

use crate::config::{Durability, StoreConfig};
use crate::ingest::{Normalized, Unrecognized};
use crate::proto::{Event, EventKind, Order, OrderStatus, RawDelivery};
use commit::{Flusher, Shared};
use writer::{Command, Counters, Work, Writer};

/// How many deliveries may wait for the writer before senders wait too.
const WRITER_QUEUE: usize = 4096;

/// The layout of derived state (keys and values) this build writes. Format
/// 1 had one index key per order; format 2 one key per reference; format 3
/// keeps an order's event sequences in the order's value instead of one key
/// per event. Raw deliveries are the same in every format, so
/// `ordertrail rebuild` converts any data dir.
const FORMAT: u64 = 3;

/// A storage problem. Ingest answers 503; queries answer UNAVAILABLE.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("store is shutting down")]
    Closed,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => Self::Corrupt(e.to_string()),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

impl From<prost::DecodeError> for StoreError {
    fn from(e: prost::DecodeError) -> Self {
        Self::Corrupt(e.to_string())
    }
}

/// An authenticated delivery with its mapping result, ready to store.
#[derive(Debug)]
pub struct Incoming {
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

/// A reference to look orders up by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub kind: RefKind,
    pub value: String,
    /// Only orders of this provider (for provider-specific reference names).
    pub provider: Option<crate::proto::Provider>,
}

/// Filters for [`Store::list_orders`].
#[derive(Clone, Debug, Default)]
pub struct OrderFilter {
    pub source: Option<String>,
    pub provider: Option<crate::proto::Provider>,
    pub status: Option<OrderStatus>,
    pub updated_after: Option<prost_types::Timestamp>,
}

/// Filters for [`Store::list_events`].
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub order_id: Option<u64>,
    pub sources: Vec<String>,
    pub kinds: Vec<EventKind>,
}

/// Counts of stored state.
#[derive(Clone, Copy, Debug, Default)]
pub struct StateStats {
    pub orders: u64,
    pub quarantined: u64,
    pub size_on_disk: u64,
}

/// A page of results and where the next page starts.
#[derive(Clone, Debug, Default)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The position to continue after; `None` when there is nothing more.
    pub next_after: Option<u64>,
}

/// Most entries one page may scan while filtering; a page can then come
/// back short (even empty) with a position to continue from.
const SCAN_BUDGET: usize = 10_000;

/// A handle on the open store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The open sled database; `None` while it is being reopened after a
    /// storage failure (see [`recovery`]).
    engine: RwLock<Option<Arc<Engine>>>,
    config: StoreConfig,
    data_dir: std::path::PathBuf,
    durability: Durability,
    /// The data dir's storage format (see [`FORMAT`]).
    format: u64,
    shared: Arc<Shared>,
    retain_events: u64,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    workers: Mutex<Workers>,
}

/// One opened sled database.
pub(crate) struct Engine {
    db: sled::Db,
    tree: sled::Tree,
}

/// The threads that write to the engine, and the one that reopens it.
#[derive(Default)]
struct Workers {
    writer: Option<JoinHandle<Option<mpsc::Receiver<Command>>>>,
    flusher: Option<JoinHandle<()>>,
    recovery: Option<JoinHandle<()>>,
}

// === impl Engine ===

impl Engine {
    /// Opens (or creates) the sled database of `config.data_dir`; sled
    /// recovers its log.
    fn open(config: &StoreConfig) -> Result<(Arc<Self>, Counters), StoreError> {
        let dir = config.data_dir.join("sled");
        let db = open_sled(&dir, Some(config.cache_capacity_bytes))?;
        let tree: sled::Tree = (*db).clone();
        let counters = Counters::load(&tree)?;
        Ok((Arc::new(Self { db, tree }), counters))
    }
}

// === impl Store ===

impl Store {
    /// Opens (or creates) the store under `config.data_dir` and starts the
    /// writer, flusher and recovery threads.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let known = mark::read(&config.data_dir)?;
        let (engine, counters) = Engine::open(config)?;
        let format = match engine.tree.get(keys::meta("format"))? {
            Some(value) => keys::trailing_u64(&value),
            None if counters.last_raw == 0 => {
                engine.tree.insert(keys::meta("format"), &FORMAT.to_be_bytes())?;
                FORMAT
            }
            None => 1,
        };
        let recovered = counters.mark();
        mark::check(&config.data_dir, known, recovered)?;
        let shared = Arc::new(Shared::new(recovered, config.feed_buffer_events));
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        if config.unsafe_ack_before_durable {
            tracing::warn!("store.unsafe_ack_before_durable is set: acknowledged webhooks can be lost in a crash");
        }
        let store = Self {
            inner: Arc::new(Inner {
                engine: RwLock::new(None),
                config: config.clone(),
                data_dir: config.data_dir.clone(),
                durability: config.durability,
                format,
                shared,
                retain_events: config.retain_events,
                commands: Mutex::new(Some(tx)),
                workers: Mutex::default(),
            }),
        };
        store.start(engine, counters, rx)?;
        let (watched, shared) = (Arc::downgrade(&store.inner), store.inner.shared.clone());
        store.workers().recovery = Some(spawn_thread("ordertrail-recovery", move || recovery::run(watched, shared))?);
        Ok(store)
    }

    /// Starts the writer and the flusher on `engine`.
    fn start(&self, engine: Arc<Engine>, counters: Counters, rx: mpsc::Receiver<Command>) -> Result<(), StoreError> {
        let config = &self.inner.config;
        let shared = &self.inner.shared;
        let writer = Writer {
            tree: engine.tree.clone(),
            overlay: overlay::Overlay::new(engine.tree.clone()),
            counters,
            shared: shared.clone(),
            retain_events: config.retain_events,
            ack_before_durable: config.unsafe_ack_before_durable,
        };
        let flusher = Flusher {
            db: engine.db.clone(),
            durability: config.durability,
            dir: config.data_dir.join("sled"),
            data_dir: config.data_dir.clone(),
            shared: shared.clone(),
            synced_blobs: Default::default(),
            mark_written: std::time::Instant::now(),
        };
        *self.inner.engine.write().unwrap_or_else(|e| e.into_inner()) = Some(engine);
        let mut workers = self.workers();
        workers.writer = Some(spawn_thread("ordertrail-writer", move || writer.run(rx))?);
        workers.flusher = Some(spawn_thread("ordertrail-flusher", move || flusher.run())?);
        Ok(())
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, Workers> {
        self.inner.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open database, for a read.
    pub(crate) fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        self.inner
            .engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Unavailable("storage failed and the store is being reopened; retry".into()))
    }

    /// Whether this build can serve the data dir: its derived state must be
    /// in this build's format (the raw deliveries always are).
    pub fn check_format(&self) -> Result<(), StoreError> {
        match self.inner.format {
            FORMAT => Ok(()),
            found => Err(StoreError::Corrupt(format!(
                "{} holds storage format {found}, this build serves format {FORMAT}: stop it and run \
                 `ordertrail rebuild` to rebuild it from its raw deliveries",
                self.inner.data_dir.display()
            ))),
        }
    }

    /// Stores a delivery and waits until it is durable.
    pub async fn ingest(&self, incoming: Incoming) -> Result<IngestOutcome, StoreError> {
        self.submit(incoming).await?.await
    }

    /// Hands a delivery to the writer (deliveries are written in the order
    /// they are submitted); the returned future resolves once it is durable.
    pub async fn submit(
        &self,
        incoming: Incoming,
    ) -> Result<impl Future<Output = Result<IngestOutcome, StoreError>> + use<>, StoreError> {
        if !self.is_healthy() {
            return Err(StoreError::Unavailable("storage failed; retry later".into()));
        }
        let sender = self.sender().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        sender.send(Command { work: Work::Ingest(Box::new(incoming)), reply }).await.map_err(|_| StoreError::Closed)?;
        Ok(async move { answer.await.map_err(|_| StoreError::Closed)? })
    }

    /// Applies a quarantined delivery with what the current mappers make of
    /// it (`normalized`); waits until that is durable. `Duplicate` when it
    /// was not quarantined (nothing done) or its content was applied meanwhile.
    pub async fn redrive(&self, raw_id: u64, normalized: Normalized) -> Result<IngestOutcome, StoreError> {
        let sender = self.sender().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let work = Work::Redrive { raw_id, normalized };
        sender.send(Command { work, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn sender(&self) -> Option<mpsc::Sender<Command>> {
        self.inner.commands.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// False after a storage failure until a flush succeeds again.
    pub fn is_healthy(&self) -> bool {
        self.inner.shared.healthy.load(Ordering::SeqCst)
    }

    /// Starts reading the whole database once in the background, paced,
    /// so that damage is found without a client hitting it (see
    /// [`verify`]).
    pub fn verify_in_background(&self) -> Result<(), StoreError> {
        let (store, shared) = (Arc::downgrade(&self.inner), self.inner.shared.clone());
        spawn_thread("ordertrail-verify", move || verify::run(store, shared)).map(drop)
    }

    /// Notes that a read found stored data damaged (see [`Store::damage`]).
    pub fn note_damage(&self, why: &str) {
        self.inner.shared.note_damage(why);
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
    pub async fn wait_durable(&self, sequence: u64) -> Result<(), StoreError> {
        let mut head = self.inner.shared.watch_durable();
        head.wait_for(|h| *h >= sequence).await.map(|_| ()).map_err(|_| StoreError::Closed)
    }

    /// The oldest sequence still kept (events before it were pruned by
    /// `store.retain_events`).
    pub fn oldest_retained(&self) -> u64 {
        match self.inner.retain_events {
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
    pub fn commit_metrics(&self) -> CommitMetrics {
        self.inner.shared.metrics.clone()
    }

    /// Counts of stored state, for metrics.
    pub fn state_stats(&self) -> StateStats {
        let Ok(engine) = self.engine() else { return StateStats::default() };
        let tree = &engine.tree;
        let orders = tree.get(keys::meta("last_order")).ok().flatten().map_or(0, |v| keys::trailing_u64(&v));
        StateStats {
            orders,
            quarantined: tree.scan_prefix([keys::QUARANTINE]).keys().count() as u64,
            size_on_disk: engine.db.size_on_disk().unwrap_or(0),
        }
    }

    /// Live-feed statistics: (events kept for slow subscribers, times a
    /// subscriber lagged and went back to reading the store).
    pub fn feed_stats(&self) -> (usize, u64) {
        let shared = &self.inner.shared;
        (shared.feed_backlog(), shared.feed_lags.load(Ordering::Relaxed))
    }

    /// Makes storage fail at `point` until called again with `None`. For
    /// fault-injection tests of the ingest path; never used by the service.
    #[doc(hidden)]
    pub fn inject_fault(&self, point: Option<FaultPoint>) {
        self.inner.shared.set_fault(point);
    }

    fn note_feed_lag(&self) {
        self.inner.shared.feed_lags.fetch_add(1, Ordering::Relaxed);
    }

    /// Group-commit statistics: (flushes, replies they answered).
    pub fn commit_stats(&self) -> (u64, u64) {
        let shared = &self.inner.shared;
        (shared.flushes.load(Ordering::Relaxed), shared.flushed_replies.load(Ordering::Relaxed))
    }

    /// Holds (or releases) group commits, so tests can see what waits for one.
    #[cfg(test)]
    fn hold_commits(&self, held: bool) {
        self.inner.shared.hold(held);
    }

    /// Stops taking deliveries, lets queued ones finish durable, and flushes.
    /// Blocking; call from a blocking context. Ends promptly whatever the
    /// state of storage: after a failure nothing more is flushed (what was
    /// not durable was answered 503).
    pub fn close(&self) -> Result<(), StoreError> {
        self.inner.commands.lock().unwrap_or_else(|e| e.into_inner()).take();
        let recovery = self.workers().recovery.take();
        if let Some(writer) = self.workers().writer.take() {
            let _ = writer.join();
        }
        // The writer closes the queue when it ends; after a failure it may
        // be gone already.
        self.inner.shared.close();
        if let Some(recovery) = recovery {
            let _ = recovery.join();
        }
        let workers = std::mem::take(&mut *self.workers());
        for thread in [workers.flusher].into_iter().flatten() {
            let _ = thread.join();
        }
        if let Some(writer) = workers.writer {
            let _ = writer.join();
        }
        if !self.is_healthy() {
            tracing::warn!(
                durable_sequence = self.inner.shared.durable_mark().durable_sequence,
                "closing after a storage failure: nothing after the last durable sequence was acknowledged"
            );
            return Ok(());
        }
        self.engine()?.db.flush()?;
        let sync = self.inner.durability == Durability::Fsync;
        mark::write(&self.inner.data_dir, self.inner.shared.durable_mark(), sync)
            .map_err(|e| StoreError::Unavailable(format!("cannot write the durability mark: {e}")))
    }

    // === queries ===

    pub fn order(&self, id: u64) -> Result<Option<Order>, StoreError> {
        load_order(&self.engine()?.tree, id)
    }

    /// Every order `lookup` matches, optionally in one source, in id order.
    pub fn find_orders(&self, lookup: &Lookup, source: Option<&str>) -> Result<Vec<Order>, StoreError> {
        let mut ids = index_lookup(&self.engine()?.tree, lookup.kind, &lookup.value, source)?;
        ids.sort_unstable();
        ids.dedup();
        let mut orders = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(order) = self.order(id)?
                && lookup.provider.is_none_or(|p| order.provider() == p)
            {
                orders.push(order);
            }
        }
        Ok(orders)
    }

    /// Orders with an id greater than `after` that pass `filter`.
    pub fn list_orders(&self, filter: &OrderFilter, after: u64, limit: PageLimit) -> Result<Page<Order>, StoreError> {
        let start = keys::numbered(keys::ORDER, after.saturating_add(1));
        let end = keys::numbered(keys::ORDER, u64::MAX);
        let engine = self.engine()?;
        let entries = engine.tree.range(start..=end).map(|entry| -> Result<Order, StoreError> {
            let (_, value) = entry?;
            Ok(Order::decode(&*value)?)
        });
        page(entries, limit, |o: &Order| o.id, |o| order_matches(o, filter))
    }

    /// Durable events after `after` that pass `filter`, in sequence order.
    pub fn list_events(&self, filter: &EventFilter, after: u64, limit: PageLimit) -> Result<Page<Event>, StoreError> {
        let head = self.head_sequence();
        let engine = self.engine()?;
        let tree = &engine.tree;
        let matches = |e: &Event| {
            (filter.sources.is_empty() || filter.sources.contains(&e.source))
                && (filter.kinds.is_empty() || filter.kinds.contains(&e.kind()))
        };
        match filter.order_id {
            Some(order_id) => {
                let history = load_history(tree, order_id)?;
                let sequences = history.into_iter().filter(|s| *s > after && *s <= head);
                let events = sequences.filter_map(|seq| self.event(seq).transpose());
                page(events, limit, |e: &Event| e.sequence, matches)
            }
            None if after >= head => Ok(Page::default()),
            None => {
                let start = keys::numbered(keys::EVENT, after.saturating_add(1));
                let end = keys::numbered(keys::EVENT, head);
                let events = tree.range(start..=end).map(|entry| -> Result<Event, StoreError> {
                    let (_, value) = entry?;
                    Ok(Event::decode(&*value)?)
                });
                page(events, limit, |e: &Event| e.sequence, matches)
            }
        }
    }

    /// Stored events after `after` (up to the durable head), as stored:
    /// (sequence, protobuf encoding), not decoded. Stops after `limit`
    /// events or once `max_bytes` are read.
    pub fn list_events_encoded(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, bytes::Bytes)>, StoreError> {
        let head = self.head_sequence();
        if after >= head {
            return Ok(Vec::new());
        }
        let start = keys::numbered(keys::EVENT, after.saturating_add(1));
        let end = keys::numbered(keys::EVENT, head);
        let mut events = Vec::new();
        let mut bytes = 0;
        let engine = self.engine()?;
        for entry in engine.tree.range(start..=end) {
            let (key, value) = entry?;
            bytes += value.len();
            // sled's buffer is shared, not copied.
            events.push((keys::trailing_u64(&key), bytes::Bytes::from_owner(value)));
            if events.len() == limit || bytes >= max_bytes {
                break;
            }
        }
        Ok(events)
    }

    pub fn event(&self, sequence: u64) -> Result<Option<Event>, StoreError> {
        let value = self.engine()?.tree.get(keys::numbered(keys::EVENT, sequence))?;
        Ok(value.map(|v| Event::decode(&*v)).transpose()?)
    }

    pub fn raw(&self, id: u64) -> Result<Option<RawDelivery>, StoreError> {
        load_raw(&self.engine()?.tree, id)
    }

    /// How often each unknown provider status value was seen:
    /// (provider, `"order"` or `"shipment"`, value, count).
    pub fn unmapped_statuses(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        self.engine()?
            .tree
            .scan_prefix([keys::UNMAPPED])
            .map(|entry| {
                let (key, value) = entry?;
                let (provider, what, status) =
                    keys::parse_unmapped(&key).ok_or_else(|| StoreError::Corrupt("bad unmapped key".into()))?;
                Ok((provider, what, status, keys::trailing_u64(&value)))
            })
            .collect()
    }

    /// Quarantined deliveries with a raw id greater than `after`.
    pub fn list_quarantine(&self, after: u64, limit: PageLimit) -> Result<Page<RawDelivery>, StoreError> {
        let start = keys::numbered(keys::QUARANTINE, after.saturating_add(1));
        let end = keys::numbered(keys::QUARANTINE, u64::MAX);
        let engine = self.engine()?;
        let entries = engine.tree.range(start..=end).keys().filter_map(|key| match key {
            Ok(key) => self.raw(keys::trailing_u64(&key)).transpose(),
            Err(e) => Some(Err(e.into())),
        });
        page(entries, limit, |r: &RawDelivery| r.id, |_| true)
    }
}

fn order_matches(order: &Order, filter: &OrderFilter) -> bool {
    let after =
        |t: &prost_types::Timestamp| order.updated_at.is_some_and(|u| (u.seconds, u.nanos) > (t.seconds, t.nanos));
    filter.source.as_ref().is_none_or(|s| *s == order.source)
        && filter.provider.is_none_or(|p| order.provider() == p)
        && filter.status.is_none_or(|s| order.status() == s)
        && filter.updated_after.as_ref().is_none_or(after)
}

/// How many items a page may hold, and how many bytes they may take
/// encoded (a page always holds at least one matching item, however large).
#[derive(Clone, Copy, Debug)]
pub struct PageLimit {
    pub items: usize,
    pub bytes: usize,
}

/// Takes up to `limit` matching items, scanning at most [`SCAN_BUDGET`].
fn page<T: Message>(
    entries: impl Iterator<Item = Result<T, StoreError>>,
    limit: PageLimit,
    position: impl Fn(&T) -> u64,
    matches: impl Fn(&T) -> bool,
) -> Result<Page<T>, StoreError> {
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    for (scanned, entry) in entries.enumerate() {
        let item = entry?;
        if items.len() == limit.items || scanned == SCAN_BUDGET {
            return Ok(Page { items, next_after: last });
        }
        let at = position(&item);
        if matches(&item) {
            // The field's tag and length come on top of the item.
            let size = item.encoded_len() + 8;
            if !items.is_empty() && bytes + size > limit.bytes {
                return Ok(Page { items, next_after: last });
            }
            bytes += size;
            items.push(item);
        }
        last = Some(at);
    }
    Ok(Page { items, next_after: None })
}

/// A point read: sled's, or the writer's overlay over it.
pub(crate) trait Read {
    fn read(&self, key: &[u8]) -> sled::Result<Option<sled::IVec>>;
}

impl Read for sled::Tree {
    fn read(&self, key: &[u8]) -> sled::Result<Option<sled::IVec>> {
        self.get(key)
    }
}

fn load<M: Message + Default>(from: &impl Read, key: &[u8]) -> Result<Option<M>, StoreError> {
    Ok(from.read(key)?.map(|v| M::decode(&*v)).transpose()?)
}

pub(crate) fn load_raw(from: &impl Read, id: u64) -> Result<Option<RawDelivery>, StoreError> {
    load(from, &keys::numbered(keys::RAW, id))
}

pub(crate) fn load_order(from: &impl Read, id: u64) -> Result<Option<Order>, StoreError> {
    load(from, &keys::numbered(keys::ORDER, id))
}

/// What the store keeps after an order's own fields in its value: the
/// sequences of the order's events, ascending. `Order` decoding skips the
/// field (reserved in the proto), so a stored value reads as an `Order`.
#[derive(Clone, PartialEq, Message)]
struct OrderHistory {
    /// Field [`HISTORY_FIELD`].
    #[prost(uint64, repeated, tag = "1000")]
    event_sequences: Vec<u64>,
}

/// `reserved 1000` in `Order` (model.proto).
const HISTORY_FIELD: u32 = 1000;

/// An order's stored value: the order, then its event sequences.
pub(crate) fn encode_order(order: &Order, history: &[u64]) -> Vec<u8> {
    let mut value = order.encode_to_vec();
    prost::encoding::uint64::encode_packed(HISTORY_FIELD, history, &mut value);
    value
}

/// An order and the sequences of its events.
pub(crate) fn load_order_and_history(from: &impl Read, id: u64) -> Result<Option<(Order, Vec<u64>)>, StoreError> {
    let Some(value) = from.read(&keys::numbered(keys::ORDER, id))? else { return Ok(None) };
    Ok(Some((Order::decode(&*value)?, OrderHistory::decode(&*value)?.event_sequences)))
}

/// The sequences of an order's events (none if there is no such order).
fn load_history(from: &impl Read, id: u64) -> Result<Vec<u64>, StoreError> {
    let value = from.read(&keys::numbered(keys::ORDER, id))?;
    Ok(value.map(|v| OrderHistory::decode(&*v)).transpose()?.map(|h| h.event_sequences).unwrap_or_default())
}

/// Ids of the orders indexed under `value` in `source`.
pub(crate) fn indexed(from: &impl Read, kind: RefKind, value: &str, source: &str) -> Result<Vec<u64>, StoreError> {
    Ok(from.read(&keys::index(kind, value, source))?.map(|v| keys::ids(&v).collect()).unwrap_or_default())
}

/// Ids of the orders indexed under `value`, in `source` or in any source.
pub(crate) fn index_lookup(
    tree: &sled::Tree,
    kind: RefKind,
    value: &str,
    source: Option<&str>,
) -> Result<Vec<u64>, StoreError> {
    match source {
        Some(source) => indexed(tree, kind, value, source),
        None => {
            let mut ids = Vec::new();
            for entry in tree.scan_prefix(keys::index_prefix(kind, value)).values() {
                ids.extend(keys::ids(&entry?));
            }
            Ok(ids)
        }
    }
}

fn spawn_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, StoreError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| StoreError::Unavailable(format!("cannot start {name}: {e}")))
}

/// How often opening a locked database is tried again, 50 ms apart: sled's
/// own I/O threads can hold its lock for a while after the last handle is
/// dropped, longer on a busy machine.
const LOCK_RETRIES: usize = 100;

thread_local! {
    /// Set while sled opens a database: a panic there is reported as damage.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Opens the sled database in `dir`. sled panics on some damaged logs (a
/// truncated one, for instance); that is reported as damage in one line,
/// like every other damage, not as a crash.
pub(crate) fn open_sled(dir: &Path, cache_capacity: Option<u64>) -> Result<sled::Db, StoreError> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let open = || {
        QUIET_PANICS.with(|quiet| quiet.set(true));
        let opened = std::panic::catch_unwind(|| {
            let config = sled::Config::new().path(dir);
            match cache_capacity {
                Some(bytes) => config.cache_capacity(bytes).open(),
                None => config.open(),
            }
        });
        QUIET_PANICS.with(|quiet| quiet.set(false));
        opened
    };
    // A database closed a moment ago (in this process or another) may
    // still be locked while sled's own threads wind down (up to 5 s here).
    let mut opened = open();
    for _ in 0..LOCK_RETRIES {
        match &opened {
            // sled reports its lock as an `Other` error with this text.
            Ok(Err(sled::Error::Io(e))) if e.to_string().starts_with("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                opened = open();
            }
            _ => break,
        }
    }
    match opened {
        Ok(result) => result.map_err(|e| open_error(dir, e)),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(StoreError::Corrupt(format!(
                "the database in {} is damaged: sled cannot recover it ({why}); refusing to start. Restore a \
                 backup, or salvage what is readable with `ordertrail export`",
                dir.display()
            )))
        }
    }
}

fn open_error(dir: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => {
            StoreError::Corrupt(format!("the database in {} is corrupt ({e}); refusing to start", dir.display()))
        }
        other => StoreError::Unavailable(format!("cannot open the database in {}: {other}", dir.display())),
    }
}

#[cfg(test)]
mod tests;
