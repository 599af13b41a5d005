//! Certificates without outages: gateways watch their certificate, key and trust-bundle files; a
//! new leaf is used for new handshakes and every peer connection is replaced make-before-break (the
//! old one closes once its flows end); a root rotates A → A+B → B with no failed flow; an unsafe
//! order is refused and the certificate in use keeps serving.
//!
//! CI sizes: 40 long flows, a rotation every 2 s for 12 s. `CAUSEWAY_SOAK=1` runs the full
//! acceptance size: 200 long flows, 60 s certificates rotated every 30 s for 3 minutes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use causeway::certs::{self, Validity};
use causeway_tests::*;

const WATCH: &str = "timing: { watch_interval: 100ms }\n";

fn soak() -> bool {
    std::env::var_os("CAUSEWAY_SOAK").is_some()
}

fn replaced(m: &TestMesh, i: usize) -> f64 {
    metric(&m.gw(i).metrics_text(), "causeway_peer_connections_replaced_total", &[]).unwrap_or(0.0)
}

fn reloads(m: &TestMesh, i: usize, result: &str) -> f64 {
    metric(&m.gw(i).metrics_text(), "causeway_tls_reloads_total", &[("result", result)]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_rotation_under_long_flows_loses_no_byte_and_resets_no_flow() {
    let (flows, every, total, life) = if soak() {
        (200, Duration::from_secs(30), Duration::from_secs(180), Duration::from_secs(60))
    } else {
        (40, Duration::from_secs(2), Duration::from_secs(12), Duration::from_secs(30))
    };
    let mut m = echo_pair_plan().await;
    for s in &mut m.specs {
        s.extra.push_str(WATCH);
    }
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await);
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let running: Vec<_> = (0..flows).map(|i| tokio::spawn(long_flow(listen, i, stop.clone()))).collect();

    let started = tokio::time::Instant::now();
    let mut rotations = 0;
    while started.elapsed() < total {
        tokio::time::sleep(every).await;
        // Both gateways get a new short-lived leaf, one after the other.
        let i = rotations % 2;
        m.pki.issue(["a", "b"][i], &m.ids[i], Validity::for_duration(life)).unwrap();
        rotations += 1;
        let want = rotations.div_ceil(2) as f64;
        assert!(
            eventually(Duration::from_secs(3), || reloads(&m, i, "ok") >= want).await,
            "gateway {i} did not reload its certificate"
        );
        // A new flow right after a rotation works too.
        assert_eq!(echo_flow(listen, b"new").await.unwrap().0, "b");
    }
    stop.store(true, Ordering::Relaxed);
    let mut bytes = 0;
    for (i, f) in running.into_iter().enumerate() {
        let (banner, sent) = f.await.unwrap().unwrap_or_else(|e| panic!("long flow {i}: {e}"));
        assert_eq!(banner, "b");
        bytes += sent;
    }
    let (ra, rb) = (replaced(&m, 0), replaced(&m, 1));
    eprintln!(
        "{rotations} rotations under {flows} long flows: {bytes} bytes intact; connections replaced a {ra} b {rb}"
    );
    // Every rotation replaced the connection on both sides (the rotating side dials anew; the other
    // sees the new leaf on it).
    assert!(ra >= rotations as f64 && rb >= rotations as f64, "replaced a {ra} b {rb} for {rotations} rotations");
    let t = m.gw(0).metrics_text();
    assert_eq!(metric(&t, "causeway_flows_closed_total", &[("outcome", "reset")]), None, "a flow was reset");
    // Exactly one connection per pair remains in use, and the replaced ones have closed.
    let peers = causeway::admin::peers_json(&m.gw(0).mesh);
    assert_eq!(peers["peers"][0]["state"], "up");
    assert!(
        eventually(Duration::from_secs(5), || m.gw(0).mesh.open_connections() == 1).await,
        "replaced connections stayed open: {}",
        m.gw(0).mesh.open_connections()
    );
    let expiry = metric(&t, "causeway_tls_leaf_not_after_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(expiry > now && expiry <= now + life.as_secs_f64() + 5.0, "leaf expiry {expiry} vs now {now}");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotates_across_three_zones_with_no_failed_flow_and_an_unsafe_order_is_refused() {
    init();
    let (eb, _) = echo_server("b".into()).await.unwrap();
    let (ec, _) = echo_server("b".into()).await.unwrap();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("echo.test", vec![])] },
            ZoneSpec { zone: "b", exports: vec![("echo.test", vec![eb])], imports: vec![] },
            ZoneSpec { zone: "c", exports: vec![("echo.test", vec![ec])], imports: vec![] },
        ],
        WATCH,
    )
    .unwrap();
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 2).await);
    let listen = m.gw(0).import_addr("echo.test").unwrap();

    // Traffic throughout: long flows, and a new short flow every 20 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let long: Vec<_> = (0..20).map(|i| tokio::spawn(long_flow(listen, 100 + i, stop.clone()))).collect();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let short = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match echo_flow(listen, &payload(4096, 7)).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let bundle = m.pki.dir.join(certs::CA_CERT);
    let root_a = std::fs::read_to_string(&bundle).unwrap();
    let td = causeway_protocol::TrustDomain::new("test.causeway").unwrap();
    let root_b = certs::new_ca(&td, Validity::for_duration(Duration::from_secs(3600))).unwrap();
    let all_reloaded = |m: &TestMesh, n: f64| (0..3).all(|i| reloads(m, i, "ok") >= n);

    // Unsafe: B alone while every leaf is still from A. Refused everywhere; A keeps serving.
    std::fs::write(&bundle, &root_b.cert_pem).unwrap();
    assert!(eventually(Duration::from_secs(3), || (0..3).all(|i| reloads(&m, i, "refused") >= 1.0)).await);
    std::fs::write(&bundle, &root_a).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. A+B everywhere.
    std::fs::write(&bundle, format!("{root_a}{}", root_b.cert_pem)).unwrap();
    assert!(eventually(Duration::from_secs(3), || all_reloaded(&m, 1.0)).await, "bundle A+B not loaded");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 2. Leaves from B, zone by zone.
    for (i, z) in ["a", "b", "c"].iter().enumerate() {
        let leaf = certs::issue(&root_b, &m.ids[i], Validity::for_duration(Duration::from_secs(3600))).unwrap();
        std::fs::write(m.pki.dir.join(format!("{z}.crt")), format!("{}{}", leaf.cert_pem, root_b.cert_pem)).unwrap();
        std::fs::write(m.pki.dir.join(format!("{z}.key")), leaf.key_pem).unwrap();
        assert!(eventually(Duration::from_secs(3), || reloads(&m, i, "ok") >= 2.0).await, "leaf B of {z} not loaded");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // 3. B alone.
    std::fs::write(&bundle, &root_b.cert_pem).unwrap();
    assert!(eventually(Duration::from_secs(3), || all_reloaded(&m, 3.0)).await, "bundle B not loaded");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Both zones still serve, over connections made with B leaves only.
    assert!(m.wait_routes(0, "echo.test", 2).await);
    stop.store(true, Ordering::Relaxed);
    short.await.unwrap();
    for (i, f) in long.into_iter().enumerate() {
        f.await.unwrap().unwrap_or_else(|e| panic!("long flow {i}: {e}"));
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("root rotation A → A+B → B: {ok} short flows ok, {failed} failed; 20 long flows intact");
    assert_eq!(failed, 0, "flows failed during the root rotation");
    assert!(ok > 50);
    // A gateway restarted now trusts and presents B only, and still peers.
    let gw_c = m.gateways[2].take().unwrap();
    gw_c.shutdown().await;
    // The old UDP socket is released once its last connection task ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Err(e) = m.start(2).await {
        assert!(tokio::time::Instant::now() < deadline, "gateway c could not restart: {e:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(m.wait_routes(0, "echo.test", 2).await, "c did not re-peer with B only");
    m.shutdown().await;
}
