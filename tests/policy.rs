//! Authorization at the destination gateway: who may call which exported service, by the caller's
//! SPIFFE ID (vouched for by its own gateway, from its `workloads` table), zone, address, and for
//! HTTP method and path. Real clients: curl from two source addresses (two workloads) and TCP
//! clients bound to them; the policy lives in zone east, the callers in zone a.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use causeway_tests::web::{py_server, start_yaml};
use causeway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "spiffe://test.causeway/ns/shop/sa/frontend";
const B: &str = "spiffe://test.causeway/ns/other/sa/intruder";

/// Answers every request with its method and path.
const HTTP_PY: &str = r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def reply(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(n)
        body = ("%s %s\n" % (self.command, self.path)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = reply
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// Zone a imports `reviews.shop` (http) and `echo.shop` (tcp); its workloads 127.0.0.2 (A) and
/// 127.0.0.3 (B). Zone east exports both with `authorization`.
async fn mesh(authorization: &str) -> (TestMesh, SocketAddr, SocketAddr, Vec<PyServer>) {
    init();
    let web = py_server(HTTP_PY, &[]);
    let (echo, _task) = echo_server("east".into()).await.unwrap();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("reviews.shop", vec![]), ("echo.shop", vec![])] },
            ZoneSpec {
                zone: "east",
                exports: vec![("reviews.shop", vec![web.addr]), ("echo.shop", vec![echo])],
                imports: vec![],
            },
        ],
        "",
    )
    .unwrap();
    m.specs[1].extra = authorization.to_string();
    let yaml = m.specs[1].yaml().replace("{ name: reviews.shop,", "{ name: reviews.shop, protocol: http,");
    m.gateways[1] = Some(start_yaml(&m, 1, &yaml).await);
    m.specs[0].extra =
        format!("workloads:\n  - {{ cidr: 127.0.0.2/32, id: \"{A}\" }}\n  - {{ cidr: 127.0.0.3/32, id: \"{B}\" }}\n");
    let yaml = m.specs[0].yaml().replace("{ service: reviews.shop,", "{ service: reviews.shop, protocol: http,");
    m.gateways[0] = Some(start_yaml(&m, 0, &yaml).await);
    assert!(m.wait_routes(0, "reviews.shop", 1).await && m.wait_routes(0, "echo.shop", 1).await);
    let (web_at, echo_at) = (m.gw(0).import_addr("reviews.shop").unwrap(), m.gw(0).import_addr("echo.shop").unwrap());
    (m, web_at, echo_at, vec![web])
}

use causeway_tests::web::PyServer;

/// One request with curl from `from`: (status, body, headers).
async fn request(from: &str, method: &str, url: String) -> (u16, String) {
    let (from, method) = (from.to_string(), method.to_string());
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--interface", &from, "-X", &method, "-w", "\n%{http_code}", &url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.trim_end().to_string())
    })
    .await
    .unwrap()
}

