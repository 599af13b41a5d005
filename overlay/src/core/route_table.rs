//! The route table: which zones offer which services, how healthy and how far they are, and the
//! order in which a new flow tries them. Sans-IO: the peer sessions feed it events and the flow
//! path asks it questions; nothing here blocks or touches a socket.
//!
//! Order of candidates for a service (`SPEC.md` §Routing):
//! 1. this gateway's own endpoints, when it exports the service with a healthy endpoint;
//! 2. peers that are up (not draining, not silent) and advertise the service with a healthy
//!    endpoint, ordered by the service's configured zone preference, then same zone before others,
//!    then lowest measured RTT, then identity (for a stable order).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use causeway_protocol::control::{Catalog, Message, ServiceAd, ServiceUpdate, ServiceWithdraw};
use causeway_protocol::limits::MAX_SERVICES_PER_ZONE;
use causeway_protocol::{GatewayId, Identity, ServiceName, ZoneName};

/// Where a flow can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Local,
    Peer(Identity),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// No live connection.
    Down,
    /// Connected, hello exchanged, answering pings.
    Up,
    /// Said goodbye: existing flows finish, new flows go elsewhere.
    Draining,
    /// Connected but silent for longer than `peer_timeout`: new flows go elsewhere; the connection
    /// is kept (a WAN blackhole may end) until `peer_close_timeout`, and a word from the peer
    /// makes it Up again.
    Silent,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Down => "down",
            PeerState::Up => "up",
            PeerState::Draining => "draining",
            PeerState::Silent => "silent",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PeerEntry {
    pub zone: Option<ZoneName>,
    pub gateway: Option<GatewayId>,
    pub state: PeerState,
    pub rtt: Option<Duration>,
    /// The connection's path as last sampled (at a pong).
    pub path: Option<PathSummary>,
    /// Catalog version of the last applied snapshot or update.
    pub version: u64,
    pub services: Services,
    /// A snapshot being received in chunks.
    pending: Option<Services>,
}

/// A peer connection's path as the transport last reported it (`core::path_stats`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathSummary {
    /// Smoothed RTT, and the path model's minimum over the last 10 s.
    pub rtt: Duration,
    pub min_rtt: Option<Duration>,
    pub cwnd: u64,
    pub mtu: u16,
    /// Packets lost over packets sent in the last full window.
    pub loss_ratio: Option<f64>,
    /// Cumulative since the connection started.
    pub totals: crate::core::path_stats::Totals,
    /// Times the peer's address changed (NAT rebinding, a migration).
    pub migrations: u64,
}

/// The services one peer advertises, keyed by each ad's own name: a table of 200 zones × 5,000
/// services holds millions of entries, and a map keyed by a copy of the name would spend a
/// second string (~56 bytes) on each (`BENCHMARKS.md`, fleet simulation).
#[derive(Debug, Clone, Default)]
pub struct Services(BTreeSet<ByName>);

/// A service ad ordered, compared and looked up by its name alone.
#[derive(Debug, Clone)]
struct ByName(ServiceAd);

impl PartialEq for ByName {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}
impl Eq for ByName {}
impl PartialOrd for ByName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ByName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.name.cmp(&other.0.name)
    }
}
impl Borrow<ServiceName> for ByName {
    fn borrow(&self) -> &ServiceName {
        &self.0.name
    }
}

