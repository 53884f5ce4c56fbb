//! The chaos runner (`support::chaos`) in a short campaign: the real binary
//! fed by HTTP ingest, the system Mosquitto and the simulated OPC UA press,
//! forwarding to the HTTPS receiver, a second Mosquitto and nats-server,
//! while three faults of every kind are injected in a seeded order. The
//! full campaign (a million events, fifty faults of every kind) is
//! `cargo bench --features interop --bench chaos`. Set
//! `PLANTRELAY_CHAOS_SEED` to replay the order a failed run printed.

#![cfg(feature = "interop")]

use std::time::Duration;

use crate::support::chaos::{self, Fault, Plan};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_campaign_of_every_fault_loses_nothing_and_keeps_every_stream_in_order() {
    let seed = std::env::var("PLANTRELAY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chaos seed {seed} (PLANTRELAY_CHAOS_SEED={seed} replays its order)");
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan {
        seed,
        events: 20_000,
        faults_per_kind: 3,
        http_rate: 800,
        mqtt_rate: 200,
        opcua_items: 4,
        max_duration: Duration::from_secs(300),
        binary: env!("CARGO_BIN_EXE_plantrelay").into(),
        dir: dir.path().to_owned(),
    };
    let report = chaos::run(&plan).await;
    eprintln!("{report}");
    assert_eq!(report.cut_short, None, "{report}");
    for kind in Fault::ALL {
        assert_eq!(
            report.faults.get(&kind).map(|f| f.injected),
            Some(3),
            "{}: {report}",
            kind.name()
        );
    }
    assert!(report.acked() >= plan.events, "{report}");
    assert!(report.acked_http > 0 && report.acked_mqtt > 0 && report.opcua_events > 0);
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.upstreams.len(), 3);
    for u in &report.upstreams {
        assert_eq!(u.unique, report.journal_events, "{}: {report}", u.name);
    }
}
