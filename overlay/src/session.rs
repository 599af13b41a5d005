//! Peer sessions: dialing with backoff, accepting, converging simultaneous dials to one connection,
//! and the control stream (hello, catalog exchange, pings, goodbye).
//!
//! Connection set-up, for the dialer D and the acceptor A (`SPEC.md` §Connections):
//! 1. QUIC + mutual TLS; the verifiers refuse wrong CAs, validity and SPIFFE IDs in the handshake.
//! 2. If a live connection to the same peer exists, the tie-break below keeps exactly one.
//! 3. Both HTTP/3 sessions start (`h3q`); D opens the control stream: a plain CONNECT to
//!    [`CONTROL_AUTHORITY`]. Both sides write the preface and a hello, then a catalog snapshot.
//! 4. The control loop answers pings, applies catalog changes, and declares the peer down when it
//!    has been silent for `peer_timeout`.

use std::future::poll_fn;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use causeway_protocol::control::{self, features, Decoder, Event, Goodbye, Hello, Load, Message, Ping};
use causeway_protocol::flow::CONTROL_AUTHORITY;
use causeway_protocol::limits::CONTROL_FRAME_DEADLINE_SECS;
use causeway_protocol::{ErrorCode, Identity};
use rand::Rng;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use crate::abuse::{self, StreamEnd, StreamRules, Verdict};
use crate::core::catalog::LocalCatalog;
use crate::core::liveness::{self, Liveness};
use crate::core::tiebreak;
use crate::h3q;
use crate::mesh::{ConnFlow, Mesh, PeerConn, PeerSpec};
use crate::metrics::{
    H3_FRAMES_REFUSED, INITIALS_REFUSED, PEER_ABUSE_CLOSES, PEER_CONNECTS, PEER_CONTROL_ERRORS, PEER_CWND,
    PEER_PATH_MIN_RTT, PEER_REPLACED, PEER_RTT, PEER_SILENCES, PEER_SILENCE_PROBES, PEER_THROTTLES, PEER_UP,
    PEER_WINDOW_STRETCHED,
};
use crate::relay::{ByteSink, ByteSource};
use crate::tls;

/// Largest HTTP/3 field section we accept (RFC 9114 §4.2.2 SETTINGS_MAX_FIELD_SECTION_SIZE).
pub const MAX_FIELD_SECTION: u64 = 64 * 1024;

/// Why a session ended.
#[derive(Debug)]
pub(crate) struct SessionEnd {
    pub code: ErrorCode,
    pub reason: String,
    /// Whether to tell the peer with an `Error` message before closing.
    pub tell: bool,
}

impl SessionEnd {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into(), tell: true }
    }
    fn quiet(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into(), tell: false }
    }
}

/// Exponential backoff with jitter: each delay is uniform in [base/2, base], base doubling to `max`.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    base: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, base: min }
    }
    pub fn reset(&mut self) {
        self.base = self.min;
    }
    pub fn next(&mut self) -> Duration {
        let d = self.base.mul_f64(rand::rng().random_range(0.5..=1.0));
        self.base = (self.base * 2).min(self.max);
        d
    }
}

