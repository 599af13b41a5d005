//! Connections from this gateway's own zone that are not peers: HTTP/3 clients (workloads holding
//! a mesh certificate) and, through `redirectors`, the node agents. Both are plain HTTP/3 servers
//! here: no control stream, no reverse session.

use std::future::Future;

use bytes::Bytes;
use causeway_protocol::Identity;
use tracing::Instrument;

use crate::ports::{ServerStream, Source};
use crate::state::Mesh;
use crate::transport::MAX_FIELD_SECTION;

/// Serves one HTTP/3 client connection (a workload, not a peer: no control stream, no reverse
/// session) until it closes: each request goes to the gateway's HTTP handler.
pub(crate) async fn serve_http3_client(mesh: Mesh, conn: quinn::Connection, id: Identity) {
    let remote = conn.remote_address();
    let span = tracing::info_span!("http3_client", client = %id, remote = %remote);
    async move {
        let gauge = mesh.metrics().gauge(crate::metrics::HTTP3_CLIENTS, &[]);
        gauge.increment(1.0);
        tracing::info!("http3_client.connected");
        let local = mesh.local_addr();
        let m = mesh.clone();
        serve_requests(&mesh, &conn, move |req, stream| {
            let handler = m.http_handler();
            let source = Source { identity: id.clone(), addr: remote, dst: local };
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
    let (_reverse, server_sess, demux) = crate::transport::h3q::split(conn, false, refused);
    tokio::spawn(demux);
    let built = h3::server::builder().max_field_section_size(MAX_FIELD_SECTION).build::<_, Bytes>(server_sess).await;
    let mut server = match built {
        Ok(s) => s,
        Err(e) => return tracing::debug!(error = %e, "h3.failed"),
    };
    let header_timeout = mesh.timing().header_timeout;
    loop {
        let resolver = tokio::select! {
            r = server.accept() => match r {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => return tracing::debug!(error = %e, "h3.closed"),
            },
            _ = mesh.stopped() => return,
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            if let Ok(Ok((req, stream))) = tokio::time::timeout(header_timeout, resolver.resolve_request()).await {
                handle(req, stream).await;
            }
        });
    }
}
