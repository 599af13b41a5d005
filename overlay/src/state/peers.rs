//! Peers and their connections: the configured peers, the route table their catalogs feed, the one
//! live connection per peer, and the dial loops that keep them.
//!
//! Lock order is this type's business: the route table before the connections, never the other
//! way. The connection map is private, and every operation that needs both takes them here, in
//! that order, and releases them before acting on a connection (closing it, say).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use causeway_protocol::{ErrorCode, Identity};
use rustls::pki_types::CertificateDer;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::core::route_table::{PeerState, RouteTable};
use crate::core::tiebreak;
use crate::state::PeerSpec;
use crate::transport::h3q::Opener;
use crate::transport::{self, tls};

/// A live connection to a peer.
pub(crate) struct PeerConn {
    pub conn: quinn::Connection,
    pub dialed: bool,
    requests: Option<h3::client::SendRequest<Opener, Bytes>>,
    /// Flows on this connection, both directions: a replaced connection closes once it has none.
    pub flows: Arc<ConnFlows>,
    /// Our leaf when the connection was made: a newer one means the connection is to be replaced.
    local_leaf: CertificateDer<'static>,
}

/// The flows (and HTTP requests) of one peer connection, both directions: open now, and ever.
#[derive(Debug, Default)]
pub struct ConnFlows {
    open: AtomicUsize,
    total: AtomicU64,
}

impl ConnFlows {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// Counts one flow on a peer connection while it lives.
pub struct ConnFlow(Arc<ConnFlows>);

impl ConnFlow {
    pub fn new(flows: &Arc<ConnFlows>) -> Self {
        flows.open.fetch_add(1, Ordering::Relaxed);
        flows.total.fetch_add(1, Ordering::Relaxed);
        Self(flows.clone())
    }
}

impl Drop for ConnFlow {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection that won its registration.
pub(crate) struct Registered {
    /// Flows on it, both directions.
    pub flows: Arc<ConnFlows>,
    /// Our leaf as the connection was made.
    local_leaf: CertificateDer<'static>,
    /// It replaces the current connection once it can carry flows ([`PeerTable::promote`]); until
    /// then the current one keeps serving.
    replacing: bool,
}

/// One peer as the admin API shows it (plain data, read under the table's locks in order).
#[derive(Debug, Clone)]
pub struct PeerView {
    pub spec: PeerSpec,
    pub zone: Option<causeway_protocol::ZoneName>,
    pub gateway: Option<causeway_protocol::GatewayId>,
    pub state: PeerState,
    pub rtt: Option<std::time::Duration>,
    pub catalog_version: Option<u64>,
    pub services: usize,
    /// Whether this gateway dialed the live connection, and the peer's address on it.
    pub dialed_by_us: Option<bool>,
    pub remote_address: Option<std::net::SocketAddr>,
    /// Flows and requests on the live connection, both directions: open now, and since it started.
    pub open_flows: Option<usize>,
    pub flows_total: Option<u64>,
    /// The connection's path as last sampled.
    pub path: Option<crate::core::route_table::PathSummary>,
}

pub(crate) struct PeerTable {
    /// Configured peers; replaced as a whole on reconfiguration.
    specs: RwLock<Arc<HashMap<Identity, PeerSpec>>>,
    /// Stops the dial loop of each peer we dial (child tokens of the mesh's shutdown).
    dialers: Mutex<HashMap<Identity, CancellationToken>>,
    routes: RwLock<RouteTable>,
    conns: Mutex<HashMap<Identity, PeerConn>>,
    /// Signalled whenever a peer connection is registered or ends.
    conn_changed: Notify,
    /// Bumped when our certificate changed: every dialable peer connection is replaced,
    /// make-before-break.
    refresh: watch::Sender<u64>,
    /// Bumped whenever routes may have changed (a peer's catalog applied, a peer up, silent or
    /// heard again, our own exports republished): what redirector catalog streams and flows
    /// waiting for a peer's answer wait on.
    services_changed: watch::Sender<u64>,
}

impl PeerTable {
    pub fn new(specs: Vec<PeerSpec>, routes: RouteTable) -> Self {
        Self {
            specs: RwLock::new(Arc::new(specs.into_iter().map(|p| (p.id.clone(), p)).collect())),
            dialers: Mutex::new(HashMap::new()),
            routes: RwLock::new(routes),
            conns: Mutex::new(HashMap::new()),
            conn_changed: Notify::new(),
            refresh: watch::channel(0).0,
            services_changed: watch::channel(0).0,
        }
    }

