//! Service flows. Outbound: a local client's TCP connection goes to the best zone that offers the
//! service, as an HTTP/3 CONNECT to that zone's gateway (RFC 9114 §4.4), trying the next candidate
//! when one refuses or fails before the flow is established. Inbound: a peer's CONNECT is served by
//! connecting to a healthy local endpoint of an exported service.
//!
//! Every flow ends in exactly one access-log event (written when its [`FlowLog`] drops) and one
//! outcome in the metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use causeway_protocol::flow::{
    FlowError, CLIENT_ADDRESS, CLIENT_DST, ERROR, MAX_HOPS, SOURCE_IDENTITY, SOURCE_ZONE, TRACEPARENT, VIA,
};
use causeway_protocol::trace::TraceParent;
use causeway_protocol::{Identity, ServiceName, ZoneName};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::abuse::StreamEnd;
use crate::mesh::{BackendLeg, Mesh};
use crate::metrics::{
    FAILOVERS, FLOWS_ACTIVE, FLOWS_CLOSED, FLOWS_FAILED, FLOWS_OPENED, FLOW_BYTES, FLOW_CONNECT, FLOW_DURATION,
    FLOW_EARLY_BYTES, INBOUND_FLOWS, PEER_ASSERTIONS_REFUSED,
};
use crate::relay::{self, Counters, Outcome};
use crate::routes::{PeerState, Target};

/// Who opened a flow.
#[derive(Debug, Clone)]
pub struct Source {
    pub identity: Identity,
    pub addr: SocketAddr,
    /// The address the client connected to (a listener's local address, or a captured
    /// connection's original destination). With `addr`, it names the client's connection for
    /// loop detection.
    pub dst: SocketAddr,
}

/// Candidates tried per flow before giving up: enough to pass one dead and one refusing zone.
const MAX_ATTEMPTS: usize = 3;

/// The access-log event of one flow, written exactly once, when it drops.
struct FlowLog {
    direction: &'static str,
    service: String,
    source_identity: String,
    source: String,
    zone: String,
    peer: String,
    trace: TraceParent,
    start: Instant,
    outcome: &'static str,
    error: &'static str,
    up: u64,
    down: u64,
    attempts: u32,
    /// The flow's places in rate limits' open-flow counts, given back when the flow ends.
    hold: Option<Box<dyn Send + Sync>>,
}

impl Drop for FlowLog {
    fn drop(&mut self) {
        tracing::info!(
            target: "causeway::access",
            direction = self.direction,
            service = %self.service,
            source_identity = %self.source_identity,
            source = %self.source,
            zone = %self.zone,
            peer = %self.peer,
            traceparent = %self.trace,
            outcome = self.outcome,
            error = self.error,
            bytes_up = self.up,
            bytes_down = self.down,
            attempts = self.attempts,
            duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            "flow"
        );
    }
}

fn new_trace() -> TraceParent {
    let mut rng = rand::rng();
    TraceParent::root(rng.random(), rng.random())
}

/// Decrements the active-flow count when the flow ends, however it ends.
struct Active<'a>(&'a Mesh, metrics::Gauge);

impl<'a> Active<'a> {
    fn new(mesh: &'a Mesh, gauge: metrics::Gauge) -> Self {
        mesh.0.active_flows.fetch_add(1, Ordering::Relaxed);
        gauge.increment(1.0);
        Self(mesh, gauge)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0 .0.active_flows.fetch_sub(1, Ordering::Relaxed);
        self.1.decrement(1.0);
    }
}

