//! The OPC UA source against a real async-opcua server in process (the
//! simulated press, `plantrelay::demo::press`, on 127.0.0.1): typed data
//! changes and state names, a server restart that moves the namespace index,
//! a server that stops publishing, SignAndEncrypt with an untrusted server
//! certificate, and 1,000 monitored items.

use crate::support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use plantrelay::agent::{self};
use plantrelay::event::StoredEvent;
use plantrelay::sources::opcua::{DATA_CHANGE_EVENT_TYPE, pki};
use plantrelay::status::SourceStatus;
use serde_json::Value;
use support::agent::{Harness, source_status, wait_connected};
use support::fault_proxy::FaultProxy;
use support::opcua_server::*;

const WAIT: Duration = Duration::from_secs(60);
/// The publish watchdog window of `press_source_toml`:
/// publishing_interval × (keep_alive_count + 2) + max(0.5 s, half of
/// publishing_interval × keep_alive_count).
const KEEP_ALIVE_WINDOW: Duration = Duration::from_millis(1900);

fn data(e: &StoredEvent) -> Value {
    serde_json::from_slice(&e.data).unwrap()
}

fn node_is(e: &StoredEvent, name: &str) -> bool {
    data(e)["node_id"] == Value::String(press_node(name))
}

fn is_resync(e: &StoredEvent) -> bool {
    data(e)["resync"] == Value::Bool(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_arrive_typed_with_state_names_and_are_delivered() {
    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.tick = Duration::from_millis(100);
    let press = SimPress::start(&opts).await.unwrap();
    let cfg = h.config_with_sources(&press_source_toml("press", &press.endpoint(), NO_SECURITY));
    let a = agent::start(&cfg).await.unwrap();
    let st = source_status(&a, "press");
    assert!(
        wait_connected(&st, true, WAIT).await.is_some(),
        "{:?}",
        st.snapshot()
    );

    let events = h
        .wait_journal(Some("press"), WAIT, |ev| {
            ev.iter().filter(|e| node_is(e, "Counter")).count() >= 20
                && ev.iter().filter(|e| node_is(e, "State")).count() >= 3
        })
        .await;
    let counters: Vec<u64> = events
        .iter()
        .filter(|e| node_is(e, "Counter") && !is_resync(e))
        .map(|e| data(e)["value"].as_u64().expect("UInt64 as a JSON integer"))
        .collect();
    assert!(counters.len() >= 15, "{counters:?}");
    // Every change, in order, none lost (queue_size 10 > changes per publish).
    for w in counters.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "counter values lost or reordered: {counters:?}"
        );
    }
    for e in events.iter().filter(|e| node_is(e, "Temperature")) {
        let d = data(e);
        assert!(d["value"].is_f64(), "{d}");
        assert_eq!(e.stream, "line1/press/temperature");
    }
    let names = ["STOPPED", "RUNNING", "FAULT"];
    let mut states_seen = HashSet::new();
    for e in events.iter().filter(|e| node_is(e, "State")) {
        let d = data(e);
        let v = d["value"].as_i64().expect("Int32 as a JSON integer");
        assert_eq!(d["state"], Value::String(names[v as usize].into()), "{d}");
        states_seen.insert(v);
    }
    assert!(states_seen.len() >= 2, "{states_seen:?}");
    for e in &events {
        let d = data(e);
        assert_eq!(e.event_type, DATA_CHANGE_EVENT_TYPE);
        assert_eq!(d["status_code"], "Good");
        assert_eq!(
            d["display_name"].as_str().map(|s| !s.is_empty()),
            Some(true)
        );
        assert!(
            d["source_timestamp"].as_str().unwrap().ends_with('Z'),
            "{d}"
        );
        assert!(d["server_timestamp"].is_string(), "{d}");
        assert_eq!(e.source_time.as_deref(), d["source_timestamp"].as_str());
    }
    // The start-up snapshot: one resync event per node, at most.
    let resync = events.iter().filter(|e| is_resync(e)).count();
    assert!((1..=3).contains(&resync), "resync events: {resync}");
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), events.len(), "ids are unique per change");

    // Delivered upstream, in order and complete.
    let n = events.len();
    assert!(
        h.receiver.wait_for(n, WAIT).await,
        "{:?}",
        h.receiver.stats()
    );
    assert!(
        h.receiver.verdict().is_complete_and_ordered(),
        "{:?}",
        h.receiver.verdict()
    );
    a.shutdown().await;
    press.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_moves_the_namespace_index_is_recovered_via_nsu_with_one_resync() {
    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.tick = Duration::from_millis(100);
    let press = SimPress::start(&opts).await.unwrap();
    let first_ns = press.namespace_index();
    let cfg = h.config_with_sources(&press_source_toml("press", &press.endpoint(), NO_SECURITY));
    let a = agent::start(&cfg).await.unwrap();
    let st = source_status(&a, "press");
    h.wait_journal(Some("press"), WAIT, |ev| {
        ev.iter().filter(|e| node_is(e, "Counter")).count() >= 5
    })
    .await;

    // Stop, then start on the same port with another namespace first.
    opts.port = press.addr().port();
    press.stop().await;
    assert!(
        wait_connected(&st, false, WAIT).await.is_some(),
        "loss not noticed"
    );
    // Everything before this is the old server's.
    let at_loss = h.source_events("press").len();
    opts.reorder = true;
    let press = SimPress::start(&opts).await.unwrap();
    let up = Instant::now();
    assert_ne!(
        press.namespace_index(),
        first_ns,
        "the test must move the index"
    );

    // Events of the new server: its session's snapshot, then counter values
    // from 1. The old session's last data changes may reach the journal
    // after the loss was noticed, but before that snapshot.
    let new_session = |ev: &[StoredEvent]| {
        ev[at_loss.min(ev.len())..]
            .iter()
            .position(is_resync)
            .map(|p| at_loss + p)
    };
    let events = h
        .wait_journal(Some("press"), WAIT, |ev| {
            new_session(ev).is_some_and(|start| {
                ev[start..]
                    .iter()
                    .any(|e| node_is(e, "Counter") && !is_resync(e))
            })
        })
        .await;
    let before = new_session(&events).unwrap();
    let recovery = up.elapsed();
    println!(
        "OPC UA restart recovery: first data change {} ms after the server was back (keep-alive window {} ms)",
        recovery.as_millis(),
        KEEP_ALIVE_WINDOW.as_millis()
    );
    assert!(
        recovery <= KEEP_ALIVE_WINDOW * 2,
        "events resumed after {recovery:?}, more than 2 × keep-alive"
    );
    let after = &events[before..];
    assert!(st.connected.load(Ordering::Relaxed));
    let resync: Vec<&StoredEvent> = after.iter().filter(|e| is_resync(e)).collect();
    let resync_nodes: HashSet<String> = resync
        .iter()
        .map(|e| data(e)["node_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        resync.len(),
        3,
        "one resync snapshot of the 3 nodes: {resync:?}"
    );
    assert_eq!(resync_nodes.len(), 3);
    // Resync precedes the new data changes in the journal.
    let first_change = after.iter().position(|e| !is_resync(e)).unwrap();
    assert!(after[..first_change].iter().all(is_resync));
    assert!(st.snapshot().bad_nodes.is_empty(), "{:?}", st.snapshot());
    a.shutdown().await;
    press.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_publishing_is_detected_within_the_keep_alive_window() {
    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.tick = Duration::from_millis(100);
    let press = SimPress::start(&opts).await.unwrap();
    let proxy = FaultProxy::start(press.addr()).await;
    let endpoint = format!("opc.tcp://127.0.0.1:{}/", proxy.addr().port());
    let cfg = h.config_with_sources(&press_source_toml("press", &endpoint, NO_SECURITY));
    let a = agent::start(&cfg).await.unwrap();
    let st = source_status(&a, "press");
    h.wait_journal(Some("press"), WAIT, |ev| ev.len() >= 10)
        .await;
    assert!(st.connected.load(Ordering::Relaxed));

    // TCP stays up, nothing is answered any more.
    proxy.blackhole();
    let detected = wait_connected(&st, false, WAIT)
        .await
        .expect("never detected");
    println!(
        "OPC UA silent server detected after {} ms (keep-alive window {} ms)",
        detected.as_millis(),
        KEEP_ALIVE_WINDOW.as_millis()
    );
    assert!(
        detected <= KEEP_ALIVE_WINDOW * 2,
        "detected after {detected:?}"
    );
    let err = st.snapshot().last_error.unwrap_or_default();
    assert!(
        err.contains("stopped publishing") || err.contains("lost"),
        "{err}"
    );

    let before = h.source_events("press").len();
    proxy.pass();
    let back = Instant::now();
    assert!(wait_connected(&st, true, WAIT).await.is_some());
    let events = h
        .wait_journal(Some("press"), WAIT, |ev| ev.len() > before + 5)
        .await;
    assert!(events.len() > before + 5);
    println!(
        "OPC UA reconnected {} ms after the link came back",
        back.elapsed().as_millis()
    );
    a.shutdown().await;
    press.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_server_certificate_is_rejected_until_trusted() {
    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.secure = true;
    opts.tick = Duration::from_millis(100);
    let press = SimPress::start(&opts).await.unwrap();
    let cfg = h.config_with_sources(&press_source_toml(
        "press",
        &press.endpoint(),
        "security_policy = \"Basic256Sha256\"\nsecurity_mode = \"SignAndEncrypt\"",
    ));
    let a = agent::start(&cfg).await.unwrap();
    let st = source_status(&a, "press");
    let pki_dir = pki::source_dir(&h.state_dir(), "press");
    let deadline = Instant::now() + WAIT;
    let rejected = loop {
        let r = pki::list(&pki_dir, "rejected").unwrap();
        if !r.is_empty() || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        rejected.len(),
        1,
        "the server certificate lands in rejected/"
    );
    assert_eq!(
        rejected[0].sha256,
        server_cert_sha256(&opts.pki_dir).unwrap()
    );
    // A quiet spell: no session with an untrusted server, no data.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!st.connected.load(Ordering::Relaxed));
    assert!(
        h.source_events("press").is_empty(),
        "nothing from an untrusted server"
    );
    let err = st.snapshot().last_error.unwrap_or_default();
    assert!(err.contains("not trusted"), "{err}");

    // Plant IT checks the fingerprint and trusts it.
    pki::trust(&pki_dir, &rejected[0]).unwrap();
    assert!(
        wait_connected(&st, true, WAIT).await.is_some(),
        "{:?}",
        st.snapshot()
    );
    let events = h
        .wait_journal(Some("press"), WAIT, |ev| ev.len() >= 5)
        .await;
    assert!(events.len() >= 5);
    assert!(pki::list(&pki_dir, "rejected").unwrap().is_empty());
    assert!(pki_dir.join("own/cert.der").exists());
    assert!(pki_dir.join("private/private.pem").exists());
    a.shutdown().await;
    press.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_items_changing_every_100ms_are_all_journaled() {
    every_change_of_many_items_is_journaled(1000, 30, None, None).await;
}

/// 3,000 items change in one tick: one publish response with all of them
/// (~80 KB) would exceed the server's max message size of 64 KiB, and the
/// server would drop it (BadResponseTooLarge). The source asks for at most
/// 1,000 notifications per response, so every change arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_changes_per_cycle_than_one_publish_response_holds_are_all_journaled() {
    every_change_of_many_items_is_journaled(3000, 5, Some(64 * 1024), None).await;
}

/// A server that takes at most 100 nodes per Read and 100 monitored items
/// per CreateMonitoredItems (its OperationLimits) refuses larger calls as a
/// whole; the source sizes its requests from those limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_sized_to_the_server_operation_limits() {
    every_change_of_many_items_is_journaled(450, 3, None, Some(100)).await;
}

async fn every_change_of_many_items_is_journaled(
    items: usize,
    ticks: u64,
    max_message_size: Option<usize>,
    operation_limit: Option<usize>,
) {
    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.tick = Duration::from_millis(100);
    opts.load_items = items;
    opts.max_ticks = Some(ticks);
    opts.max_message_size = max_message_size;
    opts.operation_limit = operation_limit;
    // The press starts paused: the agent must see every change, so the
    // changes begin once it has subscribed.
    opts.paused = true;
    let press = SimPress::start(&opts).await.unwrap();
    let mut nodes = String::new();
    for i in 0..items {
        nodes.push_str(&format!(
            "\n[[sources.opcua.nodes]]\nnode_id = \"{}\"\nstream = \"load/{}\"\nsampling_interval = \"0s\"\nqueue_size = 20\n",
            load_node(i),
            i % 10
        ));
    }
    let src = format!(
        "\n[[sources.opcua]]\nname = \"load\"\nendpoint = \"{}\"\n{NO_SECURITY}\npublishing_interval = \"200ms\"\nkeep_alive_count = 10\nlifetime_count = 30\n{nodes}",
        press.endpoint()
    );
    let cfg = h.config_with_sources(&src);
    let a = agent::start(&cfg).await.unwrap();
    let st = source_status(&a, "load");
    assert!(
        wait_connected(&st, true, WAIT).await.is_some(),
        "{:?}",
        st.snapshot()
    );
    let t0 = Instant::now();
    press.resume();
    let events = h
        .wait_journal(Some("load"), Duration::from_secs(120), |ev| {
            ev.iter()
                .filter(|e| data(e)["value"].as_u64() == Some(ticks))
                .count()
                >= items
        })
        .await;
    let elapsed = t0.elapsed();
    let mut per_item: BTreeMap<String, HashSet<u64>> = BTreeMap::new();
    for e in events.iter().filter(|e| !is_resync(e)) {
        let d = data(e);
        per_item
            .entry(d["node_id"].as_str().unwrap().to_owned())
            .or_default()
            .insert(d["value"].as_u64().unwrap());
    }
    let complete = per_item
        .values()
        .filter(|vals| (1..=ticks).all(|v| vals.contains(&v)))
        .count();
    println!(
        "OPC UA load: {} data changes of {items} items journaled in {} ms",
        events.len(),
        elapsed.as_millis()
    );
    let missing: Vec<(String, Vec<u64>)> = per_item
        .iter()
        .filter(|(_, vals)| !(1..=ticks).all(|v| vals.contains(&v)))
        .take(5)
        .map(|(k, vals)| {
            (
                k.clone(),
                (1..=ticks).filter(|v| !vals.contains(v)).collect(),
            )
        })
        .collect();
    assert_eq!(
        per_item.len(),
        items,
        "every item reported: {:?}",
        st.snapshot()
    );
    assert_eq!(
        complete, items,
        "items with every change journaled; e.g. missing {missing:?}"
    );
    assert_eq!(
        events.iter().filter(|e| !is_resync(e)).count(),
        items * ticks as usize,
        "exactly one event per change"
    );
    let snap = st.snapshot();
    assert!(snap.last_error.is_none(), "{:?}", snap.last_error);
    assert!(snap.bad_nodes.is_empty(), "{:?}", snap.bad_nodes);
    a.shutdown().await;
    press.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_node_is_shown_and_retried_without_blocking_the_others() {
    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.tick = Duration::from_millis(100);
    let press = SimPress::start(&opts).await.unwrap();
    let missing = press_node("Mode");
    let extra_node = format!(
        "\n[[sources.opcua.nodes]]\nnode_id = \"{missing}\"\nstream = \"line1/press/mode\"\n"
    );
    let unknown_ns =
        "\n[[sources.opcua.nodes]]\nnode_id = \"nsu=urn:nowhere;s=X\"\nstream = \"line1/x\"\n";
    let text =
        press_source_toml("press", &press.endpoint(), NO_SECURITY) + &extra_node + unknown_ns;
    let cfg = h.config_with_sources(&text);
    let a = agent::start(&cfg).await.unwrap();
    let st = source_status(&a, "press");
    assert!(wait_connected(&st, true, WAIT).await.is_some());
    let events = h
        .wait_journal(Some("press"), WAIT, |ev| {
            ev.iter().filter(|e| node_is(e, "Counter")).count() >= 5
        })
        .await;
    assert!(events.iter().filter(|e| node_is(e, "Counter")).count() >= 5);
    let bad = st.snapshot().bad_nodes;
    assert_eq!(bad.len(), 2, "{bad:?}");
    let mode = bad
        .iter()
        .find(|b| b.node_id == missing)
        .expect("missing node listed");
    assert!(mode.status.contains("BadNodeIdUnknown"), "{mode:?}");
    let nowhere = bad
        .iter()
        .find(|b| b.node_id == "nsu=urn:nowhere;s=X")
        .unwrap();
    assert!(
        nowhere.status.contains("BadNamespaceUnknown"),
        "{nowhere:?}"
    );

    // The node appears on the server: the retry picks it up.
    press.add_node("Mode", 3);
    let deadline = Instant::now() + WAIT;
    while st.snapshot().bad_nodes.len() != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(st.snapshot().bad_nodes.len(), 1, "{:?}", st.snapshot());
    let events = h
        .wait_journal(Some("press"), WAIT, |ev| {
            ev.iter().any(|e| node_is(e, "Mode"))
        })
        .await;
    let mode_event = events
        .iter()
        .find(|e| node_is(e, "Mode"))
        .expect("Mode journaled");
    assert_eq!(data(mode_event)["value"], 3);
    assert!(st.connected.load(Ordering::Relaxed));
    a.shutdown().await;
    press.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_turns_bad_on_the_live_subscription_is_listed_until_good_again() {
    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.tick = Duration::from_millis(100);
    let press = SimPress::start(&opts).await.unwrap();
    press.add_node("Mode", 3);
    let mode = press_node("Mode");
    let text = press_source_toml("press", &press.endpoint(), NO_SECURITY)
        + &format!(
            "\n[[sources.opcua.nodes]]\nnode_id = \"{mode}\"\nstream = \"line1/press/mode\"\nsampling_interval = \"0s\"\n"
        );
    let cfg = h.config_with_sources(&text);
    let a = agent::start(&cfg).await.unwrap();
    let st = source_status(&a, "press");
    assert!(wait_connected(&st, true, WAIT).await.is_some());
    // Its start-up value (the resync snapshot; the subscription's initial
    // value is the same change, a journal duplicate).
    let events = h
        .wait_journal(Some("press"), WAIT, |ev| {
            ev.iter().any(|e| node_is(e, "Mode"))
        })
        .await;
    assert!(events.iter().any(|e| node_is(e, "Mode")));
    assert!(st.snapshot().bad_nodes.is_empty(), "{:?}", st.snapshot());

    // The tag goes away on the server: its monitored item reports it.
    press.set_node("Mode", 0, opcua::types::StatusCode::BadNodeIdUnknown);
    let deadline = Instant::now() + WAIT;
    while st.snapshot().bad_nodes.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bad = st.snapshot().bad_nodes;
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].node_id, mode);
    assert!(bad[0].status.contains("BadNodeIdUnknown"), "{bad:?}");
    // The bad value itself is journaled with its status, and the other
    // nodes go on.
    let events = h
        .wait_journal(Some("press"), WAIT, |ev| {
            ev.iter()
                .any(|e| node_is(e, "Mode") && data(e)["status_code"] == "BadNodeIdUnknown")
        })
        .await;
    let last_counter = events.iter().filter(|e| node_is(e, "Counter")).count();
    h.wait_journal(Some("press"), WAIT, |ev| {
        ev.iter().filter(|e| node_is(e, "Counter")).count() > last_counter + 3
    })
    .await;
    assert_eq!(st.snapshot().bad_nodes.len(), 1);
    assert!(st.connected.load(Ordering::Relaxed));

    // Back: a good value clears it.
    press.set_node("Mode", 4, opcua::types::StatusCode::Good);
    let deadline = Instant::now() + WAIT;
    while !st.snapshot().bad_nodes.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(st.snapshot().bad_nodes.is_empty(), "{:?}", st.snapshot());
    let events = h
        .wait_journal(Some("press"), WAIT, |ev| {
            ev.iter()
                .any(|e| node_is(e, "Mode") && data(e)["value"] == 4)
        })
        .await;
    let back = events
        .iter()
        .find(|e| node_is(e, "Mode") && data(e)["value"] == 4)
        .expect("the good value is journaled");
    assert_eq!(data(back)["status_code"], "Good");
    a.shutdown().await;
    press.stop().await;
}

/// `security_policy`/`security_mode` lines with the press certificate pinned.
fn secure(policy: &str, mode: &str, pki_dir: &std::path::Path) -> String {
    format!(
        "security_policy = \"{policy}\"\nsecurity_mode = \"{mode}\"\nserver_cert_sha256 = \"{}\"",
        server_cert_sha256(pki_dir).unwrap()
    )
}

async fn wait_error(s: &SourceStatus, contains: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let err = s.snapshot().last_error.unwrap_or_default();
        if err.contains(contains) || Instant::now() > deadline {
            return err;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_policies_with_sign_and_encrypt_connect_and_deliver() {
    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.secure = true;
    opts.tick = Duration::from_millis(100);
    let press = SimPress::start(&opts).await.unwrap();
    let text = press_source_toml(
        "aes128",
        &press.endpoint(),
        &secure("Aes128_Sha256_RsaOaep", "SignAndEncrypt", &opts.pki_dir),
    ) + &press_source_toml(
        "aes256",
        &press.endpoint(),
        &secure("Aes256_Sha256_RsaPss", "SignAndEncrypt", &opts.pki_dir),
    );
    let cfg = h.config_with_sources(&text);
    let a = agent::start(&cfg).await.unwrap();
    for name in ["aes128", "aes256"] {
        let st = source_status(&a, name);
        assert!(
            wait_connected(&st, true, WAIT).await.is_some(),
            "{name}: {:?}",
            st.snapshot()
        );
        let events = h
            .wait_journal(Some(name), WAIT, |ev| {
                ev.iter()
                    .filter(|e| node_is(e, "Counter") && !is_resync(e))
                    .count()
                    >= 3
            })
            .await;
        assert!(
            events.iter().filter(|e| node_is(e, "Counter")).count() >= 3,
            "{name}: {:?}",
            st.snapshot()
        );
    }
    a.shutdown().await;
    press.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_identities_password_and_certificate_are_accepted_and_a_wrong_password_reported() {
    use base64::Engine as _;
    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.secure = true;
    opts.tick = Duration::from_millis(100);
    opts.users = vec![("operator".into(), "s3cret pass".into())];
    // The X.509 user: the server knows its certificate (DER); the agent is
    // given it as PEM in a .crt file, as plant IT usually has it.
    let users = h.dir.path().join("users");
    std::fs::create_dir_all(&users).unwrap();
    let der_path = users.join("operator.der");
    let key_path = users.join("operator.key");
    let data = opcua::crypto::X509Data {
        key_size: 2048,
        common_name: "plantrelay test operator".into(),
        organization: "plantrelay".into(),
        organizational_unit: "test".into(),
        country: "DE".into(),
        state: "".into(),
        alt_host_names: opcua::crypto::X509Data::alt_host_names(
            "urn:plantrelay:test:operator",
            Some(vec!["localhost".into()]),
            false,
            false,
            false,
        ),
        certificate_duration_days: 30,
    };
    opcua::crypto::CertificateStore::create_certificate_and_key(&data, true, &der_path, &key_path)
        .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&der_path).unwrap());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    let crt_path = users.join("operator.crt");
    std::fs::write(&crt_path, pem).unwrap();
    opts.user_cert = Some(der_path);
    let press = SimPress::start(&opts).await.unwrap();

    let good = users.join("good.password");
    std::fs::write(&good, "s3cret pass\n").unwrap();
    let wrong = users.join("wrong.password");
    std::fs::write(&wrong, "guess\n").unwrap();
    let sec = secure("Basic256Sha256", "SignAndEncrypt", &opts.pki_dir);
    let text = press_source_toml(
        "password",
        &press.endpoint(),
        &format!(
            "{sec}\nusername = \"operator\"\npassword_file = \"{}\"",
            good.display()
        ),
    ) + &press_source_toml(
        "wrong-password",
        &press.endpoint(),
        &format!(
            "{sec}\nusername = \"operator\"\npassword_file = \"{}\"",
            wrong.display()
        ),
    ) + &press_source_toml(
        "certificate",
        &press.endpoint(),
        &format!(
            "{sec}\nuser_cert = \"{}\"\nuser_key = \"{}\"",
            crt_path.display(),
            key_path.display()
        ),
    );
    let cfg = h.config_with_sources(&text);
    let a = agent::start(&cfg).await.unwrap();
    for name in ["password", "certificate"] {
        let st = source_status(&a, name);
        assert!(
            wait_connected(&st, true, WAIT).await.is_some(),
            "{name}: {:?}",
            st.snapshot()
        );
        let events = h.wait_journal(Some(name), WAIT, |ev| ev.len() >= 5).await;
        assert!(events.len() >= 5, "{name}: {:?}", st.snapshot());
    }

    let st = source_status(&a, "wrong-password");
    let err = wait_error(&st, "refused the user identity").await;
    assert!(err.contains("refused the user identity"), "{err}");
    assert!(err.contains(&press.endpoint()), "{err}");
    // It keeps trying (a later attempt records the error again); nothing
    // is journaled and the other sources are unaffected.
    let first = st.snapshot().last_error_time;
    let deadline = Instant::now() + WAIT;
    while st.snapshot().last_error_time == first && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snap = st.snapshot();
    assert_ne!(snap.last_error_time, first, "no retry: {snap:?}");
    assert!(snap.started && !snap.connected, "{snap:?}");
    assert!(h.source_events("wrong-password").is_empty());
    assert!(
        source_status(&a, "password")
            .connected
            .load(Ordering::Relaxed)
    );
    a.shutdown().await;
    press.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_leaves_the_agent_running_and_the_source_disconnected() {
    let h = Harness::new().await;
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("opc.tcp://127.0.0.1:{port}/");
    let text = press_source_toml("press", &endpoint, NO_SECURITY);
    let cfg = h.config_with_sources(&text);
    let a = agent::start(&cfg).await.unwrap();
    let st = source_status(&a, "press");
    let deadline = Instant::now() + WAIT;
    while st.snapshot().last_error.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let snap = st.snapshot();
    assert!(snap.started && !snap.connected, "{snap:?}");
    let err = snap.last_error.unwrap_or_default();
    assert!(err.contains(&endpoint), "{err}");
    // The HTTP source still takes events.
    let url = format!("http://{}/v1/events", a.http_addr("mes").unwrap());
    let (code, _) = support::agent::post(
        &support::agent::http_client(),
        &url,
        &support::agent::mes_events("m", 3, 1),
    )
    .await;
    assert_eq!(code, 202);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_server_certificate_is_accepted_and_a_wrong_pin_refused() {
    let h = Harness::new().await;
    let mut opts = press_options(h.dir.path());
    opts.secure = true;
    opts.tick = Duration::from_millis(100);
    let press = SimPress::start(&opts).await.unwrap();
    let good = server_cert_sha256(&opts.pki_dir).unwrap();
    let wrong: String = good.chars().rev().collect();
    let sign = |pin: &str| {
        format!(
            "security_policy = \"Basic256Sha256\"\nsecurity_mode = \"Sign\"\nserver_cert_sha256 = \"{pin}\""
        )
    };
    let text = press_source_toml("pinned", &press.endpoint(), &sign(&good))
        + &press_source_toml("mispinned", &press.endpoint(), &sign(&wrong));
    let cfg = h.config_with_sources(&text);
    let a = agent::start(&cfg).await.unwrap();
    let pinned = source_status(&a, "pinned");
    let mispinned = source_status(&a, "mispinned");
    assert!(
        wait_connected(&pinned, true, WAIT).await.is_some(),
        "{:?}",
        pinned.snapshot()
    );
    let events = h
        .wait_journal(Some("pinned"), WAIT, |ev| ev.len() >= 5)
        .await;
    assert!(events.len() >= 5);
    let deadline = Instant::now() + WAIT;
    while mispinned.snapshot().last_error.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = mispinned.snapshot().last_error.unwrap_or_default();
    assert!(err.contains("does not match server_cert_sha256"), "{err}");
    assert!(!mispinned.connected.load(Ordering::Relaxed));
    assert!(h.source_events("mispinned").is_empty());
    a.shutdown().await;
    press.stop().await;
}
