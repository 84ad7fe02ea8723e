//! The domain of one batch of deliveries, engine-neutral.
//!
//! For a batch, in order: the dedup decision, which order each observation
//! belongs to (creating orders from whatever arrives first), the state rules
//! ([`crate::state::apply`]), replacement links, index entries, events,
//! quarantine and the unmapped-status counts. It works on values, never on
//! an engine: [`Wants`] says what it needs read, the engine answers with
//! [`Found`] (one set-based read per kind of key), and [`plan`] decides in
//! memory and produces one [`WriteSet`] for the engine to commit atomically
//! with the sequences it assigned from [`Counters`].
//!
//! ```text
//!   deliveries ─► first_wants ─► engine.read ─► order_wants ─► engine.read
//!                                                                 │
//!        engine.commit(WriteSet) ◄─ plan(found) ◄─────────────────┘
//!                                     │ Err(Wants): a key nobody
//!                                     └─► predicted; read it, plan again
//! ```
//!
//! `plan` is a pure function of the batch, the counters and what was found,
//! so planning again after a further read gives the same answer for what it
//! had already decided. Within a batch each delivery sees the ones before
//! it; a delivery that fails (damaged stored data) leaves the others as they
//! were; a bug that panics on one delivery keeps it in quarantine instead of
//! losing it.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use prost::Message;

use super::feed::Published;
use super::mark::Mark;
use super::{Delivery, IngestOutcome, StoreError};
use crate::ingest::{MAPPER_VERSION, Normalized, Unrecognized};
use crate::proto::{DeliveryOutcome, Order, OrderReferences, Provenance, RawDelivery};
use crate::state;

/// The reference kinds that have an index. All are scoped by source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefKind {
    /// ExternalOrderId / customer_ref / po_number.
    Merchant,
    /// The provider's order id.
    ProviderOrder,
    /// OrderMesh SafeId.
    Safe,
    /// Carrier tracking number.
    Tracking,
}

/// An index entry: the orders with this reference in this source.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RefKey {
    pub kind: RefKind,
    pub value: String,
    pub source: String,
}

/// A permanent dedup entry's key: the mapper's dedup key within a source.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct DedupKey {
    pub source: String,
    pub key: String,
}

/// What a dedup key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DedupEntry {
    pub raw_id: u64,
    pub outcome: DeliveryOutcome,
}

/// An unknown provider status value, counted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct UnmappedKey {
    pub provider: String,
    /// `"order"` or `"shipment"`.
    pub applies_to: String,
    pub value: String,
}

/// An order and the sequences of its events, ascending, as stored together.
pub(crate) type WithHistory = (Order, Vec<u64>);

/// The last ids handed out. PostgreSQL keeps them in its counter row,
/// written with every write set; sled derives them from its newest keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub last_sequence: u64,
    pub last_raw: u64,
    pub last_order: u64,
}

impl Counters {
    /// How far these counters reach.
    pub fn mark(&self) -> Mark {
        Mark { durable_sequence: self.last_sequence, durable_raw: self.last_raw }
    }
}

/// One piece of work of a batch.
#[derive(Debug)]
pub(crate) enum Work {
    /// A new delivery.
    Ingest(Box<Delivery>),
    /// A quarantined delivery that the current mappers understand.
    Redrive { raw_id: u64, normalized: Normalized },
}

/// What a batch needs read from the engine.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Wants {
    pub dedup: BTreeSet<DedupKey>,
    pub refs: BTreeSet<RefKey>,
    pub orders: BTreeSet<u64>,
    /// Raw records, with whether each is quarantined.
    pub raws: BTreeSet<u64>,
    pub unmapped: BTreeSet<UnmappedKey>,
}

impl Wants {
    pub fn is_empty(&self) -> bool {
        self.dedup.is_empty()
            && self.refs.is_empty()
            && self.orders.is_empty()
            && self.raws.is_empty()
            && self.unmapped.is_empty()
    }
}

/// What the engine read: every wanted key has an entry. Damage is reported
/// per record, so one damaged order fails only the deliveries that need it.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub dedup: BTreeMap<DedupKey, Option<DedupEntry>>,
    pub refs: BTreeMap<RefKey, Vec<u64>>,
    pub orders: BTreeMap<u64, Result<Option<WithHistory>, StoreError>>,
    /// A raw record and whether it is quarantined.
    pub raws: BTreeMap<u64, Result<Option<(RawDelivery, bool)>, StoreError>>,
    pub unmapped: BTreeMap<UnmappedKey, u64>,
}

impl Found {
    pub(crate) fn absorb(&mut self, more: Found) {
        self.dedup.extend(more.dedup);
        self.refs.extend(more.refs);
        self.orders.extend(more.orders);
        self.raws.extend(more.raws);
        self.unmapped.extend(more.unmapped);
    }
}

/// An engine's batch read: one call per round, every wanted key answered.
/// An error is the storage's (the whole batch fails), not a record's.
pub(crate) trait Reader {
    fn read(&self, wants: &Wants) -> Result<Found, StoreError>;
}

