//! HTTP services across zones (`protocol: http`). A local listener of an `http` import parses
//! HTTP/1.1 requests (hyper); each request picks a route (`http_routes`), a weighted backend and
//! its subset (services' labels), then the best zone whose service carries those labels, and
//! crosses the overlay as its own HTTP/3 request carrying the source identity and `traceparent`.
//! The destination gateway sends it to an endpoint over pooled HTTP/1.1 connections. Bodies and
//! trailers stream both ways with back-pressure (bounded channels); hop-by-hop headers are dropped
//! per RFC 9110 §7.6.1. Every request gets one access-log line and its metrics.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use causeway_overlay::abuse::StreamEnd;
use causeway_overlay::flow::{ServerStream, Source};
use causeway_overlay::http::{refuse, Candidate, HttpHandler, PeerInfo};
use causeway_overlay::routes::Target;
use causeway_overlay::Mesh;
use causeway_protocol::flow::{FlowError, SOURCE_IDENTITY, SOURCE_ZONE, TRACEPARENT, VIA};
use causeway_protocol::trace::TraceParent;
use causeway_protocol::ServiceName;
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::balance::Outcome;
use crate::config::{HttpRoute, Retries, RouteMatch, Rule};

/// Requests served, by service, route, serving zone and status code.
pub const HTTP_REQUESTS: &str = "causeway_http_requests_total";
/// Request latency from the first header byte to the response head.
pub const HTTP_DURATION: &str = "causeway_http_request_duration_seconds";
/// Requests to a service's endpoints in progress at this gateway.
pub const HTTP_ACTIVE: &str = "causeway_http_requests_active";
/// Requests refused at once by an open circuit breaker, by service and breaker.
pub const HTTP_BREAKER_OPEN: &str = "causeway_http_circuit_open_total";
/// Endpoints ejected for failing in a row, by service.
pub const HTTP_EJECTIONS: &str = "causeway_http_ejections_total";
/// Retries, by service, route and result (`retried`, `budget_exhausted`).
pub const HTTP_RETRIES: &str = "causeway_http_retries_total";

/// Request bodies up to this size are kept for a retry; larger ones stream and are not retried.
const RETRY_BODY_MAX: u64 = 64 * 1024;
/// The retry budget per route: retries may add at most this share of the route's requests, plus
/// [`RETRY_FLOOR`], over each [`RETRY_WINDOW`] (Linkerd's and Finagle's idea): a failing backend
/// never sees a retry storm.
const RETRY_RATIO: f64 = 0.2;
const RETRY_FLOOR: u32 = 3;
const RETRY_WINDOW: Duration = Duration::from_secs(10);
/// First backoff between attempts; doubled each time, with jitter.
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Requests and retries of one route in the current window.
#[derive(Debug)]
struct Budget {
    since: Instant,
    requests: u32,
    retries: u32,
}

impl Budget {
    fn roll(&mut self) {
        if self.since.elapsed() >= RETRY_WINDOW {
            *self = Budget { since: Instant::now(), requests: 0, retries: 0 };
        }
    }
}

/// Body chunks buffered between the two sides of one request (each at most one read: ~64 KiB).
const BODY_QUEUE: usize = 4;
/// Waiting for the response head of a request (the route timeout comes with routes' timeouts).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body fed from a channel: what one side of the gateway reads, the other writes.
pub struct ChanBody(mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx)
    }
}

fn chan() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, ChanBody) {
    let (tx, rx) = mpsc::channel(BODY_QUEUE);
    (tx, ChanBody(rx))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), those named by `Connection`, and anything a client sends
