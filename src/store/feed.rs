//! A gap-free feed of durable events for one subscriber: stored events
//! first, then live ones from the commit broadcast, with no gap and no
//! duplicate at the seam. A subscriber that falls behind the broadcast is
//! switched back to reading from the store, then to live again; it holds at
//! most one page of events in memory and never slows the writer.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::task::JoinHandle;

use super::{Store, StoreError};
use crate::proto::Event;

/// Events read from the store at a time: up to this many...
pub(super) const PAGE: usize = 1024;
/// ...or this many bytes. A replaying feed holds at most two pages (the
/// one being sent and the next, read meanwhile).
const PAGE_BYTES: usize = 512 << 10;

/// A durable event as subscribers get it: its protobuf encoding (made once,
/// shared by every subscriber) and, unless the feed skips decoding, the
/// decoded event.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    pub sequence: u64,
    pub event: Option<Event>,
    pub encoded: Bytes,
}

/// What the feed yields.
#[derive(Clone, Debug, PartialEq)]
pub enum FeedItem {
    /// The next event, in sequence order.
    Event(Arc<Published>),
    /// The replay from the store reached the live head (sent once): every
    /// event up to this sequence has been yielded.
    CaughtUp(u64),
}

/// Why a feed ended.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The events after the requested sequence are no longer kept.
    #[error("events after {requested} are no longer retained; the oldest retained sequence is {oldest}")]
    OutOfRange { requested: u64, oldest: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

enum Mode {
    /// Reading stored events up to the durable head.
    Replay,
    /// Taking events from the broadcast.
    Live,
}

/// One subscriber's position in the event log.
pub struct Feed {
    store: Store,
    live: broadcast::Receiver<Arc<Published>>,
    /// The next sequence to yield.
    next: u64,
    buffer: VecDeque<Published>,
    /// The read of the page after the buffered one, started as soon as the
    /// buffered page arrived, so reading overlaps sending: (after, read).
    prefetch: Option<(u64, JoinHandle<PageRead>)>,
    mode: Mode,
    caught_up_sent: bool,
    /// Whether stored events are decoded (a subscriber that filters needs
    /// them; one that takes everything sends the stored bytes as they are).
    decode: bool,
}

impl Feed {
    /// `live` must be subscribed before anything about the head is read, so
    /// every event after the head read is in it (unless it lags).
    pub(super) fn new(store: Store, live: broadcast::Receiver<Arc<Published>>, after: u64) -> Self {
        Self {
            store,
            live,
            next: after.saturating_add(1),
            buffer: VecDeque::new(),
            prefetch: None,
            mode: Mode::Replay,
            caught_up_sent: false,
            decode: true,
        }
    }

    /// Stored events are yielded without `event` (only their encoding).
    pub fn skip_decoding(&mut self) {
        self.decode = false;
    }

    /// Every event up to this sequence has been yielded.
    pub fn position(&self) -> u64 {
        self.next - 1
    }

    /// Moves the start to just after `after` (before anything was yielded),
    /// e.g. to continue from the sequence a snapshot reflects.
    pub fn restart_after(&mut self, after: u64) {
        self.next = after.saturating_add(1);
        self.buffer.clear();
        self.prefetch = None;
        self.mode = Mode::Replay;
    }

    /// The next event if one is already read (no waiting).
    pub fn next_buffered(&mut self) -> Option<FeedItem> {
        let published = self.buffer.pop_front()?;
        self.next = published.sequence + 1;
        Some(FeedItem::Event(Arc::new(published)))
    }

    /// The next item. Cancel-safe: state changes only after each await.
    pub async fn next(&mut self) -> Result<FeedItem, FeedError> {
        loop {
            if let Some(item) = self.next_buffered() {
                return Ok(item);
            }
            match self.mode {
                Mode::Replay => {
                    if let Some(item) = self.replay_page().await? {
                        return Ok(item);
                    }
                }
                Mode::Live => match self.live.recv().await {
                    Ok(event) if event.sequence < self.next => {}
                    Ok(event) if event.sequence == self.next => {
                        self.next += 1;
                        return Ok(FeedItem::Event(event));
                    }
                    // A gap (cannot happen while subscribed) or lag: the
                    // store has everything up to the head.
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        self.store.note_feed_lag();
                        self.live = self.live.resubscribe();
                        self.mode = Mode::Replay;
                    }
                    Err(RecvError::Closed) => return Err(StoreError::Closed.into()),
                },
            }
        }
    }

    /// Reads the next page of stored events into the buffer; at the head,
    /// switches to live (yielding `CaughtUp` the first time).
    async fn replay_page(&mut self) -> Result<Option<FeedItem>, FeedError> {
        let head = self.store.head_sequence();
        if self.next > head {
            self.mode = Mode::Live;
            self.prefetch = None;
            if !self.caught_up_sent {
                self.caught_up_sent = true;
                return Ok(Some(FeedItem::CaughtUp(self.next - 1)));
            }
            return Ok(None);
        }
        let after = self.next - 1;
        let (read, prefetched) = match self.prefetch.take() {
            Some((from, read)) if from == after => (read, true),
            _ => (self.read_page(after), false),
        };
        // Held in `self` while awaited, so a cancelled `next` keeps it.
        let read = &mut self.prefetch.insert((after, read)).1;
        let page = read.await.map_err(|_| StoreError::unavailable_because("event read failed"));
        self.prefetch = None;
        let page = page??;
        match page.first() {
            Some(first) if first.sequence == self.next => {}
            // Read when the head was where this page starts: read again.
            None if prefetched => return Ok(None),
            _ => {
                let oldest = self.store.oldest_retained();
                return Err(FeedError::OutOfRange { requested: self.next - 1, oldest });
            }
        }
        if let Some(last) = page.last().filter(|last| last.sequence < self.store.head_sequence()) {
            self.prefetch = Some((last.sequence, self.read_page(last.sequence)));
        }
        self.buffer.extend(page);
        Ok(None)
    }

    /// Starts reading the page of stored events after `after`.
    fn read_page(&self, after: u64) -> JoinHandle<PageRead> {
        let (store, decode) = (self.store.clone(), self.decode);
        tokio::spawn(async move {
            let mut page = Vec::with_capacity(PAGE);
            for (sequence, encoded) in store.list_events_encoded(after, PAGE, PAGE_BYTES).await? {
                let event = if decode { Some(Event::decode(encoded.as_ref())?) } else { None };
                page.push(Published { sequence, event, encoded });
            }
            Ok(page)
        })
    }
}

/// A page of stored events, read ahead.
type PageRead = Result<Vec<Published>, StoreError>;
