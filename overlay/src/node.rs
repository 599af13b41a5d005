//! The node: a gateway's overlay put together. It runs the mesh (accepting connections, dialing
//! peers, checking endpoints), applies reconfiguration, and is the one place that dispatches — an
//! accepted connection to a peer session, a redirector or an HTTP/3 client; a peer's request to a
//! flow or to the gateway's HTTP handler — so the layers below never import each other.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use causeway_protocol::{ErrorCode, Identity};
use tokio_util::task::TaskTracker;

use crate::core::abuse::StreamEnd;
use crate::metrics::{INITIALS_REFUSED, PEER_CONNECTS};
use crate::peer::{self, PeerRequest};
use crate::ports::{refuse, PeerInfo};
use crate::state::{Export, Mesh, PeerSpec, Reconfigured};
use crate::transport::{self, tls};
use crate::{flow, zone};

impl Mesh {
    /// Runs the overlay until [`Mesh::shutdown`]: accepts peers, dials configured ones, checks
    /// local endpoints.
    pub async fn run(self) {
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(self.clone()));
        for spec in self.peers().values() {
            self.start_dialer(spec);
        }
        tasks.spawn(crate::state::health_loop(self.clone()));
        tasks.spawn(crate::state::budget::sample_loop(self.clone()));
        tasks.close();
        self.stopped().await;
        tasks.wait().await;
    }

    /// Starts the dial loop of a peer with an address (none for a peer that only dials us).
    fn start_dialer(&self, spec: &PeerSpec) {
        if spec.address.is_none() {
            return;
        }
        let stop = self.shutdown_token().child_token();
        self.peer_table().set_dialer(&spec.id, stop.clone());
        tokio::spawn(peer::dial::dial_loop(self.clone(), spec.clone(), stop, dispatch));
    }

    /// Applies a new set of peers and exports while running (configuration reload). A removed
    /// peer is refused from now on and its connections are closed at once (`PEER_REMOVED`); an
    /// added one is dialed; a changed one is removed and added. Exports that did not change keep
    /// their endpoint health; the new catalog reaches peers as updates. Flows that do not involve
    /// a removed peer are untouched; flows to a removed export's endpoints run to their end.
    pub fn reconfigure(&self, peers: Vec<PeerSpec>, exports: Vec<Export>) -> Reconfigured {
        let mut out = Reconfigured::default();
        let new: Arc<HashMap<Identity, PeerSpec>> = Arc::new(peers.iter().map(|p| (p.id.clone(), p.clone())).collect());
        // The new set is published first, so a removed peer that redials in the meantime is
        // already refused (in the handshake, or at registration).
        self.admission().set_peers(&peers);
        let old = self.peer_table().replace_specs(new.clone());
        for (id, spec) in old.iter() {
            if new.get(id) != Some(spec) {
                self.remove_peer(id);
                out.peers_removed += usize::from(!new.contains_key(id));
            }
        }
        for (id, spec) in new.iter() {
            if old.get(id) != Some(spec) {
                out.peers_added += usize::from(!old.contains_key(id));
                self.start_dialer(spec);
            }
        }
        out.exports_changed = self.replace_exports(exports);
        out
    }

    /// Forgets a peer: its dial loop stops, its connection closes, its routes go.
    fn remove_peer(&self, id: &Identity) {
        let zone = self.peer_table().remove(id);
        self.metrics().gauge(crate::metrics::PEER_UP, &[("peer", id.as_str()), ("peer_zone", &zone)]).set(0.0);
        tracing::info!(peer = %id, "peer.removed");
    }
}