/// A TCP flow from `from` through the import listener: `Ok(echoed)` or `Err(how it ended)`.
async fn flow(from: &str, listen: SocketAddr) -> Result<String, String> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    let mut s = sock.connect(listen).await.map_err(|e| e.to_string())?;
    let _ = s.write_all(b"ping").await;
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await {
        Ok(Ok(_)) if !got.is_empty() => Ok(String::from_utf8_lossy(&got).to_string()),
        Ok(Ok(_)) => Err("closed without data".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

const A_ONLY: &str = r#"authorization:
  policies:
    - name: shop-frontend
      action: allow
      rules:
        - from: { identities: ["spiffe://test.causeway/ns/shop/sa/frontend"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_a_is_allowed_and_identity_b_denied_over_http_and_tcp() {
    let (m, web, echo, _servers) = mesh(A_ONLY).await;
    // HTTP: A's request reaches the endpoint; B's gets 403 naming the policy.
    assert_eq!(request("127.0.0.2", "GET", format!("http://{web}/x")).await, (200, "GET /x".into()));
    let (code, body) = request("127.0.0.3", "GET", format!("http://{web}/x")).await;
    assert_eq!((code, body.as_str()), (403, "policy_denied: shop-frontend"));
    // TCP: A's flow echoes; B's is reset at once, before any byte of the service.
    let ok = flow("127.0.0.2", echo).await.unwrap();
    assert!(ok.contains("ping"), "{ok}");
    let started = std::time::Instant::now();
    let denied = flow("127.0.0.3", echo).await;
    assert!(denied.is_err(), "B's flow went through: {denied:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "B's flow ended after {:?}", started.elapsed());
    // Counted by service, policy and action; every denial in the access log.
    let t = m.gw(1).metrics_text();
    let count = |svc: &str, action: &str| {
        metric(
            &t,
            "causeway_policy_decisions_total",
            &[("service", svc), ("policy", "shop-frontend"), ("action", action)],
        )
    };
    assert_eq!((count("reviews.shop", "allow"), count("reviews.shop", "deny")), (Some(1.0), Some(1.0)), "{t}");
    assert_eq!((count("echo.shop", "allow"), count("echo.shop", "deny")), (Some(1.0), Some(1.0)), "{t}");
    let denials = access_lines(2, |l| l.get("kind") == "policy" && l.get("source_identity") == B).await;
    assert_eq!(denials.len(), 2, "{denials:?}");
    assert!(denials.iter().all(|l| l.get("decision") == "deny" && l.get("reason") == "no_allow_rule"));
    let http =
        access_lines(1, |l| l.get("direction") == "inbound" && l.get("kind") == "http" && l.get("status") == "403")
            .await;
    assert_eq!(http[0].get("policy"), "shop-frontend");
    // The source gateway relays the refusal's reason and policy.
    let t = m.gw(0).metrics_text();
    assert!(metric(&t, "causeway_flows_failed_total", &[("service", "echo.shop")]).unwrap_or(0.0) >= 1.0, "{t}");
    m.shutdown().await;
}

const PATHS: &str = r#"authorization:
  default_deny: true
  policies:
    - name: public-reads
      service: reviews.shop
      action: allow
      rules:
        - from: { namespaces: [shop] }
          to: { methods: [GET], paths: ["/public/*", "/admin/*"] }
    - name: no-admin
      service: reviews.shop
      action: deny
      rules:
        - to: { paths: ["/admin/*"] }
    - name: watch-posts
      service: reviews.shop
      action: audit
      rules:
        - to: { methods: [POST] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_and_methods_deny_wins_default_deny_refuses_and_audit_mode_lets_through() {
    let (mut m, web, echo, _servers) = mesh(PATHS).await;
    assert_eq!(request("127.0.0.2", "GET", format!("http://{web}/public/a")).await.0, 200);
    // Deny wins over the allow rule that also names /admin/*.
    let (code, body) = request("127.0.0.2", "GET", format!("http://{web}/admin/users")).await;
    assert_eq!((code, body.as_str()), (403, "policy_denied: no-admin"));
    // POST is not in the allow rule; the audit rule logs it either way.
    let (code, body) = request("127.0.0.2", "POST", format!("http://{web}/admin/users")).await;
    assert_eq!((code, body.as_str()), (403, "policy_denied: no-admin"));
    assert_eq!(request("127.0.0.2", "POST", format!("http://{web}/public/a")).await.0, 403);
    let audited = access_lines(1, |l| l.get("kind") == "policy" && l.get("audited") == "watch-posts").await;
    assert!(!audited.is_empty());
    // echo.shop has no allow policy: default_deny refuses everyone.
    assert!(flow("127.0.0.2", echo).await.is_err());
    let t = m.gw(1).metrics_text();
    let denied = metric(
        &t,
        "causeway_policy_decisions_total",
        &[("service", "echo.shop"), ("policy", "default"), ("action", "deny")],
    );
    assert_eq!(denied, Some(1.0), "{t}");

    // Audit mode, by reload: the same calls pass, each logged and counted as audit.
    m.specs[1].extra = format!("{PATHS}  mode: audit\n");
    let yaml = m.specs[1].yaml().replace("{ name: reviews.shop,", "{ name: reviews.shop, protocol: http,");
    let path = m.pki.dir.join("east-audit.yaml");
    std::fs::write(&path, yaml).unwrap();
    let r = m.gw(1).reload(&causeway::config::load(&path).unwrap()).await.unwrap();
    assert!(r.authorization_changed);
    assert_eq!(
        request("127.0.0.3", "GET", format!("http://{web}/admin/users")).await,
        (200, "GET /admin/users".into())
    );
    assert!(flow("127.0.0.3", echo).await.unwrap().contains("ping"));
    let t = m.gw(1).metrics_text();
    let audit = |svc: &str, policy: &str| {
        metric(&t, "causeway_policy_decisions_total", &[("service", svc), ("policy", policy), ("action", "audit")])
    };
    assert_eq!(audit("reviews.shop", "no-admin"), Some(1.0), "{t}");
    assert_eq!(audit("echo.shop", "default"), Some(1.0), "{t}");
    let lines =
        access_lines(2, |l| l.get("kind") == "policy" && l.get("decision") == "audit" && l.get("source_identity") == B)
            .await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    m.shutdown().await;
}

#[test]
fn policy_explain_names_the_deciding_rule() {
    let dir = std::env::temp_dir().join(format!("causeway-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("east.yaml");
    // TLS files are not read by explain: the names need not exist.
    std::fs::write(
        &cfg,
        format!(
            "zone: east\ngateway: gw-1\ntrust_domain: test.causeway\ntls: {{ cert: c.pem, key: k.pem, bundle: ca.crt }}\n\
             listen: {{ overlay: \"127.0.0.1:4433\" }}\n\
             exports:\n  - {{ name: reviews.shop, protocol: http, port: 9080, endpoints: [\"127.0.0.1:9\"] }}\n{PATHS}"
        ),
    )
    .unwrap();
    let explain = |args: &[&str]| {
        let out = Command::new(causeway_bin())
            .args(["policy", "explain", "--config", cfg.to_str().unwrap(), "--service", "reviews.shop"])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = explain(&["--identity", A, "--method", "GET", "--path", "/public/x"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("decision: allow") && out.contains("public-reads (rule 0)"), "{out}");
    let (code, out) = explain(&["--identity", A, "--method", "GET", "--path", "/admin/x"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("decision: deny") && out.contains("no-admin (rule 0)") && out.contains("deny_rule"), "{out}");
    let (code, out) = explain(&["--identity", A, "--method", "POST", "--path", "/public/x"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no_allow_rule") && out.contains("audited:  watch-posts"), "{out}");
    let (code, out) = explain(&["--identity", "not-an-id"]);
    assert_eq!(code, Some(2), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_open_flows_it_no_longer_allows() {
    let (mut m, _web, echo, _servers) = mesh(A_ONLY).await;
    // A's flow is open and echoing.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut open = sock.connect(echo).await.unwrap();
    open.write_all(b"first").await.unwrap();
    let mut buf = vec![0u8; 256];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("first") {
        let n = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the flow ended early");
        got.extend_from_slice(&buf[..n]);
    }
    // Asked of the running gateway, the policy admits A.
    let admin = m.gw(1).admin_addr.unwrap();
    let (code, out) = explain_admin(admin, &["--service", "echo.shop", "--identity", A, "--zone", "a"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("decision: allow") && out.contains("shop-frontend (rule 0)"), "{out}");
    // The policy now admits only another identity: the open flow is reset, well within 10 s.
    m.specs[1].extra = A_ONLY.replace("sa/frontend", "sa/checkout");
    let yaml = m.specs[1].yaml().replace("{ name: reviews.shop,", "{ name: reviews.shop, protocol: http,");
    let path = m.pki.dir.join("east-revoke.yaml");
    std::fs::write(&path, yaml).unwrap();
    let started = std::time::Instant::now();
    let r = m.gw(1).reload(&causeway::config::load(&path).unwrap()).await.unwrap();
    assert_eq!((r.authorization_changed, r.flows_revoked), (true, 1));
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match open.read(&mut buf).await {
                Ok(0) => return "eof",
                Ok(_) => continue,
                Err(_) => return "reset",
            }
        }
    })
    .await
    .expect("the revoked flow stayed open");
    eprintln!("revoked flow ended ({end}) {:?} after the reload", started.elapsed());
    let t = m.gw(1).metrics_text();
    assert_eq!(metric(&t, "causeway_flows_revoked_total", &[("service", "echo.shop")]), Some(1.0), "{t}");
    // New flows from A are refused now, and the running gateway says why.
    assert!(flow("127.0.0.2", echo).await.is_err());
    let (code, out) = explain_admin(admin, &["--service", "echo.shop", "--identity", A, "--zone", "a"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("decision: deny") && out.contains("shop-frontend (no rule matched)"), "{out}");
    assert!(out.contains("no_allow_rule"), "{out}");
    let (code, out) = explain_admin(admin, &["--service", "echo.shop", "--identity", "not-an-id"]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("identity"), "{out}");
    m.shutdown().await;
}

/// `causeway policy explain --admin ADDR args…`: (exit code, stdout and stderr).
async fn explain_admin(admin: SocketAddr, args: &[&str]) -> (Option<i32>, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(causeway_bin())
            .args(["policy", "explain", "--admin", &admin.to_string()])
            .args(&args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    })
    .await
    .unwrap()
}

/// What a paced run of GET requests got: 2xx per target, 429s (and those without `Retry-After`),
/// anything else, and how long it took.
struct Run {
    ok: Vec<u32>,
    limited: u32,
    without_retry_after: u32,
    other: Vec<Result<(u16, bool), String>>,
    secs: f64,
}

/// `n` GET requests from workload A (127.0.0.2), one every `every`, to `urls` in turn, on
/// kept-alive connections.
async fn drive(urls: &[http::Uri], n: usize, every: Duration) -> Run {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_local_address(Some("127.0.0.2".parse().unwrap()));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
    let mut tick = tokio::time::interval(every);
    let mut calls = tokio::task::JoinSet::new();
    let started = std::time::Instant::now();
    for i in 0..n {
        tick.tick().await;
        let (c, at) = (client.clone(), i % urls.len());
        let u = urls[at].clone();
        calls.spawn(async move {
            let r = c.get(u).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((at, r.status().as_u16(), r.headers().contains_key("retry-after")))
        });
    }
    let mut run = Run { ok: vec![0; urls.len()], limited: 0, without_retry_after: 0, other: Vec::new(), secs: 0.0 };
    while let Some(r) = calls.join_next().await {
        match r.unwrap() {
            Ok((at, 200, _)) => run.ok[at] += 1,
            Ok((_, 429, has)) => {
                run.limited += 1;
                run.without_retry_after += u32::from(!has);
            }
            Ok((_, code, has)) => run.other.push(Ok((code, has))),
            Err(e) => run.other.push(Err(e)),
        }
    }
    run.secs = started.elapsed().as_secs_f64();
    run
}

/// What a limit admitted against what it allows (`expected`): never more than `over` above it;
/// up to twice that below, because arrivals bunch up on a loaded machine and a bucket with a small
/// burst then rightly refuses some of a bunch.
fn about_the_limit(ok: u32, expected: f64, over: f64) {
    let ratio = f64::from(ok) / expected;
    assert!(
        (1.0 - 2.0 * over..=1.0 + over).contains(&ratio),
        "{ok} admitted, expected {expected:.0} (-{:.0} % … +{:.0} %)",
        200.0 * over,
        100.0 * over
    );
}

/// The tests that drive 500 requests/s and count what a rate limit admits run one at a time: two
/// at once on two cores make arrivals bursty, and a limit with a burst of 10 then (rightly) admits
/// less than its rate.
static LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_per_identity_admits_about_the_limit_and_answers_429_with_retry_after() {
    let _alone = LOAD.lock().await;
    let limits =
        "rate_limits:\n  - { name: per-caller, service: reviews.shop, per: identity, requests_per_second: 100 }\n";
    let (m, web, _echo, _servers) = mesh(limits).await;
    // 500 requests/s for 10 s from workload A.
    let run = drive(&[format!("http://{web}/limited").parse().unwrap()], 5000, Duration::from_millis(2)).await;
    let (ok, limited, secs) = (run.ok[0], run.limited, run.secs);
    // 100/s over the run plus a burst of 10 (a tenth of a second's worth).
    let expected = 100.0 * secs + 10.0;
    eprintln!(
        "rate limit 100/s, 5,000 requests in {secs:.1} s: {ok} admitted (expected ≈ {expected:.0}), {limited} × 429"
    );
    assert!(run.other.is_empty(), "{:?}", &run.other[..run.other.len().min(5)]);
    assert_eq!(ok + limited, 5000);
    about_the_limit(ok, expected, 0.1);
    assert_eq!(run.without_retry_after, 0, "429s without Retry-After");
    let t = m.gw(1).metrics_text();
    let counted = metric(&t, "causeway_rate_limited_total", &[("limit", "per-caller"), ("kind", "requests")]);
    assert_eq!(counted, Some(f64::from(limited)), "{t}");
    m.shutdown().await;
}

/// A redis-server on a free port, without persistence; killed when dropped.
struct Redis {
    port: u16,
    child: std::process::Child,
}

impl Redis {
    async fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (tests/run.sh installs it)");
        let up =
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
        assert!(up, "redis-server did not listen on {port}");
        Self { port, child }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sums a metric over the gateways.
fn total(m: &TestMesh, gws: &[usize], name: &str, labels: &[(&str, &str)]) -> f64 {
    gws.iter().map(|i| metric(&m.gw(*i).metrics_text(), name, labels).unwrap_or(0.0)).sum()
}

/// Two gateways of zone east serve `reviews.shop` with a 100 requests/s limit per identity whose
/// buckets they share in Redis: to callers in zone a (whose gateway spreads them over both), and
/// to their own workloads (A at 127.0.0.2, half the calls at each). Together they admit about the
/// limit, not twice it; with Redis gone each falls back to half of it (two gateways seen) and says
/// so; with Redis back they share again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_limit_holds_across_two_gateways_of_a_zone_and_falls_back_to_a_local_share() {
    let _alone = LOAD.lock().await;
    init();
    let web = py_server(HTTP_PY, &[]);
    let redis = Redis::start(free_tcp_port()).await;
    let gateway = || ZoneSpec {
        zone: "east",
        exports: vec![("reviews.shop", vec![web.addr])],
        imports: vec![("reviews.shop", vec![])],
    };
    let caller = ZoneSpec { zone: "a", exports: vec![], imports: vec![("reviews.shop", vec![])] };
    let mut m = TestMesh::plan(vec![gateway(), gateway(), caller], "").unwrap();
    let port = redis.port;
    for i in 0..2 {
        // A generous timeout: a debug build on two busy cores.
        m.specs[i].extra = format!(
            "workloads:\n  - {{ cidr: 127.0.0.2/32, id: \"{A}\" }}\n\
             rate_limit_store: {{ redis: \"127.0.0.1:{port}\", timeout: 250ms, on_failure: local }}\n\
             rate_limits:\n  - {{ name: shared, service: reviews.shop, requests_per_second: 100, scope: global }}\n"
        );
        let yaml = m.specs[i]
            .yaml()
            .replace("{ name: reviews.shop,", "{ name: reviews.shop, protocol: http,")
            .replace("{ service: reviews.shop,", "{ service: reviews.shop, protocol: http,");
        m.gateways[i] = Some(start_yaml(&m, i, &yaml).await);
    }
    let both = [0, 1];
    let seen_two = eventually(Duration::from_secs(10), || {
        both.iter().all(|i| metric(&m.gw(*i).metrics_text(), "causeway_rate_limit_store_gateways", &[]) == Some(2.0))
    })
    .await;
    assert!(seen_two, "each gateway sees two in the zone's set");
    m.specs[2].extra = format!("workloads:\n  - {{ cidr: 127.0.0.2/32, id: \"{A}\" }}\n");
    let yaml = m.specs[2].yaml().replace("{ service: reviews.shop,", "{ service: reviews.shop, protocol: http,");
    m.gateways[2] = Some(start_yaml(&m, 2, &yaml).await);
    assert!(m.wait_routes(2, "reviews.shop", 2).await, "zone a routes to both east gateways");

    // From zone a, 500/s for 6 s: zone a's gateway picks an east gateway per request.
    let from_a: http::Uri = format!("http://{}/shared", m.gw(2).import_addr("reviews.shop").unwrap()).parse().unwrap();
    let run = drive(&[from_a], 3000, Duration::from_millis(2)).await;
    let expected = 100.0 * run.secs + 10.0;
    let served = |i: usize| {
        let labels = [("route", "inbound"), ("zone", "a"), ("code", "200")];
        metric(&m.gw(i).metrics_text(), "causeway_http_requests_total", &labels).unwrap_or(0.0)
    };
    // Counted at the destination once each response is through, a moment after the client has it.
    let all = f64::from(run.ok[0]);
    eventually(Duration::from_secs(5), || served(0) + served(1) >= all).await;
    let split = (served(0), served(1));
    eprintln!(
        "global 100/s, from zone a for {:.1} s: {} admitted (expected ≈ {expected:.0}), served by east {split:?}",
        run.secs, run.ok[0]
    );
    assert!(run.other.is_empty(), "{:?}", &run.other[..run.other.len().min(5)]);
    about_the_limit(run.ok[0], expected, 0.1);
    assert_eq!(split.0 + split.1, all);
    let limited_before = total(&m, &both, "causeway_rate_limited_total", &[("limit", "shared"), ("kind", "requests")]);
    let urls: Vec<http::Uri> = both
        .iter()
        .map(|i| format!("http://{}/shared", m.gw(*i).import_addr("reviews.shop").unwrap()).parse().unwrap())
        .collect();

    // 500/s for 10 s, half to each gateway: together ≈ the limit.
    let run = drive(&urls, 5000, Duration::from_millis(2)).await;
    let ok: u32 = run.ok.iter().sum();
    let expected = 100.0 * run.secs + 10.0;
    eprintln!(
        "global 100/s over two gateways, {:.1} s: admitted {:?} (expected ≈ {expected:.0} together), {} × 429",
        run.secs, run.ok, run.limited
    );
    assert!(run.other.is_empty(), "{:?}", &run.other[..run.other.len().min(5)]);
    assert_eq!(run.without_retry_after, 0);
    about_the_limit(ok, expected, 0.1);
    assert!(run.ok.iter().all(|n| f64::from(*n) >= expected * 0.3), "both gateways admitted: {:?}", run.ok);
    let counted = total(&m, &both, "causeway_rate_limited_total", &[("limit", "shared"), ("kind", "requests")]);
    assert_eq!(counted - limited_before, f64::from(run.limited));
    assert_eq!(total(&m, &both, "causeway_rate_limit_fallbacks_total", &[]), 0.0);

    // Redis goes away: each gateway falls back to half the limit, and says so.
    drop(redis);
    let down = eventually(Duration::from_secs(10), || {
        both.iter().all(|i| metric(&m.gw(*i).metrics_text(), "causeway_rate_limit_store_up", &[]) == Some(0.0))
    })
    .await;
    assert!(down, "both gateways report the store down");
    let store = format!("127.0.0.1:{port}");
    let said = || -> Vec<AccessLine> {
        let down = |w: &AccessLine| w.get("message") == "rate_limit.store.down" && w.get("store") == store;
        warnings().into_iter().filter(down).collect()
    };
    eventually(Duration::from_secs(5), || said().len() >= 2).await;
    let said = said();
    assert!(said.len() == 2 && said.iter().all(|w| w.get("fallback") == "local: 1/2 of each global limit"), "{said:?}");
    let run = drive(&urls, 2000, Duration::from_millis(2)).await;
    let ok: u32 = run.ok.iter().sum();
    // 50/s each plus a burst of 5 each.
    let expected = 100.0 * run.secs + 10.0;
    eprintln!("store down, {:.1} s: admitted {:?} (expected ≈ {expected:.0} together)", run.secs, run.ok);
    assert!(run.other.is_empty(), "{:?}", &run.other[..run.other.len().min(5)]);
    about_the_limit(ok, expected, 0.15);
    assert!(
        total(&m, &both, "causeway_rate_limit_fallbacks_total", &[("limit", "shared"), ("mode", "local")]) >= 2000.0
    );

    // Redis is back on the same address: the heartbeat reconnects and the buckets are shared again.
    let _redis = Redis::start(port).await;
    let up = eventually(Duration::from_secs(10), || {
        both.iter().all(|i| metric(&m.gw(*i).metrics_text(), "causeway_rate_limit_store_up", &[]) == Some(1.0))
    })
    .await;
    assert!(up, "both gateways reconnect");
    let before = total(&m, &both, "causeway_rate_limit_fallbacks_total", &[]);
    let run = drive(&urls, 10, Duration::from_millis(10)).await;
    assert_eq!(run.ok.iter().sum::<u32>(), 10);
    assert_eq!(total(&m, &both, "causeway_rate_limit_fallbacks_total", &[]), before, "decided by the store again");
    m.shutdown().await;
}

/// `on_failure: closed`: with the store unreachable, a call under a global limit is refused — HTTP
/// with 429 saying why, a TCP flow with a reset — and the fallback is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_a_closed_fallback_refuses_and_says_why() {
    let port = free_tcp_port();
    let limits = format!(
        "rate_limit_store: {{ redis: \"127.0.0.1:{port}\", on_failure: closed }}\n\
         rate_limits:\n  - {{ name: strict, requests_per_second: 1000, flows_per_second: 1000, scope: global }}\n"
    );
    let (m, web, echo, _servers) = mesh(&limits).await;
    let (code, body) = request("127.0.0.2", "GET", format!("http://{web}/x")).await;
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("rate_limited: strict") && body.contains("does not answer"), "{body}");
    assert!(flow("127.0.0.2", echo).await.is_err(), "the TCP flow is refused");
    let t = m.gw(1).metrics_text();
    assert_eq!(metric(&t, "causeway_rate_limit_store_up", &[]), Some(0.0));
    assert_eq!(
        metric(&t, "causeway_rate_limit_fallbacks_total", &[("limit", "strict"), ("mode", "closed")]),
        Some(2.0)
    );
    assert_eq!(metric(&t, "causeway_rate_limited_total", &[("limit", "strict"), ("kind", "flows")]), Some(1.0));
    m.shutdown().await;
}
