//! A nats-server of our own for interop tests: the system binary (Debian's
//! `nats-server`, v2.9) with JetStream, on a free loopback port, its store
//! in a temp dir. It is started by a test, waited for until JetStream
//! answers (no fixed sleeps), and only this child is ever killed: on
//! [`NatsServer::kill`], [`NatsServer::stop`] and drop.
//!
//! It also reads a stream back ([`NatsServer::stored`]): what the server
//! kept, in stream order, with the headers the sink set.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;

// The tests' support and the benches' (which include this file by path)
// each have one.
use crate::support::free_port;

/// One message as the stream holds it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    /// `ce-sequence`: the journal seq of the event.
    pub ce_sequence: u64,
    pub ce_id: String,
    pub ce_source: String,
    pub ce_subject: String,
    pub ce_streamsequence: u64,
    /// `ce-traceparent` ("" when absent).
    pub ce_traceparent: String,
}

pub struct NatsServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Extra config (a `tls { }` block), written to `nats.conf`.
    conf: Option<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// A plain (no TLS) server with JetStream, ready.
    pub async fn start() -> NatsServer {
        NatsServer::start_with(None).await
    }

    /// With `conf` as its config file (e.g. a `tls { }` block); the port,
    /// address and store dir come from the command line.
    pub async fn start_with(conf: Option<String>) -> NatsServer {
        let mut s = NatsServer {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            conf,
            child: None,
        };
        s.spawn().await;
        s
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the child on the same port and store, and waits until
    /// JetStream answers (unless TLS is configured: then until it listens).
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new("nats-server");
        cmd.arg("-js")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .arg("-l")
            .arg(self.log_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(conf) = &self.conf {
            let path = self.dir.path().join("nats.conf");
            std::fs::write(&path, conf).unwrap();
            cmd.arg("-c").arg(path);
        }
        self.child = Some(
            cmd.spawn()
                .expect("nats-server (apt-get install nats-server)"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "nats-server did not come up ({last}): {}",
                self.log()
            );
            if self.conf.is_some() {
                if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                    return;
                }
            } else {
                match async_nats::connect(self.url()).await {
                    // JetStream answers (a stream that does not exist:
                    // an answer all the same).
                    Ok(c) => match jetstream::new(c).get_stream("READY").await {
                        Ok(_) => return,
                        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(_)) => return,
                        Err(e) => last = format!("JetStream: {e}"),
                    },
                    Err(e) => last = format!("connect: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL of our own child, waited for.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM of our own child (the server flushes its store), waited for.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap()
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(self.client().await)
    }

    /// Messages in `stream` now (0 when it does not exist).
    pub async fn count(&self, stream: &str) -> u64 {
        match self.jetstream().await.get_stream(stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Everything `stream` holds, in stream order.
    pub async fn stored(&self, stream: &str) -> Vec<Stored> {
        let mut out = Vec::new();
        self.each_stored(stream, |m| out.push(m)).await;
        out
    }

    /// Hands every message `stream` holds to `f`, in stream order, without
    /// keeping them (a stream of a million messages).
    pub async fn each_stored(&self, stream: &str, mut f: impl FnMut(Stored)) {
        let js = self.jetstream().await;
        let mut s = js.get_stream(stream).await.unwrap();
        let total = s.info().await.unwrap().state.messages;
        if total == 0 {
            return;
        }
        let c = s
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = c.messages().await.unwrap();
        for _ in 0..total {
            let m = tokio::time::timeout(Duration::from_secs(60), msgs.next())
                .await
                .expect("reading the stream back stalled")
                .expect("the stream of messages ended")
                .unwrap();
            let h = m.headers.clone().unwrap_or_default();
            let get = |k: &str| h.get(k).map(|v| v.as_str().to_string()).unwrap_or_default();
            f(Stored {
                subject: m.subject.to_string(),
                msg_id: get("Nats-Msg-Id"),
                ce_sequence: get("ce-sequence").parse().unwrap_or(0),
                ce_id: get("ce-id"),
                ce_source: get("ce-source"),
                ce_subject: get("ce-subject"),
                ce_streamsequence: get("ce-streamsequence").parse().unwrap_or(0),
                ce_traceparent: get("ce-traceparent"),
            });
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
