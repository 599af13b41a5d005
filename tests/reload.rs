//! Configuration hot reload: peers, exports and imports added and removed under traffic without
//! touching unrelated flows; a removed peer's connections close at once; a broken file, or a change
//! to a key that needs a restart, is refused and the running configuration keeps serving.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use causeway_tests::*;

fn config(m: &TestMesh, i: usize) -> causeway::config::Config {
    causeway::config::parse(&m.specs[i].yaml()).unwrap()
}

fn route_count(m: &TestMesh, i: usize, service: &str) -> usize {
    let s = causeway::admin::services_json(&m.gw(i).mesh);
    s["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["name"] == service)
        .and_then(|x| x["route_order"].as_array().map(|a| a.len()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_imports_and_peers_change_under_traffic_without_touching_other_flows() {
    let mut m = echo_three_zones().await;
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 2).await);
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flows: Vec<_> = (0..10).map(|i| tokio::spawn(long_flow(listen, i, stop.clone()))).collect();

    // 1. b exports a new service and a imports it: served within a few seconds.
    let (extra, _) = echo_server("extra".into()).await.unwrap();
    m.specs[1].exports.push(("extra.test".into(), 9090, vec![extra]));
    let r = m.gw(1).reload(&config(&m, 1)).await.unwrap();
    assert!(r.exports_changed);
    m.specs[0].imports.push(("extra.test".into(), "127.0.0.1:0".parse().unwrap(), vec![]));
    let r = m.gw(0).reload(&config(&m, 0)).await.unwrap();
    assert_eq!((r.imports_added, r.peers_added, r.peers_removed), (1, 0, 0));
    assert!(eventually(Duration::from_secs(5), || route_count(&m, 0, "extra.test") == 1).await, "no route");
    let extra_listen = m.gw(0).import_addr("extra.test").unwrap();
    assert_eq!(echo_flow(extra_listen, b"new").await.unwrap().0, "extra");

    // 2. The export goes again: no route, and a new flow fails fast; the import listener goes too.
    m.specs[1].exports.retain(|(s, ..)| s != "extra.test");
    m.gw(1).reload(&config(&m, 1)).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || route_count(&m, 0, "extra.test") == 0).await);
    assert!(echo_flow(extra_listen, b"gone").await.is_err());
    m.specs[0].imports.retain(|(s, ..)| s != "extra.test");
    let r = m.gw(0).reload(&config(&m, 0)).await.unwrap();
    assert_eq!(r.imports_removed, 1);
    assert!(m.gw(0).import_addr("extra.test").is_none());
    assert!(tokio::net::TcpStream::connect(extra_listen).await.is_err(), "the removed listener still accepts");

    // 3. A change that needs a restart is refused as a whole, naming the key; nothing changes.
    let mut cfg = config(&m, 0);
    cfg.fixed.zone = causeway_protocol::ZoneName::new("elsewhere").unwrap();
    cfg.fixed.timing.ping_interval *= 2;
    cfg.snapshot.peers.clear();
    let errs = m.gw(0).reload(&cfg).await.unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(keys, ["zone", "timing"]);
    assert_eq!(m.gw(0).mesh.peers().len(), 2, "a refused reload changed the peers");

    // 4. a removes peer c: the connection closes at once (c sees a down), routes to c go.
    m.specs[0].peers.retain(|(id, ..)| *id != m.ids[2]);
    let removed = tokio::time::Instant::now();
    let r = m.gw(0).reload(&config(&m, 0)).await.unwrap();
    assert_eq!(r.peers_removed, 1);
    let a_down_at_c = || m.gw(2).mesh.peer_state(&m.ids[0]) != causeway_overlay::core::route_table::PeerState::Up;
    assert!(eventually(Duration::from_secs(10), a_down_at_c).await, "c still up with a");
    let closed = removed.elapsed();
    assert_eq!(route_count(&m, 0, "echo.test"), 1);
    // c keeps dialing a, and a refuses it (no longer a configured peer).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a_down_at_c(), "a accepted a removed peer again");

    // The long flows (to b) never noticed.
    stop.store(true, Ordering::Relaxed);
    for (i, f) in flows.into_iter().enumerate() {
        assert_eq!(f.await.unwrap().unwrap_or_else(|e| panic!("long flow {i}: {e}")).0, "b");
    }
    let t = m.gw(0).metrics_text();
    assert_eq!(metric(&t, "causeway_config_reloads_total", &[("result", "ok")]), Some(3.0));
    assert_eq!(metric(&t, "causeway_config_reloads_total", &[("result", "refused")]), Some(1.0));
    eprintln!("hot reload: removed peer's connection closed after {closed:?}; 10 unrelated long flows intact");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_process_reloads_its_file_refuses_a_broken_one_and_keeps_serving() {
    let mut m = echo_three_zones().await;
    m.specs[1].extra.push_str("timing: { watch_interval: 100ms }\n");
    let b = GatewayProcess::spawn(&m, 1, "warn");
    m.start(0).await.unwrap();
    m.start(2).await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 2).await);
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    let path = m.write_config(1).unwrap();

    // A broken file: refused, b keeps serving.
    std::fs::write(&path, "zone: [not yaml\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(echo_flow(listen, b"x").await.unwrap().0, "b");
    // A valid file with a new export: picked up from the file alone.
    let (extra, _) = echo_server("extra".into()).await.unwrap();
    m.specs[1].exports.push(("extra.test".into(), 9090, vec![extra]));
    m.write_config(1).unwrap();
    assert!(eventually(Duration::from_secs(5), || route_count(&m, 0, "extra.test") == 1).await, "file change missed");
    // SIGHUP re-reads the file even when it did not change (here: a no-op), and b keeps serving.
    b.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(echo_flow(listen, b"y").await.unwrap().0, "b");
    assert_eq!(route_count(&m, 0, "extra.test"), 1);
    drop(b);
    m.shutdown().await;
}

/// `imports[].prefer_zones` applies live: a prefers b, then c after a reload, and new flows follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_zone_preference_applies_to_the_next_flows() {
    let mut m = echo_three_zones().await;
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 2).await);
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    assert_eq!(echo_flow(listen, b"before").await.unwrap().0, "b");
    m.specs[0].imports[0].2 = vec!["c".into()];
    let r = m.gw(0).reload(&config(&m, 0)).await.unwrap();
    assert_eq!((r.imports_added, r.imports_removed), (0, 0));
    assert_eq!(echo_flow(listen, b"after").await.unwrap().0, "c");
    m.shutdown().await;
}
