//! Following a shared database: events committed by any node reach this
//! node's feed.
//!
//! With an engine several processes write (PostgreSQL), the group commit
//! does not publish this node's own events: they would interleave with
//! the other nodes' out of order. This thread reads the events after the
//! durable head, in sequence order, from the database, moves the head, and
//! publishes them. The sequences are dense and become visible in order
//! (each batch holds the counter row's lock to COMMIT), so reading
//! `sequence > head` never skips one. It reads again when any node's
//! commit is notified (LISTEN/NOTIFY, only a wake-up), and at least every
//! `store.postgres.follow_poll_ms`, since notifications are lost while a
//! connection is down.

use std::sync::{Arc, Weak};
use std::time::Duration;

use prost::Message;

use super::commit::Shared;
use super::engine::Engine;
use super::feed::Published;
use super::{Inner, Store, StoreError};
use crate::proto::Event;

/// Longest wait before looking again after a failed read.
const POLL: Duration = Duration::from_millis(50);
/// Events read at a time.
const PAGE: usize = 1000;

/// Runs until the store closes (or its last handle is dropped).
pub(super) fn run(store: Weak<Inner>, shared: Arc<Shared>) {
    loop {
        if shared.is_closed() {
            return;
        }
        let Some(inner) = store.upgrade() else { return };
        let store = Store { inner };
        let engine = store.engine();
        let seen = engine.as_ref().map_or(0, |engine| engine.commits_seen());
        let read = engine.as_ref().map_err(Clone::clone).and_then(|engine| {
            let _turn = shared.follow_turn();
            follow_once(engine, &shared, u64::MAX >> 1)
        });
        drop(store);
        match (read, engine) {
            (Ok(0), Ok(engine)) => engine.wait_for_commit(seen),
            (Ok(0) | Err(_), _) => shared.wait_for_commit(POLL),
            (Ok(_), _) => {}
        }
    }
}

/// Publishes everything up to `upto`, the end of this node's own commit,
/// before the node answers it: its own events (`own`, ascending) as they
/// are, what other nodes committed in between read from the database. A
/// failed read leaves the rest to the follower; what was committed is
/// durable either way.
pub(super) fn publish_through(engine: &Engine, shared: &Shared, upto: u64, own: impl IntoIterator<Item = Published>) {
    let _turn = shared.follow_turn();
    let mut own = own.into_iter().peekable();
    while shared.durable_head() < upto {
        let head = shared.durable_head();
        while own.next_if(|event| event.sequence <= head).is_some() {}
        let mut next = Vec::new();
        while let Some(event) = own.next_if(|event| event.sequence == head + 1 + next.len() as u64) {
            next.push(event);
        }
        if !next.is_empty() {
            shared.publish_followed(next);
            continue;
        }
        let before = own.peek().map_or(upto, |event| event.sequence - 1);
        match follow_once(engine, shared, before) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read committed events; the follower will publish them");
                return;
            }
        }
    }
}

/// Publishes what was committed after the head, up to `upto`; returns how
/// many events. Called with [`Shared::follow_turn`] held.
fn follow_once(engine: &Engine, shared: &Shared, upto: u64) -> Result<usize, StoreError> {
    let head = shared.durable_head();
    let page: Vec<(u64, bytes::Bytes)> = engine.events_encoded(head, upto).take(PAGE).collect::<Result<_, _>>()?;
    let mut published = Vec::with_capacity(page.len());
    for (expected, (sequence, encoded)) in (head + 1..).zip(page) {
        if sequence != expected {
            // Not visible yet below a visible one: cannot happen while
            // batches hold the counter row to COMMIT; read again later.
            break;
        }
        let event = Event::decode(encoded.as_ref()).ok();
        published.push(Published { sequence, event, encoded });
    }
    let count = published.len();
    shared.publish_followed(published);
    Ok(count)
}
