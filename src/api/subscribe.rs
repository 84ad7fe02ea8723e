//! `Subscribe`: one task per stream turns the store's gap-free feed into
//! filtered responses, sends an optional snapshot first, and reports its
//! position periodically. The task writes into a bounded channel; when the
//! client is slow the task waits, and the feed (not the writer) absorbs the
//! lag by reading from the store. Shutdown ends every stream at once with a
//! status that says where to resume.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

use super::wire::Outgoing;
use super::{lookup, store_status};
use crate::config::GrpcConfig;
use crate::proto::subscribe_response::Message;
use crate::proto::{self, CaughtUp, Event, Order, Progress, SnapshotComplete, SubscribeRequest, SubscribeResponse};
use crate::store::{Feed, FeedError, FeedItem, Lookup, Published, RefKind, Store};

/// Opens and limits `Subscribe` streams.
#[derive(Clone)]
pub struct Subscriptions {
    store: Store,
    shutdown: CancellationToken,
    slots: Arc<Semaphore>,
    buffer: usize,
    progress_every: Duration,
    /// Every open stream's position, for metrics.
    positions: Arc<Mutex<HashMap<u64, Arc<AtomicU64>>>>,
    next_id: Arc<AtomicU64>,
    shares: PeerShares,
}

/// Streams open per client address, so that one client cannot take every
/// slot.
#[derive(Clone)]
struct PeerShares {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limit: usize,
}

/// One stream's part of its peer's share; given back when dropped.
struct PeerSlot {
    peer: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PeerShares {
    fn take(&self, peer: Option<IpAddr>) -> Result<Option<PeerSlot>, Status> {
        let Some(peer) = peer else { return Ok(None) };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(peer).or_default();
        if *count >= self.limit {
            return Err(Status::resource_exhausted(format!(
                "this client already has {} open subscriptions (grpc.max_subscriptions_per_peer)",
                self.limit
            )));
        }
        *count += 1;
        Ok(Some(PeerSlot { peer, open: self.open.clone() }))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// Keeps a stream's position visible while the stream lives.
struct Registration {
    id: u64,
    position: Arc<AtomicU64>,
    positions: Arc<Mutex<HashMap<u64, Arc<AtomicU64>>>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.positions.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl Subscriptions {
    pub fn new(store: Store, shutdown: CancellationToken, config: &GrpcConfig) -> Self {
        Self {
            store,
            shutdown,
            slots: Arc::new(Semaphore::new(config.max_subscriptions)),
            buffer: config.subscription_buffer,
            progress_every: config.progress_interval,
            positions: Arc::default(),
            next_id: Arc::default(),
            shares: PeerShares { open: Arc::default(), limit: config.max_subscriptions_per_peer },
        }
    }

    /// (stream id, position) of every open stream.
    pub fn positions(&self) -> Vec<(u64, u64)> {
        let positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        positions.iter().map(|(id, p)| (*id, p.load(Ordering::Relaxed))).collect()
    }

    fn register(&self, start: u64) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let position = Arc::new(AtomicU64::new(start));
        self.positions.lock().unwrap_or_else(|e| e.into_inner()).insert(id, position.clone());
        Registration { id, position, positions: self.positions.clone() }
    }

    /// Starts a stream for `request` from `peer`.
    pub async fn open(&self, request: SubscribeRequest, peer: Option<IpAddr>) -> Result<Outbound, Status> {
        let peer_slot = self.shares.take(peer)?;
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("too many open subscriptions; retry later or raise grpc.max_subscriptions")
        })?;
        let mut filter = Filter::new(&request)?;
        filter.seed(&self.store).await?;
        // The feed subscribes to live events before the head is read.
        let mut feed = self.store.feed(0);
        if filter.takes_everything() {
            feed.skip_decoding();
        }
        let start = request.after_sequence.unwrap_or_else(|| self.store.head_sequence());
        let oldest = self.store.oldest_retained();
        if start.saturating_add(1) < oldest {
            return Err(out_of_range(start, oldest));
        }
        feed.restart_after(start);
        let (tx, rx) = mpsc::channel(self.buffer);
        let registration = self.register(start);
        let task =
            Task { store: self.store.clone(), feed, filter, tx, progress_every: self.progress_every, registration };
        tokio::spawn(task.run(request.snapshot, (permit, peer_slot)));
        let resume = (!request.snapshot).then_some(start);
        Ok(Outbound { rx, shutdown: Box::pin(self.shutdown.clone().cancelled_owned()), resume, ended: false })
    }
}

fn out_of_range(requested: u64, oldest: u64) -> Status {
    Status::out_of_range(format!(
        "events after sequence {requested} are no longer retained; the oldest retained sequence is {oldest}"
    ))
}

// === The task ===

struct Task {
    store: Store,
    feed: Feed,
    filter: Filter,
    tx: mpsc::Sender<Result<Outgoing, Status>>,
    progress_every: Duration,
    registration: Registration,
}

impl Task {
    /// `_slots` are held while the stream lives.
    async fn run(mut self, snapshot: bool, _slots: (OwnedSemaphorePermit, Option<PeerSlot>)) {
        if snapshot && !self.send_snapshot().await {
            return;
        }
        let mut ticker = tokio::time::interval(self.progress_every);
        ticker.tick().await;
        loop {
            let message = tokio::select! {
                () = self.tx.closed() => return,
                _ = ticker.tick() => Ok(Some(message(Message::Progress(Progress { resume_after_sequence: self.feed.position() })))),
                item = self.feed.next() => self.on_item(item),
            };
            if !self.send(message).await {
                return;
            }
            // Events already read go out without another round of select.
            while let Some(item) = self.feed.next_buffered() {
                let message = self.on_item(Ok(item));
                if !self.send(message).await {
                    return;
                }
            }
        }
    }

