//! Local service listeners: a TCP port on the gateway for each imported service. Every accepted
//! connection becomes one flow through the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_overlay::flow::Source;
use causeway_overlay::Mesh;
use causeway_protocol::ServiceName;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Concurrent connections per listener. A flow costs a few KiB in the gateway (task, buffers that
/// start at 8 KiB and grow only under load), so 10,000 ≈ 100 MiB at worst.
pub const MAX_CONNECTIONS: usize = 10_000;

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
}

impl ImportListener {
    pub async fn bind(addr: SocketAddr, service: ServiceName) -> std::io::Result<Self> {
        Ok(Self { listener: listen(addr)?, service })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Accepts until `stop`, handing each connection to the mesh. A permit is taken before accepting
    /// so a full listener pushes back through the kernel's accept queue.
    pub async fn run(self, mesh: Mesh, stop: CancellationToken) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
            let mesh = mesh.clone();
            let service = self.service.clone();
            let source = Source { identity: identity.clone(), addr };
            let span = tracing::info_span!("flow", service = %service, client = %addr);
            tokio::spawn(
                async move {
                    mesh.serve_client(tcp, service, source).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }
}
