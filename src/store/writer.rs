//! The single writer: takes the deliveries queued for it, plans them as one
//! batch ([`super::plan`]), commits the batch's write set to the engine as
//! one atomic batch (with the counters), and hands each reply and its
//! events to the group commit ([`super::commit`]), which answers only once
//! the batch is durable.
//!
//! An engine charges a fixed cost per committed batch (sled seals and
//! writes an I/O buffer), so one batch per turn rather than per delivery is
//! what lets the writer keep up with a burst; and at low load a turn of a
//! few deliveries waits for a flush in progress (see [`SMALL_TURN`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::StoreError;
use super::commit::{Reply, Shared};
use super::engine::Engine;
use super::plan::{Counters, Planned, Work};
use crate::config::StoreConfig;

/// What the writer is handed.
pub(super) enum Command {
    /// Work, and where its answer goes.
    Do { work: Work, reply: Reply },
    /// Stop and give the queue back (the store is being reopened).
    Stop,
}

/// Most deliveries applied in one turn.
const TURN_DELIVERIES: usize = 512;
/// A turn takes no more once its deliveries hold this many bytes.
const TURN_BYTES: usize = 16 << 20;
/// A turn of fewer deliveries waits for a flush in progress before it is
/// committed (what arrives meanwhile joins it): at low load every turn
/// would otherwise be one delivery and pay the engine's whole per-batch
/// cost. Larger turns are committed at once, beside the flush: near
/// capacity, turns of 5–15 are usual, and making them wait too took the
/// overlap of writing and flushing away (16 here collapsed an open-loop
/// run at 80 % of the maximum; see BENCHMARKS.md).
const SMALL_TURN: usize = 4;

pub(super) struct Writer {
    engine: Arc<Engine>,
    counters: Counters,
    shared: Arc<Shared>,
    /// Keep only this many newest events (0: all).
    retain_events: u64,
    /// UNSAFE negative-control switch: reply as soon as a delivery is
    /// planned, before its turn is written or flushed.
    #[cfg(any(test, feature = "test-util"))]
    ack_before_durable: bool,
}

/// What the writer does after a turn.
enum Next {
    Continue,
    /// Told to stop: give the queue back.
    Stop,
}

impl Writer {
    pub fn new(engine: Arc<Engine>, counters: Counters, shared: Arc<Shared>, config: &StoreConfig) -> Self {
        Self {
            engine,
            counters,
            shared,
            retain_events: config.retain_events,
            #[cfg(any(test, feature = "test-util"))]
            ack_before_durable: config.unsafe_ack_before_durable,
        }
    }

    /// Runs until every sender is gone (then lets the flusher drain and
    /// returns `None`), or until told to stop (then returns the queue).
    /// Each turn takes what is queued (at least one command, waiting for
    /// it). After a storage failure every delivery is answered 503 at once.
    pub fn run(mut self, mut commands: mpsc::Receiver<Command>) -> Option<mpsc::Receiver<Command>> {
        while let Some(first) = commands.blocking_recv() {
            #[cfg(test)]
            let shared = self.shared.clone();
            #[cfg(test)]
            let _gate = shared.writer_gate.lock().unwrap_or_else(|e| e.into_inner());
            let (mut turn, mut next) = take_turn(first, &mut commands);
            if turn.len() < SMALL_TURN && matches!(next, Next::Continue) {
                self.shared.wait_until_flushed();
                next = take_more(&mut turn, &mut commands);
            }
            self.turn(turn);
            if let Next::Stop = next {
                return Some(commands);
            }
        }
        self.shared.close();
        None
    }