/// Keeps one connection to a peer we can dial, until `stop` (shutdown, or the peer removed).
pub(crate) async fn dial_loop(mesh: Mesh, spec: PeerSpec, stop: tokio_util::sync::CancellationToken) {
    let Some(addr) = spec.address.clone() else { return };
    let t = mesh.0.timing;
    let mut backoff = Backoff::new(t.backoff_min, t.backoff_max);
    let peer_zone = spec.zone.as_ref().map(|z| z.to_string()).unwrap_or_default();
    let mut refresh = mesh.0.refresh.subscribe();
    // When the connection this loop last established was registered.
    let mut connected: Option<Instant> = None;
    // Our certificate changed and the connection up was made with the old one: replace it (kept
    // until a replacement is registered, so a failed dial is retried after the backoff).
    let mut replace = false;
    loop {
        let changed = mesh.0.conn_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if stop.is_cancelled() || mesh.is_draining() {
            return;
        }
        // With a connection up, wait for it to end, or for our certificate to change (then a new
        // connection replaces it, make-before-break).
        let up = mesh.conns().contains_key(&spec.id);
        if !up {
            replace = false;
        }
        if up && !replace {
            tokio::select! {
                _ = changed => continue,
                r = refresh.changed() => {
                    if r.is_err() {
                        return;
                    }
                    replace = true;
                }
                _ = stop.cancelled() => return,
            }
        } else if let Some(since) = connected.filter(|_| !up) {
            connected = None;
            // The connection ended. One that lived long was healthy: redial at once, from the
            // shortest delay; one that did not backs off like a failed dial.
            if since.elapsed() > t.backoff_max {
                backoff.reset();
            } else if !sleep_or_stop(&stop, backoff.next()).await {
                return;
            }
            continue;
        }
        // A connection the peer dialed may complete while our own dial is still retransmitting its
        // Initial; then our dial is abandoned rather than completed as a duplicate.
        let changed = mesh.0.conn_changed.notified();
        let mut attempt = {
            let (mesh, spec, addr) = (mesh.clone(), spec.clone(), addr.clone());
            tokio::spawn(async move { dial(&mesh, &spec, &addr).await })
        };
        let dialing = async {
            tokio::pin!(changed);
            loop {
                tokio::select! {
                    r = &mut attempt => return r.unwrap_or_else(|e| Err(e.to_string())),
                    _ = &mut changed => {
                        if !replace && mesh.conns().contains_key(&spec.id) {
                            // Abandoned, not dropped: a dropped handshake closes with code 0,
                            // which the peer — whose side of it may be complete — cannot tell
                            // from a failure. It is finished and closed as the duplicate it is.
                            tokio::spawn(async move {
                                if let Ok(Ok(c)) = attempt.await {
                                    close(&c, ErrorCode::DUPLICATE_CONNECTION, "the peer connected first");
                                }
                            });
                            return Err("the peer connected first".to_string());
                        }
                        changed.set(mesh.0.conn_changed.notified());
                    }
                }
            }
        };
        match dialing.await {
            Ok(conn) => {
                mesh.0
                    .metrics
                    .counter(PEER_CONNECTS, &[("peer_zone", &peer_zone), ("direction", "dial"), ("result", "ok")])
                    .increment(1);
                if let Some(reg) = register(&mesh, &spec.id, &conn, true) {
                    connected = Some(Instant::now());
                    replace = false;
                    tokio::spawn(serve_connection(mesh.clone(), conn, true, spec.id.clone(), reg));
                    continue;
                }
            }
            Err(e) => {
                mesh.0
                    .metrics
                    .counter(PEER_CONNECTS, &[("peer_zone", &peer_zone), ("direction", "dial"), ("result", "error")])
                    .increment(1);
                tracing::debug!(peer = %spec.id, %addr, error = %e, "peer.dial.failed");
            }
        }
        if !sleep_or_stop(&stop, backoff.next()).await {
            return;
        }
    }
}

/// Sleeps, or returns false at once when stopped.
async fn sleep_or_stop(stop: &tokio_util::sync::CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.cancelled() => false,
    }
}

async fn dial(mesh: &Mesh, spec: &PeerSpec, target: &str) -> Result<quinn::Connection, String> {
    let tls = mesh.0.tls.client(spec.id.clone()).map_err(|e| e.to_string())?;
    let cfg =
        crate::transport::client_config(tls, mesh.0.timing.transport, mesh.0.limits.quic).map_err(|e| e.to_string())?;
    crate::transport::dial(&mesh.0.endpoint, cfg, target, mesh.0.timing.handshake_timeout).await
}

/// Handshakes in progress above which new ones must first prove their address with a Retry
/// (RFC 9000 §8.1.2), so a flood of spoofed Initials costs us no crypto.
const RETRY_ABOVE: usize = 64;

/// TLS alert `certificate_required` (RFC 8446 §6.2).
const CERTIFICATE_REQUIRED: u8 = 116;

