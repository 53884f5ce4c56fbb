//! `plantrelay status --fleet FILE`: pulls `/api/v1/status` from many
//! gateways at once and prints one row per gateway, worst first.
//!
//! It owns the fleet file (TOML: defaults for `token_file`, `ca_file`,
//! `client_cert`, `client_key`, and `[[gateway]]` entries that may override
//! them), the bounded fan-out and the per-gateway verdict. The healthy /
//! degraded rule, the URL rule and the client set-up are `status_cli`'s, so
//! one gateway reads the same with `--url` and in a fleet.
//!
//! It must never let one gateway hold the others up: at most `concurrency`
//! pulls run at once, and each one (connect, TLS, answer and body) ends
//! after `timeout` whatever the gateway does. A problem with one gateway
//! (unreachable, TLS, 401, not a status answer) is that gateway's row, never
//! an error of the whole command; only a bad fleet file is (exit 2).
//!
//! Exit status: 0 every gateway healthy; 1 any degraded; 2 any unreachable
//! or unauthorized (or a bad fleet file or usage).
//!
//! Text from the network is escaped ([`crate::text`]) before it reaches the
//! terminal; the JSON output goes through [`crate::text::json_safe`].

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::cli::CliError;
use crate::cli::status::{chain, is_healthy, status_url};
use crate::config::read_secret;
use crate::tls::{self, ClientTls};
use crate::units::short_secs;

/// Default for `--timeout`: a gateway that has not answered by then is
/// `unreachable`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for `--concurrency`: pulls in flight at once. With 500 gateways
/// and a handful dead, the dead ones cost one timeout each per slot, not one
/// each in a row.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Upper bound for `--concurrency` (each pull holds a socket and a TLS
/// session).
pub const MAX_CONCURRENCY: usize = 1024;

/// What `plantrelay status --fleet` was asked.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub file: PathBuf,
    pub json: bool,
    pub timeout: Duration,
    pub concurrency: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default)]
    gateway: Vec<GatewayEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayEntry {
    name: String,
    url: String,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

/// One gateway, its defaults applied and its paths resolved.
#[derive(Debug, Clone)]
struct Gateway {
    name: String,
    url: url::Url,
    token: Option<Arc<str>>,
    tls: TlsKey,
}

/// The TLS settings that need a client of their own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TlsKey {
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

/// A gateway's state, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Unreachable,
    Unauthorized,
    Degraded,
    Healthy,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Unreachable => "unreachable",
            State::Unauthorized => "unauthorized",
            State::Degraded => "degraded",
            State::Healthy => "healthy",
        }
    }
}

/// One row: the contract of `--output json` (field names are stable).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub state: State,
    /// Events waiting, summed over the gateway's sinks.
    pub backlog: Option<u64>,
    /// The oldest undelivered event's age over all its sinks.
    pub oldest_undelivered_age_s: Option<f64>,
    pub dead_letters: Option<u64>,
    /// Sources not started or not connected.
    pub sources_down: Option<u64>,
    /// Why it is not healthy (bounded; as the gateway or the network said it).
    pub error: Option<String>,
}

fn bad_file(file: &Path, message: impl std::fmt::Display) -> CliError {
    CliError::usage(format!("fleet file {}: {message}", file.display()))
}

