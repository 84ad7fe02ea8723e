//! The storage engines behind [`super::Store`], and the one interface they
//! share.
//!
//! An enum, not a trait: the set of engines is closed and known at build
//! time, and an enum lets each engine answer in its own way: sled reads a
//! local B-tree page synchronously, a networked engine awaits a round trip.
//! `Store`'s queries are `async` and decide per engine whether a read runs
//! inline or on the blocking pool, so callers (the gRPC handlers, metrics,
//! the feed) never know which it is. Adding an engine is adding a variant:
//! the compiler then lists every operation it must provide.
//!
//! The interface: open and recover ([`Engine::open`]), the batch reads of
//! the domain pipeline ([`super::plan::Reader`]), the atomic commit of a
//! write set with the counters it assigned ([`Engine::apply`]), durable
//! flush ([`Engine::make_durable`]), point and range reads, stats, and
//! close ([`Engine::flush`]). Export, import and rebuild are built on these
//! in [`super::export`].
//!
//! The feed of committed events is the store's: the group commit publishes
//! what it made durable ([`super::commit`]). That covers every event while
//! one process owns the data, which sled's lock guarantees; an engine shared
//! by several processes must also feed what the others committed, in
//! sequence order, before it can be a variant here.

use std::path::Path;

use bytes::Bytes;

use super::StoreError;
use super::plan::{Counters, Planned, RefKind, WithHistory, Work};
use super::postgres::PostgresEngine;
use super::sled_engine::SledEngine;
use crate::config::{Backend, Durability, StoreConfig};
use crate::proto::{Event, Order, RawDelivery};

/// Every raw record from an id on: `Err(())` for one that cannot be read at
/// all (the scan ends), `Ok((id, Err))` for one that does not decode.
pub(crate) type RawRecords<'a> = Box<dyn Iterator<Item = Result<(u64, Result<RawDelivery, String>), ()>> + Send + 'a>;

/// One opened storage engine.
pub(crate) enum Engine {
    Sled(SledEngine),
    Postgres(Box<PostgresEngine>),
}

impl Engine {
    /// Opens (or creates) the configured engine's database; the engine
    /// recovers what it holds.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        match config.backend {
            Backend::Sled => {
                Ok(Self::Sled(SledEngine::open(&config.data_dir, Some(config.sled.cache_capacity_bytes))?))
            }
            Backend::Postgres => match &config.postgres {
                Some(postgres) => Ok(Self::Postgres(Box::new(PostgresEngine::open(postgres)?))),
                None => Err(StoreError::Invalid("store.backend is postgres without [store.postgres]".into())),
            },
        }
    }

    /// Opens an existing database for reading out what it holds (export):
    /// never creates one.
    pub fn open_existing(data_dir: &Path) -> Result<Self, StoreError> {
        Ok(Self::Sled(SledEngine::open_existing(data_dir)?))
    }

    /// Whether reads of this engine are cheap enough to run on the async
    /// runtime (a local page) rather than the blocking pool.
    pub fn reads_inline(&self) -> bool {
        match self {
            Self::Sled(_) => true,
            Self::Postgres(_) => false,
        }
    }

    /// Waits until some process committed, or the engine's poll interval
    /// passed (an engine one process owns is told by the group commit
    /// instead and never waits here).
    pub fn wait_for_commit(&self, after: u64) {
        match self {
            Self::Sled(_) => {}
            Self::Postgres(engine) => engine.wait_for_commit(after),
        }
    }

    /// Wakes whoever waits in [`Engine::wait_for_commit`].
    pub fn wake(&self) {
        if let Self::Postgres(engine) = self {
            engine.wake();
        }
    }

    /// Commit notifications so far (see [`Engine::wait_for_commit`]).
    pub fn commits_seen(&self) -> u64 {
        match self {
            Self::Sled(_) => 0,
            Self::Postgres(engine) => engine.commits_seen(),
        }
    }

    /// Whether other processes write to the same data (the feed then
    /// follows the database, see `store::follow`).
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// Plans `work` and commits its write set atomically, with sequences
    /// after `counters` (sled: the writer's own; PostgreSQL: the database's,
    /// read under the counter row's lock). `planned` sees the plan before
    /// anything of it is written (the crash harness's negative control
    /// answers there).
    pub fn commit_batch(
        &self,
        work: &[Work],
        counters: Counters,
        retain_events: u64,
        planned: &mut (dyn FnMut(&Planned) + Send),
    ) -> Result<Planned, StoreError> {
        match self {
            Self::Sled(engine) => engine.commit_batch(work, counters, retain_events, planned),
            Self::Postgres(engine) => engine.commit_batch(work, retain_events, planned),
        }
    }
}

