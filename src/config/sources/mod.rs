//! `[[sources.http]]`, `[[sources.mqtt]]` and `[[sources.opcua]]`: where events
//! come from, and the checks of their keys that the types alone cannot make.
//! The field docs are the user documentation. No I/O.
//!
//! One file per source kind, each with its config type, its defaults and
//! its checks; the defaults two kinds share are here.

mod http;
mod mqtt;
mod opcua;

use std::time::Duration;

use crate::event::Class;

pub use http::HttpSourceConfig;
pub(super) use http::check_http;
pub(super) use mqtt::check_mqtt;
pub use mqtt::{MqttFormat, MqttProtocol, MqttSourceConfig, OnInvalid, TopicSubscription};
pub(super) use opcua::check_opcua;
pub use opcua::{Deadband, OpcuaNodeConfig, OpcuaSourceConfig, SecurityMode, SecurityPolicy};

fn default_telemetry() -> Class {
    Class::Telemetry
}
fn default_10s() -> Duration {
    Duration::from_secs(10)
}
