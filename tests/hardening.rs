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
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                send.write_all(&[0x01]).await.unwrap();
                // Released with an error code, not a clean (empty) end: H3_REQUEST_INCOMPLETE.
                let read = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024)).await;
                read.map(|r| match r {
                    Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => Ok(code.into_inner()),
                    other => Err(format!("{other:?}")),
                })
            })
        })
        .collect();
    // Meanwhile another peer's flows are unaffected.
    let started = std::time::Instant::now();
    assert_eq!(echo_flow(listen, b"unaffected").await.unwrap().0, "b");
    assert!(started.elapsed() < Duration::from_secs(1));
    for p in pinned {
        let released = p.await.unwrap();
        assert_eq!(released, Ok(Ok(0x10d)), "a pinned stream was not reset with H3_REQUEST_INCOMPLETE");
    }
    m.shutdown().await;
}

/// Every stream the gateway answered for a peer, by outcome (each got past the target check, so
/// each cost at most one backend connect).
fn inbound_flows(t: &str) -> f64 {
    metric(t, "causeway_inbound_flows_total", &[]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_resetting_most_streams_right_after_opening_them_is_throttled_then_closed() {
    let (m, listen) = echo_pair_with_c("").await;
    let creds =
        rogue::credentials(&m.pki, &m.ids[2], Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    let (_ep, conn) = rogue::dial(creds.0, creds.1, &m.ids[1], m.addrs[1]).await.unwrap();
    let mut ctl = rogue::open_control(&conn).await.unwrap();
    // CONNECT to a real exported service, cancelled at once, again and again (HTTP/2's rapid
    // reset): each stream frees its slot immediately, so the stream limit never bites.
    let target = format!("echo.test:{SERVICE_PORT}");
    let mut opened = 0;
    while opened < 5_000 && conn.close_reason().is_none() {
        let Ok(mut s) = ctl.requests.send_request(http::Request::connect(target.as_str()).body(()).unwrap()).await
        else {
            break;
        };
        s.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
        s.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
        opened += 1;
    }
    let closed = rogue::close_code(&conn, Duration::from_secs(5)).await;
    assert_eq!(closed.as_ref().map(|c| c.0), Some(0x107), "not closed with H3_EXCESSIVE_LOAD: {closed:?}");
    let t = m.gw(1).metrics_text();
    // Throttled at the first batch of 500 and the second; closed at the third, as it kept on.
    assert_eq!(metric(&t, "causeway_peer_throttles_total", &[("reason", "rapid_reset")]), Some(2.0), "{t}");
    assert_eq!(metric(&t, "causeway_peer_abuse_closes_total", &[("reason", "rapid_reset")]), Some(1.0));
    // While throttled its streams were refused before any backend connect: the backend saw about
    // one batch of connects.
    let served = inbound_flows(&t);
    let refused = metric(&t, "causeway_inbound_flows_total", &[("outcome", "peer_flow_rate")]).unwrap_or(0.0);
    eprintln!("rapid reset: closed after {opened} streams; {served} reached the target check, {refused} refused");
    assert!(served - refused <= 700.0, "{} streams were served before the throttle", served - refused);
    // The honest peer is unaffected.
    assert_eq!(echo_flow(listen, b"unaffected").await.unwrap().0, "b");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_flows_over_the_peer_rate_get_429_before_any_backend_connect() {
    let (m, listen) = echo_pair_with_c("limits: { peer_flow_rate: 50 }\n").await;
    let creds =
        rogue::credentials(&m.pki, &m.ids[2], Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    let (_ep, conn) = rogue::dial(creds.0, creds.1, &m.ids[1], m.addrs[1]).await.unwrap();
    let ctl = rogue::open_control(&conn).await.unwrap();
    let target = format!("echo.test:{SERVICE_PORT}");
    // 200 flows at once, kept open: about one second's worth (50) is admitted.
    let flows: Vec<_> = (0..200)
        .map(|_| {
            let mut requests = ctl.requests.clone();
            let target = target.clone();
            tokio::spawn(async move {
                let mut s = requests.send_request(http::Request::connect(target.as_str()).body(()).unwrap()).await?;
                let resp = s.recv_response().await?;
                let reason = resp.headers().get("causeway-error").map(|v| v.to_str().unwrap_or("").to_string());
                Ok::<_, h3::error::StreamError>((resp.status().as_u16(), reason, s))
            })
        })
        .collect();
    let mut answers = Vec::new();
    for f in flows {
        answers.push(f.await.unwrap().unwrap());
    }
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let limited = answers.iter().filter(|a| a.0 == 429 && a.1.as_deref() == Some("peer_flow_rate")).count();
    eprintln!("peer_flow_rate 50: {ok} admitted, {limited} refused with 429");
    assert_eq!(ok + limited, 200, "other answers: {:?}", answers.iter().map(|a| a.0).collect::<Vec<_>>());
    assert!((50..=60).contains(&ok), "{ok} admitted");
    let t = m.gw(1).metrics_text();
    assert_eq!(metric(&t, "causeway_inbound_flows_total", &[("outcome", "peer_flow_rate")]), Some(limited as f64));
    // The connection stays up (a rate is not abuse), and the honest peer is unaffected.
    assert!(conn.close_reason().is_none());
    assert_eq!(echo_flow(listen, b"unaffected").await.unwrap().0, "b");
    drop(answers);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_that_would_loop_back_into_a_gateway_are_refused_on_the_first_repeat() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // One gateway: a exports self.test with its own import listener for it as the endpoint.
    // Two gateways: b exports loop.test with a's import listener for it as the endpoint (known
    // once a runs; b starts after).
    let self_listen = free();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec {
                zone: "a",
                exports: vec![("self.test", vec![self_listen])],
                imports: vec![("loop.test", vec![]), ("self.test", vec![])],
            },
            ZoneSpec { zone: "b", exports: vec![("loop.test", vec![])], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    m.specs[0].imports[1].1 = self_listen;
    m.start(0).await.unwrap();
    let loop_listen = m.gw(0).import_addr("loop.test").unwrap();
    m.specs[1].exports[0].2 = vec![loop_listen];
    m.start(1).await.unwrap();
    assert!(
        m.wait_routes(0, "loop.test", 1).await,
        "a never learned loop.test: {}\n{}",
        causeway::admin::services_json(&m.gw(0).mesh),
        m.gw(1).metrics_text()
    );
    for listen in [loop_listen, self_listen] {
        // (A reset may even beat the connect's completion on loopback.)
        let Ok(mut c) = tokio::net::TcpStream::connect(listen).await else { continue };
        let _ = c.write_all(b"round and round").await;
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("a looping flow hung");
        assert!(matches!(r, Err(_) | Ok(0)), "a looping flow got an answer: {r:?}");
    }
    // Each loop was cut where the flow came back: b refused a's second CONNECT (508), a refused
    // its own backend connection as a client. A handful of flows at most, not a storm. (Health
    // checks of the looping endpoints enter the loops too, every 2 s, and are cut the same way.)
    let cut =
        |i: usize, name: &str, labels: &[(&str, &str)]| metric(&m.gw(i).metrics_text(), name, labels).unwrap_or(0.0);
    eventually(Duration::from_secs(5), || {
        cut(1, "causeway_inbound_flows_total", &[("outcome", "loop_detected")]) >= 1.0
            && cut(0, "causeway_flows_failed_total", &[("reason", "loop_detected")]) >= 1.0
    })
    .await;
    let (ta, tb) = (m.gw(0).metrics_text(), m.gw(1).metrics_text());
    let inbound_loops = metric(&tb, "causeway_inbound_flows_total", &[("outcome", "loop_detected")]).unwrap_or(0.0);
    let local_loops = metric(&ta, "causeway_flows_failed_total", &[("reason", "loop_detected")]).unwrap_or(0.0);
    let opened = metric(&ta, "causeway_flows_opened_total", &[]).unwrap_or(0.0);
    eprintln!("loops: {inbound_loops} refused by b, {local_loops} refused by a; {opened} flows opened at a");
    assert!(inbound_loops >= 1.0, "b never refused the looping flow");
    assert!(local_loops >= 1.0, "a never refused its own backend connection");
    assert!(opened <= 12.0, "{opened} flows opened: the loop was not cut");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_memory_budget_new_flows_are_refused_and_open_ones_keep_going() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (m, listen) = echo_pair_with_c("").await;
    let stop = Arc::new(AtomicBool::new(false));
    let open = tokio::spawn(long_flow(listen, 7, stop.clone()));
    let a = m.gw(0);
    assert!(
        eventually(Duration::from_secs(5), || metric(&a.metrics_text(), "causeway_flows_active", &[]) == Some(1.0))
            .await,
        "the open flow never started"
    );
    // b's budget drops below what this process holds (the test runs gateways in-process, so its
    // resident memory is theirs): new flows into b get 503 over_budget at once.
    m.gw(1).mesh.set_memory_budget(Some(1 << 20));
    let b = m.gw(1);
    assert!(
        eventually(Duration::from_secs(2), || metric(&b.metrics_text(), "causeway_memory_over_budget", &[])
            == Some(1.0))
        .await
    );
    let refused = echo_flow(listen, b"over budget").await;
    assert!(refused.is_err(), "a new flow went through over the budget: {refused:?}");
    let t = b.metrics_text();
    assert!(metric(&t, "causeway_inbound_flows_total", &[("outcome", "over_budget")]) >= Some(1.0), "{t}");
    assert!(metric(&t, "causeway_memory_resident_bytes", &[]).unwrap_or(0.0) > f64::from(1u32 << 20));
    // Lifted: new flows go through again; the open flow never noticed.
    m.gw(1).mesh.set_memory_budget(None);
    assert!(
        eventually(Duration::from_secs(2), || metric(&b.metrics_text(), "causeway_memory_over_budget", &[])
            == Some(0.0))
        .await
    );
    assert_eq!(echo_flow(listen, b"within budget").await.unwrap().0, "b");
    stop.store(true, Ordering::Relaxed);
    let (banner, sent) = open.await.unwrap().expect("the open flow was cut");
    assert_eq!(banner, "b");
    assert!(sent > 0);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_slot_of_a_listener() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    init();
    let mut m = echo_pair_plan().await;
    m.specs[0].extra = "limits: { connections_per_source: 3 }\n".into();
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await);
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let open: Vec<_> = (0..3).map(|i| tokio::spawn(long_flow(listen, i, stop.clone()))).collect();
    let a = m.gw(0);
    assert!(
        eventually(Duration::from_secs(5), || metric(&a.metrics_text(), "causeway_flows_active", &[]) == Some(3.0))
            .await
    );
    // A fourth connection from the same address is reset at once, counted.
    // (On loopback the reset can even beat the connect's completion.)
    if let Ok(mut fourth) = tokio::net::TcpStream::connect(listen).await {
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(2), fourth.read(&mut buf)).await.expect("not reset at once");
        assert!(matches!(r, Err(_) | Ok(0)), "{r:?}");
    }
    let refused = metric(&a.metrics_text(), "causeway_listener_refused_total", &[("reason", "per_source")]);
    assert_eq!(refused, Some(1.0));
    // Another source address still gets in (127.0.0.2 is loopback too).
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = other.connect(listen).await.unwrap();
    let mut banner = [0u8; 2];
    s.read_exact(&mut banner).await.unwrap();
    assert_eq!(&banner, b"b\n");
    drop(s);
    stop.store(true, Ordering::Relaxed);
    for f in open {
        assert_eq!(f.await.unwrap().unwrap().0, "b");
    }
    // The slots came back: the same address gets in again.
    assert_eq!(echo_flow(listen, b"again").await.unwrap().0, "b");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_forged_by_a_redirector_never_reaches_the_destination() {
    use causeway_protocol::flow::{ORIGINAL_DST, SOURCE_ADDRESS, SOURCE_IDENTITY, TRACEPARENT};
    // This flow's trace: its access-log lines carry it (other tests in this binary log too).
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const FRONTEND: &str = "spiffe://test.causeway/ns/shop/sa/frontend";
    const FORGED: &str = "spiffe://test.causeway/ns/admin/sa/root";
    let mut m = echo_pair_plan().await;
    m.specs[0].extra = format!(
        "redirectors:\n  - {{ id_prefix: \"spiffe://test.causeway/zone/a/node/\" }}\nworkloads:\n  - {{ cidr: 10.11.0.0/24, id: \"{FRONTEND}\" }}\n"
    );
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await);
    // A node agent (allowed by prefix) hands over a flow from pod 10.11.0.7 and claims, in the
    // identity header, that the pod is an admin.
    let node = causeway_protocol::Identity::parse("spiffe://test.causeway/zone/a/node/node-1").unwrap();
    let creds = rogue::credentials(&m.pki, &node, Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    let (_ep, conn) = rogue::dial(creds.0, creds.1, &m.ids[0], m.addrs[0]).await.unwrap();
    let mut requests = rogue::h3_client(&conn).await.unwrap();
    let req = http::Request::connect(format!("echo.test:{SERVICE_PORT}"))
        .header(ORIGINAL_DST, "240.240.0.9:8080")
        .header(SOURCE_ADDRESS, "10.11.0.7:40000")
        .header(SOURCE_IDENTITY, FORGED)
        .header(TRACEPARENT, format!("00-{TRACE}-00f067aa0ba902b7-01"))
        .body(())
        .unwrap();
    let mut s = requests.send_request(req).await.unwrap();
    s.send_data(bytes::Bytes::from_static(b"who am i")).await.unwrap();
    s.finish().await.unwrap();
    assert_eq!(s.recv_response().await.unwrap().status(), 200);
    let mut echoed = Vec::new();
    while let Some(mut chunk) = s.recv_data().await.unwrap() {
        use bytes::Buf;
        echoed.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    assert_eq!(echoed, b"b\nwho am i");
    // Both gateways' access logs name the pod's true identity (from a's workloads table); the
    // forged one appears nowhere.
    let lines = || access_log().into_iter().filter(|l| l.get("traceparent").contains(TRACE)).collect::<Vec<_>>();
    assert!(eventually(Duration::from_secs(5), || lines().iter().any(|l| l.get("direction") == "inbound")).await);
    let lines = lines();
    assert!(lines.iter().all(|l| l.get("source_identity") == FRONTEND), "{lines:?}");
    assert!(lines.iter().any(|l| l.get("direction") == "inbound" && l.get("zone") == "b"), "{lines:?}");
    assert!(!format!("{lines:?}").contains(FORGED));
    m.shutdown().await;
}

/// Issue 17: 300 clients of zone a that connect, send a few bytes and abort (RST) — what health
/// checkers and crashing pods do — are relayed as aborts (`FLOW_CLIENT_RESET`), which the
/// destination does not hold against the peer: no throttle, no abuse close, and a long flow and
/// 300 unrelated short flows on the same gateway pair are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_abort_do_not_cut_their_zones_link() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    let (m, listen) = echo_pair().await;
    let connects = || metric(&m.gw(1).metrics_text(), "causeway_peer_connects_total", &[("result", "ok")]);
    let connected = connects();
    let stop = Arc::new(AtomicBool::new(false));
    let long = tokio::spawn(long_flow(listen, 7, stop.clone()));
    let aborting: Vec<_> = (0..300u64)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
                s.write_all(&payload(16, i)).await.unwrap();
                // Long enough for the gateway to have opened the flow, then RST.
                tokio::time::sleep(Duration::from_millis(20)).await;
                causeway_overlay::flow::relay::abort(s);
            })
        })
        .collect();
    for a in aborting {
        a.await.unwrap();
    }
    // Random bytes, then an abort, as a port scanner or a confused client sends.
    for i in 0..50u64 {
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.write_all(&payload(512, 1000 + i)).await.unwrap();
        causeway_overlay::flow::relay::abort(s);
    }
    let short: Vec<_> =
        (0..300).map(|i| tokio::spawn(async move { echo_flow(listen, &payload(64, i)).await })).collect();
    let mut failed = 0;
    for f in short {
        if f.await.unwrap().is_err() {
            failed += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let long = long.await.unwrap();
    let t = m.gw(1).metrics_text();
    assert!(long.is_ok(), "the long flow was cut: {long:?}\n{t}");
    assert_eq!(failed, 0, "{failed} of 300 short flows failed");
    assert_eq!(metric(&t, "causeway_peer_abuse_closes_total", &[]), None, "{t}");
    assert_eq!(metric(&t, "causeway_peer_throttles_total", &[]), None, "{t}");
    // The aborts reached b as client resets; one connection carried everything.
    let resets = metric(&t, "causeway_inbound_flows_total", &[("outcome", "client_reset")]).unwrap_or(0.0);
    eprintln!("aborting clients: {resets} client resets relayed to b");
    assert!(resets >= 100.0, "only {resets} aborts reached b as flows: the test did not exercise the rule");
    assert_eq!(connects(), connected, "the peer connection was replaced: {t}");
    m.shutdown().await;
}