    /// Sends a message (if any) or the error that ends the stream; false
    /// once the stream is over.
    async fn send(&mut self, message: Result<Option<Outgoing>, Status>) -> bool {
        self.registration.position.store(self.feed.position(), Ordering::Relaxed);
        match message {
            // A full buffer waits here: the feed falls behind the
            // broadcast and later catches up from the store.
            Ok(Some(message)) => self.tx.send(Ok(message)).await.is_ok(),
            Ok(None) => true,
            Err(status) => {
                let _ = self.tx.send(Err(status)).await;
                false
            }
        }
    }

    fn on_item(&mut self, item: Result<FeedItem, FeedError>) -> Result<Option<Outgoing>, Status> {
        match item {
            Ok(FeedItem::Event(published)) => Ok(self.filter.published(&published).then(|| Outgoing::Event {
                sequence: published.sequence,
                // Shared by every subscriber of a live event: no copy.
                encoded: published.encoded.clone(),
            })),
            Ok(FeedItem::CaughtUp(sequence)) => Ok(Some(message(Message::CaughtUp(CaughtUp { sequence })))),
            Err(FeedError::OutOfRange { requested, oldest }) => Err(out_of_range(requested, oldest)),
            Err(FeedError::Store(e)) => Err(store_status(&self.store, e)),
        }
    }

    /// Sends the matching orders as of one sequence, then continues after it.
    async fn send_snapshot(&mut self) -> bool {
        let matcher = self.filter.order_matcher();
        let (orders, cut) = match self.store.snapshot(move |o: &Order| matcher.matches(o)).await {
            Ok(snapshot) => snapshot,
            Err(FeedError::OutOfRange { requested, oldest }) => {
                let _ = self.tx.send(Err(out_of_range(requested, oldest))).await;
                return false;
            }
            Err(FeedError::Store(e)) => {
                let _ = self.tx.send(Err(store_status(&self.store, e))).await;
                return false;
            }
        };
        for order in orders {
            self.filter.orders.insert(order.id);
            if self.tx.send(Ok(message(Message::SnapshotOrder(order)))).await.is_err() {
                return false;
            }
        }
        self.feed.restart_after(cut);
        let complete = Message::SnapshotComplete(SnapshotComplete { sequence: cut });
        self.tx.send(Ok(message(complete))).await.is_ok()
    }
}

fn message(message: Message) -> Outgoing {
    Outgoing::Message(Box::new(SubscribeResponse { message: Some(message) }))
}

// === Filters ===

/// Which events (and snapshot orders) a subscriber wants.
#[derive(Clone, Default)]
struct Filter {
    sources: HashSet<String>,
    providers: HashSet<i32>,
    kinds: HashSet<i32>,
    reference: Option<Lookup>,
    /// Orders known to carry the reference.
    orders: HashSet<u64>,
}

impl Filter {
    fn new(request: &SubscribeRequest) -> Result<Self, Status> {
        let reference = match &request.order_reference {
            Some(reference) => Some(lookup(reference)?),
            None => None,
        };
        Ok(Self {
            sources: request.sources.iter().cloned().collect(),
            providers: request.providers.iter().copied().collect(),
            kinds: request.kinds.iter().copied().collect(),
            reference,
            orders: HashSet::new(),
        })
    }

