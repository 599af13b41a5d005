//! HTTP requests across the overlay: each request of an `http` service is its own HTTP/3 request
//! on the peer connection (not a CONNECT tunnel), so one slow response never holds up another.
//!
//! The overlay only carries them: it hands a peer's non-CONNECT requests to the [`HttpHandler`] the
//! gateway registered, and lets the gateway open a request toward a chosen peer
//! ([`Mesh::open_http`]). Parsing client HTTP, routes, load balancing and talking to endpoints are
//! the gateway's (`causeway::http`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use causeway_protocol::control::ServiceAd;
use causeway_protocol::flow::{FlowError, ERROR};
use causeway_protocol::{Identity, ServiceName, ZoneName};

use crate::abuse::StreamEnd;
use crate::flow::ServerStream;
use crate::mesh::Mesh;
use crate::routes::{PeerState, Target};

/// The client side of an HTTP/3 request toward a peer.
pub type ClientStream = h3::client::RequestStream<crate::h3q::BidiStream, Bytes>;

/// Who sent a request across the overlay.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub identity: Identity,
    pub zone: Option<ZoneName>,
}

/// Serves HTTP requests peers send for this gateway's `http` exports.
pub trait HttpHandler: Send + Sync + 'static {
    /// Serves one request until its response is complete. Returns whether the peer reset it (for
    /// the rapid-reset rule).
    fn serve(
        self: Arc<Self>,
        req: http::Request<()>,
        stream: ServerStream,
        from: PeerInfo,
    ) -> Pin<Box<dyn Future<Output = StreamEnd> + Send + 'static>>;

    /// Serves one request an HTTP/3 client (a workload holding a mesh certificate) sent straight
    /// to this gateway: `:authority` names the service; routed like a listener's requests.
    fn serve_request(
        self: Arc<Self>,
        req: http::Request<()>,
        stream: ServerStream,
        source: crate::flow::Source,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

    /// Serves a client connection of an `http` service that reached the gateway as bytes (a
    /// redirector's captured connection), at the other end of `io`, until it closes.
    fn serve_connection(
        self: Arc<Self>,
        io: tokio::io::DuplexStream,
        service: ServiceName,
        source: crate::flow::Source,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// A candidate for a request: where, and the labels it advertised for the service.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub target: Target,
    pub zone: ZoneName,
    pub labels: Vec<(String, String)>,
}

impl Mesh {
    /// Registers the gateway's HTTP handler (once; later calls are ignored). The mesh keeps only a
    /// weak reference: the caller owns the handler.
    pub fn set_http_handler(&self, h: &Arc<dyn HttpHandler>) {
        let _ = self.0.http.set(Arc::downgrade(h));
    }

    /// Where `service` can be served now, best first (as for flows: local, then preferred zones,
    /// then by RTT), with the labels each place advertised.
    pub fn http_candidates(&self, service: &ServiceName) -> Vec<Candidate> {
        let routes = self.routes();
        let local_labels = |ad: Option<&ServiceAd>| ad.map(|a| a.labels.clone()).unwrap_or_default();
        routes
            .candidates(service)
            .into_iter()
            .filter_map(|t| match &t {
                Target::Local => Some(Candidate {
                    zone: self.0.zone.clone(),
                    labels: local_labels(routes.local().find(|a| &a.name == service)),
                    target: t,
                }),
                Target::Peer(id) => {
                    let e = routes.peer(id).filter(|e| e.state == PeerState::Up)?;
                    Some(Candidate { zone: e.zone.clone()?, labels: local_labels(e.services.get(service)), target: t })
                }
            })
            .collect()
    }

    /// The port this gateway exports `service` on.
    pub fn export_port(&self, service: &ServiceName) -> Option<u16> {
        self.exports().get(service).map(|s| s.export.port)
    }

    /// Registers the gateway's authorization of flows (once; later calls are ignored).
    pub fn set_authorizer(&self, a: Arc<dyn crate::mesh::Authorizer>) {
        let _ = self.0.authorizer.set(a);
    }

    /// Whether `service` is an `http` service: this gateway exports it so, or a peer advertises it
    /// so.
    pub fn is_http(&self, service: &ServiceName) -> bool {
        use causeway_protocol::control::Protocol;
        if self.exports().get(service).is_some_and(|s| s.export.protocol == Protocol::Http) {
            return true;
        }
        self.routes().peers().any(|(_, e)| e.services.get(service).is_some_and(|a| a.protocol == Protocol::Http))
    }

    /// The registered HTTP handler, if the gateway still holds it.
    pub(crate) fn http_handler(&self) -> Option<Arc<dyn HttpHandler>> {
        self.0.http.get().and_then(std::sync::Weak::upgrade)
    }

    /// The port `peer` advertised for `service` (the request's `:authority` port).
    pub fn advertised_port(&self, peer: &Identity, service: &ServiceName) -> Option<u16> {
        self.routes().peer(peer)?.services.get(service).map(|a| a.port)
    }

    /// Opens an HTTP/3 request toward `peer` (its headers are sent; the body and the response are
    /// the caller's). The connection is kept open for the request's life.
    pub async fn open_http(
        &self,
        peer: &Identity,
        req: http::Request<()>,
    ) -> Result<(ClientStream, crate::mesh::ConnFlow), FlowError> {
        let (mut requests, held) = {
            let conns = self.conns();
            let c = conns.get(peer).ok_or(FlowError::NoHealthyEndpoint)?;
            let req = c.requests.clone().ok_or(FlowError::NoHealthyEndpoint)?;
            (req, crate::mesh::ConnFlow::new(&c.flows))
        };
        let stream = requests.send_request(req).await.map_err(|_| FlowError::BackendRefused)?;
        Ok((stream, held))
    }

    /// Whether this gateway exports `service` as an `http` service on `port` (its advertised
    /// port): nothing else may be asked of it (as for CONNECT, `flow`).
    pub fn exports_http(&self, service: &ServiceName, port: Option<u16>) -> bool {
        self.exports().get(service).is_some_and(|s| {
            s.export.protocol == causeway_protocol::control::Protocol::Http && port == Some(s.export.port)
        })
    }

    /// The endpoint protocol and breakers of an exported `http` service.
    pub fn http_options(&self, service: &ServiceName) -> crate::mesh::HttpOptions {
        self.exports().get(service).map(|s| s.export.http.clone()).unwrap_or_default()
    }

    /// Every address the exported services' endpoints have now (names as last resolved).
    pub fn endpoint_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.exports().values().flat_map(|s| s.backends().iter().map(|b| b.addr).collect::<Vec<_>>()).collect()
    }

    /// The endpoints of an exported service that pass their health checks now.
    pub fn healthy_endpoints(&self, service: &ServiceName) -> Vec<std::net::SocketAddr> {
        let exports = self.exports();
        let Some(svc) = exports.get(service) else { return Vec::new() };
        svc.backends().iter().filter(|b| b.healthy.load(std::sync::atomic::Ordering::Relaxed)).map(|b| b.addr).collect()
    }
}

