//! The mesh as one gateway sees it, in owned parts with private fields: peers and their
//! connections ([`peers`]), exports and their health ([`exports`]), who may use the gateway
//! ([`admission`]) and the flows it carries ([`flows`]). Each part keeps its own invariants (the
//! lock order of routes and connections is [`peers::PeerTable`]'s); the layers above reach them
//! only through methods.
//!
//! [`Mesh::bind`] binds the overlay's UDP port; running it, reconfiguring and draining are the
//! node's (`crate::node`).

mod admission;
pub mod budget;
mod config;
pub mod documents;
mod exports;
mod flows;
mod peers;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};

use causeway_protocol::{GatewayId, Identity, ServiceName, ZoneName};
use tokio_util::sync::CancellationToken;

pub use self::config::{Endpoint, Export, Limits, MeshConfig, MeshError, PeerSpec, Reconfigured, Timing};
pub(crate) use self::exports::health_loop;
pub(crate) use self::flows::BackendLeg;
pub use self::flows::{InboundCaller, InboundEntry, InboundFlows};
pub use self::peers::{ConnFlow, ConnFlows, PeerView};
pub(crate) use self::peers::{PeerConn, PeerTable, Registered};
use crate::core::catalog::LocalCatalog;
use crate::core::route_table::{PeerState, RouteTable};
use crate::metrics::Metrics;
use crate::ports::HttpHandler;
use crate::transport::tls::{Credentials, TlsError, TlsFactory, TrustBundle};
use crate::transport::{self, h3q};

struct Inner {
    zone: ZoneName,
    gateway: GatewayId,
    identity: Identity,
    timing: Timing,
    limits: Limits,
    endpoint: quinn::Endpoint,
    tls: TlsFactory,
    metrics: Metrics,
    /// When [`Mesh::bind`] ran: bounds how long redirectors wait for the first catalogs.
    started: std::time::Instant,
    shutdown: CancellationToken,
    draining: CancellationToken,
    peers: PeerTable,
    exports: exports::Exports,
    admission: admission::Admission,
    flows: flows::FlowBook,
    documents: documents::Documents,
    /// Serves `http` requests (set by the gateway). Weak: the handler holds this mesh, and a cycle
    /// would keep a stopped gateway's socket bound.
    http: OnceLock<Weak<dyn HttpHandler>>,
}

/// One gateway's view of the mesh. Cheap to clone.
#[derive(Clone)]
pub struct Mesh(Arc<Inner>);

impl Mesh {
    /// Binds the overlay's UDP socket. Fails on unusable credentials or an address in use.
    pub fn bind(mut cfg: MeshConfig) -> Result<Self, MeshError> {
        let identity = cfg.credentials.identity()?;
        let admission = admission::Admission::new(&mut cfg);
        let tls = TlsFactory::new(cfg.credentials, cfg.bundle, cfg.metrics.clone())?;
        let server_tls = tls.server(admission.allowed())?;
        let endpoint =
            transport::bind(cfg.listen, transport::server_config(server_tls, cfg.timing.transport, cfg.limits.quic)?)?;
        let exports = exports::Exports::new(cfg.exports);
        let mut routes = RouteTable::new(cfg.zone.clone(), cfg.preferences);
        routes.set_local(exports.ads());
        let inner = Inner {
            zone: cfg.zone,
            gateway: cfg.gateway,
            identity,
            timing: cfg.timing,
            limits: cfg.limits,
            endpoint,
            tls,
            metrics: cfg.metrics,
            started: std::time::Instant::now(),
            shutdown: CancellationToken::new(),
            draining: CancellationToken::new(),
            peers: PeerTable::new(cfg.peers, routes),
            exports,
            admission,
            flows: flows::FlowBook::default(),
            documents: documents::Documents::new(cfg.publishers),
            http: OnceLock::new(),
        };
        Ok(Self(Arc::new(inner)))
    }

    /// The timers this gateway was started with.
    pub fn timing(&self) -> Timing {
        self.0.timing
    }

    /// The limits this gateway was started with.
    pub fn limits(&self) -> Limits {
        self.0.limits
    }