pub(crate) async fn accept_loop(mesh: Mesh) {
    let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Looked up once: under a flood this loop must stay cheap (quinn ignores Initials beyond
    // `limits.pending_handshakes` waiting here, also before any crypto, but uncounted).
    let not_allowed = mesh.0.metrics.counter(INITIALS_REFUSED, &[("reason", "source_not_allowed")]);
    loop {
        let incoming = tokio::select! {
            i = mesh.0.endpoint.accept() => match i { Some(i) => i, None => return },
            _ = mesh.0.shutdown.cancelled() => return,
        };
        let remote = incoming.remote_address();
        // Refuse unknown sources before any handshake crypto.
        if !mesh.source_allowed(remote.ip()) {
            not_allowed.increment(1);
            incoming.refuse();
            continue;
        }
        if pending.load(std::sync::atomic::Ordering::Relaxed) >= RETRY_ABOVE && !incoming.remote_address_validated() {
            mesh.0.metrics.counter(INITIALS_REFUSED, &[("reason", "retry")]).increment(1);
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
                Ok(connecting) => tokio::time::timeout(mesh.0.timing.handshake_timeout, connecting).await,
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
                            mesh.0
                                .metrics
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
                conn.close(h3q::varint(ErrorCode::PEER_MISMATCH.0), b"no identity");
                return;
            };
            let peers = mesh.peers();
            if !peers.contains_key(&id) && mesh.is_redirector(&id) {
                return crate::handoff::serve_redirector(mesh, conn, id).await;
            }
            if !peers.contains_key(&id) && mesh.is_http3_client(&id) {
                drop(peers);
                return crate::http::serve_client(mesh, conn, id).await;
            }
            let zone = peers.get(&id).and_then(|p| p.zone.as_ref()).map(|z| z.to_string()).unwrap_or_default();
            drop(peers);
            mesh.0
                .metrics
                .counter(PEER_CONNECTS, &[("peer_zone", &zone), ("direction", "accept"), ("result", "ok")])
                .increment(1);
            run_connection(mesh, conn, false, id).await;
        });
    }
}

fn close(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    conn.close(h3q::varint(code.0), reason.as_bytes());
}

/// A connection that won its registration.
pub(crate) struct Registered {
    /// Flows on it, both directions.
    flows: Arc<AtomicUsize>,
    /// Our leaf as the connection was made.
    local_leaf: rustls::pki_types::CertificateDer<'static>,
    /// It replaces the current connection once it can carry flows ([`promote`]); until then the
    /// current one keeps serving.
    replacing: bool,
}

/// Registers `conn` unless it loses the tie-break against a live connection to the same peer.
///
/// Rule (`SPEC.md` §2): an existing connection whose hello exchange is done is kept and the new one
/// closed (a stale one is noticed by liveness within `peer_timeout`, after which the re-dial wins),
/// unless a certificate changed on either side since the existing one was made: then the new one
/// replaces it, make-before-break, as soon as it can carry flows ([`promote`]); the old one closes
/// once its flows have ended (rotation). Otherwise a new connection dialed from the same side as
/// the existing one replaces it, and connections dialed from opposite sides at once (a simultaneous
/// dial) resolve to the one dialed by the gateway whose SPIFFE ID sorts lower. Losers are closed
/// with DUPLICATE_CONNECTION.
fn register(mesh: &Mesh, peer: &Identity, conn: &quinn::Connection, dialed: bool) -> Option<Registered> {
    // Removed from the configuration after its handshake passed.
    if !mesh.peers().contains_key(peer) {
        close(conn, ErrorCode::PEER_REMOVED, "not a configured peer");
        return None;
    }
    // Whether the existing connection finished its hello exchange: then it may carry flows, and a
    // late duplicate (say a dial that was retransmitting its Initial until the peer came up) must
    // not replace it. Read before taking the connection lock (lock order: routes, then conns).
    let old_up = mesh.routes().peer(peer).is_some_and(|e| e.state == crate::routes::PeerState::Up);
    let ours = mesh.0.tls.leaf();
    let flows = Arc::new(AtomicUsize::new(0));
    let mut conns = mesh.conns();
    let live = conns.get(peer).filter(|old| old.conn.close_reason().is_none());
    let existing = live.map(|old| tiebreak::Existing {
        up: old_up,
        dialed: old.dialed,
        rotated: old.local_leaf != ours || tls::peer_leaf(&old.conn) != tls::peer_leaf(conn),
    });
    match tiebreak::decide(existing, dialed, mesh.0.identity < *peer) {
        tiebreak::Decision::Register => {}
        tiebreak::Decision::MakeBeforeBreak => return Some(Registered { flows, local_leaf: ours, replacing: true }),
        tiebreak::Decision::KeepExisting => {
            tracing::info!(kept = "existing", "peer.duplicate.closed");
            close(conn, ErrorCode::DUPLICATE_CONNECTION, "duplicate connection");
            return None;
        }
        tiebreak::Decision::ReplaceNow => {
            tracing::info!(kept = "new", "peer.duplicate.closed");
            if let Some(old) = live {
                close(&old.conn, ErrorCode::DUPLICATE_CONNECTION, "duplicate connection");
            }
        }
    }
    conns.insert(
        peer.clone(),
        PeerConn { conn: conn.clone(), dialed, requests: None, flows: flows.clone(), local_leaf: ours.clone() },
    );
    drop(conns);
    mesh.0.conn_changed.notify_waiters();
    Some(Registered { flows, local_leaf: ours, replacing: false })
}

