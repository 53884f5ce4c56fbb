//! Outage reports in the data: the upstream is cut (through the fault
//! proxy) for longer than `outage_report_after`, then let through; the
//! upstream then receives exactly one `plantrelay.outage` event with the
//! outage's figures and one `plantrelay.outage.drained`. A failure shorter
//! than the threshold is not an outage.

use crate::support;

use std::time::{Duration, Instant};

use plantrelay::agent::{self, RunningAgent};
use plantrelay::config::Config;
use plantrelay::demo::receiver::ReceivedEvent;
use serde_json::Value;
use support::agent::{Harness, http_client, mes_events, post};
use support::fault_proxy::FaultProxy;
use support::upstream::until;

async fn start(h: &Harness, proxy: &FaultProxy, after: &str) -> RunningAgent {
    let url = format!("https://localhost:{}/v1/events", proxy.addr().port());
    let mut text = h.config_text("127.0.0.1:0", &url, "batch_linger = \"0s\"", "");
    text = text.replace(
        "shutdown_timeout = \"5s\"",
        &format!("shutdown_timeout = \"5s\"\noutage_report_after = \"{after}\""),
    );
    agent::start(&Config::load(&h.write_config(&text)).unwrap())
        .await
        .unwrap()
}

fn reports(h: &Harness, event_type: &str) -> Vec<ReceivedEvent> {
    h.receiver
        .events()
        .into_iter()
        .filter(|e| e.event_type == event_type)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_threshold_is_reported_once_with_its_figures() {
    let h = Harness::new().await;
    let proxy = FaultProxy::start(h.receiver.addr()).await;
    let a = start(&h, &proxy, "1s").await;
    let url = format!("http://{}/v1/events", a.http_addr("mes").unwrap());
    let client = http_client();
    let (status, _) = post(&client, &url, &mes_events("before", 10, 2)).await;
    assert_eq!(status, 202);
    until("the first events upstream", || {
        h.receiver.events().len() >= 10
    })
    .await;

    proxy.cut();
    let (status, _) = post(&client, &url, &mes_events("during", 300, 3)).await;
    assert_eq!(status, 202);
    until("the sink to fail", || {
        a.view.sinks[0].progress().consecutive_failures > 0
    })
    .await;
    // Failing for 2 s at least, twice the threshold, however slow the
    // machine was to notice the first failure.
    let failing_seen = Instant::now();
    while failing_seen.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.pass();

    until("the outage report and its drain report", || {
        !reports(&h, "plantrelay.outage").is_empty()
            && !reports(&h, "plantrelay.outage.drained").is_empty()
    })
    .await;
    // Every event of the outage is upstream, and nothing else is reported
    // while the agent keeps delivering.
    until("the events of the outage upstream", || {
        h.receiver
            .count_events(|e| e.id.starts_with("during-") && !e.duplicate)
            == 300
    })
    .await;
    let outage = reports(&h, "plantrelay.outage");
    assert_eq!(outage.len(), 1, "one report per outage: {outage:?}");
    let r = &outage[0];
    assert_eq!(r.source, "plantrelay://gw-test/plantrelay");
    assert_eq!(r.subject.as_deref(), Some("plantrelay/outage/central"));
    let d: &Value = &r.data;
    assert_eq!(d["sink"], "central");
    let lasted = d["duration_seconds"].as_f64().unwrap();
    assert!(
        (2.0..30.0).contains(&lasted),
        "the outage lasted 2 s or a little more: {d}"
    );
    assert_eq!(d["buffered_events"], 300, "{d}");
    assert!(d["peak_backlog"].as_u64().unwrap() >= 300, "{d}");
    assert!(
        d["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{d}"
    );
    for key in ["started", "ended", "peak_backlog_at"] {
        assert!(
            humantime::parse_rfc3339(d[key].as_str().unwrap()).is_ok(),
            "{key}: {d}"
        );
    }
    let drained = reports(&h, "plantrelay.outage.drained");
    assert_eq!(drained.len(), 1, "{drained:?}");
    assert_eq!(drained[0].data["sink"], "central");
    assert_eq!(drained[0].data["started"], d["started"]);
    assert!(drained[0].data["drain_seconds"].as_f64().is_some());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_shorter_than_the_threshold_is_not_an_outage() {
    let h = Harness::new().await;
    let proxy = FaultProxy::start(h.receiver.addr()).await;
    let a = start(&h, &proxy, "30s").await;
    let url = format!("http://{}/v1/events", a.http_addr("mes").unwrap());
    let client = http_client();
    proxy.cut();
    let (status, _) = post(&client, &url, &mes_events("short", 50, 2)).await;
    assert_eq!(status, 202);
    until("the sink to fail", || {
        a.view.sinks[0].progress().consecutive_failures > 0
    })
    .await;
    proxy.pass();
    until("the events upstream", || {
        h.receiver.count_events(|e| e.id.starts_with("short-")) >= 50
    })
    .await;
    // Nothing to wait for but the absence of a report: give the watcher
    // (it looks every 500 ms) three turns and the forwarder time to send.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(reports(&h, "plantrelay.outage").is_empty());
    assert!(reports(&h, "plantrelay.outage.drained").is_empty());
    a.shutdown().await;
}
