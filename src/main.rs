//! The `plantrelay` command line. Parsing and dispatch only: every command's
//! work lives in the library.
//!
//! Exit status: 0 ok; 1 failure at run time; 2 bad config or usage.

// The daemon must not die of a bad input or a full disk: no unwrap,
// expect or panic on its paths. A true invariant may still assert, with
// `#[allow(...)]` and a comment that says why it cannot fail.
#![warn(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::dbg_macro,
    clippy::todo,
    clippy::unimplemented
)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use plantrelay::cli::{self, CliError};
use plantrelay::journal::RewindTo;
use plantrelay::logging::{self, LogFormat};
use tokio::signal::unix::{Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Plant-edge store-and-forward agent.
///
/// Collects MES events (HTTP ingest) and machine states (MQTT), journals
/// every event on local disk before acknowledging it, and forwards the
/// journal upstream over HTTPS in order, with replay and deduplication, once
/// the WAN allows.
#[derive(Parser)]
#[command(name = "plantrelay", version, propagate_version = true)]
#[command(
    after_help = "Exit status: 0 ok, 1 failure at run time, 2 bad config or usage.\n\
Logs go to standard error; filter them with PLANTRELAY_LOG or RUST_LOG (e.g. \"info,plantrelay=debug\")."
)]
struct Cli {
    /// Log format on standard error.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArg {
    /// The TOML config file.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or SIGINT (a second signal forces exit).
    ///
    /// Opens the journal under state_dir, binds every listener, starts the
    /// sources and forwarders and serves health. SIGHUP reloads the health
    /// listener's TLS certificates. Under systemd (Type=notify) it sends
    /// READY=1 once the journal is open and the listeners are bound,
    /// WATCHDOG=1 while the journal writer and the forwarders are alive,
    /// STATUS= with a one-line summary, and STOPPING=1 on shutdown.
    Run(ConfigArg),
    /// Validate a config file: exit 0, or 2 with every problem (file:line:col: key: message).
    ///
    /// Checks the syntax, every key and value, that every file the config
    /// names can be opened and that state_dir, if it exists, is a directory;
    /// refuses sections this release cannot run yet. Creates nothing.
    /// Risky but valid settings (ingest open on the network, an open health
    /// listener with an admin token, passwords in clear text) are printed
    /// as warnings on standard error; `run` logs them at start.
    CheckConfig(ConfigArg),
    /// Pull a running agent's status over HTTPS (or a fleet's, with --fleet):
    /// exit 0 healthy, 1 degraded, 2 unreachable, unauthorised or bad usage.
    Status(StatusArgs),
    /// Inspect the journal (works beside a running agent).
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Deliver again to one sink, from a seq or a time on (the agent must be stopped).
    ///
    /// Sets the sink's cursor back in the journal; at the next start the
    /// forwarder sends those events again, with the same ids. Refused while
    /// an agent holds the journal (use its admin API, POST
    /// /api/v1/sinks/NAME/replay, instead) and when retention already
    /// deleted part of the range.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// The sink to replay to.
        #[arg(long)]
        sink: String,
        /// First seq to deliver again.
        #[arg(long, conflicts_with = "since", required_unless_present = "since")]
        from_seq: Option<u64>,
        /// Deliver again everything received since then: RFC 3339 time or an age ("2h").
        #[arg(long)]
        since: Option<String>,
        /// Replay only this class (critical or telemetry), for a sink that
        /// sends critical events first.
        #[arg(long, value_parser = ["critical", "telemetry"])]
        class: Option<String>,
    },
    /// OPC UA server certificates of a source.
    Opcua {
        #[command(subcommand)]
        command: OpcuaCommand,
    },
    /// Everything in one process: a simulated MES, the agent and an upstream
    /// receiver that drops out for a while; ends with a delivery verdict.
    #[cfg(feature = "demo")]
    Demo {
        /// How long the MES posts events.
        #[arg(long, default_value = "30s", value_parser = plantrelay::config::units::parse_duration)]
        duration: std::time::Duration,
        /// Keep the journal afterwards and print its path.
        #[arg(long)]
        keep: bool,
    },
    /// Write the manual page plantrelay(1) (roff) to standard output.
    #[command(hide = true)]
    Man,
}