/// The connection can carry flows now (its HTTP/3 sessions and control stream are up): publish
/// its request sender, and if it replaces another connection, make it the current one and retire
/// the old one.
fn promote(
    mesh: &Mesh,
    peer: &Identity,
    conn: &quinn::Connection,
    dialed: bool,
    reg: &Registered,
    requests: &h3::client::SendRequest<h3q::Opener, Bytes>,
) {
    let mut conns = mesh.conns();
    if !reg.replacing {
        if let Some(pc) = conns.get_mut(peer) {
            if pc.conn.stable_id() == conn.stable_id() {
                pc.requests = Some(requests.clone());
            }
        }
        return;
    }
    let new = PeerConn {
        conn: conn.clone(),
        dialed,
        requests: Some(requests.clone()),
        flows: reg.flows.clone(),
        local_leaf: reg.local_leaf.clone(),
    };
    let old = conns.insert(peer.clone(), new);
    drop(conns);
    if let Some(old) = old.filter(|o| o.conn.stable_id() != conn.stable_id()) {
        tracing::info!("peer.connection.replaced");
        mesh.0.metrics.counter(PEER_REPLACED, &[]).increment(1);
        retire(mesh, peer, old);
    }
    mesh.0.conn_changed.notify_waiters();
}

/// How long a replaced connection stays open at least: the peer may still open a flow on it until
/// it has registered the new connection too (both sides do so as the handshake completes).
const RETIRE_GRACE: Duration = Duration::from_secs(1);

/// Closes a replaced connection once no flow uses it (never cutting one), or at shutdown; at
/// once if the peer is removed from the configuration.
fn retire(mesh: &Mesh, peer: &Identity, old: PeerConn) {
    let shutdown = mesh.0.shutdown.clone();
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
                close(&old.conn, ErrorCode::PEER_REMOVED, "peer removed from configuration");
                return;
            }
            if old.flows.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                close(&old.conn, ErrorCode::H3_NO_ERROR, "replaced");
                return;
            }
        }
    });
}

/// Whether `conn` is the registered connection to `peer` (not a replaced one still finishing).
fn is_current(mesh: &Mesh, peer: &Identity, conn: &quinn::Connection) -> bool {
    mesh.conns().get(peer).is_some_and(|c| c.conn.stable_id() == conn.stable_id())
}

fn unregister(mesh: &Mesh, peer: &Identity, conn: &quinn::Connection) {
    let mut conns = mesh.conns();
    if conns.get(peer).is_some_and(|c| c.conn.stable_id() == conn.stable_id()) {
        conns.remove(peer);
        drop(conns);
        mesh.routes_mut().peer_down(peer);
        let zone = peer_zone_label(mesh, peer);
        mesh.0.metrics.gauge(PEER_UP, &[("peer", peer.as_str()), ("peer_zone", &zone)]).set(0.0);
    }
    mesh.0.conn_changed.notify_waiters();
}

/// Marks a peer silent (no new flows; flows waiting for its answer move on) or heard again, with
/// its gauge, counter and log line.
fn mark_silent(mesh: &Mesh, peer: &Identity, silent: bool, silent_for: Duration) {
    if silent {
        mesh.routes_mut().peer_silent(peer);
    } else {
        mesh.routes_mut().peer_heard(peer);
    }
    mesh.services_changed();
    let zone = peer_zone_label(mesh, peer);
    let labels = [("peer", peer.as_str()), ("peer_zone", zone.as_str())];
    mesh.0.metrics.gauge(PEER_UP, &labels).set(if silent { 0.0 } else { 1.0 });
    if silent {
        mesh.0.metrics.counter(PEER_SILENCES, &labels[1..]).increment(1);
        tracing::warn!(silent_ms = silent_for.as_millis() as u64, "peer.silent");
    } else {
        tracing::info!("peer.recovered");
    }
}

