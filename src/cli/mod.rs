//! The offline commands of the CLI: `check-config`, `journal stats|tail|
//! dead-letters` and `replay`. They print for people (tables) or machines
//! (`--json`) on standard output. They read the journal with their own read
//! connection, so they work beside a running agent; `replay` writes, so it
//! refuses to run while an agent holds the journal.
//!
//! Ids, streams, types, sources, data and reasons came from the network:
//! tables print them with control characters escaped ([`crate::text`]), so
//! that nothing in the journal can drive the terminal that reads it.

pub mod fleet;
pub mod status;

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use crate::config::Config;
use crate::journal::{Journal, JournalError, Reader, RewindTo};
use crate::text;
use crate::units::{fmt_bytes, rfc3339_us, since_time};

/// A CLI failure with its exit status: 2 for bad config or usage, 1 for
/// anything at run time.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError {
            code: 2,
            message: message.into(),
        }
    }

    pub fn runtime(message: impl Into<String>) -> CliError {
        CliError {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<JournalError> for CliError {
    fn from(e: JournalError) -> CliError {
        CliError::runtime(e.to_string())
    }
}

pub fn load_config(path: &Path) -> Result<Config, CliError> {
    Config::load(path).map_err(|e| CliError::usage(e.to_string()))
}

/// `check-config`: every problem, or a one-line summary.
pub fn check_config(path: &Path, out: &mut impl Write) -> Result<(), CliError> {
    let config = load_config(path)?;
    let unsupported = crate::config::unsupported(&config);
    if !unsupported.is_empty() {
        let text = unsupported
            .iter()
            .map(|i| format!("{}: {}: {}", path.display(), i.key_path, i.message))
            .collect::<Vec<_>>()
            .join("\n");
        return Err(CliError::usage(text));
    }
    let mut err = std::io::stderr().lock();
    for w in crate::config::risky_settings(&config) {
        let _ = writeln!(
            err,
            "{}: warning: {}: {}",
            path.display(),
            w.key_path,
            w.message
        );
    }
    let _ = writeln!(
        out,
        "{}: ok (agent {}, {} source(s): {}; {} sink(s): {}; journal {})",
        path.display(),
        config.agent.id,
        config.source_names().len(),
        config.source_names().join(", "),
        config.sink_names().len(),
        config.sink_names().join(", "),
        config.agent.state_dir.join("journal.db").display()
    );
    Ok(())
}

fn open_reader(config: &Config) -> Result<Reader, CliError> {
    Ok(Reader::open(&config.agent.state_dir.join("journal.db"))?)
}

fn json_out<T: serde::Serialize>(out: &mut impl Write, v: &T) -> Result<(), CliError> {
    let json = serde_json::to_string_pretty(v).map_err(|e| CliError::runtime(e.to_string()))?;
    let _ = writeln!(out, "{}", text::json_safe(&json));
    Ok(())
}

/// Prints rows as a table with aligned columns, every cell escaped.
fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| text::escape(c).into_owned()).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(out, header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(out, r.clone());
    }
}

