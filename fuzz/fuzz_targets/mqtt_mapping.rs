//! An `[[sources.mqtt]]` mapping (format, `id_pointer`, `time_pointer`,
//! `stream` template, `on_invalid`, `max_payload`, all drawn from the input
//! and validated by the config as the agent would) and a sequence of
//! messages (topic, payload, retain flag, v5 properties) -> the MQTT
//! source's `Mapper::map`.
//!
//! Layout: format (u8: json, raw, sparkplug_b), flags (u8: bit 0 drop
//! invalid), max_payload (u16 LE), id_pointer, time_pointer, stream (each a
//! u8 length, 0xFF for absent, then the text); then per message: flags (u8:
//! bit 0 retain, bit 1 content type, bit 2 a user property), topic, the
//! property strings as flagged, the payload (u16 LE length, then bytes).
#![no_main]

#[path = "framing.rs"]
mod framing;

use framing::Reader;
use libfuzzer_sys::fuzz_target;
use plantrelay::fuzzing::{MqttMapper, MqttOptions, MqttOutcome};

const FORMATS: [&str; 3] = ["json", "raw", "sparkplug_b"];
const MAX_MESSAGES: usize = 16;

fn options(r: &mut Reader<'_>) -> Option<MqttOptions> {
    let format = FORMATS[usize::from(r.u8()?) % FORMATS.len()].to_string();
    let flags = r.u8()?;
    let max_payload = u64::from(r.u16()?);
    Some(MqttOptions {
        format,
        on_invalid: if flags & 1 == 1 { "drop" } else { "journal" }.to_string(),
        max_payload,
        id_pointer: r.opt_str()?,
        time_pointer: r.opt_str()?,
        stream: r.opt_str()?,
    })
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let Some(options) = options(&mut r) else {
        return;
    };
    let Ok(mut mapper) = MqttMapper::new(&options) else {
        return;
    };
    for _ in 0..MAX_MESSAGES {
        let Some(flags) = r.u8() else { break };
        let Some(topic) = r.opt_str() else { break };
        let topic = topic.unwrap_or_default();
        let content_type = if flags & 2 != 0 {
            let Some(ct) = r.opt_str() else { break };
            ct
        } else {
            None
        };
        let mut user_properties = Vec::new();
        if flags & 4 != 0 {
            let (Some(k), Some(v)) = (r.opt_str(), r.opt_str()) else {
                break;
            };
            user_properties.push((k.unwrap_or_default(), v.unwrap_or_default()));
        }
        let Some(payload) = r.blob() else { break };
        let event = match mapper.map(
            &topic,
            payload,
            flags & 1 != 0,
            content_type,
            user_properties,
        ) {
            MqttOutcome::Event(e) => e,
            MqttOutcome::Rejected(e, reason) => {
                assert!(!reason.is_empty());
                e
            }
            MqttOutcome::Dropped(reason) => {
                assert_eq!(options.on_invalid, "drop");
                assert!(!reason.is_empty());
                continue;
            }
        };
        assert!(!event.id.is_empty(), "empty id");
        assert!(!event.event_type.is_empty());
        framing::assert_json("data", &event.data);
        if let Some(attrs) = &event.attrs {
            framing::assert_json_object("attrs", attrs);
        }
    }
});
