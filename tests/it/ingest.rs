//! The HTTP ingest source (`POST /v1/events`) against a real journal in a
//! temporary directory, over real HTTP(S) on 127.0.0.1 with reqwest (and raw
//! TCP where a client must misbehave): what is answered, and what is — or is
//! not — in the journal afterwards.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::agent::{http_source_config, stop_source};
use plantrelay::config::HttpSourceConfig;
use plantrelay::config::SchemaConfig;
use plantrelay::demo::receiver::EphemeralPki;
use plantrelay::event::{Class, NewEvent, StoredEvent};
use plantrelay::journal::{Journal, JournalError, JournalOptions, SyncMode};
use plantrelay::schema::{Schema, Schemas};
use plantrelay::sources::http::{HttpSource, HttpSourceError};
use plantrelay::status::SourceStatus;
use plantrelay::tls;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const SINGLE: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";
const NDJSON: &str = "application/x-ndjson";
const TOKEN: &str = "mes-token-0123456789";

/// One running ingest source over a fresh journal.
struct Ingest {
    dir: tempfile::TempDir,
    journal: Journal,
    status: Arc<SourceStatus>,
    addr: SocketAddr,
    base: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), HttpSourceError>>,
    client: reqwest::Client,
}

struct Setup {
    dir: tempfile::TempDir,
    cfg: HttpSourceConfig,
    journal: JournalOptions,
    schemas: Arc<Schemas>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = JournalOptions::new(dir.path().join("journal.db"));
    journal.sinks = vec!["central".into()];
    Setup {
        dir,
        cfg: http_source_config(),
        journal,
        schemas: Arc::new(Schemas::default()),
    }
}

