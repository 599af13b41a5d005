//! What this gateway exports: its services, their endpoints and health, and the catalog it
//! advertises to peers (republished whenever an endpoint's health changes).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use causeway_protocol::control::{Protocol, ServiceAd};
use causeway_protocol::ServiceName;
use tokio::sync::watch;

use crate::core::catalog::LocalCatalog;
use crate::state::{Endpoint, Export, Mesh, Timing};

/// The exports and the catalog made of them. Both are replaced whole: readers take a snapshot.
pub(crate) struct Exports {
    services: RwLock<Arc<BTreeMap<ServiceName, Arc<LocalService>>>>,
    catalog: watch::Sender<Arc<LocalCatalog>>,
}

impl Exports {
    pub fn new(exports: Vec<Export>) -> Self {
        let services: BTreeMap<_, _> =
            exports.into_iter().map(|e| (e.name.clone(), Arc::new(LocalService::new(e)))).collect();
        let catalog = LocalCatalog::new(services.iter().map(|(n, s)| (n.clone(), s.ad())).collect());
        Self { services: RwLock::new(Arc::new(services)), catalog: watch::channel(Arc::new(catalog)).0 }
    }

    pub fn get(&self) -> Arc<BTreeMap<ServiceName, Arc<LocalService>>> {
        self.services.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, next: BTreeMap<ServiceName, Arc<LocalService>>) {
        *self.services.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
    }

    /// The catalog advertised now, and its changes (what peer control streams send).
    pub fn catalog(&self) -> watch::Receiver<Arc<LocalCatalog>> {
        self.catalog.subscribe()
    }

    pub fn ads(&self) -> Vec<ServiceAd> {
        self.catalog.borrow().services.values().cloned().collect()
    }
}

impl Mesh {
    /// What this gateway exports, as of now.
    pub(crate) fn exports(&self) -> Arc<BTreeMap<ServiceName, Arc<LocalService>>> {
        self.0.exports.get()
    }

    /// The version of the catalog this gateway advertises now.
    pub fn catalog_version(&self) -> u64 {
        self.0.exports.catalog.borrow().version
    }

    /// Replaces the exports (a reload): those that did not change keep their endpoint health; the
    /// new catalog reaches peers as updates. Returns whether anything changed.
    pub(crate) fn replace_exports(&self, exports: Vec<Export>) -> bool {
        let current = self.exports();
        let next: BTreeMap<ServiceName, Arc<LocalService>> = exports
            .into_iter()
            .map(|e| match current.get(&e.name).filter(|s| s.export == e) {
                Some(same) => (e.name.clone(), same.clone()),
                None => (e.name.clone(), Arc::new(LocalService::new(e))),
            })
            .collect();
        let changed =
            next.len() != current.len() || next.iter().any(|(n, s)| current.get(n).is_none_or(|c| !Arc::ptr_eq(c, s)));
        // Exports named by host have no addresses until a round resolves them: one at once for
        // those that are new (or changed), rather than at the next tick.
        let unresolved: Vec<Arc<LocalService>> = next
            .values()
            .filter(|s| current.get(&s.export.name).is_none_or(|c| !Arc::ptr_eq(c, s)))
            .filter(|s| s.export.endpoints.iter().any(|e| matches!(e, Endpoint::Name { .. })))
            .cloned()
            .collect();
        self.0.exports.set(next);
        if changed {
            self.republish();
        }
        if !unresolved.is_empty() {
            let (mesh, timing) = (self.clone(), self.timing());
            tokio::spawn(async move {
                for svc in &unresolved {
                    health_round(svc, timing).await;
                }
                mesh.republish();
            });
        }
        changed
    }

    /// Recomputes the local catalog after an endpoint's health changed and publishes it to peers.
    pub(crate) fn republish(&self) {
        let services: BTreeMap<_, _> = self.exports().iter().map(|(n, s)| (n.clone(), s.ad())).collect();
        self.routes_mut().set_local(services.values().cloned());
        self.services_changed();
        self.0.exports.catalog.send_if_modified(|cur| match cur.next(services) {
            Some(next) => {
                *cur = Arc::new(next);
                true
            }
            None => false,
        });
    }

    /// The port this gateway exports `service` on.
    pub fn export_port(&self, service: &ServiceName) -> Option<u16> {
        self.exports().get(service).map(|s| s.export.port)
    }

    /// Whether `service` is an `http` service: this gateway exports it so, or a peer advertises it
    /// so.
    pub fn is_http(&self, service: &ServiceName) -> bool {
        if self.exports().get(service).is_some_and(|s| s.export.protocol == Protocol::Http) {
            return true;
        }
        self.routes().peers().any(|(_, e)| e.services.get(service).is_some_and(|a| a.protocol == Protocol::Http))
    }

    /// Whether this gateway exports `service` as an `http` service on `port` (its advertised
    /// port): nothing else may be asked of it (as for CONNECT, `flow`).
    pub fn exports_http(&self, service: &ServiceName, port: Option<u16>) -> bool {
        self.exports().get(service).is_some_and(|s| s.export.protocol == Protocol::Http && port == Some(s.export.port))
    }

    /// Every address the exported services' endpoints have now (names as last resolved).
    pub fn endpoint_addrs(&self) -> Vec<SocketAddr> {
        self.exports().values().flat_map(|s| s.backends().iter().map(|b| b.addr).collect::<Vec<_>>()).collect()
    }

    /// The endpoints of an exported service that pass their health checks now.
    pub fn healthy_endpoints(&self, service: &ServiceName) -> Vec<SocketAddr> {
        let exports = self.exports();
        let Some(svc) = exports.get(service) else { return Vec::new() };
        svc.backends().iter().filter(|b| b.healthy.load(Ordering::Relaxed)).map(|b| b.addr).collect()
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

    pub(crate) fn ad(&self) -> ServiceAd {
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

/// Active health checks: each interval, every endpoint name is resolved (each A/AAAA record an
/// address) and every address gets a TCP connect.
pub(crate) async fn health_loop(mesh: Mesh) {
    let timing = mesh.timing();
    let mut tick = tokio::time::interval(timing.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = mesh.stopped() => return,
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
        connect_passed(tokio::time::timeout(timing.backend_connect_timeout, connect).await)
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

/// Whether a health check's connect passed: the handshake completed. A reset counts as passed: it
/// comes only after the handshake (no listener is a refusal), and whether the connect or the reset
/// is seen first is a race on loopback — an endpoint that resets at once (an import listener with no
/// route yet) would otherwise pass or fail by chance.
fn connect_passed<T>(r: Result<std::io::Result<T>, tokio::time::error::Elapsed>) -> bool {
    match r {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Err(_) => false,
    }
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
    use super::connect_passed;
    use std::io::{Error, ErrorKind};

    #[test]
    fn a_reset_after_the_handshake_passes_a_refusal_fails() {
        assert!(connect_passed::<()>(Ok(Ok(()))));
        assert!(connect_passed::<()>(Ok(Err(Error::from(ErrorKind::ConnectionReset)))));
        assert!(!connect_passed::<()>(Ok(Err(Error::from(ErrorKind::ConnectionRefused)))));
        assert!(!connect_passed::<()>(Ok(Err(Error::from(ErrorKind::HostUnreachable)))));
    }
}
