//! Hostile input: listeners.
//!
//! A host on the plant network opens connections and sends nothing, or
//! trickles its headers a byte a second (slowloris), up to and past the
//! connection caps, on the HTTP ingest and the health listener. What must
//! hold: a client from another host is served in time, the server closes
//! the slow and idle connections after `header_timeout`, and with the
//! open-file limit at systemd's default (1024) the journal and the upstream
//! never run out of file descriptors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plantrelay::agent::{self, RunningAgent};
use plantrelay::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::agent::{Harness, http_client, mes_events, post, wait_listening};
use crate::support::{free_port, proc_status_kib};

const TOKEN: &str = "health-read-token-0123456789";

/// A connection from `from` (a loopback address standing in for another
/// host) to `to`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), socket.connect(to))
        .await
        .expect("connect timed out")
        .unwrap()
}

/// Reads until the server closes the connection (EOF or reset); the time
/// that took, or `None` if it was still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// Writes `bytes` one a second (slowloris) until the server closes.
fn trickle(mut stream: TcpStream, bytes: &'static [u8]) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        let start = Instant::now();
        for b in bytes.iter().cycle() {
            if stream.write_all(&[*b]).await.is_err() {
                break;
            }
            // Once the server has closed, a read sees it at once.
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => {}
            }
            if start.elapsed() > Duration::from_secs(30) {
                break;
            }
        }
        start.elapsed()
    })
}

const SLOW_HEADERS: &[u8] = b"POST /v1/events HTTP/1.1\r\nHost: plantrelay\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
/// The start of a TLS ClientHello record header, sent a byte a second.
const SLOW_HANDSHAKE: &[u8] =
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// An agent with one ingest source and a health listener, both with the
/// given `[limits]` lines (caps and timeouts).
async fn agent_with_limits(h: &Harness, ingest_limits: &str, health_limits: &str) -> RunningAgent {
    let health = format!("{}{health_limits}\n", health_toml(h, "127.0.0.1:0"));
    let text =
        h.config_text_with_source("127.0.0.1:0", ingest_limits, &h.receiver.url(), "", &health);
    let config = Config::load(&h.write_config(&text)).unwrap();
    agent::start(&config).await.unwrap()
}

/// A `[health]` table on `listen` with the test CA's server certificate and
/// a token file holding `TOKEN`.
fn health_toml(h: &Harness, listen: &str) -> String {
    let token = h.dir.path().join("health.token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    format!(
        "\n[health]\nlisten = \"{listen}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntoken_file = \"{}\"\n",
        h.paths.server_cert.display(),
        h.paths.server_key.display(),
        token.display()
    )
}

