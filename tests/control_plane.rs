//! Mesh-wide documents: published once at any gateway, signed by an operator, flooded over the
//! overlay, applied (or refused) by every gateway against its own file, reported back, and kept
//! on disk as last-known-good.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use causeway::control::publish;
use causeway_overlay::Credentials;
use causeway_protocol::document::{SignedDocument, MAX_BODY_LEN};
use causeway_protocol::Identity;
use causeway_tests::*;

const OPERATOR: &str = "spiffe://test.causeway/ns/ops/sa/publisher";

/// Credentials for `id`, issued by the mesh's CA (written as `<name>.crt` / `<name>.key`).
fn creds(m: &TestMesh, name: &str, id: &str) -> (Credentials, std::path::PathBuf, std::path::PathBuf) {
    let id = Identity::parse(id).unwrap();
    let (cert, key, _) = m.pki.issue(name, &id, Validity::for_duration(Duration::from_secs(3600))).unwrap();
    let c =
        causeway::certs::credentials_from_pem(&std::fs::read(&cert).unwrap(), &std::fs::read(&key).unwrap()).unwrap();
    (c, cert, key)
}

/// Every gateway of `m` lists the operator as a publisher and keeps documents in its own state
/// directory.
fn with_control(m: &mut TestMesh) {
    for i in 0..m.specs.len() {
        let dir = m.pki.dir.join(format!("state-{}", m.specs[i].zone));
        m.specs[i]
            .extra
            .push_str(&format!("control: {{ publishers: [\"{OPERATOR}\"], state_dir: \"{}\" }}\n", dir.display()));
    }
}

/// a imports echo.test; b and c export it (banners "b", "c"). Planned with control, not started.
async fn mesh() -> TestMesh {
    let mut m = echo_three_zones().await;
    with_control(&mut m);
    m
}

/// Signs and posts `content` as `version` at gateway `i`.
async fn publish_at(m: &TestMesh, i: usize, c: &Credentials, version: u64, content: &str) -> (u16, serde_json::Value) {
    let doc = publish::sign(c, version, content).unwrap();
    publish::post(m.gw(i).admin_addr.unwrap(), &doc).await.unwrap()
}

