//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz`, `/ready`, `/peers`,
//! `/services`, `/topology.json`, `/policy/explain` and `/mesh` (JSON), `/topology` (a page), and
//! `POST /mesh/documents` (a signed mesh-wide document). Plain HTTP/1.1 on a local address; it
//! carries no secrets, and what it accepts is signed by a publisher (reaching it is not enough).

pub mod mesh;
pub mod topology;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use causeway_overlay::core::route_table::Target;
use causeway_overlay::Mesh;
use causeway_protocol::ServiceName;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Concurrent admin connections; scrapes and operators need few.
const MAX_CONNECTIONS: usize = 64;

#[derive(Clone)]
pub struct AdminState {
    /// The gateway's mesh; `None` for a redirector (no /peers, /services).
    pub mesh: Option<Mesh>,
    pub metrics: PrometheusHandle,
    pub ready: Arc<AtomicBool>,
    /// The running authorization (`/policy/explain`); `None` for a redirector.
    pub policy: Option<Arc<crate::policy::Enforcer>>,
}

pub struct Admin {
    listener: TcpListener,
    state: AdminState,
}

impl Admin {
    pub async fn bind(addr: SocketAddr, state: AdminState) -> std::io::Result<Self> {
        Ok(Self { listener: TcpListener::bind(addr).await?, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub async fn run(self, stop: CancellationToken) {
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.cancelled() => return,
            };
            let (tcp, _) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let state = self.state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
                drop(permit);
            });
        }
    }
}

fn respond(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// `POST /mesh/documents` reads its body (bounded); everything else is a `GET` answered at once.
async fn handle(state: &AdminState, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    match (req.method(), req.uri().path(), &state.mesh) {
        (&hyper::Method::POST, "/mesh/documents", Some(mesh)) => {
            let body = match http_body_util::Limited::new(req.into_body(), mesh::MAX_POST).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let v = json!({"result": "refused", "reason": "oversized", "detail": e.to_string()});
                    return respond(StatusCode::PAYLOAD_TOO_LARGE, "application/json", pretty(&v));
                }
            };
            let (code, v) = mesh::post_document(mesh, &body);
            respond(code, "application/json", pretty(&v))
        }
        (&hyper::Method::GET | &hyper::Method::HEAD, ..) => route(state, req),
        _ => respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n"),
    }
}

fn route(state: &AdminState, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    match req.uri().path() {
        "/mesh" if state.mesh.is_some() => {
            respond(StatusCode::OK, JSON, pretty(&state.mesh.as_ref().map(mesh::mesh_json).unwrap_or_default()))
        }
        "/metrics" => {
            state.metrics.run_upkeep();
            respond(StatusCode::OK, "text/plain; version=0.0.4", state.metrics.render())
        }
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/ready" => {
            if state.mesh.as_ref().is_some_and(|m| m.is_draining()) {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if state.ready.load(Ordering::Relaxed) {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting\n")
            }
        }
        "/peers" if state.mesh.is_some() => {
            respond(StatusCode::OK, JSON, pretty(&state.mesh.as_ref().map(peers_json).unwrap_or_default()))
        }
        "/services" if state.mesh.is_some() => {
            respond(StatusCode::OK, JSON, pretty(&state.mesh.as_ref().map(services_json).unwrap_or_default()))
        }
        "/topology" if state.mesh.is_some() => respond(StatusCode::OK, "text/html; charset=utf-8", topology::PAGE),
        "/topology.json" if state.mesh.is_some() => {
            respond(StatusCode::OK, JSON, pretty(&state.mesh.as_ref().map(topology::json).unwrap_or_default()))
        }
        "/policy/explain" => match (&state.mesh, &state.policy) {
            (Some(mesh), Some(policy)) => match explain(mesh, policy, req.uri().query().unwrap_or("")) {
                Ok(v) => respond(StatusCode::OK, JSON, pretty(&v)),
                Err(why) => respond(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n")),
            },
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not a gateway\n"),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /ready, /peers, /services, /topology, /policy/explain\n",
        ),
    }
}

/// Query parameters of `/policy/explain` (those of `causeway policy explain`), URL-encoded.
pub const EXPLAIN_PARAMS: [&str; 7] = ["service", "identity", "zone", "address", "port", "method", "path"];

/// `/policy/explain?service=…&identity=…[&zone=…&address=…&port=…&method=…&path=…]`: the running
/// policy's decision for that caller, nothing counted or logged.
fn explain(mesh: &Mesh, policy: &crate::policy::Enforcer, query: &str) -> Result<serde_json::Value, String> {
    use crate::policy::{HttpSubject, Subject};
    let mut q = std::collections::HashMap::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if !EXPLAIN_PARAMS.contains(&k.as_ref()) {
            return Err(format!("unknown parameter {k:?}: expected {}", EXPLAIN_PARAMS.join(", ")));
        }
        q.insert(k.into_owned(), v.into_owned());
    }
    let get = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let service = causeway_protocol::ServiceName::new(get("service").ok_or("service: required")?)
        .map_err(|e| format!("service: {e}"))?;
    let identity = causeway_protocol::Identity::parse(get("identity").ok_or("identity: required")?)
        .map_err(|e| format!("identity: {e}"))?;
    let addr = get("address").map(|a| a.parse().map_err(|e| format!("address: {e}"))).transpose()?;
    let port = match get("port") {
        Some(p) => Some(p.parse::<u16>().map_err(|e| format!("port: {e}"))?),
        None => mesh.export_port(&service),
    };
    let headers = http::HeaderMap::new();
    let path = get("path").unwrap_or("/");
    let s = Subject {
        service: Some(&service),
        identity: Some(&identity),
        zone: get("zone"),
        addr,
        port,
        http: get("method").map(|method| HttpSubject { method, path, headers: &headers }),
    };
    Ok(policy.explain(&s))
}

