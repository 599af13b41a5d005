//! Hostile peers against a gateway process: HTTP/3 frames declaring a terabyte are stopped before
//! they are buffered, the gateway's memory stays within its per-peer budget, and its other peers
//! keep flowing.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use causeway_overlay::transport::CONNECTION_WINDOW;
use causeway_tests::rogue;
use causeway_tests::*;

fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 =
        s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn varint(v: u64) -> Vec<u8> {
    match v {
        0..=63 => vec![v as u8],
        64..=16383 => ((v as u16) | 0x4000).to_be_bytes().to_vec(),
        16384..=1_073_741_823 => ((v as u32) | 0x8000_0000).to_be_bytes().to_vec(),
        _ => (v | 0xc000_0000_0000_0000).to_be_bytes().to_vec(),
    }
}

/// Writes a frame header declaring 1 TiB, then up to `limit` bytes of payload; returns how many
/// payload bytes the gateway let through before stopping the stream (None: it never did).
async fn flood(mut send: quinn::SendStream, prefix: Vec<u8>, frame_type: u64, limit: u64) -> Option<(u64, u64)> {
    let mut head = prefix;
    head.extend(varint(frame_type));
    head.extend(varint(1 << 40));
    send.write_all(&head).await.ok()?;
    let chunk = vec![0x5a_u8; 1 << 20];
    let mut sent = 0u64;
    while sent < limit {
        match send.write(&chunk).await {
            Ok(n) => sent += n as u64,
            Err(quinn::WriteError::Stopped(code)) => return Some((sent, code.into_inner())),
            Err(_) => return None,
        }
    }
    // Everything fit in the flow-control window: the STOP_SENDING must still come.
    match tokio::time::timeout(Duration::from_secs(5), send.stopped()).await {
        Ok(Ok(Some(code))) => Some((sent, code.into_inner())),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terabyte_frames_are_stopped_before_buffering() {
    init();
    let (echo, _) = echo_server("b".into()).await.unwrap();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("echo.test", vec![])] },
            ZoneSpec { zone: "b", exports: vec![("echo.test", vec![echo])], imports: vec![] },
            ZoneSpec { zone: "c", exports: vec![], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    let b = GatewayProcess::spawn(&m, 1, "error");
    m.start(0).await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await);
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    echo_flow(listen, b"warm up").await.unwrap();
    let before = rss(b.pid());

    // Zone c's identity (configured on b) turns hostile.
    let creds =
        rogue::credentials(&m.pki, &m.ids[2], Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    let (_ep, conn) = rogue::dial(creds.0, creds.1, &m.ids[1], m.addrs[1]).await.unwrap();
    const H3_EXCESSIVE_LOAD: u64 = 0x107;
    const ATTEMPT: u64 = 300 << 20;
    // HEADERS (0x1) and a reserved type (0x21) on one request stream each, then HEADERS on 100.
    for ty in [0x1, 0x21] {
        let (send, _recv) = conn.open_bi().await.unwrap();
        let (through, code) = flood(send, vec![], ty, ATTEMPT).await.expect("stream never stopped");
        assert_eq!(code, H3_EXCESSIVE_LOAD);
        assert!(through <= 16 << 20, "{through} bytes let through on one stream");
    }
    let floods: Vec<_> = (0..100)
        .map(|_| {
            let conn = conn.clone();
            tokio::spawn(async move {
                let (send, _recv) = conn.open_bi().await.unwrap();
                flood(send, vec![], 0x1, ATTEMPT / 100).await
            })
        })
        .collect();
    for f in floods {
        let (_, code) = f.await.unwrap().expect("one of 100 streams never stopped");
        assert_eq!(code, H3_EXCESSIVE_LOAD);
    }
    // The other peer keeps flowing meanwhile.
    let data = payload(4 << 20, 3);
    assert_eq!(echo_flow(listen, &data).await.unwrap().0, "b");
    // SETTINGS of 1 TiB on the control stream (unidirectional, type 0x00): the connection is closed.
    let uni = conn.open_uni().await.unwrap();
    let _ = flood(uni, vec![0x00], 0x4, ATTEMPT).await;
    let (code, _) =
        rogue::close_code(&conn, Duration::from_secs(5)).await.expect("control flood did not close the connection");
    assert_eq!(code, H3_EXCESSIVE_LOAD);
    let grown = rss(b.pid()).saturating_sub(before);
    assert!(grown < u64::from(CONNECTION_WINDOW), "gateway grew by {grown} bytes, budget {CONNECTION_WINDOW}");
    eprintln!("gateway b RSS grew by {} KiB under the floods", grown / 1024);
    assert_eq!(echo_flow(listen, &data).await.unwrap().0, "b");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_targets_outside_the_catalog_are_forbidden() {
    let (m, listen) = echo_pair_with_c("").await;
    // A sentinel listener: nothing may ever connect to it through the gateway.
    let sentinel = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sentinel_addr = sentinel.local_addr().unwrap();
    let creds =
        rogue::credentials(&m.pki, &m.ids[2], Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    let (_ep, conn) = rogue::dial(creds.0, creds.1, &m.ids[1], m.addrs[1]).await.unwrap();
    let mut ctl = rogue::open_control(&conn).await.unwrap();
    let admin = m.gw(1).admin_addr.unwrap();
    let targets = [
        sentinel_addr.to_string(),
        "169.254.169.254:80".to_string(),
        m.addrs[1].to_string(),
        admin.to_string(),
        "10.0.0.1:80".to_string(),
        "nothere.svc:80".to_string(),
        format!("echo.test:{}", SERVICE_PORT + 1),
    ];
    for t in &targets {
        let mut s = ctl.requests.send_request(http::Request::connect(t.as_str()).body(()).unwrap()).await.unwrap();
        let resp = s.recv_response().await.unwrap();
        assert_eq!(resp.status(), 403, "{t}");
        assert_eq!(resp.headers()["causeway-error"], "forbidden_target", "{t}");
    }
    let accepted = tokio::time::timeout(Duration::from_millis(200), sentinel.accept()).await;
    assert!(accepted.is_err(), "the sentinel saw a connection");
    let t = m.gw(1).metrics_text();
    assert_eq!(
        metric(&t, "causeway_inbound_flows_total", &[("outcome", "forbidden_target")]),
        Some(targets.len() as f64)
    );
    assert_eq!(echo_flow(listen, b"still fine").await.unwrap().0, "b");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_from_unlisted_sources_are_refused_before_crypto() {
    // b accepts handshakes only from 127.0.0.2 and its configured peers' addresses (127.0.0.1).
    let (m, listen) = echo_pair_with_c("allowed_sources: [127.0.0.2/32]\n").await;
    let creds =
        || rogue::credentials(&m.pki, &m.ids[2], Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    let (c1, b1) = creds();
    let refused = rogue::dial_from("127.0.0.3:0".parse().unwrap(), c1, b1, &m.ids[1], m.addrs[1]).await;
    assert!(refused.is_err(), "a handshake from 127.0.0.3 went through");
    let t = m.gw(1).metrics_text();
    assert_eq!(metric(&t, "causeway_quic_initials_refused_total", &[("reason", "source_not_allowed")]), Some(1.0));
    assert_eq!(metric(&t, "causeway_peer_handshake_failures_total", &[]), None, "no crypto was spent");
    let (c2, b2) = creds();
    let (_ep, conn) = rogue::dial_from("127.0.0.2:0".parse().unwrap(), c2, b2, &m.ids[1], m.addrs[1]).await.unwrap();
    assert!(conn.close_reason().is_none());
    assert_eq!(echo_flow(listen, b"peers unaffected").await.unwrap().0, "b");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_drip_control_frame_is_cut_at_its_deadline() {
    use causeway_protocol::control::{self, Hello, Message};
    let (m, _) = echo_pair_with_c("").await;
    let creds =
        rogue::credentials(&m.pki, &m.ids[2], Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    let (_ep, conn) = rogue::dial(creds.0, creds.1, &m.ids[1], m.addrs[1]).await.unwrap();
    let mut ctl = rogue::open_control(&conn).await.unwrap();
    let mut start = control::preface(control::VERSION).to_vec();
    start.extend_from_slice(
        &control::encode(&Message::Hello(Hello {
            zone: "c".parse().unwrap(),
            gateway: "gw-1".parse().unwrap(),
            features: 0,
        }))
        .unwrap(),
    );
    // A frame of 1,000 bytes, one byte a second.
    start.extend_from_slice(&1000u32.to_be_bytes());
    ctl.stream.send_data(bytes::Bytes::from(start)).await.unwrap();
    let started = std::time::Instant::now();
    let drip = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if ctl.stream.send_data(bytes::Bytes::from_static(&[0])).await.is_err() {
                return;
            }
        }
    };
    let closed = tokio::select! {
        c = rogue::close_code(&conn, Duration::from_secs(20)) => c,
        _ = drip => rogue::close_code(&conn, Duration::from_secs(1)).await,
    };
    let (code, reason) = closed.expect("the slow drip was never cut");
    assert_eq!(causeway_protocol::ErrorCode(code), causeway_protocol::ErrorCode::CONTROL_TRUNCATED, "{reason}");
    assert!(started.elapsed() >= Duration::from_secs(10) && started.elapsed() < Duration::from_secs(13));
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pinned_by_one_byte_headers_are_released_at_the_header_timeout() {
    // b gives request headers 1 s to complete (the default is 10 s).
    let (m, listen) = echo_pair_with_c("timing: { header_timeout: 1s }\n").await;
    let creds =
        rogue::credentials(&m.pki, &m.ids[2], Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    let (_ep, conn) = rogue::dial(creds.0, creds.1, &m.ids[1], m.addrs[1]).await.unwrap();
    // 2,000 streams, each holding one byte of a HEADERS frame (its type) and nothing more.
    let pinned: Vec<_> = (0..2000)
        .map(|_| {
            let conn = conn.clone();
            tokio::spawn(async move {
                let (mut send, _recv) = conn.open_bi().await.unwrap();
                send.write_all(&[0x01]).await.unwrap();
                tokio::time::timeout(Duration::from_secs(5), send.stopped()).await
            })
        })
        .collect();
    // Meanwhile another peer's flows are unaffected.
    let started = std::time::Instant::now();
    assert_eq!(echo_flow(listen, b"unaffected").await.unwrap().0, "b");
    assert!(started.elapsed() < Duration::from_secs(1));
    for p in pinned {
        let stopped = p.await.unwrap();
        assert!(matches!(stopped, Ok(Ok(_))), "a pinned stream was not released: {stopped:?}");
    }
    m.shutdown().await;
}
