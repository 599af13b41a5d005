//! The control stream of a peer session: hello, catalog snapshot and diffs, pings and liveness
//! (`core::liveness`), load, goodbye, and the error that ends it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use causeway_protocol::control::{self, features, Decoder, Event, Goodbye, Hello, Load, Message, Ping};
use causeway_protocol::limits::CONTROL_FRAME_DEADLINE_SECS;
use causeway_protocol::{ErrorCode, Identity};

use crate::core::catalog::LocalCatalog;
use crate::core::liveness::{self, Liveness};
use crate::core::path_stats::PathWindow;
use crate::core::route_table::PathSummary;
use crate::flow::relay::{ByteSink, ByteSource};
use crate::metrics::{
    PEER_CONGESTION_EVENTS, PEER_CWND, PEER_LOSS_RATIO, PEER_LOST_PACKETS, PEER_MIGRATIONS, PEER_PATH_MIN_RTT,
    PEER_RECEIVED_BYTES, PEER_RTT, PEER_SENT_BYTES, PEER_SENT_PACKETS, PEER_SILENCE_PROBES, PEER_UP,
    PEER_WINDOW_STRETCHED,
};
use crate::state::Mesh;

/// Why a session ended.
#[derive(Debug)]
pub(crate) struct SessionEnd {
    pub code: ErrorCode,
    pub reason: String,
    /// Whether to tell the peer with an `Error` message before closing.
    pub tell: bool,
}

impl SessionEnd {
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into(), tell: true }
    }
    pub fn quiet(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into(), tell: false }
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

pub(crate) async fn control_loop<S: ByteSink, R: ByteSource>(
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
    let t = mesh.timing();
    let spec = mesh.peers().get(peer).cloned();
    let mut catalog = mesh.local_catalog();
    let mut sent: Arc<LocalCatalog> = catalog.borrow_and_update().clone();
    let mut out = BytesMut::new();
    out.put_slice(&control::preface(control::VERSION));
    let hello = Hello {
        zone: mesh.zone().clone(),
        gateway: mesh.gateway().clone(),
        features: features::REVERSE_REQUESTS | features::DOCUMENTS,
    };
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
    let mut path = PathTelemetry::new(conn);
    // The label of this peer's path metrics: its configured zone until its hello, then the zone it
    // announced (the same when pinned), as for `peer_up`.
    let mut peer_zone = spec.as_ref().and_then(|s| s.zone.as_ref()).map(|z| z.to_string()).unwrap_or_default();
    // Mesh-wide documents (`SPEC.md` §4.8), once the peer's hello says it takes part.
    let mut docs = DocumentSync::new(mesh);
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
                            mesh.metrics().gauge(PEER_UP, &[("peer", peer.as_str()), ("peer_zone", h.zone.as_str())]).set(1.0);
                            tracing::info!(zone = %h.zone, gateway = %h.gateway, "peer.up");
                            if h.features & features::DOCUMENTS != 0 {
                                docs.on = true;
                                if let Err(e) = docs.send_news(mesh, &mut out) {
                                    return e;
                                }
                            }
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
                        Message::Pong(_) => path.on_pong(mesh, conn, peer, &peer_zone),
                        Message::Load(_) => {}
                        Message::Goodbye(g) => {
                            tracing::info!(drain_ms = g.drain_ms, reason = %g.reason, "peer.draining");
                            mesh.routes_mut().peer_draining(peer);
                        }
                        Message::Error(e) => {
                            return SessionEnd::quiet(e.code, format!("peer refused: {}", e.reason));
                        }
                        Message::Document(d) => {
                            if let Err(e) = docs.received(mesh, peer, d, &mut out) {
                                return e;
                            }
                        }
                        Message::DocumentStatus(s) => docs.received_status(mesh, s),
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
                let routable = hello_seen && mesh.peer_table().is_current(peer, conn);
                match live.tick(std::time::Instant::now(), crate::transport::liveness_counters(conn), routable) {
                    None => {}
                    Some(liveness::Event::Silent { for_ }) => crate::peer::session::mark_silent(mesh, peer, true, for_),
                    Some(liveness::Event::Heard { for_ }) => crate::peer::session::mark_silent(mesh, peer, false, for_),
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
            _ = docs.changed(), if docs.on => {
                let r = docs.send_news(mesh, &mut out);
                if let Err(e) = r.and(send(tx, &mut out).await) {
                    return e;
                }
            }
            _ = mesh.draining(), if !said_goodbye => {
                said_goodbye = true;
                let g = Goodbye { drain_ms: t.drain_timeout.as_millis().min(u32::MAX as u128) as u32, reason: "draining".into() };
                let r = encode_into(&mut out, &Message::Goodbye(g));
                if let Err(e) = r.and(send(tx, &mut out).await) {
                    return e;
                }
            }
            _ = mesh.stopped() => return SessionEnd::quiet(ErrorCode::SHUTDOWN, "gateway stopped"),
        }
    }
}

/// What one control stream has flooded of mesh-wide documents: the held document and every
/// gateway's latest report go to the peer once each, and never back to where they came from.
struct DocumentSync {
    on: bool,
    held: tokio::sync::watch::Receiver<crate::core::documents::Held>,
    statuses: tokio::sync::watch::Receiver<u64>,
    /// The document the peer has (sent to it, or received from it).
    doc_known: Option<(u64, [u8; 32])>,
    /// The latest report of each gateway the peer has.
    status_known: std::collections::HashMap<Identity, u64>,
}

