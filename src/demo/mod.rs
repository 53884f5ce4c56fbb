//! `plantrelay demo`: everything in one process (simulated machines and MES,
//! an MQTT broker, and an upstream that drops out for a while), with a final
//! delivered/lost/duplicated/out-of-order verdict.
//!
//! [`machines`] is the embedded MQTT broker and the simulated machines.
//! [`press`] is the simulated OPC UA press (an async-opcua server).
//! [`receiver`] is the embedded HTTPS upstream the demo, the integration tests
//! and the benchmarks forward to. Nothing under `demo` is used by `plantrelay
//! run`.

pub mod machines;
pub mod press;
pub mod receiver;
mod scenario;

pub use scenario::{DemoOptions, run};
