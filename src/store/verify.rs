//! A paced read of the whole database in the background after the server
//! opens it, so damage that sled's recovery did not read (it pages data in
//! lazily) is found without waiting for a client to hit it: every record
//! is read (sled checks its checksums) and raw deliveries, events and
//! orders are decoded. Damage makes the store not ready
//! ([`super::Store::damage`]); ingest goes on.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::commit::Shared;
use super::{Inner, Store};

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
        let (read, bytes) = match engine.verify_step(&after, STEP) {
            Ok((last, read, bytes)) => {
                after = last;
                (read, bytes)
            }
            Err(why) => return store.note_damage(&why),
        };
        drop((engine, store));
        records += read as u64;
        if read < STEP {
            tracing::info!(records, elapsed = ?started.elapsed(), "database verified: every record reads back");
            return;
        }
        std::thread::sleep(Duration::from_secs_f64(bytes as f64 / BYTES_PER_SECOND));
    }
}
