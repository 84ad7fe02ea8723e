//! The behaviour tests of `tests/it`, unchanged, on the PostgreSQL engine:
//! every server these modules start stores into its own private
//! PostgreSQL cluster. Order resolution, the no-regression rules, scoped
//! references, ambiguity, subscriptions, admin and the front door behave
//! the same on both engines.
#![allow(clippy::unwrap_used, reason = "a test fails loudly on what it did not expect")]

/// The engine [`common::TestServer`] starts on.
const ENGINE: common::Engine = common::Engine::Postgres;

#[path = "../it/allowlist.rs"]
mod allowlist;
#[path = "../it/auth.rs"]
mod auth;
#[allow(dead_code, reason = "shared with tests/it, which uses all of it")]
#[path = "../it/common.rs"]
mod common;
#[path = "../it/console.rs"]
mod console;
#[path = "../it/fixtures.rs"]
mod fixtures;
#[path = "../it/front_door.rs"]
mod front_door;
#[path = "../it/hostile.rs"]
mod hostile;
#[path = "../it/operations.rs"]
mod operations;
#[path = "../it/ordermesh.rs"]
mod ordermesh;
#[path = "../it/properties.rs"]
mod properties;
#[path = "../it/providers.rs"]
mod providers;
#[path = "../it/subscribe.rs"]
mod subscribe;