/// Reads and checks the fleet file. Relative paths in it are taken from the
/// file's own directory, so a fleet file can travel with its certificates.
fn load(file: &Path) -> Result<Vec<Gateway>, CliError> {
    let text = std::fs::read_to_string(file).map_err(|e| bad_file(file, e))?;
    let parsed: FleetFile = toml::from_str(&text).map_err(|e| bad_file(file, e))?;
    if parsed.gateway.is_empty() {
        return Err(bad_file(
            file,
            "no [[gateway]] entries (each needs name and url)",
        ));
    }
    let base = file.parent().unwrap_or(Path::new("."));
    let resolve = |p: Option<&PathBuf>| p.map(|p| base.join(p));
    let mut names = HashSet::new();
    let mut tokens: HashMap<PathBuf, Arc<str>> = HashMap::new();
    let mut gateways = Vec::with_capacity(parsed.gateway.len());
    for (i, g) in parsed.gateway.iter().enumerate() {
        let at = format!("gateway[{i}] ({:?})", g.name);
        if g.name.trim().is_empty() {
            return Err(bad_file(file, format!("gateway[{i}].name: empty")));
        }
        if !names.insert(g.name.clone()) {
            return Err(bad_file(
                file,
                format!("{at}.name: another gateway has this name"),
            ));
        }
        let url = status_url(&g.url).map_err(|e| {
            bad_file(
                file,
                format!("{at}.url: {}", e.message.trim_start_matches("--url ")),
            )
        })?;
        let token_file = resolve(g.token_file.as_ref().or(parsed.token_file.as_ref()));
        let token = match token_file {
            Some(p) => match tokens.get(&p) {
                Some(t) => Some(t.clone()),
                None => {
                    let t: Arc<str> = read_secret(&p)
                        .map_err(|e| bad_file(file, format!("{at}.token_file: {e}")))?
                        .into();
                    tokens.insert(p, t.clone());
                    Some(t)
                }
            },
            None => None,
        };
        let tls = TlsKey {
            ca_file: resolve(g.ca_file.as_ref().or(parsed.ca_file.as_ref())),
            client_cert: resolve(g.client_cert.as_ref().or(parsed.client_cert.as_ref())),
            client_key: resolve(g.client_key.as_ref().or(parsed.client_key.as_ref())),
        };
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            return Err(bad_file(
                file,
                format!("{at}: client_cert and client_key go together (one is set, not the other)"),
            ));
        }
        gateways.push(Gateway {
            name: g.name.clone(),
            url,
            token,
            tls,
        });
    }
    Ok(gateways)
}

/// One client per distinct TLS setting: hundreds of gateways behind one CA
/// share one client (and its trust store).
fn clients(
    file: &Path,
    gateways: &[Gateway],
    timeout: Duration,
) -> Result<HashMap<TlsKey, reqwest::Client>, CliError> {
    tls::install_crypto_provider();
    let mut clients = HashMap::new();
    for g in gateways {
        if clients.contains_key(&g.tls) {
            continue;
        }
        let config = tls::client_config(&ClientTls {
            ca_file: g.tls.ca_file.clone(),
            ca_only: false,
            client_cert: g.tls.client_cert.clone(),
            client_key: g.tls.client_key.clone(),
        })
        .map_err(|e| bad_file(file, format!("gateway {:?}: {e}", g.name)))?;
        let client = tls::reqwest_client_builder(config)
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| bad_file(file, format!("gateway {:?}: {}", g.name, chain(&e))))?;
        clients.insert(g.tls.clone(), client);
    }
    Ok(clients)
}

fn bounded(s: &str) -> String {
    let max = crate::text::MAX_ERROR_LEN;
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(crate::text::TRUNCATED.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}", &s[..end], crate::text::TRUNCATED)
}

fn failed(name: &str, state: State, error: String) -> Row {
    Row {
        name: name.to_string(),
        state,
        backlog: None,
        oldest_undelivered_age_s: None,
        dead_letters: None,
        sources_down: None,
        error: Some(bounded(&error)),
    }
}

/// The cause of a failed request, in the words a plant IT engineer looks
/// for first: timeout, connection refused, TLS, DNS.
fn cause(e: &reqwest::Error) -> String {
    let text = chain(e);
    let lower = text.to_lowercase();
    let kind = if e.is_timeout() {
        "timeout"
    } else if lower.contains("refused") {
        "connection refused"
    } else if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("alert")
    {
        "TLS"
    } else if lower.contains("dns") || lower.contains("lookup") || lower.contains("resolve") {
        "DNS"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    };
    format!("{kind}: {text}")
}

