//! Build script: generates the Sparkplug B protobuf types
//! (`proto/sparkplug_b.proto`, Eclipse Tahu's, committed) with prost.
//!
//! The `.proto` is compiled by `protox`, a protobuf compiler written in Rust,
//! so the build needs neither a system `protoc` nor the network.

fn main() {
    const PROTO: &str = "proto/sparkplug_b.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");
    let descriptors = match protox::compile([PROTO], ["proto"]) {
        Ok(d) => d,
        Err(e) => panic!("cannot compile {PROTO}: {e}"),
    };
    if let Err(e) = prost_build::Config::new().compile_fds(descriptors) {
        panic!("cannot generate Rust code from {PROTO}: {e}");
    }
}