/// Why one attempt did not establish a flow.
enum AttemptError {
    Refused(FlowError),
    Unreachable(&'static str),
}

/// The client side of a flow entering the mesh at this gateway.
pub enum Downstream {
    /// A TCP client of a local listener.
    Tcp(TcpStream),
    /// A CONNECT from a redirector, not yet answered: the answer is 200 once the flow is established,
    /// or an error status.
    Stream(Box<ServerStream>),
    /// The gateway's own client at the other end of a pipe (an HTTP Upgrade's tunnel). A refused
    /// flow closes the pipe.
    Pipe(tokio::io::DuplexStream),
}

pub type ServerStream = h3::server::RequestStream<crate::h3q::BidiStream, Bytes>;

/// Where a new flow was established.
// It lives only between connecting and relaying, on the flow's own task; boxing the large variant
// would cost an allocation per flow for nothing.
#[allow(clippy::large_enum_variant)]
enum Upstream {
    /// The endpoint's connection and address, and its registration as a backend leg (taken out to
    /// live as long as the flow).
    Local(TcpStream, SocketAddr, Option<BackendLeg>),
    Remote(relay::ClientSend, relay::ClientRecv, ZoneName, Identity, Option<crate::mesh::ConnFlow>),
}

impl Downstream {
    /// Refuses the flow: a TCP client gets a reset, a redirector an error status (it resets its client).
    async fn refuse(self, e: FlowError) {
        match self {
            Downstream::Tcp(tcp) => relay::abort(tcp),
            Downstream::Pipe(p) => drop(p),
            Downstream::Stream(mut s) => {
                let resp =
                    http::Response::builder().status(e.status()).header(ERROR, e.as_str()).body(()).unwrap_or_default();
                if s.send_response(resp).await.is_ok() {
                    let _ = s.finish().await;
                }
            }
        }
    }
}

impl Mesh {
    /// Serves one TCP client of this gateway that wants `service`, until the flow ends.
    pub async fn serve_client(&self, tcp: TcpStream, service: ServiceName, source: Source) {
        let _ = tcp.set_nodelay(true);
        self.serve(Downstream::Tcp(tcp), service, source, None).await
    }

