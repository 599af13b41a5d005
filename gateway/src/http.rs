//! HTTP services across zones (`protocol: http`, `http2`, `grpc`). A local listener of an `http`
//! import, or a connection a redirector captured, is parsed by hyper (HTTP/1.1 or HTTP/2 with
//! prior knowledge, detected per connection); each request picks a route (`http_routes`), a
//! weighted backend and its subset (services' labels), then the best zone whose service carries
//! those labels, and crosses the overlay as its own HTTP/3 request carrying the source identity
//! and `traceparent`. The destination gateway sends it to an endpoint over pooled HTTP/1.1
//! connections, or one HTTP/2 connection for `http2`/`grpc` exports. Bodies and trailers (gRPC
//! status) stream both ways with back-pressure (bounded channels); hop-by-hop headers are dropped
//! per RFC 9110 §7.6.1. An Upgrade (WebSocket) falls back to a tunnel: a TCP flow to the service
//! carrying the HTTP/1.1 handshake and then the upgraded bytes. Every request gets one access-log
//! line and its metrics.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use causeway_overlay::abuse::StreamEnd;
use causeway_overlay::flow::{ServerStream, Source};
use causeway_overlay::http::{refuse, Candidate, HttpHandler, PeerInfo};
use causeway_overlay::relay::Failed;
use causeway_overlay::routes::Target;
use causeway_overlay::Mesh;
use causeway_protocol::flow::{FlowError, CLIENT_ADDRESS, SOURCE_IDENTITY, SOURCE_ZONE, TRACEPARENT, VIA};
use causeway_protocol::trace::TraceParent;
use causeway_protocol::ServiceName;
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::balance::{Choice, Outcome};
use crate::policy::{HttpSubject, Subject};
use crate::routes::{Fault, HeaderChanges, HttpRoute, Mirror, Retries};
use causeway_overlay::mesh::LbPolicy;

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
/// Mirrored copies of requests, by service, route and result (`sent`, `no_zone`, `skipped_body`).
pub const HTTP_MIRRORS: &str = "causeway_http_mirrors_total";
/// Requests answered by fault injection, by service, route and kind (`delay`, `abort`).
pub const HTTP_FAULTS: &str = "causeway_http_faults_total";
/// Mirrored copies in flight at once (each holds its request body, ≤ 64 KiB, until answered or
/// 30 s); past it, copies are skipped and counted (`skipped_busy`).
const MAX_MIRRORS_IN_FLIGHT: usize = 256;

/// Header on a mirrored copy of a request, so its endpoint can tell it from the real one.
const MIRROR_HEADER: &str = "x-causeway-mirror";

/// Requests waiting for an endpoint connection (`max_connections`), by service.
pub const HTTP_PENDING: &str = "causeway_http_requests_pending";
/// Upgraded connections (WebSocket) tunnelled, by service and result (`upgraded`, `refused`).
pub const HTTP_UPGRADES: &str = "causeway_http_upgrades_total";

/// Bytes buffered in the pipe between an upgraded client connection and its tunnel flow.
const TUNNEL_PIPE: usize = 64 * 1024;

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

/// What a route decided for one request.
#[derive(Default)]
struct Picked {
    route: String,
    subset: Vec<(String, String)>,
    timeout: Option<Duration>,
    per_try: Option<Duration>,
    retries: Option<Retries>,
    request_headers: HeaderChanges,
    response_headers: HeaderChanges,
    fault: Fault,
    mirror: Option<Mirror>,
}

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

/// How often a request waiting for an endpoint connection looks again without a wake-up.
const SLOT_RECHECK: Duration = Duration::from_millis(50);

/// Requests one HTTP/2 client connection may have in progress at once.
const MAX_H2_STREAMS: u32 = 256;