#[derive(Args)]
struct StatusArgs {
    /// The agent's health listener, e.g. https://gw-hamburg-01:8443.
    #[arg(long, required_unless_present = "fleet", conflicts_with = "fleet")]
    url: Option<String>,
    /// Pull every gateway listed in FILE (TOML: token_file, ca_file,
    /// client_cert, client_key defaults and [[gateway]] name, url entries) at
    /// once: one row each, worst first; exit 0 all healthy, 1 any degraded, 2
    /// any unreachable or unauthorized.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["token_file", "ca_file", "client_cert"])]
    fleet: Option<PathBuf>,
    /// With --fleet: pull at most this many gateways at once.
    #[arg(long, default_value_t = plantrelay::cli::fleet::DEFAULT_CONCURRENCY, requires = "fleet")]
    concurrency: usize,
    /// Output format: a summary (table) or JSON (with --fleet, an array of
    /// name, state, backlog, oldest_undelivered_age_s, dead_letters,
    /// sources_down, error).
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
    /// File holding the bearer token (`token_file` of the agent).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate(s) to trust for the agent's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM), when the agent requires one.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Print the status JSON instead of the summary (same as --output json).
    #[arg(long)]
    json: bool,
    /// Give up after this long (with --fleet: per gateway, connect, TLS and
    /// answer together; a gateway still silent then is unreachable).
    #[arg(long, default_value = "10s", value_parser = plantrelay::config::units::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

#[derive(Subcommand)]
enum OpcuaCommand {
    /// Trust the server certificate(s) the source refused: moves them from
    /// `<state_dir>/pki/<source>/rejected/` to `trusted/` and prints each
    /// one's SHA-256 fingerprint. Compare the fingerprint with the one the
    /// server shows before trusting. With one rejected certificate it is
    /// trusted; with several, name one with --fingerprint or pass --all.
    /// Without a rejected certificate it lists the trusted ones and exits 1.
    /// A running agent picks the change up at its next connection attempt.
    #[command(
        after_help = "Example:\n  plantrelay opcua trust -c /etc/plantrelay/plantrelay.toml --source press-line-3\n  plantrelay opcua trust -c FILE --source press-line-3 --fingerprint 3f:a2:9c:01:…:7e (all 32 bytes)"
    )]
    Trust {
        #[command(flatten)]
        config: ConfigArg,
        /// The `[[sources.opcua]]` name.
        #[arg(long)]
        source: String,
        /// Trust only the certificate with this SHA-256 fingerprint (all 64 hex digits; colons or spaces allowed).
        #[arg(long, conflicts_with = "all")]
        fingerprint: Option<String>,
        /// Trust every rejected certificate.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Size, seq range, counters, sink cursors and backlogs.
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The last events, oldest first.
    Tail {
        #[command(flatten)]
        config: ConfigArg,
        /// How many events.
        #[arg(short = 'n', long = "lines", default_value_t = 10)]
        n: usize,
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
        /// One CloudEvent per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Events an upstream rejected for good.
    DeadLetters {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        // The embedded broker logs its own client hang-ups at the end of
        // the demo as errors, and async-opcua the press restart the demo
        // stages; they are not the agent's.
        #[cfg(feature = "demo")]
        Command::Demo { .. } => {
            "error,rumqttd=off,opcua_client=off,opcua_core=off,opcua_server=off,opcua_crypto=off"
        }
        // async-opcua narrates every connect at info; the source logs the
        // connection story itself.
        _ => "info,opcua_client=warn,opcua_core=warn,opcua_crypto=warn",
    };
    logging::init(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plantrelay: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Messages may quote what an agent, a server or a file said:
            // one escaped line per line of the message.
            let lines: Vec<_> = e.message.lines().map(plantrelay::text::escape).collect();
            eprintln!("{}", lines.join("\n"));
            ExitCode::from(e.code as u8)
        }
    }
}