    /// Routes a flow to the best zone offering `service` and relays it until it ends. Tries the next
    /// candidate when one refuses or fails before the flow is established.
    pub async fn serve(&self, down: Downstream, service: ServiceName, source: Source, trace: Option<TraceParent>) {
        let start = Instant::now();
        let mut log = FlowLog {
            direction: "outbound",
            service: service.to_string(),
            source_identity: source.identity.to_string(),
            source: source.addr.to_string(),
            zone: String::new(),
            peer: String::new(),
            trace: trace.map(|t| t.child(new_trace().span_id)).unwrap_or_else(new_trace),
            start,
            outcome: "failed",
            error: "",
            up: 0,
            down: 0,
            attempts: 0,
            hold: None,
        };
        let Some(_guard) = self.flow_guard() else {
            log.error = "draining";
            self.flow_failed(&service, "draining");
            return Box::pin(down.refuse(FlowError::Draining)).await;
        };
        // Above the memory budget: refused at once, existing flows keep going.
        if self.0.budget.over() {
            log.error = "over_budget";
            self.flow_failed(&service, "over_budget");
            return Box::pin(down.refuse(FlowError::OverBudget)).await;
        }
        // One of our own backend connections came back as a client: an endpoint leads back into
        // the mesh (say, an export pointing at an import listener). Refused on the first repeat.
        if self.0.backend_legs.contains(source.addr, source.dst) {
            crate::warn_limited!(service = %service, client = %source.addr, "flow.loop");
            log.error = "loop_detected";
            self.flow_failed(&service, "loop_detected");
            return Box::pin(down.refuse(FlowError::Loop)).await;
        }
        // Establishment runs in a boxed future of its own, freed once the flow is up: its state
        // (header encoding, h3 request set-up, connects, retries) would otherwise size the flow's
        // future for the flow's whole life (B6: memory per idle flow).
        let Some((down, upstream, early)) = Box::pin(self.establish(down, &service, &source, &mut log)).await else {
            return;
        };
        let zone = match &upstream {
            Upstream::Local(_, addr, _) => {
                log.peer = addr.to_string();
                self.0.zone.clone()
            }
            Upstream::Remote(_, _, zone, id, _) => {
                log.peer = id.to_string();
                zone.clone()
            }
        };
        log.zone = zone.to_string();
        // Keeps a replaced peer connection open, or the backend leg registered, until this flow ends.
        let mut upstream = upstream;
        let (_on_conn, _leg) = match &mut upstream {
            Upstream::Remote(.., held) => (held.take(), None),
            Upstream::Local(.., leg) => (None, leg.take()),
        };
        let labels = [("service", service.as_str()), ("zone", zone.as_str())];
        let m = &self.0.metrics;
        m.counter(FLOWS_OPENED, &labels).increment(1);
        m.histogram(FLOW_CONNECT, &labels).record(start.elapsed().as_secs_f64());
        let _active = Active::new(self, m.gauge(FLOWS_ACTIVE, &labels));
        let counters = Counters {
            up: m.counter(FLOW_BYTES, &[("service", service.as_str()), ("zone", zone.as_str()), ("direction", "up")]),
            down: m
                .counter(FLOW_BYTES, &[("service", service.as_str()), ("zone", zone.as_str()), ("direction", "down")]),
        };
        counters.up.increment(early.len() as u64);
        if !early.is_empty() {
            m.counter(FLOW_EARLY_BYTES, &labels).increment(early.len() as u64);
        }
        // The relay phase runs in its own boxed future that owns exactly the two sides: the flow's
        // future then stays small for the flow's whole life (B6: memory per idle flow).
        let phase: RelayPhase<'_> = match (down, upstream) {
            (Downstream::Tcp(tcp), Upstream::Local(b, ..)) => {
                let ((cs, ck), (us, uk)) = (relay::tcp(tcp), relay::tcp(b));
                Box::pin(relay::relay_owned(cs, ck, us, uk, counters))
            }
            (Downstream::Tcp(tcp), Upstream::Remote(tx, rx, ..)) => {
                let (cs, ck) = relay::tcp(tcp);
                Box::pin(relay::relay_owned(cs, ck, rx, tx, counters))
            }
            (Downstream::Pipe(p), Upstream::Local(b, ..)) => {
                let ((cs, ck), (us, uk)) = (relay::pipe(p), relay::tcp(b));
                Box::pin(relay::relay_owned(cs, ck, us, uk, counters))
            }
            (Downstream::Pipe(p), Upstream::Remote(tx, rx, ..)) => {
                let (cs, ck) = relay::pipe(p);
                Box::pin(relay::relay_owned(cs, ck, rx, tx, counters))
            }
            (Downstream::Stream(s), up) => Box::pin(relay_redirected(*s, up, counters)),
        };
        let (outcome, up, down_bytes) = phase.await;
        m.counter(
            FLOWS_CLOSED,
            &[("service", service.as_str()), ("zone", zone.as_str()), ("outcome", outcome.as_str())],
        )
        .increment(1);
        m.histogram(FLOW_DURATION, &labels).record(start.elapsed().as_secs_f64());
        log.outcome = outcome.as_str();
        log.up = up + early.len() as u64;
        log.down = down_bytes;
    }