    /// The configured peers, as of now.
    pub fn specs(&self) -> Arc<HashMap<Identity, PeerSpec>> {
        self.specs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes a new set of peers; returns the old one.
    pub fn replace_specs(&self, new: Arc<HashMap<Identity, PeerSpec>>) -> Arc<HashMap<Identity, PeerSpec>> {
        std::mem::replace(&mut *self.specs.write().unwrap_or_else(|e| e.into_inner()), new)
    }

    pub fn routes(&self) -> RwLockReadGuard<'_, RouteTable> {
        self.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn routes_mut(&self) -> RwLockWriteGuard<'_, RouteTable> {
        self.routes.write().unwrap_or_else(|e| e.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<Identity, PeerConn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves at the next registration or end of a peer connection (create it before checking
    /// the state it guards, and `enable` it, not to miss one).
    pub fn conn_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.conn_changed.notified()
    }

    pub fn refresh(&self) -> watch::Receiver<u64> {
        self.refresh.subscribe()
    }

    /// Our certificate changed: dialable connections are to be replaced.
    pub fn bump_refresh(&self) {
        self.refresh.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn services_changed(&self) {
        self.services_changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn watch_services(&self) -> watch::Receiver<u64> {
        self.services_changed.subscribe()
    }

    /// Registers the dial loop of `id`, stopping the one it replaces.
    pub fn set_dialer(&self, id: &Identity, stop: CancellationToken) {
        if let Some(old) = self.dialers.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), stop) {
            old.cancel();
        }
    }

    /// Whether a live connection to `peer` is registered.
    pub fn connected(&self, peer: &Identity) -> bool {
        self.conns().contains_key(peer)
    }

    /// Whether `conn` is the registered connection to `peer` (not a replaced one still finishing).
    pub fn is_current(&self, peer: &Identity, conn: &quinn::Connection) -> bool {
        self.conns().get(peer).is_some_and(|c| c.conn.stable_id() == conn.stable_id())
    }

    /// The request sender of `peer`'s connection and a hold on it for one flow's life; `None` while
    /// it cannot carry flows.
    pub fn requests(&self, peer: &Identity) -> Option<(h3::client::SendRequest<Opener, Bytes>, ConnFlow)> {
        let conns = self.conns();
        let c = conns.get(peer)?;
        Some((c.requests.clone()?, ConnFlow::new(&c.flows)))
    }

    /// Registers `conn` unless it loses the tie-break against a live connection to the same peer
    /// ([`tiebreak::decide`], `SPEC.md` §2): a late duplicate from the same side is closed, a
    /// redial replaces one not up yet, a rotated certificate and the winner of a simultaneous dial
    /// (the connection dialed by the lower SPIFFE ID) replace the existing one make-before-break,
    /// once they can carry flows ([`Self::promote`]). Losers are closed with
    /// DUPLICATE_CONNECTION.
    pub fn register(
        &self,
        peer: &Identity,
        conn: &quinn::Connection,
        dialed: bool,
        ours: CertificateDer<'static>,
        we_sort_lower: bool,
    ) -> Option<Registered> {
        // Removed from the configuration after its handshake passed.
        if !self.specs().contains_key(peer) {
            transport::close(conn, ErrorCode::PEER_REMOVED, "not a configured peer");
            return None;
        }
        // Whether the existing connection finished its hello exchange: then it may carry flows,
        // and a late duplicate (say a dial that was retransmitting its Initial until the peer came
        // up) must not replace it. Routes before connections.
        let old_up = self.routes().peer(peer).is_some_and(|e| e.state == PeerState::Up);
        let flows = Arc::new(ConnFlows::default());
        let mut conns = self.conns();
        let live = conns.get(peer).filter(|old| old.conn.close_reason().is_none());
        let existing = live.map(|old| tiebreak::Existing {
            up: old_up,
            dialed: old.dialed,
            rotated: old.local_leaf != ours || tls::peer_leaf(&old.conn) != tls::peer_leaf(conn),
        });
        let mut loser = None;
        match tiebreak::decide(existing, dialed, we_sort_lower) {
            tiebreak::Decision::Register => {}
            tiebreak::Decision::MakeBeforeBreak => {
                tracing::debug!(dialed, "peer.connection.replacing");
                return Some(Registered { flows, local_leaf: ours, replacing: true });
            }
            tiebreak::Decision::KeepExisting => {
                drop(conns);
                tracing::info!(kept = "existing", "peer.duplicate.closed");
                transport::close(conn, ErrorCode::DUPLICATE_CONNECTION, "duplicate connection");
                return None;
            }
            tiebreak::Decision::ReplaceNow => {
                tracing::info!(kept = "new", "peer.duplicate.closed");
                loser = live.map(|old| old.conn.clone());
            }
        }
        let pc =
            PeerConn { conn: conn.clone(), dialed, requests: None, flows: flows.clone(), local_leaf: ours.clone() };
        conns.insert(peer.clone(), pc);
        drop(conns);
        if let Some(old) = loser {
            transport::close(&old, ErrorCode::DUPLICATE_CONNECTION, "duplicate connection");
        }
        self.conn_changed.notify_waiters();
        Some(Registered { flows, local_leaf: ours, replacing: false })
    }

    /// The connection can carry flows now (its HTTP/3 sessions and control stream are up):
    /// publishes its request sender, and if it replaces another connection, makes it the current
    /// one. Returns the connection it replaced, for the caller to retire.
    pub fn promote(
        &self,
        peer: &Identity,
        conn: &quinn::Connection,
        dialed: bool,
        reg: &Registered,
        requests: &h3::client::SendRequest<Opener, Bytes>,
    ) -> Option<PeerConn> {
        let mut conns = self.conns();
        if !reg.replacing {
            if let Some(pc) = conns.get_mut(peer).filter(|pc| pc.conn.stable_id() == conn.stable_id()) {
                pc.requests = Some(requests.clone());
            }
            return None;
        }
        let new = PeerConn {
            conn: conn.clone(),
            dialed,
            requests: Some(requests.clone()),
            flows: reg.flows.clone(),
            local_leaf: reg.local_leaf.clone(),
        };
        let old = conns.insert(peer.clone(), new);
        drop(conns);
        self.conn_changed.notify_waiters();
        old.filter(|o| o.conn.stable_id() != conn.stable_id())
    }

    /// The connection ended: if it is the registered one, the peer goes down. Returns whether it was.
    pub fn unregister(&self, peer: &Identity, conn: &quinn::Connection) -> bool {
        let mut conns = self.conns();
        let current = conns.get(peer).is_some_and(|c| c.conn.stable_id() == conn.stable_id());
        if current {
            conns.remove(peer);
        }
        drop(conns);
        if current {
            self.routes_mut().peer_down(peer);
        }
        self.conn_changed.notify_waiters();
        current
    }

    /// Forgets a peer: its dial loop stops, its connection closes (`PEER_REMOVED`), its routes go.
    /// Returns the zone it was in (for its metrics' labels).
    pub fn remove(&self, id: &Identity) -> String {
        if let Some(stop) = self.dialers.lock().unwrap_or_else(|e| e.into_inner()).remove(id) {
            stop.cancel();
        }
        let conn = self.conns().remove(id);
        if let Some(pc) = conn {
            transport::close(&pc.conn, ErrorCode::PEER_REMOVED, "peer removed from configuration");
        }
        let zone = self.routes().peer(id).and_then(|e| e.zone.as_ref()).map(|z| z.to_string()).unwrap_or_default();
        self.routes_mut().remove_peer(id);
        self.services_changed();
        self.conn_changed.notify_waiters();
        zone
    }

    /// The label of a peer's metrics: the zone it announced, else the one configured for it.
    pub fn zone_label(&self, peer: &Identity) -> String {
        let announced = self.routes().peer(peer).and_then(|e| e.zone.as_ref()).map(|z| z.to_string());
        announced
            .or_else(|| self.specs().get(peer).and_then(|p| p.zone.as_ref()).map(|z| z.to_string()))
            .unwrap_or_default()
    }

    /// Every configured peer, sorted by identity, as plain data.
    pub fn view(&self) -> Vec<PeerView> {
        let specs = self.specs();
        let routes = self.routes();
        let conns = self.conns();
        let mut ids: Vec<&Identity> = specs.keys().collect();
        ids.sort();
        ids.into_iter()
            .map(|id| {
                let e = routes.peer(id);
                let c = conns.get(id);
                PeerView {
                    spec: specs[id].clone(),
                    zone: e.and_then(|e| e.zone.clone()),
                    gateway: e.and_then(|e| e.gateway.clone()),
                    state: e.map(|e| e.state).unwrap_or(PeerState::Down),
                    rtt: e.and_then(|e| e.rtt),
                    catalog_version: e.map(|e| e.version),
                    services: e.map(|e| e.services.len()).unwrap_or(0),
                    dialed_by_us: c.map(|c| c.dialed),
                    remote_address: c.map(|c| c.conn.remote_address()),
                    open_flows: c.map(|c| c.flows.open()),
                    flows_total: c.map(|c| c.flows.total()),
                    path: e.and_then(|e| e.path),
                }
            })
            .collect()
    }
}
