//! The source side: a client's request picks a route, a backend and its subset, then zones in
//! order, with retries (budgeted), mirroring, faults and gRPC deadlines, and crosses the overlay.

use super::*;

impl Http {
    /// The route for a request: its name, the labels its chosen backend requires, and the rule's
    /// timeouts and retries.
    pub(super) fn pick<B>(rules: &Rules, service: &ServiceName, req: &Request<B>) -> Picked {
        for r in rules.routes.iter().filter(|r| &r.service == service) {
            for rule in &r.rules {
                if !rule.matches.is_empty()
                    && !rule.matches.iter().any(|m| m.holds(req.method(), req.uri(), req.headers()))
                {
                    continue;
                }
                let total: u32 = rule.backends.iter().map(|b| b.weight).sum();
                let mut x = if total == 0 { 0 } else { rand::rng().random_range(0..total) };
                let mut subset = Vec::new();
                for b in &rule.backends {
                    if x < b.weight {
                        subset = b.subset.clone();
                        break;
                    }
                    x -= b.weight;
                }
                return Picked {
                    route: r.name.clone(),
                    subset,
                    timeout: rule.timeout,
                    per_try: rule.per_try_timeout,
                    retries: rule.retries.clone(),
                    request_headers: rule.request_headers.clone(),
                    response_headers: rule.response_headers.clone(),
                    fault: rule.fault.clone(),
                    mirror: rule.mirror.clone(),
                };
            }
        }
        Picked { route: "default".into(), ..Default::default() }
    }

    /// Counts a request against its route's retry budget.
    pub(super) fn count_request(&self, key: &str) {
        let mut b = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let e = b.entry(key.to_string()).or_insert(RetryBudget { since: Instant::now(), requests: 0, retries: 0 });
        e.roll();
        e.requests += 1;
    }

    /// Takes one retry from the route's budget, if any is left.
    pub(super) fn take_retry(&self, key: &str) -> bool {
        let mut b = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = b.get_mut(key) else { return false };
        e.roll();
        let allowed = RETRY_FLOOR + (f64::from(e.requests) * RETRY_RATIO) as u32;
        if e.retries >= allowed {
            return false;
        }
        e.retries += 1;
        true
    }