    /// Picks the zones to try and establishes the flow with the first that accepts it; refuses the
    /// client (and returns `None`) when none does.
    async fn establish(
        &self,
        down: Downstream,
        service: &ServiceName,
        source: &Source,
        log: &mut FlowLog,
    ) -> Option<(Downstream, Upstream, Bytes)> {
        let candidates = self.routes().candidates(service);
        if candidates.is_empty() {
            let (reason, e) = if self.routes().knows(service) {
                ("no_healthy_zone", FlowError::NoHealthyEndpoint)
            } else {
                ("unknown_service", FlowError::UnknownService)
            };
            log.error = reason;
            self.flow_failed(service, reason);
            Box::pin(down.refuse(e)).await;
            return None;
        }
        let early = match &down {
            Downstream::Tcp(tcp) => relay::read_early(tcp),
            Downstream::Stream(_) | Downstream::Pipe(_) => Bytes::new(),
        };
        let mut upstream = None;
        let mut last = FlowError::NoHealthyEndpoint;
        for target in candidates.into_iter().take(MAX_ATTEMPTS) {
            log.attempts += 1;
            let attempt = match target {
                // This gateway serves the service itself: it is the destination, and its policy
                // decides for its own zone's callers too.
                Target::Local => match Box::pin(self.admit_local(service, source)).await {
                    Err(e) => Err((e, e.as_str())),
                    Ok(hold) => {
                        log.hold = hold;
                        match Box::pin(self.connect_local_with(service, &early)).await {
                            // Checked again once connected (the client's own registration may
                            // have raced this flow's start).
                            Ok((tcp, _, _)) if self.0.backend_legs.contains(source.addr, source.dst) => {
                                relay::abort(tcp);
                                Err((FlowError::Loop, FlowError::Loop.as_str()))
                            }
                            r => r
                                .map(|(tcp, addr, leg)| Upstream::Local(tcp, addr, Some(leg)))
                                .map_err(|e| (e, e.as_str())),
                        }
                    }
                },
                Target::Peer(id) => Box::pin(self.open_remote(service, &id, source, &log.trace, &early))
                    .await
                    .map(|(tx, rx, zone, held)| Upstream::Remote(tx, rx, zone, id, Some(held)))
                    .map_err(|e| match e {
                        AttemptError::Refused(e) => (e, e.as_str()),
                        AttemptError::Unreachable(why) => (FlowError::BackendRefused, why),
                    }),
            };
            match attempt {
                Ok(u) => {
                    upstream = Some(u);
                    break;
                }
                Err((e, why)) => {
                    last = e;
                    if !e.retryable_elsewhere() {
                        break;
                    }
                    self.failover(service, why);
                }
            }
        }
        let Some(upstream) = upstream else {
            log.error = "all_zones_failed";
            self.flow_failed(service, "all_zones_failed");
            Box::pin(down.refuse(last)).await;
            return None;
        };
        Some((down, upstream, early))
    }

    /// Authorization and rate limits for this zone's own client of a service this gateway serves
    /// itself (it is the destination): the limits' hold on success.
    async fn admit_local(
        &self,
        service: &ServiceName,
        source: &Source,
    ) -> Result<Option<Box<dyn Send + Sync>>, FlowError> {
        let port = self.exports().get(service).map(|e| e.export.port).unwrap_or(0);
        let caller = crate::mesh::FlowCaller {
            service,
            identity: Some(&source.identity),
            zone: Some(&self.0.zone),
            addr: Some(source.addr.ip()),
            port,
        };
        self.admit_caller(&caller).await.map_err(|(e, _)| e)
    }

    /// The caller a flow or request from `peer` is authorized as (`asserted`: its
    /// `causeway-source-identity`), and the caller's zone: the peer's, when `peers[].zone` pins it
    /// (an announced zone is the peer's word only). A refusal is counted and logged (rate-limited).
    pub fn vouched_caller(&self, peer: &Identity, asserted: &str) -> Result<(Identity, Option<ZoneName>), FlowError> {
        let spec = self.peers().get(peer).cloned();
        let prefixes = spec.as_ref().map(|s| s.source_identities.as_slice()).unwrap_or(&[]);
        match crate::core::caller::vouched(peer, prefixes, Some(asserted)) {
            Ok(id) => Ok((id, spec.and_then(|s| s.zone))),
            Err(why) => {
                self.0
                    .metrics
                    .counter(PEER_ASSERTIONS_REFUSED, &[("peer", peer.as_str()), ("reason", why.as_str())])
                    .increment(1);
                let asserted: String = asserted.chars().take(256).collect();
                crate::warn_limited!(%peer, asserted, reason = why.as_str(), "peer.assertion.refused");
                Err(FlowError::IdentityRefused)
            }
        }
    }

