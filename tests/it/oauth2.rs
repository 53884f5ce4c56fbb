//! OAuth2 client credentials on the HTTPS sink, against a token endpoint
//! and an upstream that checks the tokens it issued, both real HTTPS
//! servers on the project's server stack (axum on rustls) in this process.
//! The agent runs whole: events go in over HTTP ingest and must all arrive,
//! in order, with no dead letters and no token fetch per batch, through
//! expiring tokens, a revoked token, a token endpoint refusing the client
//! and one that is down, and neither the secret nor a token may appear in
//! a log line, the status or the metrics. The ingest requests' trace
//! context reaches the upstream on every event.

use crate::support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum_server::tls_rustls::RustlsConfig;
use base64::Engine as _;
use plantrelay::agent::{self, RunningAgent};
use serde_json::{Value, json};
use support::agent::{Harness, http_client, mes_events};
use support::upstream::until_within as until;

const CLIENT_ID: &str = "gw-test:01";
const SECRET: &str = "s3cret-Value&with=odd chars";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// What the token endpoint answers.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// Tokens living this many seconds.
    Issue(u64),
    /// `400 {"error":"invalid_client"}`.
    InvalidClient,
    /// `503` with `Retry-After: 1`.
    Unavailable,
}

struct Idp {
    mode: Mutex<Mode>,
    /// Token requests, and those that were well formed and authenticated.
    requests: AtomicU64,
    issued: AtomicU64,
    /// Token → valid until.
    tokens: Mutex<HashMap<String, Instant>>,
    /// Event ids the upstream accepted, in arrival order.
    received: Mutex<Vec<String>>,
    batches: AtomicU64,
    unauthorized: AtomicU64,
    /// A request that was not what RFC 6749 §4.4 asks for.
    bad_requests: Mutex<Vec<String>>,
    /// How long the token endpoint takes to answer, in ms.
    delay_ms: AtomicU64,
}

fn form(body: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect()
}

async fn token(State(idp): State<Arc<Idp>>, headers: HeaderMap, body: String) -> Response {
    idp.requests.fetch_add(1, Ordering::SeqCst);
    let delay = idp.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        // A slow endpoint: the condition under test, not a wait.
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let f = form(&body);
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let expected = format!(
        "{}:{}",
        url::form_urlencoded::byte_serialize(CLIENT_ID.as_bytes()).collect::<String>(),
        url::form_urlencoded::byte_serialize(SECRET.as_bytes()).collect::<String>()
    );
    let ok = headers
        .get("content-type")
        .is_some_and(|v| v == "application/x-www-form-urlencoded")
        && f.get("grant_type").map(String::as_str) == Some("client_credentials")
        && f.get("scope").map(String::as_str) == Some("events.write audit")
        && basic.as_deref() == Some(expected.as_str());
    if !ok {
        idp.bad_requests
            .lock()
            .unwrap()
            .push(format!("{headers:?} {body}"));
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_request"})),
        )
            .into_response();
    }
    let mode = *idp.mode.lock().unwrap();
    match mode {
        Mode::Issue(secs) => {
            let n = idp.issued.fetch_add(1, Ordering::SeqCst) + 1;
            let token = format!("tok-{n}-{}", rand::random::<u64>());
            idp.tokens
                .lock()
                .unwrap()
                .insert(token.clone(), Instant::now() + Duration::from_secs(secs));
            axum::Json(json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": secs,
                "scope": "events.write audit",
            }))
            .into_response()
        }
        Mode::InvalidClient => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({
                "error": "invalid_client",
                "error_description": "client authentication failed",
            })),
        )
            .into_response(),
        Mode::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            "maintenance",
        )
            .into_response(),
    }
}

async fn events(State(idp): State<Arc<Idp>>, headers: HeaderMap, body: String) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let valid = bearer.is_some_and(|t| {
        idp.tokens
            .lock()
            .unwrap()
            .get(&t)
            .is_some_and(|until| Instant::now() < *until)
    });
    if !valid {
        idp.unauthorized.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer error=\"invalid_token\"")],
        )
            .into_response();
    }
    let batch: Vec<Value> = serde_json::from_str(&body).unwrap();
    idp.batches.fetch_add(1, Ordering::SeqCst);
    let mut received = idp.received.lock().unwrap();
    for e in batch {
        // The trace context of the ingest request, forwarded unchanged.
        if e["traceparent"] != TRACEPARENT || e["tracestate"] != "mes=1" {
            idp.bad_requests
                .lock()
                .unwrap()
                .push(format!("trace context lost: {e}"));
        }
        received.push(e["id"].as_str().unwrap().to_owned());
    }
    StatusCode::OK.into_response()
}

