//! The integration tests, one binary: each module starts the real server
//! (or the real binary) on loopback with temporary data and talks to it
//! with real HTTP and gRPC clients. `common` holds what they share. The
//! behaviour modules run here on the sled engine, and again, unchanged, on
//! PostgreSQL in `tests/on_postgres`.
#![allow(clippy::unwrap_used, reason = "a test fails loudly on what it did not expect")]

/// The engine [`common::TestServer`] starts on.
const ENGINE: common::Engine = common::Engine::Sled;

mod allowlist;
mod auth;
mod bench;
mod binary;
mod browser;
mod common;
mod console;
mod crash;
mod disk_full;
mod dockerfile;
mod faults;
mod fixtures;
mod front_door;
mod grpc_security;
mod handover;
mod hostile;
mod large_data;
mod operations;
mod ordermesh;
mod postgres;
mod properties;
mod providers;
mod rebuild;
mod subscribe;
mod tidy;
