//! Inbound flows: a peer's CONNECT to one of this gateway's exports, checked (loops, the exported
//! port, the caller's identity, policy and limits) and relayed to a healthy local endpoint.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use causeway_protocol::flow::{
    FlowError, CLIENT_ADDRESS, CLIENT_DST, ERROR, MAX_HOPS, SOURCE_IDENTITY, TRACEPARENT, VIA,
};
use causeway_protocol::trace::TraceParent;
use causeway_protocol::{Identity, ServiceName};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::access::Direction;
use crate::core::abuse::StreamEnd;
use crate::flow::relay::{self, Counters, Outcome};
use crate::flow::{root_trace, FlowLog, RelayPhase};
use crate::metrics::{FLOWS_ACTIVE, FLOW_BYTES, INBOUND_FLOWS};
use crate::ports::{FlowCaller, ServerStream};
use crate::state::{BackendLeg, ConnFlow, InboundCaller, Mesh};

impl Mesh {
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
            match tokio::time::timeout(self.timing().backend_connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    let Ok(local) = s.local_addr() else {
                        relay::abort(s);
                        err = FlowError::BackendRefused;
                        continue;
                    };
                    return Ok((s, addr, self.backend_leg(local, addr)));
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

/// Serves a flow a peer opened toward this gateway: checks the target, connects the endpoint,
/// answers the CONNECT and relays.
///
/// The request and the stream come boxed: arguments stay in a future for its whole life, and a flow
/// may run for days; boxed, they cost 16 bytes there and are freed once read or split.
///
/// `admitted` is the peer's new-flow rate limit's verdict (`abuse`); the return value says whether
/// the peer reset the stream, for the rapid-reset rule.
pub(crate) async fn serve(
    mesh: &Mesh,
    req: Box<http::Request<()>>,
    mut stream: Box<ServerStream>,
    peer: &Identity,
    _on_conn: ConnFlow,
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
    let is_leg = |c: Option<(SocketAddr, SocketAddr)>| c.is_some_and(|(a, d)| mesh.is_backend_leg(a, d));
    let looped = is_leg(client_conn) || {
        let via = header(VIA);
        let hops: Vec<&str> = via.split(',').map(str::trim).filter(|h| !h.is_empty()).collect();
        hops.len() > MAX_HOPS || hops.contains(&mesh.identity().as_str())
    };
    // This side of the flow is a span of its own, a child of the source gateway's attempt.
    let parent = TraceParent::parse(&header(TRACEPARENT));
    let trace = parent.map(|p| p.child(root_trace().span_id)).unwrap_or_else(root_trace);
    let authority = req.uri().authority().cloned();
    let is_connect = req.method() == http::Method::CONNECT;
    let service = authority.as_ref().and_then(|a| ServiceName::new(a.host()).ok());
    let name = service.as_ref().map(|s| s.to_string()).unwrap_or_default();
    let mut log = FlowLog::new(Direction::Inbound, name, trace, parent.map(|p| p.span_id));
    log.access.start = start.into_std();
    log.access.source_identity = header(SOURCE_IDENTITY);
    log.access.source_address = header(CLIENT_ADDRESS);
    log.access.source_zone = source_zone.clone();
    log.access.peer = peer.to_string();
    log.access.zone = mesh.zone().to_string();
    log.access.attempts = 1;
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
    let vouched = mesh.vouched_caller(peer, &log.access.source_identity);
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
    } else if mesh.is_over_budget() {
        Err(FlowError::OverBudget)
    } else if !admitted {
        Err(FlowError::PeerFlowRate)
    } else if looped {
        Err(FlowError::Loop)
    } else if let Err(e) = vouched {
        Err(e)
    } else if let Some(s) = exported {
        let caller = FlowCaller {
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
                hold = Some(h);
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
    let m = mesh.metrics().clone();
    let (service, tcp, addr, _leg) = match target {
        Ok(t) => t,
        Err(e) => {
            if e == FlowError::Loop {
                crate::warn_limited!(service = %log.access.service, source = %peer, "flow.loop");
            }
            log.access.refused(e);
            log.access.policy = denied_by.clone();
            m.counter(
                INBOUND_FLOWS,
                &[("service", &log.access.service), ("source_zone", &source_zone), ("outcome", e.as_str())],
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
    log.access.endpoint = addr.to_string();
    let ok = http::Response::builder().status(200).body(()).unwrap_or_default();
    if let Err(e) = Box::pin(stream.send_response(ok)).await {
        // The peer's stream went away before the flow could start: reset by the client side.
        relay::abort(tcp);
        log.relayed(Outcome::ClientReset, 0, 0);
        let labels =
            [("service", log.access.service.as_str()), ("source_zone", &source_zone), ("outcome", "client_reset")];
        mesh.metrics().counter(INBOUND_FLOWS, &labels).increment(1);
        return relay::Failed::from_h3(&e).stream_end();
    }
    let (tx, rx) = (*stream).split();
    let zone = mesh.zone().to_string();
    let _active = mesh.active(m.gauge(FLOWS_ACTIVE, &[("service", service.as_str()), ("zone", "inbound")]));
    let counters = Counters {
        up: m.counter(FLOW_BYTES, &[("service", service.as_str()), ("zone", &zone), ("direction", "inbound_up")]),
        down: m.counter(FLOW_BYTES, &[("service", service.as_str()), ("zone", &zone), ("direction", "inbound_down")]),
    };
    log.hold = hold;
    let (bs, bk) = relay::tcp(tcp);
    // Registered while open: a policy change that no longer allows the caller resets the flow.
    let revoke = tokio_util::sync::CancellationToken::new();
    let _entry = mesh.register_inbound(InboundCaller {
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
    log.relayed(outcome, up, down);
    drop(guard);
    match outcome {
        Outcome::ClientReset => StreamEnd::ResetByPeer,
        Outcome::RelayedAbort => StreamEnd::RelayedAbort,
        _ => StreamEnd::Other,
    }
}
