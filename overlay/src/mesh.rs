//! The mesh as one gateway sees it: configuration, shared state and the component's lifecycle.
//!
//! [`Mesh::bind`] binds the overlay's UDP port; [`Mesh::run`] dials configured peers, accepts peers
//! that dial us, checks local endpoints and runs until shutdown. Flows enter through
//! [`Mesh::serve_client`] (a TCP client of this gateway) and leave through the peer sessions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use causeway_protocol::control::{Protocol, ServiceAd};
use causeway_protocol::limits::CONTROL_SILENCE_SECS;
use causeway_protocol::{GatewayId, Identity, ServiceName, ZoneName};
use serde_json::json;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::core::catalog::LocalCatalog;
use crate::h3q::Opener;
use crate::metrics::Metrics;
use crate::routes::{PeerState, RouteTable};
use crate::tls::{Credentials, TlsError, TlsFactory, TrustBundle};
use crate::transport::{self, EndpointError, Timers};

/// A gateway this one peers with.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSpec {
    /// The SPIFFE ID the peer must present.
    pub id: Identity,
    /// Where to dial it, `IP:port` or `host:port` (resolved at every attempt); `None` for a peer
    /// that only dials us.
    pub address: Option<String>,
    /// The zone it must announce in its hello; `None` accepts whatever it says (and then the
    /// announced zone is no policy input: see [`crate::core::caller`]).
    pub zone: Option<ZoneName>,
    /// Prefixes of the caller identities it may assert; empty: any of its own trust domain.
    pub source_identities: Vec<String>,
}

/// A service this gateway offers to the mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub name: ServiceName,
    pub protocol: Protocol,
    pub port: u16,
    pub endpoints: Vec<Endpoint>,
    pub labels: Vec<(String, String)>,
    /// How an `http` service's endpoints are spoken to, and its circuit breakers.
    pub http: HttpOptions,
}

/// Where an exported service runs in this zone: an address, or a name whose every A/AAAA record is
/// an endpoint (a Kubernetes Service, a headless Service's pods, a Consul DNS name), resolved at
/// each health-check round.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Self::Addr(a)
    }
}

/// One address an endpoint resolved to, and whether its health checks pass.
#[derive(Debug)]
pub(crate) struct Backend {
    pub addr: SocketAddr,
    /// The index of the endpoint (in `Export::endpoints`) it came from.
    from: usize,
    pub healthy: AtomicBool,
}

/// An `http` export's endpoint protocol and circuit breakers. Each breaker, when tripped, answers
/// an immediate 503 `circuit_open` naming it (Envoy's thresholds, per destination gateway).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpOptions {
    /// The endpoints speak HTTP/2 cleartext with prior knowledge (h2c; gRPC servers), not HTTP/1.1.
    pub h2: bool,
    /// How an endpoint is chosen for a request.
    pub lb: LbPolicy,
    /// Requests to the endpoints in progress at once. `None`: no limit.
    pub max_requests: Option<u32>,
    /// Connections to each HTTP/1.1 endpoint at once (one request per connection at a time). A
    /// request finding every endpoint at its limit waits for one ... `None`: no limit.
    pub max_connections: Option<u32>,
    /// ... and at most this many requests wait; the next is refused. Set with `max_connections`.
    pub max_pending: Option<u32>,
}

/// What the destination knows of a flow a peer opened to one of its exports.
#[derive(Debug)]
pub struct FlowCaller<'a> {
    pub service: &'a ServiceName,
    /// The workload's SPIFFE ID as its gateway vouched for it (that gateway's own when absent).
    pub identity: Option<&'a Identity>,
    /// The caller's gateway's zone (configured for the authenticated peer).
    pub zone: Option<&'a ZoneName>,
    /// The workload's address as its gateway saw it.
    pub addr: Option<std::net::IpAddr>,
    pub port: u16,
}

/// The open inbound flows' callers (for [`Mesh::reauthorize`]).
#[derive(Default)]
pub struct InboundFlows {
    next: u64,
    open: HashMap<u64, InboundCaller>,
}

/// What was authorized for one open inbound flow, and how to end it.
pub struct InboundCaller {
    pub service: ServiceName,
    pub identity: Identity,
    pub zone: Option<ZoneName>,
    pub addr: Option<std::net::IpAddr>,
    pub port: u16,
    pub revoke: tokio_util::sync::CancellationToken,
}

/// An inbound flow's entry in [`InboundFlows`], removed when dropped.
pub struct InboundEntry(Arc<Mutex<InboundFlows>>, u64);

impl Drop for InboundEntry {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).open.remove(&self.1);
    }
}

impl Mesh {
    /// Registers an open inbound flow's caller; the entry leaves with the returned guard.
    pub(crate) fn register_inbound(&self, caller: InboundCaller) -> InboundEntry {
        let mut m = self.0.inbound.lock().unwrap_or_else(|e| e.into_inner());
        m.next += 1;
        let id = m.next;
        m.open.insert(id, caller);
        InboundEntry(self.0.inbound.clone(), id)
    }

