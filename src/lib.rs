//! plantrelay: a plant-edge store-and-forward agent.
//!
//! Crate map, one job each:
//! - [`agent`]: start-up and shutdown order; wires everything below.
//! - [`cli`]: the commands besides `run`: check-config, journal, replay, and
//!   `plantrelay status` (one agent, or a fleet with `--fleet`) over HTTPS.
//! - [`config`]: the TOML contract: parse, validate, errors with file:line:col and key path.
//! - [`event`]: the event envelope and its CloudEvents wire shape.
//! - [`journal`]: the SQLite journal; the only module that runs SQL.
//! - [`sources`]: inputs that append to the journal (HTTP ingest, …).
//! - [`logging`]: tracing set-up, text or JSON.
//! - [`manpage`]: `plantrelay(1)`, rendered from the CLI definition.
//! - [`serve`]: the accept loop and HTTP/1.1 server every listener runs: connection caps and timeouts.
//! - [`service`]: systemd notifications (READY, WATCHDOG, STATUS, STOPPING).
//! - [`sinks`]: the forwarder loop and the upstream sinks (HTTPS, …).
//! - [`health`]: the HTTPS health and status server.
//! - [`status`]: the live agent view: counters of sources and sinks, the
//!   status snapshot built from them, certificate expiry and backlog history;
//!   read by the health server and the systemd notifications.
//! - [`text`]: outside text made safe to quote in answers, `last_error`, logs and CLI output: control characters escaped, length bounded.
//! - [`tls`]: rustls set-up shared by every listener and client (one crypto provider: ring).
//! - [`units`]: times and sizes as every module stores and shows them.
//! - `demo` (feature `demo`, on by default; not in the packaged binary):
//!   `plantrelay demo` and the embedded upstream receiver it (and the tests) use.
//! - `fuzzing`: entry points for the fuzz targets in `fuzz/`; not an API.

// The daemon must not die of a bad input or a full disk: no unwrap,
// expect or panic on its paths. A true invariant may still assert, with
// `#[allow(...)]` and a comment that says why it cannot fail.
#![warn(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::dbg_macro,
    clippy::todo,
    clippy::unimplemented
)]

pub mod agent;
pub mod cli;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod event;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod journal;
pub mod logging;
pub mod manpage;
mod mqtt;
pub mod outage;
pub mod route;
pub mod schema;
pub mod serve;
pub mod service;
pub mod sinks;
pub mod sources;
pub mod status;
pub mod supervise;
pub mod text;
pub mod tls;
pub mod units;
pub(crate) mod warn_limit;