/// Starts gateway `i` again on its old address, once the stopped one's last task has let the
/// UDP socket go.
async fn restart(m: &mut TestMesh, i: usize) {
    let t0 = std::time::Instant::now();
    while let Err(e) = m.start(i).await {
        assert!(t0.elapsed() < Duration::from_secs(10), "{e:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn held(m: &TestMesh, i: usize) -> Option<(u64, String)> {
    m.gw(i).mesh.held_document().map(|h| (h.version, h.digest_hex()))
}

/// Whether gateway `i` runs `policy` (a policy name from a document).
fn runs_policy(m: &TestMesh, i: usize, policy: &str) -> bool {
    m.gw(i).snapshot().authorization.policies.iter().any(|p| p.name == policy)
}

fn documents(t: &str, result: &str, reason: &str) -> f64 {
    metric(t, "causeway_mesh_documents_total", &[("result", result), ("reason", reason)]).unwrap_or(0.0)
}

fn audit_doc(name: &str) -> String {
    format!(
        "authorization:
  policies:
    - name: {name}
      action: audit
      rules: [{{ from: {{ namespaces: [nobody] }} }}]
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_down_during_an_apply_catches_up_and_one_restarted_alone_serves_its_persisted_version() {
    let mut m = mesh().await;
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 2).await);
    let (op, ..) = creds(&m, "operator", OPERATOR);
    // c is down while version 1 is published at a.
    m.gateways[2].take().unwrap().shutdown().await;
    let (code, answer) = publish_at(&m, 0, &op, 1, &audit_doc("mesh-audit")).await;
    assert_eq!(code, 200, "{answer}");
    assert!(
        eventually(Duration::from_secs(5), || runs_policy(&m, 0, "mesh-audit") && runs_policy(&m, 1, "mesh-audit"))
            .await
    );
    // c comes back: a peer sends it the document as its session starts.
    restart(&mut m, 2).await;
    assert!(eventually(Duration::from_secs(10), || runs_policy(&m, 2, "mesh-audit")).await, "c never caught up");
    let want = held(&m, 0);
    assert_eq!(held(&m, 2), want);
    let view = publish::mesh_view(m.gw(0).admin_addr.unwrap()).await.unwrap();
    let applied = || async {
        let v = publish::mesh_view(m.gw(1).admin_addr.unwrap()).await.unwrap();
        v["gateways"].as_array().unwrap().iter().filter(|r| r["state"] == "applied" && r["version"] == 1).count()
    };
    let mut n = 0;
    for _ in 0..100 {
        n = applied().await;
        if n == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n, 3, "{view}");
    // Now every other gateway is gone and c restarts: it serves version 1 from its state
    // directory before it reports ready, with no publisher and no peer reachable.
    m.gateways[0].take().unwrap().shutdown().await;
    m.gateways[1].take().unwrap().shutdown().await;
    m.gateways[2].take().unwrap().shutdown().await;
    restart(&mut m, 2).await;
    assert!(runs_policy(&m, 2, "mesh-audit"), "{:?}", m.gw(2).snapshot().authorization);
    assert_eq!(held(&m, 2), want);
    let t = m.gw(2).metrics_text();
    let persisted =
        metric(&t, "causeway_mesh_documents_total", &[("result", "accepted"), ("origin", "persisted")]).unwrap_or(0.0);
    assert_eq!(persisted, 1.0, "{t}");
    assert_eq!(metric(&t, "causeway_mesh_document_version", &[]), Some(1.0), "{t}");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_tampered_older_and_oversized_documents_are_refused_counted_and_change_nothing() {
    use causeway_protocol::control::{self, features, Hello, Message};
    let mut m = mesh().await;
    // c is played by hand: a rogue peer with c's own certificate.
    m.start(0).await.unwrap();
    m.start(1).await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await);
    let (op, ..) = creds(&m, "operator", OPERATOR);
    let (code, answer) = publish_at(&m, 0, &op, 5, &audit_doc("v5")).await;
    assert_eq!(code, 200, "{answer}");
    assert!(eventually(Duration::from_secs(5), || runs_policy(&m, 1, "v5")).await);
    let before = (held(&m, 0), held(&m, 1));

    // A certificate from the mesh's CA, but not a listed publisher.
    let (intruder, ..) = creds(&m, "intruder", "spiffe://test.causeway/ns/ops/sa/intruder");
    let (code, answer) = publish_at(&m, 0, &intruder, 6, &audit_doc("intruder")).await;
    assert_eq!((code, answer["reason"].as_str()), (403, Some("unauthorized_publisher")), "{answer}");
    // A listed publisher's certificate from a CA the mesh does not trust.
    let foreign = causeway::demo::Pki::new(TRUST_DOMAIN).unwrap();
    let (fcert, fkey, _) = foreign
        .issue("forged", &Identity::parse(OPERATOR).unwrap(), Validity::for_duration(Duration::from_secs(600)))
        .unwrap();
    let forged =
        causeway::certs::credentials_from_pem(&std::fs::read(fcert).unwrap(), &std::fs::read(fkey).unwrap()).unwrap();
    let (code, answer) = publish_at(&m, 0, &forged, 6, &audit_doc("forged")).await;
    assert_eq!((code, answer["reason"].as_str()), (403, Some("certificate")), "{answer}");
    // An older version, properly signed.
    let (code, answer) = publish_at(&m, 0, &op, 4, &audit_doc("v4")).await;
    assert_eq!((code, answer["reason"].as_str()), (409, Some("older")), "{answer}");
    // A body over the limit (a signature is not even looked at).
    let big =
        SignedDocument { body: vec![0; MAX_BODY_LEN + 1], chain: vec![vec![0]], scheme: 0x0403, signature: vec![0] };
    let (code, answer) = publish::post(m.gw(0).admin_addr.unwrap(), &big).await.unwrap();
    assert_eq!((code, answer["reason"].as_str()), (400, Some("oversized")), "{answer}");
    // The signing side refuses a document over the limit before signing it.
    assert!(publish::sign(&op, 7, &"#".repeat(200 * 1024)).is_err());

    // A peer relays a document of the operator's with one bit flipped in transit.
    let mut doc = publish::sign(&op, 6, &audit_doc("v6")).unwrap();
    let last = doc.body.len() - 1;
    doc.body[last] ^= 0x01;
    let c_id = m.ids[2].clone();
    let (creds_c, bundle) =
        rogue::credentials(&m.pki, &c_id, Validity::for_duration(Duration::from_secs(600)), &m.pki).unwrap();
    let (_ep, conn) = rogue::dial(creds_c, bundle, &m.ids[0], m.addrs[0]).await.unwrap();
    let mut ctl = rogue::open_control(&conn).await.unwrap();
    let mut frames = control::preface(control::VERSION).to_vec();
    let hello = Hello { zone: "c".parse().unwrap(), gateway: "gw-1".parse().unwrap(), features: features::DOCUMENTS };
    frames.extend_from_slice(&control::encode(&Message::Hello(hello)).unwrap());
    frames.extend_from_slice(&control::encode(&Message::Document(doc)).unwrap());
    ctl.stream.send_data(bytes::Bytes::from(frames)).await.unwrap();
    let t = || m.gw(0).metrics_text();
    assert!(eventually(Duration::from_secs(5), || documents(&t(), "refused", "bad_signature") == 1.0).await, "{}", t());

    // Each refusal counted once, by reason; nothing changed anywhere.
    let t = t();
    for reason in ["unauthorized_publisher", "certificate", "older", "oversized", "bad_signature"] {
        assert_eq!(documents(&t, "refused", reason), 1.0, "{reason}: {t}");
    }
    assert_eq!((held(&m, 0), held(&m, 1)), before);
    assert!(runs_policy(&m, 0, "v5") && runs_policy(&m, 1, "v5"));
    assert!(!runs_policy(&m, 1, "v6") && !runs_policy(&m, 1, "intruder"));
    // The session that carried the tampered document is not closed for it.
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_applies_at_different_gateways_end_with_every_gateway_on_the_same_version() {
    let mut m = mesh().await;
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 2).await);
    let (op, ..) = creds(&m, "operator", OPERATOR);
    // Two operators publish version 1 at the same moment, at a and at c.
    let doc_a = publish::sign(&op, 1, &audit_doc("from-a")).unwrap();
    let doc_c = publish::sign(&op, 1, &audit_doc("from-c")).unwrap();
    let digests = [
        causeway_overlay::core::documents::hex(&sha256(&doc_a.body)),
        causeway_overlay::core::documents::hex(&sha256(&doc_c.body)),
    ];
    let (admin_a, admin_c) = (m.gw(0).admin_addr.unwrap(), m.gw(2).admin_addr.unwrap());
    let (ra, rc) = tokio::join!(publish::post(admin_a, &doc_a), publish::post(admin_c, &doc_c));
    let (ra, rc) = (ra.unwrap(), rc.unwrap());
    assert!([ra.0, rc.0].contains(&200), "{ra:?} {rc:?}");
    // The one with the higher digest wins everywhere, whatever the arrival order.
    let converged = || {
        let h: Vec<_> = (0..3).map(|i| held(&m, i)).collect();
        h.iter().all(|x| x.is_some() && *x == h[0])
    };
    assert!(
        eventually(Duration::from_secs(5), converged).await,
        "{:?}",
        (0..3).map(|i| held(&m, i)).collect::<Vec<_>>()
    );
    let (version, digest) = held(&m, 0).unwrap();
    assert_eq!(version, 1);
    let winner = if digests[0] > digests[1] { "from-a" } else { "from-c" };
    assert_eq!(digest, *digests.iter().max().unwrap(), "the higher digest wins");
    assert!(eventually(Duration::from_secs(5), || (0..3).all(|i| runs_policy(&m, i, winner))).await);
    // Whoever published the other one is told it was superseded.
    let loser = digests.iter().min().unwrap();
    let (outcome, view) = publish::follow(admin_c, 1, loser, Duration::from_secs(5)).await.unwrap();
    assert_eq!(outcome, publish::Outcome::Superseded { by: 1 }, "{view}");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_pushed_as_a_document_revokes_open_tcp_flows_it_no_longer_allows() {
    let mut m = mesh().await;
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 2).await);
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flows: Vec<_> = (0..4).map(|i| tokio::spawn(long_flow(listen, i, stop.clone()))).collect();
    let open =
        || (1..3).map(|i| metric(&m.gw(i).metrics_text(), "causeway_flows_active", &[]).unwrap_or(0.0)).sum::<f64>();
    assert!(eventually(Duration::from_secs(5), || open() >= 4.0).await, "flows never opened");
    // Deny everything in every zone that exports: open flows are asked again and reset.
    let (op, ..) = creds(&m, "operator", OPERATOR);
    let (code, answer) = publish_at(&m, 1, &op, 1, "authorization: { default_deny: true }\n").await;
    assert_eq!(code, 200, "{answer}");
    for f in flows {
        let r = tokio::time::timeout(Duration::from_secs(10), f).await.expect("a revoked flow stayed open").unwrap();
        assert!(r.is_err(), "a flow the pushed policy denies ran to its end: {r:?}");
    }
    let revoked: f64 = (1..3)
        .map(|i| {
            metric(&m.gw(i).metrics_text(), "causeway_flows_revoked_total", &[("service", "echo.test")]).unwrap_or(0.0)
        })
        .sum();
    assert_eq!(revoked, 4.0);
    assert!(echo_flow(listen, b"new").await.is_err(), "a new flow passed the pushed deny");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    m.shutdown().await;
}