async fn dispatch(command: Command) -> Result<u8, CliError> {
    let mut out = std::io::stdout().lock();
    match command {
        Command::Run(c) => {
            let config = cli::load_config(&c.config)?;
            for w in plantrelay::config::risky_settings(&config) {
                tracing::warn!(
                    config = %c.config.display(),
                    key = %w.key_path,
                    "{}",
                    w.message
                );
            }
            let stop = CancellationToken::new();
            // Made before the journal opens and the listeners bind: a
            // signal that comes while the agent starts (systemd stopping
            // a service that is still starting) must not take its default
            // action, which ends the process with no shutdown. A SIGTERM
            // then stops the agent once it has started.
            let streams = SignalStreams::install();
            tokio::spawn(signals(stop.clone(), streams.term, streams.int));
            let agent = plantrelay::agent::start(&config)
                .await
                .map_err(|e| CliError {
                    code: e.exit_code(),
                    message: e.to_string(),
                })?;
            tokio::spawn(hangups(streams.hup, agent.tls_reloader()));
            stop.cancelled().await;
            agent.shutdown().await;
            Ok(0)
        }
        Command::Status(a) => {
            let json = a.json || a.output == OutputFormat::Json;
            let url = match (a.fleet, a.url) {
                (Some(file), _) => {
                    let opts = plantrelay::cli::fleet::FleetOptions {
                        file,
                        json,
                        timeout: a.timeout,
                        concurrency: a.concurrency,
                    };
                    return plantrelay::cli::fleet::run(&opts, &mut out).await;
                }
                (None, Some(url)) => url,
                (None, None) => return Err(CliError::usage("give --url or --fleet")),
            };
            let opts = plantrelay::cli::status::StatusOptions {
                url,
                token_file: a.token_file,
                ca_file: a.ca_file,
                client_cert: a.client_cert,
                client_key: a.client_key,
                json,
                timeout: a.timeout,
            };
            plantrelay::cli::status::run(&opts, &mut out).await
        }
        Command::CheckConfig(c) => cli::check_config(&c.config, &mut out).map(|_| 0),
        Command::Journal { command } => match command {
            JournalCommand::Stats { config, json } => {
                cli::journal_stats(&cli::load_config(&config.config)?, json, &mut out).map(|_| 0)
            }
            JournalCommand::Tail {
                config,
                n,
                stream,
                json,
            } => cli::journal_tail(
                &cli::load_config(&config.config)?,
                n,
                stream.as_deref(),
                json,
                &mut out,
            )
            .map(|_| 0),
            JournalCommand::DeadLetters { config, sink, json } => cli::journal_dead_letters(
                &cli::load_config(&config.config)?,
                sink.as_deref(),
                json,
                &mut out,
            )
            .map(|_| 0),
        },
        Command::Replay {
            config,
            sink,
            from_seq,
            since,
            class,
        } => {
            let class = match class.as_deref() {
                Some("critical") => Some(plantrelay::event::Class::Critical),
                Some("telemetry") => Some(plantrelay::event::Class::Telemetry),
                _ => None,
            };
            let to = match (from_seq, since) {
                (Some(s), _) => RewindTo::Seq(s),
                (None, Some(t)) => RewindTo::Since(cli::parse_since(&t)?),
                (None, None) => return Err(CliError::usage("give --from-seq or --since")),
            };
            cli::replay(
                &cli::load_config(&config.config)?,
                &sink,
                class,
                to,
                &mut out,
            )
            .await
            .map(|_| 0)
        }
        Command::Man => plantrelay::manpage::render(Cli::command(), &mut out)
            .map(|_| 0)
            .map_err(|e| CliError::runtime(format!("cannot write the manual page: {e}"))),
        Command::Opcua {
            command:
                OpcuaCommand::Trust {
                    config,
                    source,
                    fingerprint,
                    all,
                },
        } => cli::opcua_trust(
            &cli::load_config(&config.config)?,
            &source,
            fingerprint.as_deref(),
            all,
            &mut out,
        ),
        #[cfg(feature = "demo")]
        Command::Demo { duration, keep } => {
            drop(out);
            plantrelay::demo::run(plantrelay::demo::DemoOptions { duration, keep })
                .await
                .map_err(|e| CliError::runtime(format!("demo failed: {e}")))
        }
    }
}

/// The agent's signal streams. Making one installs its handler, after
/// which the signal no longer takes its default action (terminate); a
/// signal that comes before its stream is read waits in it.
struct SignalStreams {
    term: Option<Signal>,
    int: Option<Signal>,
    hup: Option<Signal>,
}

impl SignalStreams {
    fn install() -> SignalStreams {
        let make = |kind: SignalKind, name: &str| match tokio::signal::unix::signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot install the {name} handler");
                None
            }
        };
        SignalStreams {
            term: make(SignalKind::terminate(), "SIGTERM"),
            int: make(SignalKind::interrupt(), "SIGINT"),
            hup: make(SignalKind::hangup(), "SIGHUP"),
        }
    }
}

/// The next signal of `stream`; never without one (or once the stream
/// ends, which it does only with the runtime).
async fn next(stream: &mut Option<Signal>) {
    if let Some(s) = stream
        && s.recv().await.is_some()
    {
        return;
    }
    std::future::pending().await
}

/// SIGHUP: reload the health listener's certificates (a failed reload keeps
/// the old ones). Its handler is installed before the agent starts and
/// stays for its whole life, so that SIGHUP never takes its default action
/// (terminate).
async fn hangups(mut hup: Option<Signal>, reloader: Option<plantrelay::health::TlsReloader>) {
    loop {
        next(&mut hup).await;
        match &reloader {
            // Errors are logged by the reloader.
            Some(r) => {
                tracing::info!("SIGHUP: reloading the health TLS certificates");
                let _ = r.reload();
            }
            None => tracing::info!("SIGHUP: no health listener, nothing to reload"),
        }
    }
}

/// The name of the next SIGTERM or SIGINT.
async fn term_or_int(term: &mut Option<Signal>, int: &mut Option<Signal>) -> &'static str {
    tokio::select! {
        _ = next(term) => "SIGTERM",
        _ = next(int) => "SIGINT",
    }
}

/// First SIGTERM or SIGINT: graceful shutdown. Second: exit at once.
async fn signals(stop: CancellationToken, mut term: Option<Signal>, mut int: Option<Signal>) {
    let first = term_or_int(&mut term, &mut int).await;
    tracing::info!(
        signal = first,
        "shutting down (send it again to exit at once)"
    );
    stop.cancel();
    let second = term_or_int(&mut term, &mut int).await;
    tracing::warn!(
        signal = second,
        "second signal: exiting without a clean shutdown"
    );
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_passes_clap_s_own_checks() {
        Cli::command().debug_assert();
    }

    /// `--help` and the manual page are only as complete as these texts.
    #[test]
    fn every_command_has_an_about_and_every_argument_a_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path}: argument {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{sub_path}: no about text"));
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        assert!(cmd.get_about().is_some(), "plantrelay: no about text");
        let mut missing = Vec::new();
        walk(&cmd, "plantrelay", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }
}