/// Serves one HTTP/3 client connection (a workload, not a peer: no control stream, no reverse
/// session) until it closes: each request goes to the gateway's HTTP handler.
pub(crate) async fn serve_client(mesh: Mesh, conn: quinn::Connection, id: Identity) {
    use tracing::Instrument;
    let remote = conn.remote_address();
    let span = tracing::info_span!("http3_client", client = %id, remote = %remote);
    async move {
        let gauge = mesh.metrics().gauge(crate::metrics::HTTP3_CLIENTS, &[]);
        gauge.increment(1.0);
        tracing::info!("http3_client.connected");
        let local = mesh.0.endpoint.local_addr().unwrap_or(remote);
        let m = mesh.clone();
        serve_requests(&mesh, &conn, move |req, stream| {
            let handler = m.http_handler();
            let source = crate::flow::Source { identity: id.clone(), addr: remote, dst: local };
            async move {
                if let Some(handler) = handler {
                    handler.serve_request(req, stream, source).await;
                }
            }
        })
        .await;
        gauge.decrement(1.0);
        tracing::info!(reason = ?conn.close_reason(), "http3_client.disconnected");
    }
    .instrument(span)
    .await
}

/// Serves the HTTP/3 requests of a connection from this zone's side (a redirector or an HTTP/3
/// client: no control stream, no reverse session) until it closes or the mesh shuts down. Each
/// request whose head arrives within `timing.header_timeout` goes to `handle`, on a task of its own.
pub(crate) async fn serve_requests<F, Fut>(mesh: &Mesh, conn: &quinn::Connection, handle: F)
where
    F: Fn(http::Request<()>, ServerStream) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let refused = mesh.metrics().counter(crate::metrics::H3_FRAMES_REFUSED, &[]);
    let (_reverse, server_sess, demux) = crate::h3q::split(conn, false, refused);
    tokio::spawn(demux);
    let built = h3::server::builder()
        .max_field_section_size(crate::session::MAX_FIELD_SECTION)
        .build::<_, Bytes>(server_sess)
        .await;
    let mut server = match built {
        Ok(s) => s,
        Err(e) => return tracing::debug!(error = %e, "h3.failed"),
    };
    let header_timeout = mesh.0.timing.header_timeout;
    loop {
        let resolver = tokio::select! {
            r = server.accept() => match r {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => return tracing::debug!(error = %e, "h3.closed"),
            },
            _ = mesh.0.shutdown.cancelled() => return,
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            if let Ok(Ok((req, stream))) = tokio::time::timeout(header_timeout, resolver.resolve_request()).await {
                handle(req, stream).await;
            }
        });
    }
}

/// Answers a request the gateway cannot serve with `e`'s status and reason.
pub async fn refuse(mut stream: ServerStream, e: FlowError) {
    let resp = http::Response::builder().status(e.status()).header(ERROR, e.as_str()).body(()).unwrap_or_default();
    if stream.send_response(resp).await.is_ok() {
        let _ = stream.finish().await;
    }
}