/// An HTTP/1.1 backend answering every GET with its version (argv[1]).
const VERSION_PY: &str = r#"
import http.server, sys
version = sys.argv[1].encode() + b"\n"
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(version)))
        self.end_headers()
        self.wfile.write(version)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// A gateway process running `yaml`, its log in a file, and the addresses it bound (its admin
/// API, its first import listener), read from its `gateway.started` line.
struct Started {
    _proc: GatewayProcess,
    log: std::path::PathBuf,
    admin: std::net::SocketAddr,
    import: Option<std::net::SocketAddr>,
}

/// Runs `yaml` as a gateway process and waits for it to start (at most 10 s).
async fn gateway_process(m: &TestMesh, name: &str, yaml: &str) -> Started {
    let path = m.pki.dir.join(format!("{name}-process.yaml"));
    let log = m.pki.dir.join(format!("{name}-process.log"));
    std::fs::write(&path, yaml).unwrap();
    let child = std::process::Command::new(causeway_bin())
        .args(["gateway", "--config"])
        .arg(path)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn causeway gateway");
    let proc = GatewayProcess(child);
    let addr_after = |line: &str, key: &str| -> Option<std::net::SocketAddr> {
        let rest = &line[line.find(key)? + key.len()..];
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':')).unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    for _ in 0..200 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("gateway.started")) {
            let admin = addr_after(line, "admin=Some(").expect("an admin address");
            let import = addr_after(line, "\", ");
            return Started { _proc: proc, log, admin, import };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} did not start:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
}