fn peer_zone_label(mesh: &Mesh, peer: &Identity) -> String {
    let routes = mesh.routes();
    routes
        .peer(peer)
        .and_then(|e| e.zone.as_ref())
        .map(|z| z.to_string())
        .or_else(|| mesh.peers().get(peer).and_then(|p| p.zone.as_ref()).map(|z| z.to_string()))
        .unwrap_or_default()
}

type ControlSlot = Arc<Mutex<Option<oneshot::Sender<(crate::relay::ServerSend, crate::relay::ServerRecv)>>>>;

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
async fn run_connection(mesh: Mesh, conn: quinn::Connection, dialed: bool, peer: Identity) {
    if let Some(reg) = register(&mesh, &peer, &conn, dialed) {
        serve_connection(mesh, conn, dialed, peer, reg).await;
    }
}

/// Serves one registered peer connection until it ends.
async fn serve_connection(mesh: Mesh, conn: quinn::Connection, dialed: bool, peer: Identity, reg: Registered) {
    let span = tracing::info_span!("peer", peer = %peer, remote = %conn.remote_address(), dialed);
    async move {
        let end = session(&mesh, &conn, dialed, &peer, reg).await;
        // If the connection itself was closed, that close says why, not the stream error it caused.
        let end = closed_by(&conn).unwrap_or(end);
        match end.code {
            ErrorCode::H3_NO_ERROR | ErrorCode::SHUTDOWN | ErrorCode::DUPLICATE_CONNECTION => {
                tracing::info!(code = %end.code, reason = %end.reason, "peer.disconnected")
            }
            code => {
                mesh.0.metrics.counter(PEER_CONTROL_ERRORS, &[("code", &code.to_string())]).increment(1);
                tracing::warn!(code = %code, reason = %end.reason, "peer.disconnected")
            }
        }
        if conn.close_reason().is_none() {
            close(&conn, end.code, &end.reason);
        }
        unregister(&mesh, &peer, &conn);
    }
    .instrument(span)
    .await
}

async fn session(mesh: &Mesh, conn: &quinn::Connection, dialed: bool, peer: &Identity, reg: Registered) -> SessionEnd {
    let refused = mesh.0.metrics.counter(H3_FRAMES_REFUSED, &[]);
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
    tokio::spawn(serve_requests(mesh.clone(), conn.clone(), server, peer.clone(), slot, reg.flows.clone()));

    let hs = mesh.0.timing.handshake_timeout;
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
    promote(mesh, peer, conn, dialed, &reg, &requests);
    match ctl {
        ControlIo::Client(mut tx, mut rx) => control_loop(mesh, conn, peer, &mut tx, &mut rx).await,
        ControlIo::Server(mut tx, mut rx) => control_loop(mesh, conn, peer, &mut tx, &mut rx).await,
    }
}

enum ControlIo {
    Client(crate::relay::ClientSend, crate::relay::ClientRecv),
    Server(crate::relay::ServerSend, crate::relay::ServerRecv),
}

