//! The destination side: a peer's request for one of this gateway's `http` exports, authorized
//! and limited, sent to an endpoint (balanced, with breakers and connection slots) and answered on
//! the HTTP/3 stream.

use super::*;

impl Http {
    /// This gateway serves the request itself: it is the destination, and its policy decides
    /// for its own zone's callers too.
    pub(super) fn authorize_local<B>(
        &self,
        rules: &Rules,
        service: &ServiceName,
        req: &Request<B>,
        source: &Source,
    ) -> impl std::future::Future<Output = Option<Response<ChanBody>>> + Send + 'static {
        let zone = self.mesh.zone().to_string();
        let port = self.mesh.export_port(service);
        let subject = Subject {
            service: Some(service),
            identity: Some(&source.identity),
            zone: Some(zone.as_str()),
            addr: Some(source.addr.ip()),
            port,
            http: Some(HttpSubject { method: req.method().as_str(), path: req.uri().path(), headers: req.headers() }),
        };
        self.admit(rules, &subject)
    }

    /// Authorization now, then the rate limits (a global one asks the shared store): the refusal
    /// to answer with, if any.
    pub(super) fn admit(
        &self,
        rules: &Rules,
        s: &Subject<'_>,
    ) -> impl std::future::Future<Output = Option<Response<ChanBody>>> + Send + 'static {
        let (pass, d) = self.policy.check(rules, s);
        let rate = pass.then(|| Enforcer::check_rate(rules, s));
        async move {
            match rate {
                None => Some(policy_denied(&d.policy)),
                Some(rate) => rate.await.err().map(|l| rate_limited(&l)),
            }
        }
    }

    /// An immediate 503 from an open breaker, naming it.
    pub(super) fn breaker_open(&self, service: &ServiceName, breaker: &'static str) -> Response<ChanBody> {
        self.mesh
            .metrics()
            .counter(HTTP_BREAKER_OPEN, &[("service", service.as_str()), ("breaker", breaker)])
            .increment(1);
        let mut r = error_response(StatusCode::SERVICE_UNAVAILABLE, FlowError::CircuitOpen);
        r.headers_mut().insert(causeway_protocol::flow::BREAKER, http::HeaderValue::from_static(breaker));
        let (tx, body) = chan();
        let _ = tx.try_send(Ok(Frame::data(Bytes::from(format!("circuit_open: {breaker}\n")))));
        *r.body_mut() = body;
        r
    }

    /// An endpoint with a free connection (`max_connections` each), the best by the balancer;
    /// when every one is at its limit the request waits, unless `max_pending` already do (503).
    pub(super) async fn connection_slot(
        &self,
        service: &ServiceName,
        healthy: &[std::net::SocketAddr],
        choice: Choice<'_>,
        max: u32,
        max_pending: u32,
    ) -> Result<(std::net::SocketAddr, Slot), Response<ChanBody>> {
        let deadline = Instant::now() + RESPONSE_TIMEOUT;
        let mut waiting = None;
        loop {
            let freed = {
                let mut m = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                let st = m.entry(service.clone()).or_default();
                let free: Vec<_> =
                    healthy.iter().filter(|a| st.used.get(*a).copied().unwrap_or(0) < max).copied().collect();
                if let Some(e) = self.balancer.pick_by(&free, choice) {
                    *st.used.entry(e).or_insert(0) += 1;
                    return Ok((e, Slot(self.slots.clone(), service.clone(), e)));
                }
                if healthy.is_empty() {
                    return Err(error_response(StatusCode::SERVICE_UNAVAILABLE, FlowError::NoHealthyEndpoint));
                }
                if waiting.is_none() {
                    if st.pending >= max_pending {
                        drop(m);
                        return Err(self.breaker_open(service, "max_pending"));
                    }
                    st.pending += 1;
                    let gauge = self.mesh.metrics().gauge(HTTP_PENDING, &[("service", service.as_str())]);
                    gauge.increment(1.0);
                    waiting = Some(Waiting(self.slots.clone(), service.clone(), gauge));
                }
                st.freed.clone()
            };
            if Instant::now() >= deadline {
                return Err(error_response(StatusCode::GATEWAY_TIMEOUT, FlowError::BackendTimeout));
            }
            // A release wakes one waiter; the short bound covers a wake-up given to a waiter
            // that had just found its slot some other way.
            let _ = tokio::time::timeout(SLOT_RECHECK, freed.notified()).await;
        }
    }

    /// Sends a request to a local endpoint of `service` over a pooled HTTP/1.1 connection (one
    /// HTTP/2 connection for `http2`/`grpc` exports).
    pub(super) async fn to_endpoint<B>(
        &self,
        rules: &Rules,
        service: &ServiceName,
        req: Request<B>,
    ) -> Response<ChanBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let opts = rules.options(service);
        // The breaker: over max_requests in progress, refused at once (before any endpoint work).
        let active = {
            let mut m = self.active.lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(service.clone()).or_insert(0);
            if opts.max_requests.is_some_and(|max| *n >= max) {
                drop(m);
                return self.breaker_open(service, "max_requests");
            }
            *n += 1;
            let gauge = self.mesh.metrics().gauge(HTTP_ACTIVE, &[("service", service.as_str())]);
            gauge.increment(1.0);
            InFlight(self.active.clone(), service.clone(), gauge)
        };
        let healthy = self.mesh.healthy_endpoints(service);
        let key = match &opts.lb {
            LbPolicy::HashHeader(h) => req.headers().get(h.as_str()).map(|v| v.as_bytes().to_vec()),
            LbPolicy::HashCookie(c) => cookie(req.headers(), c).map(String::into_bytes),
            _ => None,
        };
        let choice = match (&opts.lb, &key) {
            (LbPolicy::RoundRobin, _) => Choice::RoundRobin(service.as_str()),
            (_, Some(k)) => Choice::Hash(k),
            _ => Choice::PowerOfTwo,
        };
        let (endpoint, slot) = match opts.max_connections {
            None => match self.balancer.pick_by(&healthy, choice) {
                Some(e) => (e, None),
                None => return error_response(StatusCode::SERVICE_UNAVAILABLE, FlowError::NoHealthyEndpoint),
            },
            Some(max) => {
                match self.connection_slot(service, &healthy, choice, max, opts.max_pending.unwrap_or(u32::MAX)).await {
                    Ok((e, slot)) => (e, Some(slot)),
                    Err(resp) => return resp,
                }
            }
        };
        let sent = Instant::now();
        // Feeds the balancer: latency to the response head, and whether the endpoint failed.
        let done = |failed: bool| {
            let outcome = if failed { Answer::Failure } else { Answer::Success };
            if self.balancer.done(endpoint, sent.elapsed(), outcome) {
                tracing::warn!(service = %service, %endpoint, "endpoint.ejected");
                self.mesh.metrics().counter(HTTP_EJECTIONS, &[("service", service.as_str())]).increment(1);
            }
        };
        let (parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let bbody = piped(body, ());
        let mut out = Request::builder().method(parts.method).uri(format!("http://{endpoint}{pq}"));
        if let Some(h) = out.headers_mut() {
            *h = end_to_end(&parts.headers);
            // HTTP/2 names the service in `:authority` (the endpoint's address) and has no Host.
            if let (false, Ok(host)) = (opts.h2, service.as_str().parse()) {
                h.insert(http::header::HOST, host);
            }
        }
        if opts.h2 {
            out = out.version(http::Version::HTTP_2);
        }
        let Ok(out) = out.body(bbody) else {
            return error_response(StatusCode::BAD_REQUEST, FlowError::BadRequest);
        };
        let client = if opts.h2 { &self.client_h2 } else { &self.client };
        let resp = match tokio::time::timeout(RESPONSE_TIMEOUT, client.request(out)).await {
            Ok(Ok(r)) => {
                done(r.status().is_server_error());
                r
            }
            Ok(Err(e)) => {
                tracing::debug!(%endpoint, error = %e, "http.endpoint.failed");
                done(true);
                return error_response(StatusCode::BAD_GATEWAY, FlowError::BackendRefused);
            }
            Err(_) => {
                done(true);
                return error_response(StatusCode::GATEWAY_TIMEOUT, FlowError::BackendTimeout);
            }
        };
        let (parts, body) = resp.into_parts();
        if parts.headers.contains_key(GRPC_STATUS) {
            // Trailers-only (see `to_peer`).
            let mut r = Response::new(ChanBody::empty());
            *r.status_mut() = parts.status;
            *r.headers_mut() = end_to_end(&parts.headers);
            r.extensions_mut().insert(EndpointUsed(endpoint));
            return r;
        }
        // In progress (and holding its endpoint connection) until the endpoint's response body is
        // through.
        let mut r = Response::new(piped(body, (active, slot)));
        *r.status_mut() = parts.status;
        *r.headers_mut() = end_to_end(&parts.headers);
        r.extensions_mut().insert(EndpointUsed(endpoint));
        r
    }
}