impl DocumentSync {
    fn new(mesh: &Mesh) -> Self {
        let mut held = mesh.watch_documents();
        let mut statuses = mesh.watch_statuses();
        held.mark_changed();
        statuses.mark_changed();
        Self { on: false, held, statuses, doc_known: None, status_known: Default::default() }
    }

    /// Either watch changed (a newer document held, or a report kept).
    async fn changed(&mut self) {
        tokio::select! {
            r = self.held.changed() => { if r.is_err() { std::future::pending::<()>().await } }
            r = self.statuses.changed() => { if r.is_err() { std::future::pending::<()>().await } }
        }
    }

    /// Encodes what the peer has not got yet.
    fn send_news(&mut self, mesh: &Mesh, out: &mut BytesMut) -> Result<(), SessionEnd> {
        let held = self.held.borrow_and_update().clone();
        if let Some(v) = held.filter(|v| Some(v.key()) != self.doc_known) {
            encode_into(out, &Message::Document(v.signed.clone()))?;
            self.doc_known = Some(v.key());
        }
        self.statuses.borrow_and_update();
        for s in mesh.document_statuses() {
            if self.status_known.get(&s.identity).is_some_and(|seq| *seq >= s.seq) {
                continue;
            }
            self.status_known.insert(s.identity.clone(), s.seq);
            encode_into(out, &Message::DocumentStatus(s))?;
        }
        Ok(())
    }

    /// A document from the peer: offered; if ours wins over it, ours goes back.
    fn received(
        &mut self,
        mesh: &Mesh,
        peer: &Identity,
        d: causeway_protocol::document::SignedDocument,
        out: &mut BytesMut,
    ) -> Result<(), SessionEnd> {
        use crate::state::documents::{Accepted, Origin};
        match mesh.offer_document(d, Origin::Peer(peer.clone())) {
            Ok(Accepted::Newer(v) | Accepted::Duplicate(v)) => self.doc_known = Some(v.key()),
            Err(e) if matches!(e.reason, "older" | "superseded") => {
                self.doc_known = None;
                if self.on {
                    return self.send_news(mesh, out);
                }
            }
            Err(_) => {}
        }
        Ok(())
    }

    fn received_status(&mut self, mesh: &Mesh, s: causeway_protocol::document::DocumentStatus) {
        let known = self.status_known.entry(s.identity.clone()).or_insert(0);
        *known = (*known).max(s.seq);
        mesh.offer_status(s);
    }
}

/// A peer connection's path as the transport sees it, published at every pong: RTT, window and
/// path model (`core::path_model`), loss, congestion events, bytes and migrations
/// (`core::path_stats`), as metrics and in the route table (for `/peers`).
struct PathTelemetry {
    window: PathWindow,
    silence_probes: u64,
    remote: std::net::SocketAddr,
    migrations: u64,
}

impl PathTelemetry {
    fn new(conn: &quinn::Connection) -> Self {
        let window = PathWindow::new(std::time::Instant::now(), crate::transport::path_totals(&conn.stats()));
        Self { window, silence_probes: 0, remote: conn.remote_address(), migrations: 0 }
    }

    fn on_pong(&mut self, mesh: &Mesh, conn: &quinn::Connection, peer: &Identity, peer_zone: &str) {
        // A replaced connection still finishing its flows speaks for nobody.
        if !mesh.peer_table().is_current(peer, conn) {
            return;
        }
        let m = mesh.metrics();
        let labels = [("peer", peer.as_str()), ("peer_zone", peer_zone)];
        let rtt = conn.rtt();
        mesh.routes_mut().set_rtt(peer, rtt);
        m.gauge(PEER_RTT, &labels).set(rtt.as_secs_f64());
        let stats = conn.stats();
        m.gauge(PEER_CWND, &labels).set(stats.path.cwnd as f64);
        let model = crate::transport::congestion::path_state(conn);
        if let Some(path) = &model {
            if let Some(min) = path.min_rtt {
                m.gauge(PEER_PATH_MIN_RTT, &labels).set(min.as_secs_f64());
            }
            m.gauge(PEER_WINDOW_STRETCHED, &labels).set(f64::from(u8::from(path.stretched)));
            let probes = path.silence_probes.saturating_sub(self.silence_probes);
            if probes > 0 {
                self.silence_probes = path.silence_probes;
                m.counter(PEER_SILENCE_PROBES, &labels).increment(probes);
            }
        }
        let totals = crate::transport::path_totals(&stats);
        let sample = self.window.sample(std::time::Instant::now(), totals);
        let d = sample.delta;
        for (name, n) in [
            (PEER_SENT_PACKETS, d.sent_packets),
            (PEER_LOST_PACKETS, d.lost_packets),
            (PEER_CONGESTION_EVENTS, d.congestion_events),
            (PEER_SENT_BYTES, d.sent_bytes),
            (PEER_RECEIVED_BYTES, d.received_bytes),
        ] {
            if n > 0 {
                m.counter(name, &labels).increment(n);
            }
        }
        if let Some(r) = sample.loss_ratio {
            m.gauge(PEER_LOSS_RATIO, &labels).set(r);
        }
        let remote = conn.remote_address();
        if remote != self.remote {
            self.remote = remote;
            self.migrations += 1;
            m.counter(PEER_MIGRATIONS, &labels).increment(1);
            tracing::info!(%remote, "peer.path.migrated");
        }
        let summary = PathSummary {
            rtt,
            min_rtt: model.and_then(|p| p.min_rtt),
            cwnd: stats.path.cwnd,
            mtu: stats.path.current_mtu,
            loss_ratio: self.window.loss_ratio(),
            totals,
            migrations: self.migrations,
        };
        mesh.routes_mut().set_path(peer, summary);
    }
}
