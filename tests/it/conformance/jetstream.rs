//! The JetStream sink against a real nats-server (started per test, see
//! `tests/it/support/nats_server.rs`) behind the TCP fault proxy, in real
//! time.
//!
//! A JetStream server has no scripted answers, so each scripted reply is
//! made real when the send it belongs to starts: the sink under test is
//! wrapped ([`Scripted`]) so that send *n* takes reply *n*, as the HTTPS
//! receiver's script is consumed per request.
//!
//! - `Ack`: the proxy passes (and the sink has reconnected, should an
//!   earlier fault have cut its connection).
//! - `Retry(None)`: every connection cut, and kept cut until a later reply
//!   passes again: the sink finds itself disconnected and retries.
//! - `Partial(n)`: the stream is limited to `n` more messages
//!   (`max_msgs`, `discard = new`) for the send: the server stores and
//!   acknowledges the first `n` and refuses the rest.
//! - `Timeout`: a blackhole for the send: the publishes are swallowed and
//!   no acknowledgement comes within the sink's timeout.
//! - `Slow(d)`: every chunk of traffic delayed by `d` during the send.
//!
//! What a JetStream server cannot say is not played here: `Retry-After`,
//! an unnamed rejection (bisection), and a refusal for good of one event
//! among events alike (the server refuses only a message too large, and the
//! scenarios' events all have the same size; the mapping of that refusal
//! is unit-tested in `src/sinks/jetstream/tests.rs`). The server keeps each event
//! once however often it is sent, so `received()` never holds duplicates.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::DiscardPolicy;
use plantrelay::config::Config;
use plantrelay::event::StoredEvent;
use plantrelay::sinks::jetstream::{JetStreamSink, Outgoing};
use plantrelay::sinks::{ForwarderSettings, SendOutcome, Sink};

use crate::conformance::rig::{Reply, SINK, Upstream};
use crate::support::agent::{load_config, minimal_config_text};
use crate::support::fault_proxy::FaultProxy;
use crate::support::nats_server::NatsServer;

/// The sink's timeout (connect, acknowledgements) in these scenarios: long
/// enough that a `Slow` send (300 ms per chunk of traffic) never times out.
const TIMEOUT: Duration = Duration::from_secs(4);
const STREAM: &str = "CONFORMANCE";

pub struct JetStreamUpstream {
    dir: tempfile::TempDir,
    server: Arc<NatsServer>,
    proxy: Arc<FaultProxy>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

impl JetStreamUpstream {
    pub async fn new() -> JetStreamUpstream {
        plantrelay::tls::install_crypto_provider();
        let server = NatsServer::start().await;
        let proxy = Arc::new(FaultProxy::start(server.addr()).await);
        JetStreamUpstream {
            dir: tempfile::tempdir().unwrap(),
            server: Arc::new(server),
            proxy,
            script: Arc::default(),
        }
    }

    fn config(&self, batch_max_events: usize) -> Config {
        let sink = format!(
            r#"
[[sinks.jetstream]]
name = "{SINK}"
url = "nats://{proxy}"
subject = "conformance.{{agent}}.{{stream}}"
stream = "{STREAM}"
create_stream = true
retry_initial = "50ms"
retry_max = "500ms"
timeout = "{timeout}ms"
batch_linger = "0s"
batch_max_events = {batch_max_events}
"#,
            proxy = self.proxy.addr(),
            timeout = TIMEOUT.as_millis(),
        );
        let state = self.dir.path().join("state");
        let text = minimal_config_text("gw-conformance", &state, "127.0.0.1:0", &sink);
        load_config(self.dir.path(), &text)
    }
}

impl Upstream for JetStreamUpstream {
    type S = Scripted;

    fn script(&self, replies: Vec<Reply>) {
        for r in &replies {
            assert!(
                matches!(
                    r,
                    Reply::Ack
                        | Reply::Retry(None)
                        | Reply::Partial(_)
                        | Reply::Timeout
                        | Reply::Slow(_)
                ),
                "a JetStream upstream cannot answer {r:?}"
            );
        }
        self.script.lock().unwrap().extend(replies);
    }

    fn sink(&self) -> Scripted {
        let cfg = self.config(100);
        Scripted {
            inner: JetStreamSink::new(&cfg.sinks.jetstream[0], &cfg.agent.id).unwrap(),
            server: self.server.clone(),
            proxy: self.proxy.clone(),
            script: self.script.clone(),
        }
    }

