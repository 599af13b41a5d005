//! HTTP services across zones: each request of an `http` import crosses the overlay as its own
//! HTTP/3 request, routed by header to a subset (the classic `end-user: jason` → reviews v2) or
//! split by weight. Real programs at both ends: curl as the client, Python's `http.server` as the
//! backends.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use causeway_tests::*;

/// An HTTP/1.1 backend answering `GET` with its version and `POST` with its version and the body.
const BACKEND_PY: &str = r#"
import http.server, sys
version = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Version", version)
        self.send_header("X-Saw-Identity", self.headers.get("causeway-source-identity", "none"))
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

struct Backend {
    addr: SocketAddr,
    child: Child,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn backend(version: &str) -> Backend {
    let mut child = Command::new("python3")
        .args(["-c", BACKEND_PY, version])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().expect("backend port");
    Backend { addr: SocketAddr::from(([127, 0, 0, 1], port)), child }
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
async fn reviews_mesh(routes: &str) -> (TestMesh, SocketAddr, Vec<Backend>) {
    init();
    let (v1, v2) = (backend("v1"), backend("v2"));
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

async fn start_yaml(m: &TestMesh, i: usize, yaml: &str) -> causeway::Gateway {
    let path = m.pki.dir.join(format!("{}-http.yaml", m.specs[i].zone));
    std::fs::write(&path, yaml).unwrap();
    let cfg = causeway::config::load(&path).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let (creds, bundle) = causeway::app::load_tls(&cfg).unwrap();
    causeway::Gateway::start(&cfg, creds, bundle).await.unwrap()
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
    let lines: Vec<_> = access_log().into_iter().filter(|l| l.get("kind") == "http").collect();
    let out = lines.iter().filter(|l| l.get("direction") == "outbound" && l.get("route") == "reviews-by-user");
    // (Lines of the other test in this binary are told apart by route and path.)
    assert_eq!(out.count(), 200);
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
