//! The single writer: takes the deliveries queued for it, processes them one
//! at a time in order (raw record, events, orders, indexes, dedup entry),
//! applies the whole turn as one atomic sled batch (with the counters), and
//! hands each reply and its events to the group commit
//! ([`super::commit`]), which answers only once the batch is durable.
//!
//! sled charges a fixed cost per applied batch, so one batch per turn
//! rather than per delivery is what lets the writer keep up with a burst.
//! Reads go through the turn's [`Overlay`], so each delivery sees the
//! ones before it.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prost::Message;
use tokio::sync::mpsc;

use super::commit::{FaultPoint, Reply, Shared};
use super::feed::Published;
use super::keys::{self, RefKind};
use super::mark::Mark;
use super::overlay::Overlay;
use super::{Incoming, IngestOutcome, StoreError};
use crate::ingest::{MAPPER_VERSION, Normalized, Unrecognized};
use crate::proto::{DeliveryOutcome, Order, OrderReferences, Provenance, RawDelivery};
use crate::state;

/// Work handed to the writer.
pub(super) struct Command {
    pub work: Work,
    pub reply: Reply,
}

pub(super) enum Work {
    /// A new delivery.
    Ingest(Box<Incoming>),
    /// A quarantined delivery that the current mappers understand.
    Redrive { raw_id: u64, normalized: Normalized },
    /// Stop and give the queue back (the store is being reopened).
    Stop,
}

/// The last ids handed out; persisted in every batch.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Counters {
    pub last_sequence: u64,
    pub last_raw: u64,
    pub last_order: u64,
}

impl Counters {
    const NAMES: [&'static str; 3] = ["last_sequence", "last_raw", "last_order"];

    pub fn load(tree: &sled::Tree) -> sled::Result<Self> {
        let read = |name: &str| -> sled::Result<u64> {
            Ok(tree.get(keys::meta(name))?.map(|v| keys::trailing_u64(&v)).unwrap_or(0))
        };
        Ok(Self {
            last_sequence: read(Self::NAMES[0])?,
            last_raw: read(Self::NAMES[1])?,
            last_order: read(Self::NAMES[2])?,
        })
    }

    /// How far these counters reach.
    pub fn mark(&self) -> Mark {
        Mark { durable_sequence: self.last_sequence, durable_raw: self.last_raw }
    }

    fn write(&self, overlay: &mut Overlay) {
        let values = [self.last_sequence, self.last_raw, self.last_order];
        for (name, value) in Self::NAMES.iter().zip(values) {
            overlay.insert(keys::meta(name), value.to_be_bytes().as_slice());
        }
    }
}

// === impl Writer ===

/// Most deliveries applied in one turn.
const TURN_DELIVERIES: usize = 512;
/// A turn ends early once it has written this many bytes.
const TURN_BYTES: usize = 16 << 20;

pub(super) struct Writer {
    pub tree: sled::Tree,
    pub overlay: Overlay,
    pub counters: Counters,
    pub shared: Arc<Shared>,
    /// Keep only this many newest events (0: all).
    pub retain_events: u64,
    /// UNSAFE negative-control switch: reply as soon as a delivery is
    /// processed, before its turn is written or flushed.
    pub ack_before_durable: bool,
}

/// An order and the sequences of its events, as stored together.
type WithHistory = (Order, Vec<u64>);

/// A processed delivery waiting for its turn's batch to be applied.
type Done = (Reply, IngestOutcome, Vec<Published>);

impl Writer {
    /// Runs until every sender is gone (then lets the flusher drain and
    /// returns `None`), or until told to stop (then returns the queue).
    /// Each turn takes what is queued (at least one command, waiting for
    /// it). After a storage failure every delivery is answered 503 at once.
    pub fn run(mut self, mut commands: mpsc::Receiver<Command>) -> Option<mpsc::Receiver<Command>> {
        while let Some(first) = commands.blocking_recv() {
            #[cfg(test)]
            let shared = self.shared.clone();
            #[cfg(test)]
            let _gate = shared.writer_gate.lock().unwrap_or_else(|e| e.into_inner());
            let before = self.counters;
            let mut done = Vec::new();
            let mut next = Some(first);
            while let Some(Command { work, reply }) = next.take() {
                let result = match work {
                    Work::Stop => {
                        self.apply_turn(done, before);
                        return Some(commands);
                    }
                    _ if !self.shared.is_healthy() => Err(StoreError::Unavailable("storage failed".into())),
                    Work::Ingest(incoming) => self.process_or_quarantine(*incoming),
                    Work::Redrive { raw_id, normalized } => self.redrive(raw_id, &normalized),
                };
                match result {
                    Ok((outcome, events)) if self.ack_before_durable => {
                        let _ = reply.send(Ok(outcome.clone()));
                        done.push((tokio::sync::oneshot::channel().0, outcome, events));
                    }
                    Ok((outcome, events)) => done.push((reply, outcome, events)),
                    Err(e) => {
                        self.overlay.discard();
                        // Damage in one record is that delivery's problem;
                        // an I/O error is the store's.
                        match &e {
                            StoreError::Unavailable(_) => self.shared.fail(&format_args!("read failed: {e}")),
                            StoreError::Corrupt(why) => self.shared.note_damage(why),
                            StoreError::Closed => {}
                        }
                        let _ = reply.send(Err(e));
                    }
                }
                if done.len() < TURN_DELIVERIES && self.overlay.bytes() < TURN_BYTES {
                    next = commands.try_recv().ok();
                }
            }
            self.apply_turn(done, before);
        }
        self.shared.close();
        None
    }

