//! The demo receiver as a real HTTPS peer (reqwest + rustls/ring through
//! `plantrelay::tls`), its fault controls, and the TCP fault proxy.

use crate::support;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use plantrelay::demo::receiver::{
    EphemeralPki, PkiPaths, REJECT_REASON, Receiver, ReceiverOptions, ServerIdentity,
};
use plantrelay::tls;
use serde_json::{Value, json};
use support::fault_proxy::{FaultProxy, Mode};

const CT: &str = "application/cloudevents-batch+json";
const SOURCE: &str = "plantrelay://gw-test/mes";
const STREAM: &str = "line3/press07";

struct Fixture {
    pki: EphemeralPki,
    paths: PkiPaths,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let pki = EphemeralPki::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = pki.write_to(dir.path()).unwrap();
    Fixture {
        pki,
        paths,
        _dir: dir,
    }
}

async fn receiver(f: &Fixture) -> Receiver {
    Receiver::start(ReceiverOptions::new(&f.pki)).await.unwrap()
}

/// A client that trusts only the test CA, built the way the HTTPS sink does.
fn client(paths: &PkiPaths, with_cert: bool, timeout: Duration) -> reqwest::Client {
    let cfg = tls::client_config(&paths.client_tls(with_cert)).unwrap();
    tls::reqwest_client_builder(cfg)
        .timeout(timeout)
        .build()
        .unwrap()
}

/// A batch of events `(id, streamsequence)` on one stream.
fn batch(events: &[(&str, u64)]) -> Vec<u8> {
    let v: Vec<Value> = events
        .iter()
        .map(|(id, s)| {
            json!({
                "specversion": "1.0", "id": id, "source": SOURCE,
                "type": "com.example.confirmation", "subject": STREAM,
                "time": "2026-11-29T10:00:00Z", "sequence": s, "streamsequence": s,
                "data": {"qty": s}
            })
        })
        .collect();
    serde_json::to_vec(&v).unwrap()
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    encoding: Option<&str>,
    key: &str,
) -> reqwest::Result<reqwest::Response> {
    let mut req = client
        .post(url)
        .header("content-type", CT)
        .header("idempotency-key", key)
        .body(body);
    if let Some(e) = encoding {
        req = req.header("content-encoding", e);
    }
    req.send().await
}

async fn json_body(resp: reqwest::Response) -> Value {
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

/// The I/O error kind at the bottom of a reqwest error, if any.
fn io_kind(e: &reqwest::Error) -> Option<std::io::ErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = s.source();
    }
    None
}

fn url_via(addr: SocketAddr) -> String {
    format!("https://{addr}/v1/events")
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn accepts_batches_and_records_events_keys_and_duplicates() {
    let f = fixture();
    let r = receiver(&f).await;
    assert_eq!(
        r.url(),
        format!("https://127.0.0.1:{}/v1/events", r.addr().port())
    );
    let c = client(&f.paths, false, T);

    let resp = post(
        &c,
        &r.url(),
        batch(&[("e1", 1), ("e2", 2), ("e3", 3)]),
        None,
        "gw-test:1-3",
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json_body(resp).await["received"], 3);

    // A retry of the same batch: accepted, and counted as duplicates.
    let resp = post(
        &c,
        &r.url(),
        batch(&[("e2", 2), ("e3", 3)]),
        None,
        "gw-test:2-3",
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json_body(resp).await["duplicates"], 2);

    let ids: Vec<String> = r.ids().into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, ["e1", "e2", "e3", "e2", "e3"]);
    assert!(r.ids().iter().all(|(s, _)| s == SOURCE));
    assert_eq!(
        r.idempotency_keys(),
        [
            Some("gw-test:1-3".to_owned()),
            Some("gw-test:2-3".to_owned())
        ]
    );
    let events = r.events();
    assert_eq!(events[0].subject.as_deref(), Some(STREAM));
    assert_eq!(events[2].streamsequence, Some(3));
    assert_eq!(events[2].data, json!({"qty": 3}));
    assert!(!events[2].duplicate && events[4].duplicate);

    let v = r.verdict();
    assert_eq!((v.events_received, v.unique_ids, v.duplicates), (5, 3, 2));
    assert_eq!(v.out_of_order, 0);
    assert!(v.is_complete_and_ordered(), "{v}");
    let s = r.stats();
    assert_eq!((s.requests, s.batches_accepted), (2, 2));
    assert!(s.wire_bytes > 0 && s.wire_bytes == s.decoded_bytes);
}

#[tokio::test]
async fn gzip_and_zstd_bodies_are_decoded() {
    let f = fixture();
    let r = receiver(&f).await;
    let c = client(&f.paths, false, T);

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&batch(&[("e1", 1), ("e2", 2)])).unwrap();
    let gz = gz.finish().unwrap();
    let resp = post(&c, &r.url(), gz.clone(), Some("gzip"), "k1")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json_body(resp).await["received"], 2);

    let zst = ruzstd::encoding::compress_to_vec(
        &batch(&[("e3", 3)])[..],
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    let resp = post(&c, &r.url(), zst, Some("zstd"), "k2").await.unwrap();
    assert_eq!(resp.status(), 200);

    let ids: Vec<String> = r.ids().into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, ["e1", "e2", "e3"]);
    let b = r.batches();
    assert_eq!((b[0].encoding, b[1].encoding), ("gzip", "zstd"));
    assert_eq!(b[0].wire_bytes, gz.len());
    assert!(b[0].decoded_bytes > b[0].wire_bytes);
}