    /// Asks the authorizer again about every open inbound flow (after a policy change) and resets
    /// those it now refuses. Returns how many were revoked.
    pub fn reauthorize(&self) -> usize {
        let Some(a) = self.0.authorizer.get() else { return 0 };
        let m = self.0.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let mut revoked = 0;
        for c in m.open.values().filter(|c| !c.revoke.is_cancelled()) {
            let caller = FlowCaller {
                service: &c.service,
                identity: Some(&c.identity),
                zone: c.zone.as_ref(),
                addr: c.addr,
                port: c.port,
            };
            if let Err(policy) = a.reauthorize_flow(&caller) {
                tracing::info!(service = %c.service, source_identity = %c.identity, %policy, "flow.revoked");
                self.0.metrics.counter(crate::metrics::FLOWS_REVOKED, &[("service", c.service.as_str())]).increment(1);
                c.revoke.cancel();
                revoked += 1;
            }
        }
        revoked
    }
}

/// The gateway's authorization of flows: `Err(policy)` refuses the flow (403 `policy_denied`,
/// `causeway-policy: <policy>`).
pub trait Authorizer: Send + Sync + 'static {
    fn authorize_flow(&self, caller: &FlowCaller<'_>) -> Result<(), String>;

    /// The same question for a flow already open (after a policy change).
    fn reauthorize_flow(&self, caller: &FlowCaller<'_>) -> Result<(), String> {
        self.authorize_flow(caller)
    }

    /// Rate limits of an authorized new flow: `Ok(guard)` holds the flow's place among the open
    /// flows until dropped; `Err(limit)` refuses it (429 `rate_limited`). A future: a limit the
    /// zone's gateways share asks their store.
    fn admit_flow(&self, _caller: &FlowCaller<'_>) -> Admission {
        Box::pin(std::future::ready(Ok(Box::new(()) as Box<dyn Send + Sync>)))
    }
}

/// The rate limits' answer for a new flow (see [`Authorizer::admit_flow`]).
pub type Admission =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Box<dyn Send + Sync>, String>> + Send + 'static>>;

/// How an `http` export's endpoint is chosen for each request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LbPolicy {
    /// Power of two choices over peak-EWMA latency × requests in flight (Linkerd's).
    #[default]
    PowerOfTwo,
    /// Each endpoint in turn.
    RoundRobin,
    /// Consistent (rendezvous) hashing on this request header's value: the same value goes to
    /// the same endpoint while it is healthy; requests without it are balanced as by default.
    HashHeader(String),
    /// The same on this cookie's value (session affinity).
    HashCookie(String),
}

/// Timers of the overlay. Defaults are chosen for failure detection within a second on a WAN.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Control-stream ping period.
    pub ping_interval: Duration,
    /// A peer silent for this long gets no new flows (routing moves at once) ...
    pub peer_timeout: Duration,
    /// ... and its connection is closed after this long, resetting the flows still on it. Longer, so
    /// a WAN blackhole of a few seconds costs no connection; a peer heard again is routed to again.
    pub peer_close_timeout: Duration,
    /// QUIC + TLS handshake, and the control stream's hello exchange.
    pub handshake_timeout: Duration,
    /// Waiting for a peer's response to a flow's CONNECT before trying another zone.
    pub flow_connect_timeout: Duration,
    /// TCP connect to a local endpoint.
    pub backend_connect_timeout: Duration,
    /// HTTP/3 request headers must be complete within this.
    pub header_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Active TCP health checks of local endpoints.
    pub health_interval: Duration,
    /// How long a drain lets existing flows run.
    pub drain_timeout: Duration,
    /// First ejection of an HTTP endpoint that failed 5 times in a row (the n-th lasts n times it).
    pub outlier_ejection: Duration,
    pub transport: Timers,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_millis(100),
            peer_timeout: Duration::from_millis(500),
            peer_close_timeout: Duration::from_secs(CONTROL_SILENCE_SECS),
            handshake_timeout: Duration::from_secs(5),
            flow_connect_timeout: Duration::from_secs(3),
            backend_connect_timeout: Duration::from_secs(2),
            header_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            health_interval: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(5),
            outlier_ejection: Duration::from_secs(30),
            transport: Timers::default(),
        }
    }
}

pub struct MeshConfig {
    pub zone: ZoneName,
    pub gateway: GatewayId,
    pub listen: SocketAddr,
    pub credentials: Credentials,
    pub bundle: TrustBundle,
    pub peers: Vec<PeerSpec>,
    pub exports: Vec<Export>,
    pub preferences: HashMap<ServiceName, Vec<ZoneName>>,
    /// SPIFFE ID prefixes of the redirectors allowed to hand flows to this gateway.
    pub redirectors: Vec<String>,
    /// SPIFFE ID prefixes of the workloads allowed to send HTTP/3 requests straight to it.
    pub http3_clients: Vec<String>,
    /// Source address ranges of workloads and their identities (longest prefix wins).
    pub workloads: Vec<(ipnet::IpNet, Identity)>,
    /// Services only these source ranges may use, through capture or a local listener.
    pub client_allowlists: HashMap<ServiceName, Vec<ipnet::IpNet>>,
    /// Addresses that may start a QUIC handshake with us, besides the configured peers' addresses.
    /// Empty: anyone may try (the certificate is still checked).
    pub allowed_sources: Vec<ipnet::IpNet>,
    pub timing: Timing,
    pub limits: Limits,
    pub metrics: Metrics,
}

