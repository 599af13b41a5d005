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
use causeway_overlay::access::{Access, Direction, Kind, Side};
use causeway_overlay::core::abuse::StreamEnd;
use causeway_overlay::core::route_table::Target;
use causeway_overlay::flow::relay::Failed;
use causeway_overlay::flow::Candidate;
use causeway_overlay::ports::{refuse, HttpHandler, PeerInfo};
use causeway_overlay::ports::{ServerStream, Source};
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

use crate::http::balance::{Answer, Choice};
use crate::http::routes::{Fault, HeaderChanges, Mirror, Retries};
use crate::policy::{Enforcer, HttpSubject, Subject};
use crate::rules::Rules;

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
struct RetryBudget {
    since: Instant,
    requests: u32,
    retries: u32,
}

impl RetryBudget {
    fn roll(&mut self) {
        if self.since.elapsed() >= RETRY_WINDOW {
            *self = RetryBudget { since: Instant::now(), requests: 0, retries: 0 };
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

mod access;
pub mod balance;
mod body;
mod inbound;
mod options;
mod outbound;
mod respond;
pub mod routes;
mod tunnel;

use self::access::*;
pub use self::body::ChanBody;
use self::body::*;
use self::inbound::*;
pub use self::options::{HttpOptions, LbPolicy};
use self::outbound::*;
use self::respond::*;

/// The gateway's HTTP side: routes for the source, an endpoint client for the destination.
type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, ChanBody>;

pub struct Http {
    mesh: Mesh,
    /// Pooled HTTP/1.1 connections to endpoints ...
    client: Client,
    /// ... and HTTP/2 (h2c, prior knowledge) for `http2`/`grpc` exports.
    client_h2: Client,
    budgets: std::sync::Mutex<std::collections::HashMap<String, RetryBudget>>,
    balancer: crate::http::balance::Balancer,
    /// Requests to each service's endpoints in progress (the `max_requests` breaker).
    active: Arc<std::sync::Mutex<std::collections::HashMap<ServiceName, u32>>>,
    /// Endpoint connections in use and requests waiting for one (`max_connections`, `max_pending`).
    slots: Arc<std::sync::Mutex<std::collections::HashMap<ServiceName, SlotState>>>,
    /// The rules in force (routes, endpoint options, who may call our exports, rate limits):
    /// each request loads them once.
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
struct InFlight(Arc<std::sync::Mutex<std::collections::HashMap<ServiceName, u32>>>, ServiceName, metrics::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
        self.2.decrement(1.0);
    }
}

impl Http {
    /// `outlier_ejection`: the first ejection of an endpoint that failed 5 times in a row (the
    /// n-th lasts n times it).
    pub fn new(mesh: Mesh, outlier_ejection: Duration, policy: Arc<crate::policy::Enforcer>) -> Arc<Self> {
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
        let balancer = crate::http::balance::Balancer::new(outlier_ejection);
        Arc::new(Self {
            mesh,
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
    pub async fn serve_listener_conn(self: Arc<Self>, tcp: TcpStream, service: ServiceName, source: Source) {
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

    /// Drops the balancer state of endpoints no longer configured (after a reload).
    pub fn retain_endpoints(&self, endpoints: &[std::net::SocketAddr]) {
        self.balancer.retain(endpoints);
    }
}

impl HttpHandler for Http {
    fn serve(
        self: Arc<Self>,
        req: Request<()>,
        stream: ServerStream,
        from: PeerInfo,
    ) -> Pin<Box<dyn std::future::Future<Output = StreamEnd> + Send + 'static>> {
        let span = request_span("inbound", req.uri().host().unwrap_or(""), &req);
        Box::pin(async move { self.serve_peer_request(req, stream, from).await }.instrument(span))
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
