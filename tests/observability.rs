//! Observability against real programs. OTLP trace export into `oteltest`'s OTLP/HTTP sink (PyPI),
//! which decodes the protobuf requests with the OpenTelemetry project's own generated types: a
//! request from zone `a` to a service in zone `east`, retried once, must arrive as one trace — a's
//! request span, one attempt span per try, and east's span of each try under the attempt that sent
//! it — with the attributes the access events carry; with the receiver gone, requests are
//! unaffected and the spans that could not be sent are counted. The access events match the
//! README's reference. Every query of the Grafana dashboard (`deploy/dashboards/causeway.json`)
//! returns data from a real Prometheus scraping a three-zone mesh under traffic.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use causeway_tests::web::{py_server, start_yaml, PyServer};
use causeway_tests::*;

/// Writes every span it receives as one JSON line to `argv[1]`: ids in hex, attributes flat.
const SINK_PY: &str = r#"
import json, logging, socket, sys
from oteltest.sink import HttpSink
from oteltest.sink.handler import RequestHandler
out = open(sys.argv[1], "a")
def value(v):
    k = v.WhichOneof("value")
    return getattr(v, k) if k else None
class Spans(RequestHandler):
    def handle_logs(self, request, headers): pass
    def handle_metrics(self, request, headers): pass
    def handle_trace(self, request, headers):
        for rs in request.resource_spans:
            resource = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.write(json.dumps({
                        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(), "name": s.name, "kind": s.kind,
                        "status": s.status.code, "resource": resource,
                        "attributes": {a.key: value(a.value) for a in s.attributes},
                    }) + "\n")
        out.flush()
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
sink = HttpSink(Spans(), logging.getLogger("sink"), port=port, daemon=False)
sink.start()
print(port, flush=True)
"#;

/// Answers 503 to its first request and 200 (`east`) to the others.
const FLAKY_PY: &str = r#"
import http.server
seen = [0]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        seen[0] += 1
        status = 503 if seen[0] == 1 else 200
        body = b"east\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

const TRACE: &str = "5b8aa5a2d2c872e8321cf37308d69df2";
const CLIENT_SPAN: &str = "051581bf3cb55c13";

#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    status: i64,
    attributes: HashMap<String, serde_json::Value>,
}

impl Span {
    fn attr(&self, k: &str) -> String {
        match self.attributes.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        }
    }
}

fn spans(file: &std::path::Path) -> Vec<Span> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| Span {
            trace_id: v["trace_id"].as_str().unwrap_or("").into(),
            span_id: v["span_id"].as_str().unwrap_or("").into(),
            parent: v["parent"].as_str().unwrap_or("").into(),
            name: v["name"].as_str().unwrap_or("").into(),
            status: v["status"].as_i64().unwrap_or(-1),
            attributes: v["attributes"].as_object().map(|o| o.clone().into_iter().collect()).unwrap_or_default(),
        })
        .collect()
}

fn curl(url: &str, headers: &[String]) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "/dev/null", "--max-time", "20", "-w", "%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_across_zones_is_one_trace_and_a_dead_receiver_costs_no_request() {
    let dir = causeway_tests::prometheus::tempdir::Dir::new("traces").unwrap();
    let file = dir.path().join("spans.jsonl");
    let sink: PyServer = py_server(SINK_PY, &[file.to_str().unwrap()]);
    let backend = py_server(FLAKY_PY, &[]);
    let tracing = format!("tracing: {{ otlp: {{ endpoint: \"http://{}/v1/traces\", timeout: 1s }} }}\n", sink.addr);
    let routes = "http_routes:
  - name: retrying
    service: reviews.shop
    rules:
      - backends: [{}]
        retries: { attempts: 3, on: [5xx] }