/// What a peer's behaviour is held to, besides the transport's fixed limits (README "Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// New flows per second a peer connection may open (a burst of one second's worth); more are
    /// refused with 429 before any backend connect (`abuse`).
    pub peer_flow_rate: u32,
    /// Windows, streams and handshakes per peer connection.
    pub quic: transport::QuicLimits,
    /// Above this resident memory (bytes), new flows are refused with 503 `over_budget` while
    /// existing ones keep going (`budget`). `None`: no budget.
    pub memory_budget: Option<u64>,
    /// Concurrent connections per local listener, and per source address on one (the gateway's
    /// import listeners apply them).
    pub connections_per_listener: u32,
    pub connections_per_source: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            peer_flow_rate: crate::abuse::DEFAULT_PEER_FLOW_RATE,
            quic: transport::QuicLimits::default(),
            memory_budget: None,
            connections_per_listener: 10_000,
            connections_per_source: 1_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
}

/// A live connection to a peer.
pub(crate) struct PeerConn {
    pub conn: quinn::Connection,
    pub dialed: bool,
    pub requests: Option<h3::client::SendRequest<Opener, Bytes>>,
    /// Flows on this connection, both directions: a replaced connection closes once it has none.
    pub flows: Arc<AtomicUsize>,
    /// Our leaf when the connection was made: a newer one means the connection is to be replaced.
    pub local_leaf: rustls::pki_types::CertificateDer<'static>,
}

/// Counts one flow on a peer connection while it lives.
pub struct ConnFlow(Arc<AtomicUsize>);

impl ConnFlow {
    pub fn new(flows: &Arc<AtomicUsize>) -> Self {
        flows.fetch_add(1, Ordering::Relaxed);
        Self(flows.clone())
    }
}

impl Drop for ConnFlow {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// This gateway's backend connections (flows it relays to an endpoint) as (local, remote)
/// address pairs: live ones, and those closed within [`LEG_LINGER`]. A new flow whose client
/// connection is one of them — same source, same destination — is a loop: it left this gateway for
/// an endpoint that leads back into the mesh, and came back (`flow`, `SPEC.md` §5). Closed legs
/// linger because a loop cut at one gateway may already have its next round in flight. A live
/// pair cannot belong to anyone else (TCP 4-tuples are unique); a lingering one only to a new
/// connection from this host to the same endpoint from the same port within the linger.
#[derive(Debug, Default)]
pub(crate) struct BackendLegs(Mutex<HashMap<(SocketAddr, SocketAddr), Option<std::time::Instant>>>);

/// How long a closed backend connection's address still counts as ours (see [`BackendLegs`]).
pub(crate) const LEG_LINGER: Duration = Duration::from_secs(2);

impl BackendLegs {
    pub fn contains(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        let legs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        legs.get(&(local, remote)).is_some_and(|closed| closed.is_none_or(|t| t.elapsed() < LEG_LINGER))
    }
}

/// One backend connection's local address, registered in [`BackendLegs`] while it lives.
pub(crate) struct BackendLeg(Arc<BackendLegs>, (SocketAddr, SocketAddr));

impl BackendLeg {
    pub fn new(legs: &Arc<BackendLegs>, local: SocketAddr, remote: SocketAddr) -> Self {
        let mut map = legs.0.lock().unwrap_or_else(|e| e.into_inner());
        // Forget legs closed longer ago than the linger: the map holds live legs plus at most
        // LEG_LINGER's worth of closed ones.
        map.retain(|_, closed| closed.is_none_or(|t| t.elapsed() < LEG_LINGER));
        map.insert((local, remote), None);
        Self(legs.clone(), (local, remote))
    }
}

impl Drop for BackendLeg {
    fn drop(&mut self) {
        let mut map = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(closed) = map.get_mut(&self.1) {
            *closed = Some(std::time::Instant::now());
        }
    }
}

pub(crate) struct LocalService {
    pub export: Export,
    /// The endpoints' addresses as of the last health round (names resolved then), each with its
    /// health. Replaced whole by the health loop; flows read a snapshot.
    backends: RwLock<Arc<Vec<Backend>>>,
    pub next: AtomicUsize,
}

impl LocalService {
    fn new(export: Export) -> Self {
        // Addresses start healthy; names have none until the first round, which runs at once.
        let backends = export
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(from, e)| match e {
                Endpoint::Addr(a) => Some(Backend { addr: *a, from, healthy: AtomicBool::new(true) }),
                Endpoint::Name { .. } => None,
            })
            .collect();
        Self { export, backends: RwLock::new(Arc::new(backends)), next: AtomicUsize::new(0) }
    }