    pub(super) async fn route<B>(
        self: &Arc<Self>,
        req: Request<B>,
        service: &ServiceName,
        source: &Source,
    ) -> Response<ChanBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let start = Instant::now();
        // One set of rules decides the whole request: its route, and the policy and limits of a
        // local destination (a reload meanwhile applies to the next request).
        let rules = self.policy.rules();
        // The request body's bytes, counted as the client sends them (once, however many tries).
        let up = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut req = req.map(|b| Counted::new(b, up.clone()));
        let Picked { route, subset, timeout, per_try, retries, request_headers, response_headers, fault, mirror } =
            Self::pick(&rules, service, &req);
        request_headers.apply(req.headers_mut());
        let roll = |share: f64| share > 0.0 && rand::rng().random_bool(share.min(1.0));
        let delay = fault.delay.filter(|(share, _)| roll(*share)).map(|(_, d)| d);
        let abort = fault.abort.filter(|(share, _)| roll(*share)).map(|(_, s)| s);
        let fault_kind = match (delay.is_some(), abort.is_some()) {
            (_, true) => "abort",
            (true, false) => "delay",
            _ => "",
        };
        for (on, kind) in [(delay.is_some(), "delay"), (abort.is_some(), "abort")] {
            if on {
                let labels = [("service", service.as_str()), ("route", route.as_str()), ("kind", kind)];
                self.mesh.metrics().counter(HTTP_FAULTS, &labels).increment(1);
            }
        }
        // A gRPC call's own deadline bounds it like a route timeout (whichever is sooner); its
        // errors from the gateway are gRPC statuses.
        let grpc = is_grpc(req.headers());
        let timeout = match (timeout, grpc.then(|| grpc_timeout(req.headers())).flatten()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let parent = req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
        let trace = parent.map(|t| t.child(rand::rng().random::<u64>() | 1)).unwrap_or_else(new_trace);
        let candidates: Vec<Candidate> = self
            .mesh
            .http_candidates(service)
            .into_iter()
            .filter(|c| subset.iter().all(|kv| c.labels.contains(kv)))
            .collect();
        let (method, version) = (req.method().clone(), req.version());
        let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into());
        let budget_key = format!("{service}/{route}");
        self.count_request(&budget_key);
        let mut mirrored = false;
        let tries = async {
            // Fault injection: the delay counts against the route's timeout, as a slow backend's
            // time would; an abort answers at once, as the backend never would.
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            if let Some(status) = abort {
                return (fault_response(status), String::new(), 0);
            }
            if candidates.is_empty() {
                return (
                    error_response(StatusCode::SERVICE_UNAVAILABLE, FlowError::NoHealthyEndpoint),
                    String::new(),
                    0,
                );
            }
            // A request is tried again, or copied to a mirror, only if its body is small enough to
            // keep (and, for a retry unless the route allows more, its method is idempotent): the
            // body is read first.
            let small = {
                let len = req.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
                let chunked = req.headers().contains_key(http::header::TRANSFER_ENCODING);
                !chunked && len.is_none_or(|l| l.parse::<u64>().is_ok_and(|n| n <= RETRY_BODY_MAX))
            };
            let retry = retries.filter(|r| small && (r.non_idempotent || is_idempotent(req.method())));
            let mirror = mirror.filter(|m| roll(m.share)).filter(|_| {
                if !small {
                    self.count_mirror(service, &route, "skipped_body");
                }
                small
            });
            if retry.is_none() && mirror.is_none() {
                let c = &candidates[0];
                let resp = self.attempt(&rules, c, service, req, source, &trace, per_try).await;
                return (resp, c.zone.to_string(), 1);
            }
            use http_body_util::BodyExt;
            let (parts, body) = req.into_parts();
            let body = match http_body_util::Limited::new(body, RETRY_BODY_MAX as usize).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return (error_response(StatusCode::BAD_REQUEST, FlowError::BadRequest), String::new(), 0),
            };
            if let Some(m) = mirror {
                mirrored = self.mirror(&rules, m, service, &route, &parts, &body, source, &trace);
            }
            let Some(retry) = retry else {
                let c = &candidates[0];
                let req = Request::from_parts(parts, http_body_util::Full::new(body));
                let resp = self.attempt(&rules, c, service, req, source, &trace, per_try).await;
                return (resp, c.zone.to_string(), 1);
            };
            let mut attempt = 0;
            loop {
                let c = &candidates[attempt % candidates.len()];
                attempt += 1;
                let req = Request::from_parts(parts.clone(), http_body_util::Full::new(body.clone()));
                let resp = self.attempt(&rules, c, service, req, source, &trace, per_try).await;
                if attempt as u32 >= retry.attempts || !should_retry(&retry, &resp) {
                    return (resp, c.zone.to_string(), attempt);
                }
                let m = self.mesh.metrics();
                if !self.take_retry(&budget_key) {
                    m.counter(
                        HTTP_RETRIES,
                        &[("service", service.as_str()), ("route", route.as_str()), ("result", "budget_exhausted")],
                    )
                    .increment(1);
                    return (resp, c.zone.to_string(), attempt);
                }
                m.counter(
                    HTTP_RETRIES,
                    &[("service", service.as_str()), ("route", route.as_str()), ("result", "retried")],
                )
                .increment(1);
                drop(resp);
                let backoff = RETRY_BACKOFF * 2u32.pow(attempt as u32 - 1);
                let jitter: f64 = rand::rng().random_range(0.5..1.5);
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
            }
        };
        let (resp, zone, attempts) = match timeout {
            Some(t) => match tokio::time::timeout(t, tries).await {
                Ok(r) => r,
                Err(_) => (error_response(StatusCode::GATEWAY_TIMEOUT, FlowError::BackendTimeout), String::new(), 0),
            },
            None => tries.await,
        };
        let mut resp = if grpc { grpc_error(resp) } else { resp };
        response_headers.apply(resp.headers_mut());
        let grpc_status = resp.headers().get(GRPC_STATUS).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let code = resp.status().as_u16().to_string();
        let m = self.mesh.metrics();
        let labels = [
            ("service", service.as_str()),
            ("route", route.as_str()),
            ("zone", zone.as_str()),
            ("code", code.as_str()),
        ];
        m.counter(HTTP_REQUESTS, &labels).increment(1);
        m.histogram(HTTP_DURATION, &[("service", service.as_str()), ("route", route.as_str())])
            .record(start.elapsed().as_secs_f64());
        let status = resp.status().as_u16();
        let length =
            resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let mut a = self.outbound_event(service, source, trace, parent, start);
        a.route = route;
        a.subset = subset.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        a.zone = zone;
        a.method = method.to_string();
        a.path = path;
        a.status = status;
        a.grpc_status = grpc_status;
        a.attempts = attempts as u32;
        a.fault = fault_kind;
        a.mirrored = mirrored;
        a.client_protocol = format!("{version:?}");
        if let Some(Refusal(e, side)) = resp.extensions().get::<Refusal>().copied() {
            a.refused(e);
            a.side = Some(side);
        } else {
            a.outcome = causeway_overlay::access::Outcome::Complete;
        }
        resp.body_mut().log_at_end(a, length, Some(up));
        resp
    }

    pub(super) fn count_mirror(&self, service: &ServiceName, route: &str, result: &'static str) {
        self.mesh
            .metrics()
            .counter(HTTP_MIRRORS, &[("service", service.as_str()), ("route", route), ("result", result)])
            .increment(1);
    }

    /// Sends a copy of a request to the mirror's subset, in the background; its answer is read
    /// and dropped. Returns whether a copy went out (a zone serves the subset).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mirror(
        self: &Arc<Self>,
        rules: &Arc<Rules>,
        m: Mirror,
        service: &ServiceName,
        route: &str,
        parts: &http::request::Parts,
        body: &Bytes,
        source: &Source,
        trace: &TraceParent,
    ) -> bool {
        let Some(c) =
            self.mesh.http_candidates(service).into_iter().find(|c| m.subset.iter().all(|kv| c.labels.contains(kv)))
        else {
            self.count_mirror(service, route, "no_zone");
            return false;
        };
        let Ok(place) = self.mirrors.clone().try_acquire_owned() else {
            self.count_mirror(service, route, "skipped_busy");
            return false;
        };
        self.count_mirror(service, route, "sent");
        let mut req = Request::from_parts(parts.clone(), http_body_util::Full::new(body.clone()));
        req.headers_mut().insert(MIRROR_HEADER, http::HeaderValue::from_static("1"));
        // Its attempt is a child span of the request's, like the request's own attempts.
        let (this, rules, service, source, trace) =
            (self.clone(), rules.clone(), service.clone(), source.clone(), *trace);
        tokio::spawn(async move {
            use http_body_util::BodyExt;
            let copy = async {
                let resp = this.attempt(&rules, &c, &service, req, &source, &trace, Some(RESPONSE_TIMEOUT)).await;
                let _ = resp.into_body().collect().await;
            };
            // One deadline for the whole copy, answer included.
            let _ = tokio::time::timeout(RESPONSE_TIMEOUT, copy).await;
            drop(place);
        });
        true
    }

    /// One attempt at a candidate, bounded by `per_try` (504 past it); a local destination
    /// decides by `rules`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn attempt<B>(
        &self,
        rules: &Rules,
        c: &Candidate,
        service: &ServiceName,
        req: Request<B>,
        source: &Source,
        trace: &TraceParent,
        per_try: Option<Duration>,
    ) -> Response<ChanBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError> + Send,
    {
        // Each attempt is a child span of the request's; the peer's side is the attempt's child.
        let (span, tried) = (rand::rng().random::<u64>() | 1, Instant::now());
        let own = trace.child(span);
        let go = async {
            match &c.target {
                Target::Local => match self.authorize_local(rules, service, &req, source).await {
                    None => self.to_endpoint(rules, service, req).await,
                    Some(refusal) => refusal,
                },
                Target::Peer(id) => self.to_peer(id, service, req, source, &own).await,
            }
        };
        let resp = match per_try {
            Some(t) => tokio::time::timeout(t, go)
                .await
                .unwrap_or_else(|_| error_response(StatusCode::GATEWAY_TIMEOUT, FlowError::BackendTimeout)),
            None => go.await,
        };
        let at = match &c.target {
            Target::Local => String::from("local"),
            Target::Peer(id) => id.to_string(),
        };
        let code = resp.status().as_u16().to_string();
        let result = refusal(&resp).map(FlowError::as_str).unwrap_or(&code);
        causeway_overlay::access::attempt(trace, span, &at, result, tried.elapsed());
        resp
    }

    /// Sends a request to `peer` as an HTTP/3 request and relays its response.
    pub(super) async fn to_peer<B>(
        &self,
        peer: &causeway_protocol::Identity,
        service: &ServiceName,
        req: Request<B>,
        source: &Source,
        trace: &TraceParent,
    ) -> Response<ChanBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let port = self.mesh.advertised_port(peer, service).unwrap_or(0);
        let (parts, mut body) = req.into_parts();
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut h3req = Request::builder().method(parts.method.clone()).uri(format!("https://{service}:{port}{pq}"));
        if let Some(h) = h3req.headers_mut() {
            *h = end_to_end(&parts.headers);
            let set = |h: &mut HeaderMap, k: &'static str, v: &str| {
                if let Ok(v) = v.parse() {
                    h.insert(HeaderName::from_static(k), v);
                }
            };
            set(h, SOURCE_IDENTITY, source.identity.as_str());
            set(h, SOURCE_ZONE, self.mesh.zone().as_str());
            set(h, TRACEPARENT, &trace.to_string());
            set(h, VIA, self.mesh.identity().as_str());
            set(h, CLIENT_ADDRESS, &source.addr.to_string());
        }
        let Ok(h3req) = h3req.body(()) else {
            return error_response(StatusCode::BAD_REQUEST, FlowError::BadRequest);
        };
        let (stream, held) = match self.mesh.open_http(peer, h3req).await {
            Ok(x) => x,
            Err(e) => return error_response(StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY), e),
        };
        let (mut send, mut recv) = stream.split();
        // Request body: hyper → HTTP/3, as it arrives (a request without one, most GETs, just
        // ends its stream: no task).
        if body.is_end_stream() {
            let _ = send.finish().await;
        } else {
            tokio::spawn(async move {
                use http_body_util::BodyExt;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { return };
                    let r = match frame.into_data() {
                        Ok(d) => send.send_data(d).await,
                        Err(f) => match f.into_trailers() {
                            Ok(t) => send.send_trailers(t).await,
                            Err(_) => Ok(()),
                        },
                    };
                    if r.is_err() {
                        return;
                    }
                }
                let _ = send.finish().await;
            });
        }
        let head = match tokio::time::timeout(RESPONSE_TIMEOUT, recv.recv_response()).await {
            Ok(Ok(h)) => h,
            Ok(Err(_)) => return error_response(StatusCode::BAD_GATEWAY, FlowError::BackendRefused),
            Err(_) => return error_response(StatusCode::GATEWAY_TIMEOUT, FlowError::BackendTimeout),
        };
        // A gRPC trailers-only answer (the status in the head) has no body: HTTP/2 must end the
        // stream with its HEADERS, or clients miss the status.
        let out = if head.headers().contains_key(GRPC_STATUS) {
            ChanBody::empty()
        } else {
            piped(H3Body::new(recv, None), held)
        };
        let mut resp = Response::new(out);
        *resp.status_mut() = head.status();
        *resp.headers_mut() = end_to_end(head.headers());
        // A refusal's reason (and breaker) reach the client: the gateways name them, no one else.
        for k in [causeway_protocol::flow::ERROR, causeway_protocol::flow::BREAKER, causeway_protocol::flow::POLICY] {
            if let Some(v) = head.headers().get(k) {
                resp.headers_mut().insert(k, v.clone());
            }
        }
        // The peer's refusal, parsed once: what retries and gRPC codes decide on.
        let peer_refusal = head.headers().get(causeway_protocol::flow::ERROR).and_then(|v| v.to_str().ok());
        if let Some(e) = peer_refusal.and_then(FlowError::parse) {
            resp.extensions_mut().insert(Refusal(e, Side::Upstream));
        }
        resp
    }
}

