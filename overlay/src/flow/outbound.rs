//! Outbound flows: a local client (a listener's TCP connection, a redirector's CONNECT, the
//! gateway's own pipe) routed to the best zone that offers the service, trying the next candidate
//! when one refuses or fails before the flow is established.

use std::net::SocketAddr;

use bytes::Bytes;
use causeway_protocol::flow::{
    FlowError, CLIENT_ADDRESS, CLIENT_DST, ERROR, SOURCE_IDENTITY, SOURCE_ZONE, TRACEPARENT, VIA,
};
use causeway_protocol::trace::TraceParent;
use causeway_protocol::{Identity, ServiceName, ZoneName};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::access::Direction;
use crate::core::route_table::{PeerState, Target};
use crate::flow::relay::{self, Counters, Outcome};
use crate::flow::{root_trace, FlowLog, RelayPhase, MAX_ATTEMPTS};
use crate::metrics::{
    FAILOVERS, FLOWS_ACTIVE, FLOWS_CLOSED, FLOWS_FAILED, FLOWS_OPENED, FLOW_BYTES, FLOW_CONNECT, FLOW_DURATION,
    FLOW_EARLY_BYTES,
};
use crate::ports::{FlowCaller, ServerStream, Source};
use crate::state::{BackendLeg, ConnFlow, Mesh};

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

/// Where a new flow was established.
// It lives only between connecting and relaying, on the flow's own task; boxing the large variant
// would cost an allocation per flow for nothing.
#[allow(clippy::large_enum_variant)]
enum Upstream {
    /// The endpoint's connection and address, and its registration as a backend leg (taken out to
    /// live as long as the flow).
    Local(TcpStream, SocketAddr, Option<BackendLeg>),
    Remote(relay::ClientSend, relay::ClientRecv, ZoneName, Identity, Option<ConnFlow>),
}

impl Downstream {
    /// Refuses the flow: a TCP client gets a reset, a redirector an error status (it resets its client).
    async fn refuse(self, e: FlowError) {
        match self {
            Downstream::Tcp(tcp) => relay::abort(tcp),
            Downstream::Pipe(p) => drop(p),
            Downstream::Stream(s) => crate::ports::refuse(*s, e).await,
        }
    }
}

impl Mesh {
    /// Serves one TCP client of this gateway that wants `service`, until the flow ends.
    pub async fn serve_tcp(&self, tcp: TcpStream, service: ServiceName, source: Source) {
        let _ = tcp.set_nodelay(true);
        self.serve(Downstream::Tcp(tcp), service, source, None).await
    }