async fn pull(client: &reqwest::Client, g: &Gateway) -> Row {
    let mut request = client.get(g.url.clone());
    if let Some(t) = &g.token {
        request = request.bearer_auth(t);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return failed(&g.name, State::Unreachable, cause(&e)),
    };
    let code = response.status();
    if code == reqwest::StatusCode::UNAUTHORIZED || code == reqwest::StatusCode::FORBIDDEN {
        return failed(
            &g.name,
            State::Unauthorized,
            format!("{code}: not authorised (check token_file, client_cert and client_key)"),
        );
    }
    if !code.is_success() {
        return failed(&g.name, State::Unreachable, format!("{}: {code}", g.url));
    }
    let text = match response.text().await {
        Ok(t) => t,
        Err(e) => {
            return failed(
                &g.name,
                State::Unreachable,
                format!("reading the answer: {}", cause(&e)),
            );
        }
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if v.is_object() && v.get("agent_id").is_some() => summarise(&g.name, &v),
        Ok(_) => failed(
            &g.name,
            State::Unreachable,
            format!("{}: not a status answer", g.url),
        ),
        Err(e) => failed(
            &g.name,
            State::Unreachable,
            format!("{}: not a status answer: {e}", g.url),
        ),
    }
}

/// One row from a status answer (read loosely, like `status_cli`).
pub fn summarise(name: &str, s: &Value) -> Row {
    let sinks = s["sinks"].as_array().map(Vec::as_slice).unwrap_or_default();
    let sum = |field: &str| -> Option<u64> {
        sinks
            .iter()
            .try_fold(0u64, |acc, k| Some(acc.saturating_add(k[field].as_u64()?)))
    };
    let oldest = sinks
        .iter()
        .filter_map(|k| k["oldest_undelivered_age_seconds"].as_f64())
        .fold(None, |acc: Option<f64>, a| {
            Some(acc.map_or(a, |b| b.max(a)))
        });
    let sources_down = s["sources"].as_array().map(|srcs| {
        srcs.iter()
            .filter(|src| {
                src["started"].as_bool() == Some(false) || src["connected"].as_bool() == Some(false)
            })
            .count() as u64
    });
    let healthy = is_healthy(s);
    let error = if healthy {
        None
    } else {
        // The first thing the agent itself says is wrong, then what its
        // upstream last said.
        let reason = s["warnings"]
            .as_array()
            .and_then(|w| w.iter().find_map(|w| w["message"].as_str()))
            .or_else(|| {
                s["not_ready_reasons"]
                    .as_array()
                    .and_then(|r| r.iter().find_map(Value::as_str))
            });
        let last_error = sinks.iter().find_map(|k| {
            k["last_error"]
                .as_str()
                .map(|e| (k["name"].as_str().unwrap_or("?"), e))
        });
        match (reason, last_error) {
            (Some(r), Some((sink, e))) if !r.contains(e) => {
                Some(format!("{r}; sink '{sink}' last error: {e}"))
            }
            (Some(r), _) => Some(r.to_string()),
            (None, Some((sink, e))) => Some(format!("sink '{sink}' last error: {e}")),
            (None, None) => Some("not ready".to_string()),
        }
    };
    Row {
        name: name.to_string(),
        state: if healthy {
            State::Healthy
        } else {
            State::Degraded
        },
        backlog: sum("backlog_events"),
        oldest_undelivered_age_s: oldest,
        dead_letters: sum("dead_letters"),
        sources_down,
        error: error.map(|e| bounded(&e)),
    }
}

/// Worst first: state, then the oldest undelivered age, then the backlog,
/// then the name.
pub fn sort(rows: &mut [Row]) {
    rows.sort_by(|a, b| {
        a.state
            .cmp(&b.state)
            .then_with(|| {
                let age = |r: &Row| r.oldest_undelivered_age_s.unwrap_or(0.0);
                age(b).total_cmp(&age(a))
            })
            .then_with(|| b.backlog.unwrap_or(0).cmp(&a.backlog.unwrap_or(0)))
            .then_with(|| a.name.cmp(&b.name))
    });
}

/// The exit status for a set of rows.
pub fn exit_code(rows: &[Row]) -> u8 {
    match rows.iter().map(|r| r.state).min() {
        Some(State::Unreachable | State::Unauthorized) => 2,
        Some(State::Degraded) => 1,
        _ => 0,
    }
}

