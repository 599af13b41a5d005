//! WAN impairments between two gateways, through the user-space relay (`support/impair.rs`): loss,
//! bursts, reordering, duplication and corruption never corrupt or hang a flow, and handshakes
//! complete through heavy loss. Every transfer is checked by digest at the far end.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use causeway_tests::impair::{Impairment, Relay};
use causeway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Zone a reaches zone b's echo service only through a relay with `imp` both ways.
async fn via_relay(imp: Impairment, seed: u64) -> (TestMesh, Relay, std::net::SocketAddr) {
    let mut m = echo_pair_plan().await;
    let relay = Relay::start(m.addrs[1], imp.clone(), imp, seed).await.unwrap();
    m.specs[0].peers[0].1 = Some(relay.addr.to_string());
    m.specs[1].peers[0].1 = None;
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await, "no route through the relay");
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    (m, relay, listen)
}

/// Sends `len` bytes through the flow and checks the echo's digest. Returns the elapsed time.
async fn transfer(listen: std::net::SocketAddr, len: usize, seed: u64) -> Duration {
    paced_transfer(listen, len, seed, Duration::ZERO).await
}

/// [`transfer`], pausing `pace` after every MiB written (so the flow spans a given time).
async fn paced_transfer(listen: std::net::SocketAddr, len: usize, seed: u64, pace: Duration) -> Duration {
    let data = payload(len, seed);
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    let (mut r, mut w) = s.split();
    let send = async {
        for chunk in data.chunks(1 << 20) {
            w.write_all(chunk).await.unwrap();
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
        }
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::with_capacity(len + 2);
        r.read_to_end(&mut got).await.map(|_| got)
    };
    let (_, got) = tokio::time::timeout(Duration::from_secs(600), async { tokio::join!(send, recv) })
        .await
        .expect("transfer hung");
    let got = got.expect("the flow was reset");
    assert_eq!(&got[..2], b"b\n");
    assert_eq!(got.len() - 2, len, "length differs");
    assert_eq!(sha256(&got[2..]), sha256(&data), "digest differs");
    started.elapsed()
}

fn no_reconnects(m: &TestMesh) {
    let t = m.gw(0).metrics_text();
    assert_eq!(
        metric(&t, "causeway_peer_connects_total", &[("result", "ok")]),
        Some(1.0),
        "the connection was replaced"
    );
    assert_eq!(metric(&t, "causeway_peer_control_errors_total", &[]), None, "a spurious connection close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_intact_through_random_and_bursty_loss() {
    for (loss, burst, seed) in [(0.01, 1, 1), (0.05, 1, 2), (0.10, 1, 3), (0.01, 3, 4)] {
        let imp = Impairment { loss, burst, delay: Duration::from_millis(1), ..Default::default() };
        let (m, relay, listen) = via_relay(imp, seed).await;
        let took = transfer(listen, 64 << 20, seed).await;
        let (fwd, dropped, _, _) = relay.up.get();
        assert!(dropped > 0 && fwd > 0, "the relay dropped nothing");
        eprintln!(
            "loss {loss} burst {burst}: 64 MiB intact in {took:?} ({dropped} of {} datagrams dropped upward)",
            fwd + dropped
        );
        no_reconnects(&m);
        m.shutdown().await;
    }
}

/// Reordering (0-20 ms per-packet jitter), 1 % duplication, 1 % corruption and a path that goes
/// dark for 2 s every 5 s, all at once, on one 64 MiB transfer: it completes intact, and the
/// connection survives every dark window — the peer is routed around while dark (silent past
/// `peer_timeout`) and kept (`peer_close_timeout` is 5 s). QUIC's doubling probe timeout alone
/// would walk into later dark windows and stall the connection past that; the congestion
/// controller's silence probes (one packet per 200 ms beyond a full window) find the light.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_duplication_corruption_and_blackholes_at_once_never_corrupt_a_flow_or_close_the_connection() {
    let imp = Impairment {
        delay: Duration::from_millis(2),
        jitter: Duration::from_millis(20),
        duplicate: 0.01,
        corrupt: 0.01,
        ..Default::default()
    };
    let (m, relay, listen) = via_relay(imp, 9).await;
    // Dark at 1-3 s, 6-8 s, ... from here; the flow below starts at once.
    relay.set_blackhole(Duration::from_secs(5), Duration::from_secs(2), Duration::from_secs(1));
    let took = transfer(listen, 64 << 20, 9).await;
    let (fwd, dropped, dup, corrupt) = relay.up.get();
    let probes: f64 =
        (0..2).map(|i| metric(&m.gw(i).metrics_text(), "causeway_peer_silence_probes_total", &[]).unwrap_or(0.0)).sum();
    let silences =
        metric(&m.gw(0).metrics_text(), "causeway_peer_silences_total", &[("peer_zone", "b")]).unwrap_or(0.0);
    eprintln!(
        "jitter 0-20 ms, 1% duplicated, 1% corrupted, 2 s dark every 5 s: 64 MiB intact in {took:?} \
         ({dup} dup, {corrupt} corrupt, {dropped} of {} dropped; peer silent {silences} times; {probes} silence probes)",
        fwd + dropped
    );
    assert!(dup > 0 && corrupt > 0 && dropped > 0, "nothing was duplicated, corrupted or dropped");
    assert!(took > Duration::from_secs(3), "the transfer ended before the first dark window was over");
    assert!(silences >= 1.0, "the dark windows were not noticed");
    no_reconnects(&m);
    m.shutdown().await;
}