    pub(crate) fn backends(&self) -> Arc<Vec<Backend>> {
        self.backends.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn ad(&self) -> ServiceAd {
        let e = &self.export;
        let healthy = self.backends().iter().filter(|b| b.healthy.load(Ordering::Relaxed)).count() as u32;
        ServiceAd {
            name: e.name.clone(),
            protocol: e.protocol,
            port: e.port,
            healthy_endpoints: healthy,
            labels: e.labels.clone(),
        }
    }
}

pub(crate) struct Inner {
    pub zone: ZoneName,
    pub gateway: GatewayId,
    pub identity: Identity,
    pub timing: Timing,
    pub limits: Limits,
    pub endpoint: quinn::Endpoint,
    pub tls: TlsFactory,
    /// Configured peers; replaced as a whole by [`Mesh::reconfigure`] (read with [`Mesh::peers`]).
    pub peers: RwLock<Arc<HashMap<Identity, PeerSpec>>>,
    /// Stops the dial loop of each peer we dial (child tokens of `shutdown`).
    pub dialers: Mutex<HashMap<Identity, CancellationToken>>,
    pub allowed: crate::tls::Allowed,
    pub workloads: Vec<(ipnet::IpNet, Identity)>,
    /// Per service, the source ranges allowed to use it here (absent: anyone).
    pub client_allowlists: RwLock<Arc<HashMap<ServiceName, Vec<ipnet::IpNet>>>>,
    /// As configured; the addresses of peers are added to it (`allowed_sources`).
    pub allowed_sources_base: Vec<ipnet::IpNet>,
    /// `None`: any source may start a handshake.
    pub allowed_sources: RwLock<Option<Vec<ipnet::IpNet>>>,
    pub routes: RwLock<RouteTable>,
    pub conns: Mutex<HashMap<Identity, PeerConn>>,
    /// Signalled whenever a peer connection is registered or ends.
    pub conn_changed: Notify,
    /// What we export; replaced as a whole by [`Mesh::reconfigure`] (read with [`Mesh::exports`]).
    pub exports: RwLock<Arc<BTreeMap<ServiceName, Arc<LocalService>>>>,
    pub catalog: watch::Sender<Arc<LocalCatalog>>,
    /// Bumped whenever routes may have changed (a peer's catalog applied, a peer up, silent or
    /// heard again, our own exports republished): what redirector catalog streams and flows
    /// waiting for a peer's answer wait on.
    pub services_changed: watch::Sender<u64>,
    /// Bumped when our certificate changed: every dialable peer connection is replaced,
    /// make-before-break.
    pub refresh: watch::Sender<u64>,
    /// When [`Mesh::bind`] ran: bounds how long redirectors wait for the first catalogs.
    pub started: std::time::Instant,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub draining: CancellationToken,
    pub flows: TaskTracker,
    pub active_flows: AtomicU32,
    pub backend_legs: Arc<BackendLegs>,
    /// Inbound flows open now, with their callers, so a policy change can revoke them.
    pub inbound: Arc<Mutex<InboundFlows>>,
    pub budget: crate::budget::Budget,
    /// Serves peers' HTTP requests for `http` exports (set by the gateway). Weak: the handler
    /// holds this mesh, and a cycle would keep a stopped gateway's socket bound.
    pub http: std::sync::OnceLock<std::sync::Weak<dyn crate::http::HttpHandler>>,
    /// Decides whether a peer's flow to one of our exports is allowed (the gateway's policy).
    pub authorizer: std::sync::OnceLock<Arc<dyn Authorizer>>,
}

/// One gateway's view of the mesh. Cheap to clone.
#[derive(Clone)]
pub struct Mesh(pub(crate) Arc<Inner>);

impl Mesh {
    /// Binds the overlay's UDP socket. Fails on unusable credentials or an address in use.
    pub fn bind(cfg: MeshConfig) -> Result<Self, MeshError> {
        let identity = cfg.credentials.identity()?;
        let tls = TlsFactory::new(cfg.credentials, cfg.bundle, cfg.metrics.clone())?;
        let allowed = Arc::new(RwLock::new(crate::tls::AllowedSet {
            peers: cfg.peers.iter().map(|p| p.id.clone()).collect::<HashSet<Identity>>(),
            redirector_prefixes: cfg.redirectors,
            client_prefixes: cfg.http3_clients,
        }));
        let server_tls = tls.server(allowed.clone())?;
        // Peers with a known address may always connect, from that address.
        let allowed_sources = allowed_sources(&cfg.allowed_sources, &cfg.peers);
        let mut workloads = cfg.workloads;
        // Longest prefix first, so the first match is the most specific.
        workloads.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        let endpoint =
            transport::bind(cfg.listen, transport::server_config(server_tls, cfg.timing.transport, cfg.limits.quic)?)?;
        let exports: BTreeMap<_, _> =
            cfg.exports.into_iter().map(|e| (e.name.clone(), Arc::new(LocalService::new(e)))).collect();
        let mut routes = RouteTable::new(cfg.zone.clone(), cfg.preferences);
        let catalog = LocalCatalog::new(exports.iter().map(|(n, s)| (n.clone(), s.ad())).collect());
        routes.set_local(catalog.services.values().cloned());
        let inner = Inner {
            zone: cfg.zone,
            gateway: cfg.gateway,
            identity,
            timing: cfg.timing,
            limits: cfg.limits,
            endpoint,
            tls,
            peers: RwLock::new(Arc::new(cfg.peers.into_iter().map(|p| (p.id.clone(), p)).collect())),
            dialers: Mutex::new(HashMap::new()),
            allowed,
            workloads,
            client_allowlists: RwLock::new(Arc::new(cfg.client_allowlists)),
            allowed_sources_base: cfg.allowed_sources,
            allowed_sources: RwLock::new(allowed_sources),
            routes: RwLock::new(routes),
            conns: Mutex::new(HashMap::new()),
            conn_changed: Notify::new(),
            exports: RwLock::new(Arc::new(exports)),
            catalog: watch::channel(Arc::new(catalog)).0,
            services_changed: watch::channel(0).0,
            refresh: watch::channel(0).0,
            started: std::time::Instant::now(),
            metrics: cfg.metrics,
            shutdown: CancellationToken::new(),
            draining: CancellationToken::new(),
            flows: TaskTracker::new(),
            active_flows: AtomicU32::new(0),
            backend_legs: Arc::default(),
            inbound: Arc::default(),
            budget: crate::budget::Budget::new(cfg.limits.memory_budget),
            http: std::sync::OnceLock::new(),
            authorizer: std::sync::OnceLock::new(),
        };
        Ok(Self(Arc::new(inner)))
    }

