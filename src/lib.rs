//! plantrelay: a plant-edge store-and-forward agent.
//!
//! Crate map, one job each:
//! - [`config`]: the TOML contract: parse, validate, errors with file:line:col and key path.
//! - [`event`]: the event envelope and its CloudEvents wire shape.
//! - [`journal`]: the SQLite journal; the only module that runs SQL.
//! - [`tls`]: rustls set-up shared by every listener and client (one crypto provider: ring).
//! - [`demo`]: `plantrelay demo` and the embedded upstream receiver it (and the tests) use.

pub mod config;
pub mod demo;
pub mod event;
pub mod journal;
pub mod tls;