    /// Authorization, then rate limits (a limit the zone's gateways share asks their store): the
    /// limits' hold on success, else the refusal and the policy or limit that made it.
    async fn admit_caller(
        &self,
        caller: &crate::mesh::FlowCaller<'_>,
    ) -> Result<Option<Box<dyn Send + Sync>>, (FlowError, String)> {
        let Some(a) = self.0.authorizer.get() else { return Ok(None) };
        a.authorize_flow(caller).map_err(|policy| (FlowError::PolicyDenied, policy))?;
        a.admit_flow(caller).await.map(Some).map_err(|limit| (FlowError::RateLimited, limit))
    }

    fn flow_failed(&self, service: &ServiceName, reason: &str) {
        self.0.metrics.counter(FLOWS_FAILED, &[("service", service.as_str()), ("reason", reason)]).increment(1);
    }

    /// A token that keeps a drain waiting while the flow runs; `None` once draining started.
    fn flow_guard(&self) -> Option<tokio_util::task::task_tracker::TaskTrackerToken> {
        if self.is_draining() {
            return None;
        }
        Some(self.0.flows.token())
    }

    fn failover(&self, service: &ServiceName, reason: &str) {
        self.0.metrics.counter(FAILOVERS, &[("service", service.as_str()), ("reason", reason)]).increment(1);
    }

    async fn open_remote(
        &self,
        service: &ServiceName,
        peer: &Identity,
        source: &Source,
        trace: &TraceParent,
        early: &Bytes,
    ) -> Result<(relay::ClientSend, relay::ClientRecv, ZoneName, crate::mesh::ConnFlow), AttemptError> {
        let (mut requests, zone, port, held) = {
            let routes = self.routes();
            let entry = routes.peer(peer).ok_or(AttemptError::Unreachable("peer_down"))?;
            let zone = entry.zone.clone().ok_or(AttemptError::Unreachable("peer_down"))?;
            let port = entry.services.get(service).map(|a| a.port).unwrap_or(0);
            drop(routes);
            let conns = self.conns();
            let c = conns.get(peer).ok_or(AttemptError::Unreachable("peer_down"))?;
            let req = c.requests.clone().ok_or(AttemptError::Unreachable("peer_down"))?;
            (req, zone, port, crate::mesh::ConnFlow::new(&c.flows))
        };
        let req = http::Request::connect(format!("{service}:{port}"))
            .header(SOURCE_IDENTITY, source.identity.as_str())
            .header(SOURCE_ZONE, self.0.zone.as_str())
            .header(TRACEPARENT, trace.to_string())
            .header(CLIENT_ADDRESS, source.addr.to_string())
            .header(CLIENT_DST, source.dst.to_string())
            .header(VIA, self.0.identity.as_str())
            .body(())
            .map_err(|_| AttemptError::Refused(FlowError::BadRequest))?;
        let attempt = async {
            let mut stream = requests.send_request(req).await.map_err(|_| AttemptError::Unreachable("stream_error"))?;
            if !early.is_empty() {
                crate::h3q::send_data_zero_copy(early, stream.send_data(early.clone()))
                    .await
                    .map_err(|_| AttemptError::Unreachable("stream_error"))?;
            }
            let resp = stream.recv_response().await.map_err(|_| AttemptError::Unreachable("stream_error"))?;
            if resp.status() != http::StatusCode::OK {
                let reason = resp
                    .headers()
                    .get(ERROR)
                    .and_then(|v| v.to_str().ok())
                    .and_then(FlowError::parse)
                    .unwrap_or(FlowError::BackendRefused);
                return Err(AttemptError::Refused(reason));
            }
            Ok(stream.split())
        };
        // A peer that goes silent meanwhile (or drains) will not answer in time: move on at once
        // rather than at the connect timeout.
        let mut changed = self.0.services_changed.subscribe();
        let gone = async {
            loop {
                if changed.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if self.routes().peer(peer).is_none_or(|e| e.state != PeerState::Up) {
                    return;
                }
            }
        };
        tokio::select! {
            r = tokio::time::timeout(self.0.timing.flow_connect_timeout, attempt) => match r {
                Ok(Ok((tx, rx))) => Ok((tx, rx, zone, held)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(AttemptError::Unreachable("connect_timeout")),
            },
            _ = gone => Err(AttemptError::Unreachable("peer_silent")),
        }
    }

    /// [`Self::connect_local`], then hands the endpoint what the client already sent.
    async fn connect_local_with(
        &self,
        service: &ServiceName,
        early: &Bytes,
    ) -> Result<(TcpStream, SocketAddr, BackendLeg), FlowError> {
        let (mut tcp, addr, leg) = self.connect_local(service).await?;
        if !early.is_empty() {
            use tokio::io::AsyncWriteExt;
            let t = self.0.timing.backend_connect_timeout;
            if !matches!(tokio::time::timeout(t, tcp.write_all(early)).await, Ok(Ok(()))) {
                relay::abort(tcp);
                return Err(FlowError::BackendRefused);
            }
        }
        Ok((tcp, addr, leg))
    }

    /// Connects to a healthy endpoint of an exported service, round robin, trying each once. The
    /// connection is registered as a backend leg (loop detection) while the returned guard lives.
    pub(crate) async fn connect_local(
        &self,
        service: &ServiceName,
    ) -> Result<(TcpStream, SocketAddr, BackendLeg), FlowError> {
        let exports = self.exports();
        let svc = exports.get(service).ok_or(FlowError::UnknownService)?;
        let backends = svc.backends();
        let n = backends.len();
        let first = svc.next.fetch_add(1, Ordering::Relaxed);
        let mut err = FlowError::NoHealthyEndpoint;
        for i in 0..n {
            let b = &backends[(first + i) % n];
            if !b.healthy.load(Ordering::Relaxed) {
                continue;
            }
            let addr = b.addr;
            match tokio::time::timeout(self.0.timing.backend_connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    let Ok(local) = s.local_addr() else {
                        relay::abort(s);
                        err = FlowError::BackendRefused;
                        continue;
                    };
                    return Ok((s, addr, BackendLeg::new(&self.0.backend_legs, local, addr)));
                }
                Ok(Err(e)) => {
                    tracing::debug!(service = %service, endpoint = %addr, error = %e, "endpoint.connect.failed");
                    err = FlowError::BackendRefused;
                    // Passive health: a refused endpoint is out until the next active check passes.
                    if b.healthy.swap(false, Ordering::Relaxed) {
                        self.republish();
                    }
                }
                Err(_) => err = FlowError::BackendTimeout,
            }
        }
        Err(err)
    }
}

