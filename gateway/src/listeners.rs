//! Local service listeners: a TCP port on the gateway for each imported service. Every accepted
//! connection becomes one flow through the mesh.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_overlay::metrics::LISTENER_REFUSED;
use causeway_overlay::ports::Source;
use causeway_overlay::Mesh;
use causeway_protocol::ServiceName;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Concurrent connections per listener (`limits.connections_per_listener`). A flow costs a few KiB
/// in the gateway (task, buffers that start at 8 KiB and grow only under load), so 10,000 ≈ 100 MiB
/// at worst.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Concurrent connections per listener from one source address (`limits.connections_per_source`):
/// one misbehaving client cannot take a listener's every slot.
pub const MAX_PER_SOURCE: usize = 1_000;

/// Open connections per source address of one listener.
#[derive(Debug)]
pub struct PerSource {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection, counted against its source until dropped.
pub struct SourceSlot(Arc<PerSource>, IpAddr);

impl PerSource {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, open: Mutex::new(HashMap::new()) })
    }

    /// A slot for a new connection from `ip`, or `None` when it already has `max` open.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self.clone(), ip))
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// Kernel accept queue per listener (capped by `net.core.somaxconn`). tokio's default of 1,024
/// overflows when a thousand clients connect at once; the queue costs nothing until used.
pub const BACKLOG: u32 = 4096;

/// Binds a TCP listener with [`BACKLOG`].
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(BACKLOG)
}

pub struct ImportListener {
    listener: TcpListener,
    service: ServiceName,
    /// Set for an `http` import: each request is routed on its own.
    http: Option<Arc<crate::http::Http>>,
}

impl ImportListener {
    pub async fn bind(
        addr: SocketAddr,
        service: ServiceName,
        http: Option<Arc<crate::http::Http>>,
    ) -> std::io::Result<Self> {
        Ok(Self { listener: listen(addr)?, service, http })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Accepts until `stop`, handing each connection to the mesh. A permit is taken before accepting
    /// so a full listener pushes back through the kernel's accept queue.
    pub async fn run(self, mesh: Mesh, stop: CancellationToken) {
        let limits = mesh.limits();
        let permits = Arc::new(Semaphore::new(limits.connections_per_listener as usize));
        let per_source = PerSource::new(limits.connections_per_source as usize);
        let identity = mesh.identity().clone();
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.cancelled() => return,
            };
            let (tcp, addr) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "listener.accept.failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let Some(slot) = per_source.admit(addr.ip()) else {
                tracing::debug!(client = %addr, "listener.source_full");
                mesh.metrics()
                    .counter(LISTENER_REFUSED, &[("service", self.service.as_str()), ("reason", "per_source")])
                    .increment(1);
                causeway_overlay::flow::relay::abort(tcp);
                continue;
            };
            // A service with an allowlist: refused before any overlay traffic.
            if !mesh.client_allowed(&self.service, addr.ip(), "listener") {
                causeway_overlay::flow::relay::abort(tcp);
                drop(slot);
                continue;
            }
            let mesh = mesh.clone();
            let service = self.service.clone();
            let dst = tcp.local_addr().unwrap_or(self.local_addr());
            // A client listed in `workloads` is that workload; anyone else is this gateway.
            let who = mesh.workload_identity(addr.ip()).cloned().unwrap_or_else(|| identity.clone());
            let source = Source { identity: who, addr, dst };
            let span = tracing::info_span!("flow", service = %service, client = %addr);
            let http = self.http.clone();
            tokio::spawn(
                async move {
                    match http {
                        Some(h) => h.serve_listener_conn(tcp, service, source).await,
                        None => mesh.serve_tcp(tcp, service, source).await,
                    }
                    drop((permit, slot));
                }
                .instrument(span),
            );
        }
    }
}
