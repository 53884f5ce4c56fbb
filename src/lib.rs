//! plantrelay: a plant-edge store-and-forward agent.
//!
//! Crate map, one job each:
//! - [`agent`]: start-up and shutdown order; wires everything below.
//! - [`cli`]: the offline commands (check-config, journal, replay) and their output.
//! - [`config`]: the TOML contract: parse, validate, errors with file:line:col and key path.
//! - [`event`]: the event envelope and its CloudEvents wire shape.
//! - [`fleet`]: `plantrelay status --fleet`: pulls many gateways' status at once, one row each, worst first.
//! - [`journal`]: the SQLite journal; the only module that runs SQL.
//! - [`sources`]: inputs that append to the journal (HTTP ingest, …).
//! - [`logging`]: tracing set-up, text or JSON.
//! - [`manpage`]: `plantrelay(1)`, rendered from the CLI definition.
//! - [`serve`]: the accept loop and HTTP/1.1 server every listener runs: connection caps and timeouts.
//! - [`service`]: systemd notifications (READY, WATCHDOG, STATUS, STOPPING).
//! - [`sinks`]: the forwarder loop and the upstream sinks (HTTPS, …).
//! - [`health`]: the HTTPS health and status server.
//! - [`status`]: live counters of sources and sinks, read by the health server.
//! - [`status_cli`]: `plantrelay status`: pulls an agent's status over HTTPS and sums it up.
//! - [`text`]: outside text made safe to quote in answers, `last_error`, logs and CLI output: control characters escaped, length bounded.
//! - [`tls`]: rustls set-up shared by every listener and client (one crypto provider: ring).
//! - [`demo`]: `plantrelay demo` and the embedded upstream receiver it (and the tests) use.
//! - `fuzzing`: entry points for the fuzz targets in `fuzz/`; not an API.

pub mod agent;
pub mod cli;
pub mod config;
pub mod demo;
pub mod event;
pub mod fleet;
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
pub mod status_cli;
pub mod supervise;
pub mod text;
pub mod tls;
