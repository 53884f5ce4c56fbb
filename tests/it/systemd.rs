//! systemd notifications from the real binary, seen through a fake
//! `NOTIFY_SOCKET`: READY=1 with a STATUS= line once the agent is up,
//! WATCHDOG=1 pings while the journal writer is alive, none while it is
//! wedged (another process holds the journal's write lock), pings again once
//! it recovers, and STOPPING=1 on SIGTERM.

use crate::support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::agent::{Harness, mes_events};
use support::free_port;

/// Every message received until `until`, with its arrival time.
fn collect(sock: &UnixDatagram, until: Instant) -> Vec<(Instant, String)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        sock.set_read_timeout(Some(
            until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => out.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).to_string(),
            )),
            Err(_) => break,
        }
    }
    out
}

fn pings(msgs: &[(Instant, String)]) -> usize {
    msgs.iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_socket_sees_ready_watchdog_pings_that_stop_while_the_writer_is_wedged_and_stopping()
{
    let h = Harness::new().await;
    let port = free_port();
    let text = h.config_text(&format!("127.0.0.1:{port}"), &h.receiver.url(), "", "");
    let config = h.write_config(&text);
    let sock_path = h.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_plantrelay"))
        .args(["run", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env("PLANTRELAY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // READY=1 with a status line first.
    let start = Instant::now();
    let ready = loop {
        let msgs = collect(&sock, Instant::now() + Duration::from_millis(200));
        if let Some((_, m)) = msgs.iter().find(|(_, m)| m.contains("READY=1")) {
            break m.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no READY=1");
    };
    assert!(ready.contains("STATUS=central backlog 0 (ok)"), "{ready}");
    // The listener is bound by the time READY=1 is sent.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());

    let healthy = collect(&sock, Instant::now() + Duration::from_secs(2));
    assert!(
        pings(&healthy) >= 3,
        "pings every 200 ms while healthy: {healthy:?}"
    );

    // Wedge the writer: hold the journal's write lock from another process
    // and make the agent write.
    let db = rusqlite::Connection::open(h.state_dir().join("journal.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let poster = tokio::spawn({
        let url = format!("http://127.0.0.1:{port}/v1/events");
        async move {
            support::agent::post(
                &support::agent::http_client(),
                &url,
                &mes_events("wedge", 1, 1),
            )
            .await
        }
    });
    // The writer's heartbeat goes stale after 5 s; from then on no pings.
    let _ = collect(&sock, Instant::now() + Duration::from_millis(6000));
    let wedged = collect(&sock, Instant::now() + Duration::from_millis(2500));
    assert_eq!(
        pings(&wedged),
        0,
        "no WATCHDOG=1 while the writer is wedged: {wedged:?}"
    );
    assert!(
        wedged
            .iter()
            .any(|(_, m)| m.contains("STATUS=unhealthy: journal writer has not completed a turn")),
        "{wedged:?}"
    );

    // Released: the writer recovers and the pings come back.
    db.execute_batch("ROLLBACK").unwrap();
    drop(db);
    let _ = poster.await;
    let recovered = collect(&sock, Instant::now() + Duration::from_secs(12));
    assert!(pings(&recovered) >= 3, "pings resume after recovery");

    support::signal(child.id(), "TERM");
    let stopping = collect(&sock, Instant::now() + Duration::from_secs(5));
    assert!(
        stopping.iter().any(|(_, m)| m.contains("STOPPING=1")),
        "{stopping:?}"
    );
    assert!(child.wait().unwrap().success());
}