/// `journal stats`.
pub fn journal_stats(config: &Config, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    let reader = open_reader(config)?;
    let s = reader.stats()?;
    if json {
        return json_out(out, &s);
    }
    let max = config.journal.max_size;
    let rows = vec![
        vec!["path".into(), s.path.display().to_string()],
        vec!["schema version".into(), s.schema_version.to_string()],
        vec![
            "size".into(),
            format!(
                "{} live of {} max ({:.1}%), file {}, WAL {}, pages of {} bytes",
                fmt_bytes(s.used_bytes),
                fmt_bytes(max),
                100.0 * s.used_bytes as f64 / max.max(1) as f64,
                fmt_bytes(s.file_bytes),
                fmt_bytes(s.wal_bytes),
                s.page_size
            ),
        ],
        vec!["events".into(), s.events.to_string()],
        vec![
            "seq range".into(),
            match s.first_seq {
                Some(f) => format!("{f} … {}", s.last_seq),
                None => format!("empty (last seq {})", s.last_seq),
            },
        ],
        vec!["streams".into(), s.streams.to_string()],
        vec!["duplicates dropped".into(), s.duplicates.to_string()],
        vec![
            "evicted".into(),
            format!(
                "{} telemetry, {} critical ({} gap records)",
                s.evicted_telemetry, s.evicted_critical, s.gaps
            ),
        ],
        vec!["dead letters".into(), s.dead_letters.to_string()],
        vec![
            "retention deleted through seq".into(),
            s.retention_through.to_string(),
        ],
        vec![
            "quarantine".into(),
            s.quarantined_at_us.map_or("none".into(), |t| {
                format!("a damaged journal was replaced at {}", rfc3339_us(t))
            }),
        ],
    ];
    table(out, &["journal", ""], &rows);
    let _ = writeln!(out);
    let configured = config.sink_names();
    let mut sink_rows = Vec::new();
    for name in &configured {
        let cursor = s
            .cursors
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, c)| *c);
        sink_rows.push(vec![
            name.to_string(),
            cursor.to_string(),
            s.last_seq.saturating_sub(cursor).to_string(),
        ]);
    }
    for (name, cursor) in &s.cursors {
        let sink = crate::journal::lane_of_key(name).map_or(name.as_str(), |(s, _)| s);
        if name != sink && configured.contains(&sink) {
            sink_rows.push(vec![format!("  {name}"), cursor.to_string(), String::new()]);
        } else if !configured.contains(&name.as_str()) {
            sink_rows.push(vec![
                format!("{name} (not in config)"),
                cursor.to_string(),
                s.last_seq.saturating_sub(*cursor).to_string(),
            ]);
        }
    }
    table(out, &["sink", "cursor", "backlog"], &sink_rows);
    Ok(())
}

/// `journal tail`.
pub fn journal_tail(
    config: &Config,
    n: usize,
    stream: Option<&str>,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let reader = open_reader(config)?;
    let events = reader.tail(n, stream)?;
    if json {
        for e in &events {
            let mut line = Vec::new();
            e.write_cloudevent(&config.agent.id, &mut line);
            let _ = out.write_all(text::json_safe(&String::from_utf8_lossy(&line)).as_bytes());
            let _ = writeln!(out);
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let mut data = String::from_utf8_lossy(&e.data).to_string();
            if data.chars().count() > 60 {
                data = data.chars().take(59).collect::<String>() + "…";
            }
            vec![
                e.seq.to_string(),
                rfc3339_us(e.recv_time_us),
                e.source.clone(),
                e.stream.clone(),
                e.stream_seq.to_string(),
                e.id.clone(),
                e.event_type.clone(),
                data,
            ]
        })
        .collect();
    table(
        out,
        &[
            "seq",
            "received",
            "source",
            "stream",
            "stream seq",
            "id",
            "type",
            "data",
        ],
        &rows,
    );
    Ok(())
}

/// `journal dead-letters`.
pub fn journal_dead_letters(
    config: &Config,
    sink: Option<&str>,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let reader = open_reader(config)?;
    let list = reader.dead_letters(sink)?;
    if json {
        return json_out(out, &list);
    }
    if list.is_empty() {
        let _ = writeln!(out, "no dead letters");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.sink.clone(),
                d.seq.to_string(),
                d.stream.clone(),
                d.event_id.clone(),
                rfc3339_us(d.time_us),
                d.reason.clone(),
            ]
        })
        .collect();
    table(
        out,
        &["id", "sink", "seq", "stream", "event id", "since", "reason"],
        &rows,
    );
    Ok(())
}

/// Parses `--since`: RFC 3339 (`2026-11-29T08:00:00Z`) or an age (`2h`).
pub fn parse_since(s: &str) -> Result<SystemTime, CliError> {
    since_time("--since", s).map_err(CliError::usage)
}

