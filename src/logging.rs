//! Log set-up: `tracing` to standard error, human text by default or one JSON
//! object per line, filtered like `RUST_LOG` (`PLANTRELAY_LOG` wins if set).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Installs the global subscriber. `default` is the filter when neither
/// `PLANTRELAY_LOG` nor `RUST_LOG` is set (e.g. `"info"`).
pub fn init(format: LogFormat, default: &str) {
    let filter = std::env::var("PLANTRELAY_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    // Colours only for a person at a terminal: not for journald, files or
    // pipes, and never when NO_COLOR is set (https://no-color.org).
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // A second init (tests) keeps the first subscriber: ignore the error.
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