fn plain_client() -> reqwest::Client {
    tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

impl Setup {
    fn with_token(mut self) -> Setup {
        let path = self.dir.path().join("ingest.token");
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        self.cfg.token_file = Some(path);
        self
    }

    async fn start(self) -> Ingest {
        self.start_with_client(plain_client(), "http").await
    }

    async fn start_with_client(self, client: reqwest::Client, scheme: &str) -> Ingest {
        let journal = Journal::open(self.journal).unwrap();
        let source = HttpSource::bind(&self.cfg)
            .await
            .unwrap()
            .with_schemas(self.schemas);
        let addr = source.local_addr();
        assert_ne!(addr.port(), 0);
        let status = Arc::new(SourceStatus::new(&self.cfg.name, "http"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(source.serve(journal.clone(), status.clone(), stop.clone()));
        Ingest {
            dir: self.dir,
            journal,
            status,
            addr,
            base: format!("{scheme}://{addr}"),
            stop,
            task,
            client,
        }
    }
}

/// A parsed answer.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Ingest {
    fn url(&self) -> String {
        format!("{}/v1/events", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let resp = req.send().await.expect("request failed");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("answer {status} is not JSON ({e}): {text}"))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn post(&self, content_type: &str, body: impl Into<reqwest::Body>) -> Answer {
        self.send(
            self.client
                .post(self.url())
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    async fn post_json(&self, content_type: &str, body: &Value) -> Answer {
        self.post(content_type, body.to_string()).await
    }

    fn events(&self) -> Vec<StoredEvent> {
        self.journal
            .reader()
            .unwrap()
            .events_from(0, 1_000_000)
            .unwrap()
    }

    /// Cancels, checks that `serve` returned `Ok`, closes the journal.
    async fn finish(self) -> tempfile::TempDir {
        stop_source(&self.stop, self.task).await;
        self.journal.close().await;
        self.dir
    }
}

fn event(id: &str) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "urn:mes:hamburg",
        "type": "com.example.mes.confirmation",
        "subject": "line3/order-4711",
        "time": "2026-11-29T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"order": "4711", "qty": 5}
    })
}

fn batch(ids: impl IntoIterator<Item = String>) -> Value {
    Value::Array(ids.into_iter().map(|id| event(&id)).collect())
}

fn seqs(body: &Value) -> Vec<u64> {
    body["seqs"]
        .as_array()
        .unwrap_or_else(|| panic!("no seqs in {body}"))
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

fn attrs(e: &StoredEvent) -> Value {
    serde_json::from_str(e.attrs.as_deref().unwrap_or("{}")).unwrap()
}

fn assert_rejected(answer: &Answer, status: u16, reason: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    let error = answer.body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(reason),
        "expected {reason:?} in the error: {}",
        answer.body
    );
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 over TCP, for clients reqwest will not imitate.

/// Reads one response: status, the header block, the body (by Content-Length).
async fn read_response(stream: &mut (impl AsyncReadExt + Unpin)) -> (u16, String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.expect("read failed");
        assert!(
            n > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await.expect("read failed");
        assert!(n > 0, "connection closed in the middle of the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
    (status, head, body)
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---------------------------------------------------------------------------
// Accepted requests

#[tokio::test]
async fn a_single_cloudevent_is_acknowledged_with_seq_1_after_it_is_in_the_journal() {
    let ingest = setup().start().await;
    let answer = ingest
        .post_json(&format!("{SINGLE}; charset=utf-8"), &event("conf-1"))
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(
        answer.body,
        json!({"accepted": 1, "duplicates": 0, "seqs": [1]})
    );

    // The 202 came after the commit: a fresh reader sees the event now.
    let events = ingest.events();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.seq, 1);
    assert_eq!(e.stream_seq, 1);
    assert_eq!(e.source, "mes");
    assert_eq!(e.id, "conf-1");
    assert_eq!(e.stream, "line3/order-4711");
    assert_eq!(e.class, Class::Critical);
    assert_eq!(e.event_type, "com.example.mes.confirmation");
    assert_eq!(e.source_time.as_deref(), Some("2026-11-29T10:00:00Z"));
    let data: Value = serde_json::from_slice(&e.data).unwrap();
    assert_eq!(data, json!({"order": "4711", "qty": 5}));
    assert_eq!(
        attrs(e),
        json!({"datacontenttype": "application/json", "originsource": "urn:mes:hamburg"}),
        "the sender's source is kept as originsource; core attributes are not repeated"
    );

    assert!(ingest.status.started.load(Ordering::Relaxed));
    assert!(ingest.status.connected.load(Ordering::Relaxed));
    assert_eq!(ingest.status.events.load(Ordering::Relaxed), 1);
    assert!(ingest.status.last_event_us.load(Ordering::Relaxed) > 0);
    let status = ingest.status.clone();
    ingest.finish().await;
    assert!(
        !status.connected.load(Ordering::Relaxed),
        "not connected once stopped"
    );
}

#[tokio::test]
async fn a_batch_of_500_gets_500_seqs_in_request_order() {
    let ingest = setup().start().await;
    let ids: Vec<String> = (0..500).map(|i| format!("b-{i:03}")).collect();
    let answer = ingest.post_json(BATCH, &batch(ids.clone())).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.body["accepted"], 500);
    assert_eq!(answer.body["duplicates"], 0);
    assert_eq!(seqs(&answer.body), (1..=500).collect::<Vec<u64>>());

    let events = ingest.events();
    assert_eq!(events.len(), 500);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.id, ids[i]);
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(e.stream_seq, i as u64 + 1, "one stream, gap-free");
    }
    assert_eq!(ingest.status.events.load(Ordering::Relaxed), 500);
    ingest.finish().await;
}

#[tokio::test]
async fn ndjson_stores_one_event_per_non_empty_line() {
    let ingest = setup().start().await;
    let body = format!(
        "{}\r\n\n{}\n   \n{}",
        event("n-1"),
        event("n-2"),
        event("n-3")
    );
    let answer = ingest.post(NDJSON, body).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(seqs(&answer.body), vec![1, 2, 3]);

    let answer = ingest
        .post("application/ndjson", format!("{}\n", event("n-4")))
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(seqs(&answer.body), vec![4]);

    let ids: Vec<String> = ingest.events().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["n-1", "n-2", "n-3", "n-4"]);
    ingest.finish().await;
}

#[tokio::test]
async fn application_json_takes_an_object_or_an_array() {
    let ingest = setup().start().await;
    let answer = ingest.post_json("application/json", &event("j-1")).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let answer = ingest
        .post_json(
            "Application/JSON; charset=utf-8",
            &batch(["j-2".to_string(), "j-3".to_string()]),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(seqs(&answer.body), vec![2, 3]);
    assert_eq!(ingest.events().len(), 3);
    ingest.finish().await;
}

#[tokio::test]
async fn reposting_the_same_ids_is_acknowledged_as_duplicates_with_the_original_seqs() {
    let ingest = setup().start().await;
    let ids: Vec<String> = (0..5).map(|i| format!("d-{i}")).collect();
    let first = ingest.post_json(BATCH, &batch(ids.clone())).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let before = ingest.events();

    let again = ingest.post_json(BATCH, &batch(ids.clone())).await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.body["accepted"], 0);
    assert_eq!(again.body["duplicates"], 5);
    assert_eq!(seqs(&again.body), seqs(&first.body));
    assert_eq!(ingest.events(), before, "the journal is unchanged");

    // A mix: one new event between known ones, and a repeat inside one request.
    let mixed = ingest
        .post_json(
            BATCH,
            &batch(["d-1".into(), "d-new".into(), "d-new".into(), "d-4".into()]),
        )
        .await;
    assert_eq!(mixed.status, 202, "{}", mixed.body);
    assert_eq!(mixed.body["accepted"], 1);
    assert_eq!(mixed.body["duplicates"], 3);
    assert_eq!(seqs(&mixed.body), vec![2, 6, 6, 5]);
    assert_eq!(ingest.events().len(), 6);
    assert_eq!(ingest.status.duplicates.load(Ordering::Relaxed), 8);
    ingest.finish().await;
}

#[tokio::test]
async fn subject_type_and_data_have_defaults() {
    let ingest = setup().start().await;
    let answer = ingest.post_json(SINGLE, &json!({"id": "bare"})).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let e = &ingest.events()[0];
    assert_eq!(e.stream, "mes", "subject defaults to the source name");
    assert_eq!(e.event_type, "plantrelay.http.event");
    assert_eq!(e.source_time, None);
    assert_eq!(e.data, b"null");
    assert_eq!(e.attrs, None);
    ingest.finish().await;
}

#[tokio::test]
async fn data_is_kept_verbatim_data_base64_is_an_attribute_and_reserved_attributes_are_dropped() {
    let ingest = setup().start().await;
    let body = r#"[
        {"id":"v-1","time":"2026-11-29T11:00:00.250+01:00","data":{"b": 1,"a": 12345678901234567890123.5},
         "plantext":"press07","sequence":99,"streamsequence":7},
        {"id":"v-2","datacontenttype":"application/octet-stream","data_base64":"AAEC/w=="}
    ]"#;
    let answer = ingest.post(BATCH, body).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let events = ingest.events();
    assert_eq!(
        events[0].source_time.as_deref(),
        Some("2026-11-29T11:00:00.250+01:00"),
        "a numeric offset is valid RFC 3339 and kept as sent"
    );
    assert_eq!(
        std::str::from_utf8(&events[0].data).unwrap(),
        r#"{"b": 1,"a": 12345678901234567890123.5}"#,
        "data is stored byte for byte: key order, spacing and big numbers survive"
    );
    assert_eq!(attrs(&events[0]), json!({"plantext": "press07"}));
    assert_eq!(events[1].data, b"null");
    assert_eq!(
        attrs(&events[1]),
        json!({"datacontenttype": "application/octet-stream", "data_base64": "AAEC/w=="})
    );
    ingest.finish().await;
}

