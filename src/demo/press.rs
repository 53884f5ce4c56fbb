//! A simulated press as an OPC UA server (async-opcua) on loopback, for the
//! demo and the tests: `State` (Int32 cycling 0 → 1 → 2), `Counter`
//! (UInt64, +1 per tick) and `Temperature` (Double), all under the
//! namespace [`PRESS_NS`], plus optional `Load.<i>` UInt32 items that all
//! change every tick (load tests).
//!
//! Options let a test reorder the namespace array (another namespace is
//! registered first, so the press namespace gets a different index), offer
//! secure endpoints with a generated certificate (Basic256Sha256 Sign and
//! SignAndEncrypt, Aes128_Sha256_RsaOaep and Aes256_Sha256_RsaPss
//! SignAndEncrypt; anonymous, user name/password and X.509 users), limit
//! the server's message size, and restart on the same port. The server's
//! own certificate names `127.0.0.1` and `localhost`, so a client's host
//! name check passes on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use opcua::crypto::{CertificateStore, SecurityPolicy, X509Data};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{SimpleNodeManager, simple_node_manager};
use opcua::server::{ServerBuilder, ServerEndpoint, ServerHandle};
use opcua::types::{DataValue, DateTime, MessageSecurityMode, NodeId, StatusCode, Variant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The namespace URI of the press nodes.
pub const PRESS_NS: &str = "urn:plantrelay:demo:press";
/// A namespace registered before the press one when `reorder` is set.
pub const OTHER_NS: &str = "urn:plantrelay:demo:other";

/// How to run the simulated press.
#[derive(Debug, Clone)]
pub struct PressOptions {
    /// Port on 127.0.0.1; 0 picks one.
    pub port: u16,
    /// Register [`OTHER_NS`] first, so [`PRESS_NS`] gets another index.
    pub reorder: bool,
    /// Also offer Basic256Sha256 Sign and SignAndEncrypt endpoints.
    pub secure: bool,
    /// The server's PKI folder (its certificate is created there once).
    pub pki_dir: PathBuf,
    /// Value change period.
    pub tick: Duration,
    /// Number of extra `Load.<i>` items.
    pub load_items: usize,
    /// Stop the value changes after this many ticks (None: never).
    pub max_ticks: Option<u64>,
    /// Start with the value changes paused (see [`SimPress::resume`]).
    pub paused: bool,
    /// The server's max message size in bytes (None: async-opcua's
    /// default, 327,675): a publish response larger than this is not sent.
    pub max_message_size: Option<usize>,
    /// The server's MaxNodesPerRead and MaxMonitoredItemsPerCall (None:
    /// 100,000): a larger call is refused with BadTooManyOperations.
    pub operation_limit: Option<usize>,
    /// User names and passwords the secure endpoints accept (besides
    /// anonymous).
    pub users: Vec<(String, String)>,
    /// A user certificate (DER file) the secure endpoints accept as an
    /// X.509 user identity.
    pub user_cert: Option<PathBuf>,
}

impl PressOptions {
    pub fn new(pki_dir: impl Into<PathBuf>) -> PressOptions {
        PressOptions {
            port: 0,
            reorder: false,
            secure: false,
            pki_dir: pki_dir.into(),
            tick: Duration::from_millis(200),
            load_items: 0,
            max_ticks: None,
            paused: false,
            max_message_size: None,
            operation_limit: None,
            users: Vec::new(),
            user_cert: None,
        }
    }
}

/// A running simulated press.
pub struct SimPress {
    addr: SocketAddr,
    handle: ServerHandle,
    server: JoinHandle<()>,
    ticker: JoinHandle<()>,
    running: tokio::sync::watch::Sender<bool>,
    nm: Arc<SimpleNodeManager>,
    ns: u16,
}

/// `ns=<ns>;s=Press.State` etc., as `nsu=` strings for a config.
pub fn press_node(name: &str) -> String {
    format!("nsu={PRESS_NS};s=Press.{name}")
}

/// The `nsu=` node id of load item `i`.
pub fn load_node(i: usize) -> String {
    format!("nsu={PRESS_NS};s=Load.{i}")
}

impl SimPress {
    /// Starts the server and the value changes.
    pub async fn start(opts: &PressOptions) -> Result<SimPress, String> {
        ensure_server_cert(&opts.pki_dir)?;
        let listener = TcpListener::bind(("127.0.0.1", opts.port))
            .await
            .map_err(|e| format!("simulated press: bind 127.0.0.1:{}: {e}", opts.port))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("simulated press: local_addr: {e}"))?;
        let user_tokens = vec![opcua::server::ANONYMOUS_USER_TOKEN_ID.to_owned()];
        let mut builder = ServerBuilder::new()
            .application_name("plantrelay simulated press")
            .application_uri("urn:plantrelay:demo:press-server")
            .product_uri("urn:plantrelay:demo")
            .host("127.0.0.1")
            .port(addr.port())
            .pki_dir(&opts.pki_dir)
            .create_sample_keypair(false)
            .trust_client_certs(true)
            .discovery_urls(vec![format!("opc.tcp://127.0.0.1:{}/", addr.port())])
            .add_endpoint("none", ServerEndpoint::new_none("/", &user_tokens));
        if opts.secure {
            let mut ids = vec![opcua::server::ANONYMOUS_USER_TOKEN_ID.to_owned()];
            for (i, (user, pass)) in opts.users.iter().enumerate() {
                let id = format!("user{i}");
                builder = builder.add_user_token(
                    id.clone(),
                    opcua::server::ServerUserToken::user_pass(user.as_str(), pass.as_str()),
                );
                ids.push(id);
            }
            if let Some(cert) = &opts.user_cert {
                builder = builder.add_user_token(
                    "x509",
                    opcua::server::ServerUserToken::x509("x509-user", cert),
                );
                ids.push("x509".to_owned());
            }
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            for (id, policy, mode) in [
                (
                    "b256_sign",
                    SecurityPolicy::Basic256Sha256,
                    MessageSecurityMode::Sign,
                ),
                (
                    "b256_sign_encrypt",
                    SecurityPolicy::Basic256Sha256,
                    MessageSecurityMode::SignAndEncrypt,
                ),
                (
                    "aes128_sign_encrypt",
                    SecurityPolicy::Aes128Sha256RsaOaep,
                    MessageSecurityMode::SignAndEncrypt,
                ),
                (
                    "aes256_sign_encrypt",
                    SecurityPolicy::Aes256Sha256RsaPss,
                    MessageSecurityMode::SignAndEncrypt,
                ),
            ] {
                builder = builder.add_endpoint(id, ("/", policy, mode, ids.as_slice()));
            }
        }
        {
            let limits = builder.limits_mut();
            limits.subscriptions.max_monitored_items_per_sub = 100_000;
            // Every change counts here: sample as fast as asked, and queue
            // rather than drop when publish requests are scarce.
            limits.subscriptions.min_sampling_interval_ms = 10.0;
            limits.subscriptions.max_monitored_item_queue_size = 100;
            limits.subscriptions.max_queued_notifications = 1000;
            limits.max_array_length = 200_000;
            let per_call = opts.operation_limit.unwrap_or(100_000);
            limits.operational.max_nodes_per_read = per_call;
            limits.operational.max_monitored_items_per_call = per_call;
            if let Some(size) = opts.max_message_size {
                limits.max_message_size = size;
                limits.max_chunk_count = size.div_ceil(limits.send_buffer_size.max(1)).max(1);
            }
        }
        if opts.reorder {
            builder = builder.with_node_manager(simple_node_manager(
                NamespaceMetadata {
                    namespace_uri: OTHER_NS.to_owned(),
                    ..Default::default()
                },
                "other",
            ));
        }
        builder = builder.with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: PRESS_NS.to_owned(),
                ..Default::default()
            },
            "press",
        ));
        let (server, handle) = builder
            .build()
            .map_err(|e| format!("simulated press: {e}"))?;
        let nm = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .ok_or("simulated press: no node manager")?;
        let nm = if opts.reorder {
            // The first SimpleNodeManager is the "other" one: find ours.
            handle
                .node_managers()
                .iter()
                .filter_map(|m| {
                    m.clone()
                        .into_any_arc()
                        .downcast::<SimpleNodeManager>()
                        .ok()
                })
                .find(|m| m.namespaces().values().any(|u| u == PRESS_NS))
                .unwrap_or(nm)
        } else {
            nm
        };
        let ns = handle
            .get_namespace_index(PRESS_NS)
            .ok_or("simulated press: namespace not registered")?;
        let ids = add_nodes(&nm, ns, opts.load_items);
        let server = tokio::spawn(async move {
            if let Err(e) = server.run_with(listener).await {
                tracing::warn!(error = %e, "simulated press server stopped with an error");
            }
        });
        let (running, running_rx) = tokio::sync::watch::channel(!opts.paused);
        let ticker = tokio::spawn(tick(
            nm.clone(),
            handle.clone(),
            ids,
            opts.tick,
            opts.max_ticks,
            running_rx,
        ));
        Ok(SimPress {
            addr,
            handle,
            server,
            ticker,
            running,
            nm,
            ns,
        })
    }

    /// `opc.tcp://127.0.0.1:<port>/`.
    pub fn endpoint(&self) -> String {
        format!("opc.tcp://127.0.0.1:{}/", self.addr.port())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The index of [`PRESS_NS`] on this run.
    pub fn namespace_index(&self) -> u16 {
        self.ns
    }

    /// Stops the server (connections are dropped) and the value changes.
    pub async fn stop(self) {
        self.ticker.abort();
        self.handle.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }

    /// Adds the Int32 variable `Press.<name>` (a node that was missing).
    pub fn add_node(&self, name: &str, value: i32) {
        let id = NodeId::new(self.ns, format!("Press.{name}"));
        let space = self.nm.address_space();
        let mut space = space.write();
        let _ = space.add_variables(
            vec![opcua::nodes::Variable::new(&id, name, name, value)],
            &NodeId::new(self.ns, "Press"),
        );
    }

    /// Publishes a new value and status of `Press.<name>` to subscribers:
    /// a bad status is what a server reports for a tag that went away or
    /// whose device stopped answering.
    pub fn set_node(&self, name: &str, value: i32, status: StatusCode) {
        let id = NodeId::new(self.ns, format!("Press.{name}"));
        let now = DateTime::now();
        let dv = DataValue {
            value: Some(Variant::Int32(value)),
            status: Some(status),
            source_timestamp: Some(now),
            server_timestamp: Some(now),
            ..Default::default()
        };
        let _ = self.nm.set_values(
            self.handle.subscriptions(),
            [(&id, None::<&opcua::types::NumericRange>, dv)].into_iter(),
        );
    }

    /// Pauses the value changes (the server keeps answering).
    pub fn pause(&self) {
        self.running.send_replace(false);
    }

    /// Resumes the value changes.
    pub fn resume(&self) {
        self.running.send_replace(true);
    }
}