impl Services {
    pub fn get(&self, name: &ServiceName) -> Option<&ServiceAd> {
        self.0.get(name).map(|b| &b.0)
    }
    pub fn contains_key(&self, name: &ServiceName) -> bool {
        self.0.contains(name)
    }
    /// Every ad, by name.
    pub fn values(&self) -> impl Iterator<Item = &ServiceAd> {
        self.0.iter().map(|b| &b.0)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Adds or replaces the ad of its name.
    pub fn insert(&mut self, ad: ServiceAd) {
        self.0.replace(ByName(ad));
    }
    pub fn remove(&mut self, name: &ServiceName) -> bool {
        self.0.remove(name)
    }
    pub fn clear(&mut self) {
        self.0.clear();
    }
    /// Whether it holds exactly these ads (field for field).
    pub fn same_as(&self, ads: &BTreeMap<ServiceName, ServiceAd>) -> bool {
        self.len() == ads.len() && self.values().all(|a| ads.get(&a.name) == Some(a))
    }
}

impl PeerEntry {
    fn new() -> Self {
        Self {
            zone: None,
            gateway: None,
            state: PeerState::Down,
            rtt: None,
            path: None,
            version: 0,
            services: Services::default(),
            pending: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog of more than {MAX_SERVICES_PER_ZONE} services")]
    TooManyServices,
    #[error("catalog message before hello")]
    NotUp,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    local_zone: Option<ZoneName>,
    local: BTreeMap<ServiceName, ServiceAd>,
    peers: HashMap<Identity, PeerEntry>,
    prefs: HashMap<ServiceName, Vec<ZoneName>>,
}

impl RouteTable {
    pub fn new(local_zone: ZoneName, prefs: HashMap<ServiceName, Vec<ZoneName>>) -> Self {
        Self { local_zone: Some(local_zone), prefs, ..Default::default() }
    }

    /// Replaces the preferred zones per service (`imports[].prefer_zones`, reloaded live).
    pub fn set_preferences(&mut self, prefs: HashMap<ServiceName, Vec<ZoneName>>) {
        self.prefs = prefs;
    }

    /// Replaces what this gateway itself offers.
    pub fn set_local(&mut self, ads: impl IntoIterator<Item = ServiceAd>) {
        self.local = ads.into_iter().map(|a| (a.name.clone(), a)).collect();
    }

    pub fn peer(&self, id: &Identity) -> Option<&PeerEntry> {
        self.peers.get(id)
    }

    pub fn peers(&self) -> impl Iterator<Item = (&Identity, &PeerEntry)> {
        self.peers.iter()
    }

    pub fn local(&self) -> impl Iterator<Item = &ServiceAd> {
        self.local.values()
    }

    /// A peer's hello was accepted: it is up, with an empty catalog until its snapshot arrives —
    /// unless it was up already (a connection replacing another, make-before-break): then its
    /// catalog stands until the new snapshot replaces it, so no flow finds it missing meanwhile.
    pub fn peer_up(&mut self, id: &Identity, zone: ZoneName, gateway: GatewayId) {
        let e = self.peers.entry(id.clone()).or_insert_with(PeerEntry::new);
        if e.state == PeerState::Down || e.zone.as_ref() != Some(&zone) {
            e.services.clear();
        }
        e.zone = Some(zone);
        e.gateway = Some(gateway);
        e.state = PeerState::Up;
        e.version = 0;
        e.pending = None;
    }

    /// The connection ended or the peer went silent. Its catalog is kept for display, unused for routing.
    pub fn peer_down(&mut self, id: &Identity) {
        if let Some(e) = self.peers.get_mut(id) {
            e.state = PeerState::Down;
            e.pending = None;
        }
    }

    pub fn peer_draining(&mut self, id: &Identity) {
        if let Some(e) = self.peers.get_mut(id) {
            if e.state == PeerState::Up {
                e.state = PeerState::Draining;
            }
        }
    }

    /// The peer is no longer configured: its entry (catalog included) goes.
    pub fn remove_peer(&mut self, id: &Identity) {
        self.peers.remove(id);
    }

    /// The peer has been silent too long: no new flows until it is heard again.
    pub fn peer_silent(&mut self, id: &Identity) {
        if let Some(e) = self.peers.get_mut(id) {
            if e.state == PeerState::Up {
                e.state = PeerState::Silent;
            }
        }
    }

    /// A silent peer spoke again.
    pub fn peer_heard(&mut self, id: &Identity) {
        if let Some(e) = self.peers.get_mut(id) {
            if e.state == PeerState::Silent {
                e.state = PeerState::Up;
            }
        }
    }

    /// Records the connection's path telemetry.
    pub fn set_path(&mut self, id: &Identity, path: PathSummary) {
        if let Some(e) = self.peers.get_mut(id) {
            e.path = Some(path);
        }
    }

    pub fn set_rtt(&mut self, id: &Identity, rtt: Duration) {
        if let Some(e) = self.peers.get_mut(id) {
            e.rtt = Some(rtt);
        }
    }

    /// Applies a catalog message from a peer. Returns whether routes changed. Stale updates (version
    /// not above the current one) are ignored: messages on one stream arrive in order, so these only
    /// come from a peer that restarted its numbering, which a new snapshot resets.
    pub fn apply(&mut self, id: &Identity, msg: &Message) -> Result<bool, CatalogError> {
        let e = self.peers.get_mut(id).ok_or(CatalogError::NotUp)?;
        if e.state == PeerState::Down {
            return Err(CatalogError::NotUp);
        }
        match msg {
            Message::Catalog(Catalog { version, services, more }) => {
                let pending = e.pending.get_or_insert_with(Services::default);
                for s in services {
                    pending.insert(s.clone());
                }
                if pending.len() > MAX_SERVICES_PER_ZONE {
                    return Err(CatalogError::TooManyServices);
                }
                if !more {
                    e.services = e.pending.take().unwrap_or_default();
                    e.version = *version;
                    return Ok(true);
                }
                Ok(false)
            }
            Message::ServiceUpdate(ServiceUpdate { version, service }) => {
                if *version <= e.version {
                    return Ok(false);
                }
                e.version = *version;
                if !e.services.contains_key(&service.name) && e.services.len() >= MAX_SERVICES_PER_ZONE {
                    return Err(CatalogError::TooManyServices);
                }
                e.services.insert(service.clone());
                Ok(true)
            }
            Message::ServiceWithdraw(ServiceWithdraw { version, name }) => {
                if *version <= e.version {
                    return Ok(false);
                }
                e.version = *version;
                Ok(e.services.remove(name))
            }
            _ => Ok(false),
        }
    }

    /// Candidates for a new flow to `service`, best first.
    pub fn candidates(&self, service: &ServiceName) -> Vec<Target> {
        let mut out = Vec::new();
        if self.local.get(service).is_some_and(|a| a.healthy_endpoints > 0) {
            out.push(Target::Local);
        }
        let prefs = self.prefs.get(service);
        let rank = |zone: &Option<ZoneName>| {
            let pref =
                prefs.and_then(|p| zone.as_ref().and_then(|z| p.iter().position(|x| x == z))).unwrap_or(usize::MAX);
            let remote = usize::from(zone != &self.local_zone);
            (pref, remote)
        };
        let mut remote: Vec<_> = self
            .peers
            .iter()
            .filter(|(_, e)| e.state == PeerState::Up)
            .filter(|(_, e)| e.services.get(service).is_some_and(|a| a.healthy_endpoints > 0))
            .map(|(id, e)| (rank(&e.zone), e.rtt.unwrap_or(Duration::MAX), id))
            .collect();
        remote.sort();
        out.extend(remote.into_iter().map(|(_, _, id)| Target::Peer(id.clone())));
        out
    }

    /// Whether any zone, up or not, has ever advertised `service` (to tell "unknown" from "unavailable").
    pub fn knows(&self, service: &ServiceName) -> bool {
        self.local.contains_key(service) || self.peers.values().any(|e| e.services.contains_key(service))
    }
}

#[cfg(test)]
mod tests {
    use causeway_protocol::control::Protocol;

    use super::*;

    fn id(s: &str) -> Identity {
        Identity::parse(&format!("spiffe://td/gw/{s}")).unwrap()
    }
    fn zone(s: &str) -> ZoneName {
        ZoneName::new(s).unwrap()
    }
    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }
    fn ad(name: &str, healthy: u32) -> ServiceAd {
        ServiceAd { name: svc(name), protocol: Protocol::Tcp, port: 80, healthy_endpoints: healthy, labels: vec![] }
    }
    fn snapshot(version: u64, ads: Vec<ServiceAd>) -> Message {
        Message::Catalog(Catalog { version, services: ads, more: false })
    }

    fn table() -> RouteTable {
        let mut t = RouteTable::new(zone("a"), HashMap::new());
        for (p, z, rtt) in [("b", "b", 20), ("c", "c", 5)] {
            t.peer_up(&id(p), zone(z), GatewayId::new("gw").unwrap());
            t.set_rtt(&id(p), Duration::from_millis(rtt));
            t.apply(&id(p), &snapshot(1, vec![ad("orders.shop", 1)])).unwrap();
        }
        t
    }

    #[test]
    fn a_silent_peer_gets_no_new_flows_until_heard_and_keeps_its_catalog() {
        let mut t = table();
        t.peer_silent(&id("c"));
        assert_eq!(t.peer(&id("c")).unwrap().state, PeerState::Silent);
        assert_eq!(t.candidates(&svc("orders.shop")), vec![Target::Peer(id("b"))]);
        t.peer_heard(&id("c"));
        assert_eq!(t.candidates(&svc("orders.shop")), vec![Target::Peer(id("c")), Target::Peer(id("b"))]);
        // A draining peer stays draining: silence does not make it Up again when heard.
        t.peer_draining(&id("b"));
        t.peer_silent(&id("b"));
        t.peer_heard(&id("b"));
        assert_eq!(t.peer(&id("b")).unwrap().state, PeerState::Draining);
    }

    #[test]
    fn local_first_then_lowest_rtt() {
        let mut t = table();
        assert_eq!(t.candidates(&svc("orders.shop")), vec![Target::Peer(id("c")), Target::Peer(id("b"))]);
        t.set_local([ad("orders.shop", 2)]);
        assert_eq!(t.candidates(&svc("orders.shop"))[0], Target::Local);
        t.set_local([ad("orders.shop", 0)]);
        assert_eq!(t.candidates(&svc("orders.shop"))[0], Target::Peer(id("c")));
    }

    #[test]
    fn preference_overrides_rtt() {
        let mut t = table();
        t.prefs.insert(svc("orders.shop"), vec![zone("b")]);
        assert_eq!(t.candidates(&svc("orders.shop"))[0], Target::Peer(id("b")));
    }

    #[test]
    fn down_and_draining_peers_are_skipped() {
        let mut t = table();
        t.peer_down(&id("c"));
        assert_eq!(t.candidates(&svc("orders.shop")), vec![Target::Peer(id("b"))]);
        t.peer_draining(&id("b"));
        assert!(t.candidates(&svc("orders.shop")).is_empty());
        assert!(t.knows(&svc("orders.shop")));
    }

    #[test]
    fn updates_apply_in_version_order() {
        let mut t = table();
        let upd = |v, h| Message::ServiceUpdate(ServiceUpdate { version: v, service: ad("orders.shop", h) });
        assert_eq!(t.apply(&id("c"), &upd(2, 0)), Ok(true));
        assert_eq!(t.candidates(&svc("orders.shop")), vec![Target::Peer(id("b"))]);
        // A stale update is ignored.
        assert_eq!(t.apply(&id("c"), &upd(2, 5)), Ok(false));
        let wd = Message::ServiceWithdraw(ServiceWithdraw { version: 3, name: svc("orders.shop") });
        assert_eq!(t.apply(&id("b"), &wd), Ok(true));
        assert!(t.candidates(&svc("orders.shop")).is_empty());
    }

    #[test]
    fn chunked_snapshot_replaces_catalog_when_complete() {
        let mut t = table();
        let chunk = |more, name| Message::Catalog(Catalog { version: 5, services: vec![ad(name, 1)], more });
        t.apply(&id("b"), &chunk(true, "x.ns")).unwrap();
        // Until the last chunk arrives the old catalog stays in force.
        assert!(t.candidates(&svc("x.ns")).is_empty());
        t.apply(&id("b"), &chunk(false, "y.ns")).unwrap();
        assert_eq!(t.candidates(&svc("x.ns")), vec![Target::Peer(id("b"))]);
        assert!(!t.peer(&id("b")).unwrap().services.contains_key(&svc("orders.shop")));
    }

    #[test]
    fn catalog_before_hello_is_refused() {
        let mut t = table();
        assert_eq!(t.apply(&id("z"), &snapshot(1, vec![])), Err(CatalogError::NotUp));
    }
}