// ---------------------------------------------------------------------------
// Rejected requests store nothing

#[tokio::test]
async fn a_batch_where_one_event_lacks_its_id_is_rejected_whole_with_its_index() {
    let ingest = setup().start().await;
    let mut events = batch((0..6).map(|i| format!("m-{i}")));
    events[3].as_object_mut().unwrap().remove("id");
    let answer = ingest.post_json(BATCH, &events).await;
    assert_rejected(&answer, 400, "id is required");
    assert_eq!(answer.body["index"], 3);
    assert!(ingest.events().is_empty(), "none of the batch is stored");
    assert_eq!(ingest.status.rejects.load(Ordering::Relaxed), 1);
    assert_eq!(ingest.status.events.load(Ordering::Relaxed), 0);

    let answer = ingest.post_json(SINGLE, &json!({"data": 1})).await;
    assert_rejected(&answer, 400, "id is required");
    assert_eq!(answer.body["index"], 0);
    let answer = ingest.post_json(SINGLE, &json!({"id": ""})).await;
    assert_rejected(&answer, 400, "id must not be empty");
    let answer = ingest.post_json(SINGLE, &json!({"id": 17})).await;
    assert_rejected(&answer, 400, "id must be a string");
    let answer = ingest
        .post_json(SINGLE, &json!({"id": "x".repeat(1025)}))
        .await;
    assert_rejected(&answer, 400, "at most 1024");
    let answer = ingest
        .post_json(SINGLE, &json!({"id": "s", "subject": "s".repeat(1025)}))
        .await;
    assert_rejected(&answer, 400, "subject is 1025 bytes");
    assert!(ingest.events().is_empty());
    ingest.finish().await;
}

