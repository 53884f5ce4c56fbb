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

/// A free TCP port on 127.0.0.1 (bound and released: a peer started next
/// can take it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