/// The SHA-256 fingerprint (lowercase hex) of the server certificate in `pki_dir`.
pub fn server_cert_sha256(pki_dir: &Path) -> Result<String, String> {
    let der = std::fs::read(pki_dir.join("own/cert.der"))
        .map_err(|e| format!("simulated press certificate: {e}"))?;
    Ok(crate::sources::opcua::pki::sha256_hex(&der))
}

/// Creates the server certificate and key in `pki_dir` unless present.
pub fn ensure_server_cert(pki_dir: &Path) -> Result<(), String> {
    let cert = pki_dir.join("own/cert.der");
    let key = pki_dir.join("private/private.pem");
    if cert.exists() && key.exists() {
        return Ok(());
    }
    for sub in ["own", "private", "trusted", "rejected"] {
        std::fs::create_dir_all(pki_dir.join(sub))
            .map_err(|e| format!("simulated press pki {}: {e}", pki_dir.display()))?;
    }
    let app_uri = "urn:plantrelay:demo:press-server";
    let data = X509Data {
        key_size: 2048,
        common_name: "plantrelay simulated press".into(),
        organization: "plantrelay".into(),
        organizational_unit: "demo".into(),
        country: "DE".into(),
        state: "".into(),
        alt_host_names: X509Data::alt_host_names(
            app_uri,
            Some(vec!["127.0.0.1".into(), "localhost".into()]),
            false,
            false,
            false,
        ),
        certificate_duration_days: 365,
    };
    CertificateStore::create_certificate_and_key(&data, true, &cert, &key).map(|_| ())
}