    /// Applies the turn's writes as one atomic batch, then queues the
    /// replies for the group commit in order. If the batch cannot be
    /// applied, nothing of the turn was written: every delivery in it is
    /// answered 503 and the counters go back.
    fn apply_turn(&mut self, done: Vec<Done>, before: Counters) {
        if done.is_empty() {
            return;
        }
        self.counters.write(&mut self.overlay);
        self.overlay.keep();
        let applied = self
            .shared
            .fault(FaultPoint::Write)
            .map_err(|e| StoreError::Unavailable(e.to_string()))
            .and_then(|()| Ok(self.tree.apply_batch(self.overlay.take_batch())?));
        match applied {
            Ok(()) => {
                self.shared.turns.fetch_add(1, Ordering::Relaxed);
                self.shared.written(self.counters.last_sequence);
                self.shared.enqueue(done);
            }
            Err(e) => {
                self.overlay.clear();
                self.counters = before;
                self.shared.fail(&format_args!("write failed: {e}"));
                for (reply, _, _) in done {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Processes a delivery; should applying it panic (a bug), the delivery
    /// is still kept, in quarantine, rather than lost. `process` keeps its
    /// writes only once complete, so the retry starts clean.
    fn process_or_quarantine(&mut self, incoming: Incoming) -> Result<(IngestOutcome, Vec<Published>), StoreError> {
        let raw = incoming.raw.clone();
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.process(incoming))) {
            Ok(result) => result,
            Err(_) => {
                self.overlay.discard();
                tracing::error!(request_id = %raw.request_id, "applying a delivery failed; keeping it in quarantine");
                let reason = Unrecognized("internal error while applying; kept for re-drive".into());
                self.process(Incoming { raw, mapped: Err(reason) })
            }
        }
    }

    /// Returns the outcome and the events the delivery produced.
    fn process(&mut self, incoming: Incoming) -> Result<(IngestOutcome, Vec<Published>), StoreError> {
        let Incoming { mut raw, mapped } = incoming;
        let dedup_key = match &mapped {
            Ok(n) => n.dedup_key.clone(),
            Err(_) => format!("raw:{}", raw.body_sha256),
        };
        let dedup = keys::dedup(&raw.source, &dedup_key);
        if let Some(value) = self.overlay.get(&dedup)? {
            let duplicate = IngestOutcome::Duplicate {
                raw_id: keys::trailing_u64(&value[..8.min(value.len())]),
                quarantined: value.get(8) == Some(&(DeliveryOutcome::Quarantined as u8)),
            };
            return Ok((duplicate, Vec::new()));
        }
        let mut counters = self.counters;
        counters.last_raw += 1;
        raw.id = counters.last_raw;
        raw.dedup_key = dedup_key;
        raw.mapper_version = MAPPER_VERSION;
        let mut events = Vec::new();
        let outcome = match mapped {
            Ok(normalized) => {
                events = self.plan_events(&mut counters, &raw, &normalized)?;
                let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
                raw.outcome = DeliveryOutcome::Applied as i32;
                raw.event_sequences = sequences.clone();
                IngestOutcome::Applied { raw_id: raw.id, sequences }
            }
            Err(reason) => {
                raw.outcome = DeliveryOutcome::Quarantined as i32;
                raw.quarantine_reason = reason.0.clone();
                self.overlay.insert(keys::numbered(keys::QUARANTINE, raw.id), &[]);
                IngestOutcome::Quarantined { raw_id: raw.id, reason: reason.0 }
            }
        };
        self.overlay.insert(dedup, dedup_entry(raw.id, raw.outcome()));
        self.keep(&raw, counters);
        Ok((outcome, events))
    }

    /// Adds the raw record and keeps the delivery's writes in the turn;
    /// only then do the in-memory counters move.
    fn keep(&mut self, raw: &RawDelivery, counters: Counters) {
        self.overlay.insert(keys::numbered(keys::RAW, raw.id), raw.encode_to_vec());
        self.overlay.keep();
        self.counters = counters;
    }

    /// Applies a quarantined delivery with what the mappers now make of it:
    /// its events are committed, it leaves the quarantine, and its raw
    /// record says so. A delivery that is not (or no longer) quarantined is
    /// left alone, so re-driving twice is harmless.
    fn redrive(&mut self, raw_id: u64, normalized: &Normalized) -> Result<(IngestOutcome, Vec<Published>), StoreError> {
        let quarantine = keys::numbered(keys::QUARANTINE, raw_id);
        let Some(mut raw) =
            super::load_raw(&self.overlay, raw_id)?.filter(|_| self.overlay.contains_key(&quarantine).unwrap_or(false))
        else {
            return Ok((IngestOutcome::Duplicate { raw_id, quarantined: false }, Vec::new()));
        };
        let mut counters = self.counters;
        self.overlay.remove(quarantine);
        let dedup = keys::dedup(&raw.source, &normalized.dedup_key);
        let (outcome, events) = match self.overlay.get(&dedup)? {
            Some(value) => {
                // The same content was applied meanwhile: nothing to add.
                let original = keys::trailing_u64(&value[..8.min(value.len())]);
                raw.quarantine_reason = format!("duplicate of delivery {original}");
                (IngestOutcome::Duplicate { raw_id: original, quarantined: false }, Vec::new())
            }
            None => {
                raw.dedup_key = normalized.dedup_key.clone();
                let events = self.plan_events(&mut counters, &raw, normalized)?;
                raw.event_sequences = events.iter().map(|e| e.sequence).collect();
                raw.quarantine_reason.clear();
                self.overlay.insert(dedup, dedup_entry(raw_id, DeliveryOutcome::Applied));
                (IngestOutcome::Applied { raw_id, sequences: raw.event_sequences.clone() }, events)
            }
        };
        raw.outcome = DeliveryOutcome::Applied as i32;
        raw.mapper_version = MAPPER_VERSION;
        // A resend of the same bytes is now a duplicate of an applied delivery.
        let raw_dedup = keys::dedup(&raw.source, &format!("raw:{}", raw.body_sha256));
        self.overlay.insert(raw_dedup, dedup_entry(raw.id, DeliveryOutcome::Applied));
        self.keep(&raw, counters);
        Ok((outcome, events))
    }

    /// Applies every observation to its order and puts events, orders (with
    /// their event sequences) and new index entries into the overlay. Returns the events,
    /// each with the encoding that was stored (subscribers get those bytes).
    fn plan_events(
        &mut self,
        counters: &mut Counters,
        raw: &RawDelivery,
        normalized: &Normalized,
    ) -> Result<Vec<Published>, StoreError> {
        // Orders changed so far, with the sequences of their events.
        let mut touched: HashMap<u64, WithHistory> = HashMap::new();
        let mut unmapped: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut events = Vec::with_capacity(normalized.observations.len());
        let provenance = provenance(raw);
        let provider = crate::ingest::Provider::from_proto(raw.provider()).map(|p| p.name()).unwrap_or("unknown");
        for obs in &normalized.observations {
            for (what, value) in obs.unmapped() {
                *unmapped.entry(keys::unmapped(provider, what, value)).or_default() += 1;
            }
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
            let order_id = match (&current, found) {
                (Some(order), _) => order.id,
                _ => {
                    counters.last_order += 1;
                    counters.last_order
                }
            };
            counters.last_sequence += 1;
            let before = index_keys(current.as_ref());
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
            event.provenance = Some(provenance.clone());
            for key in index_keys(Some(&order)).difference(&before) {
                let present = self.overlay.get(key)?.unwrap_or_default();
                if let Some(value) = keys::with_id(&present, order_id) {
                    self.overlay.insert(key.clone(), value);
                }
            }
            let encoded = bytes::Bytes::from(event.encode_to_vec());
            self.overlay.insert(keys::numbered(keys::EVENT, event.sequence), encoded.as_ref());
            if self.retain_events > 0 && event.sequence > self.retain_events {
                self.overlay.remove(keys::numbered(keys::EVENT, event.sequence - self.retain_events));
            }
            history.push(event.sequence);
            events.push(Published { sequence: event.sequence, event: Some(event), encoded });
            touched.insert(order_id, (order, history));
        }
        for (id, (order, history)) in touched {
            self.overlay.insert(keys::numbered(keys::ORDER, id), super::encode_order(&order, &history));
        }
        for (key, added) in unmapped {
            let count = self.overlay.get(&key)?.map(|v| keys::trailing_u64(&v)).unwrap_or(0);
            self.overlay.insert(key, (count + added).to_be_bytes().as_slice());
        }
        Ok(events)
    }

    /// Finds the order an observation belongs to: by provider order id, then
    /// safe id, then merchant reference, within the source. A match on the
    /// latter two is rejected when it already has another provider order id.
    /// Returns its id and, when it was read from the store, the stored
    /// order with its event sequences (so it is not read twice).
    fn resolve(
        &self,
        refs: &OrderReferences,
        source: &str,
        touched: &HashMap<u64, WithHistory>,
    ) -> Result<Option<(u64, Option<WithHistory>)>, StoreError> {
        let candidates = [
            (RefKind::ProviderOrder, &refs.provider_order_id),
            (RefKind::Safe, &refs.safe_id),
            (RefKind::Merchant, &refs.merchant_reference),
        ];
        for (kind, value) in candidates.into_iter().filter(|(_, v)| !v.is_empty()) {
            if let Some((order, _)) = touched.values().find(|(o, _)| reference_of(o, kind) == Some(value.as_str()))
                && compatible(order, refs)
            {
                return Ok(Some((order.id, None)));
            }
            for id in super::indexed(&self.overlay, kind, value, source)? {
                if let Some(stored) = super::load_order_and_history(&self.overlay, id)?
                    && compatible(&stored.0, refs)
                {
                    return Ok(Some((id, Some(stored))));
                }
            }
        }
        Ok(None)
    }
}

impl Writer {
    /// The order a replacement replaces: same source, its merchant
    /// reference is the replacement's original reference. 0 if not known.
    fn original_of(&self, order: &Order) -> Result<u64, StoreError> {
        let ids = super::indexed(&self.overlay, RefKind::Merchant, &order.original_merchant_reference, &order.source)?;
        Ok(ids.into_iter().find(|id| *id != order.id).unwrap_or(0))
    }
}

/// A dedup entry: the raw id the key belongs to and what became of it.
fn dedup_entry(raw_id: u64, outcome: DeliveryOutcome) -> Vec<u8> {
    let mut value = raw_id.to_be_bytes().to_vec();
    value.push(outcome as u8);
    value
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

/// Every index key an order should be findable by.
fn index_keys(order: Option<&Order>) -> HashSet<Vec<u8>> {
    let Some(order) = order else { return HashSet::new() };
    let mut out = HashSet::new();
    for kind in [RefKind::Merchant, RefKind::ProviderOrder, RefKind::Safe] {
        if let Some(value) = reference_of(order, kind).filter(|v| !v.is_empty()) {
            out.insert(keys::index(kind, value, &order.source));
        }
    }
    for shipment in order.shipments.iter().filter(|s| !s.tracking_number.is_empty()) {
        out.insert(keys::index(RefKind::Tracking, &shipment.tracking_number, &order.source));
    }
    out
}

fn provenance(raw: &RawDelivery) -> Provenance {
    Provenance {
        raw_id: raw.id,
        body_sha256: raw.body_sha256.clone(),
        content_type: raw.content_type.clone(),
        auth_method: raw.auth_method.clone(),
        peer_addr: raw.peer_addr.clone(),
        mapper_version: MAPPER_VERSION,
        dedup_key: raw.dedup_key.clone(),
        request_id: raw.request_id.clone(),
    }
}
