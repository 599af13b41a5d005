//! A peer session on one registered connection: both HTTP/3 sessions, the control stream
//! (`control`), and the peer's requests, each handed to the node's dispatch (flows and HTTP are not
//! this module's) after the abuse rules (`core::abuse`) had their say.

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use causeway_protocol::flow::CONTROL_AUTHORITY;
use causeway_protocol::{ErrorCode, Identity};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::core::abuse::{self, StreamEnd, StreamRules, Verdict};
use crate::flow::relay::{ServerRecv, ServerSend};
use crate::metrics::{
    H3_FRAMES_REFUSED, PEER_ABUSE_CLOSES, PEER_CONTROL_ERRORS, PEER_REPLACED, PEER_SILENCES, PEER_THROTTLES, PEER_UP,
};
use crate::peer::control::{control_loop, SessionEnd};
use crate::peer::{Dispatch, PeerRequest};
use crate::state::{ConnFlow, ConnFlows, Mesh, PeerConn, Registered};
use crate::transport::{self, h3q, MAX_FIELD_SECTION};

/// Registers a new connection to `peer` in the peer table (the tie-break decides).
pub(crate) fn register(mesh: &Mesh, peer: &Identity, conn: &quinn::Connection, dialed: bool) -> Option<Registered> {
    mesh.peer_table().register(peer, conn, dialed, mesh.tls().leaf(), mesh.identity() < peer)
}

/// How long a replaced connection stays open at least: the peer may still open a flow on it until
/// it has registered the new connection too (both sides do so as the handshake completes).
const RETIRE_GRACE: Duration = Duration::from_secs(1);

/// Closes a replaced connection once no flow uses it (never cutting one), or at shutdown; at
/// once if the peer is removed from the configuration.
fn retire(mesh: &Mesh, peer: &Identity, old: PeerConn) {
    let shutdown = mesh.shutdown_token().clone();
    let (mesh, peer) = (mesh.clone(), peer.clone());
    tokio::spawn(async move {
        tokio::time::sleep(RETIRE_GRACE).await;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            if old.conn.close_reason().is_some() {
                return;
            }
            if !mesh.peers().contains_key(&peer) {
                transport::close(&old.conn, ErrorCode::PEER_REMOVED, "peer removed from configuration");
                return;
            }
            if old.flows.open() == 0 {
                transport::close(&old.conn, ErrorCode::H3_NO_ERROR, "replaced");
                return;
            }
        }
    });
}

/// Marks a peer silent (no new flows; flows waiting for its answer move on) or heard again, with
/// its gauge, counter and log line.
pub(crate) fn mark_silent(mesh: &Mesh, peer: &Identity, silent: bool, silent_for: Duration) {
    if silent {
        mesh.routes_mut().peer_silent(peer);
    } else {
        mesh.routes_mut().peer_heard(peer);
    }
    mesh.services_changed();
    let zone = mesh.peer_table().zone_label(peer);
    let labels = [("peer", peer.as_str()), ("peer_zone", zone.as_str())];
    mesh.metrics().gauge(PEER_UP, &labels).set(if silent { 0.0 } else { 1.0 });
    if silent {
        mesh.metrics().counter(PEER_SILENCES, &labels[1..]).increment(1);
        tracing::warn!(silent_ms = silent_for.as_millis() as u64, "peer.silent");
    } else {
        tracing::info!("peer.recovered");
    }
}

type ControlSlot = Arc<Mutex<Option<oneshot::Sender<(ServerSend, ServerRecv)>>>>;

/// Why a closed connection closed, as the session's end.
fn closed_by(conn: &quinn::Connection) -> Option<SessionEnd> {
    Some(match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) => SessionEnd::quiet(
            ErrorCode(c.error_code.into_inner()),
            format!("closed by peer: {}", String::from_utf8_lossy(&c.reason)),
        ),
        // We closed it ourselves (duplicate, shutdown) and logged why where we did.
        quinn::ConnectionError::LocallyClosed => SessionEnd::quiet(ErrorCode::H3_NO_ERROR, "closed locally"),
        quinn::ConnectionError::TimedOut => SessionEnd::quiet(ErrorCode::PEER_UNRESPONSIVE, "idle timeout"),
        e => SessionEnd::quiet(ErrorCode::PROTOCOL_VIOLATION, e.to_string()),
    })
}

/// Runs one accepted peer connection until it ends.
pub(crate) async fn run_connection(mesh: Mesh, conn: quinn::Connection, peer: Identity, dispatch: Dispatch) {
    if let Some(reg) = register(&mesh, &peer, &conn, false) {
        serve_connection(mesh, conn, false, peer, reg, dispatch).await;
    }
}

