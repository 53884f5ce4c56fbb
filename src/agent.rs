//! Wiring: config → journal → sources and forwarders → health server, and
//! the graceful shutdown of all of it. This module owns start-up order and
//! shutdown order; it must never contain protocol or storage logic.
//!
//! Start-up: open the journal (READY depends on it), bind every listener
//! (so a port conflict fails start-up, not a later request), start the
//! forwarders, then serve. Shutdown: stop the sources (no new events; requests
//! in flight finish and are answered after their commit), give forwarders
//! until `shutdown_timeout` to finish the batch in flight, then close the
//! journal (the writer commits what is queued and checkpoints).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::health::{HealthServer, TlsReloader};
use crate::journal::{Journal, JournalOptions};
use crate::status::{AgentView, SinkStatus, SourceStatus};
use crate::supervise::Supervised;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The config asks for something this build cannot do (exit status 2).
    #[error("{0}")]
    Unsupported(String),
    /// Start-up failed (exit status 1).
    #[error("{0}")]
    Startup(String),
}

impl AgentError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Unsupported(_) => 2,
            AgentError::Startup(_) => 1,
        }
    }
}

/// Opens the journal off the async threads (the integrity check is
/// blocking work).
pub async fn open_journal(opts: JournalOptions) -> Result<Journal, AgentError> {
    tokio::task::spawn_blocking(move || Journal::open(opts))
        .await
        .map_err(|e| AgentError::Startup(format!("journal open task failed: {e}")))?
        .map_err(|e| AgentError::Startup(e.to_string()))
}

/// A started agent. Dropping it does not stop it: call [`RunningAgent::shutdown`].
pub struct RunningAgent {
    pub journal: Journal,
    pub view: Arc<AgentView>,
    /// Bound address of each HTTP source, by name.
    pub http_addrs: Vec<(String, SocketAddr)>,
    pub health_addr: Option<SocketAddr>,
    health_tls: Option<TlsReloader>,
    sources_stop: CancellationToken,
    forwarders_stop: CancellationToken,
    health_stop: CancellationToken,
    watchdog_stop: CancellationToken,
    watchdog: Option<JoinHandle<()>>,
    sources: Vec<Supervised>,
    forwarders: Vec<Supervised>,
    health: Option<Supervised>,
    shutdown_timeout: Duration,
}

