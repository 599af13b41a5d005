//! Cross-zone TCP flows over real sockets: bulk integrity, a thousand concurrent flows on one
//! gateway pair, one connection per pair, prompt resets, and the metrics that describe it all.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use causeway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_cross_zone_flow_is_checksum_verified() {
    let (m, listen) = echo_pair().await;
    let data = payload(64 << 20, 64);
    let want = sha256(&data);
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::with_capacity(data.len() + 2);
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let (_, got) = tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(send, recv) }).await.unwrap();
    assert_eq!(&got[..2], b"b\n", "banner of the serving zone");
    assert_eq!(got.len() - 2, data.len());
    assert_eq!(sha256(&got[2..]), want, "checksum of the echoed 64 MiB");

    let text = m.gw(0).metrics_text();
    let labels = [("service", "echo.test"), ("zone", "b")];
    assert_eq!(metric(&text, "causeway_flows_opened_total", &labels), Some(1.0));
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &m.gw(0).metrics_text(),
            "causeway_flows_closed_total",
            &[("service", "echo.test"), ("outcome", "complete")]
        ) == Some(1.0))
        .await
    );
    let text = m.gw(0).metrics_text();
    assert_eq!(
        metric(&text, "causeway_flow_bytes_total", &[("service", "echo.test"), ("direction", "up")]),
        Some((64 << 20) as f64)
    );
    assert_eq!(
        metric(&text, "causeway_flow_bytes_total", &[("service", "echo.test"), ("direction", "down")]),
        Some((64 << 20) as f64 + 2.0)
    );
    assert_eq!(error_logs(), 0);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_flows_over_one_gateway_pair() {
    let (m, listen) = echo_pair().await;
    const N: usize = 1000;
    // Every flow sends and gets its echo, then waits until all N are open at once before closing.
    let open = std::sync::Arc::new(tokio::sync::Barrier::new(N + 1));
    let close = std::sync::Arc::new(tokio::sync::Barrier::new(N + 1));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (open, close) = (open.clone(), close.clone());
            tokio::spawn(async move {
                let data = payload(16 * 1024 + i, i as u64);
                // Errors are kept until after the barriers, so one failed flow cannot hang the rest.
                let echoed = async {
                    let mut s = tokio::net::TcpStream::connect(listen).await?;
                    s.write_all(&data).await?;
                    let mut got = vec![0u8; data.len() + 2];
                    s.read_exact(&mut got).await?;
                    anyhow::ensure!(&got[..2] == b"b\n" && got[2..] == data[..], "flow {i}: bytes differ");
                    Ok::<_, anyhow::Error>(s)
                }
                .await;
                open.wait().await;
                close.wait().await;
                let mut s = echoed?;
                s.shutdown().await?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await?;
                anyhow::ensure!(rest.is_empty(), "flow {i}: bytes after the echo");
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(60), open.wait()).await.expect("flows did not all open");
    let t = m.gw(0).metrics_text();
    assert_eq!(metric(&t, "causeway_flows_active", &[("service", "echo.test"), ("zone", "b")]), Some(N as f64));
    close.wait().await;
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t).await.unwrap().unwrap().unwrap();
    }
    // One QUIC connection carried all of them.
    let peers = causeway::admin::peers_json(&m.gw(0).mesh);
    assert_eq!(peers["peers"].as_array().unwrap().len(), 1);
    assert!(
        eventually(Duration::from_secs(5), || {
            let t = m.gw(0).metrics_text();
            metric(&t, "causeway_flows_closed_total", &[("service", "echo.test"), ("outcome", "complete")])
                == Some(N as f64)
        })
        .await
    );
    let t = m.gw(0).metrics_text();
    assert_eq!(metric(&t, "causeway_flows_opened_total", &[("service", "echo.test"), ("zone", "b")]), Some(N as f64));
    assert_eq!(metric(&t, "causeway_flows_active", &[("service", "echo.test")]), Some(0.0));
    assert!(metric(&t, "causeway_peer_connects_total", &[("result", "ok")]).unwrap_or(0.0) >= 1.0);
    // The destination counts a flow when its own relay ends, a moment after the source's.
    let inbound = || {
        metric(
            &m.gw(1).metrics_text(),
            "causeway_inbound_flows_total",
            &[("service", "echo.test"), ("source_zone", "a"), ("outcome", "complete")],
        )
    };
    assert!(eventually(Duration::from_secs(5), || inbound() == Some(N as f64)).await, "{:?}", inbound());
    assert_eq!(error_logs(), 0);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_converge_to_one_connection_per_pair() {
    init();
    // Three zones that all know each other's address start at once and all dial.
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![] },
            ZoneSpec { zone: "b", exports: vec![], imports: vec![] },
            ZoneSpec { zone: "c", exports: vec![], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    let (a, b, c) =
        tokio::join!(m.specs[0].start(&m.pki.dir), m.specs[1].start(&m.pki.dir), m.specs[2].start(&m.pki.dir));
    m.gateways = vec![Some(a.unwrap()), Some(b.unwrap()), Some(c.unwrap())];
    let all_up = |m: &TestMesh| {
        (0..3).all(|i| {
            causeway::admin::peers_json(&m.gw(i).mesh)["peers"].as_array().unwrap().iter().all(|p| p["state"] == "up")
        })
    };
    assert!(eventually(Duration::from_secs(10), || all_up(&m)).await, "mesh never came up");
    // Each pair agrees on one connection: what a sees as b's address is b's overlay port and the
    // connection is dialed by exactly one side.
    for i in 0..3 {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let pi = causeway::admin::peers_json(&m.gw(i).mesh);
            let pj = causeway::admin::peers_json(&m.gw(j).mesh);
            let find = |p: &serde_json::Value, id: &str| {
                p["peers"].as_array().unwrap().iter().find(|x| x["id"] == id).cloned().unwrap()
            };
            let i_sees_j = find(&pi, m.ids[j].as_str());
            let j_sees_i = find(&pj, m.ids[i].as_str());
            assert_ne!(
                i_sees_j["dialed_by_us"], j_sees_i["dialed_by_us"],
                "both sides claim the same role for {i}-{j}"
            );
        }
    }
    // And it stays that way (no flapping between duplicates) once settled: the connection each
    // gateway routes on keeps its role. Settling may take one make-before-break replacement per
    // pair — the winner of a simultaneous dial (dialed by the lower ID) replacing a loser that
    // came up first — and never more. (A dial abandoned because the peer connected first may
    // still complete its handshake a moment later, and is closed at once as a duplicate.)
    let roles = |m: &TestMesh| -> Vec<serde_json::Value> {
        (0..3)
            .flat_map(|i| {
                causeway::admin::peers_json(&m.gw(i).mesh)["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["dialed_by_us"].clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let replaced =
        |m: &TestMesh, i: usize| metric(&m.gw(i).metrics_text(), "causeway_peer_connections_replaced_total", &[]);
    // Settled: a winner's replacement follows its control stream within milliseconds; the loser's
    // grace (1 s) does not delay the switch.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = roles(&m);
    let counts: Vec<f64> = (0..3).map(|i| replaced(&m, i).unwrap_or(0.0)).collect();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(roles(&m), first, "the connection of a pair changed");
    }
    for (i, n) in counts.iter().enumerate() {
        assert!(*n <= 2.0, "gateway {i} replaced {n} connections to its two peers");
        assert_eq!(replaced(&m, i).unwrap_or(0.0), *n, "gateway {i} kept replacing");
    }
    assert!(all_up(&m));
    assert_eq!(error_logs(), 0);
    m.shutdown().await;
}

/// Flows opened from the moment a pair that dialed each other at once routes are never cut by the
/// pair settling on one connection (`SPEC.md` §2): the loser is either never served or replaced
/// make-before-break. (Each side once kept the connection it saw up first and closed the other:
/// both lost at once, and the flow with them.) A held flow spans the settling; short flows run
/// through the replaced connection's grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_opened_while_a_simultaneous_dial_settles_are_not_cut() {
    for round in 0..6 {
        let mut m = echo_pair_plan().await;
        let (a, b) = tokio::join!(m.specs[0].start(&m.pki.dir), m.specs[1].start(&m.pki.dir));
        m.gateways = vec![Some(a.unwrap()), Some(b.unwrap())];
        assert!(m.wait_routes(0, "echo.test", 1).await, "round {round}: a never learned echo.test");
        let listen = m.gw(0).import_addr("echo.test").unwrap();
        let mut held = tokio::net::TcpStream::connect(listen).await.unwrap();
        let mut banner = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), held.read_exact(&mut banner)).await.unwrap().unwrap();
        let until = tokio::time::Instant::now() + Duration::from_millis(1500);
        let mut n = 0;
        while tokio::time::Instant::now() < until {
            let r = echo_flow(listen, b"while settling").await;
            let peers = causeway::admin::peers_json(&m.gw(0).mesh);
            assert!(r.is_ok(), "round {round}, flow {n}: {r:?}\n{peers}");
            n += 1;
        }
        held.write_all(b"still here").await.unwrap();
        let mut back = [0u8; 10];
        let r = tokio::time::timeout(Duration::from_secs(5), held.read_exact(&mut back)).await.unwrap();
        assert!(r.is_ok() && &back == b"still here", "round {round}: the held flow was cut: {r:?}");
        let replaced =
            |i: usize| metric(&m.gw(i).metrics_text(), "causeway_peer_connections_replaced_total", &[]).unwrap_or(0.0);
        eprintln!("round {round}: {n} flows; replaced at a {}, at b {}", replaced(0), replaced(1));
        assert_eq!(error_logs(), 0);
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_with_no_backend_is_reset_promptly() {
    init();
    // Zone b exports a service whose only endpoint passes the first health check, then dies.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = backend.local_addr().unwrap();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("dead.test", vec![]), ("nowhere.test", vec![])] },
            ZoneSpec { zone: "b", exports: vec![("dead.test", vec![dead])], imports: vec![] },
        ],
        "timing: { health_interval: 1h }\n",
    )
    .unwrap();
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "dead.test", 1).await);
    drop(backend);
    for svc in ["dead.test", "nowhere.test"] {
        let addr = m.gw(0).import_addr(svc).unwrap();
        let started = std::time::Instant::now();
        // The reset can arrive so fast that connect() itself reports it.
        let r = match tokio::net::TcpStream::connect(addr).await {
            Ok(mut s) => {
                let mut buf = [0u8; 16];
                tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await.expect("client left hanging")
            }
            Err(e) => Err(e),
        };
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "{svc}: the client must see a reset, not a clean end of stream"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    let t = m.gw(0).metrics_text();
    assert_eq!(
        metric(&t, "causeway_flows_failed_total", &[("service", "nowhere.test"), ("reason", "unknown_service")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&t, "causeway_flow_failovers_total", &[("service", "dead.test"), ("reason", "backend_refused")]),
        Some(1.0)
    );
    let tb = m.gw(1).metrics_text();
    assert_eq!(
        metric(&tb, "causeway_inbound_flows_total", &[("service", "dead.test"), ("outcome", "backend_refused")]),
        Some(1.0)
    );
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_serves_metrics_peers_and_services() {
    let (m, listen) = echo_pair().await;
    echo_flow(listen, b"hello").await.unwrap();
    let admin = m.gw(0).admin_addr.unwrap();
    let (status, body) = causeway::admin::get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(metric(&body, "causeway_flows_opened_total", &[("service", "echo.test"), ("zone", "b")]), Some(1.0));
    assert_eq!(metric(&body, "causeway_peer_up", &[("peer_zone", "b")]), Some(1.0));
    assert!(metric(&body, "causeway_peer_rtt_seconds", &[("peer_zone", "b")]).is_some_and(|r| r > 0.0 && r < 1.0));
    assert_eq!(causeway::admin::get(admin, "/healthz").await.unwrap().0, 200);
    assert_eq!(causeway::admin::get(admin, "/ready").await.unwrap().0, 200);
    let (_, peers) = causeway::admin::get(admin, "/peers").await.unwrap();
    let peers: serde_json::Value = serde_json::from_str(&peers).unwrap();
    assert_eq!(peers["peers"][0]["zone"], "b");
    assert_eq!(peers["peers"][0]["state"], "up");
    let (_, services) = causeway::admin::get(admin, "/services").await.unwrap();
    let services: serde_json::Value = serde_json::from_str(&services).unwrap();
    assert_eq!(services["services"][0]["name"], "echo.test");
    assert_eq!(services["services"][0]["route_order"][0], m.ids[1].as_str());
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_named_by_host_is_resolved_at_each_dial() {
    let mut m = echo_pair_plan().await;
    // a knows b only by name (as a cloud load balancer's DNS name would be); b does not dial a.
    m.specs[0].peers[0].1 = Some(format!("localhost:{}", m.addrs[1].port()));
    m.specs[1].peers[0].1 = None;
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await, "a never reached b by name");
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    assert_eq!(echo_flow(listen, b"by name").await.unwrap().0, "b");
    assert_eq!(
        causeway::admin::peers_json(&m.gw(0).mesh)["peers"][0]["address"],
        format!("localhost:{}", m.addrs[1].port())
    );
    m.shutdown().await;
}

/// The catalog bug of issue 17: one health round changes two exports (both lose their endpoint),
/// then one recovers on its own — the peer must route to it again within a round. The sender once
/// numbered a set's messages past its own version, so the peer ignored the next single change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_recovers_alone_after_a_two_service_round_is_routed_again() {
    init();
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (l1, l2) = (bind(), bind());
    let (e1, e2) = (l1.local_addr().unwrap(), l2.local_addr().unwrap());
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("one.test", vec![]), ("two.test", vec![])] },
            ZoneSpec { zone: "b", exports: vec![("one.test", vec![e1]), ("two.test", vec![e2])], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    m.specs[1].extra = "timing: { health_interval: 200ms }\n".into();
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "one.test", 1).await && m.wait_routes(0, "two.test", 1).await);
    // Both endpoints stop answering: one round takes both out (a sees neither).
    drop((l1, l2));
    assert!(m.wait_routes(0, "one.test", 0).await && m.wait_routes(0, "two.test", 0).await);
    // One comes back on its own.
    let back = tokio::net::TcpListener::bind(e1).await.unwrap();
    let started = std::time::Instant::now();
    assert!(m.wait_routes(0, "one.test", 1).await, "a never routed one.test again after it recovered");
    eprintln!("one.test routed again {:?} after its endpoint came back", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?} (health rounds are 200 ms)", started.elapsed());
    // And a flow reaches it.
    // (Health checks connect and close: each connection that says "ping" gets a "pong".)
    tokio::spawn(async move {
        while let Ok((mut s, _)) = back.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).await.is_ok() && &buf == b"ping" {
                    let _ = s.write_all(b"pong").await;
                }
            });
        }
    });
    let listen = m.gw(0).import_addr("one.test").unwrap();
    let mut c = tokio::net::TcpStream::connect(listen).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    // Both sides agree on the catalog version (the peer is not ahead of the sender).
    let peers = causeway::admin::peers_json(&m.gw(0).mesh);
    let held = peers["peers"].as_array().unwrap().iter().find_map(|p| p["catalog_version"].as_u64()).unwrap();
    assert_eq!(held, m.gw(1).mesh.catalog_version(), "{peers}");
    m.shutdown().await;
}

