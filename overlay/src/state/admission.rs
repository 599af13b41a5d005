//! Who may use this gateway: the handshake's source ranges and identities (peers, redirectors,
//! HTTP/3 clients), workload identities by source address, per-service client allowlists, the
//! authorizer (policy and rate limits) and the memory budget.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use causeway_protocol::flow::FlowError;
use causeway_protocol::{Identity, ServiceName, ZoneName};

use crate::metrics::{CLIENTS_REFUSED, PEER_ASSERTIONS_REFUSED};
use crate::ports::{Authorizer, FlowCaller};
use crate::state::budget::Budget;
use crate::state::{Mesh, MeshConfig, PeerSpec};
use crate::transport::tls::{Allowed, AllowedSet};

pub(crate) struct Admission {
    /// The identities the TLS verifiers accept (shared with them).
    allowed: Allowed,
    /// Source ranges of workloads and their identities, longest prefix first.
    workloads: Vec<(ipnet::IpNet, Identity)>,
    /// Per service, the source ranges allowed to use it here (absent: anyone).
    client_allowlists: RwLock<Arc<HashMap<ServiceName, Vec<ipnet::IpNet>>>>,
    /// As configured; the addresses of peers are added to it (`allowed_sources`).
    allowed_sources_base: Vec<ipnet::IpNet>,
    /// `None`: any source may start a handshake.
    allowed_sources: RwLock<Option<Vec<ipnet::IpNet>>>,
    authorizer: Arc<dyn Authorizer>,
    pub budget: Budget,
}

impl Admission {
    /// Takes what it needs out of the configuration.
    pub fn new(cfg: &mut MeshConfig) -> Self {
        let allowed = Arc::new(RwLock::new(AllowedSet {
            peers: cfg.peers.iter().map(|p| p.id.clone()).collect::<HashSet<Identity>>(),
            redirector_prefixes: std::mem::take(&mut cfg.redirectors),
            client_prefixes: std::mem::take(&mut cfg.http3_clients),
        }));
        let mut workloads = std::mem::take(&mut cfg.workloads);
        // Longest prefix first, so the first match is the most specific.
        workloads.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        // Peers with a known address may always connect, from that address.
        let allowed_sources = allowed_sources(&cfg.allowed_sources, &cfg.peers);
        Self {
            allowed,
            workloads,
            client_allowlists: RwLock::new(Arc::new(std::mem::take(&mut cfg.client_allowlists))),
            allowed_sources_base: std::mem::take(&mut cfg.allowed_sources),
            allowed_sources: RwLock::new(allowed_sources),
            authorizer: cfg.authorizer.clone(),
            budget: Budget::new(cfg.limits.memory_budget),
        }
    }

    /// The set the TLS server verifier checks client identities against.
    pub fn allowed(&self) -> Allowed {
        self.allowed.clone()
    }

    /// A new set of peers: only they pass the handshake, from their addresses.
    pub fn set_peers(&self, peers: &[PeerSpec]) {
        self.allowed.write().unwrap_or_else(|e| e.into_inner()).peers = peers.iter().map(|p| p.id.clone()).collect();
        *self.allowed_sources.write().unwrap_or_else(|e| e.into_inner()) =
            allowed_sources(&self.allowed_sources_base, peers);
    }

    pub fn authorizer(&self) -> &dyn Authorizer {
        &*self.authorizer
    }
}

impl Mesh {
    /// Whether a client at `ip` may use `service` here (capture or a local listener). A refusal is
    /// counted and logged; the caller resets the client before any overlay traffic.
    pub fn client_allowed(&self, service: &ServiceName, ip: IpAddr, via: &'static str) -> bool {
        let lists = self.0.admission.client_allowlists.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(nets) = lists.get(service) else { return true };
        let ip = unmapped(ip);
        if nets.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        tracing::info!(service = %service, client = %ip, via, "client.refused");
        self.metrics().counter(CLIENTS_REFUSED, &[("service", service.as_str()), ("via", via)]).increment(1);
        false
    }

    /// Replaces the client allowlists (a reload).
    pub fn set_client_allowlists(&self, lists: HashMap<ServiceName, Vec<ipnet::IpNet>>) {
        *self.0.admission.client_allowlists.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(lists);
    }

    /// The workload identity of a source address, from the configured ranges.
    pub fn workload_identity(&self, ip: IpAddr) -> Option<&Identity> {
        let ip = unmapped(ip);
        self.0.admission.workloads.iter().find(|(net, _)| net.contains(&ip)).map(|(_, id)| id)
    }

    /// Whether `ip` may start a QUIC handshake with this gateway.
    pub(crate) fn source_allowed(&self, ip: IpAddr) -> bool {
        let ip = unmapped(ip);
        let nets = self.0.admission.allowed_sources.read().unwrap_or_else(|e| e.into_inner());
        nets.as_ref().is_none_or(|nets| nets.iter().any(|n| n.contains(&ip)))
    }

    pub(crate) fn is_redirector(&self, id: &Identity) -> bool {
        self.0.admission.allowed.read().map(|a| a.is_redirector(id)).unwrap_or(false)
    }

    pub(crate) fn is_http3_client(&self, id: &Identity) -> bool {
        self.0.admission.allowed.read().map(|a| a.is_client(id)).unwrap_or(false)
    }

    /// Whether resident memory is above `limits.memory_budget` now (new work is refused).
    pub fn is_over_budget(&self) -> bool {
        self.0.admission.budget.over()
    }

    /// Changes `limits.memory_budget` while running (configuration reload); `None` removes it.
    pub fn set_memory_budget(&self, limit: Option<u64>) {
        self.0.admission.budget.set_limit(limit);
    }

    /// The caller a flow or request from `peer` is authorized as (`asserted`: its
    /// `causeway-source-identity`), and the caller's zone: the peer's, when `peers[].zone` pins it
    /// (an announced zone is the peer's word only). A refusal is counted and logged (rate-limited).
    pub fn vouched_caller(&self, peer: &Identity, asserted: &str) -> Result<(Identity, Option<ZoneName>), FlowError> {
        let specs = self.peers();
        let spec = specs.get(peer);
        let prefixes = spec.map(|s| s.source_identities.as_slice()).unwrap_or(&[]);
        match crate::core::caller::vouched(peer, prefixes, Some(asserted)) {
            Ok(id) => Ok((id, spec.and_then(|s| s.zone.clone()))),
            Err(why) => {
                self.metrics()
                    .counter(PEER_ASSERTIONS_REFUSED, &[("peer", peer.as_str()), ("reason", why.as_str())])
                    .increment(1);
                let asserted: String = asserted.chars().take(256).collect();
                crate::warn_limited!(%peer, asserted, reason = why.as_str(), "peer.assertion.refused");
                Err(FlowError::IdentityRefused)
            }
        }
    }

    /// Authorization, then rate limits (a limit the zone's gateways share asks their store): the
    /// limits' hold on success, else the refusal and the policy or limit that made it.
    pub(crate) async fn admit_caller(
        &self,
        caller: &FlowCaller<'_>,
    ) -> Result<Box<dyn Send + Sync>, (FlowError, String)> {
        let a = self.0.admission.authorizer();
        let admission = a.authorize_flow(caller).map_err(|policy| (FlowError::PolicyDenied, policy))?;
        admission.await.map_err(|limit| (FlowError::RateLimited, limit))
    }
}

/// A v4-mapped address (a dual-stack socket's view of an IPv4 peer) as the IPv4 address it maps,
/// so that IPv4 CIDRs in `workloads`, `allowed_sources` and `client_allowlists` match it.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
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