/// Each operation, answered by the engine in use.
macro_rules! delegate {
    ($($(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl Engine {
            $(
                $(#[$doc])*
                pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match self {
                        Self::Sled(engine) => engine.$name($($arg),*),
                        Self::Postgres(engine) => engine.$name($($arg),*),
                    }
                }
            )*
        }
    };
}

delegate! {
    /// The last ids handed out, as committed.
    fn counters(&self) -> Result<Counters, StoreError>;
    /// The storage format of the database (`current` for a new one).
    fn format(&self, current: u64, empty: bool) -> Result<u64, StoreError>;
    /// Makes every committed write set durable.
    fn make_durable(&self, durability: Durability) -> std::io::Result<()>;
    /// Writes everything out before a close.
    fn flush(&self) -> Result<(), StoreError>;
    fn order(&self, id: u64) -> Result<Option<Order>, StoreError>;
    fn order_and_history(&self, id: u64) -> Result<Option<WithHistory>, StoreError>;
    fn event(&self, sequence: u64) -> Result<Option<Event>, StoreError>;
    fn raw(&self, id: u64) -> Result<Option<RawDelivery>, StoreError>;
    /// Ids of the orders with this reference, in one source or in any.
    fn indexed(&self, kind: RefKind, value: &str, source: Option<&str>) -> Result<Vec<u64>, StoreError>;
    /// Orders with ids above `after`, ascending.
    fn orders_after(&self, after: u64) -> Box<dyn Iterator<Item = Result<Order, StoreError>> + Send + '_>;
    /// Events in `(after, upto]` as stored: (sequence, encoding).
    fn events_encoded(&self, after: u64, upto: u64) -> Box<dyn Iterator<Item = Result<(u64, Bytes), StoreError>> + Send + '_>;
    /// Raw deliveries with ids in `(after, upto]`.
    fn raws(&self, after: u64, upto: u64) -> Box<dyn Iterator<Item = Result<RawDelivery, StoreError>> + Send + '_>;
    /// Every raw record from id `from` on; `Err(())` for a record that
    /// cannot be read at all (the scan then ends), `Ok((id, Err))` for one
    /// that does not decode.
    fn raw_records_from(&self, from: u64) -> RawRecords<'_>;
    /// Quarantined raw ids above `after`.
    fn quarantined_after(&self, after: u64) -> Box<dyn Iterator<Item = Result<u64, StoreError>> + Send + '_>;
    /// (provider, applies to, value, count) of every unmapped status value.
    fn unmapped(&self) -> Result<Vec<(String, String, String, u64)>, StoreError>;
    fn quarantined_count(&self) -> u64;
    /// Everything remembered besides deliveries: (name, value).
    fn remembered(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Remembers `value` under `name`, durably, replacing what was there.
    fn remember(&self, name: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Settings of the engine that weaken "acknowledged means durable".
    fn warnings(&self) -> Vec<String>;
    fn size_on_disk(&self) -> u64;
    /// Reads and checks up to `step` records after `after`: (last key, records, bytes).
    fn verify_step(&self, after: &[u8], step: usize) -> Result<(Vec<u8>, usize, usize), String>;
}

#[cfg(any(test, feature = "test-util"))]
delegate! {
    /// Records an older storage format (tests of the format check).
    fn set_format(&self, format: u64) -> Result<(), StoreError>;
    /// Writes or removes a raw record's bytes as they are (tests of damage).
    fn put_raw_record(&self, id: u64, bytes: Option<&[u8]>) -> Result<(), StoreError>;
}