#[tokio::test]
async fn malformed_json_is_rejected_with_the_parser_position_and_index() {
    let ingest = setup().start().await;
    let answer = ingest.post(SINGLE, r#"{"id": "x", "data": }"#).await;
    assert_rejected(&answer, 400, "line 1 column");
    assert_eq!(answer.body["index"], 0);

    let answer = ingest
        .post(
            BATCH,
            "[\n{\"id\":\"a\"},\n{\"id\":\"b\"},\n{\"id\" \"c\"}\n]",
        )
        .await;
    assert_rejected(&answer, 400, "line 4 column");
    assert_eq!(answer.body["index"], 2);

    let answer = ingest
        .post(NDJSON, "{\"id\":\"a\"}\n{\"id\":\"b\"}\n\n{\"id\":\n")
        .await;
    assert_rejected(&answer, 400, "malformed JSON on line 4");
    assert_eq!(answer.body["index"], 3, "NDJSON: the 0-based line index");

    let answer = ingest.post(BATCH, r#"{"id":"a"}"#).await;
    assert_rejected(&answer, 400, "a JSON array of CloudEvents");
    assert_eq!(answer.body.get("index"), None);

    let answer = ingest.post(SINGLE, r#"[{"id":"a"}]"#).await;
    assert_rejected(&answer, 400, "a CloudEvent (a JSON object)");

    assert!(ingest.events().is_empty());
    ingest.finish().await;
}

#[tokio::test]
async fn a_wrong_specversion_is_rejected() {
    let ingest = setup().start().await;
    let mut e = event("sv");
    e["specversion"] = json!("0.3");
    let answer = ingest.post_json(SINGLE, &e).await;
    assert_rejected(&answer, 400, "specversion");
    assert!(ingest.events().is_empty());
    ingest.finish().await;
}

#[tokio::test]
async fn a_time_that_is_not_rfc3339_is_rejected() {
    let ingest = setup().start().await;
    for bad in ["yesterday", "2026-11-29 10:00:00", "2026-02-30T10:00:00Z"] {
        let mut e = event("t");
        e["time"] = json!(bad);
        let answer = ingest.post_json(SINGLE, &e).await;
        assert_rejected(&answer, 400, "is not an RFC 3339 timestamp");
    }
    let mut e = event("t");
    e["time"] = json!(1764410400);
    let answer = ingest.post_json(SINGLE, &e).await;
    assert_rejected(&answer, 400, "time must be a string");
    assert!(ingest.events().is_empty());
    ingest.finish().await;
}

#[tokio::test]
async fn empty_bodies_are_rejected_as_no_events() {
    let ingest = setup().start().await;
    for (ct, body) in [
        (SINGLE, ""),
        (BATCH, "[]"),
        ("application/json", " [ ]\n"),
        (NDJSON, "\n\n"),
    ] {
        let answer = ingest.post(ct, body).await;
        assert_rejected(&answer, 400, "no events");
    }
    ingest.finish().await;
}

#[tokio::test]
async fn a_wrong_content_type_gets_415_listing_the_accepted_types() {
    let ingest = setup().start().await;
    let answer = ingest.post("text/plain", event("ct").to_string()).await;
    assert_rejected(&answer, 415, "unsupported content type \"text/plain\"");
    let supported = answer.body["supported"].as_array().unwrap();
    for ct in [
        SINGLE,
        BATCH,
        NDJSON,
        "application/ndjson",
        "application/json",
    ] {
        assert!(supported.contains(&json!(ct)), "{ct} listed");
        assert!(answer.body["error"].as_str().unwrap().contains(ct));
    }
    // No content type at all.
    let answer = ingest
        .send(
            ingest
                .client
                .post(ingest.url())
                .body(event("ct").to_string()),
        )
        .await;
    assert_rejected(&answer, 415, "unsupported content type (none)");
    assert!(ingest.events().is_empty());
    ingest.finish().await;
}

#[tokio::test]
async fn a_body_over_max_body_gets_413_and_nothing_is_stored() {
    let mut s = setup();
    s.cfg.max_body = 64 << 10;
    let ingest = s.start().await;
    let big = batch((0..1000).map(|i| format!("big-{i}")));
    let answer = ingest.post_json(BATCH, &big).await;
    assert_rejected(&answer, 413, "exceeds the limit of 65536 bytes");

    // Just under the limit is fine.
    let small = batch((0..100).map(|i| format!("small-{i}")));
    assert!(small.to_string().len() < 64 << 10);
    assert_eq!(ingest.post_json(BATCH, &small).await.status, 202);
    assert_eq!(ingest.events().len(), 100);
    ingest.finish().await;
}

#[tokio::test]
async fn a_chunked_body_without_content_length_is_cut_off_at_max_body_with_413() {
    let mut s = setup();
    s.cfg.max_body = 64 << 10;
    let ingest = s.start().await;
    let stream = TcpStream::connect(ingest.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: {}\r\ncontent-type: {BATCH}\r\ntransfer-encoding: chunked\r\n\r\n",
        ingest.addr
    );
    let line = format!("{},", event("chunk"));
    // The writer may hit a closed connection once the server has answered.
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(b"1\r\n[\r\n").await?;
        for _ in 0..((256 << 10) / line.len()) {
            wr.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
                .await?;
        }
        wr.write_all(b"0\r\n\r\n").await?;
        Ok::<_, std::io::Error>(wr)
    });
    let (status, _, body) = within("the 413", read_response(&mut rd)).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("exceeds the limit"), "{body}");
    let _ = writer.await;
    assert!(ingest.events().is_empty());
    ingest.finish().await;
}