/// Accepts the peer's requests on this side's HTTP/3 server session: the control stream (acceptor
/// only, once) and flows.
async fn serve_requests(
    mesh: Mesh,
    conn: quinn::Connection,
    mut server: h3::server::Connection<h3q::Session, Bytes>,
    peer: Identity,
    slot: ControlSlot,
    flows: Arc<AtomicUsize>,
) {
    let rules = Arc::new(StreamRules::new(mesh.0.limits.peer_flow_rate, std::time::Instant::now()));
    loop {
        let resolver = match server.accept().await {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        let opened = std::time::Instant::now();
        // Counted from its first byte: a replaced connection stays open while it is served.
        let held = ConnFlow::new(&flows);
        let (mesh, conn, peer, slot, rules) = (mesh.clone(), conn.clone(), peer.clone(), slot.clone(), rules.clone());
        let header_timeout = mesh.0.timing.header_timeout;
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
                    let how = crate::relay::Failed::from_h3(&e).stream_end();
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
            // A task of its own: this one (and the resolver it holds) ends, and the flow keeps only
            // its own state for as long as it runs.
            // An HTTP request for an `http` export: the gateway's handler serves it.
            if req.method() != http::Method::CONNECT {
                if rules.throttled(std::time::Instant::now()) {
                    // A throttled peer's requests are refused like its flows (`abuse`).
                    let mut stream = stream;
                    let e = causeway_protocol::flow::FlowError::PeerFlowRate;
                    let resp = http::Response::builder()
                        .status(e.status())
                        .header(causeway_protocol::flow::ERROR, e.as_str())
                        .body(())
                        .unwrap_or_default();
                    if stream.send_response(resp).await.is_ok() {
                        let _ = stream.finish().await;
                    }
                    tally_stream(&mesh, &conn, &peer, &rules, opened, StreamEnd::Other);
                    return;
                }
                if let Some(h) = mesh.0.http.get().and_then(std::sync::Weak::upgrade) {
                    let zone = mesh.routes().peer(&peer).and_then(|e| e.zone.clone());
                    let serving = h.serve(req, stream, crate::http::PeerInfo { identity: peer.clone(), zone });
                    tokio::spawn(async move {
                        let _held = held;
                        let how = serving.await;
                        tally_stream(&mesh, &conn, &peer, &rules, opened, how);
                    });
                    return;
                }
            }
            let admitted = rules.admit(std::time::Instant::now());
            tokio::spawn(async move {
                let inbound = crate::flow::serve_inbound(&mesh, Box::new(req), Box::new(stream), &peer, held, admitted);
                let how = Box::pin(inbound).await;
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
            mesh.0.metrics.counter(PEER_THROTTLES, &labels).increment(1);
        }
        Some(Verdict::Close { early }) => {
            tracing::warn!(%peer, early_resets = early, batch = abuse::RAPID_RESET_BATCH, strikes = abuse::STRIKES, "peer.rapid_reset");
            mesh.0.metrics.counter(PEER_ABUSE_CLOSES, &labels).increment(1);
            conn.close(
                h3q::varint(ErrorCode::H3_EXCESSIVE_LOAD.0),
                b"rapid reset: most streams reset right after opening, also while throttled",
            );
        }
    }
}

fn encode_into(out: &mut BytesMut, msg: &Message) -> Result<(), SessionEnd> {
    let frame = control::encode(msg).map_err(|e| SessionEnd::quiet(ErrorCode::LIMIT_EXCEEDED, e.to_string()))?;
    out.put_slice(&frame);
    Ok(())
}

fn encode_all(out: &mut BytesMut, msgs: &[Message]) -> Result<(), SessionEnd> {
    msgs.iter().try_for_each(|m| encode_into(out, m))
}

async fn send<S: ByteSink>(tx: &mut S, out: &mut BytesMut) -> Result<(), SessionEnd> {
    if out.is_empty() {
        return Ok(());
    }
    tx.send(out.split().freeze())
        .await
        .map_err(|_| SessionEnd::quiet(ErrorCode::PROTOCOL_VIOLATION, "control stream write failed"))
}

async fn control_loop<S: ByteSink, R: ByteSource>(
    mesh: &Mesh,
    conn: &quinn::Connection,
    peer: &Identity,
    tx: &mut S,
    rx: &mut R,
) -> SessionEnd {
    let end = control_inner(mesh, conn, peer, tx, rx).await;
    if end.tell {
        let mut out = BytesMut::new();
        let reason: String = end.reason.chars().take(causeway_protocol::limits::MAX_REASON_LEN / 4).collect();
        if encode_into(&mut out, &Message::Error(control::ErrorMsg { code: end.code, reason })).is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(200), send(tx, &mut out)).await;
        }
    }
    // The control stream ends cleanly (a FIN, bounded): dropped unfinished it would be reset, and
    // the peer would throw away the Error just sent and see a protocol violation.
    let _ = tokio::time::timeout(Duration::from_millis(200), tx.finish()).await;
    end
}