/// Everything a batch writes, for one atomic commit.
#[derive(Debug, Default)]
pub(crate) struct WriteSet {
    /// Raw records, new or updated (a re-drive).
    pub raws: Vec<RawDelivery>,
    /// New events: (sequence, encoding).
    pub events: Vec<(u64, Bytes)>,
    /// Events no longer kept (`store.retain_events`).
    pub pruned_events: Vec<u64>,
    /// Orders, new or changed, with their event sequences.
    pub orders: BTreeMap<u64, WithHistory>,
    /// Order ids to add to index entries (present ones are kept).
    pub index: BTreeMap<RefKey, IndexAdd>,
    pub dedup: Vec<(DedupKey, DedupEntry)>,
    /// Raw ids entering (true) or leaving (false) the quarantine.
    pub quarantine: Vec<(u64, bool)>,
    /// New totals of unmapped status values.
    pub unmapped: BTreeMap<UnmappedKey, u64>,
    /// The counters after this write set.
    pub counters: Counters,
}

/// Order ids added to one index entry.
#[derive(Debug, Default)]
pub(crate) struct IndexAdd {
    pub ids: Vec<u64>,
    /// The ids the entry held, when the batch read them (an engine that
    /// stores the entry as one value need not read it again).
    pub present: Option<Vec<u64>>,
}

/// One delivery's answer, and the events it produced.
pub(crate) type Outcome = Result<(IngestOutcome, Vec<Published>), StoreError>;

/// A planned batch: what to write, and each work item's answer, in order.
#[derive(Debug)]
pub(crate) struct Planned {
    pub writes: WriteSet,
    pub outcomes: Vec<Outcome>,
}

/// Plans `batch` with the reads of `reader`: one round for the keys the
/// deliveries name, one for the orders those keys lead to, and one more
/// for each key nobody predicted (rare: an order found through a
/// reference written earlier in the same batch, for instance).
pub(crate) fn plan_with(
    reader: &impl Reader,
    batch: &[Work],
    counters: Counters,
    retain_events: u64,
) -> Result<Planned, StoreError> {
    let mut found = reader.read(&first_wants(batch))?;
    let orders = order_wants(&found);
    if !orders.is_empty() {
        found.absorb(reader.read(&orders)?);
    }
    loop {
        match plan(batch, counters, &found, retain_events) {
            Ok(planned) => return Ok(planned),
            Err(wants) => found.absorb(reader.read(&wants)?),
        }
    }
}

/// The keys the deliveries of a batch name: dedup keys, the references
/// their observations resolve by, unmapped-status counters, and the raw
/// records of re-drives.
pub(crate) fn first_wants(batch: &[Work]) -> Wants {
    let mut wants = Wants::default();
    for work in batch {
        match work {
            Work::Ingest(delivery) => {
                let raw = &delivery.raw;
                match &delivery.mapped {
                    Ok(normalized) => wants_of(&mut wants, &raw.source, provider_of(raw), normalized),
                    Err(_) => {
                        let key = DedupKey { source: raw.source.clone(), key: raw_dedup_key(&raw.body_sha256) };
                        wants.dedup.insert(key);
                    }
                }
            }
            // The rest is known only once the raw record is read.
            Work::Redrive { raw_id, .. } => {
                wants.raws.insert(*raw_id);
            }
        }
    }
    wants
}

/// The references, dedup key and unmapped counters of a normalized
/// delivery in `source`.
fn wants_of(wants: &mut Wants, source: &str, provider: &str, normalized: &Normalized) {
    wants.dedup.insert(DedupKey { source: source.into(), key: normalized.dedup_key.clone() });
    for obs in &normalized.observations {
        let refs = &obs.references;
        for (kind, value) in resolving(refs).chain([(RefKind::Merchant, &obs.order.original_merchant_reference)]) {
            if !value.is_empty() {
                wants.refs.insert(RefKey { kind, value: value.clone(), source: source.into() });
            }
        }
        for (applies_to, value) in obs.unmapped() {
            wants.unmapped.insert(unmapped_key(provider, applies_to, value));
        }
    }
}

/// The orders the found index entries lead to.
pub(crate) fn order_wants(found: &Found) -> Wants {
    let mut wants = Wants::default();
    wants.orders.extend(found.refs.values().flatten().filter(|id| !found.orders.contains_key(id)));
    wants
}

/// The provider's name, for unmapped counters.
fn provider_of(raw: &RawDelivery) -> &'static str {
    crate::provider::Provider::from_proto(raw.provider()).map_or("unknown", |p| p.name())
}

fn unmapped_key(provider: &str, applies_to: &str, value: &str) -> UnmappedKey {
    UnmappedKey { provider: provider.into(), applies_to: applies_to.into(), value: value.into() }
}

/// The dedup key of a delivery: the mapper's, or the body's hash for a
/// delivery the mapper did not understand.
pub(crate) fn dedup_key(source: &str, mapped: &Result<Normalized, Unrecognized>, body_sha256: &str) -> DedupKey {
    let key = match mapped {
        Ok(n) => n.dedup_key.clone(),
        Err(_) => raw_dedup_key(body_sha256),
    };
    DedupKey { source: source.into(), key }
}