// ---------------------------------------------------------------------------
// Authentication

#[tokio::test]
async fn a_configured_token_is_required_and_only_the_right_one_passes() {
    let ingest = setup().with_token().start().await;
    let post = || {
        ingest
            .client
            .post(ingest.url())
            .header("content-type", SINGLE)
            .body(event("auth-1").to_string())
    };

    for req in [
        post(),
        post().bearer_auth("wrong-token"),
        post().bearer_auth(&TOKEN[..TOKEN.len() - 1]),
        post().header("authorization", format!("Basic {TOKEN}")),
    ] {
        let answer = ingest.send(req).await;
        assert_eq!(answer.status, 401);
        assert_eq!(
            answer
                .headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer")
        );
        assert_eq!(answer.body, json!({"error": "unauthorized"}), "no details");
    }
    assert!(ingest.events().is_empty());
    assert_eq!(ingest.status.rejects.load(Ordering::Relaxed), 4);

    let answer = ingest.send(post().bearer_auth(TOKEN)).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(ingest.events().len(), 1);
    ingest.finish().await;
}

#[tokio::test]
async fn authentication_is_checked_before_the_body_is_read() {
    let ingest = setup().with_token().start().await;
    let mut stream = TcpStream::connect(ingest.addr).await.unwrap();
    // Announce a body and never send it: the 401 must come anyway.
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: {}\r\ncontent-type: {SINGLE}\r\ncontent-length: 100000\r\n\r\n",
        ingest.addr
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, head, _) = within("the 401", read_response(&mut stream)).await;
    assert_eq!(status, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    drop(stream);
    ingest.finish().await;
}

