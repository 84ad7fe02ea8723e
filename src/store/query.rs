//! The store's queries: point reads, filtered pages, and the lookups by
//! reference, all `async` (see [`super::engine`] for why).

use prost::Message;

use super::engine::Engine;
use super::plan::RefKind;
use super::{Store, StoreError, blocking};
use crate::proto::{DeliveryOutcome, Event, EventKind, Order, OrderStatus, RawDelivery};

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
    pub providers: Vec<crate::proto::Provider>,
    pub kinds: Vec<EventKind>,
}

impl EventFilter {
    fn matches(&self, e: &Event) -> bool {
        (self.sources.is_empty() || self.sources.contains(&e.source))
            && (self.providers.is_empty() || self.providers.contains(&e.provider()))
            && (self.kinds.is_empty() || self.kinds.contains(&e.kind()))
    }
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

impl Store {
    /// Runs a read on the engine: inline for a local engine whose reads
    /// are a page or two, on the blocking pool otherwise.
    pub(super) async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Engine) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let engine = self.engine()?;
        if engine.reads_inline() {
            return read(&engine);
        }
        blocking(move || read(&engine)).await?
    }

    /// Runs a read that may scan many records off the async runtime.
    pub(super) async fn read_off_runtime<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Engine) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let engine = self.engine()?;
        blocking(move || read(&engine)).await?
    }

    pub async fn order(&self, id: u64) -> Result<Option<Order>, StoreError> {
        self.read(move |engine| engine.order(id)).await
    }

    /// Every order `lookup` matches, optionally in one source, in id order.
    pub async fn find_orders(&self, lookup: &Lookup, source: Option<&str>) -> Result<Vec<Order>, StoreError> {
        let (lookup, source) = (lookup.clone(), source.map(str::to_owned));
        self.read(move |engine| find_orders(engine, &lookup, source.as_deref())).await
    }

    /// Orders with an id greater than `after` that pass `filter`.
    pub async fn list_orders(
        &self,
        filter: &OrderFilter,
        after: u64,
        limit: PageLimit,
    ) -> Result<Page<Order>, StoreError> {
        let filter = filter.clone();
        self.read_off_runtime(move |engine| {
            page(engine.orders_after(after), limit, |o: &Order| o.id, |o| order_matches(o, &filter))
        })
        .await
    }

    /// Durable events after `after` that pass `filter`, in sequence order.
    pub async fn list_events(
        &self,
        filter: &EventFilter,
        after: u64,
        limit: PageLimit,
    ) -> Result<Page<Event>, StoreError> {
        let (filter, head) = (filter.clone(), self.head_sequence());
        self.read_off_runtime(move |engine| list_events(engine, &filter, after, head, limit)).await
    }

    /// Stored events after `after` (up to the durable head), as stored:
    /// (sequence, protobuf encoding), not decoded. Stops after `limit`
    /// events or once `max_bytes` are read.
    pub(crate) async fn list_events_encoded(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, bytes::Bytes)>, StoreError> {
        let head = self.head_sequence();
        if after >= head {
            return Ok(Vec::new());
        }
        self.read_off_runtime(move |engine| {
            let mut events = Vec::new();
            let mut bytes = 0;
            for entry in engine.events_encoded(after, head) {
                let (sequence, encoded) = entry?;
                bytes += encoded.len();
                events.push((sequence, encoded));
                if events.len() == limit || bytes >= max_bytes {
                    break;
                }
            }
            Ok(events)
        })
        .await
    }

    pub async fn event(&self, sequence: u64) -> Result<Option<Event>, StoreError> {
        self.read(move |engine| engine.event(sequence)).await
    }

    /// A stored delivery, as received, with what became of it.
    pub async fn delivery(&self, id: u64) -> Result<Option<RawDelivery>, StoreError> {
        let raw = self.read(move |engine| engine.raw(id)).await?;
        Ok(raw.map(|raw| self.with_dedup_key(raw)))
    }

    /// A stored delivery with the key it is de-duplicated on, which is not
    /// stored with it (the dedup entry holds it): its raw bytes' while
    /// quarantined, what the mappers make of it once applied.
    fn with_dedup_key(&self, mut raw: RawDelivery) -> RawDelivery {
        if raw.dedup_key.is_empty() {
            let mapped = match raw.outcome() {
                DeliveryOutcome::Applied => self.map(&raw),
                _ => Err(crate::ingest::Unrecognized(String::new())),
            };
            raw.dedup_key = super::plan::dedup_key(&raw.source, &mapped, &raw.body_sha256).key;
        }
        raw
    }

    /// How often each unknown provider status value was seen:
    /// (provider, `"order"` or `"shipment"`, value, count).
    pub async fn unmapped_statuses(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        self.read_off_runtime(|engine| engine.unmapped()).await
    }

    /// Everything remembered besides deliveries: (name, value).
    pub async fn remembered(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read_off_runtime(|engine| engine.remembered()).await
    }

    /// Remembers `value` under `name`, durably, replacing what was there.
    /// Not a delivery: export leaves it out, a rebuild carries it over.
    pub async fn remember(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let name = name.to_string();
        self.read_off_runtime(move |engine| engine.remember(&name, &value)).await
    }

    /// Quarantined deliveries with a raw id greater than `after`.
    pub async fn list_quarantined(&self, after: u64, limit: PageLimit) -> Result<Page<RawDelivery>, StoreError> {
        self.read_off_runtime(move |engine| {
            let entries = engine.quarantined_after(after).filter_map(|id| match id {
                Ok(id) => engine.raw(id).transpose(),
                Err(e) => Some(Err(e)),
            });
            page(entries, limit, |r: &RawDelivery| r.id, |_| true)
        })
        .await
        .map(|page| Page { items: page.items.into_iter().map(|raw| self.with_dedup_key(raw)).collect(), ..page })
    }
}

fn find_orders(engine: &Engine, lookup: &Lookup, source: Option<&str>) -> Result<Vec<Order>, StoreError> {
    let mut ids = engine.indexed(lookup.kind, &lookup.value, source)?;
    ids.sort_unstable();
    ids.dedup();
    let mut orders = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(order) = engine.order(id)?
            && lookup.provider.is_none_or(|p| order.provider() == p)
        {
            orders.push(order);
        }
    }
    Ok(orders)
}

fn list_events(
    engine: &Engine,
    filter: &EventFilter,
    after: u64,
    head: u64,
    limit: PageLimit,
) -> Result<Page<Event>, StoreError> {
    let matches = |e: &Event| filter.matches(e);
    match filter.order_id {
        Some(order_id) => {
            let history = engine.order_and_history(order_id)?.map(|(_, history)| history).unwrap_or_default();
            let sequences = history.into_iter().filter(|s| *s > after && *s <= head);
            let events = sequences.filter_map(|seq| engine.event(seq).transpose());
            page(events, limit, |e: &Event| e.sequence, matches)
        }
        None => {
            let events = engine.events_encoded(after, head).map(|entry| Ok(Event::decode(entry?.1)?));
            page(events, limit, |e: &Event| e.sequence, matches)
        }
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
