//! Shared helpers for the integration tests: in-process peers and fault
//! injection. Each test crate pulls in what it needs with `mod support;`.

// Each test crate uses only some of the helpers.
#![allow(dead_code)]

pub mod agent;
pub mod fault_proxy;
pub mod mosquitto;
pub mod nats_server;
pub mod opcua_server;
pub mod upstream;