#[tokio::test]
async fn an_unreadable_token_file_fails_bind_naming_the_source() {
    let mut s = setup();
    s.cfg.token_file = Some(PathBuf::from("/nonexistent/plantrelay/ingest.token"));
    let err = HttpSource::bind(&s.cfg).await.unwrap_err().to_string();
    assert!(
        err.starts_with("sources.http 'mes': token_file:")
            && err.contains("/nonexistent/plantrelay/ingest.token"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// The journal cannot take the events

#[tokio::test]
async fn a_full_journal_under_block_answers_503_with_retry_after_1() {
    let mut s = setup();
    s.journal.max_size = 16 << 20;
    s.journal.block_timeout = Duration::from_millis(50);
    s.journal.sync = SyncMode::Normal;
    let ingest = s.start().await;

    // Fill it directly, as other sources would.
    let mut filled = false;
    for round in 0..200 {
        let events: Vec<NewEvent> = (0..50)
            .map(|i| NewEvent {
                source: "filler".into(),
                id: format!("{round}-{i}"),
                stream: "fill".into(),
                class: Class::Critical,
                event_type: "test.fill".into(),
                source_time: None,
                data: format!("\"{}\"", "x".repeat(20_000)).into_bytes(),
                attrs: None,
            })
            .collect();
        match ingest.journal.append(events).await {
            Ok(_) => {}
            Err(JournalError::Full { .. }) => {
                filled = true;
                break;
            }
            Err(e) => panic!("unexpected journal error: {e}"),
        }
    }
    assert!(filled, "a 16 MiB journal cannot take 200 MB");
    let head = ingest.events().len();

    // More than the last refused append: it cannot fit either.
    let mut big = batch((0..60).map(|i| format!("full-{i}")));
    for e in big.as_array_mut().unwrap() {
        e["data"] = json!("y".repeat(20_000));
    }
    let answer = ingest.post_json(BATCH, &big).await;
    assert_rejected(&answer, 503, "journal full");
    assert_eq!(
        answer
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let events = ingest.events();
    assert_eq!(events.len(), head);
    assert!(
        events.iter().all(|e| e.source == "filler"),
        "nothing stored"
    );
    assert!(
        ingest
            .status
            .snapshot()
            .last_error
            .is_some_and(|e| e.contains("503"))
    );
    ingest.finish().await;
}

#[tokio::test]
async fn a_failed_commit_answers_503_with_retry_after_5() {
    crate::support::logs::start();
    let mut s = setup();
    s.cfg.name = "mes-stopped-journal".into();
    let ingest = s.start().await;
    // A journal whose writer has stopped: every append fails.
    ingest.journal.close().await;
    for i in 0..20 {
        let answer = ingest.post_json(SINGLE, &event(&format!("lost-{i}"))).await;
        assert_rejected(&answer, 503, "journal commit failed:");
        assert_eq!(
            answer
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("5")
        );
    }
    assert!(ingest.events().is_empty());
    // Clients retrying against a journal that cannot take anything: one
    // warning, not one per request.
    let warned = crate::support::logs::text()
        .lines()
        .filter(|l| l.contains("source=mes-stopped-journal") && l.contains("not stored"))
        .count();
    assert_eq!(warned, 1);
    ingest.finish().await;
}

// ---------------------------------------------------------------------------
// Routing, listener, TLS, shutdown

#[tokio::test]
async fn other_paths_are_404_and_other_methods_405() {
    let ingest = setup().start().await;
    let answer = ingest
        .send(
            ingest
                .client
                .post(format!("{}/v1/event", ingest.base))
                .header("content-type", SINGLE)
                .body(event("p").to_string()),
        )
        .await;
    assert_eq!(answer.status, 404);
    let answer = ingest.send(ingest.client.get(ingest.url())).await;
    assert_eq!(answer.status, 405);
    assert!(ingest.events().is_empty());
    ingest.finish().await;
}

#[tokio::test]
async fn binding_an_address_in_use_names_the_source_the_address_and_the_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = http_source_config();
    cfg.listen = taken.local_addr().unwrap();
    let err = HttpSource::bind(&cfg).await.unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "sources.http 'mes': cannot listen on {}: address in use (another process listens there)",
            cfg.listen
        )
    );
}

#[tokio::test]
async fn a_tls_listener_answers_over_https_to_a_client_that_trusts_the_ca() {
    let mut s = setup();
    let pki = EphemeralPki::generate().unwrap();
    let paths = pki.write_to(s.dir.path()).unwrap();
    s.cfg.tls_cert = Some(paths.server_cert.clone());
    s.cfg.tls_key = Some(paths.server_key.clone());
    tls::install_crypto_provider();
    let client = tls::reqwest_client_builder(tls::client_config(&paths.client_tls(false)).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let ingest = s.start_with_client(client, "https").await;

    let answer = ingest.post_json(SINGLE, &event("tls-1")).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(seqs(&answer.body), vec![1]);
    assert_eq!(ingest.events()[0].id, "tls-1");

    // Plain HTTP to the TLS port does not get an answer.
    let plain = plain_client()
        .post(format!("http://{}/v1/events", ingest.addr))
        .header("content-type", SINGLE)
        .body(event("tls-2").to_string())
        .send()
        .await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| r.status().as_u16() >= 400),
        "plain HTTP must not be served"
    );
    assert_eq!(ingest.events().len(), 1);
    ingest.finish().await;
}