fn raw_dedup_key(body_sha256: &str) -> String {
    format!("raw:{body_sha256}")
}

/// The references an observation is resolved by, in that order.
fn resolving(refs: &OrderReferences) -> impl Iterator<Item = (RefKind, &String)> {
    [
        (RefKind::ProviderOrder, &refs.provider_order_id),
        (RefKind::Safe, &refs.safe_id),
        (RefKind::Merchant, &refs.merchant_reference),
    ]
    .into_iter()
}

/// Plans a batch with what was found; `Err` names what else must be read.
pub(crate) fn plan(batch: &[Work], counters: Counters, found: &Found, retain_events: u64) -> Result<Planned, Wants> {
    let mut turn = Turn { found, kept: Layer::default(), current: Layer::default(), counters, retain_events };
    let mut outcomes = Vec::with_capacity(batch.len());
    for work in batch {
        let outcome = match turn.work_or_quarantine(work) {
            Ok(outcome) => {
                turn.keep();
                Ok(outcome)
            }
            Err(Stop::Read(wants)) => return Err(wants),
            Err(Stop::Failed(e)) => {
                turn.current = Layer::default();
                Err(e)
            }
        };
        outcomes.push(outcome);
    }
    Ok(Planned { writes: turn.kept.into_writes(turn.counters, found), outcomes })
}

/// Why planning a delivery stopped.
enum Stop {
    /// A key was not read yet.
    Read(Wants),
    /// Stored data it needs is damaged: this delivery fails, the batch
    /// goes on.
    Failed(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Self::Failed(e)
    }
}

/// Writes planned so far.
#[derive(Default)]
struct Layer {
    raws: Vec<RawDelivery>,
    events: Vec<(u64, Bytes)>,
    pruned_events: Vec<u64>,
    orders: BTreeMap<u64, WithHistory>,
    index: BTreeMap<RefKey, Vec<u64>>,
    dedup: BTreeMap<DedupKey, DedupEntry>,
    quarantine: BTreeMap<u64, bool>,
    unmapped: BTreeMap<UnmappedKey, u64>,
    counters: Option<Counters>,
}

impl Layer {
    fn absorb(&mut self, later: Layer) {
        self.raws.extend(later.raws);
        self.events.extend(later.events);
        self.pruned_events.extend(later.pruned_events);
        self.orders.extend(later.orders);
        for (key, ids) in later.index {
            let present = self.index.entry(key).or_default();
            present.extend(ids);
            present.sort_unstable();
            present.dedup();
        }
        self.dedup.extend(later.dedup);
        self.quarantine.extend(later.quarantine);
        self.unmapped.extend(later.unmapped);
    }

    fn into_writes(self, counters: Counters, found: &Found) -> WriteSet {
        let index = self.index.into_iter().map(|(key, ids)| {
            let present = found.refs.get(&key).cloned();
            (key, IndexAdd { ids, present })
        });
        WriteSet {
            raws: self.raws,
            events: self.events,
            pruned_events: self.pruned_events,
            orders: self.orders.into_iter().collect(),
            index: index.collect(),
            dedup: self.dedup.into_iter().collect(),
            quarantine: self.quarantine.into_iter().collect(),
            unmapped: self.unmapped.into_iter().collect(),
            counters,
        }
    }
}

/// Planning state: what was found, the writes of the deliveries kept so
/// far, and those of the delivery being planned.
struct Turn<'a> {
    found: &'a Found,
    kept: Layer,
    current: Layer,
    /// The counters as of the kept deliveries.
    counters: Counters,
    retain_events: u64,
}

/// Orders changed so far by one delivery, with their event sequences.
type Touched = BTreeMap<u64, WithHistory>;

/// Stops to read what `want` adds.
fn missing<T>(want: impl FnOnce(&mut Wants) -> T) -> Stop {
    let mut wants = Wants::default();
    want(&mut wants);
    Stop::Read(wants)
}