/// The gRPC status of a trailers-only response.
pub(super) const GRPC_STATUS: &str = "grpc-status";

pub(super) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"))
}

/// A call's `grpc-timeout` (gRPC over HTTP/2: 1-8 digits and a unit, H M S m u n).
pub(super) fn grpc_timeout(h: &HeaderMap) -> Option<Duration> {
    let v = h.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A gRPC client reads an error as a trailers-only response (HTTP 200, `grpc-status`): an error
/// the gateway wrote itself becomes one, with the gRPC code nearest its meaning.
pub(super) fn grpc_error(resp: Response<ChanBody>) -> Response<ChanBody> {
    let Some(why) = resp.extensions().get::<Refusal>().copied() else {
        return resp;
    };
    let e = why.0;
    let code = match e {
        FlowError::BackendTimeout => 4, // DEADLINE_EXCEEDED
        FlowError::Forbidden | FlowError::PolicyDenied | FlowError::IdentityRefused => 7, // PERMISSION_DENIED
        FlowError::PeerFlowRate | FlowError::RateLimited => 8, // RESOURCE_EXHAUSTED
        FlowError::BadRequest | FlowError::Loop => 13, // INTERNAL
        FlowError::UnknownService
        | FlowError::NoHealthyEndpoint
        | FlowError::Draining
        | FlowError::BackendRefused
        | FlowError::OverBudget
        | FlowError::CircuitOpen => 14, // UNAVAILABLE
    };
    let mut r = Response::new(ChanBody::empty());
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    h.insert(GRPC_STATUS, http::HeaderValue::from(code));
    h.insert("grpc-message", http::HeaderValue::from_static(e.as_str()));
    for k in [causeway_protocol::flow::ERROR, causeway_protocol::flow::BREAKER] {
        if let Some(v) = resp.headers().get(k) {
            h.insert(k, v.clone());
        }
    }
    r.extensions_mut().insert(why);
    r
}

pub(super) fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE, Method::TRACE].contains(m)
}

/// Whether `resp` is one `r` retries: gateway-generated errors carry `causeway-error`.
pub(super) fn should_retry(r: &Retries, resp: &Response<ChanBody>) -> bool {
    let s = resp.status().as_u16();
    match refusal(resp) {
        Some(FlowError::BackendRefused | FlowError::NoHealthyEndpoint) if r.on_connect_failure || r.on_reset => true,
        Some(FlowError::BackendTimeout) if r.on_gateway_error => true,
        _ => (r.on_5xx && s >= 500) || (r.on_gateway_error && matches!(s, 502..=504)) || r.codes.contains(&s),
    }
}