    /// Whether resident memory is above `limits.memory_budget` now (new work is refused).
    pub fn is_over_budget(&self) -> bool {
        self.0.budget.over()
    }

    /// The timers this gateway was started with.
    pub fn timing(&self) -> Timing {
        self.0.timing
    }

    /// The limits this gateway was started with.
    pub fn limits(&self) -> Limits {
        self.0.limits
    }

    /// Changes `limits.memory_budget` while running (configuration reload); `None` removes it.
    pub fn set_memory_budget(&self, limit: Option<u64>) {
        self.0.budget.set_limit(limit);
    }

    /// Replaces the preferred zones per service; the next flows are routed by them.
    pub fn set_preferences(&self, prefs: HashMap<ServiceName, Vec<ZoneName>>) {
        self.routes_mut().set_preferences(prefs);
        self.services_changed();
    }

    /// The metrics handle of this gateway.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The configured peers, as of now.
    pub fn peers(&self) -> Arc<HashMap<Identity, PeerSpec>> {
        self.0.peers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What this gateway exports, as of now.
    pub(crate) fn exports(&self) -> Arc<BTreeMap<ServiceName, Arc<LocalService>>> {
        self.0.exports.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts the dial loop of a peer with an address (none for a peer that only dials us).
    fn start_dialer(&self, spec: &PeerSpec) {
        if spec.address.is_none() {
            return;
        }
        let stop = self.0.shutdown.child_token();
        if let Some(old) =
            self.0.dialers.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.id.clone(), stop.clone())
        {
            old.cancel();
        }
        tokio::spawn(crate::session::dial_loop(self.clone(), spec.clone(), stop));
    }

    /// Applies a new set of peers and exports while running (configuration reload). A removed
    /// peer is refused from now on and its connections are closed at once (`PEER_REMOVED`); an
    /// added one is dialed; a changed one is removed and added. Exports that did not change keep
    /// their endpoint health; the new catalog reaches peers as updates. Flows that do not involve
    /// a removed peer are untouched; flows to a removed export's endpoints run to their end.
    pub fn reconfigure(&self, peers: Vec<PeerSpec>, exports: Vec<Export>) -> Reconfigured {
        let mut out = Reconfigured::default();
        let new: Arc<HashMap<Identity, PeerSpec>> = Arc::new(peers.iter().map(|p| (p.id.clone(), p.clone())).collect());
        // The new set is published first, so a removed peer that redials in the meantime is
        // already refused (in the handshake, or at registration).
        self.0.allowed.write().unwrap_or_else(|e| e.into_inner()).peers = new.keys().cloned().collect();
        *self.0.allowed_sources.write().unwrap_or_else(|e| e.into_inner()) =
            allowed_sources(&self.0.allowed_sources_base, &peers);
        let old = std::mem::replace(&mut *self.0.peers.write().unwrap_or_else(|e| e.into_inner()), new.clone());
        for (id, spec) in old.iter() {
            if new.get(id) != Some(spec) {
                self.remove_peer(id);
                out.peers_removed += usize::from(!new.contains_key(id));
            }
        }
        for (id, spec) in new.iter() {
            if old.get(id) != Some(spec) {
                out.peers_added += usize::from(!old.contains_key(id));
                self.start_dialer(spec);
            }
        }
        let current = self.exports();
        let exports: BTreeMap<ServiceName, Arc<LocalService>> = exports
            .into_iter()
            .map(|e| match current.get(&e.name).filter(|s| s.export == e) {
                Some(same) => (e.name.clone(), same.clone()),
                None => (e.name.clone(), Arc::new(LocalService::new(e))),
            })
            .collect();
        out.exports_changed = exports.len() != current.len()
            || exports.iter().any(|(n, s)| current.get(n).is_none_or(|c| !Arc::ptr_eq(c, s)));
        // Exports named by host have no addresses until a round resolves them: one at once for
        // those that are new (or changed), rather than at the next tick.
        let unresolved: Vec<Arc<LocalService>> = exports
            .values()
            .filter(|s| current.get(&s.export.name).is_none_or(|c| !Arc::ptr_eq(c, s)))
            .filter(|s| s.export.endpoints.iter().any(|e| matches!(e, Endpoint::Name { .. })))
            .cloned()
            .collect();
        *self.0.exports.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(exports);
        if out.exports_changed {
            self.republish();
        }
        if !unresolved.is_empty() {
            let (mesh, timing) = (self.clone(), self.0.timing);
            tokio::spawn(async move {
                for svc in &unresolved {
                    health_round(svc, timing).await;
                }
                mesh.republish();
            });
        }
        out
    }

    /// Forgets a peer: its dial loop stops, its connection closes, its routes go.
    fn remove_peer(&self, id: &Identity) {
        if let Some(stop) = self.0.dialers.lock().unwrap_or_else(|e| e.into_inner()).remove(id) {
            stop.cancel();
        }
        let conn = self.conns().remove(id);
        if let Some(pc) = conn {
            let code = crate::h3q::varint(causeway_protocol::ErrorCode::PEER_REMOVED.0);
            pc.conn.close(code, b"peer removed from configuration");
        }
        let zone = self.routes().peer(id).and_then(|e| e.zone.as_ref()).map(|z| z.to_string()).unwrap_or_default();
        self.0.metrics.gauge(crate::metrics::PEER_UP, &[("peer", id.as_str()), ("peer_zone", &zone)]).set(0.0);
        self.routes_mut().remove_peer(id);
        self.services_changed();
        self.0.conn_changed.notify_waiters();
        tracing::info!(peer = %id, "peer.removed");
    }

    /// QUIC connections open on the overlay endpoint (peers, replaced ones still finishing, and
    /// redirectors).
    pub fn open_connections(&self) -> usize {
        self.0.endpoint.open_connections()
    }

    /// The UDP address the overlay is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.endpoint.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn identity(&self) -> &Identity {
        &self.0.identity
    }

