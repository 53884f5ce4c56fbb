//! Every log line of the test process, for tests that assert on what the
//! agent logs (audit lines, secrets that must never appear). One global
//! subscriber serves the whole test binary, since a process can have only
//! one: it is installed by the first test that asks and keeps everything
//! from then on, so a test looks for its own lines, never for the absence
//! of another test's.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

struct Capture {
    lines: Mutex<Vec<u8>>,
    filter: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let (filter, handle) = reload::Layer::new(EnvFilter::new("info"));
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(|| Writer),
            )
            .init();
        Capture {
            lines: Mutex::new(Vec::new()),
            filter: handle,
        }
    })
}

struct Writer;
impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        capture().lines.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts capturing (at `info`) if nobody has yet.
pub fn start() {
    capture();
}

/// Captures at `debug` for every target from now on (for a test that
/// asserts a secret is in no log line at any level).
pub fn debug() {
    let _ = capture().filter.reload(EnvFilter::new("debug"));
}

/// Everything captured so far.
pub fn text() -> String {
    String::from_utf8_lossy(&capture().lines.lock().unwrap()).into_owned()
}

/// Back to `info` for every target.
pub fn info() {
    let _ = capture().filter.reload(EnvFilter::new("info"));
}