/// Pulls every gateway, at most `concurrency` at once, each bounded by
/// `timeout`. Rows come back sorted, worst first.
pub async fn pull_all(opts: &FleetOptions) -> Result<Vec<Row>, CliError> {
    if opts.concurrency == 0 || opts.concurrency > MAX_CONCURRENCY {
        return Err(CliError::usage(format!(
            "--concurrency {}: must be 1..={MAX_CONCURRENCY}",
            opts.concurrency
        )));
    }
    if opts.timeout.is_zero() {
        return Err(CliError::usage("--timeout: must be more than 0s"));
    }
    let gateways = load(&opts.file)?;
    let clients = clients(&opts.file, &gateways, opts.timeout)?;
    let permits = Arc::new(Semaphore::new(opts.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for g in gateways {
        let Some(client) = clients.get(&g.tls).cloned() else {
            // `clients` built one client for every gateway's TLS key above.
            continue;
        };
        let permits = permits.clone();
        let timeout = opts.timeout;
        tasks.spawn(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = permits.acquire_owned().await.ok();
            match tokio::time::timeout(timeout, pull(&client, &g)).await {
                Ok(row) => row,
                Err(_) => failed(
                    &g.name,
                    State::Unreachable,
                    format!(
                        "timeout: no answer within {} (connect, TLS and status)",
                        humantime::format_duration(timeout)
                    ),
                ),
            }
        });
    }
    let mut rows = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(row) => rows.push(row),
            Err(e) => {
                return Err(CliError::runtime(format!(
                    "a gateway pull ended abnormally: {e}"
                )));
            }
        }
    }
    sort(&mut rows);
    Ok(rows)
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