    pub fn zone(&self) -> &ZoneName {
        &self.0.zone
    }

    /// Runs the overlay until [`Mesh::shutdown`]: accepts peers, dials configured ones, checks
    /// local endpoints.
    pub async fn run(self) {
        let tasks = TaskTracker::new();
        tasks.spawn(crate::session::accept_loop(self.clone()));
        for spec in self.peers().values() {
            self.start_dialer(spec);
        }
        tasks.spawn(health_loop(self.clone()));
        tasks.spawn(crate::budget::sample_loop(self.clone()));
        tasks.close();
        self.0.shutdown.cancelled().await;
        tasks.wait().await;
    }

    /// Stops accepting new flows, tells every peer (goodbye), lets open flows run until they end or
    /// `deadline` passes, then closes every connection. Returns the number of flows cut at the deadline.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.0.draining.cancel();
        self.0.flows.close();
        let cut = match tokio::time::timeout(deadline, self.0.flows.wait()).await {
            Ok(()) => 0,
            Err(_) => self.0.flows.len(),
        };
        self.shutdown();
        cut
    }

    /// Closes every peer connection at once and stops the overlay's tasks.
    pub fn shutdown(&self) {
        self.0.draining.cancel();
        self.0.shutdown.cancel();
        self.0.endpoint.close(crate::h3q::varint(causeway_protocol::ErrorCode::SHUTDOWN.0), b"shutdown");
    }

    /// Waits until every QUIC connection is closed and its close has been sent.
    pub async fn wait_closed(&self) {
        self.0.endpoint.wait_idle().await;
    }

    /// Whether a client at `ip` may use `service` here (capture or a local listener). A refusal is
    /// counted and logged; the caller resets the client before any overlay traffic.
    pub fn client_allowed(&self, service: &ServiceName, ip: std::net::IpAddr, via: &'static str) -> bool {
        let lists = self.0.client_allowlists.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(nets) = lists.get(service) else { return true };
        let ip = unmapped(ip);
        if nets.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        tracing::info!(service = %service, client = %ip, via, "client.refused");
        self.0
            .metrics
            .counter(crate::metrics::CLIENTS_REFUSED, &[("service", service.as_str()), ("via", via)])
            .increment(1);
        false
    }

    /// Replaces the client allowlists (a reload).
    pub fn set_client_allowlists(&self, lists: HashMap<ServiceName, Vec<ipnet::IpNet>>) {
        *self.0.client_allowlists.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(lists);
    }

    /// The workload identity of a source address, from the configured ranges.
    pub fn workload_identity(&self, ip: std::net::IpAddr) -> Option<&Identity> {
        let ip = unmapped(ip);
        self.0.workloads.iter().find(|(net, _)| net.contains(&ip)).map(|(_, id)| id)
    }

    /// Whether `ip` may start a QUIC handshake with this gateway.
    pub(crate) fn source_allowed(&self, ip: std::net::IpAddr) -> bool {
        let ip = unmapped(ip);
        let nets = self.0.allowed_sources.read().unwrap_or_else(|e| e.into_inner());
        nets.as_ref().is_none_or(|nets| nets.iter().any(|n| n.contains(&ip)))
    }

    pub(crate) fn is_redirector(&self, id: &Identity) -> bool {
        self.0.allowed.read().map(|a| a.is_redirector(id)).unwrap_or(false)
    }

    pub(crate) fn is_http3_client(&self, id: &Identity) -> bool {
        self.0.allowed.read().map(|a| a.is_client(id)).unwrap_or(false)
    }

    /// Every service known in the mesh (ours and our peers', reachable or not) and its port: what
    /// redirectors assign VIPs to.
    pub fn known_services(&self) -> BTreeMap<ServiceName, u16> {
        let routes = self.routes();
        let mut out: BTreeMap<ServiceName, u16> = routes.local().map(|a| (a.name.clone(), a.port)).collect();
        for (_, e) in routes.peers() {
            for ad in e.services.values() {
                out.entry(ad.name.clone()).or_insert(ad.port);
            }
        }
        out
    }

