//! HTTP services across zones: each request of an `http` import crosses the overlay as its own
//! HTTP/3 request, routed by header to a subset (the classic `end-user: jason` → reviews v2) or
//! split by weight. Real programs at both ends: curl as the client, Python's `http.server` as the
//! backends.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::process::Command;

use causeway_tests::web::{py_server, start_yaml, two_zone_mesh, PyServer};
use causeway_tests::*;

/// An HTTP/1.1 backend answering `GET` with its version and `POST` with its version and the body.
/// Modes: `ok`; `fail-first` (the first request gets 503); `fail-all` (every request 503);
/// `slow` (answers after 3 s). `/count` answers how many requests it saw before.
const BACKEND_PY: &str = r#"
import http.server, sys, threading, time
version, mode = sys.argv[1], sys.argv[2]
seen = [0]
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def reply(self, body):
        with lock:
            seen[0] += 1
            n = seen[0]
        if self.path == "/count":
            n = -1
            body = (str(seen[0] - 1) + "\n").encode()
        if mode == "slow":
            time.sleep(3)
        if mode == "delay50":
            time.sleep(0.05)
        status = 503 if (mode == "fail-all" or (mode == "fail-first" and n == 1)) and n != -1 else 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Version", version)
        self.send_header("X-Saw-Identity", self.headers.get("causeway-source-identity", "none"))
        self.send_header("X-Echo-Route", self.headers.get("x-route", "none"))
        self.send_header("Server", "backend")
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply((version + "\n").encode())
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.reply(version.encode() + b":" + self.rfile.read(n))
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

fn backend(version: &str) -> PyServer {
    backend_mode(version, "ok")
}

fn backend_mode(version: &str, mode: &str) -> PyServer {
    py_server(BACKEND_PY, &[version, mode])
}