    fn settings(&self, batch_max_events: usize) -> ForwarderSettings {
        JetStreamSink::settings(&self.config(batch_max_events).sinks.jetstream[0])
    }

    fn received(&self) -> Vec<u64> {
        // The rig asks synchronously; the scenarios run on a multi-thread
        // runtime, where a worker may block on a future of its own.
        let stored = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(self.server.stored(STREAM))
        });
        let mut ids = std::collections::HashSet::new();
        for m in &stored {
            assert!(ids.insert(m.msg_id.clone()), "{} stored twice", m.msg_id);
            assert_eq!(m.msg_id, format!("e-{}", m.ce_sequence), "id and sequence");
            assert_eq!(
                m.subject,
                format!(
                    "conformance.gw-conformance.{}",
                    m.ce_subject.replace('/', ".")
                )
            );
        }
        stored.iter().map(|m| m.ce_sequence).collect()
    }

    fn timeout(&self) -> Duration {
        TIMEOUT
    }
}

/// The JetStream sink, with the fault of the next scripted reply in place
/// while each send runs.
pub struct Scripted {
    inner: JetStreamSink,
    server: Arc<NatsServer>,
    proxy: Arc<FaultProxy>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

impl Scripted {
    async fn until_disconnected(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.inner.is_connected() {
            assert!(Instant::now() < deadline, "the cut never reached the sink");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Has the sink open its connection now (after a cut), so that the
    /// fault applies to the send and not to the connecting.
    async fn connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = self.inner.ensure_connected().await {
            assert!(Instant::now() < deadline, "cannot reconnect: {e}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Limits the stream to `room` more messages (None: no limit), on a
    /// connection of its own (not through the proxy).
    async fn limit_stream(&self, room: Option<u64>) {
        let js = self.server.jetstream().await;
        let mut stream = js.get_stream(STREAM).await.unwrap();
        let info = stream.info().await.unwrap().clone();
        let mut config = info.config;
        match room {
            Some(n) => {
                config.max_messages = (info.state.messages + n) as i64;
                config.discard = DiscardPolicy::New;
            }
            None => {
                config.max_messages = -1;
                config.discard = DiscardPolicy::Old;
            }
        }
        js.update_stream(&config).await.unwrap();
    }
}

impl Sink for Scripted {
    type Encoded = Vec<Outgoing>;

    fn encode(&self, batch: &[StoredEvent]) -> Vec<Outgoing> {
        self.inner.encode(batch)
    }

    async fn send(&self, batch: &[StoredEvent], encoded: Vec<Outgoing>) -> SendOutcome {
        let reply = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Reply::Ack);
        if matches!(reply, Reply::Retry(None)) {
            self.proxy.cut();
            self.until_disconnected().await;
            return self.inner.send(batch, encoded).await;
        }
        self.proxy.pass();
        self.connected().await;
        match reply {
            Reply::Ack => self.inner.send(batch, encoded).await,
            Reply::Partial(n) => {
                self.limit_stream(Some(n as u64)).await;
                let out = self.inner.send(batch, encoded).await;
                self.limit_stream(None).await;
                out
            }
            Reply::Timeout => {
                self.proxy.blackhole();
                let out = self.inner.send(batch, encoded).await;
                self.proxy.pass();
                out
            }
            Reply::Slow(d) => {
                self.proxy.delay(d);
                let out = self.inner.send(batch, encoded).await;
                self.proxy.pass();
                out
            }
            other => panic!("a JetStream upstream cannot answer {other:?}"),
        }
    }

    async fn connect(&self) -> Result<(), String> {
        self.inner.connect().await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

/// The scenarios of `per_event_conformance!` a JetStream upstream can play
/// (see the module docs): all but the refusal of one event for good.
mod scenarios {
    use super::JetStreamUpstream;
    use crate::conformance::scenarios;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_deliver_everything_in_order_and_move_the_cursor() {
        scenarios::ack(&JetStreamUpstream::new().await).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_connection_resends_the_same_events() {
        scenarios::retry(&JetStreamUpstream::new().await).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partial_ack_moves_the_cursor_over_the_prefix() {
        scenarios::partial_ack(&JetStreamUpstream::new().await).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_timeout_resends_and_loses_nothing() {
        scenarios::timeout(&JetStreamUpstream::new().await).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_upstream_loses_nothing_and_keeps_order() {
        scenarios::slow(&JetStreamUpstream::new().await).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_mid_backlog_resumes_at_the_cursor_without_resending() {
        scenarios::stop_and_resume(&JetStreamUpstream::new().await).await
    }
}