    /// Uses a new certificate and trust bundle for every later handshake (rotation). When the leaf
    /// changed, every peer connection this gateway can dial is replaced make-before-break: a new
    /// connection takes new flows, the old one closes once its flows have ended. Peers that only
    /// dial us replace theirs when they see our new leaf on their next connection. Refused (the old
    /// ones stay) for another identity or a bundle that does not hold our leaf's CA.
    pub fn update_tls(&self, creds: Credentials, bundle: TrustBundle) -> Result<bool, TlsError> {
        let changed = self.0.tls.update(creds, bundle)?;
        if changed {
            self.0.refresh.send_modify(|g| *g = g.wrapping_add(1));
        }
        Ok(changed)
    }

    /// The TLS state (certificate, bundle, reload counters).
    pub fn tls(&self) -> &TlsFactory {
        &self.0.tls
    }

    /// Signals redirector catalog streams that [`Mesh::known_services`] may have changed.
    pub(crate) fn services_changed(&self) {
        self.0.services_changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Whether the first catalogs are in: every configured peer has delivered one, or the handshake
    /// timeout has passed since start (a peer that is down, or dials in only, does not hold the
    /// rest back for longer). Until then a restarted gateway would tell redirectors it knows no
    /// services, and they would drop every VIP only to restore them moments later.
    pub(crate) fn catalogs_settled(&self) -> bool {
        if self.0.started.elapsed() >= self.0.timing.handshake_timeout {
            return true;
        }
        let routes = self.routes();
        self.peers().keys().all(|id| routes.peer(id).is_some_and(|e| e.state == PeerState::Up && e.version > 0))
    }

    /// Moves the overlay to a new UDP socket (a new local address or port, as after a NAT rebinding).
    /// Connections this gateway dialed migrate to it (RFC 9000 §9); peers validate the new path.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> std::io::Result<()> {
        self.0.endpoint.rebind(socket)
    }

    /// Resolves once [`Mesh::shutdown`] ran.
    pub async fn stopped(&self) {
        self.0.shutdown.cancelled().await
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.is_cancelled()
    }

    pub fn active_flows(&self) -> u32 {
        self.0.active_flows.load(Ordering::Relaxed)
    }

    /// Whether a peer's connection is up (hello exchanged and answering pings).
    pub fn peer_state(&self, id: &Identity) -> PeerState {
        self.routes().peer(id).map(|e| e.state).unwrap_or(PeerState::Down)
    }

    pub(crate) fn routes(&self) -> std::sync::RwLockReadGuard<'_, RouteTable> {
        self.0.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn routes_mut(&self) -> std::sync::RwLockWriteGuard<'_, RouteTable> {
        self.0.routes.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, PeerConn>> {
        self.0.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `/peers` as JSON.
    /// The version of the catalog this gateway advertises now.
    pub fn catalog_version(&self) -> u64 {
        self.0.catalog.borrow().version
    }

    pub fn peers_json(&self) -> serde_json::Value {
        let routes = self.routes();
        let conns = self.conns();
        let specs = self.peers();
        let mut ids: Vec<&Identity> = specs.keys().collect();
        ids.sort();
        let peers: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let spec = &specs[id];
                let e = routes.peer(id);
                let c = conns.get(id);
                json!({
                    "id": id.to_string(),
                    "address": spec.address,
                    "zone": e.and_then(|e| e.zone.as_ref()).or(spec.zone.as_ref()).map(|z| z.to_string()),
                    "gateway": e.and_then(|e| e.gateway.as_ref()).map(|g| g.to_string()),
                    "state": e.map(|e| e.state).unwrap_or(PeerState::Down).as_str(),
                    "rtt_ms": e.and_then(|e| e.rtt).map(|r| r.as_secs_f64() * 1000.0),
                    "catalog_version": e.map(|e| e.version),
                    "services": e.map(|e| e.services.len()).unwrap_or(0),
                    "dialed_by_us": c.map(|c| c.dialed),
                    "remote_address": c.map(|c| c.conn.remote_address().to_string()),
                })
            })
            .collect();
        json!({ "zone": self.0.zone.to_string(), "gateway": self.0.gateway.to_string(), "identity": self.0.identity.to_string(), "peers": peers })
    }

    /// `/services` as JSON: what each zone offers and where a new flow would go.
    pub fn services_json(&self) -> serde_json::Value {
        let routes = self.routes();
        let mut by_name: BTreeMap<ServiceName, Vec<serde_json::Value>> = BTreeMap::new();
        for ad in routes.local() {
            by_name.entry(ad.name.clone()).or_default().push(json!({
                "zone": self.0.zone.to_string(), "gateway": self.0.gateway.to_string(), "local": true,
                "state": "up", "protocol": ad.protocol.as_str(), "port": ad.port, "healthy_endpoints": ad.healthy_endpoints,
            }));
        }
        for (id, e) in routes.peers() {
            for ad in e.services.values() {
                by_name.entry(ad.name.clone()).or_default().push(json!({
                    "zone": e.zone.as_ref().map(|z| z.to_string()), "gateway": e.gateway.as_ref().map(|g| g.to_string()),
                    "peer": id.to_string(), "local": false, "state": e.state.as_str(), "protocol": ad.protocol.as_str(),
                    "port": ad.port, "healthy_endpoints": ad.healthy_endpoints,
                    "rtt_ms": e.rtt.map(|r| r.as_secs_f64() * 1000.0),
                }));
            }
        }
        let services: Vec<_> = by_name
            .into_iter()
            .map(|(name, offers)| {
                let order: Vec<String> = routes
                    .candidates(&name)
                    .into_iter()
                    .map(|t| match t {
                        crate::routes::Target::Local => "local".to_string(),
                        crate::routes::Target::Peer(id) => id.to_string(),
                    })
                    .collect();
                json!({ "name": name.to_string(), "offers": offers, "route_order": order })
            })
            .collect();
        json!({ "services": services })
    }

    /// Recomputes the local catalog after an endpoint's health changed and publishes it to peers.
    pub(crate) fn republish(&self) {
        let services: BTreeMap<_, _> = self.exports().iter().map(|(n, s)| (n.clone(), s.ad())).collect();
        self.routes_mut().set_local(services.values().cloned());
        self.services_changed();
        self.0.catalog.send_if_modified(|cur| match cur.next(services) {
            Some(next) => {
                *cur = Arc::new(next);
                true
            }
            None => false,
        });
    }
}