impl Http {
    /// A peer's request for one of our `http` exports: to an endpoint, and the response back.
    pub(super) async fn serve_peer_request(&self, req: Request<()>, stream: ServerStream, from: PeerInfo) -> StreamEnd {
        let start = Instant::now();
        let authority = req.uri().authority().cloned();
        let service = authority.as_ref().and_then(|a| ServiceName::new(a.host()).ok());
        let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let source_identity = header(SOURCE_IDENTITY);
        // This side of the request is a span of its own, a child of the source gateway's attempt.
        let parent = TraceParent::parse(&header(TRACEPARENT));
        let trace = parent.map(|p| p.child(new_trace().span_id)).unwrap_or_else(new_trace);
        let port = authority.as_ref().and_then(|a| a.port_u16());
        let source_zone = from.zone.as_ref().map(|z| z.to_string()).unwrap_or_default();
        let event = |service: &str| {
            let mut a = Access::new(Kind::Http, Direction::Inbound, service, trace);
            a.start = start;
            a.parent_span = parent.map(|p| p.span_id);
            a.source_identity = source_identity.clone();
            a.source_address = header(CLIENT_ADDRESS);
            a.source_zone = source_zone.clone();
            a.peer = from.identity.to_string();
            a.zone = self.mesh.zone().to_string();
            a.method = req.method().to_string();
            a.path = req.uri().path().to_string();
            a.attempts = 1;
            a
        };
        // A refusal before the request reaches policy: answered, counted (the service label only
        // once it is one of ours: a peer cannot mint label values) and logged, rate-limited.
        let refused = |e: FlowError, service: &str| {
            let code = e.status().to_string();
            let zone = from.zone.as_ref().map(|z| z.as_str()).unwrap_or("");
            let labels = [("service", service), ("route", "inbound"), ("zone", zone), ("code", code.as_str())];
            self.mesh.metrics().counter(HTTP_REQUESTS, &labels).increment(1);
            causeway_overlay::warn_limited!(peer = %from.identity, service, error = e.as_str(), "http.inbound.refused");
            let mut a = event(service);
            a.status = e.status();
            a.refused(e);
            a.emit();
        };
        let Some(service) = service.filter(|s| self.mesh.exports_http(s, port)) else {
            refused(FlowError::Forbidden, "");
            refuse(stream, FlowError::Forbidden).await;
            return StreamEnd::Other;
        };
        if self.mesh.is_over_budget() {
            refused(FlowError::OverBudget, service.as_str());
            refuse(stream, FlowError::OverBudget).await;
            return StreamEnd::Other;
        }
        // Authorization, on what the caller's gateway vouched for (it authenticated the workload;
        // we authenticated it) — as far as it may vouch: its own trust domain, its prefixes.
        let Ok((caller, pinned_zone)) = self.mesh.vouched_caller(&from.identity, &source_identity) else {
            refused(FlowError::IdentityRefused, service.as_str());
            refuse(stream, FlowError::IdentityRefused).await;
            return StreamEnd::Other;
        };
        let addr = req
            .headers()
            .get(CLIENT_ADDRESS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip());
        let subject = Subject {
            service: Some(&service),
            identity: Some(&caller),
            zone: pinned_zone.as_ref().map(|z| z.as_str()),
            addr,
            port,
            http: Some(HttpSubject { method: req.method().as_str(), path: req.uri().path(), headers: req.headers() }),
        };
        // One set of rules decides the request: policy, limits and the endpoint options.
        let rules = self.policy.rules();
        let (pass, decision) = self.policy.check(&rules, &subject);
        // Authorized calls draw from the rate limits; a refusal is answered instead.
        let rate = pass.then(|| Enforcer::check_rate(&rules, &subject));
        let refusal = match rate {
            Some(rate) => rate.await.err().map(|l| rate_limited(&l)),
            None => Some(policy_denied(&decision.policy)),
        };
        let mut a = event(service.as_str());
        let (mut send, recv) = stream.split();
        let bytes_in = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let body = piped(H3Body::new(recv, Some(bytes_in.clone())), ());
        let resp = match refusal {
            None => self.to_endpoint(&rules, &service, req.map(|()| body)).await,
            Some(r) => r,
        };
        let status = resp.status();
        a.endpoint = resp.extensions().get::<EndpointUsed>().map(|e| e.0.to_string()).unwrap_or_default();
        let refused_as = resp.extensions().get::<Refusal>().copied();
        let (how, bytes_out) = respond_h3(&mut send, resp).await;
        let bytes_in = bytes_in.load(std::sync::atomic::Ordering::Relaxed);
        let code = status.as_u16().to_string();
        self.mesh
            .metrics()
            .counter(
                HTTP_REQUESTS,
                &[
                    ("service", service.as_str()),
                    ("route", "inbound"),
                    ("zone", source_zone.as_str()),
                    ("code", code.as_str()),
                ],
            )
            .increment(1);
        (a.status, a.policy, a.bytes_up, a.bytes_down) =
            (status.as_u16(), decision.policy.clone(), bytes_in, bytes_out);
        match (refused_as, how) {
            (Some(Refusal(e, side)), _) => {
                a.refused(e);
                a.side = Some(side);
            }
            (None, StreamEnd::ResetByPeer | StreamEnd::RelayedAbort) => {
                (a.outcome, a.side) = (causeway_overlay::access::Outcome::Abandoned, Some(Side::Client))
            }
            (None, _) => a.outcome = causeway_overlay::access::Outcome::Complete,
        }
        a.emit();
        how
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(super) fn cookie(h: &HeaderMap, name: &str) -> Option<String> {
    h.get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Writes `resp` (head, body, trailers) on the server side of an HTTP/3 request stream. Returns
/// whether the peer reset the stream on the way, and the body bytes sent.
pub(super) async fn respond_h3(
    send: &mut causeway_overlay::flow::relay::ServerSend,
    resp: Response<ChanBody>,
) -> (StreamEnd, u64) {
    use http_body_util::BodyExt;
    let (parts, mut body) = resp.into_parts();
    let mut head = Response::builder().status(parts.status);
    if let Some(h) = head.headers_mut() {
        *h = parts.headers;
    }
    if let Err(e) = send.send_response(head.body(()).unwrap_or_default()).await {
        return (Failed::from_h3(&e).stream_end(), 0);
    }
    let mut n = 0;
    while let Some(f) = body.frame().await {
        let Ok(f) = f else { break };
        let r = match f.into_data() {
            Ok(d) => {
                n += d.len() as u64;
                send.send_data(d).await
            }
            Err(f) => match f.into_trailers() {
                Ok(t) => send.send_trailers(t).await,
                Err(_) => Ok(()),
            },
        };
        if let Err(e) = r {
            return (Failed::from_h3(&e).stream_end(), n);
        }
    }
    let _ = send.finish().await;
    (StreamEnd::Other, n)
}
