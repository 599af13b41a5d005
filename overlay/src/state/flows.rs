//! The flows this gateway carries: the drain's tracker, the active count, its own backend
//! connections (loop detection) and the open inbound flows' callers (revoked on a policy change).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_protocol::{Identity, ServiceName, ZoneName};
use tokio_util::task::TaskTracker;

use crate::ports::FlowCaller;
use crate::state::Mesh;

#[derive(Default)]
pub(crate) struct FlowBook {
    /// Every flow holds a token of it while it runs: a drain waits for them.
    tracker: TaskTracker,
    active: AtomicU32,
    legs: Arc<BackendLegs>,
    /// Inbound flows open now, with their callers, so a policy change can revoke them.
    inbound: Arc<Mutex<InboundFlows>>,
}

/// Counts a flow among the active ones (and in its gauge) while it lives.
pub(crate) struct Active<'a>(&'a FlowBook, metrics::Gauge);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.1.decrement(1.0);
    }
}

impl FlowBook {
    /// Stops handing out flow tokens and waits up to `deadline` for the flows holding one; returns
    /// how many were still running then.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.tracker.close();
        match tokio::time::timeout(deadline, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

impl Mesh {
    /// A token that keeps a drain waiting while the flow runs; `None` once draining started.
    pub(crate) fn flow_guard(&self) -> Option<tokio_util::task::task_tracker::TaskTrackerToken> {
        (!self.is_draining()).then(|| self.0.flows.tracker.token())
    }

    /// Counts a flow as active (and in `gauge`) until the guard drops.
    pub(crate) fn active(&self, gauge: metrics::Gauge) -> Active<'_> {
        self.0.flows.active.fetch_add(1, Ordering::Relaxed);
        gauge.increment(1.0);
        Active(&self.0.flows, gauge)
    }

    pub fn active_flows(&self) -> u32 {
        self.0.flows.active.load(Ordering::Relaxed)
    }

    /// Whether `(local, remote)` is (or just was) one of this gateway's backend connections.
    pub(crate) fn is_backend_leg(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        self.0.flows.legs.contains(local, remote)
    }

    /// Registers a backend connection while the returned guard lives.
    pub(crate) fn backend_leg(&self, local: SocketAddr, remote: SocketAddr) -> BackendLeg {
        BackendLeg::new(&self.0.flows.legs, local, remote)
    }

    /// Registers an open inbound flow's caller; the entry leaves with the returned guard.
    pub(crate) fn register_inbound(&self, caller: InboundCaller) -> InboundEntry {
        let inbound = &self.0.flows.inbound;
        let mut m = inbound.lock().unwrap_or_else(|e| e.into_inner());
        m.next += 1;
        let id = m.next;
        m.open.insert(id, caller);
        InboundEntry(inbound.clone(), id)
    }

    /// Asks the authorizer again about every open inbound flow (after a policy change) and resets
    /// those it now refuses. Returns how many were revoked.
    pub fn reauthorize(&self) -> usize {
        let a = self.0.admission.authorizer();
        let m = self.0.flows.inbound.lock().unwrap_or_else(|e| e.into_inner());
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
                self.metrics().counter(crate::metrics::FLOWS_REVOKED, &[("service", c.service.as_str())]).increment(1);
                c.revoke.cancel();
                revoked += 1;
            }
        }
        revoked
    }
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
