//! Node ids as configured (parsed in [`crate::config::parse_node_id`]), their
//! resolution against the server's NamespaceArray of the current session,
//! the monitored item request of a node, and the TCP connector with
//! keepalive the sessions use.
//!
//! A `nsu=` node id is resolved again on every session: namespace indexes
//! are the server's to change across restarts, URIs are not.

use std::sync::Arc;
use std::time::Duration;

use opcua::client::ConnectionSource;
use opcua::client::transport::{
    Connector, RequestRecv, SecureChannelState, StreamConnection, StreamConnector, StreamTransport,
    TransportConfiguration,
};
use opcua::core::comms::tcp_codec::TcpCodec;
use opcua::core::comms::url::hostname_port_from_url;
use opcua::types::{
    DecodingOptions, EndpointDescription, Error, MonitoredItemCreateRequest, MonitoringMode,
    MonitoringParameters, NamespaceMap, NodeId, ReadValueId, StatusCode,
};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use super::mapping::NodeMeta;
use crate::config::{Deadband, OpcuaNodeConfig};
pub use crate::config::{NodeRef, parse_node_id};

/// One configured node, ready to be resolved and monitored.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub meta: NodeMeta,
    pub node: NodeRef,
    pub sampling_interval: Duration,
    pub queue_size: u32,
    pub deadband: Option<Deadband>,
}

impl NodeSpec {
    pub fn new(cfg: &OpcuaNodeConfig) -> Result<NodeSpec, String> {
        Ok(NodeSpec {
            meta: NodeMeta::new(cfg),
            node: parse_node_id(&cfg.node_id)?,
            sampling_interval: cfg.sampling_interval,
            queue_size: cfg.queue_size.max(1),
            deadband: cfg.deadband,
        })
    }

    /// The node id on this session (the reason when it cannot be resolved).
    pub fn resolve(&self, namespaces: &NamespaceMap) -> Result<NodeId, String> {
        match &self.node {
            NodeRef::Index(id) => Ok(id.clone()),
            NodeRef::Uri { uri, local } => match namespaces.get_index(uri) {
                Some(ns) => {
                    let mut id = local.clone();
                    id.namespace = ns;
                    Ok(id)
                }
                None => Err(format!(
                    "BadNamespaceUnknown (namespace {uri} is not in the server's NamespaceArray)"
                )),
            },
        }
    }

    /// The monitored item request; the client handle is `index + 1`.
    pub fn request(&self, index: usize, id: NodeId) -> MonitoredItemCreateRequest {
        MonitoredItemCreateRequest {
            item_to_monitor: ReadValueId::from(id),
            monitoring_mode: MonitoringMode::Reporting,
            requested_parameters: MonitoringParameters {
                client_handle: index as u32 + 1,
                sampling_interval: self.sampling_interval.as_secs_f64() * 1000.0,
                filter: super::subscription::deadband_filter(self.deadband),
                queue_size: self.queue_size,
                discard_oldest: true,
            },
        }
    }
}

/// TCP keepalive on session sockets: first probe after this idle time.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Between keepalive probes.
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Sessions connect through [`KeepaliveConnector`].
pub struct KeepaliveSource;

impl ConnectionSource for KeepaliveSource {
    type Builder = KeepaliveConnector;

    fn get_connector(&self, endpoint: &EndpointDescription) -> Result<KeepaliveConnector, Error> {
        Ok(KeepaliveConnector {
            url: endpoint.endpoint_url.as_ref().to_owned(),
        })
    }
}

/// async-opcua's TCP connector, plus TCP keepalive and no Nagle delay.
pub struct KeepaliveConnector {
    url: String,
}

type TcpTransport = StreamTransport<ReadHalf<TcpStream>, WriteHalf<TcpStream>>;

impl Connector for KeepaliveConnector {
    type Transport = TcpTransport;

    async fn connect(
        &self,
        channel: Arc<SecureChannelState>,
        outgoing_recv: RequestRecv,
        config: TransportConfiguration,
    ) -> Result<TcpTransport, Error> {
        StreamConnector::new(connect_tcp, self.url.clone())
            .connect(channel, outgoing_recv, config)
            .await
    }

    fn default_endpoint(&self) -> EndpointDescription {
        EndpointDescription::from(self.url.as_str())
    }
}

async fn connect_tcp(
    url: String,
    decoding: DecodingOptions,
) -> Result<StreamConnection<ReadHalf<TcpStream>, WriteHalf<TcpStream>>, Error> {
    let (host, port) = hostname_port_from_url(&url, 4840)
        .map_err(|e| Error::new(e, format!("endpoint URL {url} has no usable host and port")))?;
    let stream = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| {
            Error::new(
                StatusCode::BadCommunicationError,
                format!("cannot connect to {host}:{port}: {e}"),
            )
        })?;
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL);
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot enable TCP keepalive on the OPC UA socket");
    }
    let (reader, writer) = tokio::io::split(stream);
    Ok(StreamConnection::new(
        FramedRead::new(reader, TcpCodec::new(decoding)),
        writer,
        url,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_node_ids_follow_the_namespace_index_of_the_session() {
        let cfg = OpcuaNodeConfig {
            node_id: "nsu=urn:press;s=State".into(),
            stream: "s".into(),
            sampling_interval: Duration::from_millis(100),
            queue_size: 10,
            deadband: None,
            state_map: None,
        };
        let spec = NodeSpec::new(&cfg).unwrap();
        let mut a = NamespaceMap::new();
        a.add_namespace("urn:press");
        let mut b = NamespaceMap::new();
        b.add_namespace("urn:other");
        b.add_namespace("urn:press");
        let ia = spec.resolve(&a).unwrap();
        let ib = spec.resolve(&b).unwrap();
        assert_ne!(ia.namespace, ib.namespace);
        assert!(spec.resolve(&NamespaceMap::new()).is_err());
    }
}
