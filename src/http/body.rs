//! Reading webhook bodies within bounds: a global byte budget for bodies in
//! memory (a burst waits instead of growing the heap without limit, and the
//! heap is handed back to the OS after it), and a small share for bodies
//! whose sender is not authenticated yet (only an HMAC signature over the
//! body can tell), with a shorter deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming as Body;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Refusal;
use crate::config::HttpConfig;

/// Past this many bytes of bodies in memory at once, the heap is trimmed
/// once they are all gone.
const TRIM_AFTER_BYTES: usize = 32 << 20;

/// The bounds every body is read within; clones share them.
#[derive(Clone)]
pub struct Bodies {
    /// Bytes of bodies that may be in memory at once.
    memory: Arc<Semaphore>,
    memory_bytes: usize,
    /// Set when a burst used enough memory to be worth handing back.
    trim_due: Arc<AtomicBool>,
    /// Bodies of not yet authenticated senders read at once.
    unverified: Arc<Semaphore>,
    unverified_max: usize,
    limit: usize,
    timeout: Duration,
    unverified_timeout: Duration,
}

/// Memory held for one body; handed back when dropped.
pub(super) struct Held {
    _memory: OwnedSemaphorePermit,
    _unverified: Option<OwnedSemaphorePermit>,
    bodies: Arc<Semaphore>,
    memory_bytes: usize,
    trim_due: Arc<AtomicBool>,
}

impl Bodies {
    pub fn new(config: &HttpConfig) -> Self {
        let memory_bytes = config.body_memory_bytes.min(Semaphore::MAX_PERMITS).max(config.body_limit_bytes);
        Self {
            memory: Arc::new(Semaphore::new(memory_bytes)),
            memory_bytes,
            trim_due: Arc::default(),
            unverified: Arc::new(Semaphore::new(config.max_unverified_bodies)),
            unverified_max: config.max_unverified_bodies,
            limit: config.body_limit_bytes,
            timeout: config.body_read_timeout,
            unverified_timeout: config.unverified_body_timeout.min(config.body_read_timeout),
        }
    }

    /// Bytes reserved for bodies being read or stored now.
    pub fn in_memory_bytes(&self) -> usize {
        self.memory_bytes.saturating_sub(self.memory.available_permits())
    }

    /// Bodies of not yet authenticated senders being read now.
    pub fn unverified(&self) -> usize {
        self.unverified_max.saturating_sub(self.unverified.available_permits())
    }

    /// Reads a body of at most `expected` bytes (`Content-Length`, else the
    /// limit). `verified`: its sender is authenticated already; if not, it
    /// takes a slot of the unverified share and has the shorter deadline.
    /// Waiting for memory or a slot counts against the deadline; past it,
    /// 408 when the body was late, 503 when the server was busy.
    pub(super) async fn read(
        &self,
        body: Body,
        expected: Option<u64>,
        verified: bool,
    ) -> Result<(Bytes, Held), Refusal> {
        let deadline = tokio::time::Instant::now() + if verified { self.timeout } else { self.unverified_timeout };
        let busy = || Refusal::Busy;
        let unverified = match verified {
            true => None,
            false => Some(
                tokio::time::timeout_at(deadline, self.unverified.clone().acquire_owned())
                    .await
                    .map_err(|_| busy())?
                    .map_err(|_| busy())?,
            ),
        };
        let wanted = expected.map_or(self.limit, |len| len as usize).clamp(1, self.limit).min(u32::MAX as usize) as u32;
        let memory = tokio::time::timeout_at(deadline, self.memory.clone().acquire_many_owned(wanted))
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())?;
        if self.memory_bytes - self.memory.available_permits() >= TRIM_AFTER_BYTES {
            self.trim_due.store(true, Ordering::Relaxed);
        }
        let held = Held {
            _memory: memory,
            _unverified: unverified,
            bodies: self.memory.clone(),
            memory_bytes: self.memory_bytes,
            trim_due: self.trim_due.clone(),
        };
        let bytes =
            tokio::time::timeout_at(deadline, read_body(body, self.limit)).await.map_err(|_| Refusal::Timeout)??;
        Ok((bytes, held))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // This body's memory goes back after this; the last one of a burst
        // hands the heap back to the OS.
        let in_use = self.memory_bytes - self.bodies.available_permits();
        let this = self._memory.num_permits();
        if in_use <= this && self.trim_due.swap(false, Ordering::Relaxed) {
            tokio::task::spawn_blocking(crate::memory::release_free_heap);
        }
    }
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, Refusal> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(Refusal::TooLarge(limit)),
        Err(_) => Err(Refusal::BadRequest("the request body could not be read")),
    }
}