/// `causeway args…` in a blocking thread: (exit code, stdout, stderr).
async fn cli(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(causeway_bin()).args(&args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

async fn admin_metric(admin: std::net::SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = causeway::admin::get(admin, "/metrics").await.unwrap_or((0, String::new()));
    metric(&text, name, labels).unwrap_or(0.0)
}

fn canary(v2_weight: u32) -> String {
    format!(
        "# Every zone audits calls from namespace nobody; zone a splits reviews.shop between v1 and v2.
authorization:
  policies:
    - name: mesh-audit
      action: audit
      rules: [{{ from: {{ namespaces: [nobody] }} }}]
zones:
  a:
    http_routes:
      - name: canary
        service: reviews.shop
        rules:
          - backends: [{{ subset: {{ version: v1 }}, weight: {} }}, {{ subset: {{ version: v2 }}, weight: {v2_weight} }}]
",
        100 - v2_weight
    )
}

/// Three gateway processes; `causeway apply` at zone a's admin; every gateway reports the route
/// change applied within a second of its publication, `causeway status --mesh` at another zone
/// shows it, and a canary weight shift published this way under wrk load loses no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causeway_apply_at_one_zone_is_in_force_at_every_gateway_and_a_canary_shift_under_wrk_loses_nothing() {
    init();
    let (v1, v2) = (web::py_server(VERSION_PY, &["v1"]), web::py_server(VERSION_PY, &["v2"]));
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("reviews.shop", vec![])] },
            ZoneSpec { zone: "east", exports: vec![("reviews.shop", vec![v1.addr])], imports: vec![] },
            ZoneSpec { zone: "west", exports: vec![("reviews.shop", vec![v2.addr])], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    with_control(&mut m);
    let mut procs = Vec::new();
    for (i, version) in [(0, ""), (1, "v1"), (2, "v2")] {
        let yaml =
            m.specs[i].yaml().replace("{ service: reviews.shop,", "{ service: reviews.shop, protocol: http,").replace(
                "{ name: reviews.shop,",
                &format!("{{ name: reviews.shop, protocol: http, labels: {{ version: {version} }},"),
            );
        procs.push(gateway_process(&m, &m.specs[i].zone.clone(), &yaml).await);
    }
    let admins: Vec<_> = procs.iter().map(|p| p.admin).collect();
    let listen = procs[0].import.expect("zone a's listener");
    let logs = || {
        procs.iter().map(|p| std::fs::read_to_string(&p.log).unwrap_or_default()).collect::<Vec<_>>().join("\n----\n")
    };
    let routed = || async {
        let (_, body) = causeway::admin::get(admins[0], "/services").await.unwrap_or((0, String::new()));
        let s: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        s["services"].as_array().into_iter().flatten().any(|x| x["route_order"].as_array().map(Vec::len) == Some(2))
    };
    let t0 = std::time::Instant::now();
    while !routed().await {
        assert!(t0.elapsed() < Duration::from_secs(15), "zone a never routed reviews.shop to both zones:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, cert, key) = creds(&m, "operator", OPERATOR);
    let apply = |doc: String, name: &str| {
        let path = m.pki.dir.join(name);
        std::fs::write(&path, doc).unwrap();
        let args = [
            "apply",
            "-f",
            path.to_str().unwrap(),
            "--admin",
            &admins[0].to_string(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        cli(args.iter().map(|s| s.to_string()).collect())
    };

    // A dry run says which keys apply in which zone, and publishes nothing.
    let path = m.pki.dir.join("canary-dry.yaml");
    std::fs::write(&path, canary(0)).unwrap();
    let args = [
        "apply",
        "--dry-run",
        "-f",
        path.to_str().unwrap(),
        "--admin",
        &admins[0].to_string(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    let (code, out, err) = cli(args.iter().map(|s| s.to_string()).collect()).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("zone a: http_routes <- zones.a.http_routes, authorization <- authorization"), "{out}");
    assert!(out.contains("zone west: authorization <- authorization\n"), "{out}");
    assert!(publish::mesh_view(admins[0]).await.unwrap()["document"].is_null());

    // Version 1: everything to v1.
    let (code, out, err) = apply(canary(0), "canary-0.yaml").await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("published version 1"), "{out}");
    let view = publish::mesh_view(admins[1]).await.unwrap();
    let published = view["document"]["published_ms"].as_u64().unwrap();
    let rows = view["gateways"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{view}");
    for r in rows {
        assert_eq!((r["state"].as_str(), r["version"].as_u64()), (Some("applied"), Some(1)), "{view}");
        let took = r["at_ms"].as_u64().unwrap().saturating_sub(published);
        eprintln!("{} applied version 1 {took} ms after its publication", r["zone"]);
        assert!(took < 1000, "{} applied {took} ms after publication", r["zone"]);
    }

    // Under wrk, version 2 shifts half the requests to v2.
    let url = format!("http://{listen}/reviews");
    let wrk = std::thread::spawn(move || {
        std::process::Command::new("wrk")
            .args(["-t", "1", "-c", "4", "-d", "4s", "--timeout", "2s", &url])
            .output()
            .unwrap()
    });
    let served =
        |i: usize| admin_metric(admins[i], "causeway_http_requests_total", &[("route", "inbound"), ("code", "200")]);
    let t0 = std::time::Instant::now();
    while served(1).await < 50.0 {
        assert!(t0.elapsed() < Duration::from_secs(3), "v1 never got load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served(2).await, 0.0, "v2 served before the shift");
    let (code, out, err) = apply(canary(50), "canary-50.yaml").await;
    assert_eq!(code, 0, "{out}{err}");
    let report = tokio::task::spawn_blocking(move || wrk.join().unwrap()).await.unwrap();
    let text = String::from_utf8_lossy(&report.stdout).to_string();
    assert!(report.status.success(), "wrk: {text}{}", String::from_utf8_lossy(&report.stderr));
    assert!(!text.contains("Non-2xx") && !text.contains("Socket errors"), "{text}");
    let (east, west) = (served(1).await, served(2).await);
    eprintln!("canary shift under wrk: v1 {east}, v2 {west} requests\n{text}");
    assert!(west >= 50.0, "v2 served {west} after the shift");

    // Another zone's view: every gateway on version 2.
    let (code, out, err) = cli(vec!["status".into(), "--mesh".into(), "--admin".into(), admins[2].to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("document: version 2 "), "{out}");
    let applied: Vec<_> = out.lines().filter(|l| l.contains(" applied ") && l.contains("      2 ")).collect();
    assert_eq!(applied.len(), 3, "{out}");
    for admin in &admins {
        assert_eq!(admin_metric(*admin, "causeway_mesh_document_version", &[]).await, 2.0);
    }
    drop(procs);
}

/// GitOps: gateway a watches a document file and publishes it, signed with its own identity (a
/// listed publisher), whenever its content differs from the document held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_document_file_is_published_by_its_gateway_and_each_edit_becomes_a_new_version() {
    let mut m = echo_three_zones().await;
    let file = m.pki.dir.join("gitops-mesh.yaml");
    for i in 0..3 {
        let own = if i == 0 { format!(", document_file: \"{}\"", file.display()) } else { String::new() };
        m.specs[i].extra.push_str(&format!(
            "timing: {{ watch_interval: 100ms }}\ncontrol: {{ publishers: [\"{OPERATOR}\", \"{}\"]{own} }}\n",
            m.ids[0]
        ));
    }
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 2).await);
    std::fs::write(&file, audit_doc("gitops-1")).unwrap();
    assert!(eventually(Duration::from_secs(5), || (0..3).all(|i| runs_policy(&m, i, "gitops-1"))).await);
    assert_eq!(m.gw(2).mesh.held_document().map(|h| (h.version, h.publisher.clone())), Some((1, m.ids[0].clone())));
    // An edit is the next version; a file that is not a document is refused and changes nothing.
    std::fs::write(&file, audit_doc("gitops-2")).unwrap();
    assert!(eventually(Duration::from_secs(5), || (0..3).all(|i| runs_policy(&m, i, "gitops-2"))).await);
    let errors = error_logs();
    std::fs::write(&file, "peers: []\n").unwrap();
    assert!(eventually(Duration::from_secs(5), || error_logs() > errors).await, "the bad file was never refused");
    assert_eq!(held(&m, 1).map(|h| h.0), Some(2));
    assert!(runs_policy(&m, 1, "gitops-2"));
    m.shutdown().await;
}

/// A document that does not fit one zone (a policy for a service that zone does not export) is
/// refused there and reported with the key path, while the zones it fits apply it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_that_does_not_fit_a_zone_is_refused_there_and_reported_while_the_others_apply_it() {
    let mut m = mesh().await;
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 2).await);
    let (op, ..) = creds(&m, "operator", OPERATOR);
    let doc = "authorization:
  policies:
    - { name: echo-callers, service: echo.test, action: allow, rules: [{ from: { namespaces: [shop] } }] }
";
    let (code, answer) = publish_at(&m, 0, &op, 1, doc).await;
    assert_eq!(code, 200, "{answer}");
    let digest = answer["digest"].as_str().unwrap().to_string();
    let (outcome, view) =
        publish::follow(m.gw(0).admin_addr.unwrap(), 1, &digest, Duration::from_secs(5)).await.unwrap();
    assert_eq!(outcome, publish::Outcome::Refused, "{view}");
    let row = |zone: &str| view["gateways"].as_array().unwrap().iter().find(|r| r["zone"] == zone).unwrap().clone();
    let a = row("a");
    assert_eq!(a["state"], "refused", "{view}");
    let reason = a["reason"].as_str().unwrap();
    assert!(reason.contains("authorization.policies[0].service") && reason.contains("not exported"), "{reason}");
    assert_eq!((row("b")["state"].as_str(), row("c")["state"].as_str()), (Some("applied"), Some("applied")), "{view}");
    assert!(runs_policy(&m, 1, "echo-callers") && !runs_policy(&m, 0, "echo-callers"));
    let t = m.gw(0).metrics_text();
    assert_eq!(metric(&t, "causeway_mesh_document_applies_total", &[("result", "refused")]), Some(1.0), "{t}");
    // One audit line per gateway and outcome: who published what (its digest), and the result.
    let audit = |result: &'static str| {
        let digest = digest.clone();
        move |l: &AccessLine| l.get("kind") == "document" && l.get("result") == result && l.get("digest") == digest
    };
    let applied = access_lines(2, audit("applied")).await;
    assert_eq!(applied.len(), 2, "{applied:?}");
    assert!(applied.iter().all(|l| l.get("publisher") == OPERATOR && l.get("version") == "1"), "{applied:?}");
    let refused = access_lines(1, audit("refused")).await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].get("reason").contains("not exported"), "{refused:?}");
    m.shutdown().await;
}

/// Documents cross any chain of peer connections: here a and c are not peers, and b relays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_reaches_a_zone_that_is_no_peer_of_the_publishing_one_through_the_zone_between() {
    let mut m = mesh().await;
    let (a, c) = (m.ids[0].clone(), m.ids[2].clone());
    m.specs[0].peers.retain(|p| p.0 != c);
    m.specs[2].peers.retain(|p| p.0 != a);
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await);
    let (op, ..) = creds(&m, "operator", OPERATOR);
    let (code, answer) = publish_at(&m, 0, &op, 1, &audit_doc("relayed")).await;
    assert_eq!(code, 200, "{answer}");
    assert!(eventually(Duration::from_secs(5), || runs_policy(&m, 2, "relayed")).await, "c never got it through b");
    // c's report comes back the same way: a sees every gateway applied.
    let digest = answer["digest"].as_str().unwrap().to_string();
    let (outcome, view) =
        publish::follow(m.gw(0).admin_addr.unwrap(), 1, &digest, Duration::from_secs(5)).await.unwrap();
    assert_eq!(outcome, publish::Outcome::Applied, "{view}");
    assert_eq!(view["gateways"].as_array().unwrap().len(), 3, "{view}");
    m.shutdown().await;
}