/// `n` GET requests with curl (one process, one kept-alive connection); the bodies in order.
fn curl_many(url: &str, n: usize, headers: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    for _ in 0..n {
        cmd.arg(url);
    }
    let out = cmd.output().expect("curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Zone a imports `reviews.shop` as `http` with `routes`; zone east exports it as v1, west as v2.
async fn reviews_mesh(routes: &str) -> (TestMesh, SocketAddr, Vec<PyServer>) {
    reviews_mesh_with(routes, backend("v1"), backend("v2")).await
}

async fn reviews_mesh_with(routes: &str, v1: PyServer, v2: PyServer) -> (TestMesh, SocketAddr, Vec<PyServer>) {
    init();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("reviews.shop", vec![])] },
            ZoneSpec { zone: "east", exports: vec![("reviews.shop", vec![v1.addr])], imports: vec![] },
            ZoneSpec { zone: "west", exports: vec![("reviews.shop", vec![v2.addr])], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    m.specs[0].extra = routes.to_string();
    for (i, version) in [(1, "v1"), (2, "v2")] {
        m.specs[i].extra = String::new();
        let spec = &m.specs[i];
        let yaml = spec.yaml().replace(
            "{ name: reviews.shop,",
            &format!("{{ name: reviews.shop, protocol: http, labels: {{ version: {version} }},"),
        );
        m.gateways[i] = Some(start_yaml(&m, i, &yaml).await);
    }
    let yaml = m.specs[0].yaml().replace("{ service: reviews.shop,", "{ service: reviews.shop, protocol: http,");
    m.gateways[0] = Some(start_yaml(&m, 0, &yaml).await);
    assert!(m.wait_routes(0, "reviews.shop", 2).await, "a never learned both zones");
    let listen = m.gw(0).import_addr("reviews.shop").unwrap();
    (m, listen, vec![v1, v2])
}

const BY_USER: &str = "http_routes:
  - name: reviews-by-user
    service: reviews.shop
    rules:
      - matches: [{ headers: { end-user: jason } }]
        backends: [{ subset: { version: v2 } }]
      - backends: [{ subset: { version: v1 } }]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_jason_reach_v2_in_another_zone_and_all_others_v1() {
    let (m, listen, _backends) = reviews_mesh(BY_USER).await;
    let url = format!("http://{listen}/reviews/1");
    let jason = tokio::task::spawn_blocking({
        let url = url.clone();
        move || curl_many(&url, 100, &["end-user: jason"])
    })
    .await
    .unwrap();
    assert_eq!(jason.len(), 100);
    assert!(jason.iter().all(|b| b == "v2"), "{jason:?}");
    let others = tokio::task::spawn_blocking(move || curl_many(&url, 100, &["end-user: someone-else"])).await.unwrap();
    assert_eq!(others.len(), 100);
    assert!(others.iter().all(|b| b == "v1"), "{others:?}");

    // Metrics by route, serving zone and status; one access-log line per request.
    let t = m.gw(0).metrics_text();
    let count = |zone: &str| {
        metric(&t, "causeway_http_requests_total", &[("route", "reviews-by-user"), ("zone", zone), ("code", "200")])
    };
    assert_eq!(count("west"), Some(100.0), "{t}");
    assert_eq!(count("east"), Some(100.0), "{t}");
    // The destination writes its line once the response is through, which may be just after the
    // client has it.
    let west_inbound = || {
        access_log()
            .iter()
            .filter(|l| l.get("direction") == "inbound" && l.get("zone") == "west" && l.get("path") == "/reviews/1")
            .count()
    };
    assert!(eventually(std::time::Duration::from_secs(5), || west_inbound() == 100).await, "{}", west_inbound());
    // (Lines of the other test in this binary are told apart by route and path.)
    let out = access_lines(200, |l| l.get("direction") == "outbound" && l.get("route") == "reviews-by-user").await;
    assert_eq!(out.len(), 200);
    assert!(out.iter().all(|l| l.get("outcome") == "complete" && l.get("bytes_down") == "3"), "{:?}", out[0]);
    let lines: Vec<_> = access_log().into_iter().filter(|l| l.get("kind") == "http").collect();
    let inbound_west: Vec<_> = lines
        .iter()
        .filter(|l| l.get("direction") == "inbound" && l.get("zone") == "west" && l.get("path") == "/reviews/1")
        .collect();
    assert_eq!(inbound_west.len(), 100);
    assert!(inbound_west.iter().all(|l| l.get("source_identity") == m.ids[0].as_str() && l.get("status") == "200"));
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ninety_ten_split_lands_within_binomial_bounds_and_bodies_cross_intact() {
    let split = "http_routes:
  - name: canary
    service: reviews.shop
    rules:
      - backends: [{ subset: { version: v1 }, weight: 90 }, { subset: { version: v2 }, weight: 10 }]
";
    let (m, listen, _backends) = reviews_mesh(split).await;
    let url = format!("http://{listen}/");
    let bodies = tokio::task::spawn_blocking(move || curl_many(&url, 2000, &[])).await.unwrap();
    assert_eq!(bodies.len(), 2000);
    let v2 = bodies.iter().filter(|b| *b == "v2").count();
    let v1 = bodies.iter().filter(|b| *b == "v1").count();
    assert_eq!(v1 + v2, 2000);
    // Binomial(2000, 0.1): mean 200, sd 13.4; 99.9 % of runs land within ±3.29 sd.
    eprintln!("90/10 split over 2000 requests: {v1} to v1, {v2} to v2");
    assert!((156..=244).contains(&v2), "{v2} of 2000 went to the 10 % subset");

    // A POST body crosses to the endpoint and back; a client cannot forge the identity header.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "-", "-H", "causeway-source-identity: spiffe://evil/x"])
        .args(["--data-binary", "hello across zones", &format!("http://{listen}/post")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.ends_with(":hello across zones"), "{text}");
    assert!(!text.contains("spiffe://evil"), "the forged identity reached the backend: {text}");
    m.shutdown().await;
}

/// One request with curl: (status, body).
fn curl_one(args: &[&str]) -> (u16, String) {
    let out =
        Command::new("curl").args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"]).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_recover_a_failed_attempt_spare_posts_and_stay_within_the_budget() {
    let routes = "http_routes:
  - name: retrying
    service: reviews.shop
    rules:
      - matches: [{ path: { prefix: /flaky } }]
        backends: [{ subset: { version: v1 } }]
        retries: { attempts: 3, on: [5xx] }
      - backends: [{ subset: { version: v2 } }]
        retries: { attempts: 3, on: [5xx] }
";
    // v1 fails its first request; v2 fails every request.
    let (m, listen, _b) =
        reviews_mesh_with(routes, backend_mode("v1", "fail-first"), backend_mode("v2", "fail-all")).await;
    let base = format!("http://{listen}");
    let (code, body) = {
        let u = format!("{base}/flaky");
        tokio::task::spawn_blocking(move || curl_one(&[&u])).await.unwrap()
    };
    assert_eq!((code, body.trim()), (200, "v1"), "the retried request");
    let t = m.gw(0).metrics_text();
    assert_eq!(metric(&t, "causeway_http_retries_total", &[("route", "retrying"), ("result", "retried")]), Some(1.0));
    let line = access_lines(1, |l| l.get("path") == "/flaky" && l.get("direction") == "outbound").await;
    assert_eq!(line[0].get("attempts"), "2");

    // A POST is not retried (not idempotent): v2's 503 reaches the client after one attempt.
    let (code, _) = {
        let u = format!("{base}/post-once");
        tokio::task::spawn_blocking(move || curl_one(&["--data-binary", "x", &u])).await.unwrap()
    };
    assert_eq!(code, 503);
    // (The destination's inbound line may be written first: the source's outbound one counts.)
    let line = access_lines(1, |l| l.get("path") == "/post-once" && l.get("direction") == "outbound").await;
    assert_eq!(line[0].get("attempts"), "1");

    // Every request failing: 100 requests may add at most 3 + 20 % retries in the window.
    let u = format!("{base}/always");
    tokio::task::spawn_blocking(move || curl_many(&u, 100, &[])).await.unwrap();
    let t = m.gw(0).metrics_text();
    let retried = metric(&t, "causeway_http_retries_total", &[("route", "retrying"), ("result", "retried")]).unwrap();
    let exhausted = metric(&t, "causeway_http_retries_total", &[("result", "budget_exhausted")]).unwrap_or(0.0);
    eprintln!("100 always-failing requests: {} retries, {exhausted} refused by the budget", retried - 1.0);
    assert!(retried - 1.0 <= 3.0 + 0.2 * 102.0, "{retried} retries: a storm");
    assert!(exhausted > 0.0, "the budget never applied");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_slower_than_the_route_timeout_gets_a_504_well_before_it_answers() {
    let routes = "http_routes:
  - name: bounded
    service: reviews.shop
    rules:
      - backends: [{ subset: { version: v1 } }]
        timeout: 500ms
";
    let (m, listen, _b) = reviews_mesh_with(routes, backend_mode("v1", "slow"), backend("v2")).await;
    let u = format!("http://{listen}/slow");
    let started = std::time::Instant::now();
    let (code, body) = tokio::task::spawn_blocking(move || curl_one(&[&u])).await.unwrap();
    let took = started.elapsed();
    assert_eq!(code, 504, "{body}");
    assert!(took < std::time::Duration::from_millis(2500), "504 after {took:?} (the backend answers after 3 s)");
    assert_eq!(body.trim(), "backend_timeout");
    m.shutdown().await;
}

/// Zone a imports `reviews.shop` as `http`; zone east exports it with `eps` (all `version: v1`)
/// and `extra` YAML; no west.
async fn one_zone_mesh(eps: Vec<SocketAddr>, extra_east: &str) -> (TestMesh, SocketAddr) {
    one_zone_mesh_with(eps, extra_east, "").await
}

/// [`one_zone_mesh`] with more fields for east's export (`max_requests: 2,`).
async fn one_zone_mesh_with(eps: Vec<SocketAddr>, extra_east: &str, fields: &str) -> (TestMesh, SocketAddr) {
    let fields = format!("protocol: http, labels: {{ version: v1 }}, {fields}");
    two_zone_mesh("reviews.shop", eps, &fields, "protocol: http,", extra_east).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_warm_up_most_requests_go_to_the_faster_endpoint() {
    let (fast, slow) = (backend("fast"), backend_mode("slow50", "delay50"));
    let (m, listen) = one_zone_mesh(vec![fast.addr, slow.addr], "").await;
    let url = format!("http://{listen}/");
    let bodies = tokio::task::spawn_blocking(move || curl_many(&url, 220, &[])).await.unwrap();
    assert_eq!(bodies.len(), 220);
    let after = &bodies[20..];
    let to_fast = after.iter().filter(|b| *b == "fast").count();
    eprintln!("P2C peak-EWMA: {to_fast} of {} requests to the endpoint 50 ms faster", after.len());
    assert!(to_fast * 100 >= after.len() * 80, "{to_fast} of {} to the fast endpoint", after.len());
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_five_times_in_a_row_is_ejected_and_comes_back() {
    // The failing endpoint answers fast (its 503s take no time) and the good one 50 ms later, so
    // the balancer prefers the failing one until it is ejected.
    let (good, bad) = (backend_mode("good", "delay50"), backend_mode("bad", "fail-all"));
    let (m, listen) = one_zone_mesh(vec![good.addr, bad.addr], "timing: { outlier_ejection: 2s }\n").await;
    let url = format!("http://{listen}/");
    let u = url.clone();
    let first = tokio::task::spawn_blocking(move || curl_many_codes(&u, 20)).await.unwrap();
    let failed = first.iter().filter(|c| *c == "503").count();
    // Five failures in a row, then ejected: every later request (~0.8 s of them) succeeds.
    assert_eq!(failed, 5, "{first:?}");
    let fifth = first.iter().enumerate().filter(|(_, c)| *c == "503").nth(4).map(|(i, _)| i).unwrap();
    assert!(first[fifth + 1..].iter().all(|c| c == "200"), "{first:?}");
    let t = m.gw(1).metrics_text();
    assert_eq!(metric(&t, "causeway_http_ejections_total", &[("service", "reviews.shop")]), Some(1.0), "{t}");
    // After its ejection time it gets requests again (and is ejected again after 5 more).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let again = tokio::task::spawn_blocking(move || curl_many_codes(&url, 10)).await.unwrap();
    assert!(again.iter().any(|c| c == "503"), "the ejected endpoint never came back: {again:?}");
    m.shutdown().await;
}

/// `n` GETs with curl, one connection; the status codes in order.
fn curl_many_codes(url: &str, n: usize) -> Vec<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "60", "-w", "%{http_code}\\n"]);
    for _ in 0..n {
        cmd.args(["-o", "/dev/null", url]);
    }
    let out = cmd.output().expect("curl");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_requests_the_breaker_answers_503_at_once() {
    let slow = backend_mode("slow", "slow");
    let (m, listen) = one_zone_mesh_with(vec![slow.addr], "", "max_requests: 2,").await;
    let url = format!("http://{listen}/slow");
    // Two requests in progress (the backend answers after 3 s)...
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let u = url.clone();
            tokio::task::spawn_blocking(move || curl_one(&[&u]))
        })
        .collect();
    let t = m.gw(1);
    assert!(
        eventually(std::time::Duration::from_secs(3), || {
            metric(&t.metrics_text(), "causeway_http_requests_active", &[("service", "reviews.shop")]) == Some(2.0)
        })
        .await,
        "the two requests never reached the endpoint"
    );
    // ...a third gets 503 naming the breaker at once.
    let started = std::time::Instant::now();
    let u = url.clone();
    let (code, body) = tokio::task::spawn_blocking(move || curl_one(&[&u])).await.unwrap();
    assert_eq!((code, body.trim()), (503, "circuit_open: max_requests"));
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "refused after {:?}", started.elapsed());
    let text = m.gw(1).metrics_text();
    assert_eq!(
        metric(&text, "causeway_http_circuit_open_total", &[("service", "reviews.shop"), ("breaker", "max_requests")]),
        Some(1.0)
    );
    for b in busy {
        assert_eq!(b.await.unwrap().0, 200);
    }
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_pending_the_breaker_answers_503_naming_it_at_once() {
    let slow = backend_mode("slow", "slow");
    let (m, listen) = one_zone_mesh_with(vec![slow.addr], "", "max_connections: 1, max_pending: 1,").await;
    let url = format!("http://{listen}/slow");
    let first = {
        let u = url.clone();
        tokio::task::spawn_blocking(move || curl_one(&[&u]))
    };
    let t = m.gw(1);
    let gauge = |name: &str| metric(&t.metrics_text(), name, &[("service", "reviews.shop")]);
    assert!(
        eventually(std::time::Duration::from_secs(3), || gauge("causeway_http_requests_active") == Some(1.0)).await,
        "the first request never reached the endpoint"
    );
    // The endpoint's one connection is taken: the second request waits for it...
    let second = {
        let u = url.clone();
        tokio::task::spawn_blocking(move || curl_one(&[&u]))
    };
    assert!(
        eventually(std::time::Duration::from_secs(3), || gauge("causeway_http_requests_pending") == Some(1.0)).await,
        "the second request never waited"
    );
    // ...and a third finds the queue full: 503 naming the breaker, while the first is still busy.
    let u = url.clone();
    let (code, body) = tokio::task::spawn_blocking(move || curl_one(&["-i", &u])).await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("causeway-breaker: max_pending"), "{body}");
    assert!(body.trim_end().ends_with("circuit_open: max_pending"), "{body}");
    assert!(!first.is_finished(), "the 503 came only after the first request finished");
    let text = t.metrics_text();
    assert_eq!(
        metric(&text, "causeway_http_circuit_open_total", &[("service", "reviews.shop"), ("breaker", "max_pending")]),
        Some(1.0)
    );
    // The waiting request is served once the connection is free; both succeed.
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(second.await.unwrap().0, 200);
    assert_eq!(gauge("causeway_http_requests_pending"), Some(0.0));
    m.shutdown().await;
}

/// Every request to one subset: blue (v1, zone east) or green (v2, zone west).
fn all_to(version: &str) -> String {
    format!(
        "http_routes:
  - name: blue-green
    service: reviews.shop
    rules:
      - backends: [{{ subset: {{ version: {version} }} }}]
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_blue_to_green_by_reload_under_wrk_loses_nothing() {
    let (mut m, listen, _backends) = reviews_mesh(&all_to("v1")).await;
    let url = format!("http://{listen}/flip");
    let wrk = std::thread::spawn(move || {
        Command::new("wrk").args(["-t", "1", "-c", "4", "-d", "4s", "--timeout", "2s", &url]).output().unwrap()
    });
    // Flip once blue has served under the load.
    let east = m.gw(1);
    let served = |gw: &causeway::Gateway| {
        metric(&gw.metrics_text(), "causeway_http_requests_total", &[("route", "inbound"), ("code", "200")])
            .unwrap_or(0.0)
    };
    assert!(eventually(std::time::Duration::from_secs(3), || served(east) >= 50.0).await, "blue never got load");
    m.specs[0].extra = all_to("v2");
    let yaml = m.specs[0].yaml().replace("{ service: reviews.shop,", "{ service: reviews.shop, protocol: http,");
    let path = m.pki.dir.join("a-flip.yaml");
    std::fs::write(&path, yaml).unwrap();
    let cfg = causeway::config::load(&path).unwrap();
    let r = m.gw(0).reload(&cfg).await.unwrap();
    assert!(r.http_routes_changed);
    let blue_at_flip = served(m.gw(1));
    let out = tokio::task::spawn_blocking(move || wrk.join().unwrap()).await.unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "wrk: {report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!report.contains("Non-2xx"), "{report}");
    assert!(!report.contains("Socket errors"), "{report}");
    let (blue, green) = (served(m.gw(1)), served(m.gw(2)));
    eprintln!("blue → green under wrk: blue {blue}, green {green} requests\n{report}");
    // Green took the load after the flip; blue got at most the requests already routed.
    assert!(green >= 50.0, "green served {green}");
    assert!(blue - blue_at_flip <= 8.0, "blue served {} after the flip", blue - blue_at_flip);
    let after = curl_many(&format!("http://{listen}/"), 5, &[]);
    assert_eq!(after, vec!["v2"; 5]);
    // Both ends' metrics after HTTP load (request histograms, policy, breakers) pass promtool.
    for i in 0..3 {
        let findings = causeway_tests::prometheus::check_metrics(&m.gw(i).metrics_text()).unwrap();
        assert!(findings.is_empty(), "promtool check metrics on gateway {i}:\n{findings}");
    }
    assert!(m.gw(0).metrics_text().contains("causeway_http_request_duration_seconds_bucket{"));
    m.shutdown().await;
}

/// An HTTP/3 client written with aioquic (an independent HTTP/3 and QUIC stack):
/// `host port ca cert key authority requests-json gateway-id`; `cert` `-` sends no certificate.
/// Each request is `[method, path, body, {header: value}]`; prints the responses (or the error)
/// as JSON. It authenticates the gateway the SPIFFE way: the chain to the mesh CA and the
/// certificate's SPIFFE ID (there is no host name to check).
const H3_CLIENT_PY: &str = r#"
import asyncio, json, sys
import aioquic.tls as tls
from cryptography import x509
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
host, port, ca, cert, key, authority = sys.argv[1], int(sys.argv[2]), *sys.argv[3:7]
requests, gateway_id = json.loads(sys.argv[7]), sys.argv[8]
chain_check = tls.verify_certificate
def spiffe_check(**kw):
    kw["server_name"] = None
    chain_check(**kw)
    san = kw["certificate"].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [gateway_id]:
        raise tls.AlertBadCertificate("server is %r, not %r" % (uris, gateway_id))
tls.verify_certificate = spiffe_check
class Client(QuicConnectionProtocol):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.h3 = H3Connection(self._quic)
        self.waiters, self.results = {}, {}
    def quic_event_received(self, event):
        for e in self.h3.handle_event(event):
            r = self.results.setdefault(e.stream_id, {"headers": {}, "body": b""})
            if isinstance(e, HeadersReceived):
                r["headers"].update({k.decode(): v.decode() for k, v in e.headers})
            elif isinstance(e, DataReceived):
                r["body"] += e.data
            if getattr(e, "stream_ended", False) and e.stream_id in self.waiters:
                self.waiters.pop(e.stream_id).set_result(r)
    async def request(self, method, path, body, extra):
        sid = self._quic.get_next_available_stream_id()
        headers = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", authority.encode()),
                   (b":path", path.encode())] + [(k.encode(), v.encode()) for k, v in extra.items()]
        if body:
            headers.append((b"content-length", str(len(body.encode())).encode()))
        self.h3.send_headers(sid, headers, end_stream=not body)
        if body:
            self.h3.send_data(sid, body.encode(), end_stream=True)
        fut = asyncio.get_running_loop().create_future()
        self.waiters[sid] = fut
        self.transmit()
        return await asyncio.wait_for(fut, 5)
async def main():
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    cfg.load_verify_locations(ca)
    if cert != "-":
        cfg.load_cert_chain(cert, key)
    out = []
    try:
        async with connect(host, port, configuration=cfg, create_protocol=Client) as c:
            for m, p, b, h in requests:
                r = await c.request(m, p, b, h)
                out.append({"status": int(r["headers"].get(":status", 0)), "body": r["body"].decode(errors="replace")})
    except Exception as e:
        out.append({"error": "%s: %s" % (type(e).__name__, e)})
    print(json.dumps(out))
asyncio.run(asyncio.wait_for(main(), 20))
"#;

/// Runs [`H3_CLIENT_PY`] against `gateway` with `creds` (cert, key; `None`: no certificate).
async fn h3_client(
    gateway: SocketAddr,
    gateway_id: &causeway_protocol::Identity,
    ca: &std::path::Path,
    creds: Option<(std::path::PathBuf, std::path::PathBuf)>,
    requests: serde_json::Value,
) -> serde_json::Value {
    let (cert, key) =
        creds.map(|(c, k)| (c.display().to_string(), k.display().to_string())).unwrap_or(("-".into(), "-".into()));
    let args = [
        gateway.ip().to_string(),
        gateway.port().to_string(),
        ca.display().to_string(),
        cert,
        key,
        "reviews.shop".to_string(),
        requests.to_string(),
        gateway_id.to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg("-c").arg(H3_CLIENT_PY).args(&args).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "aioquic client: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aioquic_client_with_a_mesh_certificate_is_routed_and_others_are_refused() {
    // Its own route name and paths: the access log is shared with the other tests of this binary.
    let routes = BY_USER.replace("reviews-by-user", "reviews-h3");
    let extra = format!("{routes}http3_clients:\n  - {{ id_prefix: \"spiffe://{TRUST_DOMAIN}/ns/shop/\" }}\n");
    let (m, _listen, _backends) = reviews_mesh(&extra).await;
    let gateway = m.addrs[0];
    let id = causeway_protocol::Identity::parse(&format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend")).unwrap();
    let validity = Validity::for_duration(std::time::Duration::from_secs(3600));
    let (cert, key, ca) = m.pki.issue("frontend", &id, validity).unwrap();
    let requests = serde_json::json!([
        ["GET", "/h3/1", "", {}],
        ["GET", "/h3/1", "", { "end-user": "jason" }],
        ["POST", "/h3", "five stars", {}],
    ]);
    let r = h3_client(gateway, &m.ids[0], &ca, Some((cert, key)), requests.clone()).await;
    let got: Vec<(u64, &str)> = r
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["status"].as_u64().unwrap_or(0), x["body"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(got, vec![(200, "v1\n"), (200, "v2\n"), (200, "v1:five stars")], "{r}");
    // Routed like any other request, under the client's own identity, at both ends.
    let mine = |l: &AccessLine| l.get("source_identity") == id.as_str();
    let out = access_lines(3, |l| mine(l) && l.get("direction") == "outbound").await;
    let lines: Vec<_> = access_lines(6, mine).await;
    assert_eq!(out.len(), 3, "{lines:?}");
    assert!(out.iter().all(|l| l.get("client_protocol") == "HTTP/3.0"), "{out:?}");
    assert!(out.iter().all(|l| l.get("route") == "reviews-h3"), "{out:?}");
    assert_eq!(lines.iter().filter(|l| l.get("direction") == "inbound").count(), 3, "{lines:?}");
    let t = m.gw(0).metrics_text();
    assert_eq!(metric(&t, "causeway_http3_clients_connected", &[]), Some(0.0), "{t}");

    // Without a certificate, or with one from a foreign CA: refused in the handshake.
    // (aioquic does not notice the close of a handshake it thinks complete: its request times out.)
    let none = h3_client(gateway, &m.ids[0], &ca, None, requests.clone()).await;
    assert!(none[0]["error"].is_string(), "no certificate: {none}");
    let foreign = causeway::demo::Pki::new(TRUST_DOMAIN).unwrap();
    let (fcert, fkey, _) = foreign.issue("frontend", &id, validity).unwrap();
    let forged = h3_client(gateway, &m.ids[0], &ca, Some((fcert, fkey)), requests).await;
    assert!(forged[0]["error"].is_string(), "foreign CA: {forged}");
    let t = m.gw(0).metrics_text();
    for reason in ["no_certificate", "unknown_ca"] {
        assert_eq!(metric(&t, "causeway_peer_handshake_failures_total", &[("reason", reason)]), Some(1.0), "{t}");
    }
    assert_eq!(metric(&t, "causeway_http_requests_total", &[("service", "reviews.shop")]), Some(3.0), "{t}");
    m.shutdown().await;
}

const MATCHERS: &str = "http_routes:
  - name: matchers
    service: reviews.shop
    rules:
      - matches: [{ path: { regex: \"/items/[0-9]+\" }, query: { canary: \"1\" } }]
        backends: [{ subset: { version: v2 } }]
        request_headers: { set: { x-route: canary } }
        response_headers: { set: { x-served-by: mesh }, remove: [server] }
      - matches: [{ headers: { x-user: { regex: \"test-.*\" } } }]
        backends: [{ subset: { version: v2 } }]
      - backends: [{ subset: { version: v1 } }]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_query_and_header_matches_pick_subsets_and_rules_change_headers() {
    let (m, listen, _backends) = reviews_mesh(MATCHERS).await;
    let get = move |path: &str, headers: &[&str]| {
        let mut args = vec!["-i".to_string()];
        for h in headers {
            args.extend(["-H".to_string(), h.to_string()]);
        }
        args.push(format!("http://{listen}{path}"));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl_one(&refs)
    };
    let cases: [(&str, &[&str], &str); 6] = [
        ("/items/12?canary=1", &[], "v2"),
        ("/items/12?x=y&canary=1", &[], "v2"),
        ("/items/12x?canary=1", &[], "v1"), // the regex matches the whole path
        ("/items/12", &[], "v1"),
        ("/other", &["x-user: test-7"], "v2"),
        ("/other", &["x-user: prod-7"], "v1"),
    ];
    let results = tokio::task::spawn_blocking(move || {
        cases.iter().map(|(p, h, want)| (p.to_string(), get(p, h), *want)).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (path, (code, text), want) in &results {
        assert_eq!(*code, 200, "{path}: {text}");
        assert!(text.trim_end().ends_with(want), "{path} should reach {want}: {text}");
    }
    // The canary rule's header changes: the endpoint saw x-route, the client got x-served-by and
    // no Server header; other rules change nothing.
    let canary = &results[0].1 .1.to_ascii_lowercase();
    assert!(canary.contains("x-echo-route: canary") && canary.contains("x-served-by: mesh"), "{canary}");
    assert!(!canary.contains("\nserver:"), "{canary}");
    let plain = &results[3].1 .1.to_ascii_lowercase();
    assert!(plain.contains("x-echo-route: none") && plain.contains("\nserver: backend"), "{plain}");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_aborts_a_share_and_delays_requests() {
    let routes = "http_routes:
  - name: drill
    service: reviews.shop
    rules:
      - matches: [{ path: { prefix: /slow } }]
        backends: [{ subset: { version: v1 } }]
        fault: { delay: { percent: 100, duration: 300ms } }
      - backends: [{ subset: { version: v1 } }]
        fault: { abort: { percent: 50, status: 418 } }
";
    let (m, listen, _backends) = reviews_mesh(routes).await;
    let url = format!("http://{listen}/drill");
    let codes = tokio::task::spawn_blocking(move || curl_many_codes(&url, 400)).await.unwrap();
    let aborted = codes.iter().filter(|c| *c == "418").count();
    let served = codes.iter().filter(|c| *c == "200").count();
    // Binomial(400, 0.5): 99.9 % of runs land within ±3.29 σ = ±33.
    assert_eq!(aborted + served, 400, "{codes:?}");
    assert!((167..=233).contains(&aborted), "{aborted} of 400 aborted");
    let t = m.gw(0).metrics_text();
    let faults = |kind: &str| metric(&t, "causeway_http_faults_total", &[("route", "drill"), ("kind", kind)]);
    assert_eq!(faults("abort"), Some(aborted as f64), "{t}");
    // The aborted requests never reached the endpoint: the destination saw only the served ones
    // (it counts each once its response is through, a moment after the client has it).
    let dest = || metric(&m.gw(1).metrics_text(), "causeway_http_requests_total", &[("route", "inbound")]);
    assert!(eventually(std::time::Duration::from_secs(5), || dest() == Some(served as f64)).await, "{:?}", dest());
    let url = format!("http://{listen}/slow");
    let started = std::time::Instant::now();
    let (code, body) = tokio::task::spawn_blocking(move || curl_one(&[&url])).await.unwrap();
    assert_eq!((code, body.trim()), (200, "v1"));
    assert!(started.elapsed() >= std::time::Duration::from_millis(300), "not delayed: {:?}", started.elapsed());
    assert_eq!(faults("delay"), None, "counted before the delay test ran");
    assert_eq!(
        metric(&m.gw(0).metrics_text(), "causeway_http_faults_total", &[("route", "drill"), ("kind", "delay")]),
        Some(1.0)
    );
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_copies_requests_to_the_shadow_subset_and_drops_its_answers() {
    let routes = "http_routes:
  - name: shadow
    service: reviews.shop
    rules:
      - backends: [{ subset: { version: v1 } }]
        mirror: { subset: { version: v2 } }
";
    let (m, listen, backends) = reviews_mesh(routes).await;
    let url = format!("http://{listen}/mirrored");
    let bodies = tokio::task::spawn_blocking(move || curl_many(&url, 20, &[])).await.unwrap();
    assert_eq!(bodies, vec!["v1"; 20], "the client saw only the real backend");
    // The shadow (v2, in zone west) got a copy of each.
    let v2 = format!("http://{}/count", backends[1].addr);
    let seen = move || curl_many(&v2, 1, &[]).first().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    let mut copies = 0;
    for _ in 0..50 {
        copies = tokio::task::spawn_blocking(seen.clone()).await.unwrap();
        if copies >= 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(copies, 20);
    let t = m.gw(0).metrics_text();
    let sent = [("route", "shadow"), ("result", "sent")];
    assert_eq!(metric(&t, "causeway_http_mirrors_total", &sent), Some(20.0), "{t}");
    assert!(access_log().iter().any(|l| l.get("route") == "shadow" && l.get("mirrored") == "true"));
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_takes_turns_and_a_hashed_header_keeps_its_endpoint() {
    let eps = [backend("e1"), backend("e2"), backend("e3")];
    let addrs: Vec<SocketAddr> = eps.iter().map(|b| b.addr).collect();
    let (m, listen) = one_zone_mesh_with(addrs.clone(), "", "load_balancer: { policy: round_robin },").await;
    let url = format!("http://{listen}/");
    let turns = tokio::task::spawn_blocking(move || curl_many(&url, 9, &[])).await.unwrap();
    let first: Vec<_> = turns[..3].to_vec();
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, ["e1", "e2", "e3"], "{turns:?}");
    assert_eq!(turns, [first.clone(), first.clone(), first].concat(), "not in turn");
    m.shutdown().await;

    let (m, listen) = one_zone_mesh_with(addrs, "", "load_balancer: { policy: hash, header: x-user },").await;
    let url = format!("http://{listen}/");
    let per_user = tokio::task::spawn_blocking(move || {
        (0..12).map(|u| curl_many(&url, 5, &[&format!("x-user: user-{u}")])).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for answers in &per_user {
        assert!(answers.iter().all(|a| *a == answers[0]), "one user, several endpoints: {answers:?}");
    }
    let mut used: Vec<_> = per_user.iter().map(|a| a[0].clone()).collect();
    used.sort();
    used.dedup();
    assert!(used.len() >= 2, "12 users all on {used:?}");
    m.shutdown().await;
}

/// Attempts a source gives up (`per_try_timeout` shorter than the service) are its clients' aborts,
/// not its own: the destination, whose answers then hit a stopped stream within a second of each
/// opening, must not throttle or close the peer for them (issue 17 item 4, the HTTP path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_abandoned_at_the_per_try_timeout_do_not_throttle_the_peer() {
    let routes = "http_routes:
  - name: impatient
    service: reviews.shop
    rules:
      - backends: [{ subset: { version: v1 } }]
        per_try_timeout: 20ms
";
    let (m, listen, _b) = reviews_mesh_with(routes, backend_mode("v1", "delay50"), backend("v2")).await;
    let abandoned =
        || metric(&m.gw(0).metrics_text(), "causeway_http_requests_total", &[("code", "504")]).unwrap_or(0.0);
    // At least two batches of the rule (2 × 500 streams), however slow the machine is today.
    let mut report = String::new();
    for _ in 0..10 {
        if abandoned() >= 1000.0 {
            break;
        }
        let url = format!("http://{listen}/");
        let out = tokio::task::spawn_blocking(move || {
            Command::new("wrk").args(["-t", "1", "-c", "16", "-d", "2s", "--timeout", "2s", &url]).output().unwrap()
        })
        .await
        .unwrap();
        report = String::from_utf8_lossy(&out.stdout).to_string();
    }
    let t = m.gw(1).metrics_text();
    eprintln!("per_try_timeout 20 ms on a 50 ms service: {} attempts abandoned\n{report}", abandoned());
    assert_eq!(metric(&t, "causeway_peer_throttles_total", &[]), None, "the honest peer was throttled:\n{t}");
    assert!(abandoned() >= 1000.0, "only {} attempts were abandoned: the test did not exercise the rule", abandoned());
    assert_eq!(metric(&t, "causeway_peer_abuse_closes_total", &[]), None);
    // The link is intact: a route without the impatient rule's deadline still answers.
    assert!(m.wait_routes(0, "reviews.shop", 2).await);
    m.shutdown().await;
}

/// One change of routes and policy together, as two snapshots: each route stamps its snapshot's
/// name on the request (`x-route`), and each policy admits only requests its own snapshot's route
/// stamped. A request that saw one snapshot's route with the other's policy is refused (403).
fn stamped(name: &str) -> String {
    format!(
        "http_routes:
  - name: stamp
    service: reviews.shop
    rules:
      - backends: [{{ subset: {{ version: v1 }} }}]
        request_headers: {{ set: {{ x-route: {name} }} }}
authorization:
  default_deny: true
  policies:
    - name: stamped-{name}
      service: reviews.shop
      action: allow
      rules:
        - to: {{ headers: {{ x-route: {name} }} }}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_policy_change_together_and_no_request_sees_half_of_a_change() {
    init();
    let v1 = backend("v1");
    let mut m = TestMesh::plan(
        vec![ZoneSpec {
            zone: "a",
            exports: vec![("reviews.shop", vec![v1.addr])],
            imports: vec![("reviews.shop", vec![])],
        }],
        "",
    )
    .unwrap();
    // Zone a serves its own import: the route, the policy and the endpoint are all one gateway's.
    let mut file = |name: &str| {
        m.specs[0].extra = stamped(name);
        m.specs[0]
            .yaml()
            .replace("{ name: reviews.shop,", "{ name: reviews.shop, protocol: http, labels: { version: v1 },")
            .replace("{ service: reviews.shop,", "{ service: reviews.shop, protocol: http,")
    };
    let (one, two) = (file("one"), file("two"));
    m.gateways[0] = Some(start_yaml(&m, 0, &one).await);
    assert!(m.wait_routes(0, "reviews.shop", 1).await, "a never routed to itself");
    let snapshot = |name: &str, yaml: &str| {
        let path = m.pki.dir.join(format!("a-{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        causeway::config::load(&path).unwrap()
    };
    let (one, two) = (snapshot("one", &one), snapshot("two", &two));
    let url = format!("http://{}/r", m.gw(0).import_addr("reviews.shop").unwrap());
    // Clients on two connections, while the snapshots alternate as fast as they apply.
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::task::spawn_blocking(move || {
                let mut cmd = Command::new("curl");
                cmd.args(["-sS", "--max-time", "60", "-w", "%{http_code} %header{x-echo-route}\\n"]);
                for _ in 0..600 {
                    cmd.args(["-o", "/dev/null", &url]);
                }
                let out = cmd.output().expect("curl");
                String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut swaps = 0u32;
    while !clients.iter().all(|c| c.is_finished()) {
        let next = if swaps.is_multiple_of(2) { &two } else { &one };
        let r = m.gw(0).reload(next).await.unwrap();
        assert!(r.http_routes_changed && r.authorization_changed, "{r:?}");
        swaps += 1;
        tokio::task::yield_now().await;
    }
    let mut seen = std::collections::BTreeMap::new();
    for c in clients {
        for line in c.await.unwrap() {
            *seen.entry(line).or_insert(0u32) += 1;
        }
    }
    // Every request was decided by one complete snapshot, and both snapshots decided some.
    let total: u32 = seen.values().sum();
    assert_eq!(total, 1200, "{seen:?}");
    assert!(seen.keys().all(|l| l == "200 one" || l == "200 two"), "after {swaps} swaps: {seen:?}");
    assert!(seen.len() == 2 && swaps >= 20, "after {swaps} swaps: {seen:?}");
    eprintln!("{swaps} swaps: {seen:?}");
    let t = m.gw(0).metrics_text();
    assert_eq!(metric(&t, "causeway_config_reloads_total", &[("result", "ok")]), Some(f64::from(swaps)), "{t}");
    m.shutdown().await;
}
