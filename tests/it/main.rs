//! The integration tests: one test binary (`cargo test --test it`), one
//! module per subject, with the shared peers and fixtures in [`support`].
//! One binary links the crate once instead of once per subject; the tests
//! of all subjects run side by side in it, so nothing here may rely on being
//! alone in the process (a global log subscriber is installed once, in
//! `support::logs`).
//!
//! Modules named `interop_*` (and the JetStream sink's conformance run) need
//! system peers (mosquitto, nats-server, Chromium) and build only with the
//! `interop` feature: `cargo test --features interop --test it interop`.

mod support;

mod cli;
mod config;
mod conformance;
mod corruption;
mod crash_binary;
mod disk_full;
mod fleet;
mod fuzz_regressions;
mod health;
mod hostile;
mod ingest;
mod interop_chaos;
mod interop_jetstream;
mod interop_mqtt;
mod interop_mqtt_sink;
mod interop_power_loss;
mod interop_status_page;
mod journal;
mod journal_crash;
mod lanes;
mod lost_tail;
mod mqtt;
mod oauth2;
mod opcua;
mod outage;
mod pipeline;
mod plant_rates;
mod readme;
mod receiver;
mod sink_mqtt;
mod systemd;
