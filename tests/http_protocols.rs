//! HTTP across zones beyond HTTP/1.1 GETs: HTTP/2 with prior knowledge (curl), gRPC (Python's
//! grpcio at both ends: unary and server-streaming calls, status codes, trailers, deadlines),
//! 64 MiB chunked bodies both ways checked by digest, and a WebSocket echo through the Upgrade
//! tunnel. Real programs at both ends; zone a imports the service, zone east exports it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;
use std::time::{Duration, Instant};

use causeway_tests::web::{py_server, two_zone_mesh};
use causeway_tests::*;

/// An HTTP/1.1 server for bulk bodies. `PUT` (chunked or not) answers `<bytes> <sha256>`;
/// `GET /bulk/<n>` streams `n` chunks of 64 KiB (chunk k: bytes `(k + i) mod 251`), chunked.
const BULK_PY: &str = r#"
import hashlib, http.server
CHUNK = 65536
base = bytes(range(251)) * 263
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_PUT(self):
        h, n = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(size)
                h.update(data)
                n += len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                h.update(data)
                n += len(data)
                left -= len(data)
        body = ("%d %s" % (n, h.hexdigest())).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        n = int(self.path.rsplit("/", 1)[1])
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for k in range(n):
            o = k % 251
            self.wfile.write(b"%x\r\n" % CHUNK + base[o:o + CHUNK] + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// What `GET /bulk/<n>` sends.
fn bulk(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 65536);
    for k in 0..n {
        out.extend((0..65536).map(|i| ((k + i) % 251) as u8));
    }
    out
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// curl with `args`; (stdout, stderr), asserting success.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS", "--max-time", "120"]).args(args).output().unwrap();
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_chunked_both_ways_arrive_intact() {
    let server = py_server(BULK_PY, &[]);
    let (m, listen) = two_zone_mesh("bulk.shop", vec![server.addr], "protocol: http,", "protocol: http,", "").await;
    let dir = m.pki.dir.clone();
    // Upload: 64 MiB of a seeded payload, chunked (no length known ahead).
    let up = payload(64 << 20, 7);
    let want = format!("{} {}", up.len(), hex(&sha256(&up)));
    let file = dir.join("upload.bin");
    std::fs::write(&file, &up).unwrap();
    let url = format!("http://{listen}/upload");
    let f = file.to_string_lossy().to_string();
    let got = blocking(move || curl(&["-T", &f, "-H", "Transfer-Encoding: chunked", &url])).await;
    assert_eq!(got.trim(), want, "the endpoint read something else");
    // Download: 1,024 chunks of 64 KiB, chunked by the endpoint.
    let file = dir.join("download.bin");
    let (url, f) = (format!("http://{listen}/bulk/1024"), file.to_string_lossy().to_string());
    let code = blocking(move || curl(&["-o", &f, "-w", "%{http_code}", &url])).await;
    assert_eq!(code, "200");
    let down = std::fs::read(&file).unwrap();
    assert_eq!(down.len(), 64 << 20);
    assert!(sha256(&down) == sha256(&bulk(1024)), "the download differs from what the endpoint sent");
    // Both crossed the overlay as HTTP requests, each with its access-log lines.
    for (method, path) in [("PUT", "/upload"), ("GET", "/bulk/1024")] {
        let mine = access_lines(2, |l| l.get("path") == path && l.get("method") == method).await;
        let dirs: Vec<_> = mine.iter().map(|l| l.get("direction")).collect();
        assert!(dirs.contains(&"outbound") && dirs.contains(&"inbound"), "{path}: {mine:?}");
        assert!(mine.iter().all(|l| l.get("status") == "200"), "{mine:?}");
    }
    // The bytes each end counted, and the endpoint that answered. (The HTTP/2 test's upload goes
    // to another server: lines are told apart by endpoint.)
    let ep = server.addr.to_string();
    let inbound = |path: &'static str| {
        let ep = ep.clone();
        access_lines(1, move |l| l.get("path") == path && l.get("direction") == "inbound" && l.get("endpoint") == ep)
    };
    let up = inbound("/upload").await;
    assert_eq!(up[0].get("bytes_up"), (64u64 << 20).to_string(), "{up:?}");
    // The source counts the request body too (the HTTP/2 test's upload is 4 MiB: told apart by size).
    let sent = (64u64 << 20).to_string();
    let out_up = access_lines(1, |l| {
        l.get("path") == "/upload" && l.get("direction") == "outbound" && l.get("bytes_up") == sent
    })
    .await;
    assert_eq!(out_up.len(), 1, "no outbound line counted the 64 MiB upload");
    let down = inbound("/bulk/1024").await;
    assert_eq!(down[0].get("bytes_down"), (64u64 << 20).to_string(), "{down:?}");
    let out = access_lines(1, |l| l.get("path") == "/bulk/1024" && l.get("direction") == "outbound").await;
    assert_eq!((out[0].get("bytes_down"), out[0].get("outcome")), ((64u64 << 20).to_string().as_str(), "complete"));
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge_crosses_the_mesh() {
    let server = py_server(BULK_PY, &[]);
    let (m, listen) = two_zone_mesh("bulk.shop", vec![server.addr], "protocol: http,", "protocol: http,", "").await;
    // One curl per request: curl 7.88 (Debian 12) never sends a second request on a reused
    // prior-knowledge connection (gRPC's test below has many calls on one HTTP/2 connection).
    let url = format!("http://{listen}/bulk/16");
    let args = ["--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code} %{size_download}"];
    let out = blocking(move || curl(&[&args[..], &[url.as_str()]].concat())).await;
    assert_eq!(out, "2 200 1048576");
    let up = format!("http://{listen}/upload");
    let data = payload(4 << 20, 3);
    let want = format!("{} {}", data.len(), hex(&sha256(&data)));
    let file = m.pki.dir.join("h2-upload.bin");
    std::fs::write(&file, &data).unwrap();
    let f = file.to_string_lossy().to_string();
    let out = blocking(move || curl(&["--http2-prior-knowledge", "-w", "\n%{http_version}", "-T", &f, &up])).await;
    assert_eq!(out, format!("{want}\n2"));
    let text = m.gw(0).metrics_text();
    let served = metric(&text, "causeway_http_requests_total", &[("service", "bulk.shop"), ("code", "200")]);
    assert_eq!(served, Some(2.0), "{text}");
    m.shutdown().await;
}

/// A gRPC server (grpcio, no generated code: raw bytes) with `demo.Echo` methods: `Unary` echoes
/// with a trailer, `Stream` sends n messages, `Fail` aborts with NOT_FOUND and a trailer, `Slow`
/// answers after 3 s, `Remaining` answers the deadline it was given.
const GRPC_SERVER_PY: &str = r#"
import grpc, time
from concurrent import futures
def unary(req, ctx):
    ctx.set_trailing_metadata((("x-served-by", "east"),))
    return b"echo:" + req
def stream(req, ctx):
    for i in range(int(req.decode())):
        yield ("msg-%d" % i).encode()
def fail(req, ctx):
    ctx.set_trailing_metadata((("x-reason", "missing"),))
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
def slow(req, ctx):
    time.sleep(3)
    return b"late"
def remaining(req, ctx):
    return repr(ctx.time_remaining()).encode()
h = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Stream": grpc.unary_stream_rpc_method_handler(stream),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
    "Remaining": grpc.unary_unary_rpc_method_handler(remaining),
}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Echo", h),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"#;