/// Node ids of the press variables: state, counter, temperature, load items.
struct Ids {
    state: NodeId,
    counter: NodeId,
    temperature: NodeId,
    load: Vec<NodeId>,
}

fn add_nodes(nm: &Arc<SimpleNodeManager>, ns: u16, load_items: usize) -> Ids {
    use opcua::nodes::Variable;
    let folder = NodeId::new(ns, "Press");
    let ids = Ids {
        state: NodeId::new(ns, "Press.State"),
        counter: NodeId::new(ns, "Press.Counter"),
        temperature: NodeId::new(ns, "Press.Temperature"),
        load: (0..load_items)
            .map(|i| NodeId::new(ns, format!("Load.{i}")))
            .collect(),
    };
    let space = nm.address_space();
    let mut space = space.write();
    space.add_folder(&folder, "Press", "Press", &NodeId::objects_folder_id());
    let mut vars = vec![
        Variable::new(&ids.state, "State", "State", 0i32),
        Variable::new(&ids.counter, "Counter", "Counter", 0u64),
        Variable::new(&ids.temperature, "Temperature", "Temperature", 20.0f64),
    ];
    for (i, id) in ids.load.iter().enumerate() {
        let name = format!("Load.{i}");
        vars.push(Variable::new(id, name.as_str(), name.as_str(), 0u32));
    }
    let _ = space.add_variables(vars, &folder);
    ids
}

async fn tick(
    nm: Arc<SimpleNodeManager>,
    handle: ServerHandle,
    ids: Ids,
    period: Duration,
    max_ticks: Option<u64>,
    mut running: tokio::sync::watch::Receiver<bool>,
) {
    let mut n: u64 = 0;
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if running.wait_for(|r| *r).await.is_err() {
            return;
        }
        interval.tick().await;
        if max_ticks.is_some_and(|m| n >= m) {
            return;
        }
        n += 1;
        let now = DateTime::now();
        let dv = |v: Variant| DataValue::new_at(v, now);
        let state = Variant::Int32(((n / 5) % 3) as i32);
        let temperature = Variant::Double(60.0 + (n % 40) as f64 * 0.25);
        let mut values: Vec<(&NodeId, Option<&opcua::types::NumericRange>, DataValue)> = vec![
            (&ids.counter, None, dv(Variant::UInt64(n))),
            (&ids.temperature, None, dv(temperature)),
        ];
        if n.is_multiple_of(5) {
            values.push((&ids.state, None, dv(state)));
        }
        for id in &ids.load {
            values.push((id, None, dv(Variant::UInt32(n as u32))));
        }
        let _ = nm.set_values(handle.subscriptions(), values.into_iter());
    }
}
