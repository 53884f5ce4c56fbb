//! The simulated press (an async-opcua server on 127.0.0.1) the OPC UA tests
//! subscribe to. It lives in `plantrelay::demo::press` because the demo runs
//! it too; this module adds what only tests need.

use std::path::Path;

#[allow(unused_imports)]
pub use plantrelay::demo::press::{
    OTHER_NS, PRESS_NS, PressOptions, SimPress, load_node, press_node, server_cert_sha256,
};

/// A `[[sources.opcua]]` section for `endpoint` with the three press nodes
/// (State with a state map) plus `extra` lines in the source table.
pub fn press_source_toml(name: &str, endpoint: &str, extra: &str) -> String {
    format!(
        r#"
[[sources.opcua]]
name = "{name}"
endpoint = "{endpoint}"
publishing_interval = "200ms"
keep_alive_count = 5
lifetime_count = 15
connect_timeout = "3s"
{extra}

[[sources.opcua.nodes]]
node_id = "{state}"
stream = "line1/press"
sampling_interval = "50ms"
state_map = {{ "0" = "STOPPED", "1" = "RUNNING", "2" = "FAULT" }}

[[sources.opcua.nodes]]
node_id = "{counter}"
stream = "line1/press"
sampling_interval = "50ms"

[[sources.opcua.nodes]]
node_id = "{temperature}"
stream = "line1/press/temperature"
sampling_interval = "50ms"
"#,
        state = press_node("State"),
        counter = press_node("Counter"),
        temperature = press_node("Temperature"),
    )
}

/// Security lines for an unsecured session.
pub const NO_SECURITY: &str = "security_policy = \"None\"\nsecurity_mode = \"None\"";

/// Press options with the PKI under `dir`.
pub fn press_options(dir: &Path) -> PressOptions {
    PressOptions::new(dir.join("press-pki"))
}