impl Turn<'_> {
    /// The delivery is complete: its writes and counters join the batch.
    fn keep(&mut self) {
        let current = std::mem::take(&mut self.current);
        if let Some(counters) = current.counters {
            self.counters = counters;
        }
        self.kept.absorb(current);
    }

    // === reads: this delivery, the batch, then what was found ===

    fn dedup(&self, key: &DedupKey) -> Result<Option<DedupEntry>, Stop> {
        if let Some(entry) = self.current.dedup.get(key).or_else(|| self.kept.dedup.get(key)) {
            return Ok(Some(*entry));
        }
        self.found.dedup.get(key).copied().ok_or_else(|| missing(|w| w.dedup.insert(key.clone())))
    }

    fn indexed(&self, key: &RefKey) -> Result<Vec<u64>, Stop> {
        let Some(stored) = self.found.refs.get(key) else {
            return Err(missing(|w| w.refs.insert(key.clone())));
        };
        let mut ids = stored.clone();
        for layer in [&self.kept, &self.current] {
            ids.extend(layer.index.get(key).into_iter().flatten());
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    fn order(&self, id: u64) -> Result<Option<WithHistory>, Stop> {
        if let Some(order) = self.current.orders.get(&id).or_else(|| self.kept.orders.get(&id)) {
            return Ok(Some(order.clone()));
        }
        match self.found.orders.get(&id) {
            Some(Ok(order)) => Ok(order.clone()),
            Some(Err(e)) => Err(Stop::Failed(e.clone())),
            None => Err(missing(|w| w.orders.insert(id))),
        }
    }

    /// A raw record and whether it is quarantined.
    fn raw(&self, id: u64) -> Result<Option<(RawDelivery, bool)>, Stop> {
        let quarantined = self.current.quarantine.get(&id).or_else(|| self.kept.quarantine.get(&id)).copied();
        let written = self.current.raws.iter().chain(&self.kept.raws).rev().find(|r| r.id == id);
        let (raw, stored_quarantined) = match (written, self.found.raws.get(&id)) {
            (Some(raw), _) => {
                // Compressed by this process a moment ago: it decompresses.
                let mut raw = raw.clone();
                restore_derivable(&mut raw).map_err(|why| Stop::Failed(StoreError::Corrupt(why)))?;
                (raw, false)
            }
            (None, Some(Ok(Some((raw, q))))) => (raw.clone(), *q),
            (None, Some(Ok(None))) => return Ok(None),
            (None, Some(Err(e))) => return Err(Stop::Failed(e.clone())),
            (None, None) => return Err(missing(|w| w.raws.insert(id))),
        };
        Ok(Some((raw, quarantined.unwrap_or(stored_quarantined))))
    }

    fn unmapped_count(&self, key: &UnmappedKey) -> Result<u64, Stop> {
        if let Some(count) = self.current.unmapped.get(key).or_else(|| self.kept.unmapped.get(key)) {
            return Ok(*count);
        }
        self.found.unmapped.get(key).copied().ok_or_else(|| missing(|w| w.unmapped.insert(key.clone())))
    }

    // === the work ===

    fn work_or_quarantine(&mut self, work: &Work) -> Result<(IngestOutcome, Vec<Published>), Stop> {
        match work {
            Work::Ingest(delivery) => self.ingest_or_quarantine(delivery),
            Work::Redrive { raw_id, normalized } => self.redrive(*raw_id, normalized),
        }
    }

    /// Plans a delivery; should applying it panic (a bug), the delivery is
    /// still kept, in quarantine, rather than lost.
    fn ingest_or_quarantine(&mut self, delivery: &Delivery) -> Result<(IngestOutcome, Vec<Published>), Stop> {
        let raw = delivery.raw.clone();
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.ingest(raw, &delivery.mapped))) {
            Ok(result) => result,
            Err(_) => {
                self.current = Layer::default();
                tracing::error!(request_id = %delivery.raw.request_id, "applying a delivery failed; keeping it in quarantine");
                let reason = Unrecognized("internal error while applying; kept for re-drive".into());
                self.ingest(delivery.raw.clone(), &Err(reason))
            }
        }
    }

    fn ingest(
        &mut self,
        mut raw: RawDelivery,
        mapped: &Result<Normalized, Unrecognized>,
    ) -> Result<(IngestOutcome, Vec<Published>), Stop> {
        let dedup = dedup_key(&raw.source, mapped, &raw.body_sha256);
        if let Some(entry) = self.dedup(&dedup)? {
            let quarantined = entry.outcome == DeliveryOutcome::Quarantined;
            return Ok((IngestOutcome::Duplicate { raw_id: entry.raw_id, quarantined }, Vec::new()));
        }
        let mut counters = self.counters;
        counters.last_raw += 1;
        raw.id = counters.last_raw;
        raw.dedup_key.clone_from(&dedup.key);
        raw.mapper_version = MAPPER_VERSION;
        let mut events = Vec::new();
        let outcome = match mapped {
            Ok(normalized) => {
                events = self.plan_events(&mut counters, &raw, normalized)?;
                let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
                raw.outcome = DeliveryOutcome::Applied as i32;
                raw.event_sequences.clone_from(&sequences);
                IngestOutcome::Applied { raw_id: raw.id, sequences }
            }
            Err(reason) => {
                raw.outcome = DeliveryOutcome::Quarantined as i32;
                raw.quarantine_reason.clone_from(&reason.0);
                self.current.quarantine.insert(raw.id, true);
                IngestOutcome::Quarantined { raw_id: raw.id, reason: reason.0.clone() }
            }
        };
        self.current.dedup.insert(dedup, DedupEntry { raw_id: raw.id, outcome: raw.outcome() });
        strip_derivable(&mut raw);
        self.current.raws.push(raw);
        self.current.counters = Some(counters);
        Ok((outcome, events))
    }

    /// Applies a quarantined delivery with what the mappers now make of it:
    /// its events are committed, it leaves the quarantine, and its raw
    /// record says so. A delivery that is not (or no longer) quarantined is
    /// left alone, so re-driving twice is harmless.
    fn redrive(&mut self, raw_id: u64, normalized: &Normalized) -> Result<(IngestOutcome, Vec<Published>), Stop> {
        let Some((mut raw, true)) = self.raw(raw_id)? else {
            return Ok((IngestOutcome::Duplicate { raw_id, quarantined: false }, Vec::new()));
        };
        let mut wants = Wants::default();
        wants_of(&mut wants, &raw.source, provider_of(&raw), normalized);
        self.require(wants)?;
        let mut counters = self.counters;
        self.current.quarantine.insert(raw_id, false);
        let dedup = DedupKey { source: raw.source.clone(), key: normalized.dedup_key.clone() };
        let (outcome, events) = match self.dedup(&dedup)? {
            Some(entry) => {
                // The same content was applied meanwhile: nothing to add.
                raw.quarantine_reason = format!("duplicate of delivery {}", entry.raw_id);
                (IngestOutcome::Duplicate { raw_id: entry.raw_id, quarantined: false }, Vec::new())
            }
            None => {
                raw.dedup_key.clone_from(&normalized.dedup_key);
                let events = self.plan_events(&mut counters, &raw, normalized)?;
                raw.event_sequences = events.iter().map(|e| e.sequence).collect();
                raw.quarantine_reason.clear();
                self.current.dedup.insert(dedup, DedupEntry { raw_id, outcome: DeliveryOutcome::Applied });
                (IngestOutcome::Applied { raw_id, sequences: raw.event_sequences.clone() }, events)
            }
        };
        raw.outcome = DeliveryOutcome::Applied as i32;
        raw.mapper_version = MAPPER_VERSION;
        // A resend of the same bytes is now a duplicate of an applied delivery
        // (the record was read back whole, its body's SHA-256 included).
        let raw_dedup = DedupKey { source: raw.source.clone(), key: raw_dedup_key(&raw.body_sha256) };
        self.current.dedup.insert(raw_dedup, DedupEntry { raw_id: raw.id, outcome: DeliveryOutcome::Applied });
        // Read back decompressed; a new delivery's body was compressed when
        // it was submitted.
        compress_body(&mut raw);
        strip_derivable(&mut raw);
        self.current.raws.push(raw);
        self.current.counters = Some(counters);
        Ok((outcome, events))
    }

    /// Fails with every key of `wants` that was not read yet (so a
    /// re-drive, whose keys are known only once its raw record is read,
    /// costs one more round, not one per key).
    fn require(&self, wants: Wants) -> Result<(), Stop> {
        let found = self.found;
        let mut missing = Wants::default();
        missing.dedup.extend(wants.dedup.into_iter().filter(|k| !found.dedup.contains_key(k)));
        let known = wants.refs.iter().filter_map(|k| found.refs.get(k)).flatten();
        missing.orders.extend(known.filter(|id| !found.orders.contains_key(id)));
        missing.refs.extend(wants.refs.into_iter().filter(|k| !found.refs.contains_key(k)));
        missing.unmapped.extend(wants.unmapped.into_iter().filter(|k| !found.unmapped.contains_key(k)));
        if missing.is_empty() { Ok(()) } else { Err(Stop::Read(missing)) }
    }

    /// Applies every observation to its order and plans events, orders
    /// (with their event sequences) and new index entries. Returns the
    /// events, each with its encoding (subscribers get those bytes).
    fn plan_events(
        &mut self,
        counters: &mut Counters,
        raw: &RawDelivery,
        normalized: &Normalized,
    ) -> Result<Vec<Published>, Stop> {
        let mut touched = Touched::new();
        let mut events = Vec::with_capacity(normalized.observations.len());
        let provenance = provenance(raw);
        let provider = provider_of(raw);
        for obs in &normalized.observations {
            self.count_unmapped(provider, obs)?;
            let (found, loaded) = match self.resolve(&obs.references, &raw.source, &touched)? {
                Some((id, loaded)) => (Some(id), loaded),
                None => (None, None),
            };
            // An order changed earlier in this delivery is newer than the
            // stored one resolve read.
            let (current, mut history) = found
                .and_then(|id| touched.remove(&id))
                .or(loaded)
                .map_or((None, Vec::new()), |(order, history)| (Some(order), history));
            let order_id = match &current {
                Some(order) => order.id,
                None => {
                    counters.last_order += 1;
                    counters.last_order
                }
            };
            counters.last_sequence += 1;
            let before = index_entries(current.as_ref());
            let ctx = state::Context {
                sequence: counters.last_sequence,
                received_at: raw.received_at.unwrap_or_default(),
                order_id,
                source: &raw.source,
                provider: raw.provider(),
            };
            let (mut order, mut event) = state::apply(current, obs, &ctx);
            if order.original_order_id == 0 && !order.original_merchant_reference.is_empty() {
                order.original_order_id = self.original_of(&order)?;
            }
            event.provenance = Some(provenance);
            self.index_new_references(&before, &order);
            history.push(event.sequence);
            events.push(self.keep_event(event));
            touched.insert(order_id, (order, history));
        }
        self.current.orders.extend(touched);
        Ok(events)
    }

    /// Counts the status values of `obs` the mapping tables do not know.
    fn count_unmapped(&mut self, provider: &str, obs: &crate::ingest::Observation) -> Result<(), Stop> {
        for (applies_to, value) in obs.unmapped() {
            let key = unmapped_key(provider, applies_to, value);
            let count = self.unmapped_count(&key)?;
            self.current.unmapped.insert(key, count + 1);
        }
        Ok(())
    }

    /// Indexes `order` under the references it gained (`before`: the index
    /// entries it had).
    fn index_new_references(&mut self, before: &[RefKey], order: &Order) {
        for key in index_entries(Some(order)).into_iter().filter(|k| !before.contains(k)) {
            self.current.index.entry(key).or_default().push(order.id);
        }
    }

    /// Writes an event, encoded once (subscribers get these bytes), and
    /// prunes the one `store.retain_events` no longer keeps.
    fn keep_event(&mut self, event: crate::proto::Event) -> Published {
        let encoded = Bytes::from(event.encode_to_vec());
        self.current.events.push((event.sequence, encoded.clone()));
        if self.retain_events > 0 && event.sequence > self.retain_events {
            self.current.pruned_events.push(event.sequence - self.retain_events);
        }
        Published { sequence: event.sequence, event: Some(event), encoded }
    }

    /// Finds the order an observation belongs to: by provider order id, then
    /// safe id, then merchant reference, within the source. A match on the
    /// latter two is rejected when it already has another provider order id.
    /// Returns its id and, when it was read, the order with its event
    /// sequences (so it is not read twice).
    fn resolve(
        &self,
        refs: &OrderReferences,
        source: &str,
        touched: &Touched,
    ) -> Result<Option<(u64, Option<WithHistory>)>, Stop> {
        for (kind, value) in resolving(refs).filter(|(_, v)| !v.is_empty()) {
            if let Some((order, _)) = touched.values().find(|(o, _)| reference_of(o, kind) == Some(value.as_str()))
                && compatible(order, refs)
            {
                return Ok(Some((order.id, None)));
            }
            let key = RefKey { kind, value: value.clone(), source: source.into() };
            for id in self.indexed(&key)? {
                if let Some(stored) = self.order(id)?
                    && compatible(&stored.0, refs)
                {
                    return Ok(Some((id, Some(stored))));
                }
            }
        }
        Ok(None)
    }

    /// The order a replacement replaces: same source, its merchant
    /// reference is the replacement's original reference. 0 if not known.
    fn original_of(&self, order: &Order) -> Result<u64, Stop> {
        let key = RefKey {
            kind: RefKind::Merchant,
            value: order.original_merchant_reference.clone(),
            source: order.source.clone(),
        };
        Ok(self.indexed(&key)?.into_iter().find(|id| *id != order.id).unwrap_or(0))
    }
}