async fn control_inner<S: ByteSink, R: ByteSource>(
    mesh: &Mesh,
    conn: &quinn::Connection,
    peer: &Identity,
    tx: &mut S,
    rx: &mut R,
) -> SessionEnd {
    let t = mesh.0.timing;
    let spec = mesh.peers().get(peer).cloned();
    let mut catalog = mesh.0.catalog.subscribe();
    let mut sent: Arc<LocalCatalog> = catalog.borrow_and_update().clone();
    let mut out = BytesMut::new();
    out.put_slice(&control::preface(control::VERSION));
    let hello =
        Hello { zone: mesh.0.zone.clone(), gateway: mesh.0.gateway.clone(), features: features::REVERSE_REQUESTS };
    if let Err(e) = encode_into(&mut out, &Message::Hello(hello)).and_then(|_| encode_all(&mut out, &sent.snapshot())) {
        return e;
    }
    if let Err(e) = send(tx, &mut out).await {
        return e;
    }
    let mut dec = Decoder::new();
    let mut hello_seen = false;
    let thresholds = liveness::Thresholds {
        interval: t.ping_interval,
        silent_after: t.peer_timeout,
        close_after: t.peer_close_timeout,
        frames: true,
        frame_deadline: Some(Duration::from_secs(CONTROL_FRAME_DEADLINE_SECS)),
        hello_within: Some(t.handshake_timeout),
    };
    let mut live = Liveness::new(thresholds, std::time::Instant::now(), crate::transport::liveness_counters(conn));
    let mut ping = tokio::time::interval(t.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut load_tick = tokio::time::interval(Duration::from_secs(1));
    let mut nonce = 0u64;
    let mut said_goodbye = false;
    let mut silence_probes = 0u64;
    // The label of this peer's path metrics: its configured zone until its hello, then the zone it
    // announced (the same when pinned), as for `peer_up`.
    let mut peer_zone = spec.as_ref().and_then(|s| s.zone.as_ref()).map(|z| z.to_string()).unwrap_or_default();
    loop {
        tokio::select! {
            data = rx.recv() => {
                let data = match data {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        return match dec.finish() {
                            Ok(()) => SessionEnd::quiet(ErrorCode::H3_NO_ERROR, "control stream closed"),
                            Err(e) => SessionEnd::quiet(e.code(), e.to_string()),
                        };
                    }
                    Err(_) => return SessionEnd::new(ErrorCode::PROTOCOL_VIOLATION, "control stream reset"),
                };
                let arrived = std::time::Instant::now();
                live.on_control_data(arrived);
                if let Err(e) = dec.feed(data) {
                    return SessionEnd::new(e.code(), e.to_string());
                }
                let mut decoded = false;
                loop {
                    let ev = match dec.next_event() {
                        Ok(Some(ev)) => {
                            decoded = true;
                            ev
                        }
                        Ok(None) => break,
                        Err(e) => return SessionEnd::new(e.code(), e.to_string()),
                    };
                    let msg = match ev {
                        Event::Preface => continue,
                        Event::Message(m) => m,
                    };
                    match msg {
                        Message::Hello(h) => {
                            if hello_seen {
                                return SessionEnd::new(ErrorCode::PROTOCOL_VIOLATION, "second hello");
                            }
                            if let Some(z) = spec.as_ref().and_then(|s| s.zone.as_ref()) {
                                if *z != h.zone {
                                    return SessionEnd::new(ErrorCode::PEER_MISMATCH, format!("peer {peer} must be in zone {z}, announced {}", h.zone));
                                }
                            }
                            hello_seen = true;
                            live.on_hello();
                            mesh.routes_mut().peer_up(peer, h.zone.clone(), h.gateway.clone());
                            mesh.routes_mut().set_rtt(peer, conn.rtt());
                            mesh.services_changed();
                            peer_zone = h.zone.to_string();
                            mesh.0.metrics.gauge(PEER_UP, &[("peer", peer.as_str()), ("peer_zone", h.zone.as_str())]).set(1.0);
                            tracing::info!(zone = %h.zone, gateway = %h.gateway, "peer.up");
                        }
                        _ if !hello_seen => return SessionEnd::new(ErrorCode::PROTOCOL_VIOLATION, "message before hello"),
                        m @ (Message::Catalog(_) | Message::ServiceUpdate(_) | Message::ServiceWithdraw(_)) => {
                            let applied = mesh.routes_mut().apply(peer, &m);
                            match applied {
                                Ok(true) => mesh.services_changed(),
                                Ok(false) => {}
                                Err(e) => return SessionEnd::new(ErrorCode::LIMIT_EXCEEDED, e.to_string()),
                            }
                        }
                        Message::Ping(p) => {
                            if let Err(e) = encode_into(&mut out, &Message::Pong(p)) {
                                return e;
                            }
                        }
                        Message::Pong(_) => {
                            let rtt = conn.rtt();
                            mesh.routes_mut().set_rtt(peer, rtt);
                            mesh.0.metrics.gauge(PEER_RTT, &[("peer", peer.as_str()), ("peer_zone", &peer_zone)]).set(rtt.as_secs_f64());
                            let cwnd = conn.stats().path.cwnd;
                            mesh.0.metrics.gauge(PEER_CWND, &[("peer", peer.as_str()), ("peer_zone", &peer_zone)]).set(cwnd as f64);
                            if let Some(path) = crate::congestion::path_state(conn) {
                                let labels = [("peer", peer.as_str()), ("peer_zone", peer_zone.as_str())];
                                if let Some(min) = path.min_rtt {
                                    mesh.0.metrics.gauge(PEER_PATH_MIN_RTT, &labels).set(min.as_secs_f64());
                                }
                                mesh.0.metrics.gauge(PEER_WINDOW_STRETCHED, &labels).set(f64::from(u8::from(path.stretched)));
                                let probes = path.silence_probes.saturating_sub(silence_probes);
                                if probes > 0 {
                                    silence_probes = path.silence_probes;
                                    mesh.0.metrics.counter(PEER_SILENCE_PROBES, &labels).increment(probes);
                                }
                            }
                        }
                        Message::Load(_) => {}
                        Message::Goodbye(g) => {
                            tracing::info!(drain_ms = g.drain_ms, reason = %g.reason, "peer.draining");
                            mesh.routes_mut().peer_draining(peer);
                        }
                        Message::Error(e) => {
                            return SessionEnd::quiet(e.code, format!("peer refused: {}", e.reason));
                        }
                    }
                }
                live.on_decoded(arrived, dec.pending(), decoded);
                if let Err(e) = send(tx, &mut out).await {
                    return e;
                }
            }
            _ = ping.tick() => {
                // Liveness (`core::liveness`): silent past peer_timeout — routed around at once —
                // closed only after peer_close_timeout (a WAN blackhole may end); heard again —
                // routed to again.
                let routable = hello_seen && is_current(mesh, peer, conn);
                match live.tick(std::time::Instant::now(), crate::transport::liveness_counters(conn), routable) {
                    None => {}
                    Some(liveness::Event::Silent { for_ }) => mark_silent(mesh, peer, true, for_),
                    Some(liveness::Event::Heard { for_ }) => mark_silent(mesh, peer, false, for_),
                    Some(liveness::Event::Close { code, reason, tell }) => {
                        return SessionEnd { code, reason, tell };
                    }
                }
                nonce += 1;
                let r = encode_into(&mut out, &Message::Ping(Ping { nonce }));
                if let Err(e) = r.and(send(tx, &mut out).await) {
                    return e;
                }
            }
            _ = load_tick.tick() => {
                let load = Load { active_flows: mesh.active_flows(), draining: mesh.is_draining() };
                let r = encode_into(&mut out, &Message::Load(load));
                if let Err(e) = r.and(send(tx, &mut out).await) {
                    return e;
                }
            }
            changed = catalog.changed() => {
                if changed.is_err() {
                    return SessionEnd::quiet(ErrorCode::SHUTDOWN, "gateway stopped");
                }
                let new = catalog.borrow_and_update().clone();
                let r = encode_all(&mut out, &new.diff(&sent));
                sent = new;
                if let Err(e) = r.and(send(tx, &mut out).await) {
                    return e;
                }
            }
            _ = mesh.0.draining.cancelled(), if !said_goodbye => {
                said_goodbye = true;
                let g = Goodbye { drain_ms: t.drain_timeout.as_millis().min(u32::MAX as u128) as u32, reason: "draining".into() };
                let r = encode_into(&mut out, &Message::Goodbye(g));
                if let Err(e) = r.and(send(tx, &mut out).await) {
                    return e;
                }
            }
            _ = mesh.0.shutdown.cancelled() => return SessionEnd::quiet(ErrorCode::SHUTDOWN, "gateway stopped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| b.next()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = Duration::from_millis(100 * (1 << i.min(4))).min(Duration::from_secs(1));
            assert!(*d >= base / 2 && *d <= base, "delay {i} = {d:?}, base {base:?}");
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