";
    init();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("reviews.shop", vec![])] },
            ZoneSpec { zone: "east", exports: vec![("reviews.shop", vec![backend.addr])], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    // Both gateways run in this process and share its one exporter (east's, started first).
    m.specs[1].extra = tracing.clone();
    let yaml = m.specs[1].yaml().replace("{ name: reviews.shop,", "{ name: reviews.shop, protocol: http,");
    m.gateways[1] = Some(start_yaml(&m, 1, &yaml).await);
    m.specs[0].extra = format!("{tracing}{routes}");
    let yaml = m.specs[0].yaml().replace("{ service: reviews.shop,", "{ service: reviews.shop, protocol: http,");
    m.gateways[0] = Some(start_yaml(&m, 0, &yaml).await);
    assert!(m.wait_routes(0, "reviews.shop", 1).await, "zone a never learned reviews.shop");
    let listen = m.gw(0).import_addr("reviews.shop").unwrap();
    let url = format!("http://{listen}/reviews/1");
    let parent = format!("traceparent: 00-{TRACE}-{CLIENT_SPAN}-01");
    let code = {
        let (u, p) = (url.clone(), parent.clone());
        tokio::task::spawn_blocking(move || curl(&u, &[p])).await.unwrap()
    };
    assert_eq!(code, 200, "the retried request");
    let ours = || spans(&file).into_iter().filter(|s| s.trace_id == TRACE).collect::<Vec<_>>();
    // a's request span, its two attempts, east's two request spans.
    assert!(eventually(Duration::from_secs(15), || ours().len() >= 5).await, "spans: {:?}", spans(&file));
    let all = ours();
    let by_name = |n: &str| all.iter().filter(|s| s.name == n).cloned().collect::<Vec<_>>();
    let outbound = by_name("http outbound reviews.shop");
    assert_eq!(outbound.len(), 1, "{all:#?}");
    let request = &outbound[0];
    assert_eq!(request.parent, CLIENT_SPAN, "parented on the client's traceparent");
    assert_eq!(request.attr("causeway.attempts"), "2");
    assert_eq!(request.attr("causeway.status"), "200");
    assert_eq!(request.attr("http.response.status_code"), "200");
    assert_eq!(request.attr("causeway.outcome"), "complete");
    assert_eq!(request.attr("causeway.source_zone"), "a");
    assert_eq!(request.attr("causeway.zone"), "east");
    assert_eq!(request.attr("causeway.route"), "retrying");
    assert_eq!(request.attr("http.request.method"), "GET");
    assert!(request.attr("causeway.source_identity").starts_with("spiffe://"), "{request:?}");
    assert!(request.attr("causeway.bytes_down") == "5", "{request:?}");
    let attempts: Vec<_> = all.iter().filter(|s| s.name.starts_with("attempt ")).cloned().collect();
    assert_eq!(attempts.len(), 2, "{all:#?}");
    assert!(attempts.iter().all(|a| a.parent == request.span_id), "attempts are the request's children");
    let mut results: Vec<String> = attempts.iter().map(|a| a.attr("causeway.outcome")).collect();
    results.sort();
    assert_eq!(results, ["200", "503"], "{attempts:#?}");
    let inbound = by_name("http inbound reviews.shop");
    assert_eq!(inbound.len(), 2, "{all:#?}");
    for s in &inbound {
        let attempt = attempts.iter().find(|a| a.span_id == s.parent);
        let attempt = attempt.unwrap_or_else(|| panic!("east's span {s:?} is no attempt's child"));
        assert_eq!(attempt.attr("causeway.outcome"), s.attr("causeway.status"), "{attempt:?} / {s:?}");
        assert_eq!(s.attr("causeway.zone"), "east");
        assert_eq!(s.attr("causeway.source_zone"), "a");
        assert_eq!(s.attr("causeway.policy"), "default");
        assert_eq!(s.attr("causeway.endpoint"), backend.addr.to_string());
        assert_eq!(s.attr("causeway.peer"), m.ids[0].to_string());
        assert_eq!(s.attr("causeway.source_identity"), request.attr("causeway.source_identity"));
    }
    let failed = inbound.iter().find(|s| s.attr("causeway.status") == "503").expect("the failed try");
    assert_eq!(failed.status, 2, "an error status (STATUS_CODE_ERROR) for the 503");

    // The receiver goes away: requests go on as before, the spans are dropped and counted.
    drop(sink);
    let ok = tokio::task::spawn_blocking(move || (0..20).filter(|_| curl(&url, &[]) == 200).count()).await.unwrap();
    assert_eq!(ok, 20, "requests with the receiver down");
    let dropped = || {
        let t = m.gw(1).metrics_text();
        metric(&t, "causeway_trace_spans_dropped_total", &[("reason", "export_failed")]).unwrap_or(0.0)
    };
    assert!(eventually(Duration::from_secs(15), || dropped() >= 1.0).await, "{}", m.gw(1).metrics_text());
    let exported = metric(&m.gw(1).metrics_text(), "causeway_trace_spans_exported_total", &[]).unwrap_or(0.0);
    assert!(exported >= 5.0, "exported {exported}");
    m.shutdown().await;
}

