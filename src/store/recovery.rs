//! Recovery from storage failures without a restart.
//!
//! sled keeps the first I/O error of an instance and fails everything after
//! it, so a full disk that is freed again does not heal the instance. And
//! after a failed flush or fsync, a later successful one does not prove that
//! the earlier pages reached the disk (PostgreSQL's "fsyncgate"). So after
//! any write or flush failure nothing more is acknowledged through that
//! instance: the writer stops, and every delivery is answered 503 at once.
//! This thread then waits until storage works again (a probe file written
//! and fsynced in the data dir), closes the instance, drops the OS's cached
//! pages of its files so that recovery reads what is really on disk, reopens
//! it (sled recovers its log), checks that it recovered everything that was
//! acknowledged, and starts the writer and the flusher on it again. On
//! PostgreSQL the same loop reconnects (the reopen is a new connection and
//! a new pool), with the probes backing off from 250 ms to 2 s so that a
//! database that is down for long is not hammered by every node.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::commit::{FaultPoint, Shared};
use super::engine::Engine;
use super::writer::Command;
use super::{Inner, Store, StoreError, layout};

/// How soon failed storage is probed first; each failed probe doubles the
/// wait, up to [`MAX_PROBE_INTERVAL`].
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How often a failure that goes on is logged again.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// How long reads in flight get to let go of the failed instance.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Watches the store until it closes (or its last handle is dropped);
/// reopens it after each failure. Holds the store only while acting, so
/// that dropping every handle still releases the database.
pub(super) fn run(store: Weak<Inner>, shared: Arc<Shared>) {
    let upgrade = || store.upgrade().map(|inner| Store { inner });
    while shared.wait_for_failure() {
        let Some(queue) = upgrade().and_then(|store| store.stop_workers()) else { return };
        let mut failing = Failing { queue, logged: None };
        let mut wait = PROBE_INTERVAL;
        loop {
            failing.refuse_waiting();
            if shared.is_closed() || failing.queue.is_closed() {
                return;
            }
            let Some(store) = upgrade() else { return };
            match probe(&store.inner.config.data_dir, &shared).and_then(|()| store.reopen()) {
                Ok(engine) => {
                    let durable = shared.durable_mark().durable_sequence;
                    match store.restart(engine, failing.queue) {
                        Ok(()) => tracing::info!(durable, "storage recovered: the store was reopened, ingest resumes"),
                        Err(e) => tracing::error!(error = %e, "the store was reopened but cannot run"),
                    }
                    break;
                }
                Err(e) => failing.note(&e),
            }
            drop(store);
            std::thread::sleep(wait);
            wait = (wait * 2).min(MAX_PROBE_INTERVAL);
        }
    }
}

/// The writer's queue while no writer runs, and when the failure was last
/// logged.
struct Failing {
    queue: mpsc::Receiver<Command>,
    logged: Option<Instant>,
}

impl Failing {
    /// Answers whatever reached the queue: 503.
    fn refuse_waiting(&mut self) {
        while let Ok(command) = self.queue.try_recv() {
            if let Command::Do { reply, .. } = command {
                let _ = reply.send(Err(StoreError::unavailable_because("storage failed; retry later")));
            }
        }
    }

    fn note(&mut self, error: &StoreError) {
        if self.logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            tracing::warn!(%error, "storage still failing; ingest answers 503");
            self.logged = Some(Instant::now());
        }
    }
}

/// Whether storage takes a synced write again.
fn probe(data_dir: &Path, shared: &Shared) -> Result<(), StoreError> {
    let unavailable = |e: std::io::Error| StoreError::unavailable("the storage probe failed", e);
    shared.fault(FaultPoint::Write).and_then(|()| shared.fault(FaultPoint::Flush)).map_err(unavailable)?;
    let path = layout::probe_file(data_dir);
    let written = File::create(&path).and_then(|mut file| {
        file.write_all(&[0u8; 4096])?;
        file.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    written.map_err(unavailable)
}

/// Drops the OS's cached pages of the files under `dir`: after a failed
/// write-back the cache can hold pages the disk does not, and recovery
/// must see the disk.
fn forget_cached(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            forget_cached(&path);
        } else if let Ok(file) = File::open(&path) {
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
        }
    }
}

// === impl Store ===

impl Store {
    /// Stops the writer (it gives its queue back) and the flusher. `None`
    /// when the store is closing.
    fn stop_workers(&self) -> Option<mpsc::Receiver<Command>> {
        let sender = self.inner.commands.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let writer = self.workers().writer.take()?;
        // The writer answers what is ahead of this.
        let _ = sender.blocking_send(Command::Stop);
        drop(sender);
        let queue = writer.join().ok().flatten();
        if let Some(flusher) = self.workers().flusher.take() {
            let _ = flusher.join();
        }
        queue
    }

    /// Closes the failed sled instance and opens the database again.
    fn reopen(&self) -> Result<Arc<Engine>, StoreError> {
        let failed = self.inner.engine.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(failed) = failed {
            let deadline = Instant::now() + RELEASE_TIMEOUT;
            while Arc::strong_count(&failed) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(failed);
        }
        forget_cached(&layout::engine_dir(&self.inner.config.data_dir));
        let engine = Engine::open(&self.inner.config)?;
        let acknowledged = self.inner.shared.durable_mark();
        let recovered = engine.counters()?.mark();
        if recovered.durable_sequence < acknowledged.durable_sequence
            || recovered.durable_raw < acknowledged.durable_raw
        {
            return Err(StoreError::Corrupt(format!(
                "the reopened database recovered up to sequence {} and delivery {}, but sequence {} and delivery {} \
                 were acknowledged",
                recovered.durable_sequence,
                recovered.durable_raw,
                acknowledged.durable_sequence,
                acknowledged.durable_raw
            )));
        }
        Ok(Arc::new(engine))
    }

    /// Makes what the reopened `engine` recovered durable, and serves it.
    fn restart(&self, engine: Arc<Engine>, queue: mpsc::Receiver<Command>) -> Result<(), StoreError> {
        let counters = engine.counters()?;
        engine.flush()?;
        self.inner.shared.recovered(counters.mark());
        self.start(engine, counters, queue)
    }
}