/// Serves one registered peer connection until it ends.
pub(crate) async fn serve_connection(
    mesh: Mesh,
    conn: quinn::Connection,
    dialed: bool,
    peer: Identity,
    reg: Registered,
    dispatch: Dispatch,
) {
    let span = tracing::info_span!("peer", peer = %peer, remote = %conn.remote_address(), dialed);
    async move {
        let end = session(&mesh, &conn, dialed, &peer, reg, dispatch).await;
        // If the connection itself was closed, that close says why, not the stream error it caused.
        let end = closed_by(&conn).unwrap_or(end);
        match end.code {
            ErrorCode::H3_NO_ERROR | ErrorCode::SHUTDOWN | ErrorCode::DUPLICATE_CONNECTION => {
                tracing::info!(code = %end.code, reason = %end.reason, "peer.disconnected")
            }
            code => {
                mesh.metrics().counter(PEER_CONTROL_ERRORS, &[("code", &code.to_string())]).increment(1);
                tracing::warn!(code = %code, reason = %end.reason, "peer.disconnected")
            }
        }
        if conn.close_reason().is_none() {
            transport::close(&conn, end.code, &end.reason);
        }
        if mesh.peer_table().unregister(&peer, &conn) {
            let zone = mesh.peer_table().zone_label(&peer);
            mesh.metrics().gauge(PEER_UP, &[("peer", peer.as_str()), ("peer_zone", &zone)]).set(0.0);
        }
    }
    .instrument(span)
    .await
}