/// Serves a peer's CONNECT for one of our exported services.
type RelayPhase<'a> = Pin<Box<dyn Future<Output = (Outcome, u64, u64)> + Send + 'a>>;

/// A redirector's flow: answer its CONNECT once the upstream is established, then relay.
async fn relay_redirected(
    mut s: h3::server::RequestStream<crate::h3q::BidiStream, Bytes>,
    up: Upstream,
    counters: Counters,
) -> (Outcome, u64, u64) {
    let ok = http::Response::builder().status(200).body(()).unwrap_or_default();
    if Box::pin(s.send_response(ok)).await.is_err() {
        if let Upstream::Local(b, ..) = up {
            relay::abort(b);
        }
        return (Outcome::ClientReset, 0, 0);
    }
    let (mut ck, mut cs) = s.split();
    match up {
        Upstream::Local(b, ..) => {
            let (mut us, mut uk) = relay::tcp(b);
            relay::relay((&mut cs, &mut ck), (&mut us, &mut uk), &counters).await
        }
        Upstream::Remote(mut tx, mut rx, ..) => relay::relay((&mut cs, &mut ck), (&mut rx, &mut tx), &counters).await,
    }
}

/// Serves a flow a peer opened toward this gateway: checks the target, connects the endpoint,
/// answers the CONNECT and relays.
///
/// The request and the stream come boxed: arguments stay in a future for its whole life, and a flow
/// may run for days; boxed, they cost 16 bytes there and are freed once read or split.
///
/// `admitted` is the peer's new-flow rate limit's verdict (`abuse`); the return value says whether
/// the peer reset the stream, for the rapid-reset rule.
pub(crate) async fn serve_inbound(
    mesh: &Mesh,
    req: Box<http::Request<()>>,
    mut stream: Box<h3::server::RequestStream<crate::h3q::BidiStream, Bytes>>,
    peer: &Identity,
    _on_conn: crate::mesh::ConnFlow,
    admitted: bool,
) -> StreamEnd {
    let start = Instant::now();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    // Labels name the zone the peer announced in its hello (one per configured peer), never a
    // header value: a peer cannot mint label values.
    let source_zone = mesh.routes().peer(peer).and_then(|e| e.zone.as_ref().map(|z| z.to_string())).unwrap_or_default();
    // A flow whose client is one of our own backend connections, or whose hop marker names us (or
    // too many gateways), would loop: refused before any connect.
    let client_conn =
        header(CLIENT_ADDRESS).parse::<SocketAddr>().ok().zip(header(CLIENT_DST).parse::<SocketAddr>().ok());
    let is_leg = |c: Option<(SocketAddr, SocketAddr)>| c.is_some_and(|(a, d)| mesh.0.backend_legs.contains(a, d));
    let looped = is_leg(client_conn) || {
        let via = header(VIA);
        let hops: Vec<&str> = via.split(',').map(str::trim).filter(|h| !h.is_empty()).collect();
        hops.len() > MAX_HOPS || hops.contains(&mesh.0.identity.as_str())
    };
    let trace = TraceParent::parse(&header(TRACEPARENT)).unwrap_or_else(new_trace);
    let authority = req.uri().authority().cloned();
    let is_connect = req.method() == http::Method::CONNECT;
    let service = authority.as_ref().and_then(|a| ServiceName::new(a.host()).ok());
    let mut log = FlowLog {
        direction: "inbound",
        service: service.as_ref().map(|s| s.to_string()).unwrap_or_default(),
        source_identity: header(SOURCE_IDENTITY),
        source: peer.to_string(),
        zone: mesh.0.zone.to_string(),
        peer: String::new(),
        trace,
        start,
        outcome: "refused",
        error: "",
        up: 0,
        down: 0,
        attempts: 1,
        hold: None,
    };
    // The request's header map lives on the heap; a flow may stay open for days.
    drop(req);
    let guard = mesh.flow_guard();
    // Only services this gateway exports, on their advertised port, are reachable: an address, the
    // gateway's own ports or an unexported name is refused before any connection is attempted.
    let exported = service.as_ref().filter(|s| {
        mesh.exports().get(*s).is_some_and(|e| authority.as_ref().and_then(|a| a.port_u16()) == Some(e.export.port))
    });
    let mut denied_by = String::new();
    // The caller, as its gateway may vouch for it (for authorization, now and on policy changes).
    let vouched = mesh.vouched_caller(peer, &log.source_identity);
    let (caller_id, caller_zone) = match &vouched {
        Ok((id, zone)) => (id.clone(), zone.clone()),
        Err(_) => (peer.clone(), None),
    };
    let port = authority.as_ref().and_then(|a| a.port_u16()).unwrap_or(0);
    // Authorization, then rate limits (whose hold on the open-flow counts lasts the flow).
    let mut hold: Option<Box<dyn Send + Sync>> = None;
    let target = if !is_connect {
        Err(FlowError::BadRequest)
    } else if guard.is_none() {
        Err(FlowError::Draining)
    } else if mesh.0.budget.over() {
        Err(FlowError::OverBudget)
    } else if !admitted {
        Err(FlowError::PeerFlowRate)
    } else if looped {
        Err(FlowError::Loop)
    } else if let Err(e) = vouched {
        Err(e)
    } else if let Some(s) = exported {
        let caller = crate::mesh::FlowCaller {
            service: s,
            identity: Some(&caller_id),
            zone: caller_zone.as_ref(),
            addr: client_conn.map(|(a, _)| a.ip()),
            port,
        };
        match Box::pin(mesh.admit_caller(&caller)).await {
            Err((e, name)) => {
                denied_by = name;
                Err(e)
            }
            Ok(h) => {
                hold = h;
                match Box::pin(mesh.connect_local(s)).await {
                    // Checked again once connected: the backend connection this flow came from
                    // may have been registered only now (its task and this one race).
                    Ok((tcp, _, _)) if is_leg(client_conn) => {
                        relay::abort(tcp);
                        Err(FlowError::Loop)
                    }
                    r => r.map(|(tcp, addr, leg)| (s.clone(), tcp, addr, leg)),
                }
            }
        }
    } else {
        Err(FlowError::Forbidden)
    };
    let m = mesh.0.metrics.clone();
    let (service, tcp, addr, _leg) = match target {
        Ok(t) => t,
        Err(e) => {
            if e == FlowError::Loop {
                crate::warn_limited!(service = %log.service, source = %peer, "flow.loop");
            }
            log.error = e.as_str();
            m.counter(
                INBOUND_FLOWS,
                &[("service", &log.service), ("source_zone", &source_zone), ("outcome", e.as_str())],
            )
            .increment(1);
            let mut resp = http::Response::builder().status(e.status()).header(ERROR, e.as_str());
            if !denied_by.is_empty() {
                resp = resp.header(causeway_protocol::flow::POLICY, denied_by.as_str());
            }
            let resp = resp.body(()).unwrap_or_default();
            if Box::pin(stream.send_response(resp)).await.is_ok() {
                let _ = Box::pin(stream.finish()).await;
            }
            return StreamEnd::Other;
        }
    };
    log.peer = addr.to_string();
    let ok = http::Response::builder().status(200).body(()).unwrap_or_default();
    if let Err(e) = Box::pin(stream.send_response(ok)).await {
        relay::abort(tcp);
        return relay::Failed::from_h3(&e).stream_end();
    }
    let (tx, rx) = (*stream).split();
    let zone = mesh.0.zone.to_string();
    let _active = Active::new(mesh, m.gauge(FLOWS_ACTIVE, &[("service", service.as_str()), ("zone", "inbound")]));
    let counters = Counters {
        up: m.counter(FLOW_BYTES, &[("service", service.as_str()), ("zone", &zone), ("direction", "inbound_up")]),
        down: m.counter(FLOW_BYTES, &[("service", service.as_str()), ("zone", &zone), ("direction", "inbound_down")]),
    };
    log.hold = hold;
    let (bs, bk) = relay::tcp(tcp);
    // Registered while open: a policy change that no longer allows the caller resets the flow.
    let revoke = tokio_util::sync::CancellationToken::new();
    let _entry = mesh.register_inbound(crate::mesh::InboundCaller {
        service: service.clone(),
        identity: caller_id,
        zone: caller_zone,
        addr: client_conn.map(|(a, _)| a.ip()),
        port,
        revoke: revoke.clone(),
    });
    let rx = relay::Revocable::new(rx, revoke.clone());
    let bs = relay::Revocable::new(bs, revoke);
    let phase: RelayPhase<'_> = Box::pin(relay::relay_owned(rx, tx, bs, bk, counters));
    let (outcome, up, down) = phase.await;
    m.counter(
        INBOUND_FLOWS,
        &[("service", service.as_str()), ("source_zone", &source_zone), ("outcome", outcome.as_str())],
    )
    .increment(1);
    log.outcome = outcome.as_str();
    log.up = up;
    log.down = down;
    drop(guard);
    match outcome {
        Outcome::ClientReset => StreamEnd::ResetByPeer,
        Outcome::RelayedAbort => StreamEnd::RelayedAbort,
        _ => StreamEnd::Other,
    }
}