    /// Finds the orders that already carry the reference.
    async fn seed(&mut self, store: &Store) -> Result<(), Status> {
        let Some(lookup) = self.reference.clone() else { return Ok(()) };
        let orders = store.find_orders(&lookup, None).await.map_err(|e| store_status(store, e))?;
        self.orders.extend(orders.iter().map(|o| o.id));
        Ok(())
    }

    /// Whether every event passes (the feed need not decode them).
    fn takes_everything(&self) -> bool {
        self.sources.is_empty() && self.providers.is_empty() && self.kinds.is_empty() && self.reference.is_none()
    }

    fn published(&mut self, published: &Published) -> bool {
        match &published.event {
            Some(event) => self.event(event),
            None => self.takes_everything(),
        }
    }

    fn event(&mut self, event: &Event) -> bool {
        if !self.passes(&event.source, event.provider) || !(self.kinds.is_empty() || self.kinds.contains(&event.kind)) {
            return false;
        }
        let Some(lookup) = &self.reference else { return true };
        if self.orders.contains(&event.order_id) {
            return true;
        }
        let refers = provider_ok(lookup, event.provider)
            && match lookup.kind {
                RefKind::Tracking => event.shipment.as_ref().is_some_and(|s| s.tracking_number == lookup.value),
                kind => event.references.as_ref().is_some_and(|r| reference(r, kind) == lookup.value),
            };
        if refers {
            self.orders.insert(event.order_id);
        }
        refers
    }

    fn passes(&self, source: &str, provider: i32) -> bool {
        (self.sources.is_empty() || self.sources.contains(source))
            && (self.providers.is_empty() || self.providers.contains(&provider))
    }

    fn order_matcher(&self) -> Filter {
        self.clone()
    }

    /// Snapshot selection: source, provider and reference.
    fn matches(&self, order: &Order) -> bool {
        if !self.passes(&order.source, order.provider) {
            return false;
        }
        let Some(lookup) = &self.reference else { return true };
        provider_ok(lookup, order.provider)
            && match lookup.kind {
                RefKind::Tracking => order.shipments.iter().any(|s| s.tracking_number == lookup.value),
                kind => order.references.as_ref().is_some_and(|r| reference(r, kind) == lookup.value),
            }
    }
}

fn provider_ok(lookup: &Lookup, provider: i32) -> bool {
    lookup.provider.is_none_or(|p| p as i32 == provider)
}

fn reference(refs: &proto::OrderReferences, kind: RefKind) -> &str {
    match kind {
        RefKind::Merchant => &refs.merchant_reference,
        RefKind::ProviderOrder => &refs.provider_order_id,
        RefKind::Safe => &refs.safe_id,
        RefKind::Tracking => "",
    }
}

// === The response stream ===

/// The stream handed to tonic. On server shutdown it ends at once with
/// UNAVAILABLE naming the last position it delivered, so the client resumes
/// exactly there; anything still buffered is not lost, only not sent.
pub struct Outbound {
    rx: mpsc::Receiver<Result<Outgoing, Status>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The `after_sequence` to resume with (`None` during a snapshot).
    resume: Option<u64>,
    ended: bool,
}

impl Stream for Outbound {
    type Item = Result<Outgoing, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            self.ended = true;
            let how = match self.resume {
                Some(position) => format!("resume with after_sequence = {position}"),
                None => "subscribe again for a new snapshot".to_string(),
            };
            return Poll::Ready(Some(Err(Status::unavailable(format!("server shutting down; {how}")))));
        }
        let polled = self.rx.poll_recv(cx);
        match &polled {
            Poll::Ready(Some(Ok(response))) => {
                if let Some(position) = position_after(response) {
                    self.resume = Some(position);
                }
            }
            Poll::Ready(Some(Err(_))) => self.ended = true,
            _ => {}
        }
        polled
    }
}

/// The resume position a response establishes, if any.
fn position_after(response: &Outgoing) -> Option<u64> {
    let response = match response {
        Outgoing::Event { sequence, .. } => return Some(*sequence),
        Outgoing::Message(response) => response,
    };
    match response.message.as_ref()? {
        Message::Event(event) => Some(event.sequence),
        Message::CaughtUp(c) => Some(c.sequence),
        Message::Progress(p) => Some(p.resume_after_sequence),
        Message::SnapshotComplete(s) => Some(s.sequence),
        Message::SnapshotOrder(_) => None,
    }
}

/// [`Outbound`] as typed messages, for the generated service's signature
/// (the server itself sends through [`super::wire::SubscribeRoute`]).
pub struct TypedOutbound(pub Outbound);

impl Stream for TypedOutbound {
    type Item = Result<SubscribeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0).poll_next(cx).map(|item| item.map(|r| r.and_then(Outgoing::into_message)))
    }
}