/// The gRPC client: every call against the target in argv[1], results as JSON.
const GRPC_CLIENT_PY: &str = r#"
import grpc, json, sys, time
ch = grpc.insecure_channel(sys.argv[1])
out = {}
resp, call = ch.unary_unary("/demo.Echo/Unary").with_call(b"hello", timeout=10)
out["unary"] = [resp.decode(), call.code().name, dict(call.trailing_metadata())]
out["stream"] = [m.decode() for m in ch.unary_stream("/demo.Echo/Stream")(b"5", timeout=10)]
try:
    ch.unary_unary("/demo.Echo/Fail")(b"x", timeout=10)
    out["fail"] = "succeeded"
except grpc.RpcError as e:
    out["fail"] = [e.code().name, e.details(), dict(e.trailing_metadata())]
out["remaining"] = float(ch.unary_unary("/demo.Echo/Remaining")(b"x", timeout=5).decode())
t = time.time()
try:
    ch.unary_unary("/demo.Echo/Slow")(b"x", timeout=0.5)
    out["slow"] = "succeeded"
except grpc.RpcError as e:
    out["slow"] = [e.code().name, time.time() - t]
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_cross_zones_with_statuses_trailers_and_deadlines() {
    let server = py_server(GRPC_SERVER_PY, &[]);
    let (m, listen) = two_zone_mesh("echo.grpc", vec![server.addr], "protocol: grpc,", "protocol: grpc,", "").await;
    let target = listen.to_string();
    let out = blocking(move || Command::new("python3").args(["-c", GRPC_CLIENT_PY, &target]).output().unwrap()).await;
    assert!(out.status.success(), "grpc client: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["unary"], serde_json::json!(["echo:hello", "OK", { "x-served-by": "east" }]), "{r}");
    assert_eq!(r["stream"], serde_json::json!(["msg-0", "msg-1", "msg-2", "msg-3", "msg-4"]), "{r}");
    assert_eq!((&r["fail"][0], &r["fail"][1]), (&"NOT_FOUND".into(), &"no such thing".into()), "{r}");
    assert_eq!(r["fail"][2]["x-reason"], "missing", "{r}");
    // The client's deadline reached the server through both gateways (less the time on the way).
    let remaining = r["remaining"].as_f64().unwrap();
    assert!((3.0..5.5).contains(&remaining), "the server saw a deadline of {remaining} s, not ≈ 5 s");
    assert_eq!(r["slow"][0], "DEADLINE_EXCEEDED", "{r}");

    // The gateway enforces `grpc-timeout` itself: a raw HTTP/2 gRPC request (curl enforces no
    // deadline) to a method slower than it gets DEADLINE_EXCEEDED from the gateway, as a
    // trailers-only answer, long before the server would answer.
    let frame = m.pki.dir.join("grpc-frame.bin");
    std::fs::write(&frame, [0u8, 0, 0, 0, 1, b'x']).unwrap();
    let url = format!("http://{listen}/demo.Echo/Slow");
    let f = format!("@{}", frame.to_string_lossy());
    let started = Instant::now();
    let head = blocking(move || {
        curl(&[
            "--http2-prior-knowledge",
            "-i",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            "grpc-timeout: 300m",
            "--data-binary",
            &f,
            &url,
        ])
    })
    .await;
    let took = started.elapsed();
    assert!(head.contains("grpc-status: 4"), "{head}");
    assert!(head.contains("grpc-message: backend_timeout"), "{head}");
    assert!(took < Duration::from_millis(2500), "answered after {took:?}: the server's own answer comes at 3 s");
    let slow = |l: &AccessLine| l.get("direction") == "outbound" && l.get("path") == "/demo.Echo/Slow";
    let lines = access_lines(1, |l| slow(l) && l.get("grpc_status") == "4").await;
    assert_eq!(lines.first().map(|l| l.get("status")), Some("200"), "{:?}", access_lines(0, slow).await);
    // A call's status from its trailers is logged too.
    let fail = access_lines(1, |l| l.get("path") == "/demo.Echo/Fail" && l.get("direction") == "outbound").await;
    assert_eq!(fail.first().map(|l| l.get("grpc_status")), Some("5"), "NOT_FOUND: {fail:?}");
    let text = m.gw(0).metrics_text();
    assert!(metric(&text, "causeway_http_requests_total", &[("service", "echo.grpc")]).unwrap_or(0.0) >= 5.0, "{text}");
    m.shutdown().await;
}

/// A WebSocket echo server (the `websockets` package).
const WS_SERVER_PY: &str = r#"
from websockets.sync.server import serve
def echo(ws):
    for m in ws:
        ws.send(m)
with serve(echo, "127.0.0.1", 0, max_size=None) as server:
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever()
"#;

/// A WebSocket client: text, a 1 MiB binary message and 100 in a row, each echoed in order.
const WS_CLIENT_PY: &str = r#"
import os, sys
from websockets.sync.client import connect
with connect("ws://%s/chat" % sys.argv[1], max_size=None, open_timeout=10) as ws:
    ws.send("hello")
    assert ws.recv(timeout=10) == "hello"
    blob = os.urandom(1 << 20)
    ws.send(blob)
    assert ws.recv(timeout=20) == blob
    for i in range(100):
        ws.send("m%d" % i)
    got = [ws.recv(timeout=10) for _ in range(100)]
    assert got == ["m%d" % i for i in range(100)], got
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echo_works_through_the_mesh() {
    let server = py_server(WS_SERVER_PY, &[]);
    let (m, listen) = two_zone_mesh("chat.shop", vec![server.addr], "protocol: http,", "protocol: http,", "").await;
    let target = listen.to_string();
    let out = blocking(move || Command::new("python3").args(["-c", WS_CLIENT_PY, &target]).output().unwrap()).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "websocket client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = m.gw(0).metrics_text();
    let up = [("service", "chat.shop"), ("result", "upgraded")];
    assert_eq!(metric(&text, "causeway_http_upgrades_total", &up), Some(1.0), "{text}");
    // The tunnel is a flow across the overlay: its bytes are counted (≥ 1 MiB each way).
    let sent = metric(&text, "causeway_flow_bytes_total", &[("service", "chat.shop"), ("direction", "up")]);
    assert!(sent.unwrap_or(0.0) > 1_048_576.0, "{text}");
    let log = access_log();
    assert!(
        log.iter().any(|l| l.get("path") == "/chat" && l.get("status") == "101" && l.get("upgrade") == "websocket"),
        "{log:?}"
    );
    m.shutdown().await;
}