/// A v4-mapped address (a dual-stack socket's view of an IPv4 peer) as the IPv4 address it maps,
/// so that IPv4 CIDRs in `workloads`, `allowed_sources` and `client_allowlists` match it.
fn unmapped(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Active health checks: each interval, every endpoint name is resolved (each A/AAAA record an
/// address) and every address gets a TCP connect.
async fn health_loop(mesh: Mesh) {
    let timing = mesh.0.timing;
    let mut tick = tokio::time::interval(timing.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = mesh.0.shutdown.cancelled() => return,
        }
        let exports = mesh.exports();
        let rounds = exports.values().map(|svc| health_round(svc, timing));
        let changed = futures_join_all(rounds.collect()).await.into_iter().any(|c| c);
        if changed {
            mesh.republish();
        }
    }
}

/// Longest wait for one name's resolution in a health round.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// One service's round: resolve, check, publish the new backend list. Returns whether the set of
/// healthy addresses changed.
async fn health_round(svc: &LocalService, timing: Timing) -> bool {
    let old = svc.backends();
    let mut addrs: Vec<(SocketAddr, usize)> = Vec::new();
    for (from, e) in svc.export.endpoints.iter().enumerate() {
        match e {
            Endpoint::Addr(a) => addrs.push((*a, from)),
            Endpoint::Name { host, port } => {
                match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), *port))).await {
                    Ok(Ok(found)) => addrs.extend(found.map(|a| (a, from))),
                    // A resolver outage must not take a service down: the name keeps the
                    // addresses it had (they are still checked), and the failure is logged.
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_string(),
                        };
                        crate::warn_limited!(service = %svc.export.name, endpoint = %e, error, "endpoint.resolve.failed");
                        addrs.extend(old.iter().filter(|b| b.from == from).map(|b| (b.addr, from)));
                    }
                }
            }
        }
    }
    // In a stable order: a resolver that rotates its records (CoreDNS `loadbalance`) is no change.
    addrs.sort();
    let mut seen = HashSet::new();
    addrs.retain(|(a, _)| seen.insert(*a));
    let checks = addrs.iter().map(|(addr, _)| async move {
        let connect = tokio::net::TcpStream::connect(*addr);
        matches!(tokio::time::timeout(timing.backend_connect_timeout, connect).await, Ok(Ok(_)))
    });
    let results = futures_join_all(checks.collect()).await;
    let was = |a: &SocketAddr| old.iter().find(|b| b.addr == *a).map(|b| b.healthy.load(Ordering::Relaxed));
    let mut changed = old.len() != addrs.len() || old.iter().zip(&addrs).any(|(b, (a, _))| b.addr != *a);
    for ((addr, _), ok) in addrs.iter().zip(&results) {
        if was(addr) != Some(*ok) {
            changed = true;
            tracing::info!(service = %svc.export.name, endpoint = %addr, healthy = ok, "endpoint.health");
        }
    }
    let next: Vec<Backend> = addrs
        .into_iter()
        .zip(results)
        .map(|((addr, from), ok)| Backend { addr, from, healthy: AtomicBool::new(ok) })
        .collect();
    *svc.backends.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    changed
}

/// What [`Mesh::reconfigure`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconfigured {
    pub peers_added: usize,
    pub peers_removed: usize,
    pub exports_changed: bool,
}

/// Sources allowed to start a handshake: the configured ones plus every peer's address; `None`
/// (anyone) when none are configured.
fn allowed_sources(base: &[ipnet::IpNet], peers: &[PeerSpec]) -> Option<Vec<ipnet::IpNet>> {
    (!base.is_empty()).then(|| {
        let mut v = base.to_vec();
        // Peers named by host must be covered by `allowed_sources` themselves.
        v.extend(
            peers
                .iter()
                .filter_map(|p| p.address.as_deref()?.parse::<SocketAddr>().ok())
                .map(|a| ipnet::IpNet::from(a.ip())),
        );
        v
    })
}

/// Runs futures concurrently and collects their outputs in order (no extra dependency for one use).
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if outs[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => outs[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outs.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn v4_mapped_addresses_match_ipv4_cidrs() {
        let mapped: std::net::IpAddr = "::ffff:10.1.2.3".parse().expect("addr");
        assert_eq!(super::unmapped(mapped), "10.1.2.3".parse::<std::net::IpAddr>().expect("addr"));
        let v6: std::net::IpAddr = "2001:db8::1".parse().expect("addr");
        assert_eq!(super::unmapped(v6), v6);
    }
}