/// under our own `causeway-` prefix: identity is named by gateways only.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    const HOP: [&str; 8] =
        ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "host", "trailer"];
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (k, v) in headers {
        let n = k.as_str();
        if HOP.contains(&n) || named.iter().any(|c| c == n) || n.starts_with("causeway-") || n == "traceparent" {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

/// Streams an h3 body (and its trailers) into `tx`.
async fn pump_h3<S>(
    mut rx: h3::client::RequestStream<S, Bytes>,
    tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
) -> u64
where
    S: h3::quic::RecvStream,
{
    let mut n = 0;
    loop {
        match rx.recv_data().await {
            Ok(Some(mut b)) => {
                let b = b.copy_to_bytes(b.remaining());
                n += b.len() as u64;
                if tx.send(Ok(Frame::data(b))).await.is_err() {
                    return n;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(Box::new(e))).await;
                return n;
            }
        }
    }
    if let Ok(Some(t)) = rx.recv_trailers().await {
        let _ = tx.send(Ok(Frame::trailers(t))).await;
    }
    n
}

/// The gateway's HTTP side: routes for the source, an endpoint client for the destination.
pub struct Http {
    mesh: Mesh,
    routes: Vec<HttpRoute>,
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, ChanBody>,
    budgets: std::sync::Mutex<std::collections::HashMap<String, Budget>>,
    balancer: crate::balance::Balancer,
    /// Requests to each service's endpoints in progress (the `max_requests` breaker).
    active: Arc<std::sync::Mutex<std::collections::HashMap<ServiceName, u32>>>,
}

/// One request counted against its service's `max_requests` (and in the active gauge) until
/// dropped.
struct Active(Arc<std::sync::Mutex<std::collections::HashMap<ServiceName, u32>>>, ServiceName, metrics::Gauge);

impl Drop for Active {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
        self.2.decrement(1.0);
    }
}

impl Http {
    pub fn new(mesh: Mesh, routes: Vec<HttpRoute>) -> Arc<Self> {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let balancer = crate::balance::Balancer::new(mesh.timing().outlier_ejection);
        Arc::new(Self { mesh, routes, client, budgets: Default::default(), balancer, active: Default::default() })
    }

    /// Serves one client connection of an `http` import listener until it closes.
    pub async fn serve_client(self: Arc<Self>, tcp: TcpStream, service: ServiceName, source: Source) {
        let _ = tcp.set_nodelay(true);
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (this, service, source) = (self.clone(), service.clone(), source.clone());
            async move { Ok::<_, Infallible>(this.route(req, &service, &source).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(tcp), svc);
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "http.client.connection");
        }
    }

    /// The route for a request: its name, the labels its chosen backend requires, and the rule.
    fn pick(&self, service: &ServiceName, req: &Request<Incoming>) -> (String, Vec<(String, String)>, Option<&Rule>) {
        for r in self.routes.iter().filter(|r| &r.service == service) {
            for rule in &r.rules {
                if !rule.matches.is_empty() && !rule.matches.iter().any(|m| matches(m, req)) {
                    continue;
                }
                let total: u32 = rule.backends.iter().map(|b| b.weight).sum();
                let mut x = if total == 0 { 0 } else { rand::rng().random_range(0..total) };
                for b in &rule.backends {
                    if x < b.weight {
                        return (r.name.clone(), b.subset.clone(), Some(rule));
                    }
                    x -= b.weight;
                }
                return (r.name.clone(), Vec::new(), Some(rule));
            }
        }
        ("default".into(), Vec::new(), None)
    }

    /// Counts a request against its route's retry budget.
    fn count_request(&self, key: &str) {
        let mut b = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let e = b.entry(key.to_string()).or_insert(Budget { since: Instant::now(), requests: 0, retries: 0 });
        e.roll();
        e.requests += 1;
    }

    /// Takes one retry from the route's budget, if any is left.
    fn take_retry(&self, key: &str) -> bool {
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

    async fn route(&self, req: Request<Incoming>, service: &ServiceName, source: &Source) -> Response<ChanBody> {
        let start = Instant::now();
        let (route, subset, rule) = self.pick(service, &req);
        let (timeout, per_try, retries) = match rule {
            Some(r) => (r.timeout, r.per_try_timeout, r.retries.clone()),
            None => (None, None, None),
        };
        let trace = req
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse)
            .map(|t| t.child(rand::rng().random::<u64>() | 1))
            .unwrap_or_else(new_trace);
        let candidates: Vec<Candidate> = self
            .mesh
            .http_candidates(service)
            .into_iter()
            .filter(|c| subset.iter().all(|kv| c.labels.contains(kv)))
            .collect();
        let method = req.method().clone();
        let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into());
        let budget_key = format!("{service}/{route}");
        self.count_request(&budget_key);
        let tries = async {
            if candidates.is_empty() {
                return (
                    error_response(StatusCode::SERVICE_UNAVAILABLE, FlowError::NoHealthyEndpoint),
                    String::new(),
                    0,
                );
            }
            // A request is tried again only if its body is small enough to keep (and, unless the
            // route allows more, its method is idempotent): the body is read first.
            let retry = retries.filter(|r| r.non_idempotent || is_idempotent(req.method())).filter(|_| {
                let len = req.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
                let chunked = req.headers().contains_key(http::header::TRANSFER_ENCODING);
                !chunked && len.is_none_or(|l| l.parse::<u64>().is_ok_and(|n| n <= RETRY_BODY_MAX))
            });
            let Some(retry) = retry else {
                let c = &candidates[0];
                let resp = self.attempt(c, service, req, source, &trace, per_try).await;
                return (resp, c.zone.to_string(), 1);
            };
            use http_body_util::BodyExt;
            let (parts, body) = req.into_parts();
            let body = match http_body_util::Limited::new(body, RETRY_BODY_MAX as usize).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return (error_response(StatusCode::BAD_REQUEST, FlowError::BadRequest), String::new(), 0),
            };
            let mut attempt = 0;
            loop {
                let c = &candidates[attempt % candidates.len()];
                attempt += 1;
                let req = Request::from_parts(parts.clone(), http_body_util::Full::new(body.clone()));
                let resp = self.attempt(c, service, req, source, &trace, per_try).await;
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
        tracing::info!(
            target: "causeway::access",
            direction = "outbound",
            kind = "http",
            service = %service,
            source_identity = %source.identity,
            source = %source.addr,
            route = %route,
            subset = %subset.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
            zone = %zone,
            method = %method,
            path = %path,
            status = resp.status().as_u16(),
            attempts,
            traceparent = %trace,
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            "http"
        );
        resp
    }

    /// One attempt at a candidate, bounded by `per_try` (504 past it).
    async fn attempt<B>(
        &self,
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
        let go = async {
            match &c.target {
                Target::Local => self.to_endpoint(service, req).await,
                Target::Peer(id) => self.to_peer(id, service, req, source, trace).await,
            }
        };
        match per_try {
            Some(t) => tokio::time::timeout(t, go)
                .await
                .unwrap_or_else(|_| error_response(StatusCode::GATEWAY_TIMEOUT, FlowError::BackendTimeout)),
            None => go.await,
        }
    }

    /// Sends a request to `peer` as an HTTP/3 request and relays its response.
    async fn to_peer<B>(
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
        }
        let Ok(h3req) = h3req.body(()) else {
            return error_response(StatusCode::BAD_REQUEST, FlowError::BadRequest);
        };
        let (stream, held) = match self.mesh.open_http(peer, h3req).await {
            Ok(x) => x,
            Err(e) => return error_response(StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY), e),
        };
        let (mut send, mut recv) = stream.split();
        // Request body: hyper → HTTP/3, as it arrives.
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
        let head = match tokio::time::timeout(RESPONSE_TIMEOUT, recv.recv_response()).await {
            Ok(Ok(h)) => h,
            Ok(Err(_)) => return error_response(StatusCode::BAD_GATEWAY, FlowError::BackendRefused),
            Err(_) => return error_response(StatusCode::GATEWAY_TIMEOUT, FlowError::BackendTimeout),
        };
        let (tx, out) = chan();
        tokio::spawn(async move {
            let _held = held;
            pump_h3(recv, tx).await;
        });
        let mut resp = Response::new(out);
        *resp.status_mut() = head.status();
        *resp.headers_mut() = end_to_end(head.headers());
        if let Some(e) = head.headers().get(causeway_protocol::flow::ERROR) {
            resp.headers_mut().insert(causeway_protocol::flow::ERROR, e.clone());
        }
        resp
    }

    /// Sends a request to a local endpoint of `service` over a pooled HTTP/1.1 connection.
    async fn to_endpoint<B>(&self, service: &ServiceName, req: Request<B>) -> Response<ChanBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError> + Send,
    {
        // The breaker: over max_requests in progress, refused at once (before any endpoint work).
        let active = {
            let mut m = self.active.lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(service.clone()).or_insert(0);
            if self.mesh.max_requests(service).is_some_and(|max| *n >= max) {
                drop(m);
                self.mesh
                    .metrics()
                    .counter(HTTP_BREAKER_OPEN, &[("service", service.as_str()), ("breaker", "max_requests")])
                    .increment(1);
                return error_response(StatusCode::SERVICE_UNAVAILABLE, FlowError::CircuitOpen);
            }
            *n += 1;
            let gauge = self.mesh.metrics().gauge(HTTP_ACTIVE, &[("service", service.as_str())]);
            gauge.increment(1.0);
            Active(self.active.clone(), service.clone(), gauge)
        };
        let Some(endpoint) = self.balancer.pick(&self.mesh.healthy_endpoints(service)) else {
            return error_response(StatusCode::SERVICE_UNAVAILABLE, FlowError::NoHealthyEndpoint);
        };
        let sent = Instant::now();
        // Feeds the balancer: latency to the response head, and whether the endpoint failed.
        let done = |failed: bool| {
            let outcome = if failed { Outcome::Failure } else { Outcome::Success };
            if self.balancer.done(endpoint, sent.elapsed(), outcome) {
                tracing::warn!(service = %service, %endpoint, "endpoint.ejected");
                self.mesh.metrics().counter(HTTP_EJECTIONS, &[("service", service.as_str())]).increment(1);
            }
        };
        let (parts, mut body) = req.into_parts();
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let (btx, bbody) = chan();
        tokio::spawn(async move {
            use http_body_util::BodyExt;
            while let Some(f) = body.frame().await {
                let f = f.map_err(Into::into);
                let stop = f.is_err();
                if btx.send(f).await.is_err() || stop {
                    return;
                }
            }
        });
        let mut out = Request::builder().method(parts.method).uri(format!("http://{endpoint}{pq}"));
        if let Some(h) = out.headers_mut() {
            *h = end_to_end(&parts.headers);
            if let Ok(host) = service.as_str().parse() {
                h.insert(http::header::HOST, host);
            }
        }
        let Ok(out) = out.body(bbody) else {
            return error_response(StatusCode::BAD_REQUEST, FlowError::BadRequest);
        };
        let resp = match tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(out)).await {
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
        let (parts, mut body) = resp.into_parts();
        let (tx, rbody) = chan();
        tokio::spawn(async move {
            use http_body_util::BodyExt;
            // In progress until the endpoint's response body is through.
            let _active = active;
            while let Some(f) = body.frame().await {
                let f = f.map_err(|e| Box::new(e) as BoxError);
                let stop = f.is_err();
                if tx.send(f).await.is_err() || stop {
                    return;
                }
            }
        });
        let mut r = Response::new(rbody);
        *r.status_mut() = parts.status;
        *r.headers_mut() = end_to_end(&parts.headers);
        r
    }
}

fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE, Method::TRACE].contains(m)
}

/// Whether `resp` is one `r` retries: gateway-generated errors carry `causeway-error`.
fn should_retry(r: &Retries, resp: &Response<ChanBody>) -> bool {
    let s = resp.status().as_u16();
    let ours =
        resp.headers().get(causeway_protocol::flow::ERROR).and_then(|v| v.to_str().ok()).and_then(FlowError::parse);
    match ours {
        Some(FlowError::BackendRefused | FlowError::NoHealthyEndpoint) if r.on_connect_failure || r.on_reset => true,
        Some(FlowError::BackendTimeout) if r.on_gateway_error => true,
        _ => (r.on_5xx && s >= 500) || (r.on_gateway_error && matches!(s, 502..=504)) || r.codes.contains(&s),
    }
}

fn matches(m: &RouteMatch, req: &Request<Incoming>) -> bool {
    let path = req.uri().path();
    let path_ok = match (&m.path_exact, &m.path_prefix) {
        (Some(p), _) => path == p,
        (None, Some(p)) => path.starts_with(p.as_str()),
        (None, None) => true,
    };
    let method_ok = m.method.as_ref().is_none_or(|x| req.method().as_str().eq_ignore_ascii_case(x));
    let headers_ok = m.headers.iter().all(|(name, value)| {
        let got = req.headers().get(name.as_str()).and_then(|v| v.to_str().ok());
        match value {
            Some(v) => got == Some(v.as_str()),
            None => got.is_some(),
        }
    });
    path_ok && method_ok && headers_ok
}