async fn session(
    mesh: &Mesh,
    conn: &quinn::Connection,
    dialed: bool,
    peer: &Identity,
    reg: Registered,
    dispatch: Dispatch,
) -> SessionEnd {
    let refused = mesh.metrics().counter(H3_FRAMES_REFUSED, &[]);
    let (client_sess, server_sess, demux) = h3q::split(conn, dialed, refused);
    tokio::spawn(demux);
    let setup = async {
        let (mut driver, requests) = h3::client::builder()
            .max_field_section_size(MAX_FIELD_SECTION)
            .build::<_, _, Bytes>(client_sess)
            .await
            .map_err(|e| SessionEnd::quiet(ErrorCode::H3_INTERNAL_ERROR, format!("HTTP/3 client: {e}")))?;
        tokio::spawn(async move {
            let _ = poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let server = h3::server::builder()
            .max_field_section_size(MAX_FIELD_SECTION)
            .build::<_, Bytes>(server_sess)
            .await
            .map_err(|e| SessionEnd::quiet(ErrorCode::H3_INTERNAL_ERROR, format!("HTTP/3 server: {e}")))?;
        Ok::<_, SessionEnd>((requests, server))
    };
    let (mut requests, server) = match setup.await {
        Ok(x) => x,
        Err(e) => return e,
    };
    // The acceptor takes the control stream from its request loop; the dialer opens it.
    let (ctl_tx, ctl_rx) = oneshot::channel();
    let slot: ControlSlot = Arc::new(Mutex::new((!dialed).then_some(ctl_tx)));
    tokio::spawn(serve_peer_requests(
        mesh.clone(),
        conn.clone(),
        server,
        peer.clone(),
        slot,
        reg.flows.clone(),
        dispatch,
    ));

    let hs = mesh.timing().handshake_timeout;
    let ctl = if dialed {
        let open = async {
            let req = http::Request::connect(CONTROL_AUTHORITY).body(()).map_err(|e| e.to_string())?;
            let mut s = requests.send_request(req).await.map_err(|e| e.to_string())?;
            let resp = s.recv_response().await.map_err(|e| e.to_string())?;
            if resp.status() != http::StatusCode::OK {
                return Err(format!("control stream refused with {}", resp.status()));
            }
            let (tx, rx) = s.split();
            Ok(ControlIo::Client(tx, rx))
        };
        match tokio::time::timeout(hs, open).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return SessionEnd::quiet(ErrorCode::PROTOCOL_VIOLATION, e),
            Err(_) => return SessionEnd::quiet(ErrorCode::PROTOCOL_VIOLATION, "control stream not opened in time"),
        }
    } else {
        match tokio::time::timeout(hs, ctl_rx).await {
            Ok(Ok((tx, rx))) => ControlIo::Server(tx, rx),
            _ => return SessionEnd::quiet(ErrorCode::PROTOCOL_VIOLATION, "no control stream from the dialer"),
        }
    };
    if let Some(old) = mesh.peer_table().promote(peer, conn, dialed, &reg, &requests) {
        tracing::info!("peer.connection.replaced");
        mesh.metrics().counter(PEER_REPLACED, &[]).increment(1);
        retire(mesh, peer, old);
    }
    match ctl {
        ControlIo::Client(mut tx, mut rx) => control_loop(mesh, conn, peer, &mut tx, &mut rx).await,
        ControlIo::Server(mut tx, mut rx) => control_loop(mesh, conn, peer, &mut tx, &mut rx).await,
    }
}

enum ControlIo {
    Client(crate::flow::relay::ClientSend, crate::flow::relay::ClientRecv),
    Server(crate::flow::relay::ServerSend, crate::flow::relay::ServerRecv),
}

/// Accepts the peer's requests on this side's HTTP/3 server session: the control stream (acceptor
/// only, once) and flows.
async fn serve_peer_requests(
    mesh: Mesh,
    conn: quinn::Connection,
    mut server: h3::server::Connection<h3q::Session, Bytes>,
    peer: Identity,
    slot: ControlSlot,
    flows: Arc<ConnFlows>,
    dispatch: Dispatch,
) {
    let rules = Arc::new(StreamRules::new(mesh.limits().peer_flow_rate, std::time::Instant::now()));
    loop {
        let resolver = match server.accept().await {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        let opened = std::time::Instant::now();
        // Counted from its first byte: a replaced connection stays open while it is served.
        let held = ConnFlow::new(&flows);
        let (mesh, conn, peer, slot, rules) = (mesh.clone(), conn.clone(), peer.clone(), slot.clone(), rules.clone());
        let header_timeout = mesh.timing().header_timeout;
        let fut = async move {
            // h3 hands out the resolver before any header byte arrived; bound the wait. The
            // HEADERS frame is awaited here rather than inside `resolve_request`, which consumes
            // the resolver: at the timeout the stream is still ours to reset with a code, so the
            // client sees H3_REQUEST_INCOMPLETE instead of a clean, empty end.
            let mut resolver = resolver;
            let frame = std::future::poll_fn(|cx| resolver.frame_stream.poll_next(cx));
            let frame = match tokio::time::timeout(header_timeout, frame).await {
                Ok(f) => f,
                Err(_) => {
                    tracing::debug!("request.header_timeout");
                    h3::quic::SendStream::reset(&mut resolver.frame_stream, ErrorCode::H3_REQUEST_INCOMPLETE.0);
                    return;
                }
            };
            // The frame is whole; what is left (QPACK decoding) cannot wait on the peer for long.
            let resolved = match resolver.accept_with_frame(frame) {
                Ok(r) => tokio::time::timeout(header_timeout, Box::pin(r.resolve())).await,
                Err(e) => Ok(Err(e)),
            };
            let (req, stream) = match resolved {
                Ok(Ok(x)) => x,
                Err(_) => {
                    tracing::debug!("request.header_timeout");
                    return;
                }
                Ok(Err(e)) => {
                    // Reset before its headers completed, or malformed: the peer's doing — unless
                    // it relayed its own client's abort.
                    tracing::debug!(error = %e, "request.malformed");
                    let how = crate::flow::relay::Failed::from_h3(&e).stream_end();
                    tally_stream(&mesh, &conn, &peer, &rules, opened, how);
                    return;
                }
            };
            let is_control = req.method() == http::Method::CONNECT
                && req.uri().authority().is_some_and(|a| a.as_str() == CONTROL_AUTHORITY);
            if is_control {
                let tx = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                let mut stream = stream;
                let Some(tx) = tx else {
                    let _ =
                        stream.send_response(http::Response::builder().status(400).body(()).unwrap_or_default()).await;
                    let _ = stream.finish().await;
                    return;
                };
                if stream
                    .send_response(http::Response::builder().status(200).body(()).unwrap_or_default())
                    .await
                    .is_ok()
                {
                    let _ = tx.send(stream.split());
                }
                return;
            }
            // Throttled (`abuse`): a flow is not admitted, nor an HTTP request; a flow also takes
            // its place in the peer's new-flow rate.
            let now = std::time::Instant::now();
            let http = req.method() != http::Method::CONNECT && mesh.http_handler().is_some();
            let admitted = if http { !rules.throttled(now) } else { rules.admit(now) };
            // A task of its own: this one (and the resolver it holds) ends, and the request keeps
            // only its own state for as long as it runs.
            tokio::spawn(async move {
                let how = dispatch(mesh.clone(), PeerRequest { req, stream, peer: peer.clone(), held, admitted }).await;
                tally_stream(&mesh, &conn, &peer, &rules, opened, how);
            });
        };
        tokio::spawn(fut);
    }
}

/// Tallies one ended stream of the peer's; throttles the peer, or closes the connection, when its
/// batch was mostly rapid resets (`abuse`).
fn tally_stream(
    mesh: &Mesh,
    conn: &quinn::Connection,
    peer: &Identity,
    rules: &StreamRules,
    opened: std::time::Instant,
    how: StreamEnd,
) {
    let labels = [("peer", peer.as_str()), ("reason", "rapid_reset")];
    match rules.ended(opened, std::time::Instant::now(), how) {
        None => {}
        Some(Verdict::Throttle { early, .. }) => {
            let secs = abuse::THROTTLE_FOR.as_secs();
            tracing::warn!(%peer, early_resets = early, batch = abuse::RAPID_RESET_BATCH, throttle_secs = secs, "peer.throttled");
            mesh.metrics().counter(PEER_THROTTLES, &labels).increment(1);
        }
        Some(Verdict::Close { early }) => {
            tracing::warn!(%peer, early_resets = early, batch = abuse::RAPID_RESET_BATCH, strikes = abuse::STRIKES, "peer.rapid_reset");
            mesh.metrics().counter(PEER_ABUSE_CLOSES, &labels).increment(1);
            let reason = "rapid reset: most streams reset right after opening, also while throttled";
            transport::close(conn, ErrorCode::H3_EXCESSIVE_LOAD, reason);
        }
    }
}