/// An HTTPS client of the health listener, trusting the test CA.
fn health_client(h: &Harness, addr: SocketAddr) -> reqwest::Client {
    plantrelay::tls::install_crypto_provider();
    let cfg = plantrelay::tls::client_config(&h.paths.client_tls(false)).unwrap();
    plantrelay::tls::reqwest_client_builder(cfg)
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn get_status(client: &reqwest::Client, addr: SocketAddr) -> u16 {
    client
        .get(format!("https://localhost:{}/api/v1/status", addr.port()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

const INGEST_LIMITS: &str = r#"max_connections = 16
max_connections_per_ip = 8
header_timeout = "2s"
request_timeout = "5s""#;
const HEALTH_LIMITS: &str = r#"max_connections = 8
max_connections_per_ip = 4
header_timeout = "2s"
request_timeout = "5s""#;
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Scheduling slack on a loaded two-core machine.
const SLACK: Duration = Duration::from_millis(2500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_holding_slow_and_idle_ingest_connections_past_its_cap_does_not_delay_another_host()
 {
    let h = Harness::new().await;
    let a = agent_with_limits(&h, INGEST_LIMITS, HEALTH_LIMITS).await;
    let addr = a.http_addr("mes").unwrap();

    // 127.0.0.2: 4 slowloris and 8 idle connections; its cap is 8.
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(trickle(connect_from("127.0.0.2", addr).await, SLOW_HEADERS));
    }
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(connect_from("127.0.0.2", addr).await);
    }
    // The four over the per-IP cap are closed at once.
    let mut refused = 0;
    for s in idle.iter_mut() {
        if closed_within(s, Duration::from_millis(300)).await.is_some() {
            refused += 1;
        }
    }
    assert_eq!(
        refused, 4,
        "connections over max_connections_per_ip must be closed at once"
    );

    // The MES on 127.0.0.1 is served at once.
    let started = Instant::now();
    let (status, body) = post(
        &http_client(),
        &format!("http://{addr}/v1/events"),
        &mes_events("legit", 3, 1),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, 202, "{body}");
    assert!(
        took < Duration::from_secs(1),
        "the legitimate post took {took:?}"
    );

    // A kept-alive connection idle after its request is closed too.
    let mut kept = connect_from("127.0.0.3", addr).await;
    let req = "POST /v1/events HTTP/1.1\r\nHost: plantrelay\r\nContent-Type: application/cloudevents+json\r\nContent-Length: 29\r\n\r\n{\"id\":\"kept-1\",\"data\":{\"a\":1}}";
    let req = req.replace(
        "Content-Length: 29",
        &format!(
            "Content-Length: {}",
            req.split("\r\n\r\n").nth(1).unwrap().len()
        ),
    );
    kept.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 202");
    let idle_for = closed_within(&mut kept, HEADER_TIMEOUT + SLACK).await;
    assert!(
        idle_for.is_some_and(|d| d >= HEADER_TIMEOUT - Duration::from_millis(200)),
        "an idle keep-alive connection must be closed after header_timeout, got {idle_for:?}"
    );

    // The held idle connections and the slowloris ones are closed after
    // header_timeout.
    for s in idle.iter_mut() {
        let left = (HEADER_TIMEOUT + SLACK).saturating_sub(opened.elapsed());
        assert!(
            closed_within(s, left).await.is_some(),
            "an idle connection was still open {:?} after it was opened",
            opened.elapsed()
        );
    }
    for t in slow {
        let lasted = t.await.unwrap();
        assert!(
            lasted < HEADER_TIMEOUT + SLACK,
            "a slowloris connection lasted {lasted:?}"
        );
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_filling_the_ingest_connection_cap_delay_another_host_by_at_most_the_header_timeout()
{
    let h = Harness::new().await;
    let a = agent_with_limits(&h, INGEST_LIMITS, HEALTH_LIMITS).await;
    let addr = a.http_addr("mes").unwrap();

    // Four hosts, six idle connections each: 24 against a cap of 16.
    let mut held = Vec::new();
    for host in 2..=5 {
        for _ in 0..6 {
            held.push(connect_from(&format!("127.0.0.{host}"), addr).await);
        }
    }
    let started = Instant::now();
    let (status, body) = post(
        &http_client(),
        &format!("http://{addr}/v1/events"),
        &mes_events("legit", 3, 1),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, 202, "{body}");
    assert!(
        took < HEADER_TIMEOUT + SLACK,
        "the legitimate post took {took:?}, more than header_timeout"
    );
    eprintln!("legitimate post behind a full connection cap answered in {took:?}");
    for s in held.iter_mut() {
        assert!(
            closed_within(s, 2 * HEADER_TIMEOUT + SLACK).await.is_some(),
            "an idle connection was not closed"
        );
    }
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_holding_slow_and_idle_health_connections_past_its_cap_does_not_delay_the_scraper()
{
    let h = Harness::new().await;
    let a = agent_with_limits(&h, INGEST_LIMITS, HEALTH_LIMITS).await;
    let addr = a.health_addr.unwrap();

    // 127.0.0.2: 2 slow handshakes and 4 idle connections; its cap is 4.
    let mut slow = Vec::new();
    for _ in 0..2 {
        slow.push(trickle(
            connect_from("127.0.0.2", addr).await,
            SLOW_HANDSHAKE,
        ));
    }
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect_from("127.0.0.2", addr).await);
    }
    let mut refused = 0;
    for s in idle.iter_mut() {
        if closed_within(s, Duration::from_millis(300)).await.is_some() {
            refused += 1;
        }
    }
    assert_eq!(
        refused, 2,
        "connections over max_connections_per_ip must be closed at once"
    );

    let started = Instant::now();
    let status = get_status(&health_client(&h, addr), addr).await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_secs(1),
        "the status request took {took:?}"
    );

    for s in idle.iter_mut() {
        let left = (HEADER_TIMEOUT + SLACK).saturating_sub(opened.elapsed());
        assert!(
            closed_within(s, left).await.is_some(),
            "an idle connection was still open {:?} after it was opened",
            opened.elapsed()
        );
    }
    for t in slow {
        let lasted = t.await.unwrap();
        assert!(
            lasted < HEADER_TIMEOUT + SLACK,
            "a slow handshake lasted {lasted:?}"
        );
    }
    a.shutdown().await;
}

// ---------------------------------------------------------------------------
// The real binary under systemd's default open-file limit.

/// `plantrelay run` with RLIMIT_NOFILE 1024:1024 (systemd's default soft
/// limit), logging to `log`.
fn spawn_with_nofile_1024(config: &std::path::Path, log: &std::path::Path) -> Child {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plantrelay"));
    cmd.args(["run", "-c"])
        .arg(config)
        .env("PLANTRELAY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setrlimit is a single system call, async-signal-safe, and
    // touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let limit = rustix::process::Rlimit {
                current: Some(1024),
                maximum: Some(1024),
            };
            rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn().unwrap()
}

async fn open_idle(from: &str, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(connect_from(from, to).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_hundred_idle_connections_under_a_1024_file_limit_leave_ingest_status_and_forwarding_working()
 {
    let h = Harness::new().await;
    let (ingest_port, health_port) = (free_port(), free_port());
    let health = health_toml(&h, &format!("127.0.0.1:{health_port}"));
    // Default caps and timeouts: this is what a packaged agent does.
    let text = h.config_text(
        &format!("127.0.0.1:{ingest_port}"),
        &h.receiver.url(),
        "",
        &health,
    );
    let config = h.write_config(&text);
    let log: PathBuf = h.dir.path().join("agent.log");
    let mut child = spawn_with_nofile_1024(&config, &log);
    let pid = child.id();
    wait_listening(ingest_port).await;
    wait_listening(health_port).await;
    let ingest: SocketAddr = format!("127.0.0.1:{ingest_port}").parse().unwrap();
    let health_addr: SocketAddr = format!("127.0.0.1:{health_port}").parse().unwrap();
    let url = format!("http://{ingest}/v1/events");
    let client = http_client();
    let (status, body) = post(&client, &url, &mes_events("before", 50, 5)).await;
    assert_eq!(status, 202, "{body}");

    // The storm: 1,100 idle connections to ingest, 100 to health.
    let mut storm = open_idle("127.0.0.2", ingest, 1100).await;
    storm.extend(open_idle("127.0.0.3", health_addr, 100).await);

    let started = Instant::now();
    let (status, body) = post(&http_client(), &url, &mes_events("during", 50, 5)).await;
    let took = started.elapsed();
    assert_eq!(status, 202, "{body}");
    assert!(
        took < Duration::from_secs(2),
        "ingest took {took:?} under the storm"
    );
    let status = get_status(&health_client(&h, health_addr), health_addr).await;
    assert_eq!(status, 200);
    assert!(
        h.receiver.wait_for(100, Duration::from_secs(30)).await,
        "events ingested during the storm did not arrive upstream: {} of 100",
        h.receiver.ids().len()
    );
    eprintln!(
        "agent under 1,200 idle connections: VmHWM {} kB, VmRSS {} kB",
        proc_status_kib(pid, "VmHWM"),
        proc_status_kib(pid, "VmRSS")
    );

    // The attacker goes away; the agent carries on.
    drop(storm);
    let (status, body) = post(&http_client(), &url, &mes_events("after", 50, 5)).await;
    assert_eq!(status, 202, "{body}");
    assert!(
        h.receiver.wait_for(150, Duration::from_secs(30)).await,
        "events after the storm did not arrive upstream"
    );
    assert!(child.try_wait().unwrap().is_none(), "the agent exited");
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        !log.contains("Too many open files") && !log.contains("os error 24"),
        "the agent ran out of file descriptors:\n{log}"
    );
}