async fn start_idp(h: &Harness) -> (Arc<Idp>, SocketAddr) {
    let idp = Arc::new(Idp {
        mode: Mutex::new(Mode::Issue(2)),
        requests: AtomicU64::new(0),
        issued: AtomicU64::new(0),
        tokens: Mutex::new(HashMap::new()),
        received: Mutex::new(Vec::new()),
        batches: AtomicU64::new(0),
        unauthorized: AtomicU64::new(0),
        bad_requests: Mutex::new(Vec::new()),
        delay_ms: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/oauth2/token", post(token))
        .route("/v1/events", post(events))
        .with_state(idp.clone());
    let tls = RustlsConfig::from_pem(
        h.pki.server_cert_pem().as_bytes().to_vec(),
        h.pki.server_key_pem().as_bytes().to_vec(),
    )
    .await
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = axum_server::from_tcp_rustls(listener, tls).unwrap();
    tokio::spawn(async move { server.serve(app.into_make_service()).await });
    (idp, addr)
}

fn sink_status(a: &RunningAgent) -> Value {
    let report = serde_json::to_value(a.view.status()).unwrap();
    report["sinks"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_cached_renewed_and_refetched_after_a_401_and_a_failing_endpoint_holds_the_backlog()
 {
    support::logs::debug();
    let h = Harness::new().await;
    let (idp, addr) = start_idp(&h).await;
    let secret_file = h.dir.path().join("oauth2.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let sink_extra = format!(
        "compression = \"none\"\nbatch_linger = \"0s\"\nbatch_max_events = 20\n\n\
         [sinks.https.oauth2]\ntoken_url = \"https://{addr}/oauth2/token\"\n\
         client_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\n\
         scopes = [\"events.write\", \"audit\"]\n",
        secret_file.display()
    );
    let text = h.config_text(
        "127.0.0.1:0",
        &format!("https://{addr}/v1/events"),
        &sink_extra,
        "",
    );
    let config = plantrelay::config::Config::load(&h.write_config(&text)).unwrap();
    let a = agent::start(&config).await.unwrap();
    let ingest = format!("http://{}/v1/events", a.http_addrs[0].1);
    let client = http_client();
    let mut sent: Vec<String> = Vec::new();
    let post = async |sent: &mut Vec<String>, prefix: &str, n: usize| {
        for chunk in mes_events(prefix, n, 1).chunks(10) {
            let resp = client
                .post(&ingest)
                .header("content-type", "application/cloudevents-batch+json")
                .header("traceparent", TRACEPARENT)
                .header("tracestate", "mes=1")
                .body(Value::Array(chunk.to_vec()).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 202);
            sent.extend(chunk.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        }
    };

    // 1. Tokens that live 2 s, over about 5 s of traffic: renewed ahead of
    // expiry (no 401), one fetch per token life, not per batch.
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(5) {
        round += 1;
        post(&mut sent, &format!("a{round}"), 20).await;
        // Traffic paced like a plant's (the subject here is time).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = || idp.received.lock().unwrap().len();
    let n = sent.len();
    until("the first phase delivered", Duration::from_secs(20), || {
        delivered() == n
    })
    .await;
    let batches = idp.batches.load(Ordering::SeqCst);
    let fetches = idp.issued.load(Ordering::SeqCst);
    assert_eq!(
        idp.unauthorized.load(Ordering::SeqCst),
        0,
        "renewed before expiry"
    );
    assert!(
        (3..=6).contains(&fetches),
        "{fetches} token fetches for {batches} batches over 5 s of 2 s tokens"
    );
    assert!(
        batches >= 3 * fetches,
        "{batches} batches, {fetches} fetches"
    );
    let s = sink_status(&a);
    assert_eq!(s["oauth2"]["fetches"], fetches, "{s}");
    assert!(s["oauth2"]["valid_until"].is_string(), "{s}");
    assert!(s["oauth2"]["last_error"].is_null(), "{s}");

    // 2. Long tokens from now on (the short ones revoked, so the sink holds
    // a long one after the next batch); then the upstream revokes that one
    // too: the next batch gets 401, the sink renews once and sends it again.
    *idp.mode.lock().unwrap() = Mode::Issue(3600);
    idp.tokens.lock().unwrap().clear();
    post(&mut sent, "b", 10).await;
    let n = sent.len();
    until("the long token in use", Duration::from_secs(20), || {
        delivered() == n
    })
    .await;
    let before = idp.issued.load(Ordering::SeqCst);
    let refused = idp.unauthorized.load(Ordering::SeqCst);
    idp.tokens.lock().unwrap().clear();
    post(&mut sent, "c", 10).await;
    let n = sent.len();
    until("delivery after the 401", Duration::from_secs(20), || {
        delivered() == n
    })
    .await;
    assert_eq!(
        idp.unauthorized.load(Ordering::SeqCst),
        refused + 1,
        "one 401, then a new token"
    );
    assert_eq!(idp.issued.load(Ordering::SeqCst), before + 1);

    // 3. The token endpoint refuses the client (revoked credentials), then
    // is down: nothing is dead-lettered, the backlog waits, the status says
    // why; once it issues tokens again, everything arrives.
    for mode in [Mode::InvalidClient, Mode::Unavailable] {
        *idp.mode.lock().unwrap() = mode;
        idp.tokens.lock().unwrap().clear();
        let requests = idp.requests.load(Ordering::SeqCst);
        post(&mut sent, &format!("d-{mode:?}"), 30).await;
        until("the sink to retry", Duration::from_secs(20), || {
            idp.requests.load(Ordering::SeqCst) >= requests + 3
        })
        .await;
        let s = sink_status(&a);
        let why = s["oauth2"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match mode {
            Mode::InvalidClient => assert!(
                why.contains("error invalid_client (client authentication failed)")
                    && why.contains("check client_id"),
                "{why}"
            ),
            _ => assert!(why.contains("503"), "{why}"),
        }
        assert!(
            s["last_error"]
                .as_str()
                .unwrap()
                .contains("OAuth2 token endpoint"),
            "{s}"
        );
        assert_eq!(s["dead_letters"], 0, "{s}");
        assert!(s["backlog_events"].as_u64().unwrap() > 0, "{s}");
        *idp.mode.lock().unwrap() = Mode::Issue(3600);
        let n = sent.len();
        until(
            "delivery after the endpoint recovered",
            Duration::from_secs(30),
            || delivered() == n,
        )
        .await;
    }
    let s = sink_status(&a);
    assert!(
        s["oauth2"]["last_error"].is_null(),
        "cleared by a success: {s}"
    );
    assert_eq!(s["dead_letters"], 0);

    // Everything, once, in order (one stream).
    assert_eq!(*idp.received.lock().unwrap(), sent);
    assert!(
        idp.bad_requests.lock().unwrap().is_empty(),
        "{:?}",
        idp.bad_requests.lock().unwrap()
    );

    // Neither the secret nor any token anywhere.
    let status = serde_json::to_string(&a.view.status()).unwrap();
    let metrics = plantrelay::health::metrics::render(&a.view.status());
    a.shutdown().await;
    let logs = support::logs::text();
    support::logs::info();
    assert!(
        logs.contains("cannot get an access token"),
        "the failure is logged"
    );
    for (what, text) in [("logs", &logs), ("status", &status), ("metrics", &metrics)] {
        assert!(!text.contains(SECRET), "the secret is in the {what}");
        assert!(!text.contains("tok-"), "a token is in the {what}");
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            url::form_urlencoded::byte_serialize(CLIENT_ID.as_bytes()).collect::<String>(),
            url::form_urlencoded::byte_serialize(SECRET.as_bytes()).collect::<String>()
        ));
        assert!(
            !text.contains(&basic),
            "the Basic credentials are in the {what}"
        );
    }
}

/// However many batches need a token at once, the endpoint is asked once;
/// the token is then served from the cache until it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fetch_serves_every_waiting_batch() {
    use plantrelay::config::{OAuth2AuthMethod, OAuth2Config};
    use plantrelay::sinks::oauth2::OAuth2;
    let h = Harness::new().await;
    let (idp, addr) = start_idp(&h).await;
    *idp.mode.lock().unwrap() = Mode::Issue(3600);
    idp.delay_ms.store(300, Ordering::SeqCst);
    let secret_file = h.dir.path().join("oauth2.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let cfg = OAuth2Config {
        token_url: format!("https://{addr}/oauth2/token").parse().unwrap(),
        client_id: CLIENT_ID.into(),
        client_secret_file: secret_file,
        scopes: vec!["events.write".into(), "audit".into()],
        auth_method: OAuth2AuthMethod::Basic,
    };
    let tls = plantrelay::tls::client_config(&h.paths.client_tls(false)).unwrap();
    let client = plantrelay::tls::reqwest_client_builder(tls)
        .build()
        .unwrap();
    let oauth = Arc::new(OAuth2::new(&cfg, client).unwrap());
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let o = oauth.clone();
            tokio::spawn(async move { o.header().await.unwrap() })
        })
        .collect();
    let mut headers = Vec::new();
    for t in tasks {
        headers.push(t.await.unwrap());
    }
    assert_eq!(
        idp.requests.load(Ordering::SeqCst),
        1,
        "one fetch for 20 waiting batches"
    );
    assert!(headers.iter().all(|h| h == &headers[0]));
    assert!(headers[0].0.is_sensitive());
    for _ in 0..100 {
        assert_eq!(oauth.header().await.unwrap(), headers[0]);
    }
    assert_eq!(
        idp.requests.load(Ordering::SeqCst),
        1,
        "served from the cache"
    );
    // Refusing an older generation keeps the newer token.
    oauth.refused(headers[0].1 - 1).await;
    assert_eq!(oauth.header().await.unwrap(), headers[0]);
    oauth.refused(headers[0].1).await;
    assert_ne!(oauth.header().await.unwrap(), headers[0]);
    assert_eq!(idp.requests.load(Ordering::SeqCst), 2);
    assert_eq!(oauth.state().fetches, 2);
}
