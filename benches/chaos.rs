//! `cargo bench --features interop --bench chaos`: the fault campaign of
//! `tests/it/support/chaos.rs` at full size. The real binary (built by
//! cargo for the bench) takes events over HTTP ingest, MQTT (the system
//! Mosquitto) and OPC UA (the simulated press) and forwards them to the
//! HTTPS receiver, a second Mosquitto and nats-server, while a seeded
//! scheduler injects every kind of fault; prints the table and exits 1
//! unless nothing was lost, reordered or invented. Records go to
//! BENCHMARKS.md by hand.
//!
//! Knobs: `PLANTRELAY_CHAOS_EVENTS` (default 1,000,000),
//! `PLANTRELAY_CHAOS_FAULTS` (per kind, default 50), `PLANTRELAY_CHAOS_SEED`
//! (default random, printed), `PLANTRELAY_CHAOS_HTTP_RATE` (events/s,
//! default 1,000), `PLANTRELAY_CHAOS_MQTT_RATE` (default 200),
//! `PLANTRELAY_CHAOS_MAX` (seconds, default 3,600),
//! `PLANTRELAY_BENCH_DIR` (where the temp dir goes, default ".").

use std::time::Duration;

#[allow(dead_code, unused_imports)]
#[path = "../tests/it/support/mod.rs"]
mod support;

use support::chaos::{self, Plan};

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is expected.
    let seed = knob("PLANTRELAY_CHAOS_SEED", rand::random());
    let plan = Plan {
        seed,
        events: knob("PLANTRELAY_CHAOS_EVENTS", 1_000_000),
        faults_per_kind: knob("PLANTRELAY_CHAOS_FAULTS", 50) as usize,
        http_rate: knob("PLANTRELAY_CHAOS_HTTP_RATE", 1_000),
        mqtt_rate: knob("PLANTRELAY_CHAOS_MQTT_RATE", 200),
        opcua_items: 8,
        max_duration: Duration::from_secs(knob("PLANTRELAY_CHAOS_MAX", 3_600)),
        binary: env!("CARGO_BIN_EXE_plantrelay").into(),
        dir: std::env::var("PLANTRELAY_BENCH_DIR")
            .unwrap_or_else(|_| ".".into())
            .into(),
    };
    eprintln!(
        "chaos: seed {seed}, {} events, {} faults of each kind, HTTP {}/s, MQTT {}/s",
        plan.events, plan.faults_per_kind, plan.http_rate, plan.mqtt_rate
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = rt.block_on(chaos::run(&plan));
    println!("{report}");
    if !report.is_clean() || report.cut_short.is_some() {
        std::process::exit(1);
    }
}
