//! Sources: everything that brings events into the journal. A source only
//! appends; it acknowledges to its peer only after the journal answered.
//!
//! - [`http`]: the MES ingest API (`POST /v1/events`).
//! - [`mqtt`]: subscriptions on a plant MQTT broker, acked after commit.
//! - [`opcua`]: subscriptions on an OPC UA server, resynced after every reconnect.
//! - [`sparkplug`]: the Sparkplug B types and decoder `mqtt` uses.
//! - [`reconnect`]: the jittered reconnect delay `mqtt` and `opcua` share.

pub mod http;
pub mod mqtt;
pub mod opcua;
pub mod reconnect;
pub mod sparkplug;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::config::Config;
use crate::journal::{Journal, JournalError};
use crate::schema::Schemas;
use crate::status::SourceStatus;

/// A source built from its config (an HTTP source already bound), not yet
/// running: what `agent::start` holds for every configured source,
/// whatever its kind.
pub struct Component {
    pub name: String,
    /// `"http"`, `"mqtt"` or `"opcua"` (status and metrics).
    pub kind: &'static str,
    /// The address an HTTP source listens on.
    pub local_addr: Option<SocketAddr>,
    run: Box<dyn FnOnce(Journal, Arc<SourceStatus>, CancellationToken) -> Running + Send>,
}

type Running = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Component {
    /// Runs the source until `stop` is cancelled; an error it ends with is
    /// logged and kept in its status.
    pub fn run(
        self,
        journal: Journal,
        status: Arc<SourceStatus>,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send {
        (self.run)(journal, status, stop)
    }
}

/// Builds every configured source in the order of the config (HTTP, then
/// MQTT, then OPC UA sources), binding every HTTP listener. An error names
/// the source.
pub async fn build(config: &Config) -> Result<Vec<Component>, String> {
    let mut out = Vec::new();
    // Compiled once, shared by every source.
    let schemas = Arc::new(Schemas::load(&config.schemas).map_err(|e| e.to_string())?);
    for cfg in &config.sources.http {
        let source = http::HttpSource::bind(cfg)
            .await
            .map_err(|e| e.to_string())?
            .with_schemas(schemas.clone());
        let name = cfg.name.clone();
        out.push(Component {
            name: name.clone(),
            kind: "http",
            local_addr: Some(source.local_addr()),
            run: Box::new(move |journal, status, stop| {
                Box::pin(async move {
                    if let Err(e) = source.serve(journal, status.clone(), stop).await {
                        error!(source = %name, error = %e, "HTTP source stopped with an error");
                        status.record_error(e.to_string());
                    }
                })
            }),
        });
    }
    for cfg in &config.sources.mqtt {
        let source = mqtt::MqttSource::new(cfg, &config.agent.id)
            .map_err(|e| e.to_string())?
            .with_schemas(schemas.clone());
        let name = cfg.name.clone();
        out.push(Component {
            name: name.clone(),
            kind: "mqtt",
            local_addr: None,
            run: Box::new(move |journal, status, stop| {
                Box::pin(async move {
                    if let Err(e) = source.run(journal, status.clone(), stop).await {
                        error!(source = %name, error = %e, "MQTT source stopped with an error");
                        status.record_error(e.to_string());
                    }
                })
            }),
        });
    }
    for cfg in &config.sources.opcua {
        let source = opcua::OpcuaSource::new(cfg, &config.agent.id, &config.agent.state_dir)
            .map_err(|e| e.to_string())?;
        let name = cfg.name.clone();
        out.push(Component {
            name: name.clone(),
            kind: "opcua",
            local_addr: None,
            run: Box::new(move |journal, status, stop| {
                Box::pin(async move {
                    if let Err(e) = source.run(journal, status.clone(), stop).await {
                        error!(source = %name, error = %e, "OPC UA source stopped with an error");
                        status.record_error(e.to_string());
                    }
                })
            }),
        });
    }
    Ok(out)
}

/// How long a source that holds its data (MQTT, OPC UA) waits before
/// offering a failed journal append again, after `attempt` failures in a row.
pub(crate) fn append_retry_delay(e: &JournalError, attempt: u32) -> Duration {
    match e {
        // The journal already waited block_timeout for space.
        JournalError::Full { .. } => Duration::from_millis(100),
        _ => Duration::from_millis(200 * u64::from(attempt.min(25))),
    }
}