    /// Plans and commits one turn; answers every command of it (now when
    /// it failed, after the flush otherwise).
    fn turn(&mut self, turn: Vec<(Work, Reply)>) {
        if turn.is_empty() {
            return;
        }
        let (work, mut replies): (Vec<Work>, Vec<Reply>) = turn.into_iter().unzip();
        if !self.shared.is_healthy() {
            return refuse(replies, &StoreError::unavailable_because("storage failed"));
        }
        let early = self.acknowledges_early();
        let mut answer_early = |planned: &Planned| {
            if early {
                answer_before_commit(&mut replies, planned);
            }
        };
        let committed = self
            .shared
            .fault(super::FaultPoint::Write)
            .map_err(|e| StoreError::unavailable("write failed", e))
            .and_then(|()| self.engine.commit_batch(&work, self.counters, self.retain_events, &mut answer_early));
        let planned = match committed {
            Ok(planned) => planned,
            Err(e) => {
                self.shared.fail(&format_args!("write failed: {e}"));
                return refuse(replies, &e);
            }
        };
        let mut done = Vec::with_capacity(replies.len());
        for (reply, outcome) in replies.into_iter().zip(planned.outcomes) {
            match outcome {
                Ok((outcome, events)) => done.push((reply, outcome, events)),
                Err(e) => {
                    // Damage in one record is that delivery's problem.
                    if let StoreError::Corrupt(why) = &e {
                        self.shared.note_damage(why);
                    }
                    let _ = reply.send(Err(e));
                }
            }
        }
        if done.is_empty() {
            return;
        }
        self.counters = planned.writes.counters;
        self.shared.stats.turns.fetch_add(1, Ordering::Relaxed);
        self.shared.written(self.counters.last_sequence);
        self.shared.enqueue(done);
    }

    /// The negative-control switch: answer once planned, before the commit.
    #[cfg(any(test, feature = "test-util"))]
    fn acknowledges_early(&self) -> bool {
        self.ack_before_durable
    }

    #[cfg(not(any(test, feature = "test-util")))]
    fn acknowledges_early(&self) -> bool {
        false
    }
}

/// Answers every planned delivery now, before its batch is committed, and
/// leaves the group commit replies nobody waits for (the negative control).
fn answer_before_commit(replies: &mut [Reply], planned: &Planned) {
    for (reply, outcome) in replies.iter_mut().zip(&planned.outcomes) {
        if let Ok((outcome, _)) = outcome {
            let early = std::mem::replace(reply, tokio::sync::oneshot::channel().0);
            let _ = early.send(Ok(outcome.clone()));
        }
    }
}

/// Takes `first` and whatever else is queued, up to the turn's limits.
fn take_turn(first: Command, commands: &mut mpsc::Receiver<Command>) -> (Vec<(Work, Reply)>, Next) {
    let mut turn = Vec::new();
    let next = add(&mut turn, Some(first), commands);
    (turn, next)
}

/// Adds whatever else is queued to `turn`, up to the turn's limits.
fn take_more(turn: &mut Vec<(Work, Reply)>, commands: &mut mpsc::Receiver<Command>) -> Next {
    let first = commands.try_recv().ok();
    add(turn, first, commands)
}

/// Adds `next` and then whatever is queued to `turn`, up to the turn's
/// limits; `Stop` when told to stop (what was taken before stays in `turn`).
fn add(turn: &mut Vec<(Work, Reply)>, mut next: Option<Command>, commands: &mut mpsc::Receiver<Command>) -> Next {
    let mut bytes: usize = turn.iter().map(|(work, _)| work_bytes(work)).sum();
    while let Some(command) = next.take() {
        let Command::Do { work, reply } = command else { return Next::Stop };
        bytes += work_bytes(&work);
        turn.push((work, reply));
        if turn.len() < TURN_DELIVERIES && bytes < TURN_BYTES {
            next = commands.try_recv().ok();
        }
    }
    Next::Continue
}

fn work_bytes(work: &Work) -> usize {
    match work {
        Work::Ingest(delivery) => delivery.raw.body.len() + delivery.raw.body_zstd.len(),
        _ => 0,
    }
}

fn refuse(replies: impl IntoIterator<Item = Reply>, e: &StoreError) {
    for reply in replies {
        let _ = reply.send(Err(e.clone()));
    }
}