/// Body chunks buffered between the two sides of one request (each at most one read: ~64 KiB).
const BODY_QUEUE: usize = 4;
/// Waiting for the response head of a request (the route timeout comes with routes' timeouts).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body one side of the gateway reads: polled straight from where it comes from (the other
/// side's hyper body, or an HTTP/3 stream: no task, no queue between them), or fed from a channel
/// by the gateway itself (an answer it makes). No source: no body at all (a trailers-only gRPC
/// answer, a 101), which HTTP/2 ends with the headers.
///
/// The body the client reads carries the request's access-log line, written when the body ends
/// (or is dropped unfinished: the client went away), so it has the bytes sent and the whole
/// duration, and a gRPC status from the trailers.
pub struct ChanBody {
    from: BodyFrom,
    /// Held until the body ends or is dropped (a breaker's place, the peer stream's hold).
    hold: Option<Box<dyn Send>>,
    log: Option<Box<AccessRecord>>,
    bytes: u64,
    /// The response's Content-Length: HTTP/1.1 stops reading a body once it has that many bytes.
    length: Option<u64>,
}

/// Where a [`ChanBody`] reads from.
enum BodyFrom {
    None,
    Chan(mpsc::Receiver<Result<Frame<Bytes>, BoxError>>),
    Direct(http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>),
}

impl ChanBody {
    fn empty() -> Self {
        ChanBody { from: BodyFrom::None, hold: None, log: None, bytes: 0, length: None }
    }

    /// Writes `record` when this body ends (`length`: the response's Content-Length).
    fn log_at_end(&mut self, record: AccessRecord, length: Option<u64>) {
        self.log = Some(Box::new(record));
        self.length = length;
    }

    fn finish(&mut self, complete: bool) {
        self.hold = None;
        if let Some(r) = self.log.take() {
            r.emit(self.bytes, complete);
        }
    }
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = match &mut self.from {
            BodyFrom::None => Poll::Ready(None),
            BodyFrom::Chan(rx) => rx.poll_recv(cx),
            BodyFrom::Direct(b) => Pin::new(b).poll_frame(cx),
        };
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                } else if let (Some(t), Some(log)) = (f.trailers_ref(), self.log.as_mut()) {
                    if let Some(v) = t.get(GRPC_STATUS).and_then(|v| v.to_str().ok()) {
                        log.grpc_status = v.to_string();
                    }
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.from {
            BodyFrom::None => true,
            BodyFrom::Chan(_) => false,
            BodyFrom::Direct(b) => b.is_end_stream(),
        }
    }
}

impl Drop for ChanBody {
    fn drop(&mut self) {
        // A body without a source is complete as it is (HTTP/2 may never poll it), and so is
        // one whose Content-Length was sent (HTTP/1.1 stops there).
        let complete = match &self.from {
            BodyFrom::None => true,
            // Empty from the start (a 204, a 304): hyper never polls it.
            BodyFrom::Direct(b) if b.is_end_stream() => true,
            _ => self.length == Some(self.bytes),
        };
        self.finish(complete);
    }
}

/// `body`, read straight from its source by whoever reads this one; `hold` is kept until it ends.
fn piped<B>(body: B, hold: impl Send + 'static) -> ChanBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    ChanBody {
        from: BodyFrom::Direct(body.map_err(Into::into).boxed_unsync()),
        hold: Some(Box::new(hold)),
        log: None,
        bytes: 0,
        length: None,
    }
}

fn chan() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, ChanBody) {
    let (tx, rx) = mpsc::channel(BODY_QUEUE);
    (tx, ChanBody { from: BodyFrom::Chan(rx), hold: None, log: None, bytes: 0, length: None })
}

/// The receive half of an HTTP/3 request stream, client or server side (h3 gives them the same
/// methods and no common trait).
trait H3Recv: Send + 'static {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, h3::error::StreamError>>;
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, h3::error::StreamError>>;
}

impl<S: h3::quic::RecvStream + Send + 'static> H3Recv for h3::client::RequestStream<S, Bytes> {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, h3::error::StreamError>> {
        self.poll_recv_data(cx).map_ok(|b| b.map(|mut b| b.copy_to_bytes(b.remaining())))
    }
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, h3::error::StreamError>> {
        self.poll_recv_trailers(cx)
    }
}

impl<S: h3::quic::RecvStream + Send + 'static> H3Recv for h3::server::RequestStream<S, Bytes> {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, h3::error::StreamError>> {
        self.poll_recv_data(cx).map_ok(|b| b.map(|mut b| b.copy_to_bytes(b.remaining())))
    }
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, h3::error::StreamError>> {
        self.poll_recv_trailers(cx)
    }
}

