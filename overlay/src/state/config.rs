//! What a mesh is built from: its peers, exports, timers and limits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_protocol::control::Protocol;
use causeway_protocol::limits::CONTROL_SILENCE_SECS;
use causeway_protocol::{GatewayId, Identity, ServiceName, ZoneName};

use crate::metrics::Metrics;
use crate::ports::Authorizer;
use crate::transport::tls::{Credentials, TlsError, TrustBundle};
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

/// Timers of the overlay. Defaults are chosen for failure detection within a second on a WAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            transport: Timers::default(),
        }
    }
}

/// Everything [`crate::Mesh::bind`] needs.
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
    /// Who may publish mesh-wide documents (exact SPIFFE IDs); none: documents are refused.
    pub publishers: Vec<Identity>,
    /// Decides whether a peer's flow to one of our exports is allowed (the gateway's policy):
    /// required, so that a mesh without a policy cannot admit everything by omission.
    pub authorizer: Arc<dyn Authorizer>,
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
            peer_flow_rate: crate::core::abuse::DEFAULT_PEER_FLOW_RATE,
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

/// What [`Mesh::reconfigure`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconfigured {
    pub peers_added: usize,
    pub peers_removed: usize,
    pub exports_changed: bool,
}
