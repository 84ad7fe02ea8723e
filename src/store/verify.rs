//! A paced read of the whole database in the background after the server
//! opens it, so damage that sled's recovery did not read (it pages data in
//! lazily) is found without waiting for a client to hit it: every record
//! is read (sled checks its checksums) and raw deliveries, events and
//! orders are decoded. Damage makes the store not ready
//! ([`super::Store::damage`]); ingest goes on.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use prost::Message;

use super::commit::Shared;
use super::{Inner, Store, keys};
use crate::proto::{Event, Order, RawDelivery};

/// Records read per step; the store is not held between steps.
const STEP: usize = 1024;
/// Reading pace: verification must not crowd out serving.
const BYTES_PER_SECOND: f64 = 64.0 * 1024.0 * 1024.0;

/// Reads everything once, unless the store closes first.
pub(super) fn run(store: Weak<Inner>, shared: Arc<Shared>) {
    let started = Instant::now();
    let (mut after, mut records) = (Vec::new(), 0u64);
    loop {
        if shared.is_closed() {
            return;
        }
        let Some(inner) = store.upgrade() else { return };
        let store = Store { inner };
        let Ok(engine) = store.engine() else { return };
        let from = std::ops::Bound::Excluded(after.clone());
        let range =
            if after.is_empty() { engine.tree.iter() } else { engine.tree.range((from, std::ops::Bound::Unbounded)) };
        let (mut read, mut bytes) = (0, 0);
        for entry in range.take(STEP) {
            read += 1;
            match entry {
                Ok((key, value)) => {
                    bytes += key.len() + value.len();
                    if let Err(why) = check(&key, &value) {
                        return store.note_damage(&why);
                    }
                    after = key.to_vec();
                }
                Err(e) => return store.note_damage(&format!("a record after key {after:?} cannot be read: {e}")),
            }
        }
        drop((engine, store));
        records += read as u64;
        if read < STEP {
            tracing::info!(records, elapsed = ?started.elapsed(), "database verified: every record reads back");
            return;
        }
        std::thread::sleep(Duration::from_secs_f64(bytes as f64 / BYTES_PER_SECOND));
    }
}

/// Whether a record decodes as what its keyspace holds.
fn check(key: &[u8], value: &[u8]) -> Result<(), String> {
    let decoded = match key.first() {
        Some(&keys::RAW) => RawDelivery::decode(value).map(drop),
        Some(&keys::EVENT) => Event::decode(value).map(drop),
        Some(&keys::ORDER) => Order::decode(value).map(drop),
        _ => Ok(()),
    };
    decoded.map_err(|e| format!("record {:?} {} is damaged: {e}", key[0] as char, keys::trailing_u64(key)))
}