fn new_trace() -> TraceParent {
    let mut rng = rand::rng();
    TraceParent { trace_id: rng.random::<u128>() | 1, span_id: rng.random::<u64>() | 1, sampled: true }
}

/// A response the gateway writes itself: status, `causeway-error`, and the reason as the body.
fn error_response(status: StatusCode, e: FlowError) -> Response<ChanBody> {
    let (tx, body) = chan();
    let _ = tx.try_send(Ok(Frame::data(Bytes::from(format!("{}\n", e.as_str())))));
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(causeway_protocol::flow::ERROR, http::HeaderValue::from_static(e.as_str()));
    r
}

impl HttpHandler for Http {
    fn serve(
        self: Arc<Self>,
        req: Request<()>,
        stream: ServerStream,
        from: PeerInfo,
    ) -> Pin<Box<dyn std::future::Future<Output = StreamEnd> + Send + 'static>> {
        Box::pin(async move { self.serve_inbound(req, stream, from).await })
    }
}

impl Http {
    /// A peer's request for one of our `http` exports: to an endpoint, and the response back.
    async fn serve_inbound(&self, req: Request<()>, stream: ServerStream, from: PeerInfo) -> StreamEnd {
        let start = Instant::now();
        let authority = req.uri().authority().cloned();
        let service = authority.as_ref().and_then(|a| ServiceName::new(a.host()).ok());
        let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let (source_identity, trace) = (header(SOURCE_IDENTITY), header(TRACEPARENT));
        let port = authority.as_ref().and_then(|a| a.port_u16());
        let Some(service) = service.filter(|s| self.mesh.exports_http(s, port)) else {
            refuse(stream, FlowError::Forbidden).await;
            return StreamEnd::Other;
        };
        if self.mesh.is_over_budget() {
            refuse(stream, FlowError::OverBudget).await;
            return StreamEnd::Other;
        }
        let (mut send, recv) = stream.split();
        let (tx, body) = chan();
        let pump = tokio::spawn(async move { pump_server(recv, tx).await });
        let (method, path) = (req.method().clone(), req.uri().path_and_query().map(|p| p.to_string()));
        let resp = self.to_endpoint(&service, req.map(|()| body)).await;
        let status = resp.status();
        let (parts, mut rbody) = resp.into_parts();
        let mut head = Response::builder().status(parts.status);
        if let Some(h) = head.headers_mut() {
            *h = parts.headers;
        }
        let mut how = StreamEnd::Other;
        if send.send_response(head.body(()).unwrap_or_default()).await.is_err() {
            how = StreamEnd::ResetByPeer;
        } else {
            use http_body_util::BodyExt;
            while let Some(f) = rbody.frame().await {
                let Ok(f) = f else { break };
                let r = match f.into_data() {
                    Ok(d) => send.send_data(d).await,
                    Err(f) => match f.into_trailers() {
                        Ok(t) => send.send_trailers(t).await,
                        Err(_) => Ok(()),
                    },
                };
                if r.is_err() {
                    how = StreamEnd::ResetByPeer;
                    break;
                }
            }
            let _ = send.finish().await;
        }
        pump.abort();
        let code = status.as_u16().to_string();
        let source_zone = from.zone.as_ref().map(|z| z.to_string()).unwrap_or_default();
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
        tracing::info!(
            target: "causeway::access",
            direction = "inbound",
            kind = "http",
            service = %service,
            source_identity = %source_identity,
            source = %from.identity,
            zone = %self.mesh.zone(),
            method = %method,
            path = %path.unwrap_or_default(),
            status = status.as_u16(),
            traceparent = %trace,
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            "http"
        );
        how
    }
}

/// Streams a peer's request body (server side of the h3 stream) into `tx`.
async fn pump_server<S>(mut rx: h3::server::RequestStream<S, Bytes>, tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>)
where
    S: h3::quic::RecvStream,
{
    loop {
        match rx.recv_data().await {
            Ok(Some(mut b)) => {
                if tx.send(Ok(Frame::data(b.copy_to_bytes(b.remaining())))).await.is_err() {
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(Box::new(e))).await;
                return;
            }
        }
    }
    if let Ok(Some(t)) = rx.recv_trailers().await {
        let _ = tx.send(Ok(Frame::trailers(t))).await;
    }
}