    /// Routes a flow to the best zone offering `service` and relays it until it ends. Tries the next
    /// candidate when one refuses or fails before the flow is established.
    pub async fn serve(&self, down: Downstream, service: ServiceName, source: Source, trace: Option<TraceParent>) {
        let start = Instant::now();
        let own = trace.map(|t| t.child(root_trace().span_id)).unwrap_or_else(root_trace);
        let mut log = FlowLog::new(Direction::Outbound, service.to_string(), own, trace.map(|t| t.span_id));
        log.access.source_identity = source.identity.to_string();
        log.access.source_address = source.addr.to_string();
        log.access.source_zone = self.zone().to_string();
        let Some(_guard) = self.flow_guard() else {
            log.access.refused(FlowError::Draining);
            self.flow_failed(&service, "draining");
            return Box::pin(down.refuse(FlowError::Draining)).await;
        };
        // Above the memory budget: refused at once, existing flows keep going.
        if self.is_over_budget() {
            log.access.refused(FlowError::OverBudget);
            self.flow_failed(&service, "over_budget");
            return Box::pin(down.refuse(FlowError::OverBudget)).await;
        }
        // One of our own backend connections came back as a client: an endpoint leads back into
        // the mesh (say, an export pointing at an import listener). Refused on the first repeat.
        if self.is_backend_leg(source.addr, source.dst) {
            crate::warn_limited!(service = %service, client = %source.addr, "flow.loop");
            log.access.refused(FlowError::Loop);
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
                log.access.endpoint = addr.to_string();
                self.zone().clone()
            }
            Upstream::Remote(_, _, zone, id, _) => {
                log.access.peer = id.to_string();
                zone.clone()
            }
        };
        log.access.zone = zone.to_string();
        // Keeps a replaced peer connection open, or the backend leg registered, until this flow ends.
        let mut upstream = upstream;
        let (_on_conn, _leg) = match &mut upstream {
            Upstream::Remote(.., held) => (held.take(), None),
            Upstream::Local(.., leg) => (None, leg.take()),
        };
        let labels = [("service", service.as_str()), ("zone", zone.as_str())];
        let m = self.metrics();
        m.counter(FLOWS_OPENED, &labels).increment(1);
        m.histogram(FLOW_CONNECT, &labels).record(start.elapsed().as_secs_f64());
        let _active = self.active(m.gauge(FLOWS_ACTIVE, &labels));
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
        log.relayed(outcome, up + early.len() as u64, down_bytes);
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
            log.access.refused(e);
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
            log.access.attempts += 1;
            // Each attempt is a child span of the flow's; a peer's side of the flow is its child.
            let (span, tried) = (root_trace().span_id, Instant::now());
            let tried_at = match &target {
                Target::Local => String::from("local"),
                Target::Peer(id) => id.to_string(),
            };
            let attempt = match target {
                // This gateway serves the service itself: it is the destination, and its policy
                // decides for its own zone's callers too.
                Target::Local => match Box::pin(self.admit_local(service, source)).await {
                    Err((e, policy)) => {
                        log.access.policy = policy;
                        Err((e, e.as_str()))
                    }
                    Ok(hold) => {
                        log.hold = hold;
                        match Box::pin(self.connect_local_with(service, &early)).await {
                            // Checked again once connected (the client's own registration may
                            // have raced this flow's start).
                            Ok((tcp, _, _)) if self.is_backend_leg(source.addr, source.dst) => {
                                relay::abort(tcp);
                                Err((FlowError::Loop, FlowError::Loop.as_str()))
                            }
                            r => r
                                .map(|(tcp, addr, leg)| Upstream::Local(tcp, addr, Some(leg)))
                                .map_err(|e| (e, e.as_str())),
                        }
                    }
                },
                Target::Peer(id) => {
                    Box::pin(self.open_remote(service, &id, source, &log.access.trace.child(span), &early))
                        .await
                        .map(|(tx, rx, zone, held)| Upstream::Remote(tx, rx, zone, id, Some(held)))
                        .map_err(|e| match e {
                            AttemptError::Refused(e) => (e, e.as_str()),
                            AttemptError::Unreachable(why) => (FlowError::BackendRefused, why),
                        })
                }
            };
            let result = attempt.as_ref().map(|_| "ok").unwrap_or_else(|(_, why)| why);
            crate::access::attempt(&log.access.trace, span, &tried_at, result, tried.elapsed());
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
            log.access.refused(last);
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
    ) -> Result<Option<Box<dyn Send + Sync>>, (FlowError, String)> {
        let port = self.exports().get(service).map(|e| e.export.port).unwrap_or(0);
        let caller = FlowCaller {
            service,
            identity: Some(&source.identity),
            zone: Some(self.zone()),
            addr: Some(source.addr.ip()),
            port,
        };
        self.admit_caller(&caller).await.map(Some)
    }

    fn flow_failed(&self, service: &ServiceName, reason: &str) {
        self.metrics().counter(FLOWS_FAILED, &[("service", service.as_str()), ("reason", reason)]).increment(1);
    }

    fn failover(&self, service: &ServiceName, reason: &str) {
        self.metrics().counter(FAILOVERS, &[("service", service.as_str()), ("reason", reason)]).increment(1);
    }

    async fn open_remote(
        &self,
        service: &ServiceName,
        peer: &Identity,
        source: &Source,
        trace: &TraceParent,
        early: &Bytes,
    ) -> Result<(relay::ClientSend, relay::ClientRecv, ZoneName, ConnFlow), AttemptError> {
        let (mut requests, zone, port, held) = {
            let routes = self.routes();
            let entry = routes.peer(peer).ok_or(AttemptError::Unreachable("peer_down"))?;
            let zone = entry.zone.clone().ok_or(AttemptError::Unreachable("peer_down"))?;
            let port = entry.services.get(service).map(|a| a.port).unwrap_or(0);
            drop(routes);
            let (req, held) = self.peer_table().requests(peer).ok_or(AttemptError::Unreachable("peer_down"))?;
            (req, zone, port, held)
        };
        let req = http::Request::connect(format!("{service}:{port}"))
            .header(SOURCE_IDENTITY, source.identity.as_str())
            .header(SOURCE_ZONE, self.zone().as_str())
            .header(TRACEPARENT, trace.to_string())
            .header(CLIENT_ADDRESS, source.addr.to_string())
            .header(CLIENT_DST, source.dst.to_string())
            .header(VIA, self.identity().as_str())
            .body(())
            .map_err(|_| AttemptError::Refused(FlowError::BadRequest))?;
        let attempt = async {
            let mut stream = requests.send_request(req).await.map_err(|_| AttemptError::Unreachable("stream_error"))?;
            if !early.is_empty() {
                crate::transport::h3q::send_data_zero_copy(early, stream.send_data(early.clone()))
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
        let mut changed = self.watch_services();
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
            r = tokio::time::timeout(self.timing().flow_connect_timeout, attempt) => match r {
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
            let t = self.timing().backend_connect_timeout;
            if !matches!(tokio::time::timeout(t, tcp.write_all(early)).await, Ok(Ok(()))) {
                relay::abort(tcp);
                return Err(FlowError::BackendRefused);
            }
        }
        Ok((tcp, addr, leg))
    }
}

/// A redirector's flow: answer its CONNECT once the upstream is established, then relay.
async fn relay_redirected(mut s: ServerStream, up: Upstream, counters: Counters) -> (Outcome, u64, u64) {
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