/// A WAN path that goes dark for 2 s every 5 s: the peer is routed around while dark (silent past
/// `peer_timeout`), but the connection and the flow on it survive (`peer_close_timeout` is 5 s),
/// and the transfer completes intact. (A *new* flow started into a dark window fails fast once the
/// peer is silent, by design: `netns.rs` tests that with a partition.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_second_blackhole_every_five_costs_no_connection_and_no_byte() {
    let (m, relay, listen) = via_relay(Impairment { delay: Duration::from_millis(1), ..Default::default() }, 21).await;
    // Dark at 1-3 s, 6-8 s, ... after this point; the flow below starts at once and is paced to
    // span at least two dark windows.
    relay.set_blackhole(Duration::from_secs(5), Duration::from_secs(2), Duration::from_secs(1));
    let took = paced_transfer(listen, 64 << 20, 21, Duration::from_millis(100)).await;
    let (fwd, dropped, _, _) = relay.up.get();
    let t = m.gw(0).metrics_text();
    let silences = metric(&t, "causeway_peer_silences_total", &[("peer_zone", "b")]).unwrap_or(0.0);
    eprintln!(
        "2 s dark every 5 s: 64 MiB intact in {took:?}; {dropped} of {} datagrams dropped; peer silent {silences} times",
        fwd + dropped
    );
    assert!(took > Duration::from_secs(7), "the transfer did not span two dark windows ({took:?})");
    assert!(silences >= 2.0, "the dark windows were not noticed ({silences})");
    no_reconnects(&m);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_handshakes_complete_through_thirty_percent_loss() {
    use causeway_tests::rogue;
    let imp = Impairment { loss: 0.30, burst: 1, ..Default::default() };
    let (m, relay, _) = via_relay(Impairment::default(), 5).await;
    drop(relay);
    let lossy = Relay::start(m.addrs[1], imp.clone(), imp, 50).await.unwrap();
    // Zone a's identity dials b 50 times through 30 % loss each way; every handshake completes
    // (then b closes each as a duplicate of the live connection, which is fine here).
    let creds =
        rogue::credentials(&m.pki, &m.ids[0], Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    let dials: Vec<_> = (0..50)
        .map(|_| {
            let (c, b) = (creds.0.clone(), causeway::certs::bundle_from_pem(m.pki.ca.cert_pem.as_bytes()).unwrap());
            let (id, addr) = (m.ids[1].clone(), lossy.addr);
            tokio::spawn(async move {
                // The client's own handshake timeout is 5 s; retry once like a gateway's dial loop would.
                for _ in 0..3 {
                    if let Ok(x) = rogue::dial(c.clone(), b.clone(), &id, addr).await {
                        return Some(x);
                    }
                }
                None
            })
        })
        .collect();
    let mut done = 0;
    for d in dials {
        if d.await.unwrap().is_some() {
            done += 1;
        }
    }
    assert_eq!(done, 50, "handshakes through 30 % loss");
    assert!(lossy.up.get().1 > 0);
    m.shutdown().await;
}

/// A peer connection outlives its path: when the path's RTT grows (0 → 50 ms here), the congestion
/// window must grow with it. quinn 0.11's BBR alone keeps the window sized for the shortest RTT the
/// connection ever saw and throughput collapses (cwnd ~113 KiB here, ~0.02 Gbit/s in the
/// benchmarks); `PathBbr` (overlay/src/transport/congestion.rs) re-sizes it from the path's minimum RTT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_congestion_window_follows_a_path_that_gets_longer() {
    let (m, relay, listen) = via_relay(Impairment::default(), 11).await;
    // Long enough on the short path for BBR to leave startup and size its window by min RTT.
    transfer(listen, 64 << 20, 1).await;
    relay.set_delay(Duration::from_millis(25));
    // Keep data flowing on the long path: between transfers the connection is idle and its pings
    // are clean RTT samples; a whole 1 s epoch of them above the old minimum raises it.
    let started = Instant::now();
    let mut seed = 2;
    while started.elapsed() < Duration::from_secs(5) {
        transfer(listen, 1 << 20, seed).await;
        seed += 1;
    }
    // The next pong reports the RTT and the window.
    let rtt_now = || metric(&m.gw(0).metrics_text(), "causeway_peer_rtt_seconds", &[("peer_zone", "b")]);
    eventually(Duration::from_secs(2), || rtt_now().is_some_and(|r| r > 0.045)).await;
    let t = m.gw(0).metrics_text();
    let cwnd = metric(&t, "causeway_peer_cwnd_bytes", &[("peer_zone", "b")]).unwrap_or(0.0);
    let rtt = metric(&t, "causeway_peer_rtt_seconds", &[("peer_zone", "b")]).unwrap_or(0.0);
    eprintln!("after the path grew: rtt {:.1} ms, cwnd {:.0} KiB", rtt * 1000.0, cwnd / 1024.0);
    assert!(rtt > 0.045, "the relay's delay did not apply (rtt {rtt})");
    // Sized for a 0.1 ms path the window stays near BBR's minimum (tens of KiB); sized for 50 ms
    // it holds at least a few hundred KiB even at debug-build speeds.
    assert!(cwnd > 512.0 * 1024.0, "cwnd {cwnd} bytes: sized for the old, shorter path");
    let labels = [("peer_zone", "b")];
    assert_eq!(metric(&t, "causeway_peer_window_stretched", &labels), Some(1.0));
    let path_min = metric(&t, "causeway_peer_path_min_rtt_seconds", &labels).unwrap_or(0.0);
    assert!((0.045..0.2).contains(&path_min), "path min RTT {path_min}");
    no_reconnects(&m);
}