/// `replay`: rewinds a sink's cursor in a stopped agent's journal.
pub async fn replay(
    config: &Config,
    sink: &str,
    class: Option<crate::event::Class>,
    to: RewindTo,
    out: &mut impl Write,
) -> Result<(), CliError> {
    if !config.sink_names().contains(&sink) {
        return Err(CliError::usage(format!(
            "--sink {sink:?}: no such sink in the config (sinks: {})",
            config.sink_names().join(", ")
        )));
    }
    if let Some(class) = class {
        let lane = crate::journal::cursor_key(sink, Some(class));
        if !config.cursor_keys().contains(&lane) {
            return Err(CliError::usage(format!(
                "--class {class}: sink {sink} has no {class} lane to replay alone (it sends in journal order, or does not take {class}); replay without --class"
            )));
        }
    }
    let opts = config.journal_options();
    if crate::journal::is_locked(&opts.path) {
        return Err(CliError::runtime(format!(
            "the agent is running on {}: replay through its admin API (POST /api/v1/sinks/{sink}/replay), or stop it first",
            opts.path.display()
        )));
    }
    let journal = tokio::task::spawn_blocking(move || Journal::open(opts))
        .await
        .map_err(|e| CliError::runtime(e.to_string()))??;
    let result = match class {
        Some(c) => journal.rewind_class(sink, c, to).await,
        None => journal.rewind(sink, to).await,
    };
    journal.close().await;
    let cursor = result?;
    let _ = writeln!(
        out,
        "sink {sink}: cursor set to {cursor}; events from seq {} on are delivered again at the next start",
        cursor + 1
    );
    Ok(())
}

/// `plantrelay opcua trust`: moves the rejected server certificate(s) of an
/// OPC UA source to `trusted/`. Returns the exit status: 0 when something
/// was trusted, 1 when there was nothing to trust.
pub fn opcua_trust(
    config: &Config,
    source: &str,
    fingerprint: Option<&str>,
    all: bool,
    out: &mut impl Write,
) -> Result<u8, CliError> {
    use crate::sources::opcua::pki;
    if !config.sources.opcua.iter().any(|s| s.name == source) {
        let names: Vec<&str> = config
            .sources
            .opcua
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        return Err(CliError::usage(format!(
            "no [[sources.opcua]] named `{source}` in the config (OPC UA sources: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        )));
    }
    let dir = pki::source_dir(&config.agent.state_dir, source);
    let rejected = pki::list(&dir, "rejected").map_err(CliError::runtime)?;
    let io = |e: std::io::Error| CliError::runtime(e.to_string());
    if rejected.is_empty() {
        writeln!(
            out,
            "no rejected server certificate in {}",
            dir.join("rejected").display()
        )
        .map_err(io)?;
        for c in pki::list(&dir, "trusted").map_err(CliError::runtime)? {
            writeln!(
                out,
                "trusted: {}  sha256 {}  ({})",
                text::escape(&c.subject),
                pki::colon_hex(&c.sha256),
                c.path.display()
            )
            .map_err(io)?;
        }
        return Ok(1);
    }
    let chosen: Vec<&pki::CertFile> = match (fingerprint, all) {
        (Some(f), _) => {
            let want = pki::parse_fingerprint(f).map_err(CliError::usage)?;
            let m: Vec<&pki::CertFile> = rejected.iter().filter(|c| c.sha256 == want).collect();
            if m.is_empty() {
                return Err(CliError::usage(format!(
                    "no rejected certificate in {} has the SHA-256 {}",
                    dir.join("rejected").display(),
                    pki::colon_hex(&want)
                )));
            }
            m
        }
        (None, true) => rejected.iter().collect(),
        (None, false) if rejected.len() == 1 => rejected.iter().collect(),
        (None, false) => {
            let mut text = format!(
                "{} rejected certificates; pick one with --fingerprint or trust all with --all:",
                rejected.len()
            );
            for c in &rejected {
                text.push_str(&format!(
                    "\n  {}  sha256 {}",
                    text::escape(&c.subject),
                    pki::colon_hex(&c.sha256)
                ));
            }
            return Err(CliError::usage(text));
        }
    };
    for c in chosen {
        let to = pki::trust(&dir, c).map_err(CliError::runtime)?;
        writeln!(
            out,
            "trusted: {}  sha256 {}  → {}",
            text::escape(&c.subject),
            pki::colon_hex(&c.sha256),
            to.display()
        )
        .map_err(io)?;
    }
    Ok(0)
}
