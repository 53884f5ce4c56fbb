//! A sequence of Sparkplug B messages -> one `sparkplug::Decoder`, so that
//! births, deaths and data messages of the same nodes interact through the
//! alias tables.
//!
//! Layout per message: a topic selector (u8), then the payload (u16 LE
//! length, then the protobuf bytes). Selector 0xFF: a free topic follows (u8
//! length, then the text); 0xFE: `spBv1.0/STATE/host`; otherwise bits 0-2
//! pick the message type (NBIRTH NDATA NDEATH NCMD DBIRTH DDATA DDEATH
//! DCMD), bit 3 the edge node, bit 4 the group, bit 5 the device.
#![no_main]

#[path = "framing.rs"]
mod framing;

use framing::Reader;
use libfuzzer_sys::fuzz_target;
use plantrelay::sources::sparkplug::Decoder;

const KINDS: [&str; 8] = [
    "NBIRTH", "NDATA", "NDEATH", "NCMD", "DBIRTH", "DDATA", "DDEATH", "DCMD",
];
const MAX_MESSAGES: usize = 16;

fn topic(r: &mut Reader<'_>) -> Option<String> {
    let selector = r.u8()?;
    Some(match selector {
        0xFF => r.opt_str()?.unwrap_or_default(),
        0xFE => "spBv1.0/STATE/scada-1".to_string(),
        s => {
            let kind = KINDS[usize::from(s & 7)];
            let node = if s & 8 == 0 { "press-1" } else { "press-2" };
            let group = if s & 16 == 0 { "plant-a" } else { "plant-b" };
            let device = if s & 32 == 0 { "drive" } else { "oven" };
            if kind.starts_with('D') {
                format!("spBv1.0/{group}/{kind}/{node}/{device}")
            } else {
                format!("spBv1.0/{group}/{kind}/{node}")
            }
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mut decoder = Decoder::new();
    for _ in 0..MAX_MESSAGES {
        let Some(topic) = topic(&mut r) else { break };
        let Some(payload) = r.blob() else { break };
        let before = decoder.clone();
        let Ok(decoded) = decoder.decode(&topic, payload) else {
            continue;
        };
        assert!(!decoded.stream.is_empty());
        assert!(decoded.data.is_object());
        // The document is journaled as JSON text and read back by the sinks.
        let text = decoded.data.to_string();
        framing::assert_json("decoded data", text.as_bytes());
        // Decoding is a function of the alias tables and the message.
        let mut again = before;
        assert_eq!(again.decode(&topic, payload).ok(), Some(decoded));
    }
});