/// The table: a header, one line per row, and a count per state.
pub fn render(rows: &[Row]) -> String {
    let mut table = vec![
        [
            "GATEWAY",
            "STATE",
            "BACKLOG",
            "OLDEST",
            "DEAD LETTERS",
            "SOURCES DOWN",
            "ERROR",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        table.push(vec![
            crate::text::escape(&r.name).into_owned(),
            r.state.as_str().to_string(),
            opt(r.backlog),
            match (r.state, r.oldest_undelivered_age_s) {
                (_, Some(a)) => short_secs(a),
                (State::Healthy | State::Degraded, None) => "-".into(),
                _ => "?".into(),
            },
            opt(r.dead_letters),
            opt(r.sources_down),
            r.error.as_deref().map_or("-".into(), |e| {
                crate::text::escape_control(e, crate::text::MAX_ERROR_LEN).into_owned()
            }),
        ]);
    }
    let mut out: String = crate::cli::status::rows(&table)
        .into_iter()
        .map(|l| l.strip_prefix("  ").unwrap_or(&l).to_string())
        .collect();
    let count = |s: State| rows.iter().filter(|r| r.state == s).count();
    out.push_str(&format!(
        "{} gateways: {} healthy, {} degraded, {} unreachable, {} unauthorized\n",
        rows.len(),
        count(State::Healthy),
        count(State::Degraded),
        count(State::Unreachable),
        count(State::Unauthorized)
    ));
    out
}

/// `plantrelay status --fleet`: prints, and returns the exit status.
pub async fn run(opts: &FleetOptions, out: &mut impl Write) -> Result<u8, CliError> {
    let rows = pull_all(opts).await?;
    if opts.json {
        let text =
            serde_json::to_string_pretty(&rows).map_err(|e| CliError::runtime(e.to_string()))?;
        let _ = writeln!(out, "{}", crate::text::json_safe(&text));
    } else {
        let _ = out.write_all(render(&rows).as_bytes());
    }
    Ok(exit_code(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(ready: bool) -> Value {
        json!({
            "agent_id": "gw", "ready": ready, "warnings": [],
            "not_ready_reasons": if ready { json!([]) } else { json!(["sink 'central' stalled"]) },
            "sources": [{"name": "mes", "started": true, "connected": true},
                        {"name": "press", "started": true, "connected": false}],
            "sinks": [{"name": "central", "state": if ready { "ok" } else { "stalled" },
                       "backlog_events": 40, "oldest_undelivered_age_seconds": 75.5,
                       "dead_letters": 2, "last_error": "connection refused"},
                      {"name": "backup", "state": "ok", "backlog_events": 2,
                       "oldest_undelivered_age_seconds": 3.0, "dead_letters": 0,
                       "last_error": null}]
        })
    }

    #[test]
    fn a_row_sums_the_sinks_and_counts_the_sources_down() {
        let r = summarise("hamburg-01", &answer(true));
        assert_eq!(r.state, State::Healthy);
        assert_eq!(r.backlog, Some(42));
        assert_eq!(r.oldest_undelivered_age_s, Some(75.5));
        assert_eq!(r.dead_letters, Some(2));
        assert_eq!(r.sources_down, Some(1));
        assert_eq!(r.error, None);
    }

    #[test]
    fn an_age_no_duration_holds_reads_as_the_longest() {
        let mut a = answer(true);
        a["sinks"][0]["oldest_undelivered_age_seconds"] = json!(1e20);
        let text = render(&[summarise("hamburg-01", &a)]);
        let longest = crate::units::short_duration(Duration::MAX);
        assert!(text.contains(&longest), "{text}");
    }

    #[test]
    fn a_degraded_row_says_why_and_what_the_upstream_said() {
        let r = summarise("hamburg-01", &answer(false));
        assert_eq!(r.state, State::Degraded);
        assert_eq!(
            r.error.as_deref(),
            Some("sink 'central' stalled; sink 'central' last error: connection refused")
        );
    }

    #[test]
    fn rows_sort_worst_first_and_the_exit_status_follows_the_worst() {
        let mut rows = vec![
            summarise("b-healthy", &answer(true)),
            summarise("a-degraded", &answer(false)),
            failed("c-down", State::Unreachable, "timeout".into()),
            failed("d-401", State::Unauthorized, "401".into()),
        ];
        assert_eq!(exit_code(&rows), 2);
        sort(&mut rows);
        let names: Vec<_> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["c-down", "d-401", "a-degraded", "b-healthy"]);
        assert_eq!(exit_code(&rows[2..]), 1);
        assert_eq!(exit_code(&rows[3..]), 0);
    }

    #[test]
    fn the_table_escapes_what_a_gateway_said() {
        let mut s = answer(false);
        s["sinks"][0]["last_error"] = json!(format!("\u{1b}]0;owned\u{7}{}", "z".repeat(5000)));
        let text = render(&[summarise("gw\nfake healthy", &s)]);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text}"
        );
        assert!(text.contains("gw\\nfake healthy"), "{text}");
        assert!(text.lines().all(|l| l.len() < 1200), "{text}");
        assert!(
            text.ends_with("1 gateways: 0 healthy, 1 degraded, 0 unreachable, 0 unauthorized\n")
        );
    }

    #[test]
    fn a_fleet_file_names_the_gateway_and_key_it_cannot_use() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleet.toml");
        std::fs::write(
            &file,
            "[[gateway]]\nname = \"a\"\nurl = \"https://a:8443\"\n[[gateway]]\nname = \"b\"\nurl = \"http://b:8443\"\n",
        )
        .unwrap();
        let e = load(&file).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(
            e.message.contains("gateway[1] (\"b\").url"),
            "{}",
            e.message
        );
        assert!(e.message.contains("HTTPS only"), "{}", e.message);

        std::fs::write(
            &file,
            "[[gateway]]\nname = \"a\"\nurl = \"https://a\"\ntoken_file = \"missing.token\"\n",
        )
        .unwrap();
        let e = load(&file).unwrap_err();
        assert!(
            e.message.contains("gateway[0] (\"a\").token_file"),
            "{}",
            e.message
        );
        assert!(e.message.contains("missing.token"), "{}", e.message);

        std::fs::write(
            &file,
            "[[gateway]]\nname = \"a\"\nurl = \"https://a\"\nca = \"x\"\n",
        )
        .unwrap();
        let e = load(&file).unwrap_err();
        assert!(e.message.contains("unknown field `ca`"), "{}", e.message);

        std::fs::write(&file, "ca_file = \"x\"\n").unwrap();
        assert!(load(&file).unwrap_err().message.contains("no [[gateway]]"));
    }
}