#[tokio::test]
async fn a_tls_key_without_a_certificate_fails_bind() {
    let mut cfg = http_source_config();
    cfg.tls_key = Some(PathBuf::from("/tmp/none.key"));
    let err = HttpSource::bind(&cfg).await.unwrap_err().to_string();
    assert!(
        err.contains("sources.http 'mes'") && err.contains("tls_cert and tls_key"),
        "{err}"
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_flight_then_stops_accepting() {
    let ingest = setup().start().await;
    let addr = ingest.addr;

    // A request whose body is still arriving when shutdown begins.
    let body = event("in-flight").to_string();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {SINGLE}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first.as_bytes()).await.unwrap();
    // The source has taken the head and is reading the body.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ingest.status.in_flight.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the source"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    ingest.stop.cancel();
    // A quiet spell: serve must still be waiting for the request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !ingest.task.is_finished(),
        "serve waits for the request in flight"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connections once shutdown began"
    );

    stream.write_all(rest.as_bytes()).await.unwrap();
    let (status, _, answer) = within("the in-flight answer", read_response(&mut stream)).await;
    assert_eq!(status, 202, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(seqs(&answer), vec![1]);
    assert_eq!(
        ingest.status.in_flight.load(Ordering::Relaxed),
        0,
        "answered"
    );
    drop(stream);

    let events = ingest.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, "in-flight");
    ingest.finish().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

// ---------------------------------------------------------------------------
// Schemas and trace context

const CONFIRMATION: &str = "plantrelay.mes.production-confirmation.v1";

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The shipped schemas with their valid and invalid examples: every valid
/// one passes, every invalid one fails, and at the pointer it was written
/// to break (each breaks exactly one rule).
#[test]
fn canonical_schemas_take_their_valid_examples_and_refuse_each_invalid_one_at_its_pointer() {
    let mut checked = 0;
    for name in [
        "production-confirmation",
        "goods-movement",
        "quality-result",
        "machine-downtime",
        "order-status",
    ] {
        let schema = Schema::load(&repo_file(&format!("config/schemas/{name}.v1.json")))
            .unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read_to_string(repo_file(&format!(
            "tests/data/schemas/{name}.v1.examples.json"
        )))
        .unwrap();
        let examples: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(examples["type"], format!("plantrelay.mes.{name}.v1"));
        let valid = examples["valid"].as_array().unwrap();
        let invalid = examples["invalid"].as_array().unwrap();
        assert!(
            valid.len() >= 3 && invalid.len() >= 8,
            "{name}: too few examples"
        );
        for (i, v) in valid.iter().enumerate() {
            let r = schema.check(v.to_string().as_bytes());
            assert_eq!(r, Ok(()), "{name} valid[{i}]");
        }
        for x in invalid {
            let why = x["why"].as_str().unwrap();
            let violations = schema
                .check(x["data"].to_string().as_bytes())
                .expect_err(&format!("{name}: '{why}' passed"));
            let pointer = x["pointer"].as_str().unwrap();
            assert!(
                violations.iter().any(|v| v.pointer == pointer),
                "{name}: '{why}' expected at {pointer:?}, got {violations:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 100, "{checked}");
}

impl Setup {
    /// The shipped production-confirmation schema for [`CONFIRMATION`].
    fn with_confirmation_schema(mut self) -> Setup {
        let configs = [SchemaConfig {
            event_type: CONFIRMATION.into(),
            file: repo_file("config/schemas/production-confirmation.v1.json"),
        }];
        self.schemas = Arc::new(Schemas::load(&configs).unwrap());
        self
    }
}

fn confirmation(id: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "type": CONFIRMATION,
        "subject": "line3/order-1000123",
        "data": data,
    })
}

fn good_confirmation() -> Value {
    json!({
        "order": "1000123",
        "operation": "0010",
        "work_center": "PRESS01",
        "yield": {"value": 120, "unit": "C62"},
        "end": "2026-12-05T10:32:00+01:00",
        "final_confirmation": false
    })
}

#[tokio::test]
async fn an_event_failing_its_schema_refuses_the_whole_request_with_every_problem() {
    let ingest = setup().with_confirmation_schema().start().await;

    // Valid: stored.
    let a = ingest
        .post_json(SINGLE, &confirmation("c-1", good_confirmation()))
        .await;
    assert_eq!(a.status, 202, "{}", a.body);

    // A batch with two bad events among good ones: 422, nothing stored.
    let mut bad = good_confirmation();
    bad["yield"]["value"] = json!(-5);
    bad["operation"] = json!("10");
    let mut missing = good_confirmation();
    missing
        .as_object_mut()
        .unwrap()
        .remove("final_confirmation");
    let body = json!([
        confirmation("c-2", good_confirmation()),
        confirmation("c-3", bad),
        confirmation("c-4", good_confirmation()),
        confirmation("c-5", missing),
    ]);
    let a = ingest.post_json(BATCH, &body).await;
    assert_eq!(a.status, 422, "{}", a.body);
    let errors = a.body["errors"].as_array().unwrap();
    let mut got: Vec<(u64, &str, &str)> = errors
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["id"].as_str().unwrap(),
                e["pointer"].as_str().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (1, "c-3", "/operation"),
            (1, "c-3", "/yield/value"),
            (3, "c-5", "")
        ]
    );
    assert!(
        errors
            .iter()
            .all(|e| e["message"].as_str().is_some_and(|m| !m.is_empty()))
    );
    assert!(
        a.body["error"]
            .as_str()
            .unwrap()
            .starts_with("2 of 4 events fail their schema"),
        "{}",
        a.body
    );
    let ids: Vec<String> = ingest.events().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["c-1"], "nothing of the refused request is stored");

    // Bytes cannot be checked against a JSON schema.
    let mut b64 = confirmation("c-6", Value::Null);
    b64.as_object_mut().unwrap().remove("data");
    b64["data_base64"] = json!("AAEC");
    let a = ingest.post_json(SINGLE, &b64).await;
    assert_eq!(a.status, 422, "{}", a.body);
    assert!(
        a.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("data_base64")
    );

    // A type without a schema passes (require_schema is off).
    let a = ingest.post_json(SINGLE, &event("other-1")).await;
    assert_eq!(a.status, 202, "{}", a.body);

    // Counted per type: 2 events of the batch and the base64 one.
    let snap = ingest.status.snapshot();
    assert_eq!(snap.schema_rejects.len(), 1);
    assert_eq!(snap.schema_rejects[0].event_type, CONFIRMATION);
    assert_eq!(snap.schema_rejects[0].events, 3);
    assert_eq!(snap.rejects, 2, "two requests refused");
    ingest.finish().await;
}

