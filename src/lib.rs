//! ordertrail: receives fulfilment webhooks, stores them durably, normalizes
//! them into one order model and serves that state over gRPC.
//!
//! # Code map
//!
//! - [`config`]: plain configuration data, read from a TOML file and
//!   `ORDERTRAIL_*` variables through a lookup function; validated before any
//!   port is bound.
//! - [`server`]: `run(config, listeners, shutdown)`, the one place that knows
//!   every part and wires them together.
//! - [`handover`]: listening sockets that outlive a process: handed over
//!   by a running ordertrail on the same data dir, inherited from systemd,
//!   or bound anew.
//! - `gate`: the gRPC accept loop (connection limit, first-bytes deadline).
//! - `http`: the hyper front door. Routing, limits, authentication calls,
//!   and the single mapping from ingest errors to HTTP status codes.
//! - [`provider`]: the closed set of providers, named once; a leaf.
//! - [`allowlist`]: sender allowlists that follow DNS TXT records (looked up
//!   on a timer, the last good answer remembered with the store), and the
//!   senders allowlists refuse, counted by network.
//! - [`ingest`]: per-source authentication and one module per provider that
//!   turns a raw delivery into provider-neutral observations, and the
//!   [`ingest::Mapper`] that applies the current mappers (with each source's
//!   kind aliases) to a raw delivery. Pure: no I/O, time and ids are passed
//!   in.
//! - `state`: the canonical state rules (rank tables, no regression, sticky
//!   terminal states, derived order status). Pure.
//! - [`store`]: raw log, events, orders, indexes, dedup, quarantine, group
//!   commit, the live event feed, consistent snapshots, and recovery from
//!   storage failures (the engine reopened in-process). `store::plan` holds
//!   the domain of a batch of deliveries, engine-neutral; `store::engine` is
//!   the one interface of the storage engines (an enum: a closed set, and
//!   each engine may answer synchronously or asynchronously behind
//!   `Store`'s async queries); `store::sled_engine` is the only module that
//!   imports sled, and `store::postgres` the only one that talks to
//!   PostgreSQL (the batch transaction under the counter row's lock, the
//!   versioned schema, LISTEN/NOTIFY). With a shared engine,
//!   `store::follow` publishes every node's events to the local feed in
//!   sequence order. Its lifecycle (open, format check, rebuild swap,
//!   close) runs through `Store`.
//! - `api`: the tonic services and the single mapping from store errors to
//!   gRPC `Status`; `Subscribe` sends events as stored/encoded once.
//! - `metrics`: Prometheus metrics for the admin listener.
//! - `console`: the operator console on the admin listener: pages rendered
//!   with maud through the `api` services called in-process, live events
//!   over server-sent events from `Subscribe`; it speaks `http` types and
//!   `http` serves it.
//! - [`tail`]: the `ordertrail tail` command-line subscriber (a gRPC client).
//! - [`send`]: `ordertrail send`, posting a captured webhook (an HTTP client).
//! - [`proto`]: the generated protobuf types (the public contract, and the
//!   storage messages in `storage.proto`).
//!
//! Test hooks (fault injection, held commits, acknowledging before
//! durability, numbering outside the lock, format downgrade) and
//! [`testing`] (private PostgreSQL clusters) exist only with the
//! `test-util` feature, which the tests turn on and release builds do not
//! have.
//!
//! # Request flow
//!
//! A webhook: `http` (limits, authentication) → `Store::ingest` (maps with
//! the current mappers, hands the delivery to the writer) → `store::plan`
//! (one batch) → the engine's atomic commit → the group commit's durable
//! flush → the 2xx and the events on the feed (on PostgreSQL the COMMIT is
//! the durable step, and the feed is fed from the database, every node's
//! events in order). A query: `api` → `Store`'s
//! async reads → the engine. A stream: `api::subscribe` → `store::Feed`
//! (stored events, then the live broadcast).
//!
//! # Architecture invariants
//!
//! - Only `store::sled_engine` imports sled; only `http` (and the `send` client) imports
//!   hyper (`handover` passes connections as file descriptors, never as
//!   hyper types); only `api` implements tonic services. Provider JSON/form shapes never leave their
//!   provider module in `ingest`. (The `ordertrail-bench` binary is outside
//!   these rules: it drives hyper and sled directly as baselines.)
//!   `tests/it/tidy.rs` checks this (and that no test names sled), and
//!   that every source file opens with a `//!` line.
//! - A webhook is answered 2xx only after the store reported its raw bytes
//!   (and everything derived from them) durable, and never through an engine
//!   instance a write or flush failed on (it is reopened first). Every reply, including one
//!   for a duplicate, waits for a flush that covers it.
//! - The raw delivery and everything derived from it are written in one
//!   atomic write set, so a crash leaves either all of it or none of it, and
//!   sequences stay gap-free.
//! - `ingest` and `state` are pure functions of their inputs, so stored raw
//!   deliveries can be re-run through them at any time.
//! - Events reach subscribers only from the store's own broadcast, after the
//!   group commit made them durable, and in sequence order. On PostgreSQL,
//!   sequences are taken under the counter row's lock held to COMMIT, so
//!   they become visible densely and in order, and a reader of
//!   `sequence > position` never skips one. The durable head
//!   moves before events are published, so anything a subscriber missed on
//!   the broadcast is in the store below the head. Nothing a subscriber does
//!   can block the writer.
//! - Nothing but `store::plan` decides what a delivery means for the stored
//!   state; an engine only reads keys and commits write sets.
// One exception, documented in `memory`: a call into glibc.
#![deny(unsafe_code)]

pub mod allowlist;
mod api;
pub mod config;
mod console;
mod gate;
pub mod handover;
mod http;
pub mod ingest;
mod memory;
mod metrics;
pub mod provider;
pub mod send;
pub mod server;
mod state;
pub mod store;
pub mod tail;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

/// The generated protobuf types of package `ordertrail.v1`.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("ordertrail.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ordertrail_descriptor");
}