#[tokio::test]
async fn bad_requests_get_a_4xx_with_a_reason_and_record_nothing() {
    let f = fixture();
    let r = receiver(&f).await;
    let c = client(&f.paths, false, T);

    let resp = c
        .post(r.url())
        .header("content-type", "application/json")
        .body(batch(&[("e1", 1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    assert!(
        json_body(resp).await["reason"]
            .as_str()
            .unwrap()
            .contains(CT)
    );

    let resp = post(&c, &r.url(), batch(&[("e1", 1)]), Some("br"), "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);

    let resp = post(&c, &r.url(), b"[{\"id\": 1".to_vec(), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let reason = json_body(resp).await["reason"].as_str().unwrap().to_owned();
    assert!(!reason.is_empty());

    let resp = post(&c, &r.url(), b"not gzip".to_vec(), Some("gzip"), "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    assert!(r.events().is_empty());
    assert_eq!(r.stats().malformed_batches, 4);
}

#[tokio::test]
async fn set_fail_answers_the_status_with_retry_after_until_cleared() {
    let f = fixture();
    let r = receiver(&f).await;
    let c = client(&f.paths, false, T);

    r.set_fail(503, Some(7), 1.0);
    let resp = post(&c, &r.url(), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert!(r.events().is_empty());

    r.set_fail(429, None, 1.0);
    let resp = post(&c, &r.url(), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_none());

    // Probability 0: never fails.
    r.set_fail(503, Some(1), 0.0);
    let resp = post(&c, &r.url(), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    r.set_fail(500, None, 1.0);
    r.clear_faults();
    let resp = post(&c, &r.url(), batch(&[("e2", 2)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(r.stats().injected_failures, 2);
    assert_eq!(r.verdict().unique_ids, 2);
}

#[tokio::test]
async fn reject_ids_answers_422_naming_the_id_and_accepts_nothing_of_the_batch() {
    let f = fixture();
    let r = receiver(&f).await;
    let c = client(&f.paths, false, T);

    r.reject_ids(["e2"]);
    let resp = post(
        &c,
        &r.url(),
        batch(&[("e1", 1), ("e2", 2), ("e3", 3)]),
        None,
        "k",
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 422);
    assert_eq!(
        json_body(resp).await,
        json!({"error": "rejected", "id": "e2", "reason": REJECT_REASON})
    );
    assert!(r.events().is_empty());

    // Without the poison event the rest goes through.
    let resp = post(&c, &r.url(), batch(&[("e1", 1), ("e3", 3)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(r.stats().rejected_batches, 1);
    assert_eq!(r.verdict().unique_ids, 2);
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let f = fixture();
    let r = receiver(&f).await;
    let c = client(&f.paths, false, T);
    // Warm the connection so that only the injected latency is measured.
    post(&c, &r.url(), batch(&[("e0", 1)]), None, "k")
        .await
        .unwrap();

    r.set_latency(Duration::from_millis(300));
    let t0 = Instant::now();
    let resp = post(&c, &r.url(), batch(&[("e1", 2)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );

    let impatient = client(&f.paths, false, Duration::from_millis(100));
    let e = post(&impatient, &r.url(), batch(&[("e2", 3)]), None, "k")
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
}

#[tokio::test]
async fn reset_drops_the_connection_without_an_answer() {
    let f = fixture();
    let r = receiver(&f).await;
    let c = client(&f.paths, false, T);

    r.set_reset(1.0);
    let t0 = Instant::now();
    let e = post(&c, &r.url(), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap_err();
    assert_eq!(
        io_kind(&e),
        Some(std::io::ErrorKind::ConnectionReset),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(r.events().is_empty());
    assert_eq!(r.stats().injected_resets, 1);

    r.clear_faults();
    let resp = post(&c, &r.url(), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn stop_refuses_connections_and_restart_listens_on_the_same_port() {
    let f = fixture();
    let r = receiver(&f).await;
    let addr = r.addr();
    let c = client(&f.paths, false, T);
    post(&c, &r.url(), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap();

    r.stop().await;
    assert!(!r.is_running());
    let e = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    // The old client (its pooled connection was closed) gets a connect error.
    let e = post(&c, &r.url(), batch(&[("e2", 2)]), None, "k")
        .await
        .unwrap_err();
    assert!(e.is_connect(), "{e:?}");

    r.restart().await.unwrap();
    assert_eq!(r.addr(), addr);
    let resp = post(&c, &r.url(), batch(&[("e2", 2)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The recording survives the outage.
    assert_eq!(r.verdict().unique_ids, 2);

    // And again, to be sure the port is reusable more than once.
    r.stop().await;
    r.restart().await.unwrap();
    let resp = post(&c, &r.url(), batch(&[("e3", 3)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn mtls_receiver_requires_a_client_certificate() {
    let f = fixture();
    let opts = ReceiverOptions {
        require_client_cert: true,
        ..ReceiverOptions::new(&f.pki)
    };
    let r = Receiver::start(opts).await.unwrap();

    let anonymous = client(&f.paths, false, T);
    let e = post(&anonymous, &r.url(), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("CertificateRequired"), "{e:?}");
    assert_eq!(r.stats().requests, 0, "no request got past the handshake");

    let with_cert = client(&f.paths, true, T);
    let resp = post(&with_cert, &r.url(), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(r.verdict().unique_ids, 1);
}

#[tokio::test]
async fn explicit_pem_identity_without_client_ca_cannot_require_client_certs() {
    let f = fixture();
    let opts = ReceiverOptions {
        identity: ServerIdentity::Pem {
            cert_pem: f.pki.server_cert_pem(),
            key_pem: f.pki.server_key_pem(),
            client_ca_pem: None,
        },
        require_client_cert: true,
        ..ReceiverOptions::new(&f.pki)
    };
    let e = Receiver::start(opts).await.unwrap_err();
    assert!(e.to_string().contains("no client CA"), "{e}");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_refused() {
    let f = fixture();
    let r = receiver(&f).await;
    let other = fixture();
    let c = client(&other.paths, false, T);
    let e = post(&c, &r.url(), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap_err();
    assert!(e.is_connect(), "{e:?}");
    assert_eq!(r.stats().requests, 0);
}

#[tokio::test]
async fn wait_for_wakes_on_arrival_and_times_out() {
    let f = fixture();
    let r = receiver(&f).await;
    let c = client(&f.paths, false, T);
    let url = r.url();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        post(&c, &url, batch(&[("e1", 1), ("e2", 2)]), None, "k")
            .await
            .unwrap();
    });
    assert!(r.wait_for(2, Duration::from_secs(10)).await);
    sender.await.unwrap();

    let t0 = Instant::now();
    assert!(!r.wait_for(3, Duration::from_millis(200)).await);
    assert!(t0.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn proxy_passes_traffic_through() {
    let f = fixture();
    let r = receiver(&f).await;
    let proxy = FaultProxy::start(r.addr()).await;
    assert_eq!(proxy.mode(), Mode::Pass);
    let c = client(&f.paths, false, T);
    let resp = post(&c, &url_via(proxy.addr()), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(proxy.connections_accepted(), 1);
    assert_eq!(r.verdict().unique_ids, 1);
}

#[tokio::test]
async fn proxy_blackhole_makes_requests_time_out() {
    let f = fixture();
    let r = receiver(&f).await;
    let proxy = FaultProxy::start(r.addr()).await;
    proxy.blackhole();
    let c = client(&f.paths, false, Duration::from_millis(300));
    let t0 = Instant::now();
    let e = post(&c, &url_via(proxy.addr()), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        proxy.connections_accepted(),
        1,
        "the connection was accepted"
    );
    assert_eq!(r.stats().requests, 0);

    proxy.pass();
    let resp = post(&c, &url_via(proxy.addr()), batch(&[("e1", 1)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn proxy_cut_breaks_open_and_new_connections() {
    let f = fixture();
    let r = receiver(&f).await;
    let proxy = FaultProxy::start(r.addr()).await;
    let url = url_via(proxy.addr());
    let c = client(&f.paths, false, T);

    // A request in flight (the receiver is slow) is cut off at once.
    r.set_latency(Duration::from_secs(3));
    let in_flight = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, batch(&[("e1", 1)]), None, "k").await })
    };
    assert!(r.wait_until(T, |s| s.requests == 1).await);
    let t0 = Instant::now();
    proxy.cut();
    let e = in_flight.await.unwrap().unwrap_err();
    assert_eq!(
        io_kind(&e),
        Some(std::io::ErrorKind::ConnectionReset),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    // New connections are reset on accept.
    r.clear_faults();
    let e = post(&c, &url, batch(&[("e2", 2)]), None, "k")
        .await
        .unwrap_err();
    assert!(e.is_connect(), "{e:?}");

    proxy.pass();
    let resp = post(&c, &url, batch(&[("e2", 2)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn proxy_delay_adds_latency_per_chunk() {
    let f = fixture();
    let r = receiver(&f).await;
    let proxy = FaultProxy::start(r.addr()).await;
    let url = url_via(proxy.addr());
    let c = client(&f.paths, false, T);
    post(&c, &url, batch(&[("e0", 1)]), None, "k")
        .await
        .unwrap();

    proxy.delay(Duration::from_millis(250));
    let t0 = Instant::now();
    let resp = post(&c, &url, batch(&[("e1", 2)]), None, "k")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // At least one chunk each way on the warm connection.
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );

    proxy.pass();
    let t0 = Instant::now();
    post(&c, &url, batch(&[("e2", 3)]), None, "k")
        .await
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_listener() {
    let f = fixture();
    let r = receiver(&f).await;
    let proxy = FaultProxy::start(r.addr()).await;
    let addr = proxy.addr();
    drop(proxy);
    // The accept task is aborted asynchronously; give it a moment.
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "proxy still listening after drop");
}