/// Starts everything the config names. Returns once the journal is open,
/// every listener is bound and every component runs.
pub async fn start(config: &Config) -> Result<RunningAgent, AgentError> {
    crate::tls::install_crypto_provider();
    let issues = crate::config::unsupported(config);
    if !issues.is_empty() {
        let text = issues
            .iter()
            .map(|i| format!("{}: {}", i.key_path, i.message))
            .collect::<Vec<_>>()
            .join("\n");
        return Err(AgentError::Unsupported(text));
    }
    let started = Instant::now();
    let journal = open_journal(config.journal_options()).await?;
    if let Some(q) = journal.quarantine() {
        warn!(
            moved_to = %q.moved_to.display(),
            reason = %q.reason,
            "the journal was damaged and has been replaced; the damaged file is kept for inspection"
        );
    }

    // Each listener may hold up to its max_connections descriptors; they
    // must not be able to take the journal's and the upstream's.
    let listener_caps = config
        .sources
        .http
        .iter()
        .map(|s| s.max_connections as u64)
        .chain(config.health.iter().map(|h| h.max_connections as u64))
        .sum();
    crate::serve::check_open_file_limit(listener_caps);

    // Bind every listener before serving anything.
    let sources = crate::sources::build(config)
        .await
        .map_err(AgentError::Startup)?;
    let sinks = crate::sinks::build(config).map_err(AgentError::Startup)?;

    let source_status: Vec<Arc<SourceStatus>> = sources
        .iter()
        .map(|c| Arc::new(SourceStatus::new(&c.name, c.kind)))
        .collect();
    let sink_status: Vec<Arc<SinkStatus>> = sinks
        .iter()
        .map(|c| Arc::new(SinkStatus::new(&c.settings.name, c.kind)))
        .collect();
    let view = Arc::new(AgentView::new(
        config,
        journal.clone(),
        source_status.clone(),
        sink_status.clone(),
    ));
    let health = match &config.health {
        Some(h) => Some(
            HealthServer::bind(h, view.clone())
                .await
                .map_err(|e| AgentError::Startup(e.to_string()))?,
        ),
        None => None,
    };

    let sources_stop = CancellationToken::new();
    let forwarders_stop = CancellationToken::new();
    let health_stop = CancellationToken::new();
    let supervisor = view.supervisor.clone();
    let mut http_addrs = Vec::new();
    let mut source_tasks = Vec::new();
    for (component, status) in sources.into_iter().zip(&source_status) {
        if let Some(addr) = component.local_addr {
            http_addrs.push((component.name.clone(), addr));
        }
        let task = match component.kind {
            "http" => format!("HTTP source '{}'", component.name),
            "mqtt" => format!("MQTT source '{}'", component.name),
            _ => format!("OPC UA source '{}'", component.name),
        };
        let run = component.run(journal.clone(), status.clone(), sources_stop.clone());
        source_tasks.push(supervisor.spawn(task, run));
    }
    // Outage reports append like a source: they stop with the sources.
    if !config.agent.outage_report_after.is_zero() {
        let run = crate::outage::watch(
            journal.clone(),
            sink_status.clone(),
            config.agent.outage_report_after,
            sources_stop.clone(),
        );
        source_tasks.push(supervisor.spawn("outage reports".to_string(), run));
    }
    let mut forwarder_tasks = Vec::new();
    for (component, status) in sinks.into_iter().zip(&sink_status) {
        let task = format!("forwarder of sink '{}'", component.settings.name);
        let run = component.run(journal.clone(), status.clone(), forwarders_stop.clone());
        forwarder_tasks.push(supervisor.spawn(task, run));
    }
    let health_addr = health.as_ref().map(|h| h.local_addr());
    let health_tls = health.as_ref().map(|h| h.tls_reloader());
    let health_task = health.map(|h| {
        let stop = health_stop.clone();
        supervisor.spawn("health listener".to_string(), async move {
            if let Err(e) = h.serve(stop).await {
                error!(error = %e, "health server stopped with an error");
            }
        })
    });
    // Ready only once every task has begun (or failed, which the
    // supervisor reports): a forwarder still reading its cursors, or a
    // source task not yet polled, would otherwise make the first /readyz a
    // 503.
    let forwarders_up = async {
        while !(sink_status.iter().all(|s| s.progress().running)
            && source_status
                .iter()
                .all(|s| s.started.load(Ordering::Relaxed)))
            && view.supervisor.failures().is_empty()
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), forwarders_up)
        .await
        .is_err()
    {
        warn!(
            "a source or forwarder has not started within 10 s; the agent reports not ready until it has"
        );
    }
    view.ready.store(true, Ordering::Relaxed);
    let watchdog_stop = CancellationToken::new();
    let watchdog = crate::service::spawn_watchdog(view.clone(), watchdog_stop.clone());
    crate::service::ready(&view);
    info!(
        agent = %config.agent.id,
        journal = %journal.path().display(),
        head_seq = journal.stats().head_seq.load(Ordering::Relaxed),
        sources = source_status.len(),
        sinks = sink_status.len(),
        health = ?health_addr,
        startup_ms = started.elapsed().as_millis() as u64,
        "plantrelay started"
    );
    Ok(RunningAgent {
        journal,
        view,
        http_addrs,
        health_addr,
        health_tls,
        sources_stop,
        forwarders_stop,
        health_stop,
        watchdog_stop,
        watchdog,
        sources: source_tasks,
        forwarders: forwarder_tasks,
        health: health_task,
        shutdown_timeout: config.agent.shutdown_timeout,
    })
}

impl RunningAgent {
    /// The bound address of the HTTP source `name`.
    pub fn http_addr(&self, name: &str) -> Option<SocketAddr> {
        self.http_addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// The hook that reloads the health listener's certificates (SIGHUP),
    /// if there is a health listener.
    pub fn tls_reloader(&self) -> Option<TlsReloader> {
        self.health_tls.clone()
    }

    /// Graceful shutdown, in the order of the module doc.
    pub async fn shutdown(self) {
        info!("shutting down: no new events accepted");
        crate::service::stopping();
        self.watchdog_stop.cancel();
        if let Some(w) = self.watchdog {
            w.abort();
        }
        self.view.ready.store(false, Ordering::Relaxed);
        self.view.supervisor.stopping();
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.sources_stop.cancel();
        for t in self.sources {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t.join()).await.is_err() {
                warn!("a source did not stop in time");
                abort.abort();
            }
        }
        self.forwarders_stop.cancel();
        for t in self.forwarders {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t.join()).await.is_err() {
                warn!(
                    "a forwarder did not finish its batch within shutdown_timeout; it will be sent again at the next start"
                );
                abort.abort();
            }
        }
        self.health_stop.cancel();
        if let Some(t) = self.health {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), t.join())
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        self.journal.close().await;
        info!("plantrelay stopped");
    }
}

/// Runs the agent until `stop` is cancelled, then shuts down gracefully.
pub async fn run(config: &Config, stop: CancellationToken) -> Result<(), AgentError> {
    let agent = start(config).await?;
    stop.cancelled().await;
    agent.shutdown().await;
    Ok(())
}