/// Every duration metric is a real histogram: a gateway's `/metrics` under traffic passes
/// `promtool check metrics` with no findings, and a real Prometheus scraping it answers
/// `histogram_quantile` over the flow set-up time with a number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_prometheus_computes_quantiles() {
    let (m, listen) = echo_pair().await;
    for i in 0..20 {
        echo_flow(listen, &payload(100, i)).await.unwrap();
    }
    for i in 0..2 {
        let admin = m.gw(i).admin_addr.unwrap();
        let (_, text) = causeway::admin::get(admin, "/metrics").await.unwrap();
        assert!(text.contains("causeway_flow_connect_seconds_bucket{") || i == 1, "no histogram buckets:\n{text}");
        assert!(!text.contains("quantile=\""), "a summary is left:\n{text}");
        let findings = prometheus::check_metrics(&text).unwrap();
        assert!(findings.is_empty(), "promtool check metrics on gateway {i}:\n{findings}");
    }
    let admin = m.gw(0).admin_addr.unwrap();
    let prom = prometheus::Prometheus::start(&[admin]).await.unwrap();
    // Traffic while it scrapes, so the rate over the window has samples.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 100;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = echo_flow(listen, &payload(100, i)).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let q = "histogram_quantile(0.9, sum by (le) (rate(causeway_flow_connect_seconds_bucket[5s])))";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let p90 = loop {
        if let Some(v) = prom.query(q).await.unwrap().filter(|v| v.is_finite()) {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "prometheus never answered {q} with a number");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.await.unwrap();
    eprintln!("prometheus: p90 flow set-up {:.3} ms", p90 * 1000.0);
    assert!(p90 > 0.0 && p90 < 10.0, "{p90}");
    m.shutdown().await;
}
