//! MQTT on the wire, shared by the MQTT source and the MQTT sink: one
//! connection on rumqttc's packet codec ([`link`]). It knows packets and
//! sockets; it never decides what to publish, ack or retry.

pub(crate) mod link;
