//! The status page in a real browser: Debian's Chromium, headless, loads
//! `GET /` from a running agent's health listener (HTTPS with the test CA,
//! which the browser is told to accept; `allow_unauthenticated` on
//! loopback, a browser sending no token) at a phone's width, and the DOM
//! it built and a screenshot are checked for the key texts and a real
//! image. Run with `cargo test --features interop --test
//! interop_status_page` (`.ci/run` installs Chromium and does).

#![cfg(feature = "interop")]

use crate::support;

use std::process::Command;
use std::time::Duration;

use plantrelay::agent;
use plantrelay::config::Config;
use support::agent::{Harness, http_client, mes_events, post};

fn chromium() -> &'static str {
    for bin in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return bin;
        }
    }
    panic!("no Chromium on this machine (apt-get install chromium)");
}

/// Chromium with a profile of its own in `dir`, headless, phone-sized.
fn browse(dir: &std::path::Path, url: &str, action: &str) -> std::process::Output {
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--ignore-certificate-errors",
            "--window-size=412,915",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(action)
        .arg(url)
        .output()
        .expect("chromium runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_in_a_real_browser() {
    let h = Harness::new().await;
    let health = format!(
        "[health]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nallow_unauthenticated = true\n",
        h.paths.server_cert.display(),
        h.paths.server_key.display()
    );
    let text = h.config_text("127.0.0.1:0", &h.receiver.url(), "", &health);
    let a = agent::start(&Config::load(&h.write_config(&text)).unwrap())
        .await
        .unwrap();
    let url = format!("http://{}/v1/events", a.http_addr("mes").unwrap());
    let (code, _) = post(&http_client(), &url, &mes_events("page", 20, 2)).await;
    assert_eq!(code, 202);
    assert!(
        h.receiver.wait_for(20, Duration::from_secs(30)).await,
        "events not delivered"
    );
    let page = format!("https://127.0.0.1:{}/", a.health_addr.unwrap().port());
    let dir = tempfile::tempdir().unwrap();
    let (dir_path, page_url) = (dir.path().to_path_buf(), page.clone());
    let dom = tokio::task::spawn_blocking(move || browse(&dir_path, &page_url, "--dump-dom"))
        .await
        .unwrap();
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    for text in [
        "plantrelay gw-test",
        "ready",
        "Sources",
        "<td>mes</td>",
        "Sinks",
        "<td>central</td>",
        "Journal",
    ] {
        assert!(
            dom_text.contains(text),
            "{text} not in the DOM:\n{dom_text}"
        );
    }
    let shot = dir.path().join("page.png");
    let (dir_path, shot_arg) = (
        dir.path().to_path_buf(),
        format!("--screenshot={}", shot.display()),
    );
    let out = tokio::task::spawn_blocking(move || browse(&dir_path, &page, &shot_arg))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert!(
        png.len() > 5_000,
        "a page, not a blank: {} bytes",
        png.len()
    );
    a.shutdown().await;
}
