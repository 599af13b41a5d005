//! Redirector hand-off on loopback (no iptables here: the test hands accepted sockets to the
//! redirector with the destination they would have had). The network-namespace suite runs the real
//! capture path.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use causeway::redirect::{self, Redirect};
use causeway_tests::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const NODE_PREFIX: &str = "spiffe://test.causeway/zone/a/node/";

/// A resolver standing in for the cluster DNS: answers every A query with 192.0.2.1.
async fn fake_upstream() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            for query in &q.queries {
                r.add_query(query.clone());
                r.add_answer(Record::from_rdata(query.name().clone(), 60, RData::A(A(Ipv4Addr::new(192, 0, 2, 1)))));
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    addr
}

async fn dns(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut q = Message::new(0x4242, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf)).await.unwrap().unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, 0x4242);
    r
}

/// A "captured" connection: the client end, and the redirector serving the accepted end as if it
/// had been redirected from `dst`.
async fn capture(r: &Redirect, dst: SocketAddr) -> TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (server, src) = l.accept().await.unwrap();
    let red = r.redirector.clone();
    tokio::spawn(async move { red.serve_captured(server, dst, src).await });
    client
}

async fn expect_reset(mut s: TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.expect("client left hanging");
    assert_eq!(r.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset));
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_flows_dns_and_failure_resets() {
    init();
    let (echo, _) = echo_server("b".into()).await.unwrap();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![] },
            ZoneSpec { zone: "b", exports: vec![("echo.test", vec![echo])], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    m.specs[0].extra = format!(
        "redirectors:\n  - {{ id_prefix: \"{NODE_PREFIX}\" }}\nworkloads:\n  - {{ cidr: 127.0.0.0/8, id: \"spiffe://test.causeway/ns/shop/sa/frontend\" }}\n"
    );
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await);

    let node_id = causeway_protocol::Identity::parse(&format!("{NODE_PREFIX}node-1")).unwrap();
    let (cert, key, bundle) =
        m.pki.issue("node-1", &node_id, Validity::for_duration(Duration::from_secs(3600))).unwrap();
    let upstream = fake_upstream().await;
    let yaml = format!(
        "node: node-1\ntrust_domain: test.causeway\ntls: {{ cert: \"{}\", key: \"{}\", bundle: \"{}\" }}\n\
         gateway: {{ address: \"{}\", id: \"{}\" }}\ncapture: {{ listen: \"127.0.0.1:0\" }}\n\
         dns: {{ listen: \"127.0.0.1:0\", upstream: \"{upstream}\" }}\n",
        cert.display(),
        key.display(),
        bundle.display(),
        m.addrs[0],
        m.ids[0]
    );
    let cfg = redirect::parse(&yaml).unwrap();
    let r = Redirect::start(&cfg, false).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || r.redirector.table().ports.contains_key(&"echo.test".parse().unwrap()))
            .await
    );
    let vip = r.redirector.table().vips.vip(&"echo.test".parse().unwrap()).unwrap();
    assert!(cfg.vip_range.contains(vip));

    // Mesh DNS: the VIP for a mesh name, NXDOMAIN for an unknown one, NODATA for AAAA, and other
    // names forwarded upstream.
    let dns_addr = r.dns_addr.unwrap();
    let a = dns(dns_addr, "echo.test.mesh.", RecordType::A).await;
    assert_eq!(a.answers.len(), 1);
    assert_eq!(a.answers[0].data, RData::A(A(vip)));
    let nx = dns(dns_addr, "nothing.here.mesh.", RecordType::A).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    let aaaa = dns(dns_addr, "echo.test.mesh.", RecordType::AAAA).await;
    assert_eq!((aaaa.metadata.response_code, aaaa.answers.len()), (ResponseCode::NoError, 0));
    let fwd = dns(dns_addr, "example.org.", RecordType::A).await;
    assert_eq!(fwd.answers[0].data, RData::A(A(Ipv4Addr::new(192, 0, 2, 1))));

    // A captured connection to the VIP reaches zone b.
    let dst = SocketAddr::from((vip, SERVICE_PORT));
    let client = capture(&r, dst).await;
    let (banner, _) = echo_on(client, &payload(256 * 1024, 7)).await;
    assert_eq!(banner, "b");
    let ta = m.gw(0).metrics_text();
    assert_eq!(metric(&ta, "causeway_redirector_flows_total", &[("outcome", "accepted")]), Some(1.0));
    assert_eq!(metric(&ta, "causeway_redirectors_connected", &[]), Some(1.0));
    assert!(
        eventually(Duration::from_secs(2), || metric(
            &r.metrics_text(),
            "causeway_captured_flows_total",
            &[("outcome", "complete")]
        ) == Some(1.0))
        .await
    );

    // An unknown VIP and a wrong port are reset at once.
    let unknown = capture(&r, SocketAddr::from(([240, 240, 255, 254], 80))).await;
    assert!(expect_reset(unknown).await < Duration::from_secs(1));
    let wrong_port = capture(&r, SocketAddr::from((vip, 1))).await;
    assert!(expect_reset(wrong_port).await < Duration::from_secs(1));
    let t = r.metrics_text();
    assert_eq!(metric(&t, "causeway_captured_flows_total", &[("outcome", "unknown_vip")]), Some(1.0));
    assert_eq!(metric(&t, "causeway_dns_queries_total", &[("result", "mesh_a")]), Some(1.0));
    assert_eq!(metric(&t, "causeway_dns_queries_total", &[("result", "forwarded")]), Some(1.0));

    // The node's certificate rotates: the redirector picks it up (it watches its files every 5 s)
    // and presents it from its next connection, the one after the gateway restart below.
    let before = metric(&r.metrics_text(), "causeway_tls_leaf_not_after_seconds", &[]);
    m.pki.issue("node-1", &node_id, Validity::for_duration(Duration::from_secs(7200))).unwrap();
    assert!(
        eventually(Duration::from_secs(8), || metric(
            &r.metrics_text(),
            "causeway_tls_reloads_total",
            &[("result", "ok")]
        ) == Some(1.0))
        .await,
        "the redirector did not reload its certificate"
    );
    assert!(metric(&r.metrics_text(), "causeway_tls_leaf_not_after_seconds", &[]) > before);

    // Gateway down: captured connections are reset within a second; the redirector reconnects.
    let gw_a = m.gateways[0].take().unwrap();
    gw_a.shutdown().await;
    assert!(eventually(Duration::from_secs(3), || !r.redirector.connected()).await);
    let down = capture(&r, dst).await;
    assert!(expect_reset(down).await < Duration::from_secs(1));
    // The old gateway's UDP socket is released once its last connection task ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = m.start(0).await {
        assert!(Instant::now() < deadline, "gateway a could not restart: {e:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(eventually(Duration::from_secs(10), || r.redirector.connected()).await, "redirector did not reconnect");
    assert!(m.wait_routes(0, "echo.test", 1).await);
    let again = capture(&r, dst).await;
    assert_eq!(echo_on(again, b"back").await.0, "b");
    r.stop().await.unwrap();
    m.shutdown().await;
}

/// Sends `data` on an open connection to an echo service, half-closes, and checks the echo.
async fn echo_on(mut s: TcpStream, data: &[u8]) -> (String, usize) {
    use tokio::io::AsyncWriteExt;
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let (_, got) = tokio::join!(send, recv);
    let nl = got.iter().position(|b| *b == b'\n').unwrap();
    assert_eq!(&got[nl + 1..], data);
    (String::from_utf8_lossy(&got[..nl]).into_owned(), got.len())
}