    /// The metrics handle of this gateway.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn identity(&self) -> &Identity {
        &self.0.identity
    }

    pub fn zone(&self) -> &ZoneName {
        &self.0.zone
    }

    pub fn gateway(&self) -> &GatewayId {
        &self.0.gateway
    }

    pub(crate) fn endpoint(&self) -> &quinn::Endpoint {
        &self.0.endpoint
    }

    /// The TLS state (certificate, bundle, reload counters).
    pub fn tls(&self) -> &TlsFactory {
        &self.0.tls
    }

    /// Peers, their connections and the route table.
    pub(crate) fn peer_table(&self) -> &PeerTable {
        &self.0.peers
    }

    pub(crate) fn admission(&self) -> &admission::Admission {
        &self.0.admission
    }

    /// The catalog this gateway advertises, and its changes.
    pub(crate) fn local_catalog(&self) -> tokio::sync::watch::Receiver<Arc<LocalCatalog>> {
        self.0.exports.catalog()
    }

    /// The configured peers, as of now.
    pub fn peers(&self) -> Arc<HashMap<Identity, PeerSpec>> {
        self.0.peers.specs()
    }

    /// Every configured peer as the admin API shows it.
    pub fn peer_view(&self) -> Vec<PeerView> {
        self.0.peers.view()
    }

    pub(crate) fn routes(&self) -> std::sync::RwLockReadGuard<'_, RouteTable> {
        self.0.peers.routes()
    }

    pub(crate) fn routes_mut(&self) -> std::sync::RwLockWriteGuard<'_, RouteTable> {
        self.0.peers.routes_mut()
    }

    /// Runs `f` on the route table (read-only): what the admin API renders.
    pub fn with_routes<T>(&self, f: impl FnOnce(&RouteTable) -> T) -> T {
        f(&self.routes())
    }

    /// Replaces the preferred zones per service; the next flows are routed by them.
    pub fn set_preferences(&self, prefs: HashMap<ServiceName, Vec<ZoneName>>) {
        self.routes_mut().set_preferences(prefs);
        self.services_changed();
    }

    /// Whether a peer's connection is up (hello exchanged and answering pings).
    pub fn peer_state(&self, id: &Identity) -> PeerState {
        self.routes().peer(id).map(|e| e.state).unwrap_or(PeerState::Down)
    }

    /// Signals redirector catalog streams (and flows waiting for a peer's answer) that routes may
    /// have changed.
    pub(crate) fn services_changed(&self) {
        self.0.peers.services_changed();
    }

    pub(crate) fn watch_services(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.peers.watch_services()
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

    /// Uses a new certificate and trust bundle for every later handshake (rotation). When the leaf
    /// changed, every peer connection this gateway can dial is replaced make-before-break: a new
    /// connection takes new flows, the old one closes once its flows have ended. Peers that only
    /// dial us replace theirs when they see our new leaf on their next connection. Refused (the old
    /// ones stay) for another identity or a bundle that does not hold our leaf's CA.
    pub fn update_tls(&self, creds: Credentials, bundle: TrustBundle) -> Result<bool, TlsError> {
        let changed = self.0.tls.update(creds, bundle)?;
        if changed {
            self.0.peers.bump_refresh();
        }
        Ok(changed)
    }

    /// Registers the gateway's HTTP handler (once; later calls are ignored). The mesh keeps only a
    /// weak reference: the caller owns the handler.
    pub fn set_http_handler(&self, h: &Arc<dyn HttpHandler>) {
        let _ = self.0.http.set(Arc::downgrade(h));
    }

    /// The registered HTTP handler, if the gateway still holds it.
    pub(crate) fn http_handler(&self) -> Option<Arc<dyn HttpHandler>> {
        self.0.http.get().and_then(Weak::upgrade)
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

    /// Moves the overlay to a new UDP socket (a new local address or port, as after a NAT rebinding).
    /// Connections this gateway dialed migrate to it (RFC 9000 §9); peers validate the new path.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> std::io::Result<()> {
        self.0.endpoint.rebind(socket)
    }

    /// The token cancelled at shutdown (dial loops get child tokens of it).
    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.0.shutdown
    }

    /// Resolves once [`Mesh::shutdown`] ran.
    pub async fn stopped(&self) {
        self.0.shutdown.cancelled().await
    }

    /// Resolves once a drain (or shutdown) started.
    pub(crate) async fn draining(&self) {
        self.0.draining.cancelled().await
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.is_cancelled()
    }

    /// Stops accepting new flows, tells every peer (goodbye), lets open flows run until they end or
    /// `deadline` passes, then closes every connection. Returns the number of flows cut at the deadline.
    pub async fn drain(&self, deadline: std::time::Duration) -> usize {
        self.0.draining.cancel();
        let cut = self.0.flows.drain(deadline).await;
        self.shutdown();
        cut
    }

    /// Closes every peer connection at once and stops the overlay's tasks.
    pub fn shutdown(&self) {
        self.0.draining.cancel();
        self.0.shutdown.cancel();
        self.0.endpoint.close(h3q::varint(causeway_protocol::ErrorCode::SHUTDOWN.0), b"shutdown");
    }

    /// Waits until every QUIC connection is closed and its close has been sent.
    pub async fn wait_closed(&self) {
        self.0.endpoint.wait_idle().await;
    }
}