fn reference_of(order: &Order, kind: RefKind) -> Option<&str> {
    let refs = order.references.as_ref()?;
    let value = match kind {
        RefKind::Merchant => &refs.merchant_reference,
        RefKind::ProviderOrder => &refs.provider_order_id,
        RefKind::Safe => &refs.safe_id,
        RefKind::Tracking => return None,
    };
    Some(value.as_str())
}

/// Two provider order ids that differ mean two different orders.
fn compatible(order: &Order, refs: &OrderReferences) -> bool {
    let ours = order.references.as_ref().map(|r| r.provider_order_id.as_str()).unwrap_or("");
    ours.is_empty() || refs.provider_order_id.is_empty() || ours == refs.provider_order_id
}

/// Every index entry an order should be findable by.
fn index_entries(order: Option<&Order>) -> Vec<RefKey> {
    let Some(order) = order else { return Vec::new() };
    let mut out = Vec::new();
    for kind in [RefKind::Merchant, RefKind::ProviderOrder, RefKind::Safe] {
        if let Some(value) = reference_of(order, kind).filter(|v| !v.is_empty()) {
            out.push(RefKey { kind, value: value.into(), source: order.source.clone() });
        }
    }
    for shipment in order.shipments.iter().filter(|s| !s.tracking_number.is_empty()) {
        out.push(RefKey {
            kind: RefKind::Tracking,
            value: shipment.tracking_number.clone(),
            source: order.source.clone(),
        });
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Clears what a raw record need not store: its body's SHA-256 (the body
/// gives it), its content type when the headers hold it, and its dedup key
/// (the dedup entry holds it; [`super::Store::delivery`] makes it again).
/// Storage formats up to 4 stored them. The body is compressed apart, once
/// (see [`compress_body`]).
fn strip_derivable(raw: &mut RawDelivery) {
    raw.body_sha256.clear();
    raw.dedup_key.clear();
    if raw.headers.get("content-type") == Some(&raw.content_type) {
        raw.content_type.clear();
    }
}

/// The largest body a stored record may decompress to.
const MAX_BODY_BYTES: usize = 1 << 30;

/// Compresses a body that compresses (zstd level 1: a few microseconds for
/// a webhook; JSON bodies shrink to about half). Done once: for a new
/// delivery on the submitting task, not the writer's; for a re-driven one,
/// read back decompressed, by the writer.
pub(crate) fn compress_body(raw: &mut RawDelivery) {
    const LEVEL: i32 = 1;
    thread_local! {
        // A compression context is large to set up; each thread keeps one.
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            std::cell::RefCell::new(zstd::bulk::Compressor::new(LEVEL).ok());
    }
    if raw.body.len() < 64 || !raw.body_zstd.is_empty() {
        return;
    }
    let compressed = COMPRESSOR.with_borrow_mut(|compressor| compressor.as_mut()?.compress(&raw.body).ok());
    if let Some(compressed) = compressed
        && compressed.len() + 16 < raw.body.len()
    {
        raw.body_zstd = compressed;
        raw.body = Default::default();
    }
}

/// A stored raw delivery read back, with its body's SHA-256 and its
/// content type (see [`strip_derivable`]). A record whose body does not
/// decompress is damaged.
pub(crate) fn decode_raw(bytes: &[u8]) -> Result<RawDelivery, StoreError> {
    let mut raw = RawDelivery::decode(bytes)?;
    restore_derivable(&mut raw).map_err(StoreError::Corrupt)?;
    Ok(raw)
}

fn restore_derivable(raw: &mut RawDelivery) -> Result<(), String> {
    if !raw.body_zstd.is_empty() {
        // Compressed by this process from a body it held: it decompresses.
        thread_local! {
            static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
        }
        // The frame records the body's length: exactly that is allocated.
        let size = zstd::zstd_safe::get_frame_content_size(&raw.body_zstd).ok().flatten().unwrap_or(u64::MAX);
        let decompressed = match usize::try_from(size).ok().filter(|size| *size <= MAX_BODY_BYTES) {
            Some(size) => DECOMPRESSOR.with_borrow_mut(|decompressor| match decompressor.as_mut() {
                Some(decompressor) => decompressor.decompress(&raw.body_zstd, size),
                None => zstd::bulk::decompress(&raw.body_zstd, size),
            }),
            None => Err(std::io::Error::other("the compressed body does not say its length")),
        };
        let body = decompressed.map_err(|e| format!("the body of raw delivery {} does not decompress: {e}", raw.id))?;
        raw.body = body.into();
        raw.body_zstd.clear();
    }
    if raw.body_sha256.is_empty() {
        raw.body_sha256 = crate::ingest::sha256_hex(&raw.body);
    }
    if raw.content_type.is_empty()
        && let Some(content_type) = raw.headers.get("content-type")
    {
        raw.content_type.clone_from(content_type);
    }
    Ok(())
}

fn provenance(raw: &RawDelivery) -> Provenance {
    Provenance { raw_id: raw.id, mapper_version: MAPPER_VERSION }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::store::sled_engine::SledEngine;

    #[test]
    fn a_raw_record_stores_nothing_derivable_and_reads_back_whole() {
        let body = b"customer_ref=M-1&status=OPEN".to_vec();
        let raw = RawDelivery {
            id: 7,
            content_type: "application/x-www-form-urlencoded".into(),
            headers: [("content-type".to_string(), "application/x-www-form-urlencoded".to_string())].into(),
            body_sha256: crate::ingest::sha256_hex(&body),
            dedup_key: "withings:abc".into(),
            body: body.into(),
            ..RawDelivery::default()
        };
        let mut stored = raw.clone();
        strip_derivable(&mut stored);
        assert!(stored.body_sha256.is_empty() && stored.content_type.is_empty() && stored.dedup_key.is_empty());
        assert!(stored.body_zstd.is_empty(), "a short body is kept as it is");
        assert!(stored.encoded_len() < raw.encoded_len() - 64 - 33);
        let read = decode_raw(&stored.encode_to_vec()).unwrap();
        assert_eq!(
            read,
            RawDelivery { dedup_key: String::new(), ..raw.clone() },
            "the dedup key is the store's to add"
        );
        // A content type the headers do not hold is kept.
        let mut odd = RawDelivery { content_type: "text/plain".into(), ..raw.clone() };
        strip_derivable(&mut odd);
        assert_eq!(odd.content_type, "text/plain");
        // Format 4 records (everything stored) read the same.
        assert_eq!(decode_raw(&raw.encode_to_vec()).unwrap(), raw);
    }

    #[test]
    fn a_body_that_compresses_is_stored_compressed_and_reads_back_the_same() {
        let body: Vec<u8> = serde_json::to_vec(&serde_json::json!({
            "EventType": "OrderUpdate", "OrderId": "670e58fe7741035996cf7d20", "ExternalOrderId": "WBTEST22",
            "Description": "Order updated: status updated from Open to ReadyForFulfillment",
            "NewStatus": "ReadyForFulfillment", "OldStatus": "Open", "SafeId": "WebhooksTest22",
        }))
        .unwrap();
        let raw = RawDelivery { id: 3, body: body.clone().into(), ..RawDelivery::default() };
        let mut stored = raw.clone();
        compress_body(&mut stored);
        strip_derivable(&mut stored);
        assert!(stored.body.is_empty() && !stored.body_zstd.is_empty());
        assert!(stored.encoded_len() < raw.encoded_len(), "{} < {}", stored.encoded_len(), raw.encoded_len());
        let read = decode_raw(&stored.encode_to_vec()).unwrap();
        assert_eq!(read.body, body);
        assert!(read.body_zstd.is_empty(), "never in an answer");
        assert_eq!(read.body_sha256, crate::ingest::sha256_hex(&body));
        // A compressed body that does not decompress is damage, not an
        // empty body.
        let mut damaged = stored.clone();
        let middle = damaged.body_zstd.len() / 2;
        damaged.body_zstd.truncate(middle);
        assert!(matches!(decode_raw(&damaged.encode_to_vec()), Err(StoreError::Corrupt(_))));
        // Random bytes do not compress: kept as they are.
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut kept = RawDelivery { body: noise.clone().into(), ..RawDelivery::default() };
        compress_body(&mut kept);
        assert!(kept.body_zstd.is_empty() || kept.body.is_empty());
        assert_eq!(decode_raw(&kept.encode_to_vec()).unwrap().body, noise);
    }

    /// The sled engine, counting the read rounds a batch takes.
    struct Counting {
        engine: SledEngine,
        rounds: Cell<usize>,
    }

    impl Reader for Counting {
        fn read(&self, wants: &Wants) -> Result<Found, StoreError> {
            self.rounds.set(self.rounds.get() + 1);
            self.engine.read(wants)
        }
    }

    fn ordermesh(body: String) -> Work {
        Work::Ingest(Box::new(crate::store::tests::ordermesh(body)))
    }

    fn creation(n: usize) -> Work {
        ordermesh(format!(
            r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o{n}","ExternalOrderId":"E{n}"}}"#
        ))
    }

    fn update(n: usize, status: &str) -> Work {
        ordermesh(format!(
            r#"{{"EventType":"OrderUpdate","OrderId":"o{n}","ExternalOrderId":"E{n}","OldStatus":"Open","NewStatus":"{status}"}}"#
        ))
    }

    fn engine() -> (tempfile::TempDir, Counting) {
        let dir = tempfile::tempdir().unwrap();
        let engine = SledEngine::open(dir.path(), None).unwrap();
        (dir, Counting { engine, rounds: Cell::new(0) })
    }

    /// What a networked engine needs: a batch is read in a fixed number of
    /// set-based rounds (the keys the deliveries name, then the orders
    /// those lead to), not one read per delivery.
    #[test]
    fn a_batch_is_read_in_two_rounds_however_many_deliveries_it_holds() {
        let (_dir, engine) = engine();
        let created = plan_with(&engine, &(0..100).map(creation).collect::<Vec<_>>(), Counters::default(), 0).unwrap();
        assert_eq!(engine.rounds.get(), 1, "new orders: nothing to read but the keys");
        assert_eq!(created.writes.orders.len(), 100);
        engine.engine.apply(&created.writes).unwrap();
        engine.rounds.set(0);
        let updates: Vec<Work> = (0..100).map(|n| update(n, "Shipped")).collect();
        let updated = plan_with(&engine, &updates, created.writes.counters, 0).unwrap();
        assert_eq!(engine.rounds.get(), 2, "the keys, then the orders they lead to");
        assert!(updated.outcomes.iter().all(|o| matches!(o, Ok((IngestOutcome::Applied { .. }, _)))));
        assert_eq!(updated.writes.orders.len(), 100, "every update found its order");
        assert_eq!(updated.writes.counters.last_order, 100, "no order was created twice");
    }

    /// Within a batch each delivery sees the ones before it: a resend is a
    /// duplicate, an update finds the order created just before it.
    #[test]
    fn deliveries_of_one_batch_see_each_other() {
        let (_dir, engine) = engine();
        let batch = vec![creation(1), creation(1), update(1, "Shipped")];
        let planned = plan_with(&engine, &batch, Counters::default(), 0).unwrap();
        let outcomes: Vec<IngestOutcome> = planned.outcomes.into_iter().map(|o| o.unwrap().0).collect();
        assert!(matches!(outcomes[0], IngestOutcome::Applied { raw_id: 1, .. }), "{outcomes:?}");
        assert_eq!(outcomes[1], IngestOutcome::Duplicate { raw_id: 1, quarantined: false });
        assert!(matches!(outcomes[2], IngestOutcome::Applied { raw_id: 2, .. }), "{outcomes:?}");
        let (order, history) = &planned.writes.orders[&1];
        assert_eq!((order.status(), history.as_slice()), (crate::proto::OrderStatus::Shipped, &[1, 2][..]));
        assert_eq!(planned.writes.counters, Counters { last_sequence: 2, last_raw: 2, last_order: 1 });
    }

    /// A key nobody predicted (here: an order the first round could not
    /// know about) is read in one more round, and planning gives the same
    /// answer it would have with everything read up front.
    #[test]
    fn a_key_not_read_yet_is_asked_for_and_planning_starts_over() {
        let batch = vec![creation(7)];
        let found = Found::default();
        let Err(wants) = plan(&batch, Counters::default(), &found, 0) else { panic!("planned without reading") };
        assert_eq!(wants.dedup.len(), 1, "{wants:?}");
        let (_dir, engine) = engine();
        let mut found = engine.read(&first_wants(&batch)).unwrap();
        found.absorb(engine.read(&order_wants(&found)).unwrap());
        let planned = plan(&batch, Counters::default(), &found, 0).unwrap();
        assert!(matches!(planned.outcomes[0], Ok((IngestOutcome::Applied { raw_id: 1, .. }, _))));
    }
}
