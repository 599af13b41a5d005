//! The gateway's side of redirector hand-off. A redirector (node agent) holds one QUIC connection to
//! its zone gateway, authenticated by its node SPIFFE ID, and opens one HTTP/3 CONNECT per captured
//! connection (`:authority` = `<service>:<port>`, plus the original destination and the source
//! address), and one long-lived catalog stream from which it derives service VIPs.
//!
//! Identity rule (`SPEC.md` §Redirectors): a redirector never names an identity. It reports the
//! source address it captured; the gateway maps that address to a workload identity from its own
//! configuration (`workloads`), or, for an unmapped address, uses the redirector's own node
//! identity. Only gateway peers may send `causeway-source-identity`, and only to a destination
//! gateway; from a redirector that header is ignored.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use causeway_protocol::control::{self, Message, Protocol, ServiceAd};
use causeway_protocol::flow::{FlowError, CATALOG_AUTHORITY, ORIGINAL_DST, SOURCE_ADDRESS, TRACEPARENT};
use causeway_protocol::trace::TraceParent;
use causeway_protocol::{Identity, ServiceName};
use tracing::Instrument;

use crate::flow::relay::ByteSink;
use crate::flow::Downstream;
use crate::metrics::{REDIRECTORS, REDIRECT_FLOWS};
use crate::ports::{refuse, HttpHandler, ServerStream, Source};
use crate::state::Mesh;
use crate::zone::clients::serve_requests;

/// How often a catalog stream rechecks whether the gateway's first catalogs are in, when no
/// catalog event wakes it (the settle deadline passes without one).
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// Serves one redirector connection until it closes.
pub(crate) async fn serve_redirector(mesh: Mesh, conn: quinn::Connection, node: Identity) {
    let span = tracing::info_span!("redirector", node = %node, remote = %conn.remote_address());
    async move {
        let gauge = mesh.metrics().gauge(REDIRECTORS, &[]);
        gauge.increment(1.0);
        tracing::info!("redirector.connected");
        let m = mesh.clone();
        serve_requests(&mesh, &conn, move |req, stream| handle(m.clone(), node.clone(), req, stream)).await;
        gauge.decrement(1.0);
        tracing::info!(reason = ?conn.close_reason(), "redirector.disconnected");
    }
    .instrument(span)
    .await
}

async fn handle(mesh: Mesh, node: Identity, req: http::Request<()>, stream: ServerStream) {
    let authority = req.uri().authority().cloned();
    if req.method() != http::Method::CONNECT {
        return refuse(stream, FlowError::BadRequest).await;
    }
    if authority.as_ref().is_some_and(|a| a.as_str() == CATALOG_AUTHORITY) {
        return catalog_stream(mesh, stream).await;
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let service = authority.as_ref().and_then(|a| ServiceName::new(a.host()).ok());
    let src = header(SOURCE_ADDRESS).and_then(|s| s.parse::<SocketAddr>().ok());
    let (Some(service), Some(src)) = (service, src) else {
        mesh.metrics().counter(REDIRECT_FLOWS, &[("outcome", "bad_request")]).increment(1);
        return refuse(stream, FlowError::BadRequest).await;
    };
    // A service with an allowlist: refused before any overlay traffic (the redirector resets the pod).
    if !mesh.client_allowed(&service, src.ip(), "capture") {
        mesh.metrics().counter(REDIRECT_FLOWS, &[("outcome", "not_allowed")]).increment(1);
        return refuse(stream, FlowError::PolicyDenied).await;
    }
    let identity = mesh.workload_identity(src.ip()).cloned().unwrap_or(node);
    let trace = header(TRACEPARENT).and_then(TraceParent::parse);
    mesh.metrics().counter(REDIRECT_FLOWS, &[("outcome", "accepted")]).increment(1);
    let span = tracing::info_span!("flow", service = %service, client = %src, via = "redirector");
    // The VIP the pod dialed (a redirector always sends it; unspecified otherwise).
    let dst =
        header(ORIGINAL_DST).and_then(|s| s.parse::<SocketAddr>().ok()).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let source = Source { identity, addr: src, dst };
    // An `http` service: the gateway parses the captured connection's requests and routes each
    // on its own (routes, subsets, retries), as for its own listeners.
    if mesh.is_http(&service) {
        if let Some(handler) = mesh.http_handler() {
            return serve_http(stream, handler, service, source).instrument(span).await;
        }
    }
    mesh.serve(Downstream::Stream(Box::new(stream)), service, source, trace).instrument(span).await;
}

/// Bytes of a captured HTTP connection buffered in the pipe between the stream and the parser.
const HTTP_PIPE: usize = 64 * 1024;

/// Answers the redirector's CONNECT and hands the captured connection's bytes to the gateway's
/// HTTP handler through a pipe, relayed with back-pressure both ways.
async fn serve_http(
    mut stream: ServerStream,
    handler: std::sync::Arc<dyn HttpHandler>,
    service: ServiceName,
    source: Source,
) {
    if stream.send_response(http::Response::builder().status(200).body(()).unwrap_or_default()).await.is_err() {
        return;
    }
    let (ours, theirs) = tokio::io::duplex(HTTP_PIPE);
    let (send, recv) = stream.split();
    let (ps, pk) = crate::flow::relay::pipe(ours);
    let counters = crate::flow::relay::Counters::detached();
    let relay = crate::flow::relay::relay_owned(recv, send, ps, pk, counters);
    tokio::join!(relay, handler.serve_connection(theirs, service, source));
}

/// Streams the mesh's service names and ports as control-framed catalog snapshots, a new snapshot
/// whenever the set changes.
async fn catalog_stream(mesh: Mesh, mut stream: ServerStream) {
    if stream.send_response(http::Response::builder().status(200).body(()).unwrap_or_default()).await.is_err() {
        return;
    }
    let (mut tx, mut rx) = stream.split();
    let mut out = BytesMut::new();
    out.put_slice(&control::preface(control::VERSION));
    let mut sent = None;
    let mut version = 0u64;
    let mut changed = mesh.watch_services();
    // A gateway that has just started knows few services or none; the redirector keeps its previous
    // table (VIPs of a restarted gateway stay valid) until the first catalogs are in.
    while !mesh.catalogs_settled() {
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep(SETTLE_POLL) => {}
            _ = rx.recv_data() => return,
            _ = mesh.stopped() => return,
        }
    }
    loop {
        let now = mesh.known_services();
        if sent.as_ref() == Some(&now) {
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                // The redirector never sends on this stream: anything here, its end or an error,
                // means the stream or the connection is gone.
                _ = rx.recv_data() => return,
                _ = mesh.stopped() => return,
            }
            continue;
        }
        version += 1;
        let ads: Vec<ServiceAd> = now
            .iter()
            .map(|(name, port)| ServiceAd {
                name: name.clone(),
                protocol: Protocol::Tcp,
                port: *port,
                healthy_endpoints: 0,
                labels: vec![],
            })
            .collect();
        for f in crate::core::catalog::chunks(version, ads) {
            match control::encode(&Message::Catalog(f)) {
                Ok(b) => out.put_slice(&b),
                Err(_) => return,
            }
        }
        if tx.send(out.split().freeze()).await.is_err() {
            return;
        }
        sent = Some(now);
    }
}