/// The README's access-event samples ("Access log"): per (kind, direction), its JSON line's fields
/// (less what the JSON formatter adds around an event).
fn readme_samples() -> Vec<(String, String, std::collections::BTreeSet<String>)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split("### Access log").nth(1).unwrap().split("\n### ").next().unwrap();
    section
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"target\":\"causeway::access\""))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("README sample {l}: {e}"));
            let o = v.as_object().unwrap();
            let keys = o
                .keys()
                .filter(|k| !matches!(k.as_str(), "timestamp" | "level" | "target" | "span" | "spans"))
                .cloned()
                .collect();
            (o["kind"].as_str().unwrap().to_string(), o["direction"].as_str().unwrap().to_string(), keys)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_events_of_flows_and_requests_match_the_readme_reference() {
    let samples = readme_samples();
    for (kind, direction) in [("flow", "outbound"), ("flow", "inbound"), ("http", "outbound"), ("http", "inbound")] {
        assert!(samples.iter().any(|s| s.0 == kind && s.1 == direction), "README has no {kind} {direction} sample");
    }
    // A TCP flow from a to b.
    let (m, listen) = echo_pair().await;
    let (echoed, _) = echo_flow(listen, b"hello").await.unwrap();
    assert_eq!(echoed, "b", "the banner (the echo is checked by echo_flow)");
    let flow = |direction: &'static str| {
        access_lines(1, move |l| {
            l.get("kind") == "flow" && l.get("service") == "echo.test" && l.get("direction") == direction
        })
    };
    let (out, inb) = (flow("outbound").await.remove(0), flow("inbound").await.remove(0));
    // An HTTP request from a to east.
    let backend = py_server(FLAKY_PY, &[]);
    let mut h = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("web.test", vec![])] },
            ZoneSpec { zone: "east", exports: vec![("web.test", vec![backend.addr])], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    let yaml = h.specs[1].yaml().replace("{ name: web.test,", "{ name: web.test, protocol: http,");
    h.gateways[1] = Some(start_yaml(&h, 1, &yaml).await);
    let yaml = h.specs[0].yaml().replace("{ service: web.test,", "{ service: web.test, protocol: http,");
    h.gateways[0] = Some(start_yaml(&h, 0, &yaml).await);
    assert!(h.wait_routes(0, "web.test", 1).await);
    let url = format!("http://{}/page", h.gw(0).import_addr("web.test").unwrap());
    // The flaky endpoint's first answer is its 503: a refused request, then a served one.
    let codes = tokio::task::spawn_blocking(move || [curl(&url, &[]), curl(&url, &[])]).await.unwrap();
    assert_eq!(codes, [503, 200]);
    let req = |direction: &'static str, status: &'static str| {
        access_lines(1, move |l| {
            l.get("kind") == "http"
                && l.get("service") == "web.test"
                && l.get("direction") == direction
                && l.get("status") == status
        })
    };
    let (h_out, h_in) = (req("outbound", "200").await.remove(0), req("inbound", "200").await.remove(0));
    // Every event carries exactly the README's fields for its kind and direction.
    for line in [&out, &inb, &h_out, &h_in] {
        let fields: std::collections::BTreeSet<String> = line.0.keys().cloned().collect();
        let (_, _, want) = samples.iter().find(|s| s.0 == line.get("kind") && s.1 == line.get("direction")).unwrap();
        assert_eq!(&fields, want, "{line:?}");
        assert_eq!(line.get("message"), "access");
        assert!(line.get("source_identity").starts_with("spiffe://"), "{line:?}");
        assert_eq!(line.get("source_zone"), "a", "{line:?}");
        assert_eq!(line.get("outcome"), "complete", "{line:?}");
    }
    // The source names where it went; the destination who came and what served it.
    assert_eq!((out.get("zone"), out.get("peer")), ("b", m.ids[1].as_str()));
    assert_eq!((inb.get("zone"), inb.get("peer")), ("b", m.ids[0].as_str()));
    assert_eq!(out.get("source_address"), inb.get("source_address"));
    assert!(!inb.get("endpoint").is_empty(), "{inb:?}");
    assert_eq!((out.get("bytes_up"), inb.get("bytes_up")), ("5", "5"));
    assert_eq!((out.get("bytes_down"), inb.get("bytes_down")), ("7", "7"));
    // The destination's span is a child of one of the source's attempts: same trace, new span.
    let trace = |l: &AccessLine| l.get("traceparent").split('-').nth(1).unwrap_or("").to_string();
    assert_eq!(trace(&out), trace(&inb));
    assert_ne!(out.get("traceparent"), inb.get("traceparent"));
    assert_eq!(inb.get("parent_span").len(), 16, "{inb:?}");
    assert_eq!((h_out.get("zone"), h_in.get("peer")), ("east", h.ids[0].as_str()));
    assert_eq!((h_out.get("method"), h_out.get("path"), h_out.get("route")), ("GET", "/page", "default"));
    assert_eq!((h_in.get("endpoint"), h_in.get("policy")), (backend.addr.to_string().as_str(), "default"));
    assert_eq!((h_out.get("bytes_down"), h_in.get("bytes_down")), ("5", "5"));
    // The refused request: the endpoint's 503 at the destination, relayed at the source.
    let refused = req("inbound", "503").await.remove(0);
    assert_eq!(refused.get("outcome"), "complete", "the endpoint answered: a response, not a refusal");
    h.shutdown().await;
    m.shutdown().await;
}

