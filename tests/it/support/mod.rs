//! Shared helpers for the integration tests: in-process peers, fixtures and
//! fault injection, used by the modules of the one test binary.

pub mod agent;
pub mod fault_proxy;
pub mod logs;
#[cfg(feature = "interop")]
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