/// An HTTP/3 stream's DATA, then its trailers, as a body; the bytes are also added to `counted`.
struct H3Body<R> {
    rx: R,
    data_done: bool,
    ended: bool,
    counted: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl<R: H3Recv> H3Body<R> {
    fn new(rx: R, counted: Option<Arc<std::sync::atomic::AtomicU64>>) -> Self {
        Self { rx, data_done: false, ended: false, counted }
    }
}

impl<R: H3Recv + Unpin> Body for H3Body<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match std::task::ready!(self.rx.poll_data(cx)) {
                Ok(Some(b)) => {
                    if let Some(c) = &self.counted {
                        c.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Ok(None) => self.data_done = true,
                Err(e) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
        let t = std::task::ready!(self.rx.poll_trailers(cx));
        self.ended = true;
        Poll::Ready(t.ok().flatten().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// The endpoint that answered a request (a response extension, for the access log).
#[derive(Debug, Clone, Copy)]
struct EndpointUsed(std::net::SocketAddr);

/// One request's access-log line at the source gateway, written when its response body ends.
struct AccessRecord {
    service: ServiceName,
    source_identity: String,
    source: std::net::SocketAddr,
    route: String,
    subset: String,
    zone: String,
    method: http::Method,
    path: String,
    version: http::Version,
    status: u16,
    grpc_status: String,
    attempts: usize,
    fault: &'static str,
    mirrored: bool,
    trace: TraceParent,
    start: Instant,
}

impl AccessRecord {
    fn emit(&self, bytes: u64, complete: bool) {
        tracing::info!(
            target: "causeway::access",
            direction = "outbound",
            kind = "http",
            service = %self.service,
            source_identity = %self.source_identity,
            source = %self.source,
            route = %self.route,
            subset = %self.subset,
            zone = %self.zone,
            method = %self.method,
            path = %self.path,
            client_protocol = ?self.version,
            status = self.status,
            grpc_status = %self.grpc_status,
            attempts = self.attempts,
            fault = self.fault,
            mirrored = self.mirrored,
            bytes_out = bytes,
            complete,
            traceparent = %self.trace,
            duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            "http"
        );
    }
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
    // `TE: trailers` is the one TE an HTTP/2 or HTTP/3 request may carry, and gRPC needs it.
    let trailers = headers
        .get_all(http::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    if trailers {
        out.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    }
    out
}

/// The gateway's HTTP side: routes for the source, an endpoint client for the destination.
type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, ChanBody>;

pub struct Http {
    mesh: Mesh,
    /// Replaced whole by a reload; each request reads the set it started with.
    routes: std::sync::RwLock<Arc<Vec<HttpRoute>>>,
    /// Pooled HTTP/1.1 connections to endpoints ...
    client: Client,
    /// ... and HTTP/2 (h2c, prior knowledge) for `http2`/`grpc` exports.
    client_h2: Client,
    budgets: std::sync::Mutex<std::collections::HashMap<String, Budget>>,
    balancer: crate::balance::Balancer,
    /// Requests to each service's endpoints in progress (the `max_requests` breaker).
    active: Arc<std::sync::Mutex<std::collections::HashMap<ServiceName, u32>>>,
    /// Endpoint connections in use and requests waiting for one (`max_connections`, `max_pending`).
    slots: Arc<std::sync::Mutex<std::collections::HashMap<ServiceName, SlotState>>>,
    /// Who may call our exports (decided here, for peers' requests).
    policy: Arc<crate::policy::Enforcer>,
    /// Places for mirrored copies in flight.
    mirrors: Arc<tokio::sync::Semaphore>,
}

/// One service's endpoint connections in use, and the requests waiting for one.
#[derive(Default)]
struct SlotState {
    used: std::collections::HashMap<std::net::SocketAddr, u32>,
    pending: u32,
    freed: Arc<tokio::sync::Notify>,
}

type Slots = Arc<std::sync::Mutex<std::collections::HashMap<ServiceName, SlotState>>>;

/// An endpoint connection held by one request (`max_connections`) until dropped.
struct Slot(Slots, ServiceName, std::net::SocketAddr);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = m.get_mut(&self.1) {
            if let Some(n) = st.used.get_mut(&self.2) {
                *n = n.saturating_sub(1);
            }
            st.freed.notify_one();
        }
    }
}

/// A request counted as waiting for an endpoint connection until dropped (also when its caller
/// gives up: a route timeout).
struct Waiting(Slots, ServiceName, metrics::Gauge);

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = m.get_mut(&self.1) {
            st.pending = st.pending.saturating_sub(1);
        }
        self.2.decrement(1.0);
    }
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
    pub fn new(mesh: Mesh, routes: Vec<HttpRoute>, policy: Arc<crate::policy::Enforcer>) -> Arc<Self> {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector.clone());
        let client_h2 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .http2_only(true)
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .build(connector);
        let balancer = crate::balance::Balancer::new(mesh.timing().outlier_ejection);
        Arc::new(Self {
            mesh,
            routes: std::sync::RwLock::new(Arc::new(routes)),
            client,
            client_h2,
            budgets: Default::default(),
            balancer,
            active: Default::default(),
            slots: Default::default(),
            policy,
            mirrors: Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
        })
    }