/// The dashboard's queries: (panel title, PromQL).
fn dashboard_queries() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/dashboards/causeway.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(d["uid"], "causeway-mesh");
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {} names its datasource by variable", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            out.push((p["title"].as_str().unwrap().to_string(), t["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_three_zone_mesh_under_traffic() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 18, "{queries:?}");
    init();
    let web = py_server(FLAKY_PY, &[]);
    let (echo_b, _) = echo_server("b".into()).await.unwrap();
    let (echo_c, _) = echo_server("c".into()).await.unwrap();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec {
                zone: "a",
                exports: vec![],
                imports: vec![("web.test", vec![]), ("echo.test", vec!["c", "b"]), ("secret.test", vec![])],
            },
            ZoneSpec {
                zone: "b",
                exports: vec![("web.test", vec![web.addr]), ("echo.test", vec![echo_b]), ("secret.test", vec![echo_b])],
                imports: vec![],
            },
            ZoneSpec { zone: "c", exports: vec![("echo.test", vec![echo_c])], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    // b: secret.test only for an identity a's clients do not have; web.test at 5 requests/s.
    m.specs[1].extra = "authorization:
  policies:
    - name: secret-callers
      service: secret.test
      action: allow
      rules:
        - from: { identities: [\"spiffe://test.causeway/ns/ops/sa/admin\"] }
rate_limits:
  - { name: web-limit, service: web.test, requests_per_second: 5 }
"
    .to_string();
    // c is over its memory budget (the test process alone is far above 16 MiB): it refuses every
    // new flow with 503 over_budget, and a — preferring c — fails over to b.
    m.specs[2].extra = "limits: { memory_budget: 16MiB }\n".to_string();
    let yaml = m.specs[1].yaml().replace("{ name: web.test,", "{ name: web.test, protocol: http,");
    m.gateways[1] = Some(start_yaml(&m, 1, &yaml).await);
    m.gateways[2] = Some(start_yaml(&m, 2, &m.specs[2].yaml()).await);
    let yaml = m.specs[0].yaml().replace("{ service: web.test,", "{ service: web.test, protocol: http,");
    m.gateways[0] = Some(start_yaml(&m, 0, &yaml).await);
    assert!(m.wait_routes(0, "echo.test", 2).await && m.wait_routes(0, "web.test", 1).await);
    let admins: Vec<_> = (0..3).map(|i| m.gw(i).admin_addr.unwrap()).collect();
    let prom = causeway_tests::prometheus::Prometheus::start(&admins).await.unwrap();
    let (web_at, echo_at, secret_at) = (
        m.gw(0).import_addr("web.test").unwrap(),
        m.gw(0).import_addr("echo.test").unwrap(),
        m.gw(0).import_addr("secret.test").unwrap(),
    );
    // Traffic while Prometheus scrapes: HTTP requests (some over the limit), TCP flows of 256 KiB
    // (enough packets for the loss windows), and calls the policy denies.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let url = format!("http://{web_at}/page");
                let _ = tokio::task::spawn_blocking(move || curl(&url, &[])).await;
                let _ = echo_flow(echo_at, &payload(256 << 10, i)).await;
                let _ = echo_flow(secret_at, b"let me in").await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut missing = queries.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        let mut left = Vec::new();
        for (title, q) in missing {
            match prom.query(&q).await {
                Ok(Some(v)) if v.is_finite() => {}
                _ => left.push((title, q)),
            }
        }
        missing = left;
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.await.unwrap();
    assert!(missing.is_empty(), "dashboard queries without data after 60 s: {missing:#?}");
    eprintln!("dashboard: all {} queries return data", queries.len());
    m.shutdown().await;
}

/// Loads `url` in headless Chromium (Debian's), lets its script run for `budget` of virtual time,
/// and returns the DOM; with `shot`, also writes a screenshot there.
fn chromium(url: &str, budget: Duration, shot: Option<&std::path::Path>) -> String {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1280,720",
    ])
    .arg(format!("--virtual-time-budget={}", budget.as_millis()));
    match shot {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().expect("chromium (Debian package `chromium`)");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `data-state` of the topology page's edge to `zone`, as its DOM shows it.
fn edge_state(dom: &str, zone: &str) -> Option<String> {
    dom.split("<g ").filter(|g| g.starts_with("class=\"edge\"")).find_map(|g| {
        let attr = |k: &str| g.split(&format!("{k}=\"")).nth(1).and_then(|r| r.split('"').next()).map(str::to_string);
        (attr("data-zone").as_deref() == Some(zone)).then(|| attr("data-state")).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_page_shows_the_zones_and_a_killed_gateways_edge_goes_down() {
    // a (this process) peers with b (a process, to be killed) and c.
    let (m, mut b, listen) = three_zones_with_b_process().await;
    assert_eq!(echo_flow(listen, b"hi").await.unwrap().0, "b");
    let url = format!("http://{}/topology", m.gw(0).admin_addr.unwrap());
    let dom = {
        let u = url.clone();
        tokio::task::spawn_blocking(move || chromium(&u, Duration::from_secs(3), None)).await.unwrap()
    };
    for zone in ["a", "b", "c"] {
        assert!(
            dom.contains(&format!("class=\"zone{}\" data-zone=\"{zone}\"", if zone == "a" { " local" } else { "" })),
            "zone {zone} missing:\n{dom}"
        );
    }
    assert_eq!(edge_state(&dom, "b").as_deref(), Some("up"), "{dom}");
    assert_eq!(edge_state(&dom, "c").as_deref(), Some("up"), "{dom}");
    assert!(dom.contains("data-service=\"echo.test\""), "{dom}");
    assert!(dom.contains(" ms · "), "edges carry their RTT:\n{dom}");
    // A screenshot for the README, when asked (CAUSEWAY_SCREENSHOT=path).
    if let Ok(path) = std::env::var("CAUSEWAY_SCREENSHOT") {
        let u = url.clone();
        tokio::task::spawn_blocking(move || chromium(&u, Duration::from_secs(3), Some(std::path::Path::new(&path))))
            .await
            .unwrap();
    }
    // kill -9 of b: a sees it silent within peer_timeout and a ping interval; the page, polling
    // every second, shows it so within 2 s of the kill.
    let killed = std::time::Instant::now();
    b.kill();
    let admin = m.gw(0).admin_addr.unwrap();
    let b_up = || async move {
        let (_, body) = causeway::admin::get(admin, "/topology.json").await.unwrap();
        let t: serde_json::Value = serde_json::from_str(&body).unwrap();
        t["edges"].as_array().unwrap().iter().any(|e| e["to"] == "b" && e["state"] == "up")
    };
    while b_up().await {
        assert!(killed.elapsed() < Duration::from_secs(5), "a still sees b up 5 s after kill -9");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen_down = killed.elapsed();
    assert!(seen_down + Duration::from_secs(1) <= Duration::from_secs(2), "a saw b down {seen_down:?} after the kill");
    let dom = tokio::task::spawn_blocking(move || chromium(&url, Duration::from_secs(2), None)).await.unwrap();
    let state = edge_state(&dom, "b");
    assert!(matches!(state.as_deref(), Some("silent" | "down")), "the page's edge to b: {state:?}\n{dom}");
    assert_eq!(edge_state(&dom, "c").as_deref(), Some("up"), "{dom}");
    assert!(dom.contains("<tr class=\"error\"><td>b</td>"), "b's row is highlighted:\n{dom}");
    eprintln!("topology: a saw b down {seen_down:?} after kill -9; the page shows it at its next poll (1 s)");
    m.shutdown().await;
}
