//! A gap-free feed of durable events for one subscriber: stored events
//! first, then live ones from the commit broadcast, with no gap and no
//! duplicate at the seam. A subscriber that falls behind the broadcast is
//! switched back to reading from the store, then to live again; it holds at
//! most one page of events in memory and never slows the writer.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast::{self, error::RecvError};

use super::{EventFilter, Store, StoreError};
use crate::proto::Event;

/// Events read from the store at a time.
const PAGE: usize = 256;

/// What the feed yields.
#[derive(Clone, Debug, PartialEq)]
pub enum FeedItem {
    /// The next event, in sequence order.
    Event(Arc<Event>),
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
    live: broadcast::Receiver<Arc<Event>>,
    /// The next sequence to yield.
    next: u64,
    buffer: VecDeque<Event>,
    mode: Mode,
    caught_up_sent: bool,
}

impl Feed {
    /// `live` must be subscribed before anything about the head is read, so
    /// every event after the head read is in it (unless it lags).
    pub(super) fn new(store: Store, live: broadcast::Receiver<Arc<Event>>, after: u64) -> Self {
        Self { store, live, next: after + 1, buffer: VecDeque::new(), mode: Mode::Replay, caught_up_sent: false }
    }

    /// Every event up to this sequence has been yielded.
    pub fn position(&self) -> u64 {
        self.next - 1
    }

    /// Moves the start to just after `after` (before anything was yielded),
    /// e.g. to continue from the sequence a snapshot reflects.
    pub fn restart_after(&mut self, after: u64) {
        self.next = after + 1;
        self.buffer.clear();
        self.mode = Mode::Replay;
    }

    /// The next item. Cancel-safe: state changes only after each await.
    pub async fn next(&mut self) -> Result<FeedItem, FeedError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.next = event.sequence + 1;
                return Ok(FeedItem::Event(Arc::new(event)));
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
            if !self.caught_up_sent {
                self.caught_up_sent = true;
                return Ok(Some(FeedItem::CaughtUp(self.next - 1)));
            }
            return Ok(None);
        }
        let (store, after) = (self.store.clone(), self.next - 1);
        let page = tokio::task::spawn_blocking(move || store.list_events(&EventFilter::default(), after, PAGE))
            .await
            .map_err(|_| StoreError::Unavailable("event read failed".into()))??;
        match page.items.first() {
            Some(first) if first.sequence == self.next => {}
            _ => {
                let oldest = self.store.oldest_retained();
                return Err(FeedError::OutOfRange { requested: self.next - 1, oldest });
            }
        }
        self.buffer.extend(page.items);
        Ok(None)
    }
}