    /// The running authorization policy.
    pub fn policy(&self) -> &Arc<crate::policy::Enforcer> {
        &self.policy
    }

    /// Serves one client connection of an `http` import listener until it closes.
    pub async fn serve_client(self: Arc<Self>, tcp: TcpStream, service: ServiceName, source: Source) {
        let _ = tcp.set_nodelay(true);
        self.serve_io(tcp, service, source).await
    }

    /// Serves one client connection (HTTP/1.1, or HTTP/2 with prior knowledge) until it closes.
    pub async fn serve_io<I>(self: Arc<Self>, io: I, service: ServiceName, source: Source)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (this, service, source) = (self.clone(), service.clone(), source.clone());
            async move {
                if req.version() <= http::Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE) {
                    return Ok::<_, Infallible>(this.tunnel(req, &service, &source).await);
                }
                let span = request_span("outbound", service.as_str(), &req);
                Ok(this.route(req, &service, &source).instrument(span).await)
            }
        });
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        b.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_H2_STREAMS)
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        if let Err(e) = b.serve_connection_with_upgrades(TokioIo::new(io), svc).await {
            tracing::debug!(error = %e, "http.client.connection");
        }
    }

    /// Replaces the routes (a reload): requests already routed keep theirs, the next ones use
    /// these. Balancer state of endpoints no longer configured is dropped.
    pub fn reconfigure(&self, routes: Vec<HttpRoute>, endpoints: &[std::net::SocketAddr]) {
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
        self.balancer.retain(endpoints);
    }

    /// The route for a request: its name, the labels its chosen backend requires, and the rule's
    /// timeouts and retries.
    fn pick<B>(&self, service: &ServiceName, req: &Request<B>) -> Picked {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner()).clone();
        for r in routes.iter().filter(|r| &r.service == service) {
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

    async fn route<B>(
        self: &Arc<Self>,
        mut req: Request<B>,
        service: &ServiceName,
        source: &Source,
    ) -> Response<ChanBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let start = Instant::now();
        let Picked { route, subset, timeout, per_try, retries, request_headers, response_headers, fault, mirror } =
            self.pick(service, &req);
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
                let resp = self.attempt(c, service, req, source, &trace, per_try).await;
                return (resp, c.zone.to_string(), 1);
            }
            use http_body_util::BodyExt;
            let (parts, body) = req.into_parts();
            let body = match http_body_util::Limited::new(body, RETRY_BODY_MAX as usize).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return (error_response(StatusCode::BAD_REQUEST, FlowError::BadRequest), String::new(), 0),
            };
            if let Some(m) = mirror {
                mirrored = self.mirror(m, service, &route, &parts, &body, source, &trace);
            }
            let Some(retry) = retry else {
                let c = &candidates[0];
                let req = Request::from_parts(parts, http_body_util::Full::new(body));
                let resp = self.attempt(c, service, req, source, &trace, per_try).await;
                return (resp, c.zone.to_string(), 1);
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
        resp.body_mut().log_at_end(
            AccessRecord {
                service: service.clone(),
                source_identity: source.identity.to_string(),
                source: source.addr,
                route,
                subset: subset.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                zone,
                method,
                path,
                version,
                status,
                grpc_status,
                attempts,
                fault: fault_kind,
                mirrored,
                trace,
                start,
            },
            length,
        );
        resp
    }

    fn count_mirror(&self, service: &ServiceName, route: &str, result: &'static str) {
        self.mesh
            .metrics()
            .counter(HTTP_MIRRORS, &[("service", service.as_str()), ("route", route), ("result", result)])
            .increment(1);
    }

    /// Sends a copy of a request to the mirror's subset, in the background; its answer is read
    /// and dropped. Returns whether a copy went out (a zone serves the subset).
    #[allow(clippy::too_many_arguments)]
    fn mirror(
        self: &Arc<Self>,
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
        let (this, service, source) = (self.clone(), service.clone(), source.clone());
        let trace = trace.child(rand::rng().random::<u64>() | 1);
        tokio::spawn(async move {
            use http_body_util::BodyExt;
            let copy = async {
                let resp = this.attempt(&c, &service, req, &source, &trace, Some(RESPONSE_TIMEOUT)).await;
                let _ = resp.into_body().collect().await;
            };
            // One deadline for the whole copy, answer included.
            let _ = tokio::time::timeout(RESPONSE_TIMEOUT, copy).await;
            drop(place);
        });
        true
    }

    /// An Upgrade request (WebSocket): a TCP flow to the service (CONNECT across the overlay, as
    /// for a `tcp` service) carries the HTTP/1.1 handshake to an endpoint; once it answers 101 the
    /// client's connection and the flow are joined byte for byte. Routes do not apply: a tunnel
    /// goes to the best zone of the service.
    async fn tunnel(&self, mut req: Request<Incoming>, service: &ServiceName, source: &Source) -> Response<ChanBody> {
        let start = Instant::now();
        let (ours, theirs) = tokio::io::duplex(TUNNEL_PIPE);
        let trace = req
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse)
            .unwrap_or_else(new_trace);
        let (mesh, svc, src) = (self.mesh.clone(), service.clone(), source.clone());
        tokio::spawn(async move {
            mesh.serve(causeway_overlay::flow::Downstream::Pipe(theirs), svc, src, Some(trace)).await;
        });
        let client_side = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into());
        // The handshake as the client sent it, less our own headers; Host names the service.
        let internal: Vec<HeaderName> =
            parts.headers.keys().filter(|k| k.as_str().starts_with("causeway-")).cloned().collect();
        for k in internal {
            parts.headers.remove(k);
        }
        if let Ok(host) = service.as_str().parse() {
            parts.headers.insert(http::header::HOST, host);
        }
        parts.uri = path.parse().unwrap_or_default();
        let handshake = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours)).await.ok()?;
            tokio::spawn(conn.with_upgrades());
            sender.send_request(Request::from_parts(parts, body)).await.ok()
        };
        let m = self.mesh.metrics();
        let outcome = |result: &'static str| {
            m.counter(HTTP_UPGRADES, &[("service", service.as_str()), ("result", result)]).increment(1);
        };
        let resp = match tokio::time::timeout(RESPONSE_TIMEOUT, handshake).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                outcome("refused");
                return error_response(StatusCode::BAD_GATEWAY, FlowError::BackendRefused);
            }
            Err(_) => {
                outcome("refused");
                return error_response(StatusCode::GATEWAY_TIMEOUT, FlowError::BackendTimeout);
            }
        };
        let status = resp.status();
        tracing::info!(
            target: "causeway::access",
            direction = "outbound",
            kind = "http",
            service = %service,
            source_identity = %source.identity,
            source = %source.addr,
            route = "upgrade",
            path = %path,
            status = status.as_u16(),
            upgrade = %resp.headers().get(http::header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or(""),
            traceparent = %trace,
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            "http"
        );
        let mut resp = resp;
        if status != StatusCode::SWITCHING_PROTOCOLS {
            outcome("refused");
            let (parts, body) = resp.into_parts();
            let mut r = Response::new(piped(body, ()));
            *r.status_mut() = parts.status;
            *r.headers_mut() = end_to_end(&parts.headers);
            return r;
        }
        outcome("upgraded");
        let endpoint_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(c), Ok(e)) = tokio::join!(client_side, endpoint_side) else { return };
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(e)).await;
        });
        // The 101 with the endpoint's headers, Upgrade and Connection included.
        let mut r = Response::new(ChanBody::empty());
        *r.status_mut() = status;
        *r.headers_mut() = resp.headers().clone();
        r
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
                Target::Local => match self.authorize_local(service, &req, source).await {
                    None => self.to_endpoint(service, req).await,
                    Some(refusal) => refusal,
                },
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
        resp
    }

    /// This gateway serves the request itself: it is the destination, and its policy decides
    /// for its own zone's callers too.
    fn authorize_local<B>(
        &self,
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
        self.admit(&subject)
    }

    /// Authorization now, then the rate limits (a global one asks the shared store): the refusal
    /// to answer with, if any.
    fn admit(&self, s: &Subject<'_>) -> impl std::future::Future<Output = Option<Response<ChanBody>>> + Send + 'static {
        let (pass, d) = self.policy.check(s);
        let rate = pass.then(|| self.policy.check_rate(s));
        async move {
            match rate {
                None => Some(policy_denied(&d.policy)),
                Some(rate) => rate.await.err().map(|l| rate_limited(&l)),
            }
        }
    }

    /// An immediate 503 from an open breaker, naming it.
    fn breaker_open(&self, service: &ServiceName, breaker: &'static str) -> Response<ChanBody> {
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
    async fn connection_slot(
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
    async fn to_endpoint<B>(&self, service: &ServiceName, req: Request<B>) -> Response<ChanBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let opts = self.mesh.http_options(service);
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
            Active(self.active.clone(), service.clone(), gauge)
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
            let outcome = if failed { Outcome::Failure } else { Outcome::Success };
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

/// The gRPC status of a trailers-only response.
const GRPC_STATUS: &str = "grpc-status";

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"))
}

/// A call's `grpc-timeout` (gRPC over HTTP/2: 1-8 digits and a unit, H M S m u n).
fn grpc_timeout(h: &HeaderMap) -> Option<Duration> {
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
fn grpc_error(resp: Response<ChanBody>) -> Response<ChanBody> {
    let Some(e) =
        resp.headers().get(causeway_protocol::flow::ERROR).and_then(|v| v.to_str().ok()).and_then(FlowError::parse)
    else {
        return resp;
    };
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
    r
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

/// The span of one request at this gateway (its trace context is in the access-log line).
fn request_span<B>(direction: &'static str, service: &str, req: &Request<B>) -> tracing::Span {
    tracing::info_span!("http", direction, service, method = %req.method(), path = %req.uri().path())
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(h: &HeaderMap, name: &str) -> Option<String> {
    h.get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn new_trace() -> TraceParent {
    let mut rng = rand::rng();
    TraceParent::root(rng.random(), rng.random())
}

/// A request the destination's policy refuses: 403 naming the policy.
fn policy_denied(policy: &str) -> Response<ChanBody> {
    let (tx, body) = chan();
    let _ = tx.try_send(Ok(Frame::data(Bytes::from(format!("policy_denied: {policy}\n")))));
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::FORBIDDEN;
    r.headers_mut().insert(causeway_protocol::flow::ERROR, http::HeaderValue::from_static("policy_denied"));
    if let Ok(v) = http::HeaderValue::from_str(policy) {
        r.headers_mut().insert(causeway_protocol::flow::POLICY, v);
    }
    r
}

/// A request over a rate limit: 429 naming the limit, with `Retry-After` (whole seconds, at least 1).
fn rate_limited(l: &crate::ratelimit::Limited) -> Response<ChanBody> {
    let (tx, body) = chan();
    let why = if l.store_unavailable { " (the limit store does not answer; its fallback is closed)" } else { "" };
    let _ = tx.try_send(Ok(Frame::data(Bytes::from(format!("rate_limited: {}{why}\n", l.name)))));
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let h = r.headers_mut();
    h.insert(causeway_protocol::flow::ERROR, http::HeaderValue::from_static("rate_limited"));
    h.insert(http::header::RETRY_AFTER, http::HeaderValue::from(l.retry_after.as_secs_f64().ceil().max(1.0) as u64));
    if let Ok(v) = http::HeaderValue::from_str(&l.name) {
        h.insert(causeway_protocol::flow::POLICY, v);
    }
    r
}

/// A fault-injected answer: the route's status, `causeway-fault: abort`, and the reason.
fn fault_response(status: StatusCode) -> Response<ChanBody> {
    let (tx, body) = chan();
    let _ = tx.try_send(Ok(Frame::data(Bytes::from_static(b"fault_injected\n"))));
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert("causeway-fault", http::HeaderValue::from_static("abort"));
    r
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
        let span = request_span("inbound", req.uri().host().unwrap_or(""), &req);
        Box::pin(async move { self.serve_inbound(req, stream, from).await }.instrument(span))
    }

    fn serve_request(
        self: Arc<Self>,
        req: Request<()>,
        stream: ServerStream,
        source: Source,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        Box::pin(async move {
            // `:authority` names the service (any port): one of the mesh's `http` services.
            let service = req.uri().authority().and_then(|a| ServiceName::new(a.host()).ok());
            let Some(service) = service.filter(|s| self.mesh.is_http(s)) else {
                refuse(stream, FlowError::UnknownService).await;
                return;
            };
            let (mut send, recv) = stream.split();
            let body = piped(H3Body::new(recv, None), ());
            let span = request_span("outbound", service.as_str(), &req);
            let resp = self.route(req.map(|()| body), &service, &source).instrument(span).await;
            respond_h3(&mut send, resp).await;
        })
    }

    fn serve_connection(
        self: Arc<Self>,
        io: tokio::io::DuplexStream,
        service: ServiceName,
        source: Source,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        Box::pin(self.serve_io(io, service, source))
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
        // A refusal before the request reaches policy: answered, counted (the service label only
        // once it is one of ours: a peer cannot mint label values) and logged, rate-limited.
        let refused = |e: FlowError, service: &str| {
            let code = e.status().to_string();
            let zone = from.zone.as_ref().map(|z| z.as_str()).unwrap_or("");
            let labels = [("service", service), ("route", "inbound"), ("zone", zone), ("code", code.as_str())];
            self.mesh.metrics().counter(HTTP_REQUESTS, &labels).increment(1);
            causeway_overlay::warn_limited!(peer = %from.identity, service, error = e.as_str(), "http.inbound.refused");
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
        let (pass, decision) = self.policy.check(&subject);
        // Authorized calls draw from the rate limits; a refusal is answered instead.
        let rate = pass.then(|| self.policy.check_rate(&subject));
        let refusal = match rate {
            Some(rate) => rate.await.err().map(|l| rate_limited(&l)),
            None => Some(policy_denied(&decision.policy)),
        };
        let (mut send, recv) = stream.split();
        let bytes_in = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let body = piped(H3Body::new(recv, Some(bytes_in.clone())), ());
        let (method, path) = (req.method().clone(), req.uri().path_and_query().map(|p| p.to_string()));
        let resp = match refusal {
            None => self.to_endpoint(&service, req.map(|()| body)).await,
            Some(r) => r,
        };
        let status = resp.status();
        let endpoint = resp.extensions().get::<EndpointUsed>().map(|e| e.0.to_string()).unwrap_or_default();
        let (how, bytes_out) = respond_h3(&mut send, resp).await;
        let bytes_in = bytes_in.load(std::sync::atomic::Ordering::Relaxed);
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
            endpoint = %endpoint,
            policy = %decision.policy,
            allowed = pass,
            bytes_in,
            bytes_out,
            traceparent = %trace,
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            "http"
        );
        how
    }
}

/// Writes `resp` (head, body, trailers) on the server side of an HTTP/3 request stream. Returns
/// whether the peer reset the stream on the way, and the body bytes sent.
async fn respond_h3(send: &mut causeway_overlay::relay::ServerSend, resp: Response<ChanBody>) -> (StreamEnd, u64) {
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