fn pretty(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// A minimal HTTP/1.1 GET for `causeway status` and tests: returns status and body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    request(addr, hyper::Method::GET, path, Bytes::new()).await
}

/// One admin request (`body` for a `POST`): status and body, within 10 s.
pub async fn request(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await??;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(body))?;
    let fut = async {
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), fut).await?
}
/// `/peers`: every configured peer, its state, RTT and catalog version.
pub fn peers_json(mesh: &Mesh) -> serde_json::Value {
    let peers: Vec<_> = mesh
        .peer_view()
        .into_iter()
        .map(|p| {
            json!({
                "id": p.spec.id.to_string(),
                "address": p.spec.address,
                "zone": p.zone.as_ref().or(p.spec.zone.as_ref()).map(|z| z.to_string()),
                "gateway": p.gateway.map(|g| g.to_string()),
                "state": p.state.as_str(),
                "rtt_ms": p.rtt.map(|r| r.as_secs_f64() * 1000.0),
                "catalog_version": p.catalog_version,
                "services": p.services,
                "dialed_by_us": p.dialed_by_us,
                "remote_address": p.remote_address.map(|a| a.to_string()),
                "open_flows": p.open_flows,
                "flows_total": p.flows_total,
                "path": p.path.map(|x| json!({
                    "rtt_ms": x.rtt.as_secs_f64() * 1000.0,
                    "min_rtt_ms": x.min_rtt.map(|r| r.as_secs_f64() * 1000.0),
                    "cwnd_bytes": x.cwnd,
                    "mtu": x.mtu,
                    "loss_ratio": x.loss_ratio,
                    "sent_packets": x.totals.sent_packets,
                    "lost_packets": x.totals.lost_packets,
                    "congestion_events": x.totals.congestion_events,
                    "sent_bytes": x.totals.sent_bytes,
                    "received_bytes": x.totals.received_bytes,
                    "migrations": x.migrations,
                })),
            })
        })
        .collect();
    json!({
        "zone": mesh.zone().to_string(),
        "gateway": mesh.gateway().to_string(),
        "identity": mesh.identity().to_string(),
        "peers": peers,
    })
}

/// `/services`: what each zone offers and where a new flow would go.
pub fn services_json(mesh: &Mesh) -> serde_json::Value {
    let (zone, gateway) = (mesh.zone().to_string(), mesh.gateway().to_string());
    mesh.with_routes(|routes| {
        let mut by_name: BTreeMap<&ServiceName, Vec<serde_json::Value>> = BTreeMap::new();
        for ad in routes.local() {
            by_name.entry(&ad.name).or_default().push(json!({
                "zone": zone, "gateway": gateway, "local": true, "state": "up",
                "protocol": ad.protocol.as_str(), "port": ad.port, "healthy_endpoints": ad.healthy_endpoints,
            }));
        }
        for (id, e) in routes.peers() {
            for ad in e.services.values() {
                by_name.entry(&ad.name).or_default().push(json!({
                    "zone": e.zone.as_ref().map(|z| z.to_string()), "gateway": e.gateway.as_ref().map(|g| g.to_string()),
                    "peer": id.to_string(), "local": false, "state": e.state.as_str(), "protocol": ad.protocol.as_str(),
                    "port": ad.port, "healthy_endpoints": ad.healthy_endpoints,
                    "rtt_ms": e.rtt.map(|r| r.as_secs_f64() * 1000.0),
                }));
            }
        }
        let services: Vec<_> = by_name
            .into_iter()
            .map(|(name, offers)| {
                let order: Vec<String> = routes
                    .candidates(name)
                    .into_iter()
                    .map(|t| match t {
                        Target::Local => "local".to_string(),
                        Target::Peer(id) => id.to_string(),
                    })
                    .collect();
                json!({ "name": name.to_string(), "offers": offers, "route_order": order })
            })
            .collect();
        json!({ "services": services })
    })
}