/// Per-peer path telemetry from the transport: through 5 % random loss each way, the loss metric
/// of the connection carrying a transfer reads 3–7 %, its counters move, and `/peers` shows the
/// same path. The ratio is read while the transfer runs (an idle connection's pings make a
/// noisier window: 200 packets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_peer_loss_metric_reads_the_paths_loss() {
    let imp = Impairment { loss: 0.05, burst: 1, delay: Duration::from_millis(1), ..Default::default() };
    let (m, relay, listen) = via_relay(imp, 7).await;
    // 24 MiB, paced to take a few seconds: several windows of thousands of packets.
    let transfer = tokio::spawn(paced_transfer(listen, 24 << 20, 7, Duration::from_millis(150)));
    let labels = [("peer", m.ids[1].as_str())];
    let ratio = || metric(&m.gw(0).metrics_text(), "causeway_peer_loss_ratio", &labels);
    // The first window of the transfer closes, then a few more.
    assert!(eventually(Duration::from_secs(10), || ratio().is_some()).await, "no loss window closed");
    let mut seen = Vec::new();
    for _ in 0..10 {
        if let Some(r) = ratio() {
            seen.push(r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    transfer.await.unwrap();
    let (fwd, dropped, _, _) = relay.up.get();
    let offered = dropped as f64 / (fwd + dropped) as f64;
    assert!(!seen.is_empty(), "no loss ratio while the transfer ran");
    let mid = seen[seen.len() / 2];
    eprintln!("loss ratio while transferring: {seen:?}; the relay dropped {offered:.4} of datagrams upward");
    assert!((0.03..=0.07).contains(&mid), "loss ratio {seen:?} (the relay dropped {offered:.3} upward)");
    let t = m.gw(0).metrics_text();
    let count = |name: &str| metric(&t, name, &labels).unwrap_or(0.0);
    let (sent, lost) = (count("causeway_peer_sent_packets_total"), count("causeway_peer_lost_packets_total"));
    assert!(sent > 10_000.0 && lost > 0.0, "sent {sent}, lost {lost}");
    assert!(count("causeway_peer_congestion_events_total") >= 1.0, "{t}");
    assert!(count("causeway_peer_sent_bytes_total") > (24 << 20) as f64, "{t}");
    assert!(count("causeway_peer_received_bytes_total") > (24 << 20) as f64, "{t}");
    let peers = causeway::admin::peers_json(&m.gw(0).mesh);
    let path = &peers["peers"][0]["path"];
    assert!(path["lost_packets"].as_u64().unwrap_or(0) > 0, "{peers}");
    assert!(path["loss_ratio"].as_f64().is_some_and(|r| (0.0..0.2).contains(&r)), "{peers}");
    assert!(path["cwnd_bytes"].as_u64().unwrap_or(0) > 0 && path["rtt_ms"].as_f64().is_some(), "{peers}");
    assert_eq!(path["migrations"], 0);
    no_reconnects(&m);
    m.shutdown().await;
}
