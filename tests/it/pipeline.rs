//! Store-and-forward end to end, in process: the HTTP ingest, the journal,
//! the forwarder and the HTTPS sink against a real HTTPS receiver that goes
//! down, fails, slows down, rejects events or requires client certificates.

use crate::support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use plantrelay::agent;
use serde_json::Value;
use support::agent::{Harness, http_client, mes_events, post};
use support::upstream::until;

const WAIT: Duration = Duration::from_secs(120);

fn ingest_url(a: &agent::RunningAgent) -> String {
    format!("http://{}/v1/events", a.http_addr("mes").unwrap())
}

/// Per stream, the stream sequences of new (non-duplicate) events must rise
/// by exactly one, except across `allowed_holes`.
fn assert_in_order(h: &Harness, allowed_holes: &HashSet<(String, u64)>) {
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for e in h.receiver.events().iter().filter(|e| !e.duplicate) {
        let stream = e.subject.clone().unwrap();
        let sseq = e.streamsequence.unwrap();
        let prev = last.get(&stream).copied().unwrap_or(0);
        let mut expected = prev + 1;
        while allowed_holes.contains(&(stream.clone(), expected)) {
            expected += 1;
        }
        assert_eq!(sseq, expected, "stream {stream}: {sseq} after {prev}");
        last.insert(stream, sseq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_for_the_first_half_then_up_gets_all_20k_events_in_order() {
    let h = Harness::new().await;
    h.receiver.stop().await;
    let a = agent::start(&h.config("batch_max_events = 1000"))
        .await
        .unwrap();
    let client = http_client();
    let url = ingest_url(&a);
    let events = mes_events("half", 20_000, 10);
    for (i, chunk) in events.chunks(500).enumerate() {
        if i == 20 {
            // Half posted while the upstream was down.
            assert_eq!(h.receiver.verdict().unique_ids, 0);
            h.receiver.restart().await.unwrap();
        }
        let (status, body) = post(&client, &url, chunk).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["accepted"], 500);
    }
    assert!(
        h.receiver
            .wait_until(WAIT, |s| s.unique_ids >= 20_000)
            .await,
        "all delivered"
    );
    let v = h.receiver.verdict();
    assert_eq!(v.unique_ids, 20_000);
    assert_eq!(v.out_of_order, 0);
    assert_eq!(v.missing, 0);
    assert_eq!(v.per_stream.len(), 10);
    for (stream, sv) in &v.per_stream {
        assert_eq!(
            (sv.first, sv.last, sv.unique),
            (Some(1), Some(2000), 2000),
            "{stream}"
        );
    }
    assert_in_order(&h, &HashSet::new());
    // Idempotency keys name the agent and the seq range of each batch.
    let keys = h.receiver.idempotency_keys();
    assert!(
        keys.iter()
            .all(|k| k.as_deref().is_some_and(|k| k.starts_with("gw-test:")))
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_slow_upstream_answering_503_loses_nothing() {
    let h = Harness::new().await;
    h.receiver.set_fail(503, Some(0), 0.3);
    h.receiver.set_latency(Duration::from_millis(50));
    let a = agent::start(&h.config("batch_max_events = 100"))
        .await
        .unwrap();
    let client = http_client();
    let url = ingest_url(&a);
    for chunk in mes_events("flaky", 3000, 6).chunks(300) {
        assert_eq!(post(&client, &url, chunk).await.0, 202);
    }
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 3000).await);
    let v = h.receiver.verdict();
    assert_eq!((v.unique_ids, v.out_of_order, v.missing), (3000, 0, 0));
    let progress = a.view.sinks[0].progress();
    assert!(
        progress.attempts > progress.batches,
        "503s were retried: {progress:?}"
    );
    assert!(progress.last_error.unwrap().1.contains("503"));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_honoured() {
    let h = Harness::new().await;
    h.receiver.set_fail(429, Some(1), 1.0);
    let a = agent::start(&h.config("")).await.unwrap();
    let client = http_client();
    assert_eq!(
        post(&client, &ingest_url(&a), &mes_events("ra", 10, 1))
            .await
            .0,
        202
    );
    // The attempts in a fixed span are what is measured.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let attempts = a.view.sinks[0].progress().attempts;
    // retry_max is 500 ms: without Retry-After there would be > 5 attempts.
    assert!((2..=4).contains(&attempts), "{attempts} attempts in 2.5 s");
    h.receiver.clear_faults();
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 10).await);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_our_credentials_holds_the_backlog_without_dead_letters() {
    let h = Harness::new().await;
    h.receiver.set_fail(401, None, 1.0);
    let a = agent::start(&h.config("batch_max_events = 50"))
        .await
        .unwrap();
    let client = http_client();
    assert_eq!(
        post(&client, &ingest_url(&a), &mes_events("auth", 200, 2))
            .await
            .0,
        202
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.view.sinks[0].progress().attempts < 3 {
        assert!(tokio::time::Instant::now() < deadline, "no retries");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let progress = a.view.sinks[0].progress();
    assert_eq!(progress.dead_letters, 0, "{progress:?}");
    assert_eq!(progress.cursor, 0, "{progress:?}");
    assert!(progress.last_error.unwrap().1.contains("401"));
    // Credentials fixed upstream: everything arrives, in order, none dead.
    h.receiver.clear_faults();
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 200).await);
    let v = h.receiver.verdict();
    assert_eq!((v.unique_ids, v.out_of_order, v.missing), (200, 0, 0));
    assert_eq!(a.view.sinks[0].progress().dead_letters, 0);
    a.shutdown().await;
}

/// An upstream that refuses every event (a changed API, a proxy answering
/// 400) dead-letters them all, each one kept in the table; the log has one
/// rejection and one dead-letter line a minute, not two per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_everything_is_logged_once_a_minute_not_per_event() {
    support::logs::start();
    let h = Harness::new().await;
    h.receiver.set_fail(400, None, 1.0);
    let text = h
        .config_text(
            "127.0.0.1:0",
            &h.receiver.url(),
            "batch_max_events = 50",
            "",
        )
        .replace("name = \"central\"", "name = \"refuses-all\"");
    let config = plantrelay::config::Config::load(&h.write_config(&text)).unwrap();
    let a = agent::start(&config).await.unwrap();
    let client = http_client();
    assert_eq!(
        post(&client, &ingest_url(&a), &mes_events("refused", 100, 2))
            .await
            .0,
        202
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.view.sinks[0].progress().dead_letters < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            a.view.sinks[0].progress()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await;
    let log = support::logs::text();
    let ours = |what: &str| {
        log.lines()
            .filter(|l| l.contains("sink=refuses-all") && l.contains(what))
            .count()
    };
    assert_eq!(ours("upstream rejected the batch"), 1);
    assert_eq!(ours("event dead-lettered"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_poison_events_in_a_thousand_become_exactly_three_dead_letters() {
    let h = Harness::new().await;
    let events = mes_events("poison", 1000, 5);
    let poison = ["poison-17", "poison-500", "poison-999"];
    h.receiver.reject_ids(poison);
    let a = agent::start(&h.config("batch_max_events = 200"))
        .await
        .unwrap();
    let client = http_client();
    let url = ingest_url(&a);
    for chunk in events.chunks(250) {
        assert_eq!(post(&client, &url, chunk).await.0, 202);
    }
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 997).await);
    // Wait for the cursor to pass the last event.
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.view.sinks[0].progress().cursor < 1000 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received: HashSet<String> = h.receiver.ids().into_iter().map(|(_, id)| id).collect();
    assert_eq!(received.len(), 997);
    for p in poison {
        assert!(!received.contains(p));
    }
    let dead = a
        .journal
        .reader()
        .unwrap()
        .dead_letters(Some("central"))
        .unwrap();
    let mut dead_ids: Vec<&str> = dead.iter().map(|d| d.event_id.as_str()).collect();
    dead_ids.sort();
    assert_eq!(dead_ids, poison.to_vec());
    assert!(dead.iter().all(|d| d.reason.contains("422")), "{dead:?}");
    // The rest in order: the only holes are the poison events' sequences.
    let holes: HashSet<(String, u64)> = dead
        .iter()
        .map(|d| (d.stream.clone(), d.stream_seq))
        .collect();
    assert_in_order(&h, &holes);
    assert_eq!(a.view.sinks[0].progress().dead_letters, 3);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reposted_ids_are_acked_as_duplicates_and_not_forwarded_twice() {
    let h = Harness::new().await;
    let a = agent::start(&h.config("")).await.unwrap();
    let client = http_client();
    let url = ingest_url(&a);
    let events = mes_events("dup", 100, 3);
    let (s1, b1) = post(&client, &url, &events).await;
    let (s2, b2) = post(&client, &url, &events).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(
        (b1["accepted"].as_u64(), b1["duplicates"].as_u64()),
        (Some(100), Some(0))
    );
    assert_eq!(
        (b2["accepted"].as_u64(), b2["duplicates"].as_u64()),
        (Some(0), Some(100))
    );
    assert_eq!(
        b1["seqs"], b2["seqs"],
        "duplicates answer with the original seqs"
    );
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 100).await);
    // A quiet spell: a duplicate would arrive after the originals.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = h.receiver.verdict();
    assert_eq!((v.events_received, v.duplicates), (100, 0));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_upstream_works_with_the_client_certificate_and_fails_clearly_without() {
    let h = Harness::with_mtls(true).await;
    let without = agent::start(&h.config("")).await.unwrap();
    let client = http_client();
    assert_eq!(
        post(&client, &ingest_url(&without), &mes_events("m", 5, 1))
            .await
            .0,
        202
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let error = loop {
        if let Some((_, e)) = without.view.sinks[0].progress().last_error {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "no error reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(h.receiver.verdict().unique_ids, 0);
    assert!(
        error.contains("certificate")
            || error.contains("handshake")
            || error.contains("reset")
            || error.contains("CertificateRequired")
            || error.contains("requires a client certificate"),
        "{error}"
    );
    without.shutdown().await;

    let with = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"",
        h.paths.client_cert.display(),
        h.paths.client_key.display()
    );
    let a = agent::start(&h.config(&with)).await.unwrap();
    assert!(
        h.receiver.wait_until(WAIT, |s| s.unique_ids >= 5).await,
        "delivered with the client cert"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_drop_oldest_journal_sends_gap_events_in_place_of_evicted_ranges() {
    let h = Harness::new().await;
    h.receiver.stop().await;
    let text = h
        .config_text(
            "127.0.0.1:0",
            &h.receiver.url(),
            "batch_max_events = 1000",
            "",
        )
        .replace(
            "sync = \"normal\"",
            "sync = \"normal\"\nmax_size = \"16MiB\"\nwhen_full = \"drop_oldest\"",
        )
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\nclass = \"telemetry\"",
        );
    let config = plantrelay::config::Config::load(&h.write_config(&text)).unwrap();
    let a = agent::start(&config).await.unwrap();
    let client = http_client();
    let url = ingest_url(&a);
    let payload = "x".repeat(900);
    let mut posted = 0;
    for round in 0..50 {
        let mut events = mes_events(&format!("big{round}"), 500, 4);
        for e in &mut events {
            e["data"] = Value::String(payload.clone());
        }
        assert_eq!(post(&client, &url, &events).await.0, 202);
        posted += 500;
    }
    let evicted = a
        .journal
        .stats()
        .evicted_telemetry
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(evicted > 0, "the journal had to evict");
    h.receiver.restart().await.unwrap();
    let expect = posted - evicted;
    let head = a
        .journal
        .stats()
        .head_seq
        .load(std::sync::atomic::Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.view.sinks[0].progress().cursor < head {
        assert!(tokio::time::Instant::now() < deadline, "the backlog drains");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = h.receiver.verdict();
    assert!(v.gaps > 0);
    assert_eq!(v.out_of_order, 0, "{v:?}");
    assert_eq!(v.missing, 0, "every hole is announced by a gap event");
    let announced: u64 = h
        .receiver
        .events()
        .iter()
        .filter(|e| e.event_type == "plantrelay.gap" && !e.duplicate)
        .map(|e| e.data["count"].as_u64().unwrap())
        .sum();
    assert_eq!(announced, evicted, "every eviction is announced once");
    // Events evicted while a batch carrying them was upstream arrive and
    // are announced as evicted too; the rest of what was evicted are holes.
    let delivered = v.unique_ids - v.gaps;
    assert_eq!(delivered + v.gap_covered, posted);
    assert!(delivered >= expect, "{delivered} < {expect}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_listener_answers_over_https_with_the_token() {
    let h = Harness::new().await;
    h.receiver.stop().await;
    let token = h.dir.path().join("health.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let extra = format!(
        "[health]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntoken_file = \"{}\"\n",
        h.paths.server_cert.display(),
        h.paths.server_key.display(),
        token.display()
    );
    let text = h.config_text("127.0.0.1:0", &h.receiver.url(), "", &extra);
    let config = plantrelay::config::Config::load(&h.write_config(&text)).unwrap();
    let a = agent::start(&config).await.unwrap();
    let addr = a.health_addr.unwrap();
    let tls = plantrelay::tls::client_config(&h.paths.client_tls(false)).unwrap();
    let client = plantrelay::tls::reqwest_client_builder(tls)
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", addr.port());
    let get = |path: &str, token: Option<&str>| {
        let mut r = client.get(format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(get("/healthz", None).await.unwrap().status(), 401);
    assert_eq!(get("/healthz", Some("wrong")).await.unwrap().status(), 401);
    assert_eq!(get("/healthz", Some("s3cret")).await.unwrap().status(), 200);
    assert_eq!(get("/readyz", Some("s3cret")).await.unwrap().status(), 200);

    assert_eq!(
        post(&http_client(), &ingest_url(&a), &mes_events("h", 50, 2))
            .await
            .0,
        202
    );
    until("the sink's first refused attempt", || {
        let p = a.view.sinks[0].progress();
        p.consecutive_failures > 0 && p.last_error.is_some()
    })
    .await;
    let status: Value = serde_json::from_str(
        &get("/api/v1/status", Some("s3cret"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["agent_id"], "gw-test");
    let sink = &status["sinks"][0];
    assert_eq!(sink["name"], "central");
    assert_eq!(sink["backlog_events"], 50);
    assert_eq!(sink["state"], "retrying");
    assert!(sink["oldest_undelivered_age_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        sink["last_error"].as_str().unwrap().contains("refused"),
        "{sink}"
    );
    assert_eq!(status["sources"][0]["events"], 50);

    h.receiver.restart().await.unwrap();
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 50).await);
    until("the cursor over the delivered events", || {
        let p = a.view.sinks[0].progress();
        p.cursor >= 50 && p.consecutive_failures == 0
    })
    .await;
    let status: Value = serde_json::from_str(
        &get("/api/v1/status", Some("s3cret"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["sinks"][0]["backlog_events"], 0);
    assert_eq!(status["sinks"][0]["state"], "ok");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarder_follows_a_replay_and_sends_the_range_again_with_the_same_ids() {
    let h = Harness::new().await;
    let a = agent::start(&h.config("")).await.unwrap();
    let client = http_client();
    assert_eq!(
        post(&client, &ingest_url(&a), &mes_events("rp", 40, 2))
            .await
            .0,
        202
    );
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 40).await);
    // The receiver has them a moment before the forwarder's advance commits.
    let deadline = std::time::Instant::now() + WAIT;
    while a.journal.reader().unwrap().cursor("central").unwrap() < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "cursor never reached 40"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cursor = a
        .journal
        .rewind("central", plantrelay::journal::RewindTo::Seq(31))
        .await
        .unwrap();
    assert_eq!(cursor, 30);
    assert!(
        h.receiver
            .wait_until(WAIT, |s| s.events_received >= 50)
            .await
    );
    let events = h.receiver.events();
    let again: Vec<u64> = events
        .iter()
        .filter(|e| e.duplicate)
        .map(|e| e.sequence.unwrap())
        .collect();
    assert_eq!(again, (31..=40).collect::<Vec<_>>());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_from_the_upstream_lose_nothing() {
    let h = Harness::new().await;
    h.receiver.set_reset(0.3);
    let a = agent::start(&h.config("batch_max_events = 50"))
        .await
        .unwrap();
    let client = http_client();
    for chunk in mes_events("reset", 1000, 4).chunks(100) {
        assert_eq!(post(&client, &ingest_url(&a), chunk).await.0, 202);
    }
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 1000).await);
    let v = h.receiver.verdict();
    assert_eq!((v.unique_ids, v.out_of_order, v.missing), (1000, 0, 0));
    let p = a.view.sinks[0].progress();
    assert!(p.attempts > p.batches, "resets were retried: {p:?}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_then_cut_then_slow_wan_delivers_everything_once_it_passes() {
    let h = Harness::new().await;
    let proxy = support::fault_proxy::FaultProxy::start(h.receiver.addr()).await;
    proxy.blackhole();
    let url = format!("https://127.0.0.1:{}/v1/events", proxy.addr().port());
    let text = h.config_text(
        "127.0.0.1:0",
        &url,
        "timeout = \"1s\"\nbatch_max_events = 100",
        "",
    );
    let config = plantrelay::config::Config::load(&h.write_config(&text)).unwrap();
    let a = agent::start(&config).await.unwrap();
    let client = http_client();
    let ingest = ingest_url(&a);
    assert_eq!(
        post(&client, &ingest, &mes_events("wan1", 300, 3)).await.0,
        202
    );
    // Nothing may pass for a while: longer than two of the 1 s timeouts.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        h.receiver.verdict().unique_ids,
        0,
        "nothing passes a black hole"
    );
    let err = a.view.sinks[0].progress().last_error.unwrap().1;
    assert!(
        err.contains("timed out") || err.contains("timeout"),
        "{err}"
    );

    proxy.cut();
    assert_eq!(
        post(&client, &ingest, &mes_events("wan2", 300, 3)).await.0,
        202
    );
    // A quiet spell: nothing may pass the cut connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.receiver.verdict().unique_ids, 0);

    proxy.delay(Duration::from_millis(20));
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 600).await);
    let v = h.receiver.verdict();
    assert_eq!((v.unique_ids, v.out_of_order, v.missing), (600, 0, 0));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_events_per_sec_caps_the_drain_after_an_outage() {
    let h = Harness::new().await;
    h.receiver.stop().await;
    let a = agent::start(&h.config("max_events_per_sec = 200"))
        .await
        .unwrap();
    let client = http_client();
    assert_eq!(
        post(&client, &ingest_url(&a), &mes_events("rate", 600, 2))
            .await
            .0,
        202
    );
    h.receiver.restart().await.unwrap();
    let start = tokio::time::Instant::now();
    assert!(h.receiver.wait_until(WAIT, |s| s.unique_ids >= 600).await);
    let took = start.elapsed();
    // One second of burst, then 200/s: 600 events need about 2 s.
    assert!(
        took >= Duration::from_millis(1500),
        "drained 600 in {took:?}"
    );
    a.shutdown().await;
}
