//! Faults: address changes mid-transfer, a stopped (SIGSTOP) gateway, and kill -9 under many
//! flows. Every transfer is checked byte for byte at the far end.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use causeway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebinding_client_gateway_keeps_its_flows() {
    let mut m = echo_pair_plan().await;
    // Only a dials (b has no address for it), so a is the QUIC client that may migrate.
    m.specs[1].peers[0].1 = None;
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await);
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    let data = payload(64 << 20, 11);
    let transfer = {
        let data = data.clone();
        tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
            let (mut r, mut w) = s.split();
            let send = async {
                // Paced, so the transfer spans several rebinds.
                for chunk in data.chunks(1 << 20) {
                    w.write_all(chunk).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(60)).await;
                }
                w.shutdown().await.unwrap();
            };
            let recv = async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.map(|_| got)
            };
            let (_, got) = tokio::join!(send, recv);
            got
        })
    };
    // New source port at 1 s, then every 1.5 s until the transfer ends.
    let mut rebinds = 0;
    tokio::time::sleep(Duration::from_secs(1)).await;
    while !transfer.is_finished() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        m.gw(0).mesh.rebind(sock).unwrap();
        rebinds += 1;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let got = transfer.await.unwrap().expect("the flow was reset by a rebinding");
    assert!(rebinds >= 2, "only {rebinds} rebinds happened during the transfer");
    assert_eq!(&got[..2], b"b\n");
    assert_eq!(sha256(&got[2..]), sha256(&data), "bytes lost or corrupted across {rebinds} rebinds");
    let t = m.gw(0).metrics_text();
    assert_eq!(metric(&t, "causeway_flows_closed_total", &[("outcome", "complete")]), Some(1.0));
    assert_eq!(
        metric(&t, "causeway_peer_connects_total", &[("direction", "dial"), ("result", "ok")]),
        Some(1.0),
        "reconnected instead of migrating"
    );
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_gateway_is_routed_around_within_a_second_and_rejoins_cleanly() {
    let (m, b, listen) = three_zones_with_b_process().await;
    assert_eq!(echo_flow(listen, b"x").await.unwrap().0, "b");

    b.signal("STOP");
    let stopped = Instant::now();
    // The event: a declares b down.
    assert!(
        eventually(Duration::from_secs(2), || m.gw(0).mesh.peer_state(&m.ids[1])
            != causeway_overlay::core::route_table::PeerState::Up)
        .await
    );
    let detected = stopped.elapsed();
    let served = loop {
        if let Ok(Ok((banner, _))) = tokio::time::timeout(Duration::from_secs(1), echo_flow(listen, b"y")).await {
            if banner == "c" {
                break stopped.elapsed();
            }
        }
        assert!(stopped.elapsed() < Duration::from_secs(5), "no flow reached c");
    };
    assert!(served < Duration::from_secs(1), "b declared down after {detected:?}, first flow via c after {served:?}");

    b.signal("CONT");
    // b re-peers: one connection per pair, and a's catalog has echo.test once per zone.
    assert!(m.wait_routes(0, "echo.test", 2).await, "b never came back");
    let peers = causeway::admin::peers_json(&m.gw(0).mesh);
    assert_eq!(peers["peers"].as_array().unwrap().iter().filter(|p| p["state"] == "up").count(), 2);
    let services = causeway::admin::services_json(&m.gw(0).mesh);
    let offers = services["services"][0]["offers"].as_array().unwrap();
    assert_eq!(offers.len(), 2, "duplicate catalog entries: {offers:?}");
    assert_eq!(echo_flow(listen, b"z").await.unwrap().0, "b");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_a_hundred_flows_resets_every_one_and_new_flows_move() {
    let (m, b, listen) = three_zones_with_b_process().await;
    // 100 flows through b, each streaming until told to stop, counting what comes back.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(101));
    let flows: Vec<_> = (0..100)
        .map(|i| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
                let mut banner = [0u8; 2];
                s.write_all(b"hi").await.unwrap();
                s.read_exact(&mut banner).await.unwrap();
                assert_eq!(&banner, b"b\n");
                let mut echo = [0u8; 2];
                s.read_exact(&mut echo).await.unwrap();
                barrier.wait().await;
                // Keep sending and reading until the flow ends; a clean end of stream would be a
                // silent truncation (the client never half-closed).
                let chunk = payload(16 * 1024, i);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    if let Err(e) = s.write_all(&chunk).await {
                        return Err(e.kind());
                    }
                    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                        Ok(Ok(0)) => return Ok(()),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.kind()),
                        Err(_) => return Err(std::io::ErrorKind::TimedOut),
                    }
                }
            })
        })
        .collect();
    barrier.wait().await;
    let mut b = b;
    b.kill();
    let killed = Instant::now();
    for f in flows {
        let end = tokio::time::timeout(Duration::from_secs(10), f).await.unwrap().unwrap();
        assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset), "a flow ended without an error");
    }
    // New flows move at peer_timeout (0.5 s); the dead connection, and the flows on it, are closed
    // at peer_close_timeout (5 s), so a WAN blackhole shorter than that costs no flow.
    assert!(killed.elapsed() < Duration::from_secs(6), "flows reset after {:?}", killed.elapsed());
    // Flows opened again complete through c.
    for i in 0..10 {
        let data = payload(100_000, 100 + i);
        assert_eq!(echo_flow(listen, &data).await.unwrap().0, "c");
    }
    // Restart: b's process starts again; time from spawn until a routes to b again (README).
    let restarted = Instant::now();
    let _b = GatewayProcess::spawn(&m, 1, "warn");
    assert!(m.wait_routes(0, "echo.test", 2).await, "a restarted b never re-peered");
    let back = restarted.elapsed();
    eprintln!("restart: b re-peered and its services routable {back:?} after its process started");
    assert!(back < Duration::from_secs(5), "restart took {back:?}");
    assert_eq!(echo_flow(listen, b"again").await.unwrap().0, "b");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_flows_and_exits_0_before_the_deadline() {
    let (m, mut b, listen) = three_zones_with_b_process().await;
    let mut open = tokio::net::TcpStream::connect(listen).await.unwrap();
    open.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 5];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"b\none");

    b.signal("TERM");
    let termed = Instant::now();
    // New flows go elsewhere at once (b said goodbye).
    assert!(
        eventually(Duration::from_secs(1), || m.gw(0).mesh.peer_state(&m.ids[1])
            != causeway_overlay::core::route_table::PeerState::Up)
        .await
    );
    assert_eq!(echo_flow(listen, b"new").await.unwrap().0, "c");
    // The open flow still completes through b.
    open_flow_echoes_then_ends(&mut open).await;
    // Then b exits 0, before the 5 s drain deadline.
    let status = tokio::task::spawn_blocking(move || {
        let s = b.0.wait();
        (s, b)
    })
    .await
    .unwrap()
    .0
    .unwrap();
    assert!(status.success(), "b exited with {status}");
    assert!(termed.elapsed() < Duration::from_secs(5), "b took {:?} to exit", termed.elapsed());
    m.shutdown().await;
}