/// Serves a peer's request: a CONNECT is a flow to one of our exports (`flow::inbound`); any
/// other request is the gateway's HTTP handler's (for `http` exports).
fn dispatch(mesh: Mesh, r: PeerRequest) -> Pin<Box<dyn Future<Output = StreamEnd> + Send>> {
    Box::pin(async move {
        let PeerRequest { req, stream, peer, held, admitted } = r;
        if req.method() != http::Method::CONNECT {
            if let Some(h) = mesh.http_handler() {
                if !admitted {
                    // A throttled peer's requests are refused like its flows (`abuse`).
                    refuse(stream, causeway_protocol::flow::FlowError::PeerFlowRate).await;
                    return StreamEnd::Other;
                }
                let zone = mesh.routes().peer(&peer).and_then(|e| e.zone.clone());
                let _held = held;
                return h.serve(req, stream, PeerInfo { identity: peer, zone }).await;
            }
        }
        let inbound = flow::inbound::serve(&mesh, Box::new(req), Box::new(stream), &peer, held, admitted);
        Box::pin(inbound).await
    })
}

/// Handshakes in progress above which new ones must first prove their address with a Retry
/// (RFC 9000 §8.1.2), so a flood of spoofed Initials costs us no crypto.
const RETRY_ABOVE: usize = 64;

/// TLS alert `certificate_required` (RFC 8446 §6.2).
const CERTIFICATE_REQUIRED: u8 = 116;

async fn accept_loop(mesh: Mesh) {
    let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Looked up once: under a flood this loop must stay cheap (quinn ignores Initials beyond
    // `limits.pending_handshakes` waiting here, also before any crypto, but uncounted).
    let not_allowed = mesh.metrics().counter(INITIALS_REFUSED, &[("reason", "source_not_allowed")]);
    loop {
        let incoming = tokio::select! {
            i = mesh.endpoint().accept() => match i { Some(i) => i, None => return },
            _ = mesh.stopped() => return,
        };
        let remote = incoming.remote_address();
        // Refuse unknown sources before any handshake crypto.
        if !mesh.source_allowed(remote.ip()) {
            not_allowed.increment(1);
            incoming.refuse();
            continue;
        }
        if pending.load(std::sync::atomic::Ordering::Relaxed) >= RETRY_ABOVE && !incoming.remote_address_validated() {
            mesh.metrics().counter(INITIALS_REFUSED, &[("reason", "retry")]).increment(1);
            let _ = incoming.retry();
            continue;
        }
        let mesh = mesh.clone();
        let pending = pending.clone();
        pending.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            struct Done(std::sync::Arc<std::sync::atomic::AtomicUsize>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let done = Done(pending);
            let res = match incoming.accept() {
                Ok(connecting) => tokio::time::timeout(mesh.timing().handshake_timeout, connecting).await,
                Err(e) => Ok(Err(e)),
            };
            let conn = match res {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    // A client that sent no certificate never reaches the verifier (which counts
                    // every other refusal): TLS answered `certificate_required` itself.
                    if let quinn::ConnectionError::TransportError(t) = &e {
                        if t.code == quinn::TransportErrorCode::crypto(CERTIFICATE_REQUIRED) {
                            crate::warn_limited!(%remote, reason = "no_certificate", "peer.handshake.refused");
                            mesh.metrics()
                                .counter(crate::metrics::PEER_HANDSHAKE_FAILURES, &[("reason", "no_certificate")])
                                .increment(1);
                        }
                    }
                    tracing::debug!(%remote, error = %e, "peer.accept.failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "peer.accept.timeout");
                    return;
                }
            };
            drop(done);
            let Some(id) = tls::peer_identity(&conn) else {
                transport::close(&conn, ErrorCode::PEER_MISMATCH, "no identity");
                return;
            };
            let peers = mesh.peers();
            if !peers.contains_key(&id) && mesh.is_redirector(&id) {
                return zone::redirectors::serve_redirector(mesh, conn, id).await;
            }
            if !peers.contains_key(&id) && mesh.is_http3_client(&id) {
                drop(peers);
                return zone::clients::serve_http3_client(mesh, conn, id).await;
            }
            let zone = peers.get(&id).and_then(|p| p.zone.as_ref()).map(|z| z.to_string()).unwrap_or_default();
            drop(peers);
            mesh.metrics()
                .counter(PEER_CONNECTS, &[("peer_zone", &zone), ("direction", "accept"), ("result", "ok")])
                .increment(1);
            peer::session::run_connection(mesh, conn, id, dispatch).await;
        });
    }
}