#[tokio::test]
async fn require_schema_refuses_types_without_one() {
    let mut s = setup().with_confirmation_schema();
    s.cfg.require_schema = true;
    let ingest = s.start().await;
    let a = ingest
        .post_json(
            BATCH,
            &json!([confirmation("c-1", good_confirmation()), event("x-1")]),
        )
        .await;
    assert_eq!(a.status, 422, "{}", a.body);
    let e = &a.body["errors"][0];
    assert_eq!(
        (e["index"].as_u64(), e["id"].as_str()),
        (Some(1), Some("x-1"))
    );
    assert_eq!(e["pointer"], "");
    assert!(
        e["message"].as_str().unwrap().contains("require_schema"),
        "{e}"
    );
    assert!(ingest.events().is_empty());
    let a = ingest
        .post_json(SINGLE, &confirmation("c-1", good_confirmation()))
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let snap = ingest.status.snapshot();
    assert_eq!(snap.schema_rejects[0].event_type, "(no schema)");
    ingest.finish().await;
}

#[tokio::test]
async fn a_hostile_batch_gets_a_bounded_answer_that_does_not_echo_its_data() {
    let ingest = setup().with_confirmation_schema().start().await;
    let mut bad = good_confirmation();
    bad["confirmation_text"] = json!("SECRET-".repeat(100));
    for k in 0..20 {
        bad[format!("unknown_{k}")] = json!(k);
    }
    let body = Value::Array(
        (0..500)
            .map(|i| confirmation(&format!("h-{i}"), bad.clone()))
            .collect(),
    );
    let a = ingest.post_json(BATCH, &body).await;
    assert_eq!(a.status, 422);
    let errors = a.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 100, "the list is bounded");
    let text = a.body.to_string();
    assert!(!text.contains("SECRET"), "data values are not quoted");
    assert!(text.len() < 64 * 1024, "{} bytes", text.len());
    assert!(a.body["error"].as_str().unwrap().contains("500 of 500"));
    ingest.finish().await;
}

#[tokio::test]
async fn trace_context_headers_become_attributes_of_events_without_their_own() {
    let ingest = setup().start().await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let mut with_own = event("t-2");
    with_own["traceparent"] = json!(own);
    let body = json!([event("t-1"), with_own]);
    let a = ingest
        .send(
            ingest
                .client
                .post(ingest.url())
                .header("content-type", BATCH)
                .header("traceparent", parent)
                .header("tracestate", "vendor=a1")
                .header("tracestate", "other=b2")
                .body(body.to_string()),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let events = ingest.events();
    let attrs =
        |e: &StoredEvent| -> Value { serde_json::from_str(e.attrs.as_deref().unwrap()).unwrap() };
    let first = attrs(&events[0]);
    assert_eq!(first["traceparent"], parent);
    assert_eq!(first["tracestate"], "vendor=a1,other=b2");
    let second = attrs(&events[1]);
    assert_eq!(
        second["traceparent"], own,
        "an event's own trace context is kept"
    );
    assert!(second.get("tracestate").is_none(), "{second}");
    // Forwarded as CloudEvents attributes.
    let mut out = Vec::new();
    events[0].write_cloudevent("gw", &mut out);
    let ce: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(ce["traceparent"], parent);

    for bad in [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ] {
        let a = ingest
            .send(
                ingest
                    .client
                    .post(ingest.url())
                    .header("content-type", SINGLE)
                    .header("traceparent", bad)
                    .body(event("t-bad").to_string()),
            )
            .await;
        assert_eq!(a.status, 400, "{bad}: {}", a.body);
        assert!(
            a.body["error"]
                .as_str()
                .unwrap()
                .starts_with("header traceparent:"),
            "{}",
            a.body
        );
    }
    // A later version may carry more fields.
    let a = ingest
        .send(
            ingest
                .client
                .post(ingest.url())
                .header("content-type", SINGLE)
                .header(
                    "traceparent",
                    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz",
                )
                .body(event("t-3").to_string()),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(ingest.events().len(), 3);
    ingest.finish().await;
}
